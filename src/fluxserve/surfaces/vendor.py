"""The vendor dialect's view of a job: ``GET /v1/get_result``, which is also its webhook body and its event
streams' last event."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from fluxserve.core.job import QUEUE_POSITION_CAP, Job, JobStatus
from fluxserve.core.notes import preview_of, public_details
from fluxserve.surfaces.base import Links

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


def _reason(job: Job) -> str:
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


def _timestamp(job: Job, name: str) -> float | None:
    value = getattr(job, name)
    return None if value is None else value.timestamp()


def render_result(job: Job | None, job_id: str, links: Links) -> ResultResponse:
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


def render_json(job: Job, links: Links) -> dict[str, Any]:
    """The result as JSON (a webhook's body, an event's data)."""
    return render_result(job, job.id, links).model_dump(mode="json")
