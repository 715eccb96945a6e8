"""An upgrade from the release before the surface, store and install work (migration head 0012, commit
bb0b820), on SQLite and on PostgreSQL.

A database is built at 0012 with alembic and filled as that release filled it: keys with credits (finite,
unlimited, revoked), jobs in every state (queued; fetching, leased by an API process that died and not
leased; running on a worker that died; succeeded in both dialects; failed; canceled), their credit ledger,
webhook deliveries (pending, delivered, failed) and an idempotency key. ``fluxserve migrate`` takes it to
head, as an operator would; every row is then where it was. Then a server of this version serves them: it
fetches the finished jobs in their dialects (the result read back from the storage), takes back the dead
worker's job, frees the dead API process's fetch lease, runs every active job to the end and delivers the
pending webhook.

The rows are written against the tables as they were at 0012 (plain SQL, never today's ``db.tables``), and
the checks read the columns a job cannot lose, so the test covers whatever migrations are at head.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from PIL import Image
from standardwebhooks import Webhook

from fluxserve.db.connection import MIGRATIONS
from tests.conftest import FAST_ENV, Api, ServerProcess, http_server
from tests.support.pg_server import PostgresCluster

RELEASE = "0012"  # the migration head of the release before this work
NOW = datetime.now(UTC).replace(microsecond=0)
AGO = NOW - timedelta(hours=1)
SECRET_A, SECRET_B, SECRET_C = "fx-upgrade-key-a-0123456789", "fx-upgrade-key-b-0123456789", "fx-revoked-c"


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


RESULT = _png((10, 200, 30))  # the succeeded jobs' stored results
INPUT = _png((200, 30, 10), (96, 64))  # what the fetching jobs' URLs serve


def _params(model: str, prompt: str, url: str | None = None) -> dict[str, Any]:
    """A job's ``params`` exactly as the 0012 release stored them (GenerationParams.model_dump then)."""
    return {
        "model": model, "prompt": prompt, "width": None if url else 512, "height": None if url else 512,
        "aspect_ratio": None, "output_format": "png", "steps": None, "guidance": None, "interval": None,
        "raw": False, "prompt_upsampling": False, "safety_tolerance": 2,
        "input_images": [{"field": "input_image", "ref": url}] if url else [], "image_prompt": None,
        "image_prompt_strength": None, "top": 0, "bottom": 0, "left": 0, "right": 0,
    }  # fmt: skip


TIME = sa.DateTime(timezone=True)


def _table(name: str, plain: str, **typed: Any) -> sa.TableClause:
    """A table as it was at 0012, with the columns these rows fill: ``plain`` ones (space-separated) take
    their values as they are; ``typed`` ones need SQLAlchemy's type to be stored as the release stored them
    (JSON, times)."""
    return sa.table(
        name, *(sa.column(c) for c in plain.split()), *(sa.column(c, t) for c, t in typed.items())
    )


KEYS = _table(
    "api_keys", "id name key_hash key_prefix webhook_secret active credits_hundredths", created_at=TIME
)
JOBS = _table(
    "jobs",
    "id key_id model dialect status output_format prompt webhook_url result_key error worker_id seed width "
    "height cost_hundredths attempts progress cancel_requested",
    params=sa.JSON(),
    details=sa.JSON(),
    created_at=TIME,
    started_at=TIME,
    finished_at=TIME,
    heartbeat_at=TIME,
)
LEDGER = _table("credit_ledger", "key_id kind job_id model operator amount_hundredths", created_at=TIME)
DELIVERIES = _table(
    "webhook_deliveries",
    "id job_id key_id url status last_error attempts last_status_code",
    next_attempt_at=TIME,
    created_at=TIME,
    delivered_at=TIME,
)
IDEMPOTENCY = _table("idempotency_keys", "key_id idempotency_key request_hash job_id", created_at=TIME)

