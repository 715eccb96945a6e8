"""The reseller surface's response bodies, as ``/openapi.json`` declares them.

The routes return plain dicts (these models document them; ``render_job`` is the one renderer), so a
field added to the fetch JSON reaches clients without being filtered out here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fluxserve.api.errors import ResellerErrorBody, responses


class SubmitData(BaseModel):
    jobId: str = Field(description="The job's id, as the reseller's spec names it.")
    job_id: str = Field(description="The same id, as the reseller's newer docs name it.")


class SubmitEnvelope(BaseModel):
    status: Literal["SUCCESS"]
    message: str
    data: SubmitData


class JobData(BaseModel):
    mode: str = Field(description="The model.")
    jobId: str
    prompt: str = Field(description="The final prompt (after upsampling).")
    quota: str = Field(description="Credits charged, as a string (1 credit = 0.01 USD).")
    size: str | None = Field(description="WxH, once known.")
    seed: str
    imageUrl: str | None = Field(json_schema_extra={"format": "uri"}, description="Signed result URL.")
    hookUrl: str | None = Field(json_schema_extra={"format": "uri"})
    progress: float | None = Field(default=None, ge=0, le=1, description="While the job is not done.")
    previewUrl: str | None = Field(
        default=None,
        description="While the job runs, with live previews on (FLUXSERVE_PREVIEWS): the image as it forms, "
        "a small JPEG as a data: URI.",
    )


class JobEnvelope(BaseModel):
    """The fetch JSON, which is also the webhook body."""

    status: Literal["PENDING_QUEUE", "ON_QUEUE", "SUCCESS", "FAILED"]
    message: str
    jobId: str
    data: JobData


# A fetch or cancel body: the job id under either name, as JSON or as a form.
_JOB_REF: dict[str, Any] = {
    "type": "object",
    "properties": {
        name: {"type": "string", "minLength": 1, "maxLength": 100} for name in ("jobId", "job_id")
    },
}
JOB_REF_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": _JOB_REF},
            "application/x-www-form-urlencoded": {"schema": _JOB_REF},
        },
    }
}

# "4XX" stands for every other client error too, and keeps FastAPI from declaring a 422 in its own shape.
_CLIENT_ERRORS: dict[int | str, str] = {
    400: "A parameter is missing or invalid; the message names it and its rule",
    401: "Missing or invalid TT-API-KEY",
    413: "The body is larger than the route accepts",
}
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": SubmitEnvelope, "description": "The job was accepted"},
    **responses(
        ResellerErrorBody,
        {
            **_CLIENT_ERRORS,
            402: "Not enough credits for this model",
            422: "The Idempotency-Key was used for a different request",
            429: "Too many active jobs for this key",
            "4XX": "Another client error",
        },
    ),
}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobEnvelope, "description": "The job's status and result"},
    **responses(
        ResellerErrorBody, {**_CLIENT_ERRORS, 404: "No such job for this key", "4XX": "Another client error"}
    ),
}
