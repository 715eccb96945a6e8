"""The metric counters that triggers keep (migration 0011): equal to a GROUP BY over the rows after every
kind of change a store makes, filled from existing rows by the migration, and read by a scrape in the same
statements over the same few rows whether the jobs table holds a hundred jobs or 300,000."""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, delete, event, func, insert, select, update

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.job import ACTIVE_STATUSES, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import MIGRATIONS, migrate, open_database
from fluxserve.db.migrations.versions import __name__ as versions_package
from fluxserve.db.tables import job_counts, job_seconds, jobs, webhook_counts, webhook_deliveries
from fluxserve.jobs import stats as stats_module
from fluxserve.jobs.stats import JobStats
from fluxserve.jobs.store import Reaped
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.jobs.workers import WorkerRegistry
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_stores

ACTIVE = {status.value for status in ACTIVE_STATUSES}
MODELS = ("flux-dev", "flux-pro")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def counts(database: Engine) -> dict[tuple[str, str], int]:
    """The job counters, shards summed, without rows that sum to 0."""
    query = select(job_counts.c.model, job_counts.c.status, func.sum(job_counts.c.jobs)).group_by(
        job_counts.c.model, job_counts.c.status
    )
    with database.connect() as conn:
        return {(model, status): int(n) for model, status, n in conn.execute(query) if int(n)}


def grouped(database: Engine) -> dict[tuple[str, str], int]:
    """The same figures computed from the rows themselves."""
    query = select(jobs.c.model, jobs.c.status, func.count()).group_by(jobs.c.model, jobs.c.status)
    with database.connect() as conn:
        return {(model, status): int(n) for model, status, n in conn.execute(query)}


def observations(database: Engine, kind: str) -> dict[str, int]:
    query = (
        select(job_seconds.c.model, func.sum(job_seconds.c.observations))
        .where(job_seconds.c.kind == kind)
        .group_by(job_seconds.c.model)
    )
    with database.connect() as conn:
        return {model: int(n) for model, n in conn.execute(query)}


def deliveries(database: Engine) -> tuple[dict[str, int], dict[str, int]]:
    """The delivery counters and a GROUP BY over the deliveries."""
    with database.connect() as conn:
        kept = select(webhook_counts.c.status, func.sum(webhook_counts.c.deliveries)).group_by(
            webhook_counts.c.status
        )
        rows = select(webhook_deliveries.c.status, func.count()).group_by(webhook_deliveries.c.status)
        return (
            {status: int(n) for status, n in conn.execute(kept) if int(n)},
            {status: int(n) for status, n in conn.execute(rows)},
        )


def test_the_counters_follow_submits_claims_finishes_requeues_cancels_and_deletes(
    database: Engine, tmp_path: Path
) -> None:
    store = make_stores(database)
    limits = Limits(max_active=50, max_active_per_model={}, max_input_bytes=2**20, max_input_pixels=2**22)
    policy = NetworkPolicy(parse_networks("127.0.0.0/8"))
    submitter = Submitter(store.submissions, LocalBlobStore(tmp_path / "files"), limits, policy)
    key = KeyStore(database).create("k").record

    def submit(model: str, webhook: bool = False) -> str:
        params = GenerationParams.model_validate({"model": model, "prompt": "p", "width": 256, "height": 256})
        url = "http://127.0.0.1:9/hook" if webhook else None
        return submitter.submit(key, params, 7, url, SurfaceName.RESELLER).id

    submitted = [submit("flux-dev", webhook=True) for _ in range(6)] + [submit("flux-pro") for _ in range(3)]
    assert counts(database) == grouped(database) == {("flux-dev", "queued"): 6, ("flux-pro", "queued"): 3}
    claimed = [store.claims.claim("w-1") for _ in range(5)]
    assert all(claimed) and counts(database) == grouped(database)
    assert store.claims.finish(claimed[0].id, "w-1", JobStatus.SUCCEEDED)  # type: ignore[union-attr]
    assert store.claims.finish(claimed[1].id, "w-1", JobStatus.FAILED, error="x")  # type: ignore[union-attr]
    assert not store.claims.finish(claimed[1].id, "w-1", JobStatus.SUCCEEDED)  # a second end changes nothing
    assert counts(database) == grouped(database)
    # Two running jobs go stale and are taken back; one more has used its attempts and fails.
    with database.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.status == JobStatus.RUNNING.value)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
        )
        conn.execute(update(jobs).where(jobs.c.id == claimed[4].id).values(attempts=3))  # type: ignore[union-attr]
    reaped = store.claims.requeue_stale(datetime.now(UTC) - timedelta(minutes=1), max_attempts=3)
    assert reaped == Reaped(2, (claimed[4].id,))  # type: ignore[union-attr]  # the last attempt's fails
    assert counts(database) == grouped(database)
    queued = [job_id for job_id in submitted if store.submissions.get(job_id).status is JobStatus.QUEUED]  # type: ignore[union-attr]
    assert store.submissions.cancel(queued[0], key.id) is not None
    again = store.claims.claim("w-2")
    assert again is not None and store.claims.finish(again.id, "w-2", JobStatus.SUCCEEDED)
    assert counts(database) == grouped(database)
    assert counts(database)[("flux-dev", "canceled")] + counts(database).get(("flux-pro", "canceled"), 0) == 1

    # Each claim is a queue wait; each end of a started job a run (the requeued ones were claimed twice).
    assert sum(observations(database, "queue_wait").values()) == 6
    with database.connect() as conn:  # (a canceled job that was requeued had started: it counts)
        ran = conn.scalar(
            select(func.count()).where(jobs.c.status.not_in(ACTIVE), jobs.c.started_at.is_not(None))
        )
    assert sum(observations(database, "run").values()) == ran == 5
    kept, rows = deliveries(database)
    assert kept == rows and sum(rows.values()) >= 2  # the webhooks of ended flux-dev jobs, all pending

    # Rows deleted (a prune of old rows): an ended count keeps counting them, an active one does not.
    before = counts(database)
    with database.begin() as conn:
        conn.execute(delete(webhook_deliveries))
        conn.execute(delete(jobs).where(jobs.c.status.in_(["succeeded", "queued"])))
    after = counts(database)
    assert {k: n for k, n in after.items() if k[1] not in ACTIVE} == {
        k: n for k, n in before.items() if k[1] not in ACTIVE
    }
    assert {k: n for k, n in after.items() if k[1] in ACTIVE} == {
        k: n for k, n in grouped(database).items() if k[1] in ACTIVE
    }
    assert deliveries(database)[0] == {status: n for status, n in kept.items() if status != "pending"}


