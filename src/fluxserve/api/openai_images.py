"""The OpenAI images API's surface: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

What chat front ends, agent frameworks and the ``openai`` SDKs speak, with ``Authorization: Bearer <key>``
(the same keys and balance as the other surfaces). Synchronous, as that API is: the request returns when
its images exist, within ``FLUXSERVE_OPENAI_WAIT_SECONDS``; past that a 504 names the jobs, which carry on.
``n`` images are ``n`` ordinary jobs (a job makes one image), each charged as one, each visible to
``/flux/fetch``. ``model`` is any model of the table that needs only a prompt; ``size`` is ``WxH`` (made
the model's own aspect ratio or width and height) or ``auto``; ``quality``, ``style`` and ``user`` are
accepted and ignored, and so is an edit's ``mask`` (the edit follows the prompt, as Kontext does). Errors
are in that API's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import bearer_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import NO_RETRY, OpenAIErrorBody, responses
from fluxserve.api.events import EventStreams, get_streams
from fluxserve.api.limits import HeldRequests
from fluxserve.api.requests import (
    SubmitRequest,
    encoded_uploads,
    image_slots,
    needs_only_a_prompt,
    refusing_routes,
    schema_of,
    size_fields,
    upload_name,
)
from fluxserve.core.fields import Prompt, Trimmed, error_messages
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import MODELS, ModelSpec, SurfaceName
from fluxserve.core.notes import READ_AS
from fluxserve.errors import InvalidInput, QuotaExceeded, Refused
from fluxserve.jobs.retention import drop_inputs

SAFETY_SECONDS = 5.0  # the longest a wait goes without reading its jobs, should a change go unheard
JOB_IDS_HEADER = "X-Job-Ids"
MODERATED_HEADER = "X-Moderated-Job-Ids"  # the jobs of n whose image was refused (and left out of data)
MODERATED = (JobStatus.REQUEST_MODERATED, JobStatus.CONTENT_MODERATED)
MAX_N = 4
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
RULES = {
    "n": f"must be an integer between 1 and {MAX_N}",
    "size": "must be 'WxH' (e.g. '1024x1024') with an aspect ratio between 21:9 and 9:21, or 'auto'",
    "response_format": "must be 'url' or 'b64_json'",
}
MODEL_NAMES = [
    name
    for name, spec in MODELS.items()
    if (schema := schema_of(spec)) is not None and needs_only_a_prompt(schema)
]


@dataclass(frozen=True)
class ImagesOptions:
    """Set by ``app.py`` from the settings (``app.state.openai_images``)."""

    wait_seconds: float
    model: str  # for generations that name none
    edit_model: str  # for edits that name none
    held: HeldRequests  # this process's requests waiting for their images, across keys


def _options(request: Request) -> ImagesOptions:
    return cast(ImagesOptions, request.app.state.openai_images)


def _refusal(errors: list[dict[str, Any]]) -> Refused:
    """Validation errors as one 400; ``param`` is the first field at fault."""
    lines: list[str] = []
    params: list[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = loc[0] if loc else "body"
        params.append(upload_name(field))
        line = f"{field}: {RULES[field]}" if field in RULES else error_messages([error])[0]
        lines.append(line.replace(f"{field}: ", f"{upload_name(field)}: ", 1))
    return Refused(400, "; ".join(dict.fromkeys(lines)), param=params[0] if params else None)


router = APIRouter(prefix="/v1/images", tags=["openai"], route_class=refusing_routes(_refusal))

Key = Annotated[ApiKey, Depends(bearer_key)]
Deps = Annotated[Services, Depends(get_services)]
Options = Annotated[ImagesOptions, Depends(_options)]
Streams = Annotated[EventStreams, Depends(get_streams)]
Model = Annotated[
    str | None, Trimmed, Field(json_schema_extra={"enum": MODEL_NAMES}, description="The model.")
]
N = Annotated[int, Field(ge=1, le=MAX_N, description="How many images.")]
Size = Annotated[str | None, Trimmed, Field(pattern=SIZE_PATTERN, description="WxH or auto.")]
ResponseFormat = Annotated[Literal["url", "b64_json"] | None, Trimmed]
Ignored = Annotated[str | None, Field(description="Accepted and ignored.")]


class GenerationRequest(BaseModel):
    """``POST /v1/images/generations``; fields it does not have are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Prompt
    model: Model = None
    n: N = 1
    size: Size = None
    response_format: ResponseFormat = Field(default=None, description="Default url.")
    quality: Ignored = None
    style: Ignored = None
    user: Ignored = None


