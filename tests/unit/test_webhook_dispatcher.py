"""The webhook dispatcher on its own: durable rows, backoff to failure, slow targets in parallel."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from sqlalchemy import Engine, insert, select

from fluxserve.db.connection import migrate, open_database, utcnow
from fluxserve.db.outbox import enqueue
from fluxserve.db.tables import api_keys, jobs, webhook_deliveries
from fluxserve.jobs.store_sql import SqlJobReads
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.webhooks.delivery import Payload, WebhookDispatcher
from fluxserve.webhooks.signing import new_secret
from tests.e2e.test_webhooks_e2e import Receiver

T = TypeVar("T")

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))


@pytest.fixture
def database(database_url: str) -> Engine:
    database = open_database(database_url)
    migrate(database)
    now = utcnow()
    with database.begin() as conn:
        conn.execute(
            insert(api_keys).values(
                id="k", name="k", key_hash="h", key_prefix="p", webhook_secret=new_secret(), active=True,
                credits_hundredths=None, created_at=now,
            )
        )  # fmt: skip
    return database


def add_delivery(database: Engine, url: str) -> str:
    job_id = str(uuid.uuid4())
    with database.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=job_id, key_id="k", model="flux-dev", status="succeeded", params={}, seed=1,
                output_format="png", prompt="p", cost_hundredths=250, progress=1.0, details={},
                attempts=1, cancel_requested=False, created_at=utcnow(),
            )
        )  # fmt: skip
        enqueue(conn, job_id, "k", url)
    return job_id


def states(database: Engine) -> dict[str, tuple[str, int]]:
    with database.connect() as conn:
        rows = conn.execute(select(webhook_deliveries)).mappings().all()
    return {row["job_id"]: (row["status"], row["attempts"]) for row in rows}


DEADLINE = 20.0  # generous: every wait below ends as soon as its condition holds


@contextlib.asynccontextmanager
async def running(dispatcher: WebhookDispatcher) -> AsyncIterator[asyncio.Task[None]]:
    """Run the dispatcher for the body of the block; stop it (and wait for it) on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await task


