"""The job store's roles, on SQLite and PostgreSQL: the contracts the other tests do not pin down, and the
fetch stage's lease in columns of its own (migration 0014), apart from the claiming worker's."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, insert, select, update

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.db.connection import MIGRATIONS, migrate, open_database, utcnow
from fluxserve.db.tables import jobs
from fluxserve.jobs.store import FetchOutcome, Reaped, Stores
from fluxserve.wiring import make_stores

OWNER, OTHER = "fetch:api-1", "fetch:api-2"


@pytest.fixture
def stores(database: Engine) -> Stores:
    return make_stores(database)


@pytest.fixture
def key(database: Engine) -> ApiKey:
    return KeyStore(database).create("k", Decimal(100)).record


def add(stores: Stores, key: ApiKey, status: JobStatus = JobStatus.QUEUED) -> JobRecord:
    """A job as a submit writes it (its hold taken), ``fetching`` when it waits for URL inputs."""
    job = JobRecord(
        id=str(uuid.uuid4()),
        key_id=key.id,
        model="flux-dev",
        params={},
        seed=1,
        output_format="png",
        prompt="p",
        cost=Decimal("2.5"),
        status=status,
        width=256,
        height=256,
    )
    return stores.submissions.submit(job, max_active=24)


def columns(database: Engine, job_id: str) -> dict[str, Any]:
    names = ("status", "worker_id", "heartbeat_at", "fetch_owner", "fetch_renewed_at")
    with database.connect() as conn:
        row = conn.execute(select(*(jobs.c[name] for name in names)).where(jobs.c.id == job_id)).one()
    return dict(zip(names, row, strict=True))


def balance(database: Engine, key: ApiKey) -> Decimal | None:
    found = KeyStore(database).get(key.id)
    assert found is not None
    return found.credits


# --- fetch leases and claims never share columns ---------------------------------------------------------


def test_a_fetch_lease_and_a_running_jobs_worker_live_in_their_own_columns(
    database: Engine, stores: Stores, key: ApiKey
) -> None:
    fetching, queued = add(stores, key, JobStatus.FETCHING), add(stores, key)
    (leased,) = stores.fetches.lease(OWNER, 10, 10)
    claimed = stores.claims.claim("w-1")
    assert leased.id == fetching.id and claimed is not None and claimed.id == queued.id
    lease = columns(database, fetching.id)
    assert lease["fetch_owner"] == OWNER and lease["fetch_renewed_at"] is not None
    assert (lease["worker_id"], lease["heartbeat_at"]) == (None, None)
    running = columns(database, queued.id)
    assert running["worker_id"] == "w-1" and running["heartbeat_at"] is not None
    assert (running["fetch_owner"], running["fetch_renewed_at"]) == (None, None)
    # Neither side's guard matches the other's job, even under the other's name.
    assert stores.claims.heartbeat(fetching.id, OWNER) == (False, False)
    assert not stores.fetches.renew(queued.id, "w-1")
    assert not stores.claims.finish(fetching.id, OWNER, JobStatus.SUCCEEDED)
    assert not stores.fetches.fail(queued.id, "w-1", "input_image: gone")
    # Each side's reaper looks at its own clock only: a silent lease is not a silent worker.
    later = utcnow() + timedelta(seconds=1)
    assert stores.claims.requeue_stale(later, max_attempts=3) == Reaped(1)  # the running job only
    assert stores.fetches.release_stale(later) == 1  # the lease only
    assert columns(database, fetching.id)["status"] == "fetching"
    assert columns(database, queued.id) == {
        "status": "queued", "worker_id": None, "heartbeat_at": None, "fetch_owner": None,
        "fetch_renewed_at": None,
    }  # fmt: skip


def test_a_queued_job_keeps_no_lease_columns(database: Engine, stores: Stores, key: ApiKey) -> None:
    job = add(stores, key, JobStatus.FETCHING)
    (leased,) = stores.fetches.lease(OWNER, 1, 1)
    assert stores.fetches.fetched(leased.id, OWNER, {}, 256, 256) is FetchOutcome.QUEUED
    assert columns(database, job.id) == {
        "status": "queued", "worker_id": None, "heartbeat_at": None, "fetch_owner": None,
        "fetch_renewed_at": None,
    }  # fmt: skip


def test_a_fetching_jobs_lease_survives_the_migration(database_url: str) -> None:
    """The schema as it was before 0014 (a fetch lease in worker_id/heartbeat_at), a job in each state the
    lease columns touch; after the upgrade each is where it was, and the lease is still its owner's."""
    database = open_database(database_url)
    migrate(database)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0013")
    key = KeyStore(database).create("old", Decimal(10)).record
    renewed = utcnow() - timedelta(seconds=5)
    old = [("fetching", OWNER, renewed), ("running", "w-1", renewed), ("queued", None, None)]
    with database.begin() as conn:  # the columns 0013 had (no default fills a lease column)
        conn.execute(
            insert(jobs),
            [
                {"id": status, "key_id": key.id, "model": "flux-dev", "surface": "reseller", "status": status,
                 "params": {}, "seed": 1, "output_format": "png", "prompt": "p", "cost_hundredths": 0,
                 "worker_id": owner, "heartbeat_at": at, "created_at": renewed}
                for status, owner, at in old
            ],
        )  # fmt: skip
    migrate(database)
    fetching, running, queued = (columns(database, status) for status, _, _ in old)
    assert fetching["status"] == "fetching" and fetching["fetch_owner"] == OWNER
    assert fetching["fetch_renewed_at"] is not None and fetching["worker_id"] is None
    assert running["status"] == "running" and running["worker_id"] == "w-1"
    assert running["heartbeat_at"] is not None and running["fetch_owner"] is None
    assert queued["status"] == "queued" and queued["worker_id"] is None and queued["fetch_owner"] is None
    stores = make_stores(database)
    assert stores.fetches.renew("fetching", OWNER)  # still its lease
    assert stores.fetches.lease(OTHER, 10, 10) == []  # nobody else's to take
    assert stores.claims.heartbeat("running", "w-1") == (True, False)  # and the worker still has its job
    database.dispose()


