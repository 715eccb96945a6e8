"""What one request costs the database, held to a count: a change that adds a round trip fails here.

The app runs in process (starlette's TestClient against ``create_app``) on SQLite and on PostgreSQL; the
statements are counted with SQLAlchemy's ``before_cursor_execute`` event, only those run for the request
being measured (a context variable set around it: the app's background tasks run in other contexts).
Also here: the queue position in claim order, the verified-key cache, and a dead pooled connection.
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, insert, select, text

from fluxserve.accounts.keys import ApiKey, KeyCache, KeyStore
from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.db.connection import database_url, migrate, open_database
from fluxserve.db.tables import jobs
from fluxserve.jobs.store_sql import SqlClaims
from fluxserve.settings import Settings
from fluxserve.wiring import make_stores
from tests.conftest import png_base64

_measuring: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("measuring", default=None)

# The budget of each request, in statements, with the key already verified (the cache). Raise one only
# with a reason: each is a round trip on every request of its kind.
FETCH_RUNNING = 1  # the job row, by id and key
FETCH_QUEUED = 2  # the job row, then the bounded count of the jobs ahead of it
SUBMIT = {"sqlite": 4, "postgresql": 4}  # hold, its ledger entry, limits + turn probe, insert
UPLOAD_ADMISSION = 1  # a submit with an image to decode checks admission once before that work


class _Measure:
    """ASGI wrapper: each request runs in a context where ``_measuring`` is the list of the request being
    measured, or None (the test client's portal thread does not carry the caller's context over)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.current: list[str] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            _measuring.set(self.current)
        await self.app(scope, receive, send)


@dataclass
class Measured:
    client: TestClient
    wrapper: _Measure
    services: Services
    database: Engine
    dialect: str
    announced: threading.Condition
    keys_heard: set[str | None]

    def statements(self, method: str, path: str, **kwargs: Any) -> tuple[Any, list[str]]:
        """The response to one request, and the SQL statements run for it."""
        seen: list[str] = []
        self.wrapper.current = seen
        try:
            response = self.client.request(method, path, **kwargs)
        finally:
            self.wrapper.current = None
        return response, seen


@pytest.fixture
def measured(database_url: str, tmp_path: Path) -> Iterator[Measured]:
    settings = Settings(data_dir=tmp_path / "data", workers=0, database=database_url, max_active_jobs=100)
    app = create_app(settings)
    wrapper = _Measure(app)
    database = app.state.runtime.database

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen = _measuring.get()
        if seen is not None:
            seen.append(statement)

    event.listen(database, "before_cursor_execute", count)
    services = app.state.services
    services.keys.cache = KeyCache(max_age=3600)  # the counts below are of requests with a verified key
    announced = threading.Condition()
    heard: set[str | None] = set()

    def hear(key_id: str | None) -> None:
        with announced:
            heard.add(key_id)
            announced.notify_all()

    app.state.runtime.feed.subscribe_keys(hear)
    with TestClient(wrapper) as client:
        yield Measured(client, wrapper, services, database, database.dialect.name, announced, heard)
    event.remove(database, "before_cursor_execute", count)


def _key(measured: Measured, name: str = "cost") -> str:
    """A new key, once the change feed has announced it: the feed's word that a key changed empties its
    cache entry, so a late announcement would cost a measured request a lookup."""
    new = measured.services.keys.create(name)
    with measured.announced:
        assert measured.announced.wait_for(lambda: new.record.id in measured.keys_heard, timeout=30)
    return new.key


def _submit(measured: Measured, key: str, body: dict[str, Any] | None = None) -> str:
    response = measured.client.post(
        "/bfl/v1/flux-dev", json=body or {"prompt": "a red circle"}, headers={"TT-API-KEY": key}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["jobId"])


def test_a_fetch_is_one_statement_and_a_queued_one_two(measured: Measured) -> None:
    key = _key(measured)
    job_id = _submit(measured, key)
    headers = {"TT-API-KEY": key}
    response, seen = measured.statements("GET", "/flux/fetch", params={"jobId": job_id}, headers=headers)
    assert response.json()["data"]["queuePosition"] == 0
    assert len(seen) == FETCH_QUEUED, seen
    response, seen = measured.statements(
        "GET", "/v1/get_result", params={"id": job_id}, headers={"x-key": key}
    )
    assert response.json()["details"] == {"queue_position": 0}
    assert len(seen) == FETCH_QUEUED, seen

    with measured.database.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status="running"))
    response, seen = measured.statements("GET", "/flux/fetch", params={"jobId": job_id}, headers=headers)
    assert response.json()["status"] == "ON_QUEUE"
    assert len(seen) == FETCH_RUNNING, seen


