"""The Python client of fluxserve, in either of its dialects, sync (:class:`Client`) and async
(:class:`AsyncClient`).

``generate(model, prompt, ...)`` submits a job, follows its event stream (``/flux/events`` or ``/v1/events``;
polling fetch where a server has no stream) and returns a :class:`Generation`: the image's bytes, its seed,
the final prompt and the :class:`Job`. ``submit``, ``fetch``, ``cancel``, ``stream`` and ``wait`` are the
parts it is made of. Because fluxserve speaks the hosted services' wire contracts, the same client works
against them with their base URL and key (the reseller's ``TT-API-KEY`` API, the vendor's ``x-key`` API);
without an event route there, it polls.

Every refusal is a :class:`FluxserveError` carrying the server's message, typed by status: 400 and 422
:class:`BadRequest`, 401 and 403 :class:`Unauthorized`, 402 :class:`InsufficientCredits`, 404
:class:`NotFound`, 429 :class:`RateLimited`, 5xx :class:`ServerError`; a job that ends without an image is
:class:`JobFailed`. 429s, 5xx answers and network errors are retried with backoff (``Retry-After`` when
the server sends one), submits too: each carries an ``Idempotency-Key``, so a retried submit that had
reached the server returns the same job and is charged once. :func:`verify_webhook` checks a webhook's
Standard Webhooks signature with the key's webhook secret.

Imports neither torch nor the server; Pillow only if a reference image is given as a PIL image.
"""

from __future__ import annotations

import base64
import io
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import httpx
import httpx_sse
import tenacity
from standardwebhooks import Webhook, WebhookVerificationError

Dialect = Literal["reseller", "vendor"]
State = Literal["queued", "running", "succeeded", "failed", "moderated"]
ImageInput = Any  # a path (str or os.PathLike), an http(s) URL, encoded bytes, or a PIL image

DEFAULT_URL = "http://127.0.0.1:8000"
STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)  # the server sends a comment every 15 s on a quiet stream


class FluxserveError(Exception):
    """A request the server refused or failed, with its message; ``status_code`` is None when no HTTP
    answer came (the job failed, or a webhook's signature is wrong)."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


class BadRequest(FluxserveError):
    """400 (reseller) or 422 (vendor): a field broke a rule; the message names it."""


class Unauthorized(FluxserveError):
    """401 (reseller) or 403 (vendor): the key is missing, wrong or revoked."""


class InsufficientCredits(FluxserveError):
    """402: the key's balance does not cover the model's price."""


class NotFound(FluxserveError):
    """404: no such job for this key (or no such route)."""


class RateLimited(FluxserveError):
    """429: too many active jobs (or open streams) for the key; retried before it is raised."""


class ServerError(FluxserveError):
    """5xx: the server failed; retried before it is raised."""


class JobFailed(FluxserveError):
    """The job ended without an image: failed, moderated or canceled; ``job`` says which and why."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} {job.state}: {job.message or 'no reason given'}")
        self.job = job


class InvalidSignature(FluxserveError):
    """A webhook whose signature, id or timestamp does not check out: do not trust its body."""


_ERRORS: dict[int, type[FluxserveError]] = {
    400: BadRequest,
    422: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    402: InsufficientCredits,
    404: NotFound,
    429: RateLimited,
}


@dataclass(frozen=True)
class Job:
    """A job as its fetch JSON says, in either dialect; ``raw`` is that JSON."""

    id: str
    state: State
    progress: float | None = None
    position: int | None = None  # queued jobs ahead of it, while queued (fluxserve only)
    image_url: str | None = None
    seed: int | None = None
    prompt: str | None = None
    message: str = ""  # why it failed or was moderated
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "moderated")


@dataclass(frozen=True)
class Event:
    """One event of a job's stream: ``queued`` (``position``), ``running`` (``progress``), ``preview``
    (``preview``: a live preview's JPEG data URI, when the server has them on) or ``result`` (``job``,
    final). ``id`` resumes the stream after it (``Last-Event-ID``)."""

    kind: str
    id: str | None = None
    position: int | None = None
    progress: float | None = None
    job: Job | None = None
    preview: str | None = None


@dataclass(frozen=True)
class Generation:
    """What :meth:`Client.generate` returns: the image as the server encoded it (PNG or JPEG)."""

    image: bytes
    seed: int
    prompt: str
    job: Job


class _Wire(Protocol):
    """What differs between the dialects: routes, the key's header, and the shape of their JSON."""

    key_header: str
    events_path: str
    events_param: str

    def submit_path(self, model: str) -> str: ...

    def submitted_id(self, body: dict[str, Any]) -> str: ...

    def fetch_request(self, job_id: str) -> tuple[str, dict[str, str]]: ...

    def cancel_request(self, job_id: str) -> tuple[str, dict[str, str]]: ...

    def job(self, body: dict[str, Any]) -> Job: ...


