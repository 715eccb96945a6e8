"""The reseller's surface: ``/bfl/v1/<model>``, ``/flux/fetch``, ``/flux/cancel``, ``/flux/events`` with
``TT-API-KEY``; errors in its envelope ``{"status":"FAILED","message":...,"data":null}``; a job as its fetch
JSON, which is also its webhook body and its event streams' last event."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.responses import JSONResponse

from fluxserve.core.fields import error_messages
from fluxserve.core.job import QUEUE_POSITION_CAP, JobRecord, JobStatus
from fluxserve.core.models import MODELS, SurfaceName
from fluxserve.core.notes import preview_of, public_details
from fluxserve.core.pricing import format_credits
from fluxserve.errors import KeyRefused, QuotaExceeded, RequestRefused, TooManyActiveJobs
from fluxserve.surfaces.base import Links, Surface, busy, price_of

TOO_LARGE = "body: larger than this server accepts; send fewer or smaller images"

STATUS = {
    JobStatus.FETCHING: "PENDING_QUEUE",
    JobStatus.QUEUED: "PENDING_QUEUE",
    JobStatus.RUNNING: "ON_QUEUE",
    JobStatus.SUCCEEDED: "SUCCESS",
    JobStatus.FAILED: "FAILED",
    JobStatus.REQUEST_MODERATED: "FAILED",
    JobStatus.CONTENT_MODERATED: "FAILED",
    JobStatus.CANCELED: "FAILED",
}


def render_job(job: JobRecord, links: Links) -> dict[str, Any]:
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
        "imageUrl": links.result_url(job.result_key)
        if job.status is JobStatus.SUCCEEDED and expired is None
        else None,
        "hookUrl": job.webhook_url,
    }
    if not job.status.is_terminal:
        data["progress"] = job.progress
    preview = preview_of(job.details) if job.status is JobStatus.RUNNING else None
    if preview is not None:  # an added field, beside imageUrl: the live preview, a JPEG data URI
        data["previewUrl"] = preview["image"]
    if job.status is JobStatus.QUEUED:  # added fields: queued jobs the claim order puts before this one
        data["queuePosition"] = position = links.queue_position(job.id)
        if position is not None and position >= QUEUE_POSITION_CAP:
            data["queuePositionAtLeast"] = True  # counted no further
    body = {"status": STATUS[job.status], "message": message, "jobId": job.id, "data": data}
    notes = public_details(job.details)
    if notes:  # an added field, as in the vendor's get_result: what the engine tells the user (a note)
        body["details"] = notes
    return body


class ResellerSurface(Surface):
    name = SurfaceName.RESELLER
    prefixes = ("/bfl/v1/", "/flux/")
    submit_paths = frozenset(f"/bfl/v1/{name}" for name in MODELS)
    key_header = "TT-API-KEY"
    model_prefix = "/bfl/v1/"

    def error_body(
        self, status_code: int, message: str, param: str | None, code: str | None
    ) -> dict[str, Any]:
        return {"status": "FAILED", "message": message, "data": None}

    def validation_error(self, errors: list[dict[str, Any]]) -> JSONResponse:
        return self.error(400, "; ".join(error_messages(errors)))

    def render_job(self, job: JobRecord, links: Links) -> dict[str, Any]:
        return render_job(job, links)

    def words(self, refused: RequestRefused) -> str:
        if isinstance(refused, KeyRefused):
            reason = (
                "header is missing; send your API key in it" if refused.missing else "is not a valid API key"
            )
            return f"TT-API-KEY {reason}"
        if isinstance(refused, QuotaExceeded):
            return f"Not enough credits: {refused.model} costs {price_of(refused)}"
        if isinstance(refused, TooManyActiveJobs):
            return "Too many active jobs for this key; wait for some to finish"
        return busy(refused) or str(refused)

    def http_message(self, status_code: int, detail: str) -> str:
        return TOO_LARGE if status_code == 413 else detail


RESELLER = ResellerSurface()
