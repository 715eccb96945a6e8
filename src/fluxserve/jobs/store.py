"""The job store interface: durable job rows, claims with heartbeats, settlement of credits."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from fluxserve.core.job import Job, JobStatus


class JobStore(Protocol):
    def submit(self, job: Job, max_active: int, max_active_model: int | None = None) -> Job:
        """Hold the job's price, check the key's active-job limits (all its jobs, and its jobs of this
        model when the model has a limit of its own), and write the row, all in one transaction; raises
        QuotaExceeded or TooManyActiveJobs and then writes nothing."""
        ...

    def get(self, job_id: str, key_id: str | None = None) -> Job | None: ...

    def claim(self, worker_id: str) -> Job | None:
        """Take the oldest queued job for this worker, or None."""
        ...

    def claim_similar(self, worker_id: str, model: str, width: int, height: int, limit: int) -> list[Job]:
        """Take up to ``limit`` more queued jobs of this model and size, to run as one batch."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, progress: float | None = None) -> tuple[bool, bool]:
        """Record that the worker is alive; returns (still ours, cancel requested)."""
        ...

    def update_running(self, job_id: str, worker_id: str, **fields: Any) -> None:
        """Record what the worker learned while running (final size, prompt, details)."""
        ...

    def finish(
        self,
        job_id: str,
        worker_id: str | None,
        status: JobStatus,
        *,
        error: str | None = None,
        result_key: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """End the job, refund its hold unless it succeeded, and queue its webhook; False when the job
        is no longer this worker's (it was requeued or canceled meanwhile)."""
        ...

    def cancel(self, job_id: str, key_id: str) -> Job | None:
        """Cancel a queued job at once, or flag a running one for its worker to stop."""
        ...

    def requeue_stale(self, older_than: datetime, max_attempts: int) -> int:
        """Give the jobs of workers that stopped heartbeating back to the queue (or fail crash loops)."""
        ...