def job_rows(key_id: str, count: int, start: int = 0) -> list[dict[str, Any]]:
    """Ended jobs of two models over every outcome, with waits and run times over every bucket."""
    outcomes = ["succeeded", "failed", "canceled", "content_moderated"]
    seconds = [0.05, 0.3, 0.7, 2.0, 4.0, 8.0, 15.0, 45.0, 100.0, 200.0, 500.0, 1000.0, 3000.0, 7200.0]
    rows = []
    for n in range(start, start + count):
        waited, ran = seconds[n % len(seconds)], seconds[(n // 3) % len(seconds)]
        rows.append(
            {
                "id": str(uuid.UUID(int=n)),
                "key_id": key_id,
                "model": "flux-dev" if n % 2 else "flux-pro",
                "status": outcomes[n % len(outcomes)],
                "params": {},
                "seed": n,
                "output_format": "jpeg",
                "prompt": "p",
                "cost_hundredths": 250,
                "progress": 1.0,
                "details": {},
                "attempts": 1,
                "cancel_requested": False,
                "created_at": T0,
                "started_at": T0 + timedelta(seconds=waited),
                "finished_at": T0 + timedelta(seconds=waited + ran),
                "turn": n,
            }
        )
    return rows


def fill(database: Engine, key_id: str, count: int) -> None:
    with database.begin() as conn:
        for start in range(0, count, 20_000):
            conn.execute(insert(jobs), job_rows(key_id, min(20_000, count - start), start))


def expected_histograms(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, float]]:
    """(kind, model) -> (observations, seconds), computed here from the rows."""
    found: dict[tuple[str, str], tuple[int, float]] = {}
    for row in rows:
        for kind, seconds in (
            ("queue_wait", (row["started_at"] - row["created_at"]).total_seconds()),
            ("run", (row["finished_at"] - row["started_at"]).total_seconds()),
        ):
            n, total = found.get((kind, row["model"]), (0, 0.0))
            found[(kind, row["model"])] = (n + 1, total + seconds)
    return found


def histograms(database: Engine) -> dict[tuple[str, str], tuple[int, float]]:
    figures = JobStats(database, WorkerRegistry(database), 30).figures()
    return {
        (kind, model): (histogram.count, histogram.total)
        for kind, by_model in (("queue_wait", figures.queue_wait), ("run", figures.run_time))
        for model, histogram in by_model.items()
    }


def fill_before_the_counters(database: Engine, count: int) -> str:
    """``count`` ended jobs written before migration 0011 (as an upgraded server has them); the key's id."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0010")
    key = KeyStore(database).create("k").record
    fill(database, key.id, count)
    migrate(database)
    return key.id


def test_the_migration_fills_the_counters_from_the_rows_there_are(database: Engine) -> None:
    key_id = fill_before_the_counters(database, 2_000)
    assert counts(database) == grouped(database)
    want = expected_histograms(job_rows(key_id, 2_000))
    got = histograms(database)
    assert got.keys() == want.keys()
    for name, (n, total) in want.items():
        assert got[name][0] == n and got[name][1] == pytest.approx(total, rel=1e-6), name
    # The triggers count from then on: a failed job (row 1) put back in the queue is queued once more, and
    # the failures already counted stay counted (a counter never goes down).
    with database.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == str(uuid.UUID(int=1))).values(status="queued"))
    expected = grouped(database)
    expected[("flux-dev", "failed")] += 1
    assert counts(database) == expected and expected[("flux-dev", "queued")] == 1


def test_the_bounds_the_triggers_bucket_by_are_the_ones_rendered() -> None:
    migration = __import__(f"{versions_package}.0011_metric_counters", fromlist=["QUEUE_WAIT_BUCKETS"])
    assert migration.QUEUE_WAIT_BUCKETS == stats_module.QUEUE_WAIT_BUCKETS
    assert migration.RUN_BUCKETS == stats_module.RUN_BUCKETS


class Statements:
    """The SQL statements an database runs while counting."""

    def __init__(self, database: Engine) -> None:
        self.seen: list[str] = []
        event.listen(database, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.seen.append(statement)


def counter_rows(database: Engine) -> int:
    with database.connect() as conn:
        return sum(
            int(conn.scalar(select(func.count()).select_from(table)) or 0)
            for table in (job_counts, job_seconds, webhook_counts)
        )


def test_a_read_of_the_figures_does_not_grow_with_the_jobs_table(database_url: str, tmp_path: Path) -> None:
    """The same statements, none of them on the jobs table, over the same number of counter rows, with a
    hundred jobs and with 300,000 (100,000 on PostgreSQL, which writes slower here). The large table is
    written before the counters' migration (its backfill counts it), so that the test's time goes to the
    rows, not to the triggers; the triggers' counts are tested above."""
    large = 300_000 if database_url.startswith("sqlite") else 100_000
    seen: dict[int, tuple[list[str], int]] = {}
    for size in (112, large):
        url = database_url if size == large else f"sqlite:///{tmp_path / 'small.db'}"
        database = open_database(url)
        migrate(database)
        fill_before_the_counters(database, size)
        statements = Statements(database)
        figures = JobStats(database, WorkerRegistry(database), 30).figures()
        seen[size] = (list(statements.seen), counter_rows(database))
        assert sum(figures.ended.values()) == size
        assert figures.ended == grouped(database)
        database.dispose()
    (small_sql, small_rows), (large_sql, large_rows) = seen[112], seen[large]
    assert len(small_sql) == len(large_sql) == 4
    normal = [re.sub(r"\s+", " ", statement) for statement in large_sql]
    assert not [s for s in normal if re.search(r"\b(FROM|JOIN)\s+jobs\b", s, re.IGNORECASE)]
    assert small_rows == large_rows  # every (model, status) and bucket is there at either size


def test_the_counters_stay_exact_under_concurrent_submits_claims_and_finishes(
    database: Engine, tmp_path: Path
) -> None:
    """Two submitters and three workers at once (on PostgreSQL each its own connection, so its own counter
    shard or a shared one): no transaction fails (no deadlock on the counter rows) and the counters equal
    the rows' GROUP BY at the end."""
    store = make_stores(database)
    limits = Limits(max_active=500, max_active_per_model={}, max_input_bytes=2**20, max_input_pixels=2**22)
    submitter = Submitter(store.submissions, LocalBlobStore(tmp_path / "files"), limits, NetworkPolicy())
    keys = [KeyStore(database).create(f"k{n}").record for n in range(2)]
    errors: list[BaseException] = []
    claims: list[str] = []
    submitted = threading.Event()

    def submit(key: Any, model: str) -> None:
        try:
            params = GenerationParams.model_validate(
                {"model": model, "prompt": "p", "width": 256, "height": 256}
            )
            for _ in range(25):
                submitter.submit(key, params, 7, None, SurfaceName.RESELLER)
        except BaseException as error:  # the assertion below reports it
            errors.append(error)

    def work(name: str) -> None:
        try:
            while True:
                job = store.claims.claim(name)
                if job is None:
                    if submitted.is_set():
                        return
                    time.sleep(0.01)
                    continue
                claims.append(job.id)
                outcome = JobStatus.SUCCEEDED if len(claims) % 3 else JobStatus.FAILED
                assert store.claims.finish(
                    job.id, name, outcome, error=None if outcome is JobStatus.SUCCEEDED else "x"
                )
        except BaseException as error:
            errors.append(error)

    submitters = [
        threading.Thread(target=submit, args=(key, model)) for key, model in zip(keys, MODELS, strict=True)
    ]
    workers = [threading.Thread(target=work, args=(f"w-{n}",)) for n in range(3)]
    for thread in [*submitters, *workers]:
        thread.start()
    for thread in submitters:
        thread.join()
    submitted.set()
    for thread in workers:
        thread.join()
    assert errors == []
    assert counts(database) == grouped(database)
    assert sum(grouped(database).values()) == len(claims) == 50
    assert (
        sum(observations(database, "queue_wait").values())
        == sum(observations(database, "run").values())
        == 50
    )