class _Reseller:
    key_header = "TT-API-KEY"
    events_path = "/flux/events"
    events_param = "jobId"

    def submit_path(self, model: str) -> str:
        return f"/bfl/v1/{model}"

    def submitted_id(self, body: dict[str, Any]) -> str:
        data = body.get("data") or {}
        return str(data.get("jobId") or data.get("job_id"))

    def fetch_request(self, job_id: str) -> tuple[str, dict[str, str]]:
        return "/flux/fetch", {"jobId": job_id}

    def cancel_request(self, job_id: str) -> tuple[str, dict[str, str]]:
        return "/flux/cancel", {"jobId": job_id}

    def job(self, body: dict[str, Any]) -> Job:
        data = body.get("data") or {}
        status = body.get("status")
        message = str(body.get("message") or "")
        state: State
        if status == "SUCCESS":
            state = "succeeded"
        elif status == "FAILED":
            state = "moderated" if "Moderated" in message else "failed"
        else:
            state = "running" if status == "ON_QUEUE" else "queued"
        seed = data.get("seed")
        return Job(
            id=str(data.get("jobId") or body.get("jobId")),
            state=state,
            progress=data.get("progress"),
            position=data.get("queuePosition"),
            image_url=data.get("imageUrl"),
            seed=None if seed in (None, "") else int(seed),
            prompt=data.get("prompt"),
            message="" if state == "succeeded" else message,
            raw=body,
        )


class _Vendor:
    key_header = "x-key"
    events_path = "/v1/events"
    events_param = "id"

    def submit_path(self, model: str) -> str:
        return f"/v1/{model}"

    def submitted_id(self, body: dict[str, Any]) -> str:
        return str(body["id"])

    def fetch_request(self, job_id: str) -> tuple[str, dict[str, str]]:
        return "/v1/get_result", {"id": job_id}

    def cancel_request(self, job_id: str) -> tuple[str, dict[str, str]]:
        raise FluxserveError("the vendor's API has no cancel; cancel through the reseller dialect")

    def job(self, body: dict[str, Any]) -> Job:
        status = body.get("status")
        if status == "Task not found":
            raise NotFound(f"no task {body.get('id')!r} for this key", 404)
        result = body.get("result") or {}
        details = body.get("details") or {}
        position = details.get("queue_position")
        state: State
        if status == "Ready":
            state = "succeeded"
        elif status in ("Request Moderated", "Content Moderated"):
            state = "moderated"
        elif status == "Pending":
            state = "queued" if position is not None else "running"
        else:
            state = "failed"
        reasons = details.get("Moderation Reasons") or [details.get("error") or ""]
        return Job(
            id=str(body.get("id")),
            state=state,
            progress=body.get("progress"),
            position=position,
            image_url=result.get("sample"),
            seed=result.get("seed"),
            prompt=result.get("prompt"),
            message=f"{status}: {', '.join(map(str, reasons))}" if state in ("failed", "moderated") else "",
            raw=body,
        )


_WIRES: dict[str, _Wire] = {"reseller": _Reseller(), "vendor": _Vendor()}


def _message(response: httpx.Response) -> str:
    """The server's own words: the reseller's ``message``, the vendor's ``detail`` (a list for 422s)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("message"), str) and body["message"]:
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, list):
            return "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
            )
        if detail is not None:
            return str(detail)
    return response.text[:500]


def _check(response: httpx.Response) -> None:
    """Raise the typed error of a refused or failed request."""
    if response.is_success:
        return
    status = response.status_code
    kind = _ERRORS.get(status, ServerError if status >= 500 else FluxserveError)
    retry_after = response.headers.get("retry-after", "")
    wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
    raise kind(_message(response), status, wait)


def _image_url(job: Job) -> str:
    """Where the job's image is, or :class:`JobFailed` when it made none."""
    if job.state != "succeeded" or not job.image_url:
        raise JobFailed(job)
    return job.image_url


# A server without an event route (404), with too many streams open (429), whose stream failed or broke:
# the client polls fetch from then on.
_NO_STREAM = (NotFound, RateLimited, ServerError, httpx_sse.SSEError, httpx.TransportError)


def _event(sse: httpx_sse.ServerSentEvent, wire: _Wire) -> Event:
    data = sse.json()
    if sse.event == "result":
        return Event("result", sse.id or None, job=wire.job(data))
    preview = data.get("image") if sse.event == "preview" else None
    return Event(
        sse.event,
        sse.id or None,
        position=data.get("position"),
        progress=data.get("progress"),
        preview=preview,
    )


