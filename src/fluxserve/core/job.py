"""The one internal job model that every surface renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from fluxserve.core.models import SurfaceName


class JobStatus(StrEnum):
    FETCHING = "fetching"  # its URL inputs are being downloaded (jobs/fetching.py); then it is queued
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REQUEST_MODERATED = "request_moderated"
    CONTENT_MODERATED = "content_moderated"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self not in ACTIVE_STATUSES

    @property
    def is_charged(self) -> bool:
        """Only a delivered image costs credits; moderation, failure and cancellation are refunded."""
        return self is JobStatus.SUCCEEDED


ACTIVE_STATUSES = (JobStatus.FETCHING, JobStatus.QUEUED, JobStatus.RUNNING)
QUEUE_POSITION_CAP = 1000  # a queue position is counted this far; beyond, it reads "this many or more"


@dataclass
class JobRecord:
    """A job's row as the store reads and writes it. Named apart from ``fluxserve.client.Job``, which is
    what a client of the HTTP API receives."""

    id: str
    key_id: str
    model: str
    params: dict[str, Any]
    seed: int
    output_format: str
    prompt: str
    cost: Decimal
    surface: SurfaceName = SurfaceName.RESELLER  # the surface it came in: it renders the job's webhook
    status: JobStatus = JobStatus.QUEUED
    width: int | None = None
    height: int | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None  # the vendor surface's per-task secret its webhook carries
    input_mp: Decimal | None = None  # the megapixels a megapixel-priced job was charged for (core.pricing)
    output_mp: Decimal | None = None
    progress: float = 0.0
    result_key: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    worker_id: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    result_expired_at: datetime | None = None  # when retention deleted the result file; the row stays
    result_pruned: bool = False  # it was `fluxserve prune` that deleted it
    prediction_id: str | None = None  # the Replicate prediction it makes one output of

    @property
    def result_expired(self) -> str | None:
        """Why a succeeded job has no image any more (its result outlived retention, or an operator's
        ``fluxserve prune`` deleted it), or None."""
        if self.result_expired_at is None:
            return None
        kept = ""
        if self.finished_at is not None:
            kept = f" after {_duration((self.result_expired_at - self.finished_at).total_seconds())}"
        if self.result_pruned:
            return (
                f"Result deleted{kept} by the server's operator (fluxserve prune); the job's record is kept"
            )
        return f"Result expired{kept} (retention period); the job's record is kept"

    @property
    def size(self) -> str | None:
        if self.width is None or self.height is None:
            return None
        return f"{self.width}x{self.height}"


def _duration(seconds: float) -> str:
    """``7 days``, ``3 hours``, ``1 minute``: the largest whole unit, rounded down."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = max(0, int(seconds))
    return f"{count} second{'s' if count != 1 else ''}"
