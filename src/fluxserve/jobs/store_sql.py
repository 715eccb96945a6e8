"""The job store's roles on SQLAlchemy Core: SQLite for one machine, PostgreSQL (SKIP LOCKED) for many.

One class per role of ``jobs/store.py``, all over the ``jobs`` table; what they share (the row's mapping to
a :class:`JobRecord`, the statements built once, :func:`_end`, which ends a job with its credits and
webhook) is private to this module."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import BindParameter

from fluxserve.core.job import ACTIVE_STATUSES, QUEUE_POSITION_CAP, JobRecord, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.pricing import Quote
from fluxserve.db import ledger, outbox, predictions
from fluxserve.db.connection import as_utc, reconnecting, utcnow
from fluxserve.db.tables import api_keys, idempotency_keys, job_counts, jobs
from fluxserve.errors import IdempotencyConflict, QuotaExceeded, TooManyActiveJobs
from fluxserve.jobs.feed import ChangeFeed
from fluxserve.jobs.store import (
    IDEMPOTENCY_TTL,
    PREFER_MAX_WAIT,
    PREFER_WINDOW,
    Drawn,
    FetchOutcome,
    Idempotency,
    Reaped,
)

_ACTIVE = [status.value for status in ACTIVE_STATUSES]
_BATCH = 500  # ids per IN list
_I = idempotency_keys.c


class _Raced(Exception):
    """Another submit with the same Idempotency-Key wrote its entry first; this transaction rolls back."""


class _Replayed(Exception):
    """A live entry for the same request: its job is the answer, and this transaction (the hold) rolls
    back."""

    def __init__(self, job: JobRecord) -> None:
        super().__init__(job.id)
        self.job = job


def _mp(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _job(row: RowMapping) -> JobRecord:
    return JobRecord(
        id=row["id"],
        key_id=row["key_id"],
        model=row["model"],
        surface=SurfaceName(row["surface"]),
        params=row["params"],
        seed=row["seed"],
        output_format=row["output_format"],
        prompt=row["prompt"],
        cost=ledger.from_hundredths(row["cost_hundredths"]),
        status=JobStatus(row["status"]),
        width=row["width"],
        height=row["height"],
        webhook_url=row["webhook_url"],
        webhook_secret=row["webhook_secret"],
        input_mp=_mp(row["input_mp"]),
        output_mp=_mp(row["output_mp"]),
        progress=row["progress"],
        result_key=row["result_key"],
        error=row["error"],
        details=row["details"] or {},
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        created_at=as_utc(row["created_at"]),
        started_at=as_utc(row["started_at"]),
        finished_at=as_utc(row["finished_at"]),
        heartbeat_at=as_utc(row["heartbeat_at"]),
        result_expired_at=as_utc(row["result_expired_at"]),
        result_pruned=bool(row["result_pruned"]),
        prediction_id=row["prediction_id"],
    )


def _expired(created_at: datetime) -> bool:
    stamp = as_utc(created_at)
    return stamp is None or stamp < utcnow() - IDEMPOTENCY_TTL


def _over(counts: Any, max_active: int, max_active_model: int | None) -> bool:
    """Whether the key already has its limit of active jobs, in all or (with its own limit) of its model."""
    return bool(
        counts.active >= max_active or (max_active_model is not None and counts.of_model >= max_active_model)
    )


# The request path's statements, built once with bind parameters: building one per call (its subqueries
# and aliases) costs more CPU than the database takes to run it.
_KEY: BindParameter[str] = bindparam("key_id")
_MODEL: BindParameter[str] = bindparam("model")
_JOB: BindParameter[str] = bindparam("job_id")
_COST: BindParameter[int] = bindparam("cost")


def _count(*conditions: Any) -> Any:
    return select(func.count()).select_from(jobs).where(*conditions).scalar_subquery()


def _turns(aggregate: Any, *conditions: Any) -> Any:
    return select(aggregate(jobs.c.turn)).where(*conditions).scalar_subquery()


_QUEUED = jobs.c.status == JobStatus.QUEUED.value
_MINE_ACTIVE = (jobs.c.key_id == _KEY, jobs.c.status.in_(_ACTIVE))
_ACTIVE_COUNTS = (
    _count(*_MINE_ACTIVE).label("active"),
    _count(*_MINE_ACTIVE, jobs.c.model == _MODEL).label("of_model"),
)
# The key's active jobs (all, and of the model) and the three turns :func:`_turn` needs, in one round trip
# of five index probes: the limits and the queue's clock read together.
_PROBE = select(
    *_ACTIVE_COUNTS,
    _turns(func.min, _QUEUED).label("lowest_queued"),
    _turns(func.max, jobs.c.status == JobStatus.RUNNING.value).label("highest_running"),
    _turns(func.max, *_MINE_ACTIVE).label("last"),
)
_BALANCE = api_keys.c.credits_hundredths
_ADMIT = select(
    select(_BALANCE.is_(None) | (_BALANCE >= _COST))
    .where(api_keys.c.id == _KEY)
    .scalar_subquery()
    .label("covers"),
    *_ACTIVE_COUNTS,
)
# A queued job's place in the claim order: the queued jobs with a lower turn, or the same turn and older,
# counted on the queue index up to the cap; and whether the job is queued at all.
_ME, _OTHER = jobs.alias("me"), jobs.alias("other")
_ME_QUEUED = and_(_ME.c.id == _JOB, _ME.c.status == JobStatus.QUEUED.value)
_AHEAD = (
    select(_OTHER.c.id)
    .join(_ME, _ME_QUEUED)
    .where(
        _OTHER.c.status == JobStatus.QUEUED.value,
        (_OTHER.c.turn < _ME.c.turn)
        | ((_OTHER.c.turn == _ME.c.turn) & (_OTHER.c.created_at < _ME.c.created_at)),
    )
    .limit(QUEUE_POSITION_CAP)
    .subquery()
)
_INSERT_JOB = insert(jobs)
_JOB_ROW = select(jobs).where(jobs.c.id == _JOB)
_KEYS_JOB_ROW = _JOB_ROW.where(jobs.c.key_id == _KEY)
_POSITION = select(
    select(func.count()).select_from(_AHEAD).scalar_subquery().label("ahead"),
    exists().where(_ME_QUEUED).label("queued"),
)


def _turn(probe: Any) -> int:
    """A new job's place in the fair order: start-time fair queueing, one unit per job.

    The queue's clock is the lowest turn waiting (with nothing waiting, the highest turn running). A key's
    job comes one turn after the key's previous active job, and never before the clock. So the keys with
    jobs waiting take one turn each in rotation (a key that queued 100 jobs does not hold back one that
    queues 5 after it), a key's own jobs stay oldest first, and a key that was idle starts at the clock
    rather than ahead of everyone. ``probe`` is a row of ``_PROBE``, read while the caller holds the key's
    row (``ledger.hold``), so that two submits of one key cannot take the same turn."""
    clock = probe.lowest_queued
    if clock is None:
        clock = probe.highest_running or 0
    return int(clock if probe.last is None else max(probe.last + 1, clock))


def _end(
    conn: Connection,
    job_id: str,
    status: JobStatus,
    error: str | None,
    *guard: Any,
    result_key: str | None = None,
    details: dict[str, Any] | None = None,
    drawn: Drawn | None = None,
) -> bool:
    """End an active job (``guard``: and only if it is still the caller's), settle its hold (refunded
    unless it succeeded) and queue its webhook (a prediction's job: the prediction's, ``db.predictions``),
    on the caller's transaction; False when nothing matched."""
    values: dict[str, Any] = {
        "status": status.value,
        "error": error,
        "result_key": result_key,
        "finished_at": utcnow(),
    }
    if status is JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    if details is not None:
        values["details"] = details
    if drawn is not None:
        values.update(prompt=drawn.prompt, seed=drawn.seed, width=drawn.width, height=drawn.height)
    row = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status.in_(_ACTIVE), *guard)
        .values(values)
        .returning(
            jobs.c.key_id, jobs.c.cost_hundredths, jobs.c.webhook_url, jobs.c.model, jobs.c.prediction_id
        )
    ).first()
    if row is None:
        return False
    held = ledger.from_hundredths(row.cost_hundredths)
    ledger.settle(conn, row.key_id, held, status.is_charged, job_id=job_id, model=row.model)
    if row.prediction_id:  # the prediction's webhooks, not one per job
        predictions.ended(conn, row.prediction_id, job_id, status is JobStatus.SUCCEEDED)
    elif row.webhook_url:
        outbox.enqueue(conn, job_id, row.key_id, row.webhook_url)
    return True