# What an upgrade must keep of each row (the rest may move: 0014 moves fetch leases to their own columns).
KEPT = {
    "api_keys": ("id", "name", "key_hash", "credits_hundredths", "active", "webhook_secret"),
    "jobs": (
        "id", "key_id", "model", "status", "params", "seed", "width", "height", "output_format", "prompt",
        "cost_hundredths", "webhook_url", "result_key", "error", "attempts", "created_at", "finished_at",
    ),
    "credit_ledger": ("id", "key_id", "kind", "amount_hundredths", "job_id", "model", "operator"),
    "webhook_deliveries": ("id", "job_id", "key_id", "url", "status", "attempts", "last_status_code"),
    "idempotency_keys": ("key_id", "idempotency_key", "request_hash", "job_id"),
}  # fmt: skip
ACTIVE = ("queued", "fetching-leased", "fetching", "running")
PRICES = {"flux-dev": 250, "flux-kontext-pro": 400}  # hundredths, the release's prices


def _webhook_secret(key_id: str) -> str:
    """A key's webhook secret in the release's format (``whsec_`` and 24 bytes in base64)."""
    return "whsec_" + base64.b64encode(key_id.encode().ljust(24, b"-")).decode()


def _key(key_id: str, secret: str, credits: int | None, active: bool = True) -> dict[str, Any]:
    return {
        "id": key_id, "name": key_id, "key_hash": hashlib.sha256(secret.encode()).hexdigest(),
        "key_prefix": secret[:10], "webhook_secret": _webhook_secret(key_id), "active": active,
        "credits_hundredths": credits, "created_at": AGO,
    }  # fmt: skip


def _job(job_id: str, key_id: str, status: str, **values: Any) -> dict[str, Any]:
    model = values.pop("model", "flux-dev")
    url = values.pop("url", None)
    size = None if url else 512  # a URL input's size is known once it is fetched
    return {
        "id": job_id, "key_id": key_id, "model": model, "dialect": "reseller", "status": status,
        "params": _params(model, f"job {job_id}", url), "seed": 7, "width": size, "height": size,
        "output_format": "png", "prompt": f"job {job_id}", "cost_hundredths": PRICES[model],
        "webhook_url": None, "result_key": None, "error": None, "worker_id": None, "attempts": 0,
        "progress": 0.0, "cancel_requested": False, "details": {}, "created_at": AGO, "started_at": None,
        "finished_at": None, "heartbeat_at": None, **values,
    }  # fmt: skip


