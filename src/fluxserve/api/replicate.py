"""Replicate's predictions API for the FLUX models it lists under ``black-forest-labs``.

What the ``replicate`` clients (Python, JavaScript, the Vercel AI SDK's provider) speak, with
``Authorization: Bearer <key>`` or ``Token <key>`` (the same keys and balance as the other surfaces):

- ``POST /v1/models/black-forest-labs/{name}/predictions`` and ``POST /v1/predictions`` (``version``:
  ``owner/name``, ``owner/name:<id>`` or a version id that ``GET /v1/models/{owner}/{name}`` reports)
  make a prediction: ``num_outputs`` jobs (one image each) admitted together, stored with this surface.
  ``Prefer: wait`` (or ``wait=N``, N <= 60) holds the answer on the change feed until the prediction
  ends, as the OpenAI images routes do; one still running then reads ``starting``, which is how
  Replicate's clients know to poll.
- ``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``, ``GET /v1/predictions`` (the key's own,
  newest first, ``{"previous","next","results"}``), ``GET /v1/models/{owner}/{name}`` (with the
  ``Input``/``Output`` schema) and ``GET /v1/webhooks/default/secret`` (the key's signing secret).
- ``webhook`` and ``webhook_events_filter`` (start, output, logs, completed): the deliveries are written in
  the claim and finish transactions (``db/predictions.py``) and signed as every webhook is (Standard
  Webhooks, the key's secret), as Replicate signs its own.

Refusals are the error tree's (``errors.py``), answered by the surface in Replicate's problem details
(``surfaces/replicate.py``); an input at fault is named by its Replicate name.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import replicate_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import replicate_responses as documented
from fluxserve.api.events import CountedStream, EventStreams, get_streams
from fluxserve.api.limits import HeldRequests
from fluxserve.api.replicate_files import own_file
from fluxserve.api.requests import SCHEMAS, SubmitRequest, size_fields
from fluxserve.core.fields import WebhookUrl
from fluxserve.core.models import ModelSpec, SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.core.prediction import Prediction
from fluxserve.errors import InvalidFields, InvalidInput, Refused
from fluxserve.jobs.predictions import PredictionStore
from fluxserve.jobs.retention import drop_inputs
from fluxserve.surfaces.replicate import refused_inputs, render, render_model, version_id
from fluxserve.surfaces.replicate_inputs import INPUTS, OWNER, SERVED, ReplicateInput

MAX_WAIT = 60  # seconds a ``Prefer: wait`` may hold the answer, as Replicate's
SAFETY_SECONDS = 5.0  # the longest a wait goes without reading its jobs, should a change go unheard
PAGE = 50  # predictions per page of the list
MAX_ECHO = 200  # longer strings of an input (data URIs) are not kept in the prediction's ``input``
Event = Literal["start", "output", "logs", "completed"]


router = APIRouter(prefix="/v1", tags=["replicate"])


@dataclass(frozen=True)
class ReplicateOptions:
    """Set by ``app.py`` (``app.state.replicate``)."""

    predictions: PredictionStore
    held: HeldRequests  # this process's requests held by ``Prefer: wait``, across keys


def _options(request: Request) -> ReplicateOptions:
    return cast(ReplicateOptions, request.app.state.replicate)


Key = Annotated[ApiKey, Depends(replicate_key)]
Deps = Annotated[Services, Depends(get_services)]
Options = Annotated[ReplicateOptions, Depends(_options)]
Streams = Annotated[EventStreams, Depends(get_streams)]
Prefer = Annotated[str | None, Header(description="'wait' or 'wait=N' (N <= 60): answer once it ends.")]


class CreateBody(BaseModel):
    """A prediction's request; fields Replicate has and this server does not use are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any]
    webhook: WebhookUrl = None
    webhook_completed: WebhookUrl = None  # the older form of the same
    webhook_events_filter: Annotated[list[Event] | None, Field(max_length=4)] = None
    stream: bool | None = None  # accepted; image models do not stream


