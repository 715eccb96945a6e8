// The fluxserve playground. Everything it knows about models comes from /openapi.json: each reseller route
// POST /bfl/v1/<model> and its JSON schema become an option and a form, so new models and fields appear by
// themselves. It talks to the API as any client does, with the key in TT-API-KEY.

const $ = (selector) => document.querySelector(selector);
const KEY_STORAGE = "fluxserve.playground.key";
const ROUTE = /^\/bfl\/v1\/([^/]+)$/;

let spec = null; // the OpenAPI document
let models = new Map(); // model name -> {summary, schema}

// ---- the key: in sessionStorage only, sent only to this origin ----

function apiKey() {
  return $("#api-key").value.trim();
}

function headers(extra = {}) {
  return { "TT-API-KEY": apiKey(), ...extra };
}

// ---- errors: one readable message, and the field it names marked ----

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
  for (const input of document.querySelectorAll("#fields [name]")) {
    const named = message.includes(`${input.name}:`) || message.includes(`'${input.name}'`);
    input.setAttribute("aria-invalid", named ? "true" : "false");
    if (named) input.setAttribute("aria-describedby", `${input.id}-help error`);
  }
  const invalid = document.querySelector('#fields [aria-invalid="true"]');
  (invalid || box).focus?.();
}

function clearError() {
  $("#error").hidden = true;
  $("#error").textContent = "";
  for (const input of document.querySelectorAll("#fields [aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    input.setAttribute("aria-describedby", `${input.id}-help`);
  }
}

/** The message of an error response in any of the server's shapes (reseller, validation, plain). */
async function messageOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.message === "string" && body.message) return body.message;
    if (Array.isArray(body.detail)) {
      return body.detail.map((item) => `${(item.loc || []).slice(1).join(".")}: ${item.msg}`).join("\n");
    }
    if (body.detail) return String(body.detail);
  } catch {
    // not JSON: the text itself
  }
  return `${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
}

// ---- the schema: models and their fields ----

function resolve(schema) {
  if (schema && schema.$ref) return resolve(spec.components.schemas[schema.$ref.split("/").pop()]);
  if (schema && schema.anyOf) {
    const real = schema.anyOf.filter((part) => part.type !== "null");
    if (real.length === 1) return { ...schema, ...resolve(real[0]), anyOf: undefined, nullable: true };
  }
  return schema;
}

function loadModels() {
  models = new Map();
  for (const [path, item] of Object.entries(spec.paths)) {
    const match = ROUTE.exec(path);
    const body = item.post?.requestBody?.content?.["application/json"]?.schema;
    if (match && body) models.set(match[1], { summary: item.post.summary || "", schema: resolve(body) });
  }
  const select = $("#model");
  select.replaceChildren(
    ...[...models.keys()].map((name) => new Option(`${name}: ${models.get(name).summary}`, name)),
  );
}

const isImage = (name, field) => field.type === "string" && /base64/i.test(field.description || "");

/** "256..1440, multiple of 32, default 1024": the limits the schema states. */
function limits(field) {
  const parts = [];
  const maximum = field.maximum < 1e15 ? field.maximum : undefined; // not the 64-bit seed's bound
  if (field.minimum !== undefined || maximum !== undefined) {
    parts.push(`${field.minimum ?? ""}..${maximum ?? ""}`);
  }
  if (field.multipleOf) parts.push(`multiple of ${field.multipleOf}`);
  if (field.maxLength && field.maxLength < 100000 && field.type === "string") {
    parts.push(`at most ${field.maxLength} characters`);
  }
  if (field.enum) parts.push(`one of ${field.enum.join(", ")}`);
  if (field.default !== undefined && field.default !== null) parts.push(`default ${field.default}`);
  return parts.join("; ");
}

function fieldElement(name, field, required) {
  const id = `field-${name}`;
  const wrap = document.createElement("div");
  wrap.className = "field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = (field.title || name) + (required ? " (required)" : "");
  let input;
  if (isImage(name, field)) {
    input = document.createElement("input");
    input.type = "file";
    input.accept = "image/*";
    wrap.classList.add("drop");
    wireDrop(wrap, input);
  } else if (field.enum) {
    input = document.createElement("select");
    if (!required) input.append(new Option(`(default${field.default ? `: ${field.default}` : ""})`, ""));
    for (const value of field.enum) input.append(new Option(value, value));
  } else if (field.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = field.default === true;
  } else if (field.type === "integer" || field.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    if (field.minimum !== undefined) input.min = field.minimum;
    if (field.maximum !== undefined && field.maximum < 1e15) input.max = field.maximum;
    input.step = field.multipleOf || (field.type === "integer" ? 1 : "any");
    if (field.default !== undefined && field.default !== null) input.placeholder = String(field.default);
  } else if (name === "prompt" || (field.maxLength || 0) >= 10000) {
    input = document.createElement("textarea");
  } else {
    input = document.createElement("input");
    input.type = field.format === "uri" ? "url" : "text";
    if (field.default !== undefined && field.default !== null) input.placeholder = String(field.default);
  }
  input.id = id;
  input.name = name;
  input.dataset.kind = isImage(name, field) ? "image" : field.type || "string";
  if (required) input.required = true;
  const help = document.createElement("p");
  help.className = "help";
  help.id = `${id}-help`;
  const stated = limits(field);
  help.textContent = [field.description, stated && `(${stated})`].filter(Boolean).join(" ");
  input.setAttribute("aria-describedby", help.id);
  wrap.append(label, input, help);
  return wrap;
}

/** A file input that also takes a dropped image, and previews it. */
function wireDrop(zone, input) {
  const preview = () => {
    zone.querySelector("img")?.remove();
    const file = input.files[0];
    if (file) {
      const img = document.createElement("img");
      img.alt = `Reference: ${file.name}`;
      img.src = URL.createObjectURL(file);
      zone.append(img);
    }
  };
  input.addEventListener("change", preview);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      preview();
    }
  });
}

function renderForm() {
  const model = models.get($("#model").value);
  const keep = { prompt: $("#fields [name=prompt]")?.value };
  $("#model-help").textContent = model.schema.description || "";
  const required = new Set(model.schema.required || []);
  $("#fields").replaceChildren(
    ...Object.entries(model.schema.properties).map(([name, field]) =>
      fieldElement(name, resolve(field), required.has(name)),
    ),
  );
  if (keep.prompt) $("#fields [name=prompt]").value = keep.prompt;
  clearError();
}

// ---- submit ----

const base64Of = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });

/** The request body: only what the user set, so the server's defaults apply to the rest. */
async function requestBody() {
  const schema = models.get($("#model").value).schema;
  const body = {};
  for (const input of document.querySelectorAll("#fields [name]")) {
    const field = resolve(schema.properties[input.name]);
    if (input.dataset.kind === "image") {
      if (input.files.length) body[input.name] = await base64Of(input.files[0]);
    } else if (input.dataset.kind === "boolean") {
      if (input.checked !== (field.default === true)) body[input.name] = input.checked;
    } else if (input.value !== "") {
      body[input.name] = input.dataset.kind === "integer" || input.dataset.kind === "number"
        ? Number(input.value)
        : input.value;
    }
  }
  return body;
}

async function submit(event) {
  event?.preventDefault();
  clearError();
  if (!apiKey()) {
    showError("Paste an API key first (`fluxserve keys create --name me` makes one).");
    $("#api-key").focus();
    return;
  }
  const model = $("#model").value;
  const button = $("#generate");
  button.disabled = true;
  try {
    const response = await fetch(`/bfl/v1/${encodeURIComponent(model)}`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(await requestBody()),
    });
    if (!response.ok) {
      showError(await messageOf(response));
      return;
    }
    const accepted = await response.json();
    const jobId = accepted.data?.jobId || accepted.data?.job_id;
    await follow(jobId);
  } catch (error) {
    showError(`Could not reach the server: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- progress: the event stream, or polling where the server has none ----