class ImageData(BaseModel):
    url: str | None = Field(default=None, json_schema_extra={"format": "uri"})
    b64_json: str | None = None
    revised_prompt: str = Field(description="The prompt the image was made from.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ImagesResponse,
        "description": f"The images; fewer than n when some were moderated ({MODERATED_HEADER} names them)",
    },
    **responses(
        OpenAIErrorBody,
        {
            400: "A parameter is invalid (param names it), or the prompt or an image was moderated",
            401: "Missing or invalid bearer key",
            402: "Not enough credits",
            404: "No such model",
            413: "The body is larger than this server accepts",
            429: "Too many active jobs for this key",
            "4XX": "Another client error",
            500: "A job failed",
            504: "The images were not ready in time; the jobs carry on",
        },
    ),
}


def _spec(model: str) -> ModelSpec:
    if model not in MODEL_NAMES:
        raise Refused(
            404,
            f"The model '{model[:100]}' does not exist on this server; models: {', '.join(MODEL_NAMES)}",
            param="model",
            code="model_not_found",
        )
    return MODELS[model]


def _shape(size: str | None) -> tuple[int, int] | None:
    if size is None or size == "auto":
        return None
    match = re.fullmatch(r"([0-9]+)x([0-9]+)", size)
    assert match is not None  # the schema's pattern
    return int(match[1]), int(match[2])


def _request(spec: ModelSpec, prompt: str, size: str | None, images: dict[str, str]) -> SubmitRequest:
    schema = schema_of(spec)
    assert schema is not None  # MODEL_NAMES has only models with a schema
    shape = _shape(size)
    try:
        sized = {} if shape is None else size_fields(schema, shape, shape[0] * shape[1])
    except ValueError:
        raise Refused(400, f"size: {RULES['size']}", param="size") from None
    try:
        return schema.model_validate({"prompt": prompt, **sized, **images})
    except ValidationError as error:
        raise _refusal([dict(item) for item in error.errors()]) from None


def _submit(
    spec: ModelSpec, request: SubmitRequest, key: ApiKey, services: Services, n: int
) -> list[JobRecord]:
    """``n`` jobs; when one is refused, those already made are canceled (and so refunded)."""
    jobs: list[JobRecord] = []
    try:
        for _ in range(n):
            jobs.append(services.submitter.submit(key, request.to_params(), None, None, SurfaceName.OPENAI))
    except Exception:
        for job in jobs:
            if (canceled := services.jobs.cancel(job.id, key.id)) is not None and canceled.status.is_terminal:
                drop_inputs(services.blobs, job.id)
        raise
    return jobs


async def _images(
    spec: ModelSpec, request: SubmitRequest, n: int, response_format: str | None,
    key: ApiKey, services: Services, options: ImagesOptions, response: Response, streams: EventStreams,
) -> ImagesResponse:  # fmt: skip
    """Submit ``n`` jobs and wait (bounded) until they end; their images in the requested format. The
    ``X-Job-Ids`` header names the jobs (``/flux/fetch`` shows them)."""
    if not options.held.acquire():  # before any job is made: nothing to clean up
        raise Refused(
            503,
            f"This server is holding {options.held.limit} image requests already; retry shortly",
            code="server_busy",
        )
    try:
        return await _wait_for_images(
            spec, request, n, response_format, key, services, options, response, streams
        )
    finally:
        options.held.release()


