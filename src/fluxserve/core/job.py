"""The one internal job model that both API dialects render."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from fluxserve.core.models import Dialect


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REQUEST_MODERATED = "request_moderated"
    CONTENT_MODERATED = "content_moderated"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)

    @property
    def is_charged(self) -> bool:
        """Only a delivered image costs credits; moderation, failure and cancellation are refunded."""
        return self is JobStatus.SUCCEEDED


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Job:
    id: str
    key_id: str
    model: str
    params: dict[str, Any]
    seed: int
    output_format: str
    prompt: str
    cost: Decimal
    dialect: Dialect = Dialect.RESELLER  # the dialect it came in, which renders its results and webhooks
    status: JobStatus = JobStatus.QUEUED
    width: int | None = None
    height: int | None = None
    webhook_url: str | None = None
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

    @property
    def size(self) -> str | None:
        if self.width is None or self.height is None:
            return None
        return f"{self.width}x{self.height}"
