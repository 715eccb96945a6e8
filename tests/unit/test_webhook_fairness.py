"""Webhook fairness in the dispatcher, on real SQLite and real loopback sockets: one key's targets that
never answer do not delay another key's webhook; per-host caps; a policy refusal is final; a target whose
connections keep failing is paused without holding other deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from fluxserve.db.connection import as_utc, migrate, open_database, utcnow
from fluxserve.db.outbox import enqueue
from fluxserve.db.tables import api_keys, jobs, webhook_deliveries
from fluxserve.jobs.store_sql import SqlJobReads
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from fluxserve.webhooks.delivery import Payload, WebhookDispatcher
from fluxserve.webhooks.signing import new_secret
from tests.e2e.test_webhooks_e2e import Receiver
from tests.unit.test_webhook_dispatcher import running

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))
DEADLINE = 20.0


@pytest.fixture
def database(database_url: str) -> Engine:
    database = open_database(database_url)
    migrate(database)
    return database


def add_key(database: Engine, name: str) -> str:
    with database.begin() as conn:
        conn.execute(
            insert(api_keys).values(
                id=name, name=name, key_hash=f"h-{name}", key_prefix="p", webhook_secret=new_secret(),
                active=True, credits_hundredths=None, created_at=utcnow(),
            )
        )  # fmt: skip
    return name


def add_delivery(database: Engine, key_id: str, url: str) -> str:
    job_id = str(uuid.uuid4())
    with database.begin() as conn:
        conn.execute(
            insert(jobs).values(
                id=job_id, key_id=key_id, model="flux-dev", status="succeeded", params={}, seed=1,
                output_format="png", prompt="p", cost_hundredths=250, progress=1.0, details={},
                attempts=1, cancel_requested=False, created_at=utcnow(),
            )
        )  # fmt: skip
        enqueue(conn, job_id, key_id, url)
    return job_id


def rows(database: Engine) -> dict[str, dict[str, Any]]:
    with database.connect() as conn:
        found = conn.execute(select(webhook_deliveries)).mappings().all()
    return {row["job_id"]: dict(row) for row in found}


class BlackHole:
    """A listening socket on ``host`` that accepts connections and never answers; counts them."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.held.append(self.sock.accept()[0])

    @property
    def connections(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self._stop.set()
        for connection in self.held:
            connection.close()
        self.sock.close()


@pytest.fixture
def holes() -> Iterator[Callable[[str], BlackHole]]:
    made: list[BlackHole] = []

    def make(host: str = "127.0.0.1") -> BlackHole:
        made.append(BlackHole(host))
        return made[-1]

    yield make
    for hole in made:
        hole.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    instance = Receiver()
    yield instance
    instance.close()


async def until(task: asyncio.Task[None], condition: Callable[[], bool], what: str, within: float) -> float:
    """Wait (polling off the event loop) for ``condition``; returns the seconds it took, fails after
    ``within``."""
    start = time.monotonic()
    while not await asyncio.to_thread(condition):
        if task.done():
            task.result()
            raise AssertionError(f"the dispatcher stopped before {what}")
        assert time.monotonic() - start < within, f"no {what} within {within:g} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def dispatcher(database: Engine, **options: Any) -> WebhookDispatcher:
    settings: dict[str, Any] = {"backoff": (5.0,), "timeout": 15.0, "poll_seconds": 0.05, **options}
    jobs = SqlJobReads(database)
    return WebhookDispatcher(
        database, jobs, lambda job: Payload({"jobId": job.id}), policy=LOOPBACK, **settings
    )


def test_black_holes_of_one_key_do_not_delay_another_keys_webhook(
    database: Engine, holes: Callable[[str], BlackHole], receiver: Receiver
) -> None:
    alice, bob = add_key(database, "alice"), add_key(database, "bob")
    # Eight targets that accept and never answer, each on its own host, so only the per-key cap can
    # keep alice's deliveries from filling all eight slots (the dispatcher's old default concurrency).
    targets = [holes(f"127.0.0.{n}") for n in range(2, 10)]
    alice_jobs = [add_delivery(database, alice, hole.url) for hole in targets]

    async def scenario() -> float:
        async with running(dispatcher(database, concurrency=8, timeout=15.0)) as task:
            await until(task, lambda: sum(h.connections for h in targets) >= 4, "alice in flight", DEADLINE)
            bob_job = add_delivery(database, bob, receiver.url)
            took = await until(
                task, lambda: rows(database)[bob_job]["status"] == "delivered", "bob's delivery", DEADLINE
            )
            await asyncio.sleep(0.3)  # a fifth connection of alice's would show by now
            assert sum(hole.connections for hole in targets) == 4  # per_key=4
            return took

    took = asyncio.run(scenario())
    assert took < 3.0, f"bob's webhook took {took:.1f} s behind alice's black holes (15 s timeout)"
    assert len(receiver.requests) == 1
    state = rows(database)
    assert all(state[job]["status"] == "pending" and state[job]["attempts"] == 0 for job in alice_jobs)


def test_one_host_gets_at_most_two_deliveries_at_once(
    database: Engine, holes: Callable[[str], BlackHole], receiver: Receiver
) -> None:
    hole = holes("127.0.0.2")
    keys = [add_key(database, f"key{n}") for n in range(6)]
    for key in keys[:5]:  # five keys, so the per-key cap is not what limits them
        add_delivery(database, key, f"{hole.url}?{key}")

    async def scenario() -> None:
        async with running(dispatcher(database)) as task:
            await until(task, lambda: hole.connections >= 2, "two connections", DEADLINE)
            other = add_delivery(database, keys[5], receiver.url)
            await until(task, lambda: rows(database)[other]["status"] == "delivered", "delivery", 3.0)
            await asyncio.sleep(0.3)
            assert hole.connections == 2

    asyncio.run(scenario())


def test_a_delivery_refused_by_policy_is_not_retried(database: Engine, receiver: Receiver) -> None:
    key = add_key(database, "k")
    job_id = add_delivery(database, key, receiver.url)
    closed = WebhookDispatcher(
        database, SqlJobReads(database), lambda job: Payload({"jobId": job.id}), policy=NetworkPolicy(),
        backoff=(0.05, 0.05, 0.05), poll_seconds=0.05,
    )  # fmt: skip

    async def scenario() -> None:
        async with running(closed) as task:
            await until(task, lambda: rows(database)[job_id]["status"] != "pending", "outcome", DEADLINE)
            await asyncio.sleep(0.3)  # three retries 0.05 s apart would have happened by now

    asyncio.run(scenario())
    row = rows(database)[job_id]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "not allowed" in row["last_error"]
    assert receiver.requests == []


def test_a_target_that_keeps_failing_is_paused_without_holding_others(
    database: Engine, receiver: Receiver
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connections are refused at once
        probe.bind(("127.0.0.3", 0))
        dead = f"http://127.0.0.3:{probe.getsockname()[1]}/hook"
    keys = [add_key(database, f"key{n}") for n in range(7)]
    dead_jobs = [add_delivery(database, key, dead) for key in keys[:6]]

    async def scenario() -> None:
        async with running(dispatcher(database, backoff=(5.0,))) as task:

            def attempted() -> bool:
                return sum(rows(database)[job]["attempts"] for job in dead_jobs) >= 3

            await until(task, attempted, "three failed attempts", DEADLINE)
            healthy = add_delivery(database, keys[6], receiver.url)
            await until(task, lambda: rows(database)[healthy]["status"] == "delivered", "delivery", 3.0)
            await asyncio.sleep(0.5)  # the remaining dead deliveries would have been tried by now

    asyncio.run(scenario())
    state = rows(database)
    attempts = [state[job]["attempts"] for job in dead_jobs]
    # three connection failures in a row pause the target: at most two more were in flight by then
    assert sum(attempts) <= 4, attempts
    untried = [state[job] for job in dead_jobs if state[job]["attempts"] == 0]
    assert len(untried) >= 2
    now = utcnow()
    for row in untried:  # deferred past the pause (5 s, the first backoff), not failed
        assert row["status"] == "pending"
        assert as_utc(row["next_attempt_at"]) > now
