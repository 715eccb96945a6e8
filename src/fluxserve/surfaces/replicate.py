"""Replicate's surface (:class:`ReplicateSurface`): ``/v1/predictions``, ``/v1/models/``, ``/v1/files`` and
``/v1/webhooks/`` with ``Authorization: Bearer <key>`` or ``Token <key>``; errors as RFC 7807 problem details,
``{"title", "detail", "status"}``, and for invalid input a 422 with ``invalid_fields``:
``[{"type", "field", "description"}]``, each naming the input by its Replicate name. Its view of a
prediction (its jobs together) is the body of ``GET /v1/predictions/{id}``, of every answer that returns a
prediction, and of its webhooks; a model's is ``GET /v1/models/{owner}/{name}``.

A prediction's status comes from its jobs: ``starting`` until one is claimed, ``processing`` until all
ended, then ``succeeded`` when all made their image, ``canceled`` when one was canceled, else ``failed``
(with the first failure's reason). Its output lists the images made so far: a list of URLs for models
that take ``num_outputs``, else one URL, as each model's output schema says.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from fluxserve.core.fields import error_messages
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import MODELS, ModelSpec, SurfaceName
from fluxserve.core.prediction import Prediction
from fluxserve.errors import (
    InvalidFields,
    InvalidInput,
    KeyRefused,
    QuotaExceeded,
    RequestRefused,
    TooManyActiveJobs,
)
from fluxserve.surfaces.base import Links, Surface, bearer_token, busy, price_of
from fluxserve.surfaces.replicate_inputs import INPUTS, OWNER, SERVED

COG_VERSION = "fluxserve"  # a version's cog_version: no Cog runs here
SERVING_SINCE = datetime.now(UTC)  # a version's created_at: when this process began serving it


def _time(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, as Replicate writes times."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def output_schema(spec: ModelSpec) -> dict[str, Any]:
    uri = {"type": "string", "format": "uri"}
    return {"title": "Output", **({"type": "array", "items": uri} if INPUTS[spec.name].many else uri)}


def openapi_schema(spec: ModelSpec) -> dict[str, Any]:
    """The version's ``openapi_schema``: what clients read its ``Input`` and ``Output`` from."""
    return _schema(spec.name)


@cache
def _schema(name: str) -> dict[str, Any]:
    spec = MODELS[name]
    inputs = INPUTS[name].model_json_schema()
    return {
        "openapi": "3.0.2",
        "info": {"title": f"{OWNER}/{spec.replicate}", "version": "1.0.0"},
        "paths": {},
        "components": {"schemas": {"Input": {**inputs, "title": "Input"}, "Output": output_schema(spec)}},
    }


def version_id(spec: ModelSpec) -> str:
    """A stable id for the model's schema on this server: it changes when the inputs do, as a Replicate
    version's does."""
    return _version(spec.name)


@cache
def _version(name: str) -> str:
    text = json.dumps(_schema(name), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def render_model(spec: ModelSpec, base_url: str) -> dict[str, Any]:
    """``GET /v1/models/{owner}/{name}``."""
    return {
        "url": f"{base_url}/v1/models/{OWNER}/{spec.replicate}",
        "owner": OWNER,
        "name": spec.replicate,
        "description": spec.title,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": render_version(spec),
    }


def render_version(spec: ModelSpec) -> dict[str, Any]:
    return {
        "id": version_id(spec),
        "created_at": _time(SERVING_SINCE),
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(spec),
    }


def _status(prediction: Prediction) -> str:
    jobs = prediction.jobs
    if not jobs:
        return "failed"  # its jobs were never written (the server stopped between the two writes)
    if all(job.status.is_terminal for job in jobs) and len(jobs) >= prediction.outputs:
        if all(job.status is JobStatus.SUCCEEDED for job in jobs):
            return "succeeded"
        if any(job.status is JobStatus.CANCELED for job in jobs):
            return "canceled"
        return "failed"
    if prediction.started_at is not None or any(job.status.is_terminal for job in jobs):
        return "processing"
    return "starting"


def _error(prediction: Prediction, status: str) -> str | None:
    if status != "failed":
        return None
    failed = [job for job in prediction.jobs if job.status is not JobStatus.SUCCEEDED]
    return (failed[0].error or failed[0].status.value) if failed else "The prediction's jobs were not written"


def _outputs(jobs: list[JobRecord], links: Links) -> list[str]:
    return [
        url
        for job in jobs
        if job.status is JobStatus.SUCCEEDED and job.result_expired is None
        if (url := links.result_url(job.result_key)) is not None
    ]


def _logs(jobs: list[JobRecord]) -> str:
    """One line per output: where its job stands (Replicate's logs are free text)."""
    lines = []
    for number, job in enumerate(jobs, 1):
        state = (
            f"{job.status.value} {round(job.progress * 100)}%"
            if job.status is JobStatus.RUNNING
            else job.status.value
        )
        lines.append(f"output {number} (job {job.id}): {state}")
    return "\n".join(lines)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)


