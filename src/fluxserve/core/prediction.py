"""A Replicate prediction: one request's jobs (one per output) and what the request said."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fluxserve.core.job import JobRecord


@dataclass
class Prediction:
    id: str
    key_id: str
    model: str  # the model table's name
    input: dict[str, Any]  # as the client sent it (files and data URIs replaced by short references)
    outputs: int  # how many jobs (num_outputs)
    created_at: datetime | None = None  # set when the row is written
    started_at: datetime | None = None
    webhook: str | None = None
    webhook_events: str | None = None  # comma-separated; None: Replicate's default (output, completed)
    jobs: list[JobRecord] = field(default_factory=list)  # oldest first