def _fill(database: sa.Engine, input_url: str, webhook_url: str) -> None:
    """Rows as the 0012 release left them: two keys with work in flight and a history, a revoked one."""
    done = {"started_at": AGO, "finished_at": AGO + timedelta(seconds=5), "progress": 1.0}
    jobs = [
        _job("queued", "key-a", "queued"),
        _job("fetching-leased", "key-a", "fetching", model="flux-kontext-pro", url=input_url,
             worker_id="api-host-9-deadbeef", heartbeat_at=AGO),  # leased by an API process that died
        _job("fetching", "key-a", "fetching", model="flux-kontext-pro", url=input_url),
        _job("running", "key-a", "running", worker_id="gpu-host-9-0", attempts=1, started_at=AGO,
             heartbeat_at=AGO, progress=0.4),  # its worker died
        _job("succeeded", "key-a", "succeeded", result_key="results/2026-01-01/succeeded.png", attempts=1,
             webhook_url=webhook_url, **done),
        _job("failed", "key-a", "failed", error="Internal error while generating", attempts=3, **done),
        _job("canceled", "key-a", "canceled", cancel_requested=True, attempts=1, **done),
        _job("vendor-succeeded", "key-b", "succeeded", dialect="vendor", attempts=1,
             result_key="results/2026-01-01/vendor-succeeded.png", **done),
        _job("revoked-succeeded", "key-c", "succeeded", result_key="results/2026-01-01/revoked.png", **done),
    ]  # fmt: skip
    ledger = [{"key_id": "key-a", "kind": "set", "amount_hundredths": 10_000, "operator": "admin"}]
    for job in jobs:
        entry = {"key_id": job["key_id"], "job_id": job["id"], "model": job["model"]}
        ledger.append({**entry, "kind": "hold", "amount_hundredths": -job["cost_hundredths"]})
        if job["status"] == "succeeded":
            ledger.append({**entry, "kind": "settle", "amount_hundredths": 0})
        elif job["status"] in ("failed", "canceled"):
            ledger.append({**entry, "kind": "refund", "amount_hundredths": job["cost_hundredths"]})
    balance = sum(entry["amount_hundredths"] for entry in ledger if entry["key_id"] == "key-a")
    delivery = {"job_id": "succeeded", "key_id": "key-a", "created_at": AGO, "last_status_code": None}
    with database.begin() as conn:
        conn.execute(
            sa.insert(KEYS),
            [
                _key("key-a", SECRET_A, balance),
                _key("key-b", SECRET_B, None),
                _key("key-c", SECRET_C, 0, False),
            ],
        )
        conn.execute(sa.insert(JOBS), jobs)
        conn.execute(
            sa.insert(LEDGER),
            [{"job_id": None, "model": None, "operator": None, "created_at": AGO, **e} for e in ledger],
        )
        conn.execute(
            sa.insert(DELIVERIES),
            [
                {**delivery, "id": "d-pending", "url": webhook_url, "status": "pending", "attempts": 1,
                 "next_attempt_at": AGO, "last_error": "connection refused", "delivered_at": None},
                {**delivery, "id": "d-delivered", "url": webhook_url, "status": "delivered", "attempts": 1,
                 "next_attempt_at": AGO, "last_error": None, "delivered_at": AGO, "last_status_code": 200},
                {**delivery, "id": "d-failed", "url": "http://127.0.0.1:9/gone", "status": "failed",
                 "attempts": 5, "next_attempt_at": AGO, "last_error": "connection refused",
                 "delivered_at": None},
            ],
        )  # fmt: skip
        conn.execute(
            sa.insert(IDEMPOTENCY),
            [{"key_id": "key-a", "idempotency_key": "order-1", "request_hash": "0" * 64,
              "job_id": "succeeded", "created_at": AGO}],
        )  # fmt: skip


def _upgrade(url: str, revision: str) -> None:
    """alembic ``upgrade`` to ``revision``, as ``fluxserve migrate`` runs it (its script folder)."""
    database = sa.create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    database.dispose()