def render(prediction: Prediction, links: Links, base_url: str) -> dict[str, Any]:
    """The prediction object as Replicate documents it."""
    spec = MODELS[prediction.model]
    status = _status(prediction)
    jobs = prediction.jobs
    outputs = _outputs(jobs, links)
    output: Any = (outputs if INPUTS[spec.name].many else outputs[0]) if outputs else None
    started = [job.started_at for job in jobs if job.started_at is not None]
    completed = None
    metrics: dict[str, Any] = {}
    if status in ("succeeded", "failed", "canceled"):
        completed = max((job.finished_at for job in jobs if job.finished_at is not None), default=None)
        ran = [_seconds(job.started_at, job.finished_at) for job in jobs]
        metrics = {
            "predict_time": round(sum(seconds for seconds in ran if seconds is not None), 3),
            "total_time": _seconds(prediction.created_at, completed),
            "image_count": len(outputs),
        }
    url = f"{base_url}/v1/predictions/{prediction.id}"
    return {
        "id": prediction.id,
        "model": f"{OWNER}/{spec.replicate}",
        "version": version_id(spec),
        "input": prediction.input,
        "output": output,
        "logs": _logs(jobs),
        "error": _error(prediction, status),
        "status": status,
        "source": "api",
        "data_removed": False,
        "created_at": _time(prediction.created_at),
        "started_at": _time(min(started, default=None)),
        "completed_at": _time(completed),
        "metrics": metrics,
        "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream", "web": url},
    }


TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    402: "Insufficient credit",
    404: "Not found",
    413: "Request too large",
    422: "Input validation failed",
    429: "Too many requests",
    503: "Service unavailable",
}


def title(status_code: int) -> str:
    """A problem's title: Replicate's word for the status, else the HTTP phrase."""
    if status_code in TITLES:
        return TITLES[status_code]
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def invalid_fields(errors: list[dict[str, Any]], renamed: Mapping[str, str] | None = None) -> InvalidFields:
    """Pydantic's errors as one refusal naming each field (``renamed``: this server's name -> the one the
    client sent) with the rule it broke."""
    found = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        ours = loc[0] if loc else "body"
        kind = "required" if error.get("type") == "missing" else str(error.get("type", "invalid"))
        message = error_messages([error])[0].removeprefix(f"{ours}: ")
        found.append(((renamed or {}).get(ours, ours), kind, message))
    return InvalidFields(found)


def refused_inputs(error: ValidationError, renamed: Mapping[str, str] | None = None) -> InvalidFields:
    """A model's inputs (or its own schema, ``renamed``) refused by pydantic: one 422 naming each."""
    return invalid_fields([dict(item) for item in error.errors()], renamed)


def one_output(job: JobRecord) -> Prediction:
    """A job whose prediction row is not there (gone, or never written) as a prediction of its own."""
    return Prediction(
        id=job.prediction_id or job.id, key_id=job.key_id, model=job.model, input={"prompt": job.prompt},
        outputs=1, created_at=job.created_at, started_at=job.started_at, jobs=[job],
    )  # fmt: skip


class ReplicateSurface(Surface):
    name = SurfaceName.REPLICATE
    prefixes = ("/v1/predictions", "/v1/models/", "/v1/files", "/v1/webhooks/")
    submit_paths = frozenset(
        {f"/v1/models/{OWNER}/{name}/predictions" for name in SERVED} | {"/v1/predictions", "/v1/files"}
    )
    key_header = "Authorization"
    invalid_status = 422

    def error_body(
        self, status_code: int, message: str, param: str | None, code: str | None
    ) -> dict[str, Any]:
        return {"title": title(status_code), "detail": message, "status": status_code}

    def validation_error(self, errors: list[dict[str, Any]]) -> JSONResponse:
        return self.refusal(invalid_fields(errors))

    def refusal(self, refused: RequestRefused, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """Inputs at fault are one 422 listing each in ``invalid_fields``."""
        if isinstance(refused, InvalidFields):
            items = [
                {"type": kind, "field": field, "description": text} for field, kind, text in refused.fields
            ]
            detail = "".join(f"- {field}: {text}\n" for field, _, text in refused.fields)
            body = {**self.error_body(422, detail, None, None), "invalid_fields": items}
            return JSONResponse(body, status_code=refused.status_code, headers=headers)
        return super().refusal(refused, headers)

    def invalid_input(self, refused: InvalidInput, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """One input at fault: a 422 naming it in ``invalid_fields`` (``api/replicate.py`` gives it the
        name the client sent)."""
        return self.refusal(InvalidFields([(refused.field, "invalid", refused.rule)]), headers)

    def render_job(self, job: JobRecord, links: Links) -> dict[str, Any]:
        """The job's whole prediction as it stands (its webhooks' body)."""
        return render(links.prediction_of(job) or one_output(job), links, links.base_url)

    def read_key(self, headers: Mapping[str, str]) -> str | None:
        """``Bearer <key>`` or ``Token <key>``: Replicate takes both."""
        return bearer_token(headers.get("authorization"), ("bearer", "token"))

    def words(self, refused: RequestRefused) -> str:
        if isinstance(refused, KeyRefused):
            if refused.missing:
                return "You did not pass an authentication token (Authorization: Bearer <key>)"
            return "You did not pass a valid authentication token"
        if isinstance(refused, QuotaExceeded):
            spec = MODELS.get(refused.model or "")
            name = (spec.replicate or spec.name) if spec is not None else refused.model
            return f"Not enough credits: {refused.count} x {name} costs {price_of(refused)}"
        if isinstance(refused, TooManyActiveJobs):
            return "Too many active predictions for this key; wait for some to finish"
        return busy(refused) or str(refused)


REPLICATE = ReplicateSurface()