async def _wait_for_images(
    spec: ModelSpec, request: SubmitRequest, n: int, response_format: str | None,
    key: ApiKey, services: Services, options: ImagesOptions, response: Response, streams: EventStreams,
) -> ImagesResponse:  # fmt: skip
    try:
        jobs = await run_in_threadpool(_submit, spec, request, key, services, n)
    except InvalidInput as error:  # named as this API names the field: an upload is ``image``
        raise InvalidInput(upload_name(error.field), error.rule) from error
    except QuotaExceeded as error:  # the price of all ``n`` images
        raise QuotaExceeded(error.price, error.model, count=n) from error
    response.headers[JOB_IDS_HEADER] = ",".join(job.id for job in jobs)
    deadline = time.monotonic() + options.wait_seconds
    pending = {job.id for job in jobs}
    done: dict[str, JobRecord] = {}
    with streams.waiting(pending) as changed:  # woken by the change feed when one of them changes
        while pending:
            changed.clear()
            for job_id in list(pending):
                job = await run_in_threadpool(services.jobs.get, job_id)
                if job is not None and job.status.is_terminal:
                    done[job_id] = job
                    pending.discard(job_id)
            if not pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                ids = ", ".join(sorted(pending))
                raise Refused(
                    504,
                    f"The images were not ready within {options.wait_seconds:g} s; the jobs carry on: "
                    f"fetch them with GET /flux/fetch?jobId=<id> (ids: {ids})",
                    code="timeout",
                    headers=NO_RETRY,
                )
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, SAFETY_SECONDS))
    # Of n images only the refused ones are left out (named in a header); all refused is the API's 400.
    refused = [done[job.id] for job in jobs if done[job.id].status in MODERATED]
    if len(refused) == len(jobs):
        message = refused[0].error or "Moderated"
        raise Refused(400, message, code="content_policy_violation", headers=NO_RETRY)
    if refused:
        response.headers[MODERATED_HEADER] = ",".join(job.id for job in refused)
    kept = [done[job.id] for job in jobs if done[job.id].status not in MODERATED]
    data = [await run_in_threadpool(_image, job, response_format, services) for job in kept]
    return ImagesResponse(created=int(time.time()), data=data)


def _image(job: JobRecord, response_format: str | None, services: Services) -> ImageData:
    if job.status is not JobStatus.SUCCEEDED or job.result_key is None:
        raise Refused(500, f"The job {job.id} failed: {job.error or job.status.value}")
    # The prompt the model drew: a closed-vocabulary model's reading (engines/phrasing.py), or the job's.
    revised = str(job.details.get(READ_AS) or job.prompt)
    if response_format == "b64_json":
        encoded = base64.b64encode(services.blobs.get(job.result_key)).decode()
        return ImageData(b64_json=encoded, revised_prompt=revised)
    return ImageData(url=services.result_url(job.result_key), revised_prompt=revised)


@router.post("/generations", summary="Create images from a prompt (OpenAI images API)", responses=RESPONSES)
async def generations(
    body: GenerationRequest, key: Key, services: Deps, options: Options, response: Response, streams: Streams
) -> ImagesResponse:
    spec = _spec(body.model or options.model)
    request = _request(spec, body.prompt, body.size, {})
    return await _images(
        spec, request, body.n, body.response_format, key, services, options, response, streams
    )


@router.post(
    "/edits", summary="Edit images from a prompt (OpenAI images API, multipart)", responses=RESPONSES
)
async def edits(
    prompt: Annotated[Prompt, Form()],
    key: Key,
    services: Deps,
    options: Options,
    response: Response,
    streams: Streams,
    image: Annotated[list[UploadFile] | None, File(description="One or more images.")] = None,
    images: Annotated[
        list[UploadFile] | None, File(alias="image[]", description="The same, as the SDKs send several.")
    ] = None,
    mask: Annotated[UploadFile | None, File(description="Accepted and ignored.")] = None,
    model: Annotated[Model, Form()] = None,
    n: Annotated[N, Form()] = 1,
    size: Annotated[Size, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = None,
    quality: Annotated[Ignored, Form()] = None,
    user: Annotated[Ignored, Form()] = None,
) -> ImagesResponse:
    spec = _spec(model or options.edit_model)
    uploads = [*(image or []), *(images or [])]
    schema = schema_of(spec)
    assert schema is not None
    slots = image_slots(schema)
    if not uploads:
        raise Refused(400, "image: is required (one or more image files)", param="image")
    if len(uploads) > len(slots):
        raise Refused(400, f"image: {spec.name} takes at most {len(slots)} image(s)", param="image")
    encoded = await encoded_uploads(uploads, slots, services.submitter.max_input_bytes)
    request = _request(spec, prompt, size, encoded)
    return await _images(spec, request, n, response_format, key, services, options, response, streams)
