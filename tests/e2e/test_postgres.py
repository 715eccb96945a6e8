"""The store on PostgreSQL as on SQLite: the URL users write, migrations (concurrent ones too), column types,
claims that never hand one job to two workers, fair order across keys, LISTEN/NOTIFY wake-ups, and one job
through ``fluxserve serve`` on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.job import JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import database_url, migrate, open_database
from fluxserve.db.tables import metadata
from fluxserve.jobs.feed import CHANNEL, PostgresFeed
from fluxserve.jobs.store import Claims, FetchOutcome
from fluxserve.jobs.store_sql import SqlClaims
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_feed, make_stores
from tests.conftest import Api
from tests.support.pg_server import PostgresCluster, required_binaries


class Queue:
    """A store, keys and a submitter on one database, with limits high enough to queue 100 jobs a key."""

    def __init__(self, url: str, root: Path) -> None:
        self.database = open_database(url)
        migrate(self.database)
        self.stores = make_stores(self.database)  # no feed of its own: its commits notify through triggers
        self.keys = KeyStore(self.database)
        limits = Limits(1000, {}, 2**20, 2**22)
        self.submitter = Submitter(
            self.stores.submissions, LocalBlobStore(root / "files"), limits, NetworkPolicy([])
        )

    def submit(self, key: ApiKey, prompt: str = "p", seed: int = 1) -> str:
        params = GenerationParams(model="flux-dev", prompt=prompt, width=256, height=256)
        return self.submitter.submit(key, params, seed, None, SurfaceName.RESELLER).id


def test_users_postgres_urls_mean_psycopg_3() -> None:
    assert database_url("postgresql://u:p@db:5432/flux") == "postgresql+psycopg://u:p@db:5432/flux"
    assert (
        database_url("postgres://db/flux?sslmode=require") == "postgresql+psycopg://db/flux?sslmode=require"
    )
    assert database_url("postgresql+psycopg://db/flux") == "postgresql+psycopg://db/flux"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    assert open_database("postgres://db/flux").dialect.driver == "psycopg"


def test_without_binaries_postgres_tests_skip_unless_ci_requires_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLUXSERVE_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        required_binaries(tmp_path)
    monkeypatch.setenv("FLUXSERVE_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="FLUXSERVE_REQUIRE_POSTGRES=1 but"):
        required_binaries(tmp_path)
    for version in ("9", "15"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "postgres").touch()
    assert required_binaries(tmp_path) == tmp_path / "15" / "bin"  # the newest, by number


def test_migrations_build_exactly_the_declared_schema_on_postgres(postgres_url: str) -> None:
    database = open_database(postgres_url)
    migrate(database)  # the template was migrated already: a no-op
    with database.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        kinds = dict(
            connection.execute(
                text("SELECT column_name, data_type FROM information_schema.columns WHERE table_name='jobs'")
            ).all()
        )
    assert kinds["created_at"] == "timestamp with time zone"
    assert (kinds["params"], kinds["cancel_requested"], kinds["turn"]) == ("json", "boolean", "bigint")
    database.dispose()


def test_processes_migrating_at_once_on_an_empty_database(postgres: PostgresCluster) -> None:
    url = postgres.database(empty=True)
    script = "import sys; from fluxserve.db import connection as c; c.migrate(c.open_database(sys.argv[1]))"
    runs = [
        subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errors
    database = open_database(url)
    with database.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    database.dispose()
    postgres.drop(url)


def test_types_round_trip_alike(database_url: str, tmp_path: Path) -> None:
    queue = Queue(database_url, tmp_path)
    rich = queue.keys.create("rich", Decimal("30000000.25")).record  # 3e9 hundredths: beyond 32 bits
    job_id = queue.submit(rich, prompt="ünïcode ✓", seed=2**40)
    job = queue.stores.reads.get(job_id)
    assert (
        job is not None and job.created_at is not None and job.created_at.utcoffset() == UTC.utcoffset(None)
    )
    assert job.params["prompt"] == "ünïcode ✓" and job.seed == 2**40 and job.details == {}
    assert queue.keys.get(rich.id).credits == Decimal("29999997.75")  # type: ignore[union-attr]
    claimed = queue.stores.claims.claim("w")
    assert claimed is not None and claimed.id == job_id and claimed.started_at.tzinfo is not None  # type: ignore[union-attr]
    assert queue.stores.claims.finish(
        job_id, "w", JobStatus.FAILED, error="no", details={"a": [1, True, None]}
    )
    done = queue.stores.reads.get(job_id)
    assert done is not None and done.details == {"a": [1, True, None]} and done.status is JobStatus.FAILED
    assert queue.keys.get(rich.id).credits == Decimal("30000000.25")  # type: ignore[union-attr]


def test_a_key_with_100_queued_does_not_starve_one_with_5(database_url: str, tmp_path: Path) -> None:
    queue = Queue(database_url, tmp_path)
    a, b = queue.keys.create("a").record, queue.keys.create("b").record
    first = queue.submit(a)
    assert queue.stores.claims.claim("w").id == first  # type: ignore[union-attr]  # a worker is busy meanwhile
    for _ in range(99):
        queue.submit(a)
    for _ in range(5):
        queue.submit(b)
    order = [a.id]  # the key of each job, in the order workers took them
    while (job := queue.stores.claims.claim("w")) is not None:
        order.append(job.key_id)
        queue.stores.claims.finish(job.id, "w", JobStatus.SUCCEEDED)
    assert order.count(a.id) == 100 and order.count(b.id) == 5
    last_b = max(index for index, key in enumerate(order) if key == b.id)
    assert order[:last_b].count(a.id) < 20  # B's five all ran before A's 20th
    assert order[:11] == [a.id] + [a.id, b.id] * 5  # in fact they take turns


def test_within_a_key_oldest_first_and_batches_take_turns(database_url: str, tmp_path: Path) -> None:
    queue = Queue(database_url, tmp_path)
    a, b = queue.keys.create("a").record, queue.keys.create("b").record
    a_jobs = [queue.submit(a) for _ in range(4)]
    b_jobs = [queue.submit(b) for _ in range(2)]
    batch = queue.stores.claims.claim_similar("w", "flux-dev", 256, 256, 4)
    assert [job.id for job in batch] == [a_jobs[0], a_jobs[1], b_jobs[0], b_jobs[1]]  # created order
    rest = [queue.stores.claims.claim("w"), queue.stores.claims.claim("w"), queue.stores.claims.claim("w")]
    assert [job.id if job else None for job in rest] == [a_jobs[2], a_jobs[3], None]


def test_two_workers_on_postgres_never_get_the_same_job(postgres_url: str, tmp_path: Path) -> None:
    """Two processes' worth of databases (pools) claiming singles and batches as fast as they can."""
    queue = Queue(postgres_url, tmp_path)
    keys = [queue.keys.create(f"k{index}").record for index in range(3)]
    submitted = {queue.submit(keys[index % 3]) for index in range(150)}
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(4)

    def drain(store: Claims, into: list[str], batch: bool) -> None:
        start.wait()
        while True:
            got = store.claim_similar("w", "flux-dev", 256, 256, 3) if batch else [store.claim("w")]
            jobs = [job for job in got if job is not None]
            if not jobs:
                return
            into.extend(job.id for job in jobs)

    stores = [make_stores(open_database(postgres_url)).claims for _ in range(2)]
    threads = [
        threading.Thread(target=drain, args=(stores[index % 2], claimed[index % 2], index >= 2))
        for index in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 150 and set(everything) == submitted
    assert claimed[0] and claimed[1]  # both really took part


@pytest.fixture
def notify_store(postgres_url: str) -> Iterator[SqlClaims]:
    """The claims as ``wiring`` builds them on PostgreSQL: with the change feed (LISTEN/NOTIFY), listening."""
    database = open_database(postgres_url)
    store = make_stores(database, make_feed(database)).claims
    assert isinstance(store, SqlClaims) and isinstance(store.feed, PostgresFeed)
    assert store.feed.ready(30)
    yield store
    store.feed.close()


def feed_of(store: SqlClaims) -> PostgresFeed:
    assert isinstance(store.feed, PostgresFeed)
    return store.feed


def test_a_waiting_worker_wakes_on_submit(notify_store: SqlClaims, postgres_url: str, tmp_path: Path) -> None:
    stop, waiting, woke = threading.Event(), threading.Event(), threading.Event()

    def idle_worker() -> None:
        notify_store.wait_for_work(stop, 0)  # a thread's first look takes the listener's connect wake-up
        waiting.set()
        notify_store.wait_for_work(stop, 600)  # the poll interval: far beyond the test's timeout
        woke.set()

    threading.Thread(target=idle_worker, daemon=True).start()
    queue = Queue(postgres_url, tmp_path)  # another process's submitter: its own database, no shared state
    assert waiting.wait(30)
    assert not woke.wait(0.3)  # asleep until something is queued
    queue.submit(queue.keys.create("k").record)
    assert woke.wait(30), "the submit's NOTIFY did not wake the waiting worker"
    assert notify_store.claim("w") is not None


def test_a_job_leaving_the_fetch_stage_wakes_a_waiting_worker(
    notify_store: SqlClaims, postgres_url: str, tmp_path: Path
) -> None:
    queue = Queue(postgres_url, tmp_path)
    job_id = queue.submit(queue.keys.create("k").record)
    with notify_store._database.begin() as conn:  # as a submit with a URL input leaves it: not yet queued
        conn.execute(text("UPDATE jobs SET status = 'fetching'"))
    notify_store.wait_for_work(threading.Event(), 0)  # takes the listener's connect wake-up
    stop = threading.Event()
    woke = waiters(notify_store, 1, stop)
    (leased,) = queue.stores.fetches.lease("api-1", 1, 1)
    assert queue.stores.fetches.fetched(leased.id, "api-1", leased.params, 256, 256) is FetchOutcome.QUEUED
    assert woke[0].wait(30), "queuing a fetched job did not wake the waiting worker"
    assert notify_store.claim("w").id == job_id  # type: ignore[union-attr]


def test_a_notification_between_claims_is_not_lost(
    notify_store: SqlClaims, postgres_url: str, tmp_path: Path
) -> None:
    """Queued while the worker was busy (after its last look, before it waits): the wait returns at once."""
    stop, busy, done = threading.Event(), threading.Event(), threading.Event()
    queued = threading.Event()

    def worker() -> None:
        notify_store.wait_for_work(stop, 0)
        busy.set()  # claims, finds nothing, ... and a job is queued before it waits
        queued.wait(30)
        notify_store.wait_for_work(stop, 600)
        done.set()

    threading.Thread(target=worker, daemon=True).start()
    assert busy.wait(30)
    queue = Queue(postgres_url, tmp_path)
    queue.submit(queue.keys.create("k").record)
    for _ in range(300):  # until the listener has taken the notification in
        if feed_of(notify_store).work._pending:
            break
        threading.Event().wait(0.1)
    queued.set()
    assert done.wait(30)


def waiters(store: SqlClaims, count: int, stop: threading.Event) -> list[threading.Event]:
    """``count`` idle worker threads waiting (far longer than any test); each sets its event on waking."""
    work = feed_of(store).work
    woke = [threading.Event() for _ in range(count)]
    for event in woke:
        threading.Thread(
            target=lambda e=event: (store.wait_for_work(stop, 600), e.set()), daemon=True
        ).start()
    for _ in range(300):
        if work.waiting == count:
            break
        threading.Event().wait(0.1)
    assert work.waiting == count
    return woke


def test_each_queued_job_wakes_one_waiting_worker(notify_store: SqlClaims) -> None:
    notify_store.wait_for_work(threading.Event(), 0)  # takes the listener's connect wake-up
    stop = threading.Event()
    woke = waiters(notify_store, 3, stop)
    with notify_store._database.begin() as conn:  # e.g. two jobs requeued at once, in one transaction
        for job_id in ("a", "b"):
            conn.execute(text(f"SELECT pg_notify('{CHANNEL}', 'j {job_id} queued 0')"))
    for _ in range(300):
        if sum(event.is_set() for event in woke) == 2:
            break
        threading.Event().wait(0.1)
    assert sum(event.is_set() for event in woke) == 2
    assert feed_of(notify_store).work.waiting == 1  # the third sleeps on
    stop.set()


def test_the_listener_reconnects_after_losing_its_connection(
    notify_store: SqlClaims, postgres_url: str, tmp_path: Path
) -> None:
    feed = feed_of(notify_store)
    notify_store.wait_for_work(threading.Event(), 0)
    with notify_store._database.begin() as conn:  # as a server restart or a network cut would
        killed = conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
        ).all()
    assert killed == [(True,)]
    for _ in range(300):  # the listener notices
        if not feed._ready.is_set():
            break
        threading.Event().wait(0.1)
    assert feed.ready(30)  # and connects again
    assert feed.work._pending == 1  # with a wake-up: a job queued while it was away would be missed
    stop = threading.Event()
    notify_store.wait_for_work(stop, 0)
    woke = waiters(notify_store, 1, stop)
    queue = Queue(postgres_url, tmp_path)
    queue.submit(queue.keys.create("k").record)
    assert woke[0].wait(30), "no wake-up after the listener reconnected"


def test_serve_on_postgres_runs_a_job_through_the_bundled_model(make_server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    server = make_server({"FLUXSERVE_DATABASE_URL": postgres_url, "FLUXSERVE_POLL_SECONDS": "600"})
    key = server.create_key("pg")["key"]
    server.start()
    api = Api(server.base_url, key)
    # An idle worker looks again only after 600 s: the job runs sooner only because its submit woke it.
    body = api.wait(api.job("flux-dev", {"prompt": "a red circle", "width": 256, "height": 256}), timeout=300)
    assert body["status"] == "SUCCESS", body
    assert api.image(body).size == (256, 256)
    database = open_database(postgres_url)
    with database.connect() as connection:
        status = connection.execute(text("SELECT status FROM jobs")).scalars().all()
    assert status == ["succeeded"]
    database.dispose()