class _Sql:
    """What every role's implementation shares: the database, and a view of it for reads."""

    def __init__(self, database: Engine) -> None:
        self._database = database
        # The request path's reads, outside a transaction: on PostgreSQL a read in one would cost two more
        # round trips (BEGIN, and the ROLLBACK when the connection goes back to the pool).
        self._reads = database.execution_options(isolation_level="AUTOCOMMIT")
        self._postgres = database.dialect.name == "postgresql"


class SqlJobReads(_Sql):
    """:class:`~fluxserve.jobs.store.JobReads`: one statement per read, outside a transaction."""

    @reconnecting
    def get(self, job_id: str, key_id: str | None = None) -> JobRecord | None:
        query, values = (
            (_JOB_ROW, {"job_id": job_id})
            if key_id is None
            else (_KEYS_JOB_ROW, {"job_id": job_id, "key_id": key_id})
        )
        with self._reads.connect() as conn:
            row = conn.execute(query, values).mappings().first()
        return _job(row) if row is not None else None

    @reconnecting
    def queue_position(self, job_id: str) -> int | None:
        """One statement (``_POSITION``): the jobs ahead in the claim order, if the job is queued."""
        with self._reads.connect() as conn:
            row = conn.execute(_POSITION, {"job_id": job_id}).one()
        return int(row.ahead) if row.queued else None