class VersionedBody(CreateBody):
    version: Annotated[str, Field(min_length=1, max_length=200)]


VERSIONS = {version_id(spec): spec for spec in SERVED.values()}


def _model(owner: str, name: str) -> ModelSpec:
    spec = SERVED.get(name) if owner == OWNER else None
    if spec is None:
        served = ", ".join(f"{OWNER}/{known}" for known in SERVED)
        raise Refused(404, f"Model {owner}/{name} is not on this server; models: {served}")
    return spec


def _version(version: str) -> ModelSpec:
    """``owner/name``, ``owner/name:<version id>`` or a bare version id."""
    ref, _, version_part = version.partition(":")
    if "/" in ref:
        owner, _, name = ref.partition("/")
        spec = _model(owner, name)
        if version_part and version_part != version_id(spec):
            raise Refused(404, f"Version {version_part} of {ref} is not on this server")
        return spec
    if (found := VERSIONS.get(ref)) is None:
        raise Refused(404, f"Version {ref[:100]} is not on this server")
    return found


def _inputs(spec: ModelSpec, values: dict[str, Any]) -> ReplicateInput:
    try:
        return INPUTS[spec.name].model_validate(values)
    except ValidationError as error:
        raise refused_inputs(error) from None


def _image(value: str, key: ApiKey, services: Services, field: str) -> str:
    """An image input as this server's submit takes it: a file uploaded here (its ``urls.get``) is read
    from the blob store, without a network fetch; a data URI is base64 already; any other URL is fetched
    by the fetch stage, through the same guard as every surface's."""
    data = own_file(value, key, services)
    if data is False:
        raise InvalidFields(
            [(field, "not_found", "no file with this URL for this key (POST /v1/files first)")]
        )
    if isinstance(data, bytes):
        return base64.b64encode(data).decode()
    return value


def _request(spec: ModelSpec, inputs: ReplicateInput, key: ApiKey, services: Services) -> GenerationParams:
    """The model's own request (its vendor-dialect schema) from Replicate's inputs, checked there."""
    schema: type[SubmitRequest] = SCHEMAS[SurfaceName.VENDOR][spec.name]
    fields = inputs.fields(partial(size_fields, schema))
    images = {
        name: _image(value, key, services, inputs.renamed.get(name, name))
        for name, value in inputs.images().items()
    }
    try:
        request = schema.model_validate({**fields, **images, "prompt": inputs.prompt, "seed": inputs.seed})
    except ValidationError as error:
        raise refused_inputs(error, inputs.renamed) from None
    extra = {
        name: value
        for name, value in fields.items()
        if name in GenerationParams.model_fields and name not in schema.model_fields
    }
    return request.to_params().model_copy(update=extra)


def _echo(values: Any) -> Any:
    """The input as kept with the prediction: data URIs and other long strings shortened."""
    if isinstance(values, dict):
        return {name: _echo(value) for name, value in values.items()}
    if isinstance(values, list):
        return [_echo(value) for value in values]
    if isinstance(values, str) and len(values) > MAX_ECHO:
        return f"{values[:40]}... ({len(values)} characters, not kept)"
    return values


def _webhook(body: CreateBody) -> tuple[str | None, str | None]:
    if body.webhook is None and body.webhook_completed is not None:
        return body.webhook_completed, "completed"
    events = (
        None if body.webhook_events_filter is None else ",".join(dict.fromkeys(body.webhook_events_filter))
    )
    return body.webhook, events


def _create(
    spec: ModelSpec, body: CreateBody, key: ApiKey, services: Services, options: ReplicateOptions
) -> Prediction:
    inputs = _inputs(spec, body.input)
    params = _request(spec, inputs, key, services)
    webhook, events = _webhook(body)
    count = inputs.outputs
    seeds = [None if inputs.seed is None else inputs.seed + index for index in range(count)]
    prediction = Prediction(
        id=_new_id(), key_id=key.id, model=spec.name, input=_echo(body.input), outputs=count,
        webhook=webhook, webhook_events=events,
    )  # fmt: skip
    options.predictions.create(prediction)
    try:
        prediction.jobs = services.submitter.submit_group(
            key, params, seeds, SurfaceName.REPLICATE, webhook, prediction.id
        )
    except Exception as error:
        options.predictions.drop(prediction.id)
        if isinstance(error, InvalidInput):  # named as the client sent it
            raise InvalidFields([(_input_name(spec, error.field), "invalid", error.rule)]) from error
        raise
    return prediction


