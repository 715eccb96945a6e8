"""Retention: disk use stays bounded.

A job's input images (``inputs/<job_id>/``) are deleted as soon as the job ends (by the worker, the cancel
route and the stale reaper; :func:`drop_inputs`). Results are kept for the result TTL and then deleted by
:meth:`Retention.sweep`, which the API process runs every ``FLUXSERVE_SWEEP_SECONDS`` and ``fluxserve
prune`` runs by hand; the job's row is kept and records when its result expired. The sweep also removes
input folders that no active job owns (a worker that died between ending a job and deleting its inputs,
or a submit refused after its images were stored), once they are older than a grace period.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, select

from fluxserve.core.job import JobStatus
from fluxserve.db import ledger
from fluxserve.db.tables import idempotency_keys, jobs, webhook_deliveries
from fluxserve.jobs.store import Expiry
from fluxserve.jobs.submit import INPUTS, inputs_prefix
from fluxserve.storage.base import BlobInfo, BlobStore

log = logging.getLogger("fluxserve.retention")

# A submit stores its images a moment before its job row exists: input folders younger than this are
# never taken for orphans.
ORPHAN_GRACE_SECONDS = 600.0
BATCH = 500


def drop_inputs(blobs: BlobStore, job_id: str) -> list[BlobInfo]:
    """Delete an ended job's input images; a failure is logged, never raised (the sweep retries)."""
    try:
        return blobs.delete_prefix(inputs_prefix(job_id))
    except Exception:
        log.exception("could not delete a job's inputs", extra={"job_id": job_id})
        return []


@dataclass
class SweepReport:
    results: int = 0  # result files deleted (their jobs are marked expired)
    inputs: int = 0  # orphaned input files deleted
    bytes: int = 0

    def __str__(self) -> str:
        return f"removed {self.results} result(s) and {self.inputs} input file(s), {self.bytes} bytes"


class Retention:
    def __init__(
        self,
        store: Expiry,
        blobs: BlobStore,
        ttl_seconds: float,
        orphan_grace_seconds: float = ORPHAN_GRACE_SECONDS,
        by_operator: bool = False,
    ) -> None:
        """``by_operator``: a ``fluxserve prune`` run, whose deletions their jobs then say were its own."""
        self._store = store
        self._blobs = blobs
        self.ttl_seconds = ttl_seconds
        self._grace = orphan_grace_seconds
        self._by_operator = by_operator

    def sweep(self, now: datetime | None = None) -> SweepReport:
        """Delete results finished more than the TTL before ``now`` and orphaned inputs; blocking."""
        now = now or datetime.now(UTC)
        report = SweepReport()
        cutoff = now - timedelta(seconds=self.ttl_seconds)
        while batch := self._store.results_to_expire(cutoff, BATCH):
            # The file goes first: a sweep stopped between the two finds the job again and marks it.
            for _, key in batch:
                removed = self._blobs.delete(key)
                if removed is not None:
                    report.results += 1
                    report.bytes += removed.size
            self._store.mark_results_expired([job_id for job_id, _ in batch], self._by_operator)
            if len(batch) < BATCH:
                break
        self._sweep_orphaned_inputs(now.timestamp() - self._grace, report)
        return report

    def _sweep_orphaned_inputs(self, before: float, report: SweepReport) -> None:
        folders: dict[str, float] = {}
        for info in self._blobs.list(INPUTS):
            parts = info.key.split("/")
            if len(parts) >= 3:
                folders[parts[1]] = max(folders.get(parts[1], 0.0), info.modified)
        old = [job_id for job_id, modified in folders.items() if modified < before]
        if not old:
            return
        active = self._store.active_ids(old)
        for job_id in old:
            if job_id in active:
                continue
            removed = self._blobs.delete_prefix(inputs_prefix(job_id))
            report.inputs += len(removed)
            report.bytes += sum(info.size for info in removed)


def prune_rows(database: Engine, finished_before: datetime, limit: int = BATCH) -> int:
    """Delete the rows of jobs that ended before ``finished_before`` (and their webhook deliveries and
    Idempotency-Keys), for operators who keep no job history; each key's credit entries for them are
    folded into summaries (``db.ledger.fold``), so balances and usage by day and model still add up. Their
    files go with the sweep as usual. The rows deleted."""
    ended = [status.value for status in JobStatus if status.is_terminal]
    deleted = 0
    while True:
        with database.begin() as conn:
            ids = list(
                conn.scalars(
                    select(jobs.c.id)
                    .where(jobs.c.status.in_(ended), jobs.c.finished_at < finished_before)
                    .limit(limit)
                )
            )
            if not ids:
                return deleted
            ledger.fold(conn, ids)
            conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(ids)))
            conn.execute(delete(idempotency_keys).where(idempotency_keys.c.job_id.in_(ids)))
            deleted += conn.execute(delete(jobs).where(jobs.c.id.in_(ids))).rowcount