def test_a_submit_is_one_short_transaction(measured: Measured) -> None:
    key = _key(measured)
    _submit(measured, key)  # the key is verified (and cached) by the first
    headers = {"TT-API-KEY": key}
    response, seen = measured.statements("POST", "/bfl/v1/flux-dev", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200, response.text
    assert len(seen) == SUBMIT[measured.dialect], seen

    body = {"prompt": "x", "input_image": png_base64()}
    response, seen = measured.statements("POST", "/bfl/v1/flux-kontext-pro", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert len(seen) == UPLOAD_ADMISSION + SUBMIT[measured.dialect], seen


def test_a_key_is_read_once_per_request_when_not_cached(measured: Measured) -> None:
    key = _key(measured)
    measured.services.keys.cache.invalidate_all()
    headers = {"TT-API-KEY": key}
    response, seen = measured.statements("POST", "/bfl/v1/flux-dev", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200, response.text
    assert len(seen) == 1 + SUBMIT[measured.dialect], seen  # the guard's read, reused by the route


def test_the_queue_position_is_the_claim_order_across_keys(measured: Measured) -> None:
    """Turns by hand (see ``store_sql._turn``): on an empty queue a1, a2, a3 take turns 0, 1, 2; b1 and
    c1 turn 0; c2 turn 1. Claims take the lowest turn, then the oldest: a1 b1 c1 a2 c2 a3."""
    keys = {name: _key(measured, name) for name in "abc"}
    order = ["a1", "a2", "a3", "b1", "c1", "c2"]
    ids = {name: _submit(measured, keys[name[0]]) for name in order}
    expected = {"a1": 0, "b1": 1, "c1": 2, "a2": 3, "c2": 4, "a3": 5}

    def positions() -> dict[str, int]:
        found = {}
        for name, job_id in ids.items():
            headers = {"TT-API-KEY": keys[name[0]]}
            body = measured.client.get("/flux/fetch", params={"jobId": job_id}, headers=headers).json()
            if body["status"] == "PENDING_QUEUE":
                found[name] = body["data"]["queuePosition"]
        return found

    assert positions() == expected
    claimed = SqlClaims(measured.database).claim("worker")  # a worker, on the same database
    assert claimed is not None and claimed.id == ids["a1"]
    assert positions() == {"b1": 0, "c1": 1, "a2": 2, "c2": 3, "a3": 4}


def test_a_long_queue_is_counted_to_the_cap_only(measured: Measured) -> None:
    key = _key(measured)
    job_id = _submit(measured, key)
    with measured.database.begin() as conn:
        row = dict(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())

    def add_ahead(count: int, start: int) -> None:
        earlier = [
            {
                **row,
                "id": str(uuid.uuid4()),
                "created_at": row["created_at"] - timedelta(seconds=start + n + 1),
            }
            for n in range(count)
        ]
        with measured.database.begin() as conn:
            conn.execute(insert(jobs), earlier)

    def fetched() -> tuple[dict[str, Any], dict[str, Any]]:
        reseller = measured.client.get("/flux/fetch", params={"jobId": job_id}, headers={"TT-API-KEY": key})
        vendor = measured.client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key})
        return reseller.json()["data"], vendor.json()["details"]

    add_ahead(999, 0)
    data, details = fetched()
    assert data["queuePosition"] == 999 and "queuePositionAtLeast" not in data
    assert details == {"queue_position": 999}
    add_ahead(2, 999)
    data, details = fetched()
    assert data["queuePosition"] == 1000 and data["queuePositionAtLeast"] is True
    assert details == {"queue_position": 1000, "queue_position_at_least": True}


# -- the verified-key cache ------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _api_key(key_id: str) -> ApiKey:
    return ApiKey(key_id, key_id, "fs_", "whsec", None, True)


def test_the_cache_trusts_a_key_for_its_max_age_only() -> None:
    clock = _Clock()
    cache = KeyCache(max_age=1.0, clock=clock)
    cache.put("hash", _api_key("k"))
    clock.now = 1.0
    assert cache.get("hash") == _api_key("k")
    clock.now = 1.01
    assert cache.get("hash") is None


def test_the_cache_forgets_what_it_is_told_and_stays_bounded() -> None:
    cache = KeyCache(max_age=60, max_size=2)
    for name in ("a", "b", "c"):
        cache.put(f"hash-{name}", _api_key(name))
    assert cache.get("hash-a") is None  # the least recently verified went first
    assert cache.get("hash-c") == _api_key("c")
    cache.invalidate("c")
    assert cache.get("hash-c") is None and cache.get("hash-b") == _api_key("b")
    cache.invalidate_all()
    assert cache.get("hash-b") is None


def test_a_key_revoked_by_another_replica_is_refused_after_the_max_age(tmp_path: Path) -> None:
    """Two key stores on one database, as two replicas: the one that did not revoke sees it once its
    cache entry is older than the max age (an injected clock: no waiting)."""
    database = open_database(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(database)
    clock = _Clock()
    replica = KeyStore(database, KeyCache(max_age=1.0, clock=clock))
    other = KeyStore(database)
    new = other.create("shared")
    assert replica.authenticate(new.key) is not None
    other.revoke(new.record.id)
    assert replica.authenticate(new.key) is not None  # trusted for up to the max age
    clock.now = 1.5
    assert replica.authenticate(new.key) is None
    assert other.authenticate(new.key) is None  # the revoking store forgot it at once


# -- a dead pooled connection ----------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_pooled_connection_killed_by_the_server_is_replaced_on_the_same_call(postgres_url: str) -> None:
    """No pre-ping: a backend the server terminated is found by the first statement, and the call runs
    again once on a fresh connection (reads, the submit's transaction and the key lookup alike)."""
    database = open_database(postgres_url)
    store = make_stores(database).submissions
    keys = KeyStore(database)
    new = keys.create("reconnect")
    admin = create_engine(database_url(postgres_url), isolation_level="AUTOCOMMIT")

    def kill_pool() -> int:
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'fluxserve' AND datname = current_database()"
                )
            ).scalar_one()
        return int(killed)

    assert store.get("no-such-job") is None  # a pooled connection now
    assert kill_pool() >= 1
    assert store.get("no-such-job") is None
    assert kill_pool() >= 1
    assert store.queue_position("no-such-job") is None
    assert kill_pool() >= 1
    keys.cache.invalidate_all()
    assert keys.authenticate(new.key) is not None
    assert kill_pool() >= 1
    store.admit(new.record.id, "flux-dev", Decimal(1), max_active=10)  # no QuotaExceeded: it was read
    database.dispose()
    admin.dispose()