class SqlSubmissions(SqlJobReads):
    """:class:`~fluxserve.jobs.store.Submissions`: a submit is one transaction of four statements."""

    def submit(
        self,
        job: JobRecord,
        max_active: int,
        max_active_model: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> JobRecord:
        try:
            return self._submit(job, max_active, max_active_model, idempotency)
        except _Replayed as replayed:
            return replayed.job
        except (_Raced, IntegrityError, QuotaExceeded):
            # Rolled back; a concurrent repeat (or a repeat whose price no longer fits) gets the job
            # that the first one made.
            if idempotency is None:
                raise
            existing = self.replay(job.key_id, idempotency)
            if existing is None:
                raise
            return existing

    @reconnecting
    def admit(
        self, key_id: str, model: str, cost: Decimal, max_active: int, max_active_model: int | None = None
    ) -> None:
        values = {"key_id": key_id, "model": model, "cost": ledger.to_hundredths(cost)}
        with self._reads.connect() as conn:
            row = conn.execute(_ADMIT, values).one()
        if not row.covers:
            raise QuotaExceeded()
        if _over(row, max_active, max_active_model):
            raise TooManyActiveJobs()

    @reconnecting
    def _submit(
        self, job: JobRecord, max_active: int, max_active_model: int | None, idempotency: Idempotency | None
    ) -> JobRecord:
        with self._database.begin() as conn:
            # The hold comes first: it serialises this key's submits, so the limits cannot race, and
            # the Idempotency-Key read below sees every earlier submit of this key.
            self._hold(conn, job)
            if idempotency is not None:
                existing = self._replay(conn, job.key_id, idempotency)
                if existing is not None:
                    raise _Replayed(existing)  # rolls the hold back
            self._insert(conn, job, max_active, max_active_model)
            if idempotency is not None:
                self._remember(conn, job, idempotency)
        return job

    @reconnecting
    def submit_group(
        self, group: Sequence[JobRecord], max_active: int, max_active_model: int | None = None
    ) -> list[JobRecord]:
        with self._database.begin() as conn:
            for job in group:
                self._hold(conn, job)
                self._insert(conn, job, max_active, max_active_model)
        return list(group)

    @staticmethod
    def _hold(conn: Connection, job: JobRecord) -> None:
        if not ledger.hold(conn, job.key_id, job.cost, job_id=job.id, model=job.model):
            raise QuotaExceeded()

    def _insert(
        self, conn: Connection, job: JobRecord, max_active: int, max_active_model: int | None
    ) -> None:
        """Write the job after its hold, unless the key (its earlier jobs of this transaction counted) is at
        its limits."""
        probe = conn.execute(_PROBE, {"key_id": job.key_id, "model": job.model}).one()
        if _over(probe, max_active, max_active_model):
            conn.rollback()
            raise TooManyActiveJobs()
        job.created_at = utcnow()
        conn.execute(_INSERT_JOB, {**self._values(job), "turn": _turn(probe)})

    @reconnecting
    def replay(self, key_id: str, idempotency: Idempotency) -> JobRecord | None:
        with self._reads.connect() as conn:
            return self._replay(conn, key_id, idempotency)

    @staticmethod
    def _replay(conn: Connection, key_id: str, idempotency: Idempotency) -> JobRecord | None:
        row = (
            conn.execute(
                select(_I.request_hash.label("idempotency_hash"), _I.created_at.label("idempotency_at"), jobs)
                .join(jobs, jobs.c.id == _I.job_id)
                .where(_I.key_id == key_id, _I.idempotency_key == idempotency.key)
            )
            .mappings()
            .first()
        )
        if row is None or _expired(row["idempotency_at"]):
            return None
        if row["idempotency_hash"] != idempotency.request_hash:
            raise IdempotencyConflict()
        return _job(row)

    @staticmethod
    def _remember(conn: Connection, job: JobRecord, idempotency: Idempotency) -> None:
        """Write the entry beside the job; the primary key (key, Idempotency-Key) refuses a second one
        (IntegrityError), and an expired entry is taken over only if it is still expired."""
        values = {"request_hash": idempotency.request_hash, "job_id": job.id, "created_at": job.created_at}
        mine = (_I.key_id == job.key_id, _I.idempotency_key == idempotency.key)
        if conn.execute(select(_I.created_at).where(*mine)).first() is None:
            conn.execute(
                insert(idempotency_keys).values(key_id=job.key_id, idempotency_key=idempotency.key, **values)
            )
            return
        replaced = conn.execute(
            update(idempotency_keys).where(*mine, _I.created_at < utcnow() - IDEMPOTENCY_TTL).values(values)
        )
        if replaced.rowcount != 1:
            raise _Raced()

    @staticmethod
    def _values(job: JobRecord) -> dict[str, Any]:
        return {
            "id": job.id,
            "key_id": job.key_id,
            "model": job.model,
            "surface": job.surface.value,
            "status": job.status.value,
            "params": job.params,
            "seed": job.seed,
            "width": job.width,
            "height": job.height,
            "output_format": job.output_format,
            "prompt": job.prompt,
            "cost_hundredths": ledger.to_hundredths(job.cost),
            "webhook_url": job.webhook_url,
            "webhook_secret": job.webhook_secret,
            "input_mp": None if job.input_mp is None else float(job.input_mp),
            "output_mp": None if job.output_mp is None else float(job.output_mp),
            "progress": job.progress,
            "details": job.details,
            "attempts": 0,
            "cancel_requested": False,
            "created_at": job.created_at,
            "prediction_id": job.prediction_id,
        }

    def cancel(self, job_id: str, key_id: str) -> JobRecord | None:
        with self._database.begin() as conn:
            row = conn.execute(
                select(jobs.c.status).where(jobs.c.id == job_id, jobs.c.key_id == key_id)
            ).first()
            if row is None:
                return None
            if row.status in (JobStatus.QUEUED.value, JobStatus.FETCHING.value):
                _end(conn, job_id, JobStatus.CANCELED, "Canceled by the client")
            elif row.status == JobStatus.RUNNING.value:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True))
        return self.get(job_id)

    def waiting(self) -> int:
        """From the counters the triggers keep (migration 0011): a few rows, however long the queue."""
        waiting = [JobStatus.QUEUED.value, JobStatus.FETCHING.value]
        total = select(func.coalesce(func.sum(job_counts.c.jobs), 0)).where(job_counts.c.status.in_(waiting))
        with self._reads.connect() as conn:
            return int(conn.scalar(total) or 0)