def _kept(database: sa.Engine) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row of the tables in KEPT, by primary key, with the kept columns (read by reflection, so with
    whatever columns the schema has now); a kept column that is gone fails the test."""
    meta = sa.MetaData()
    meta.reflect(database, only=list(KEPT))
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    with database.connect() as conn:
        for name, columns in KEPT.items():
            table = meta.tables[name]
            missing = set(columns) - set(table.c.keys())
            assert not missing, f"{name}: an upgrade dropped {sorted(missing)}"
            rows[name] = {
                "/".join(str(row[c.name]) for c in table.primary_key): {c: row[c] for c in columns}
                for row in conn.execute(sa.select(table)).mappings()
            }
    return rows


class Recorder(BaseHTTPRequestHandler):
    """Serves the fetching jobs' input image and records the webhooks it receives."""

    webhooks: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    lock = threading.Lock()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(INPUT)))
        self.end_headers()
        self.wfile.write(INPUT)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.webhooks.append((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    Recorder.webhooks = []
    with http_server(Recorder) as base_url:
        yield base_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all: SQLite's new file, or a PostgreSQL database from template0."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fluxserve.db'}"
        return
    postgres: PostgresCluster = request.getfixturevalue("postgres")
    url = postgres.database(empty=True)
    yield url
    postgres.drop(url)


def test_an_upgrade_from_0012_keeps_every_job_where_it_was_and_serves_them(
    empty_database: str, recorder: str, tmp_path: Path, models_dir: Path
) -> None:
    _upgrade(empty_database, RELEASE)
    database = sa.create_engine(empty_database)
    _fill(database, f"{recorder}/input.png", f"{recorder}/hook")
    before = _kept(database)
    blobs = tmp_path / "blobs"
    for job in ("succeeded", "vendor-succeeded"):
        path = blobs / before["jobs"][job]["result_key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(RESULT)
    env = {"FLUXSERVE_DATABASE_URL": empty_database, "FLUXSERVE_STORAGE_URL": f"file://{blobs}"}
    migrated = subprocess.run(
        [sys.executable, "-m", "fluxserve", "migrate", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, **FAST_ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrated.returncode == 0, migrated.stderr

    assert _kept(database) == before  # every job, key, ledger entry and delivery where it was

    server = ServerProcess(tmp_path / "data", models_dir, env)
    server.start()
    try:
        a, b = Api(server.base_url, SECRET_A), Api(server.base_url, SECRET_B)
        succeeded = a.fetch("succeeded")
        assert succeeded["status"] == "SUCCESS"
        assert httpx.get(succeeded["data"]["imageUrl"], timeout=30).content == RESULT
        vendor = b.http.get("/v1/get_result", params={"id": "vendor-succeeded"}, headers={"x-key": SECRET_B})
        assert vendor.status_code == 200, vendor.text
        assert vendor.json()["status"] == "Ready"  # rendered in the dialect it came in
        assert httpx.get(vendor.json()["result"]["sample"], timeout=30).content == RESULT
        assert [a.fetch(job)["status"] for job in ("failed", "canceled")] == ["FAILED", "FAILED"]
        assert a.fetch("failed")["message"] == "Internal error while generating"
        revoked = Api(server.base_url, SECRET_C).http.get(
            "/flux/fetch", params={"jobId": "revoked-succeeded"}
        )
        assert revoked.status_code in (401, 403)  # a revoked key stays revoked

        # The active jobs run to the end: the queued one claimed, the dead worker's taken back, the fetching
        # ones' URL downloaded (the dead API process's lease freed), each charged once.
        assert [a.wait(job, timeout=300)["status"] for job in ACTIVE] == ["SUCCESS"] * len(ACTIVE)
        assert [a.image(a.fetch(job)).size for job in ("queued", "running")] == [(512, 512)] * 2
        for job in ("fetching-leased", "fetching"):
            a.image(a.fetch(job))  # the stored result reads back as an image
        deadline = time.monotonic() + 120
        while not Recorder.webhooks:
            assert time.monotonic() < deadline, "the pending webhook was not delivered"
            time.sleep(0.1)
        [(headers, body)] = Recorder.webhooks
        assert json.loads(body)["jobId"] == "succeeded"
        Webhook(_webhook_secret("key-a")).verify(body, headers)  # signed with the key's secret as before
    finally:
        server.stop()

    after = _kept(database)
    for job in ACTIVE:
        assert after["jobs"][job]["status"] == "succeeded"
        assert after["jobs"][job]["cost_hundredths"] == before["jobs"][job]["cost_hundredths"]
    assert after["jobs"]["running"]["attempts"] == 2  # the dead worker's attempt counts, once
    finished = {job: row for job, row in before["jobs"].items() if job not in ACTIVE}
    assert {job: after["jobs"][job] for job in finished} == finished
    # Holds were taken before the upgrade: the balance is the same, each active job settled once.
    assert after["api_keys"] == before["api_keys"]
    settled = [e["job_id"] for e in after["credit_ledger"].values() if e["kind"] == "settle"]
    assert sorted(settled) == sorted([*ACTIVE, "succeeded", "vendor-succeeded", "revoked-succeeded"])
    balance = sum(e["amount_hundredths"] for e in after["credit_ledger"].values() if e["key_id"] == "key-a")
    assert balance == after["api_keys"]["key-a"]["credits_hundredths"]
    assert after["webhook_deliveries"]["d-pending"]["status"] == "delivered"
    database.dispose()
