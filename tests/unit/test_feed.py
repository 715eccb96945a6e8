"""The change feed on SQLite and PostgreSQL: what it learns (jobs, keys), what it leaves out (heartbeats),
and what it wakes (idle workers, the fetch stage, the webhook dispatcher); each change is made by another
database, as another process would."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal

import pytest
from sqlalchemy import Engine, insert

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.job import JobStatus
from fluxserve.db.connection import migrate, open_database, utcnow
from fluxserve.db.tables import jobs
from fluxserve.jobs.feed import ChangeFeed, JobChange, wake_on, webhook_due
from fluxserve.jobs.store_sql import SqlClaims, SqlJobReads
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.webhooks.delivery import Payload, WebhookDispatcher
from fluxserve.wiring import make_feed
from tests.e2e.test_webhooks_e2e import Receiver


class Heard:
    """What a feed's subscribers were told, in order."""

    def __init__(self, feed: ChangeFeed) -> None:
        self.jobs: list[JobChange] = []
        self.keys: list[str | None] = []
        self._lock = threading.Lock()
        feed.subscribe(self._on_jobs)
        feed.subscribe_keys(self._on_key)

    def _on_jobs(self, changes: Sequence[JobChange] | None) -> None:
        with self._lock:
            self.jobs.extend(changes or ())

    def _on_key(self, key_id: str | None) -> None:
        with self._lock:
            self.keys.append(key_id)

    def until(self, found: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self._lock:
                if found():
                    return
            time.sleep(0.02)
        raise AssertionError(f"the feed did not tell {what}: {self.jobs} {self.keys}")

    def of(self, job_id: str) -> list[JobChange]:
        return [change for change in self.jobs if change.job_id == job_id]


@pytest.fixture
def databases(database_url: str) -> Iterator[tuple[Engine, Engine]]:
    """(the feed's database, another process's database) on one migrated database."""
    mine, other = open_database(database_url), open_database(database_url)
    migrate(other)
    yield mine, other
    mine.dispose()
    other.dispose()


@pytest.fixture
def feed(databases: tuple[Engine, Engine]) -> Iterator[ChangeFeed]:
    instance = make_feed(databases[0])
    yield instance
    instance.close()


def add_job(database: Engine, key_id: str, status: str = "queued", webhook: str | None = None) -> str:
    job_id = str(uuid.uuid4())
    with database.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=job_id, key_id=key_id, model="flux-dev", status=status, params={}, seed=1,
                output_format="png", prompt="p", cost_hundredths=250, progress=0.0, details={},
                attempts=0, cancel_requested=False, created_at=utcnow(), webhook_url=webhook,
            )
        )  # fmt: skip
    return job_id


def test_the_feed_names_each_change_of_a_job_and_a_key_but_not_a_heartbeat(
    feed: ChangeFeed, databases: tuple[Engine, Engine]
) -> None:
    heard = Heard(feed)
    assert feed.ready(30)
    other = databases[1]
    store, keys = SqlClaims(other), KeyStore(other)
    key = keys.create("k", Decimal(10)).record
    job_id = add_job(other, key.id, webhook="http://127.0.0.1:9/hook")
    heard.until(lambda: JobChange(job_id, JobStatus.QUEUED, True) in heard.jobs, "the queued job")
    assert store.claim("w") is not None
    heard.until(lambda: JobChange(job_id, JobStatus.RUNNING, True) in heard.jobs, "the claim")

    seen = len(heard.of(job_id))
    assert store.heartbeat(job_id, "w") == (True, False)  # only heartbeat_at moves
    marker = add_job(other, key.id, status="fetching")  # committed after it: heard after it, if at all
    heard.until(lambda: JobChange(marker, JobStatus.FETCHING, False) in heard.jobs, "the marker job")
    assert len(heard.of(job_id)) == seen, "a heartbeat alone woke the feed's subscribers"

    store.heartbeat(job_id, "w", progress=0.5)
    heard.until(lambda: len(heard.of(job_id)) == seen + 1, "the progress")
    assert store.finish(job_id, "w", JobStatus.SUCCEEDED, result_key="r.png")
    succeeded = JobChange(job_id, JobStatus.SUCCEEDED, True)
    heard.until(lambda: succeeded in heard.jobs, "the end")
    assert webhook_due(succeeded) and not webhook_due(JobChange(marker, JobStatus.FETCHING, False))

    keys.revoke(key.id)
    heard.until(lambda: key.id in heard.keys, "the revoked key")
    assert None in heard.keys  # the connect told that any key may have changed (there may be a gap)


def test_an_idle_worker_wakes_when_another_process_queues_a_job(
    feed: ChangeFeed, databases: tuple[Engine, Engine]
) -> None:
    stop, waiting, woke = threading.Event(), threading.Event(), threading.Event()
    assert feed.ready(30)
    feed.wait_for_work(stop, 0)  # takes the connect's wake-up

    def idle_worker() -> None:
        waiting.set()
        feed.wait_for_work(stop, 600)  # far beyond the test's timeout
        woke.set()

    threading.Thread(target=idle_worker, daemon=True).start()
    assert waiting.wait(30)
    key = KeyStore(databases[1]).create("k").record
    add_job(databases[1], key.id, status="fetching")  # not for workers: they sleep on
    assert not woke.wait(0.5)
    add_job(databases[1], key.id)
    assert woke.wait(30), "a queued job did not wake the idle worker"
    stop.set()


def test_a_failing_subscriber_stops_no_other(feed: ChangeFeed, databases: tuple[Engine, Engine]) -> None:
    def broken(_: Sequence[JobChange] | None) -> None:
        raise RuntimeError("a subscriber's bug")

    feed.subscribe(broken)
    heard = Heard(feed)
    assert feed.ready(30)
    job_id = add_job(databases[1], KeyStore(databases[1]).create("k").record.id)
    heard.until(lambda: bool(heard.of(job_id)), "the job")


def test_a_job_that_ends_with_a_webhook_wakes_the_dispatcher_at_once(
    feed: ChangeFeed, databases: tuple[Engine, Engine]
) -> None:
    """The dispatcher polls only every 600 s here: the delivery goes out because the finish woke it."""
    receiver = Receiver()
    dispatcher = WebhookDispatcher(
        databases[0], SqlJobReads(databases[0]), lambda job: Payload({"jobId": job.id}),
        policy=NetworkPolicy(parse_networks("127.0.0.0/8")), poll_seconds=600,
    )  # fmt: skip
    feed.subscribe(wake_on(webhook_due, dispatcher.wake))
    assert feed.ready(30)
    store = SqlClaims(databases[1])
    job_id = add_job(databases[1], KeyStore(databases[1]).create("k").record.id, webhook=receiver.url)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(0.5)  # its first lease found nothing: it sleeps its poll
        assert await asyncio.to_thread(store.claim, "w") is not None
        assert await asyncio.to_thread(store.finish, job_id, "w", JobStatus.SUCCEEDED, result_key="r")
        await asyncio.to_thread(receiver.wait, 1)
        stop.set()
        await task

    try:
        asyncio.run(scenario())
    finally:
        receiver.close()
    assert receiver.requests[0][1] == f'{{"jobId":"{job_id}"}}'.encode()
