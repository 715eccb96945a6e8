"""The webhook dispatcher on its own: durable rows, backoff to failure, slow targets in parallel."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select

from fluxserve.jobs.database import make_engine, migrate, utcnow
from fluxserve.jobs.tables import api_keys, jobs, webhook_deliveries
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.webhooks.delivery import WebhookDispatcher, enqueue
from fluxserve.webhooks.signing import new_secret
from tests.test_webhooks_e2e import Receiver

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))


@pytest.fixture
def database(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'hooks.db'}")
    migrate(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(api_keys).values(
                id="k", name="k", key_hash="h", key_prefix="p", webhook_secret=new_secret(), active=True,
                credits_hundredths=None, created_at=now,
            )
        )  # fmt: skip
    return engine


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


async def run_for(dispatcher: WebhookDispatcher, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task


def dispatcher(
    database: Engine, backoff: tuple[float, ...] = (0.1, 0.1), timeout: float = 5
) -> WebhookDispatcher:
    return WebhookDispatcher(
        database, lambda job_id: {"jobId": job_id}, policy=LOOPBACK, backoff=backoff, timeout=timeout,
        poll_seconds=0.05,
    )  # fmt: skip


def test_dead_target_fails_after_the_schedule(database: Engine) -> None:
    job_id = add_delivery(database, "http://127.0.0.1:9/dead")
    asyncio.run(run_for(dispatcher(database, backoff=(0.05, 0.05, 0.05)), 2))
    assert states(database)[job_id] == ("failed", 4)


def test_a_pending_delivery_survives_a_stopped_dispatcher(database: Engine) -> None:
    receiver = Receiver(fail_first=1)
    try:
        job_id = add_delivery(database, receiver.url)
        asyncio.run(run_for(dispatcher(database, backoff=(0.5,)), 0.3))
        assert states(database)[job_id] == ("pending", 1)
        asyncio.run(run_for(dispatcher(database, backoff=(0.5,)), 1.5))  # a new process, say
        assert states(database)[job_id] == ("delivered", 2)
    finally:
        receiver.close()


def test_private_target_is_refused_without_the_switch(database: Engine) -> None:
    receiver = Receiver()
    try:
        job_id = add_delivery(database, receiver.url)
        closed = WebhookDispatcher(
            database, lambda job_id: {"jobId": job_id}, policy=NetworkPolicy(), backoff=(), poll_seconds=0.05
        )
        asyncio.run(run_for(closed, 0.5))
        assert states(database)[job_id] == ("failed", 1)
        assert receiver.requests == []
    finally:
        receiver.close()


def test_a_slow_target_does_not_hold_up_a_fast_one(database: Engine) -> None:
    slow = socket.socket()  # accepts connections, never answers
    slow.bind(("127.0.0.1", 0))
    slow.listen()
    fast = Receiver()
    try:
        slow_job = add_delivery(database, f"http://127.0.0.1:{slow.getsockname()[1]}/slow")
        fast_job = add_delivery(database, fast.url)
        # the slow attempt runs into its 3 s timeout; the fast one must be done within this 1 s run
        asyncio.run(run_for(dispatcher(database, timeout=3), 1.0))
        assert states(database)[fast_job] == ("delivered", 1)
        assert fast.requests
        assert states(database)[slow_job][0] == "pending"
    finally:
        slow.close()
        fast.close()