def _polled(job: Job) -> Event:
    """A fetched job as the event a stream would have sent."""
    if job.done:
        return Event("result", job=job)
    return Event(job.state, position=job.position, progress=job.progress)


def encode_image(image: ImageInput) -> str:
    """A reference image as the APIs take it: an http(s) URL as is, anything else base64 (a file's path,
    its bytes, or a PIL image, sent as PNG)."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return image
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    elif hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(
            f"reference image: expected a path, URL, bytes or PIL image, not {type(image).__name__}"
        )
    return base64.b64encode(data).decode()


def request_body(
    prompt: str | None, images: Sequence[ImageInput], fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The submit JSON: the prompt, the reference images as ``input_image``, ``input_image_2``, ... (the
    field names of both dialects), and any other fields as given (``seed``, ``width``, ``steps``...)."""
    body: dict[str, Any] = {name: value for name, value in fields.items() if value is not None}
    if prompt is not None:
        body["prompt"] = prompt
    for index, image in enumerate(images):
        body["input_image" if index == 0 else f"input_image_{index + 1}"] = encode_image(image)
    return body


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict[str, Any]:
    """A webhook's JSON once its signature checks out with the key's webhook secret (``whsec_...``, shown
    by ``fluxserve keys create``); :class:`InvalidSignature` otherwise, or when it is over 5 minutes old."""
    try:
        payload = Webhook(secret).verify(body, {name.lower(): value for name, value in headers.items()})
    except WebhookVerificationError as error:
        raise InvalidSignature(f"webhook signature: {error}") from error
    if not isinstance(payload, dict):
        raise InvalidSignature("webhook body: not a JSON object")
    return payload


def _transient(error: BaseException) -> bool:
    return isinstance(error, RateLimited | ServerError | httpx.TransportError)


@dataclass(frozen=True)
class Retries:
    """How 429s, 5xx answers and network errors are retried: ``attempts`` tries in all, waiting the
    server's ``Retry-After`` or ``wait`` seconds doubling up to ``max_wait``."""

    attempts: int = 4
    wait: float = 0.5
    max_wait: float = 10.0

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, FluxserveError) and error.retry_after is not None:
            return min(error.retry_after, self.max_wait)
        return min(self.wait * 2.0 ** (state.attempt_number - 1), self.max_wait)

    def options(self) -> dict[str, Any]:
        return {
            "retry": tenacity.retry_if_exception(_transient),
            "wait": self._wait,
            "stop": tenacity.stop_after_attempt(self.attempts),
            "reraise": True,
        }


def _setup(base_url: str | None, key: str | None, dialect: Dialect) -> tuple[str, dict[str, str], _Wire]:
    """Base URL and key from the arguments, else ``FLUXSERVE_URL`` and ``FLUXSERVE_KEY``."""
    key = key or os.environ.get("FLUXSERVE_KEY")
    if not key:
        raise Unauthorized("no API key: pass key= or set FLUXSERVE_KEY")
    wire = _WIRES[dialect]
    url = (base_url or os.environ.get("FLUXSERVE_URL") or DEFAULT_URL).rstrip("/")
    return url, {wire.key_header: key}, wire


