"""Replicate's view of a prediction (its jobs together): the body of ``GET /v1/predictions/{id}``, of every
answer that returns a prediction, and of its webhooks; and a model's ``GET /v1/models/{owner}/{name}``.

A prediction's status comes from its jobs: ``starting`` until one is claimed, ``processing`` until all
ended, then ``succeeded`` when all made their image, ``canceled`` when one was canceled, else ``failed``
(with the first failure's reason). Its output lists the images made so far: a list of URLs for models
that take ``num_outputs``, else one URL, as each model's output schema says.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from functools import cache
from typing import Any

from fluxserve.core.job import Job, JobStatus
from fluxserve.core.models import MODELS, ModelSpec
from fluxserve.core.prediction import Prediction
from fluxserve.surfaces.base import Links
from fluxserve.surfaces.replicate_inputs import INPUTS, OWNER

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


def _outputs(jobs: list[Job], links: Links) -> list[str]:
    return [
        url
        for job in jobs
        if job.status is JobStatus.SUCCEEDED and job.result_expired is None
        if (url := links.result_url(job.result_key)) is not None
    ]


def _logs(jobs: list[Job]) -> str:
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
