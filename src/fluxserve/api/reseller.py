"""The reseller dialect: ``POST /bfl/v1/<model>`` for each model of the table, fetch, cancel."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import ApiError
from fluxserve.api.requests import SubmitExtras, SubmitRequest, add_submit_routes
from fluxserve.core.job import Job, JobStatus
from fluxserve.core.models import Dialect, ModelSpec
from fluxserve.core.pricing import format_credits
from fluxserve.errors import InvalidInput, QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.retention import drop_inputs
from fluxserve.jobs.store import IdempotencyConflict

router = APIRouter(tags=["reseller"])

Key = Annotated[ApiKey, Depends(reseller_key)]
Deps = Annotated[Services, Depends(get_services)]

STATUS = {
    JobStatus.QUEUED: "PENDING_QUEUE",
    JobStatus.RUNNING: "ON_QUEUE",
    JobStatus.SUCCEEDED: "SUCCESS",
    JobStatus.FAILED: "FAILED",
    JobStatus.REQUEST_MODERATED: "FAILED",
    JobStatus.CONTENT_MODERATED: "FAILED",
    JobStatus.CANCELED: "FAILED",
}


def render_job(job: Job, services: Services) -> dict[str, Any]:
    """The fetch JSON, which is also the webhook body."""
    expired = job.result_expired if job.status is JobStatus.SUCCEEDED else None
    if expired is not None:  # still a success (it was delivered and charged); only the file is gone
        message = expired
    elif job.status is JobStatus.SUCCEEDED:
        message = "success"
    elif job.status.is_terminal:
        message = job.error or "failed"
    else:
        message = ""
    charged = job.cost if job.status is JobStatus.SUCCEEDED or not job.status.is_terminal else Decimal(0)
    data: dict[str, Any] = {
        "mode": job.model,
        "jobId": job.id,
        "prompt": job.prompt,
        "quota": format_credits(charged) if charged else "0",
        "size": job.size,
        "seed": str(job.seed),
        "imageUrl": services.result_url(job.result_key)
        if job.status is JobStatus.SUCCEEDED and expired is None
        else None,
        "hookUrl": job.webhook_url,
    }
    if not job.status.is_terminal:
        data["progress"] = job.progress
    return {"status": STATUS[job.status], "message": message, "jobId": job.id, "data": data}


def _accepted(job: Job) -> dict[str, Any]:
    return {"status": "SUCCESS", "message": "", "data": {"jobId": job.id}}


Envelope = dict[str, Any]


def _submit(
    spec: ModelSpec, body: SubmitRequest, key: ApiKey, services: Services, extras: SubmitExtras
) -> Envelope:
    try:
        job = services.submitter.submit(
            key, body.to_params(), body.seed_value, body.webhook, Dialect.RESELLER,
            extras.idempotency_key,
        )  # fmt: skip
    except InvalidInput as error:
        raise ApiError(400, str(error)) from error
    except IdempotencyConflict as error:
        raise ApiError(error.status_code, str(error)) from error
    except QuotaExceeded as error:
        raise ApiError(402, f"Not enough credits: {spec.name} costs {format_credits(spec.price)}") from error
    except TooManyActiveJobs as error:
        raise ApiError(429, "Too many active jobs for this key; wait for some to finish") from error
    return _accepted(job)


add_submit_routes(router, Dialect.RESELLER, "/bfl/v1/", Key, _submit)


class JobRef(BaseModel):
    """``jobId`` per the spec; ``job_id`` as newer reseller docs write it."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(validation_alias=AliasChoices("jobId", "job_id"), min_length=1, max_length=100)


def _find(job_id: str, key: ApiKey, services: Services) -> Job:
    job = services.jobs.get(job_id.strip(), key_id=key.id)
    if job is None:
        raise ApiError(404, f"jobId: no job {job_id!r} for this key")
    return job


def _query_job_id(
    job_id: Annotated[str | None, Query(alias="jobId")] = None,
    job_id_snake: Annotated[str | None, Query(alias="job_id")] = None,
) -> str:
    value = job_id or job_id_snake
    if not value:
        raise ApiError(400, "jobId: is required")
    return value


@router.get("/flux/fetch", summary="Fetch a job's status and result")
def fetch_get(job_id: Annotated[str, Depends(_query_job_id)], key: Key, services: Deps) -> Envelope:
    return render_job(_find(job_id, key, services), services)


@router.post("/flux/fetch", summary="Fetch a job's status and result")
def fetch_post(ref: Annotated[JobRef, Body()], key: Key, services: Deps) -> Envelope:
    return render_job(_find(ref.job_id, key, services), services)


@router.post("/flux/cancel", summary="Cancel a queued job, or stop a running one at its next step")
def cancel(ref: Annotated[JobRef, Body()], key: Key, services: Deps) -> Envelope:
    job = services.jobs.cancel(ref.job_id.strip(), key.id)
    if job is None:
        raise ApiError(404, f"jobId: no job {ref.job_id!r} for this key")
    if job.status.is_terminal:  # canceled while queued (a running job's worker drops them when it stops)
        drop_inputs(services.blobs, job.id)
    return render_job(job, services)
