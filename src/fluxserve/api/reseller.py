"""The reseller's surface: ``POST /bfl/v1/<model>`` for each model of the table, fetch, cancel.

Fetch and cancel take the job id as ``jobId`` or ``job_id``, in the query string, a JSON body or a form
body, on GET and POST (fetch) as the reseller's docs show all of these.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import invalid_json
from fluxserve.api.requests import SubmitExtras, SubmitRequest, add_submit_routes
from fluxserve.api.reseller_schemas import JOB_REF_BODY, JOB_RESPONSES, SUBMIT_RESPONSES
from fluxserve.core.job import JobRecord
from fluxserve.core.models import ModelSpec, SurfaceName
from fluxserve.errors import Refused
from fluxserve.jobs.retention import drop_inputs
from fluxserve.surfaces.reseller import render_job

router = APIRouter(tags=["reseller"])

Key = Annotated[ApiKey, Depends(reseller_key)]
Deps = Annotated[Services, Depends(get_services)]


def _accepted(job: JobRecord) -> dict[str, Any]:
    """``jobId`` as the spec writes it, ``job_id`` as the newer docs do: a client of either works."""
    return {"status": "SUCCESS", "message": "", "data": {"jobId": job.id, "job_id": job.id}}


Envelope = dict[str, Any]


def submit(
    spec: ModelSpec,
    body: SubmitRequest,
    key: ApiKey,
    services: Services,
    extras: SubmitExtras,
    surface: SurfaceName = SurfaceName.RESELLER,
) -> Envelope:
    """Submit a validated request as a job of ``surface`` (the reseller's, or its own format's); a
    refusal propagates, and the surface of the path answers it."""
    job = services.submitter.submit(
        key, body.to_params(), body.seed_value, body.webhook, surface, extras.idempotency_key
    )
    return _accepted(job)


add_submit_routes(router, SurfaceName.RESELLER, "/bfl/v1/", Key, submit, responses=SUBMIT_RESPONSES)


class JobRef(BaseModel):
    """``jobId`` per the spec; ``job_id`` as newer reseller docs write it."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(validation_alias=AliasChoices("jobId", "job_id"), min_length=1, max_length=100)


def _find(job_id: str, key: ApiKey, services: Services) -> JobRecord:
    job = services.jobs.get(job_id.strip(), key_id=key.id)
    if job is None:
        raise Refused(404, f"jobId: no job {job_id!r} for this key")
    return job


_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_BAD_BODY = "body: must be a JSON object or a form with jobId"


async def _body_job_id(request: Request) -> object:
    """``jobId`` (or ``job_id``) from a JSON or form body; None when the body has neither."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type in _FORMS:
        try:
            form = await request.form()
        except Exception as error:  # python-multipart's parse errors have no common base
            raise Refused(400, _BAD_BODY) from error
        value = form.get("jobId") or form.get("job_id")
        return None if isinstance(value, UploadFile) else value
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as error:
        raise Refused(400, invalid_json(error)) from error
    except ValueError as error:  # not UTF-8
        raise Refused(400, _BAD_BODY) from error
    if not isinstance(payload, dict):
        raise Refused(400, _BAD_BODY)
    return payload.get("jobId") or payload.get("job_id")


async def _query_value(
    job_id: Annotated[str | None, Query(alias="jobId", description="The job's id.")] = None,
    job_id_snake: Annotated[str | None, Query(alias="job_id", description="The same, snake_case.")] = None,
) -> str | None:
    return job_id or job_id_snake or None


_MISSING = "jobId: is required (in the query string, a JSON body or a form body)"


async def _query_job_id(value: Annotated[str | None, Depends(_query_value)]) -> str:
    """The job id from the query string (GET routes), else a 400."""
    if not value:
        raise Refused(400, _MISSING)
    return value


async def job_ref(request: Request, query: Annotated[str | None, Depends(_query_value)]) -> JobRef:
    """The job id from the query string, else from a JSON or form body (on GET too: some clients send
    one)."""
    value: object = query
    if not value:
        value = await _body_job_id(request)
    if not value:
        raise Refused(400, _MISSING)
    try:
        return JobRef.model_validate({"jobId": value})
    except ValidationError:
        raise Refused(400, "jobId: must be a string of 1 to 100 characters") from None


Ref = Annotated[JobRef, Depends(job_ref)]


def fetch(ref: Ref, key: Key, services: Deps) -> JSONResponse:
    """Answered as a ready JSONResponse: FastAPI's validation of a returned dict against the route's
    inferred model cost an eighth of a fetch's CPU (BENCHMARKS.md); JOB_RESPONSES documents the shape."""
    return JSONResponse(render_job(_find(ref.job_id, key, services), services))


for _method in ("GET", "POST"):
    router.add_api_route(
        "/flux/fetch",
        fetch,
        methods=[_method],
        name=f"fetch_{_method.lower()}",
        summary="Fetch a job's status and result",
        responses=JOB_RESPONSES,
        openapi_extra=JOB_REF_BODY if _method == "POST" else None,
    )


@router.post(
    "/flux/cancel",
    summary="Cancel a queued job, or stop a running one at its next step",
    responses=JOB_RESPONSES,
    openapi_extra=JOB_REF_BODY,
)
def cancel(ref: Ref, key: Key, services: Deps) -> Envelope:
    job = services.jobs.cancel(ref.job_id.strip(), key.id)
    if job is None:
        raise Refused(404, f"jobId: no job {ref.job_id!r} for this key")
    if job.status.is_terminal:  # canceled while queued (a running job's worker drops them when it stops)
        drop_inputs(services.blobs, job.id)
    return render_job(job, services)
