"""Operational figures read from the database at the moment they are asked for (``/metrics``, ``/readyz``).

The database is the one place every API replica and worker process writes to, so figures computed from it
are right however many processes there are; in-process counters would each see a part. Every query is an
aggregate whose answer is bounded by the number of models and statuses (never a row per job): the active jobs
and the outcomes by model, two histograms by model (bucket counts summed in SQL), the webhook deliveries by
status, and the workers seen recently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Float, case, func, literal_column, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from fluxserve.core.job import ACTIVE_STATUSES
from fluxserve.db.tables import jobs, webhook_deliveries
from fluxserve.jobs.workers import WorkerRegistry

# Upper bounds (seconds). Waiting spans a free worker (sub-second) to a long queue; running spans the
# bundled model on a CPU (seconds) to a large model on a slow GPU (minutes).
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_ACTIVE = [status.value for status in ACTIVE_STATUSES]


class _Seconds(FunctionElement[float]):
    """``later - earlier`` in seconds, in each database's own date arithmetic."""

    type = Float()
    inherit_cache = True
    name = "seconds_between"


@compiles(_Seconds)
def _seconds_postgresql(element: _Seconds, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"


@compiles(_Seconds, "sqlite")
def _seconds_sqlite(element: _Seconds, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    # julianday() is a float of days (~50 us apart today): rounded to the millisecond, 5.0 s stays 5.0 s
    return f"ROUND((julianday({later}) - julianday({earlier})) * 86400.0, 3)"


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound (``le``), as Prometheus has them, with the count and the sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    total: float


@dataclass(frozen=True)
class Figures:
    active: dict[tuple[str, str], int]  # (model, status) -> jobs not ended yet
    ended: dict[tuple[str, str], int]  # (model, status) -> jobs that ended so
    queue_wait: dict[str, Histogram]  # model -> seconds from submission to (the last) start
    run_time: dict[str, Histogram]  # model -> seconds from start to end, of ended jobs that started
    webhooks: dict[str, int]  # delivery status (pending, delivered, failed) -> deliveries
    live_workers: int


class JobStats:
    def __init__(self, engine: Engine, workers: WorkerRegistry, worker_seen_within: float) -> None:
        self._engine = engine
        self._workers = workers
        self._seen_within = worker_seen_within

    def ping(self) -> None:
        """Raises when the database does not answer."""
        with self._engine.connect() as conn:
            conn.execute(select(literal_column("1")))

    def live_workers(self) -> int:
        return self._workers.live(self._seen_within)

    def figures(self) -> Figures:
        by_status = select(jobs.c.model, jobs.c.status, func.count()).group_by(jobs.c.model, jobs.c.status)
        with self._engine.connect() as conn:
            counts = [(str(model), str(status), int(n)) for model, status, n in conn.execute(by_status)]
            waited = _Seconds(jobs.c.started_at, jobs.c.created_at)
            queue_wait = self._histograms(conn, waited, QUEUE_WAIT_BUCKETS, jobs.c.started_at.is_not(None))
            ran = _Seconds(jobs.c.finished_at, jobs.c.started_at)
            run_time = self._histograms(
                conn,
                ran,
                RUN_BUCKETS,
                jobs.c.finished_at.is_not(None),
                jobs.c.started_at.is_not(None),
                jobs.c.status.not_in(_ACTIVE),
            )
            deliveries = conn.execute(
                select(webhook_deliveries.c.status, func.count()).group_by(webhook_deliveries.c.status)
            )
            webhooks = {str(status): int(n) for status, n in deliveries}
        return Figures(
            active={(model, status): n for model, status, n in counts if status in _ACTIVE},
            ended={(model, status): n for model, status, n in counts if status not in _ACTIVE},
            queue_wait=queue_wait,
            run_time=run_time,
            webhooks=webhooks,
            live_workers=self.live_workers(),
        )

    @staticmethod
    def _histograms(
        conn: Any, seconds: ColumnElement[float], bounds: tuple[float, ...], *where: ColumnElement[bool]
    ) -> dict[str, Histogram]:
        """One query: per model, the count, the sum and how many are at most each bound."""
        at_most = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
        query = (
            select(jobs.c.model, func.count(), func.coalesce(func.sum(seconds), 0.0), *at_most)
            .where(*where)
            .group_by(jobs.c.model)
        )
        result: dict[str, Histogram] = {}
        for model, count, total, *cumulative in conn.execute(query):
            buckets = tuple((bound, int(n or 0)) for bound, n in zip(bounds, cumulative, strict=True))
            result[str(model)] = Histogram(buckets, int(count), max(0.0, float(total)))
        return result