class SqlClaims(_Sql):
    """:class:`~fluxserve.jobs.store.Claims`: the claiming worker is ``worker_id``, its heartbeat
    ``heartbeat_at``, written only by a claim and its heartbeats (kept when the job ends: who ran it;
    cleared when it is queued again)."""

    def __init__(self, database: Engine, feed: ChangeFeed | None = None) -> None:
        """``feed`` (chosen by ``wiring.make_stores``) wakes idle workers when a job is queued (the
        database's triggers announce it); without it they poll."""
        super().__init__(database)
        self.feed = feed

    def claim(
        self,
        worker_id: str,
        models: Collection[str] | None = None,
        prefer: Collection[str] = (),
        window: int = PREFER_WINDOW,
        max_wait: timedelta = PREFER_MAX_WAIT,
    ) -> JobRecord | None:
        served = () if models is None else (jobs.c.model.in_(models),)
        window_or_none = window if prefer else None  # nothing preferred: the plain fair order
        claimed = self._claim(worker_id, 1, *served, window=window_or_none, prefer=prefer, max_wait=max_wait)
        return claimed[0] if claimed else None

    def claim_similar(
        self, worker_id: str, model: str, width: int, height: int, limit: int
    ) -> list[JobRecord]:
        return self._claim(
            worker_id, limit, jobs.c.model == model, jobs.c.width == width, jobs.c.height == height
        )

    def _claim(
        self,
        worker_id: str,
        limit: int,
        *conditions: Any,
        window: int | None = None,
        prefer: Collection[str] = (),
        max_wait: timedelta = PREFER_MAX_WAIT,
    ) -> list[JobRecord]:
        """The lowest turns first (see :func:`_turn`), oldest first among equal turns: one index probe on
        (status, turn, created). SKIP LOCKED on PostgreSQL (a job another claim holds is passed over, not
        waited for), the write lock on SQLite.

        With a ``window``, the next ``window`` jobs in that order are chosen (and locked, for the moment of
        this one statement) and the first of them to take is, in order: one that waited past ``max_wait``,
        one of the ``prefer`` models, the first."""
        queued = jobs.c.status == JobStatus.QUEUED.value
        order = (jobs.c.turn, jobs.c.created_at)
        turn = (
            select(jobs.c.id, jobs.c.model, *order)
            .where(queued, *conditions)
            .order_by(*order)
            .limit(limit if window is None else max(window, limit))
        )
        if self._postgres:
            turn = turn.with_for_update(skip_locked=True)
        # Materialized: chosen (and locked) once. As a plain IN subquery PostgreSQL may run it again for
        # each queued row, and each run locks and picks the next job: one claim took the whole queue.
        # No status test outside it: the lock (or SQLite's write lock) keeps the chosen jobs queued, and a
        # second test made SQLite walk every queued job instead of taking the chosen ones by id.
        ahead = turn.cte("turn").prefix_with("MATERIALIZED")
        now = utcnow()
        chosen = select(ahead.c.id)
        if window is not None:
            rank = case((ahead.c.created_at < now - max_wait, 0), (ahead.c.model.in_(prefer), 1), else_=2)
            chosen = chosen.order_by(rank, ahead.c.turn, ahead.c.created_at).limit(limit)
        with self._database.begin() as conn:
            rows = (
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(chosen))
                    .values(
                        status=JobStatus.RUNNING.value,
                        worker_id=worker_id,
                        attempts=jobs.c.attempts + 1,
                        started_at=now,
                        heartbeat_at=now,
                        progress=0.0,
                    )
                    .returning(*jobs.c)
                )
                .mappings()
                .all()
            )
            predictions.started(
                conn, {row["prediction_id"]: row["id"] for row in rows if row["prediction_id"]}
            )
        return sorted((_job(row) for row in rows), key=lambda job: job.created_at or now)

    def wait_for_work(self, stop: threading.Event, timeout: float) -> None:
        if self.feed is None:
            stop.wait(timeout)
        else:
            self.feed.wait_for_work(stop, timeout)

    def heartbeat(self, job_id: str, worker_id: str, progress: float | None = None) -> tuple[bool, bool]:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        with self._database.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(*self._running(job_id, worker_id))
                .values(values)
                .returning(jobs.c.cancel_requested)
            ).first()
        return (row is not None, bool(row and row.cancel_requested))

    @staticmethod
    def _running(job_id: str, worker_id: str) -> tuple[Any, ...]:
        """The job, while this worker runs it."""
        return (jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == JobStatus.RUNNING.value)

    def update_running(self, job_id: str, worker_id: str, **fields: Any) -> None:
        with self._database.begin() as conn:
            conn.execute(update(jobs).where(*self._running(job_id, worker_id)).values(fields))

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result_key: str | None = None,
        details: dict[str, Any] | None = None,
        drawn: Drawn | None = None,
    ) -> bool:
        mine = self._running(job_id, worker_id)[1:]
        with self._database.begin() as conn:
            return _end(
                conn, job_id, status, error, *mine, result_key=result_key, details=details, drawn=drawn
            )

    def hand_back(self, worker_ids: Collection[str]) -> int:
        mine = [jobs.c.status == JobStatus.RUNNING.value, jobs.c.worker_id.in_(list(worker_ids))]
        with self._database.begin() as conn:
            handed = conn.execute(
                update(jobs)
                .where(*mine)
                .values(
                    status=JobStatus.QUEUED.value,
                    worker_id=None,
                    heartbeat_at=None,
                    progress=0.0,
                    attempts=jobs.c.attempts - 1,
                )
            ).rowcount
        return handed  # queued again: the triggers announce each job, waking idle workers

    def requeue_stale(self, older_than: datetime, max_attempts: int) -> Reaped:
        stale = [jobs.c.status == JobStatus.RUNNING.value, jobs.c.heartbeat_at < older_than]
        failed: list[str] = []
        with self._database.begin() as conn:
            crashed = conn.execute(select(jobs.c.id).where(*stale, jobs.c.attempts >= max_attempts)).scalars()
            message = (
                f"The worker running this job stopped or hung {max_attempts} time(s) (it crashed, was "
                "killed, or its engine made no progress); giving up"
            )
            for job_id in list(crashed):
                if _end(conn, job_id, JobStatus.FAILED, message, *stale):  # not beaten meanwhile
                    failed.append(job_id)
            requeued = conn.execute(
                update(jobs)
                .where(*stale, jobs.c.attempts < max_attempts)
                .values(status=JobStatus.QUEUED.value, worker_id=None, heartbeat_at=None, progress=0.0)
            ).rowcount
        return Reaped(requeued, tuple(failed))