# --- the roles' contracts --------------------------------------------------------------------------------


def test_fetched_says_whether_the_job_ended_or_changed_hands(
    database: Engine, stores: Stores, key: ApiKey
) -> None:
    canceled, lapsed = add(stores, key, JobStatus.FETCHING), add(stores, key, JobStatus.FETCHING)
    assert {job.id for job in stores.fetches.lease(OWNER, 10, 10)} == {canceled.id, lapsed.id}
    assert stores.submissions.cancel(canceled.id, key.id) is not None
    assert stores.fetches.fetched(canceled.id, OWNER, {}, 256, 256) is FetchOutcome.ENDED
    assert stores.fetches.release_stale(utcnow() + timedelta(seconds=1)) == 1  # the owner seemed dead
    assert [job.id for job in stores.fetches.lease(OTHER, 10, 10)] == [lapsed.id]
    assert stores.fetches.fetched(lapsed.id, OWNER, {}, 256, 256) is FetchOutcome.LOST
    assert stores.fetches.fetched(lapsed.id, OTHER, {}, 256, 256) is FetchOutcome.QUEUED
    assert stores.fetches.fetched("no-such-job", OWNER, {}, 256, 256) is FetchOutcome.ENDED


def test_a_failed_fetch_refunds_its_hold_and_only_its_owner_can_fail_it(
    database: Engine, stores: Stores, key: ApiKey
) -> None:
    job = add(stores, key, JobStatus.FETCHING)
    assert balance(database, key) == Decimal("97.5")
    stores.fetches.lease(OWNER, 1, 1)
    assert not stores.fetches.fail(job.id, OTHER, "input_image: not found")
    assert stores.fetches.fail(job.id, OWNER, "input_image: not found")
    ended = stores.reads.get(job.id)
    assert ended is not None and (ended.status, ended.error) == (JobStatus.FAILED, "input_image: not found")
    assert balance(database, key) == Decimal(100)
    assert not stores.fetches.fail(job.id, OWNER, "again")  # ended once


def test_the_reaper_names_the_crash_loops_it_failed(database: Engine, stores: Stores, key: ApiKey) -> None:
    looping, retried = add(stores, key), add(stores, key)
    assert stores.claims.claim("w-1") is not None and stores.claims.claim("w-2") is not None
    with database.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == looping.id).values(attempts=3))
    reaped = stores.claims.requeue_stale(utcnow() + timedelta(seconds=1), max_attempts=3)
    assert reaped == Reaped(requeued=1, failed=(looping.id,))
    failed, queued = stores.reads.get(looping.id), stores.reads.get(retried.id)
    assert failed is not None and failed.status is JobStatus.FAILED and "giving up" in (failed.error or "")
    assert queued is not None and queued.status is JobStatus.QUEUED and queued.worker_id is None
    assert balance(database, key) == Decimal("97.5")  # the failed one's hold came back


def test_a_worker_records_progress_only_on_the_job_it_runs(
    database: Engine, stores: Stores, key: ApiKey
) -> None:
    job = add(stores, key)
    stores.claims.update_running(job.id, "w-1", prompt="not claimed yet")
    claimed = stores.claims.claim("w-1")
    assert claimed is not None
    stores.claims.update_running(job.id, "w-2", prompt="another worker's")
    stores.claims.update_running(job.id, "w-1", prompt="upsampled")
    current = stores.reads.get(job.id)
    assert current is not None and current.prompt == "upsampled"


def test_reads_are_scoped_to_the_key_when_one_is_given(stores: Stores, key: ApiKey, database: Engine) -> None:
    job = add(stores, key)
    other = KeyStore(database).create("other").record
    assert stores.reads.get(job.id, key_id=key.id) is not None
    assert stores.reads.get(job.id, key_id=other.id) is None
    assert stores.reads.get("no-such-job") is None
    assert stores.reads.queue_position(job.id) == 0
    assert stores.submissions.cancel(job.id, other.id) is None  # not its job: untouched
    assert stores.reads.queue_position(job.id) == 0


def test_expiry_counts_a_fetching_job_as_active(stores: Stores, key: ApiKey) -> None:
    fetching, queued, ended = add(stores, key, JobStatus.FETCHING), add(stores, key), add(stores, key)
    assert stores.submissions.cancel(ended.id, key.id) is not None
    active = stores.expiry.active_ids([fetching.id, queued.id, ended.id, "no-such-job"])
    assert active == {fetching.id, queued.id}