class Client:
    """A synchronous client; use it as a context manager (or call :meth:`close`)."""

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        dialect: Dialect = "reseller",
        timeout: float = 60.0,
        retries: Retries | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        url, headers, self._wire = _setup(base_url, key, dialect)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._downloads = httpx.Client(timeout=timeout, follow_redirects=True)  # never sees the key
        self._retries = retries or Retries()
        self._poll = poll_seconds

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        for attempt in tenacity.Retrying(**self._retries.options()):
            with attempt:
                response = self._http.request(method, path, **kwargs)
                _check(response)
        body: dict[str, Any] = response.json()
        return body

    def submit(
        self, model: str, prompt: str | None = None, *, images: Sequence[ImageInput] = (), **fields: Any
    ) -> str:
        """Submit a job; returns its id. Fields are the model's (``seed``, ``width``, ``steps``...)."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        body = self._send(
            "POST", self._wire.submit_path(model), json=request_body(prompt, images, fields), headers=headers
        )
        return self._wire.submitted_id(body)

    def fetch(self, job_id: str) -> Job:
        path, params = self._wire.fetch_request(job_id)
        return self._wire.job(self._send("GET", path, params=params))

    def cancel(self, job_id: str) -> Job:
        path, body = self._wire.cancel_request(job_id)
        return self._wire.job(self._send("POST", path, json=body))

    def stream(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events from the server, until its result or until the server ends the stream (it
        does after a quiet spell: call again with the last event's id to carry on)."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        params = {self._wire.events_param: job_id}
        with httpx_sse.connect_sse(
            self._http, "GET", self._wire.events_path, params=params, headers=headers, timeout=STREAM_TIMEOUT
        ) as source:
            if source.response.status_code == 204:  # the result was sent already
                return
            if not source.response.is_success:
                source.response.read()
                _check(source.response)
            for sse in source.iter_sse():
                if sse.data:  # not a keep-alive comment (httpx-sse reports those as empty events)
                    yield _event(sse, self._wire)

    def wait(self, job_id: str, on_event: Callable[[Event], None] | None = None) -> Job:
        """Follow the job to its end and return it; ``on_event`` sees each event. Polls fetch every
        ``poll_seconds`` when the server has no event stream (404)."""
        notify = on_event or (lambda event: None)
        last: str | None = None
        streaming = True
        while True:
            if streaming:
                try:
                    for event in self.stream(job_id, last):
                        last = event.id or last
                        notify(event)
                        if event.job is not None:
                            return event.job
                except _NO_STREAM:
                    streaming = False
            job = self.fetch(job_id)  # a stream that ended early, or a poll
            if job.done or not streaming:
                notify(_polled(job))
            if job.done:
                return job
            if not streaming:
                time.sleep(self._poll)

    def download(self, url: str) -> bytes:
        for attempt in tenacity.Retrying(**self._retries.options()):
            with attempt:
                response = self._downloads.get(url)
                _check(response)
        return response.content

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        images: Sequence[ImageInput] = (),
        on_event: Callable[[Event], None] | None = None,
        **fields: Any,
    ) -> Generation:
        """Submit, wait for the result and download its image; :class:`JobFailed` when there is none."""
        job = self.wait(self.submit(model, prompt, images=images, **fields), on_event)
        image = self.download(_image_url(job))
        return Generation(image, int(job.seed or 0), job.prompt or "", job)


class AsyncClient:
    """The asynchronous twin of :class:`Client` (same methods, awaited); ``async with`` it."""

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        dialect: Dialect = "reseller",
        timeout: float = 60.0,
        retries: Retries | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        url, headers, self._wire = _setup(base_url, key, dialect)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)
        self._downloads = httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._retries = retries or Retries()
        self._poll = poll_seconds

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async for attempt in tenacity.AsyncRetrying(**self._retries.options()):
            with attempt:
                response = await self._http.request(method, path, **kwargs)
                _check(response)
        body: dict[str, Any] = response.json()
        return body

    async def submit(
        self, model: str, prompt: str | None = None, *, images: Sequence[ImageInput] = (), **fields: Any
    ) -> str:
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        body = await self._send(
            "POST", self._wire.submit_path(model), json=request_body(prompt, images, fields), headers=headers
        )
        return self._wire.submitted_id(body)

    async def fetch(self, job_id: str) -> Job:
        path, params = self._wire.fetch_request(job_id)
        return self._wire.job(await self._send("GET", path, params=params))

    async def cancel(self, job_id: str) -> Job:
        path, body = self._wire.cancel_request(job_id)
        return self._wire.job(await self._send("POST", path, json=body))

    async def stream(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        params = {self._wire.events_param: job_id}
        async with httpx_sse.aconnect_sse(
            self._http, "GET", self._wire.events_path, params=params, headers=headers, timeout=STREAM_TIMEOUT
        ) as source:
            if source.response.status_code == 204:
                return
            if not source.response.is_success:
                await source.response.aread()
                _check(source.response)
            async for sse in source.aiter_sse():
                if sse.data:
                    yield _event(sse, self._wire)

    async def wait(self, job_id: str, on_event: Callable[[Event], None] | None = None) -> Job:
        notify = on_event or (lambda event: None)
        last: str | None = None
        streaming = True
        while True:
            if streaming:
                try:
                    async for event in self.stream(job_id, last):
                        last = event.id or last
                        notify(event)
                        if event.job is not None:
                            return event.job
                except _NO_STREAM:
                    streaming = False
            job = await self.fetch(job_id)
            if job.done or not streaming:
                notify(_polled(job))
            if job.done:
                return job
            if not streaming:
                await anyio.sleep(self._poll)

    async def download(self, url: str) -> bytes:
        async for attempt in tenacity.AsyncRetrying(**self._retries.options()):
            with attempt:
                response = await self._downloads.get(url)
                _check(response)
        return response.content

    async def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        images: Sequence[ImageInput] = (),
        on_event: Callable[[Event], None] | None = None,
        **fields: Any,
    ) -> Generation:
        job_id = await self.submit(model, prompt, images=images, **fields)
        job = await self.wait(job_id, on_event)
        image = await self.download(_image_url(job))
        return Generation(image, int(job.seed or 0), job.prompt or "", job)