# A fetch lease is held in its own columns (migration 0014), never in the claiming worker's.
_FETCHING = jobs.c.status == JobStatus.FETCHING.value
_LEASED = jobs.c.fetch_owner.is_not(None)


class SqlFetchLeases(_Sql):
    """:class:`~fluxserve.jobs.store.FetchLeases`: the lease is ``fetch_owner`` and ``fetch_renewed_at``,
    both only ever set on a fetching job."""

    def lease(self, owner: str, limit: int, per_key: int) -> list[JobRecord]:
        leased = (
            select(jobs.c.key_id)
            .where(_FETCHING, _LEASED)
            .group_by(jobs.c.key_id)
            .having(func.count() >= per_key)
        )
        waiting = (
            select(jobs.c.id, jobs.c.key_id)
            .where(_FETCHING, jobs.c.fetch_owner.is_(None), jobs.c.key_id.not_in(leased))
            .order_by(jobs.c.created_at)
            .limit(limit * per_key)
        )
        now = utcnow()
        with self._database.begin() as conn:
            in_flight: dict[str, int] = dict(
                conn.execute(
                    select(jobs.c.key_id, func.count()).where(_FETCHING, _LEASED).group_by(jobs.c.key_id)
                ).all()
            )
            chosen: list[str] = []
            for job_id, key_id in conn.execute(waiting).all():
                if len(chosen) < limit and in_flight.get(key_id, 0) < per_key:
                    in_flight[key_id] = in_flight.get(key_id, 0) + 1
                    chosen.append(job_id)
            if not chosen:
                return []
            rows = (
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(chosen), _FETCHING, jobs.c.fetch_owner.is_(None))
                    .values(fetch_owner=owner, fetch_renewed_at=now)
                    .returning(*jobs.c)
                )
                .mappings()
                .all()
            )
        return sorted((_job(row) for row in rows), key=lambda job: job.created_at or now)

    @staticmethod
    def _held(job_id: str, owner: str) -> tuple[Any, ...]:
        """The job, while ``owner`` holds its lease."""
        return (jobs.c.id == job_id, _FETCHING, jobs.c.fetch_owner == owner)

    def renew(self, job_id: str, owner: str) -> bool:
        with self._database.begin() as conn:
            renewed = conn.execute(
                update(jobs).where(*self._held(job_id, owner)).values(fetch_renewed_at=utcnow())
            )
        return bool(renewed.rowcount)

    def fetched(
        self,
        job_id: str,
        owner: str,
        params: dict[str, Any],
        width: int,
        height: int,
        price: Quote | None = None,
    ) -> FetchOutcome:
        with self._database.begin() as conn:
            queued = conn.execute(
                update(jobs)
                .where(*self._held(job_id, owner))
                .values(
                    status=JobStatus.QUEUED.value,
                    params=params,
                    width=width,
                    height=height,
                    fetch_owner=None,
                    fetch_renewed_at=None,
                )
                .returning(jobs.c.key_id, jobs.c.cost_hundredths, jobs.c.model)
            ).first()
            if queued is None:  # rare: one more read says whether the job ended or only changed hands
                status = conn.scalar(select(jobs.c.status).where(jobs.c.id == job_id))
                ended = status is None or JobStatus(status).is_terminal
                return FetchOutcome.ENDED if ended else FetchOutcome.LOST
            if price is not None:  # written after the row is ours to write
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        cost_hundredths=ledger.to_hundredths(price.cost),
                        input_mp=None if price.input_mp is None else float(price.input_mp),
                        output_mp=None if price.output_mp is None else float(price.output_mp),
                    )
                )
                held = ledger.from_hundredths(queued.cost_hundredths)
                ledger.reprice(conn, queued.key_id, held, price.cost, job_id=job_id, model=queued.model)
        return FetchOutcome.QUEUED

    def fail(self, job_id: str, owner: str, error: str) -> bool:
        with self._database.begin() as conn:
            return _end(conn, job_id, JobStatus.FAILED, error, *self._held(job_id, owner)[1:])

    def release_stale(self, older_than: datetime) -> int:
        with self._database.begin() as conn:
            return conn.execute(
                update(jobs)
                .where(_FETCHING, _LEASED, jobs.c.fetch_renewed_at < older_than)
                .values(fetch_owner=None, fetch_renewed_at=None)
            ).rowcount