async def until(task: asyncio.Task[None], condition: Callable[[], T | None], what: str) -> T:
    """Poll ``condition`` (off the event loop) until it returns something truthy; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if task.done():
            task.result()  # raises what stopped the dispatcher
            raise AssertionError(f"the dispatcher stopped before {what}")
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE:g} s"
        await asyncio.sleep(0.02)


def ended(state: tuple[str, int]) -> bool:
    return state[0] != "pending"


def states_once(
    database: Engine, job_id: str, ready: Callable[[tuple[str, int]], bool] = ended
) -> Callable[[], dict[str, tuple[str, int]] | None]:
    """A condition for ``until``: the states of all deliveries, once ``job_id``'s satisfies ``ready``
    (by default: it has ended, delivered or failed)."""

    def check() -> dict[str, tuple[str, int]] | None:
        current = states(database)
        return current if job_id in current and ready(current[job_id]) else None

    return check


def dispatcher(
    database: Engine, backoff: tuple[float, ...] = (0.1, 0.1), timeout: float = 5
) -> WebhookDispatcher:
    return WebhookDispatcher(
        database, SqlJobReads(database), lambda job: Payload({"jobId": job.id}), policy=LOOPBACK,
        backoff=backoff, timeout=timeout, poll_seconds=0.05,
    )  # fmt: skip


def test_dead_target_fails_after_the_schedule(database: Engine) -> None:
    job_id = add_delivery(database, "http://127.0.0.1:9/dead")

    async def scenario() -> dict[str, tuple[str, int]]:
        async with running(dispatcher(database, backoff=(0.05, 0.05, 0.05))) as task:
            return await until(task, states_once(database, job_id), "final state")

    assert asyncio.run(scenario())[job_id] == ("failed", 4)


def test_a_pending_delivery_survives_a_stopped_dispatcher(database: Engine) -> None:
    receiver = Receiver(fail_first=1)
    try:
        job_id = add_delivery(database, receiver.url)

        async def first_attempt() -> None:
            # stopped as soon as the first (failed) attempt is recorded, well inside the 1 s backoff
            async with running(dispatcher(database, backoff=(1.0,))) as task:
                await until(task, states_once(database, job_id, lambda s: s[1] >= 1), "first attempt")

        asyncio.run(first_attempt())
        assert states(database)[job_id] == ("pending", 1)
        assert [code for _, _, code in receiver.requests] == [500]

        async def resumed() -> dict[str, tuple[str, int]]:  # a new process, say
            async with running(dispatcher(database, backoff=(1.0,))) as task:
                return await until(task, states_once(database, job_id), "delivery")

        assert asyncio.run(resumed())[job_id] == ("delivered", 2)
        assert [code for _, _, code in receiver.requests] == [500, 200]
    finally:
        receiver.close()


def test_private_target_is_refused_without_the_switch(database: Engine) -> None:
    receiver = Receiver()
    try:
        job_id = add_delivery(database, receiver.url)
        closed = WebhookDispatcher(
            database,
            SqlJobReads(database),
            lambda job: Payload({"jobId": job.id}),
            policy=NetworkPolicy(),
            backoff=(),
            poll_seconds=0.05,
        )

        async def scenario() -> dict[str, tuple[str, int]]:
            async with running(closed) as task:
                return await until(task, states_once(database, job_id), "outcome")

        # the outcome is recorded only after the attempt ends, so a request sent would already be here
        assert asyncio.run(scenario())[job_id] == ("failed", 1)
        assert receiver.requests == []
    finally:
        receiver.close()


class Forgetful(SqlJobReads):
    """The real reads, except that every job has gone (retention removed it since its delivery was queued)."""

    def get(self, job_id: str, key_id: str | None = None) -> None:
        return None


def test_a_delivery_whose_job_is_gone_fails_at_once_and_sends_nothing(database: Engine) -> None:
    """An UndeliverableWebhook is final: no retry on the backoff schedule, no request."""
    receiver = Receiver()
    try:
        job_id = add_delivery(database, receiver.url)
        orphaned = WebhookDispatcher(
            database, Forgetful(database), lambda job: Payload({"jobId": job.id}), policy=LOOPBACK,
            backoff=(0.05, 0.05), poll_seconds=0.05,
        )  # fmt: skip

        async def scenario() -> dict[str, tuple[str, int]]:
            async with running(orphaned) as task:
                return await until(task, states_once(database, job_id), "outcome")

        assert asyncio.run(scenario())[job_id] == ("failed", 1)
        assert receiver.requests == []
    finally:
        receiver.close()


def test_a_slow_target_does_not_hold_up_a_fast_one(database: Engine) -> None:
    slow = socket.socket()  # accepts connections, never answers
    slow.bind(("127.0.0.1", 0))
    slow.listen()
    slow.settimeout(DEADLINE)
    fast = Receiver()
    held: list[socket.socket] = []
    try:
        slow_job = add_delivery(database, f"http://127.0.0.1:{slow.getsockname()[1]}/slow")

        async def scenario() -> dict[str, tuple[str, int]]:
            async with running(dispatcher(database, timeout=10)) as task:
                held.append((await asyncio.to_thread(slow.accept))[0])  # the slow attempt is in flight
                fast_job = add_delivery(database, fast.url)
                return await until(task, states_once(database, fast_job), "fast")

        # the fast delivery ends while the slow attempt (10 s timeout) is still waiting for an answer
        final = asyncio.run(scenario())
        slow_state = final.pop(slow_job)
        assert list(final.values()) == [("delivered", 1)]
        assert fast.requests
        assert slow_state == ("pending", 0)
    finally:
        for connection in held:
            connection.close()
        slow.close()
        fast.close()