function showProgress(text, fraction) {
  $("#job-status").textContent = text;
  if (fraction !== undefined) $("#progress").value = fraction;
}

async function follow(jobId) {
  $("#job").hidden = false;
  $("#result").hidden = true;
  $("#job").dataset.jobId = jobId;
  $("#preview").hidden = true;
  showProgress("submitted", 0);
  const final = (await streamEvents(jobId)) || (await poll(jobId));
  showResult(final);
  loadGallery();
}

/** Reads GET /flux/events with fetch (EventSource cannot send headers); the final fetch JSON, or null
 * when the server has no such route or the stream ended early (then polling takes over). */
async function streamEvents(jobId) {
  let response;
  try {
    response = await fetch(`/flux/events?jobId=${encodeURIComponent(jobId)}`, {
      headers: headers({ Accept: "text/event-stream" }),
    });
  } catch {
    return null;
  }
  if (!response.ok || !response.body) return null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        if (colon === 0) continue; // a comment (keep-alive)
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (name === "result") {
        reader.cancel();
        return payload;
      }
      onUpdate(name, payload);
    }
  }
}

function onUpdate(name, payload) {
  if (name === "queued") {
    showProgress(`queued, ${payload.position ?? 0} ahead`, 0);
  } else if (name === "running") {
    const fraction = payload.progress ?? 0;
    showProgress(`running, ${Math.round(fraction * 100)}%`, fraction);
  } else if (name === "preview" && payload.image) {
    // A live preview (the server's FLUXSERVE_PREVIEWS): the image as it forms, a small JPEG data URI.
    $("#preview-image").src = payload.image;
    $("#preview").hidden = false;
  }
}