def _input_name(spec: ModelSpec, field: str) -> str:
    """The Replicate input that this server's ``field`` came from."""
    return "webhook" if field == "webhook_url" else INPUTS[spec.name].renamed.get(field, field)


def _new_id() -> str:
    """26 lowercase base32 characters, the shape of Replicate's prediction ids."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(26))


def _wait_seconds(prefer: str | None) -> float | None:
    """``Prefer: wait`` -> 60, ``wait=N`` -> N (1..60); None without one."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return MAX_WAIT
        with suppress(ValueError):
            return float(min(max(int(value.strip()), 1), MAX_WAIT))
    return None


async def _watch(
    prediction: Prediction, seconds: float, options: ReplicateOptions, streams: EventStreams
) -> AsyncIterator[Prediction]:
    """The prediction now, then again each time the change feed says one of its jobs changed, until all of
    them ended or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    with streams.waiting({job.id for job in prediction.jobs}) as changed:
        while True:
            changed.clear()
            now = await run_in_threadpool(options.predictions.get, prediction.id)
            if now is None:
                return
            yield now
            left = deadline - time.monotonic()
            if _ended(now) or left <= 0:
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, SAFETY_SECONDS))


def _ended(prediction: Prediction) -> bool:
    return all(job.status.is_terminal for job in prediction.jobs)


async def _held(
    prediction: Prediction, seconds: float, options: ReplicateOptions, streams: EventStreams
) -> Prediction:
    """The prediction once all its jobs ended, or as it stands after ``seconds``."""
    async for now in _watch(prediction, seconds, options, streams):
        prediction = now
    return prediction


def _shown(prediction: Prediction, services: Services) -> dict[str, Any]:
    return render(prediction, services, services.base_url)


async def _answer(
    spec: ModelSpec, body: CreateBody, key: ApiKey, services: Services, options: ReplicateOptions,
    streams: EventStreams, prefer: str | None,
) -> JSONResponse:  # fmt: skip
    seconds = _wait_seconds(prefer)
    if seconds is not None and not options.held.acquire():
        seconds = None  # too many requests held already: answer at once, and the client polls
    try:
        prediction = await run_in_threadpool(_create, spec, body, key, services, options)
        if seconds is not None:
            prediction = await _held(prediction, seconds, options, streams)
        shown = _shown(prediction, services)
        if seconds is not None and not _ended(prediction):
            shown["status"] = "starting"  # what Replicate's clients read as "poll it"
        return JSONResponse(shown, status_code=201)
    finally:
        if seconds is not None:
            options.held.release()


CREATED = {201: {"description": "The prediction"}, **documented(400, 402, 404, 413, 429, 503)}
FOUND = documented(404)


@router.post(
    "/models/{owner}/{name}/predictions",
    summary="Create a prediction (Replicate)",
    status_code=201,
    responses=CREATED,
)
async def create_for_model(
    owner: str, name: str, body: CreateBody, key: Key, services: Deps, options: Options, streams: Streams,
    prefer: Prefer = None,
) -> JSONResponse:  # fmt: skip
    return await _answer(_model(owner, name), body, key, services, options, streams, prefer)


@router.post(
    "/predictions", summary="Create a prediction of a version (Replicate)", status_code=201, responses=CREATED
)
async def create(
    body: VersionedBody, key: Key, services: Deps, options: Options, streams: Streams, prefer: Prefer = None
) -> JSONResponse:
    return await _answer(_version(body.version), body, key, services, options, streams, prefer)


def _mine(prediction_id: str, key: ApiKey, options: ReplicateOptions) -> Prediction:
    prediction = options.predictions.get(prediction_id, key.id)
    if prediction is None:
        raise Refused(404, f"Prediction {prediction_id[:100]} not found for this key")
    return prediction


@router.get("/predictions/{prediction_id}", summary="Get a prediction (Replicate)", responses=FOUND)
def get(prediction_id: str, key: Key, services: Deps, options: Options) -> JSONResponse:
    return JSONResponse(_shown(_mine(prediction_id, key, options), services))


@router.post("/predictions/{prediction_id}/cancel", summary="Cancel a prediction", responses=FOUND)
def cancel(prediction_id: str, key: Key, services: Deps, options: Options) -> JSONResponse:
    """Its queued jobs end at once (refunded); its running ones are asked to stop."""
    for job in _mine(prediction_id, key, options).jobs:
        if job.status.is_terminal:
            continue
        ended = services.jobs.cancel(job.id, key.id)
        if ended is not None and ended.status.is_terminal:
            drop_inputs(services.blobs, job.id)
    return JSONResponse(_shown(_mine(prediction_id, key, options), services))


@router.get(
    "/predictions/{prediction_id}/stream",
    summary="A prediction's outputs as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **documented(404, 429)},
)
async def stream(
    prediction_id: str, key: Key, services: Deps, options: Options, streams: Streams
) -> Response:
    """Replicate's stream events: ``output`` (each image's URL as it is made), ``error``, then ``done``.
    Counted against the key's event streams; it ends after the streams' idle time (reconnect to go on)."""
    prediction = await run_in_threadpool(_mine, prediction_id, key, options)
    refused = streams.acquire(key.id)
    if refused is not None:
        raise Refused(429, refused)
    return CountedStream(_events(prediction, services, options, streams), lambda: streams.release(key.id))


async def _events(
    prediction: Prediction, services: Services, options: ReplicateOptions, streams: EventStreams
) -> AsyncIterator[ServerSentEvent]:
    sent = 0
    async for now in _watch(prediction, streams.idle_seconds, options, streams):
        shown = _shown(now, services)
        outputs = shown["output"] if isinstance(shown["output"], list) else [shown["output"]]
        for url in [url for url in outputs if url][sent:]:
            sent += 1
            yield ServerSentEvent(url, event="output")
        status = shown["status"]
        if status == "failed":
            yield ServerSentEvent(json.dumps({"detail": shown["error"]}), event="error")
        if status in ("succeeded", "failed", "canceled"):
            done = {} if status == "succeeded" else {"reason": status}
            yield ServerSentEvent(json.dumps(done), event="done")


@router.get(
    "/predictions", summary="List the key's predictions, newest first (Replicate)", responses=documented()
)
def listing(
    key: Key, services: Deps, options: Options,
    cursor: Annotated[str | None, Query(max_length=100, description="From a page's next.")] = None,
) -> JSONResponse:  # fmt: skip
    found, more = options.predictions.page(key.id, cursor, PAGE)
    following = f"{services.base_url}/v1/predictions?cursor={found[-1].id}" if more and found else None
    return JSONResponse(
        {"previous": None, "next": following, "results": [_shown(item, services) for item in found]}
    )


@router.get(
    "/models/{owner}/{name}", summary="A model and its latest version's schema (Replicate)", responses=FOUND
)
def model(owner: str, name: str, key: Key, services: Deps) -> JSONResponse:
    return JSONResponse(render_model(_model(owner, name), services.base_url))


@router.get(
    "/models/{owner}/{name}/versions/{version}", summary="A model's version (Replicate)", responses=FOUND
)
def version(owner: str, name: str, version: str, key: Key, services: Deps) -> JSONResponse:
    spec = _version(f"{owner}/{name}:{version}")
    return JSONResponse(render_model(spec, services.base_url)["latest_version"])


@router.get(
    "/webhooks/default/secret", summary="The key's webhook signing secret (Replicate)", responses=documented()
)
def webhook_secret(key: Key) -> dict[str, str]:
    return {"key": key.webhook_secret}