class SqlExpiry(_Sql):
    """:class:`~fluxserve.jobs.store.Expiry`: bounded batches (IN lists of at most 500 ids)."""

    def results_to_expire(self, finished_before: datetime, limit: int) -> list[tuple[str, str]]:
        query = (
            select(jobs.c.id, jobs.c.result_key)
            .where(
                jobs.c.result_expired_at.is_(None),
                jobs.c.finished_at < finished_before,
                jobs.c.result_key.is_not(None),
                jobs.c.status == JobStatus.SUCCEEDED.value,
            )
            .order_by(jobs.c.finished_at)
            .limit(limit)
        )
        with self._database.connect() as conn:
            return [(row.id, row.result_key) for row in conn.execute(query)]

    def mark_results_expired(self, job_ids: Collection[str], pruned: bool = False) -> int:
        ids = list(job_ids)
        marked = 0
        now = utcnow()
        with self._database.begin() as conn:
            for start in range(0, len(ids), _BATCH):
                marked += conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(ids[start : start + _BATCH]), jobs.c.result_expired_at.is_(None))
                    .values(result_expired_at=now, result_pruned=pruned)
                ).rowcount
        return marked

    def active_ids(self, job_ids: Collection[str]) -> set[str]:
        found: set[str] = set()
        ids = list(job_ids)
        with self._database.connect() as conn:
            for start in range(0, len(ids), _BATCH):
                query = select(jobs.c.id).where(
                    jobs.c.id.in_(ids[start : start + _BATCH]), jobs.c.status.in_(_ACTIVE)
                )
                found.update(conn.execute(query).scalars())
        return found