async function poll(jobId) {
  for (;;) {
    const response = await fetch(`/flux/fetch?jobId=${encodeURIComponent(jobId)}`, { headers: headers() });
    if (!response.ok) throw new Error(await messageOf(response));
    const body = await response.json();
    if (body.status === "SUCCESS" || body.status === "FAILED") return body;
    if (body.status === "PENDING_QUEUE") onUpdate("queued", { position: body.data?.queuePosition });
    else {
      onUpdate("running", { progress: body.data?.progress });
      if (body.data?.previewUrl) onUpdate("preview", { image: body.data.previewUrl });
    }
    await new Promise((done) => setTimeout(done, 400));
  }
}

function showResult(body) {
  $("#preview").hidden = true;
  if (body.status !== "SUCCESS" || !body.data?.imageUrl) {
    showProgress("failed", 0);
    showError(body.message || "The job failed.");
    return;
  }
  showProgress("done", 1);
  const data = body.data;
  $("#result-image").src = data.imageUrl;
  $("#result-download").href = data.imageUrl;
  $("#result-download").download = `${data.jobId}.${data.imageUrl.includes(".jpeg") ? "jpeg" : "png"}`;
  const meta = { job: data.jobId, model: data.mode, seed: data.seed, size: data.size, prompt: data.prompt };
  if (body.details) Object.assign(meta, body.details);
  $("#result-meta").replaceChildren(
    ...Object.entries(meta).flatMap(([name, value]) => {
      const term = document.createElement("dt");
      term.textContent = name;
      const description = document.createElement("dd");
      description.textContent = typeof value === "string" ? value : JSON.stringify(value);
      return [term, description];
    }),
  );
  $("#result").hidden = false;
}

// ---- the gallery: the key's recent jobs, with re-run and download ----

async function loadGallery() {
  if (!apiKey()) return;
  const response = await fetch("/playground/jobs", { headers: headers() });
  if (!response.ok) {
    $("#gallery").replaceChildren();
    return;
  }
  const { jobs } = await response.json();
  $("#gallery").replaceChildren(...jobs.map(galleryItem));
}

function galleryItem(job) {
  const item = document.createElement("li");
  item.dataset.jobId = job.jobId;
  if (job.imageUrl) {
    const img = document.createElement("img");
    img.src = job.imageUrl;
    img.alt = job.prompt;
    item.append(img);
  }
  const text = document.createElement("p");
  text.className = "prompt";
  text.textContent = `${job.mode} · ${job.status} · seed ${job.seed}${job.size ? ` · ${job.size}` : ""}: ${job.prompt}`;
  const rerun = document.createElement("button");
  rerun.type = "button";
  rerun.textContent = "Re-run";
  rerun.setAttribute("aria-label", `Re-run: ${job.prompt}`);
  rerun.addEventListener("click", () => rerunJob(job));
  item.append(text, rerun);
  if (job.imageUrl) {
    const link = document.createElement("a");
    link.href = job.imageUrl;
    link.download = `${job.jobId}`;
    link.textContent = "Download";
    item.append(" ", link);
  }
  return item;
}

/** The job's model, prompt and seed back in the form, and submitted again. */
function rerunJob(job) {
  if (models.has(job.mode) && $("#model").value !== job.mode) {
    $("#model").value = job.mode;
    renderForm();
  }
  const prompt = $("#fields [name=prompt]");
  const seed = $("#fields [name=seed]");
  if (prompt) prompt.value = job.prompt;
  if (seed) seed.value = job.seed;
  submit();
}

// ---- start ----

async function start() {
  $("#api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, apiKey());
    loadGallery();
  });
  $("#model").addEventListener("change", renderForm);
  $("#request").addEventListener("submit", submit);
  $("#refresh").addEventListener("click", loadGallery);
  const response = await fetch("/openapi.json");
  if (!response.ok) {
    showError(`Could not load the API description: ${await messageOf(response)}`);
    return;
  }
  spec = await response.json();
  loadModels();
  renderForm();
  document.body.dataset.ready = "true";
  loadGallery();
}

start();
