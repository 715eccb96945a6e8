"""Operational figures for ``/metrics`` and ``/readyz``, read from the counter tables the database keeps.

The database is the one place every API replica and worker process writes to, so figures read from it are
right however many processes there are; in-process counters would each see a part. The jobs table is never
read here: it keeps every job for billing, so anything that read it would grow with it. Triggers (migration
0011) keep small counter tables in the same transaction as every change of a job or a webhook delivery; a
read is a few statements over rows bounded by models x statuses x buckets x shards, whatever the job count.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select

from fluxserve.core.job import ACTIVE_STATUSES
from fluxserve.db.tables import job_counts, job_seconds, webhook_counts
from fluxserve.jobs.workers import WorkerRegistry

# Upper bounds (seconds), as migration 0011's triggers bucket them (a change of them is a new migration).
# Waiting spans a free worker (sub-second) to a long queue; running spans the bundled model on a CPU
# (seconds) to a large model on a slow GPU (minutes).
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_ACTIVE = {status.value for status in ACTIVE_STATUSES}
_INF = "+Inf"


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound (``le``), as Prometheus has them, with the count and the sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    total: float


@dataclass(frozen=True)
class Figures:
    active: dict[tuple[str, str], int]  # (model, status) -> jobs not ended yet
    ended: dict[tuple[str, str], int]  # (model, status) -> jobs that ended so (only grows)
    queue_wait: dict[str, Histogram]  # model -> seconds from submission to each start
    run_time: dict[str, Histogram]  # model -> seconds from start to end, of ended jobs that started
    webhooks: dict[str, int]  # delivery status (pending, delivered, failed) -> deliveries
    live_workers: int


class JobStats:
    def __init__(self, database: Engine, workers: WorkerRegistry, worker_seen_within: float) -> None:
        self._database = database
        self._workers = workers
        self._seen_within = worker_seen_within

    def live_workers(self) -> int:
        """Worker processes heard from recently; raises when the database does not answer (a probe)."""
        return self._workers.live(self._seen_within)

    def figures(self) -> Figures:
        """Four statements over the counter tables and the workers table; the jobs table is not read."""
        counts = select(job_counts.c.model, job_counts.c.status, func.sum(job_counts.c.jobs)).group_by(
            job_counts.c.model, job_counts.c.status
        )
        deliveries = select(webhook_counts.c.status, func.sum(webhook_counts.c.deliveries)).group_by(
            webhook_counts.c.status
        )
        with self._database.connect() as conn:
            by_status = [(str(model), str(status), int(n)) for model, status, n in conn.execute(counts)]
            queue_wait, run_time = _histograms(conn)
            webhooks = {str(status): int(n) for status, n in conn.execute(deliveries)}
        return Figures(
            active={(model, status): n for model, status, n in by_status if status in _ACTIVE},
            ended={(model, status): n for model, status, n in by_status if status not in _ACTIVE},
            queue_wait=queue_wait,
            run_time=run_time,
            webhooks=webhooks,
            live_workers=self.live_workers(),
        )


def _histograms(conn: Connection) -> tuple[dict[str, Histogram], dict[str, Histogram]]:
    """Both histograms by model, from one statement: per-bucket rows made cumulative over the bounds."""
    query = select(
        job_seconds.c.kind,
        job_seconds.c.model,
        job_seconds.c.le,
        func.sum(job_seconds.c.observations),
        func.sum(job_seconds.c.seconds),
    ).group_by(job_seconds.c.kind, job_seconds.c.model, job_seconds.c.le)
    found: dict[tuple[str, str], dict[str, tuple[int, float]]] = defaultdict(dict)
    for kind, model, le, observations, seconds in conn.execute(query):
        found[(str(kind), str(model))][str(le)] = (int(observations), float(seconds))
    by_kind: dict[str, dict[str, Histogram]] = {"queue_wait": {}, "run": {}}
    for (kind, model), buckets in found.items():
        bounds = QUEUE_WAIT_BUCKETS if kind == "queue_wait" else RUN_BUCKETS
        # A bound of older triggers than this code still counts where it belongs.
        every = sorted(set(bounds) | {float(le) for le in buckets if le != _INF})
        cumulative, seen = [], 0
        for bound in every:
            seen += buckets.get(f"{bound:g}", (0, 0.0))[0]
            cumulative.append((bound, seen))
        count = sum(observations for observations, _ in buckets.values())
        total = sum(seconds for _, seconds in buckets.values())
        by_kind.setdefault(kind, {})[model] = Histogram(tuple(cumulative), count, max(0.0, total))
    return by_kind["queue_wait"], by_kind["run"]
