"""The vendor's surface: ``/v1/<model>``, ``/v1/get_result``, ``/v1/credits``, ``/v1/events`` with
``x-key`` (403 without one, as the vendor answers); errors in FastAPI's shapes (``{"detail": "..."}``, and
422 ``{"detail": [{"loc","msg","type"}]}`` for fields); a job as ``get_result`` shows it, which is also its
webhook body and its event streams' last event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel
from starlette.responses import JSONResponse

from fluxserve.core.job import QUEUE_POSITION_CAP, JobRecord, JobStatus
from fluxserve.core.models import MODELS, SurfaceName
from fluxserve.core.notes import preview_of, public_details
from fluxserve.core.pricing import format_credits
from fluxserve.errors import (
    IdempotencyConflict,
    InvalidInput,
    KeyRefused,
    QuotaExceeded,
    RequestRefused,
    TooManyActiveJobs,
)
from fluxserve.surfaces.base import Links, Surface, busy, price_of

VendorStatus = Literal[
    "Task not found", "Pending", "Request Moderated", "Content Moderated", "Ready", "Error"
]


class ResultResponse(BaseModel):
    """``GET /v1/get_result``: ``result`` is ``{"sample","prompt","seed",...}`` once Ready."""

    id: str
    status: VendorStatus
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None
    # The vendor's schema has it, free-form: here, while a task runs with live previews on,
    # {"sample": "data:image/jpeg;base64,...", "progress": p} (the image as it stands at progress p).
    preview: dict[str, Any] | None = None


def _reason(job: JobRecord) -> str:
    """``"Request Moderated: nudity"`` -> ``"nudity"``: the vendor lists reasons without the label."""
    text = job.error or ""
    label, _, reason = text.partition(": ")
    return reason if label in ("Request Moderated", "Content Moderated") and reason else text


# The status word of ``get_result`` for each of our statuses (``fluxserve jobs --status`` takes them too).
STATUS: dict[JobStatus, VendorStatus] = {
    JobStatus.FETCHING: "Pending",
    JobStatus.QUEUED: "Pending",
    JobStatus.RUNNING: "Pending",
    JobStatus.SUCCEEDED: "Ready",
    JobStatus.FAILED: "Error",
    JobStatus.REQUEST_MODERATED: "Request Moderated",
    JobStatus.CONTENT_MODERATED: "Content Moderated",
    JobStatus.CANCELED: "Error",
}


def _timestamp(job: JobRecord, name: str) -> float | None:
    value = getattr(job, name)
    return None if value is None else value.timestamp()


def render_result(job: JobRecord | None, job_id: str, links: Links) -> ResultResponse:
    """A job in the vendor's result shape. Canceled jobs (the vendor has no cancel) read as Error."""
    if job is None:
        return ResultResponse(id=job_id, status="Task not found")
    status = job.status
    word = STATUS[status]
    if status is JobStatus.QUEUED:  # details is free-form in the vendor's schema: an added field
        position = links.queue_position(job.id)
        details: dict[str, Any] = {"queue_position": position}
        if position is not None and position >= QUEUE_POSITION_CAP:
            details["queue_position_at_least"] = True  # counted no further
        return ResultResponse(id=job.id, status=word, progress=job.progress, details=details)
    if not status.is_terminal:
        preview = preview_of(job.details) if status is JobStatus.RUNNING else None
        shown = None if preview is None else {"sample": preview["image"], "progress": preview.get("progress")}
        return ResultResponse(id=job.id, status=word, progress=job.progress, preview=shown)
    if status is JobStatus.SUCCEEDED:
        start, end = _timestamp(job, "started_at"), _timestamp(job, "finished_at")
        expired = job.result_expired
        result = {
            "sample": None if expired is not None else links.result_url(job.result_key),
            "prompt": job.prompt,
            "seed": job.seed,
            "start_time": start,
            "end_time": end,
            "duration": None if start is None or end is None else round(end - start, 3),
        }
        notes = public_details(job.details)  # what the engine tells the user (a note), if anything
        if expired is not None:  # Ready still: the job delivered; its file outlived retention
            notes["result"] = expired
        return ResultResponse(id=job.id, status=word, result=result, details=notes or None)
    if status in (JobStatus.REQUEST_MODERATED, JobStatus.CONTENT_MODERATED):
        return ResultResponse(id=job.id, status=word, details={"Moderation Reasons": [_reason(job)]})
    return ResultResponse(id=job.id, status=word, details={"error": job.error or "failed"})


class VendorSurface(Surface):
    name = SurfaceName.VENDOR
    prefixes = ("/v1/",)
    submit_paths = frozenset(f"/v1/{name}" for name in MODELS)
    key_header = "x-key"
    model_prefix = "/v1/"
    auth_status = 403
    invalid_status = 422

    def error_body(
        self, status_code: int, message: str, param: str | None, code: str | None
    ) -> dict[str, Any]:
        return {"detail": message}

    def validation_error(self, errors: list[dict[str, Any]]) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    def render_job(self, job: JobRecord, links: Links) -> dict[str, Any]:
        return render_result(job, job.id, links).model_dump(mode="json")

    def refusal(self, refused: RequestRefused, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """A reused Idempotency-Key is a 422 naming the header, as a field's error is."""
        if isinstance(refused, IdempotencyConflict):
            item = {"loc": ["header", "Idempotency-Key"], "msg": str(refused), "type": "idempotency_conflict"}
            return JSONResponse({"detail": [item]}, status_code=refused.status_code, headers=headers)
        return super().refusal(refused, headers)

    def invalid_input(self, refused: InvalidInput, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """A field's error, as FastAPI's validation renders one (422)."""
        item = {"loc": ["body", refused.field], "msg": str(refused), "type": "value_error"}
        return JSONResponse({"detail": [item]}, status_code=self.invalid_status, headers=headers)

    def words(self, refused: RequestRefused) -> str:
        if isinstance(refused, KeyRefused):
            if refused.missing:
                return "Not authenticated - x-key header is missing; send your API key in it"
            return "Not authenticated - Invalid Authentication: x-key is not a valid API key"
        if isinstance(refused, QuotaExceeded):
            balance = "unknown" if refused.balance is None else format_credits(refused.balance)
            price = price_of(refused, unit=" credits")
            return f"Insufficient credits: {refused.model} costs {price} and this key has {balance}"
        if isinstance(refused, TooManyActiveJobs):
            return "Too many active tasks for this key; wait for some to finish, then retry"
        return busy(refused) or str(refused)


VENDOR = VendorSurface()
