"""/healthz, /readyz and /metrics: figures read from the database (SQLite and PostgreSQL), the workers table,
and each readiness failure (database unreachable, storage not writable, no worker heard from)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import Engine, event, update

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.api import ops
from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import jobs, workers
from fluxserve.jobs.stats import Histogram, JobStats
from fluxserve.jobs.store import Claims
from fluxserve.jobs.store_sql import SqlClaims, SqlSubmissions
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.jobs.workers import WorkerRegistry, process_name
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.settings import Settings
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_blob_store
from fluxserve.worker.beacon import Beacon
from tests.conftest import free_port, http_server
from tests.support.s3_server import s3_bucket, s3_credentials, storage_url

__all__ = ["s3_bucket", "s3_credentials"]  # fixtures

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def submit(
    submitter: Submitter, key: ApiKey, model: str = "flux-dev", webhook_url: str | None = None
) -> JobRecord:
    params = GenerationParams.model_validate({"model": model, "prompt": "p", "width": 256, "height": 256})
    return submitter.submit(key, params, 7, webhook_url, SurfaceName.RESELLER)


def run(database: Engine, job_id: str, status: JobStatus, waited: float, ran: float) -> None:
    """Start and end a queued job at chosen times, as a claim and a finish would (the triggers see both)."""
    started = T0 + timedelta(seconds=waited)
    row = jobs.c.id == job_id
    with database.begin() as conn:
        conn.execute(update(jobs).where(row).values(created_at=T0))
        conn.execute(update(jobs).where(row).values(status=JobStatus.RUNNING.value, started_at=started))
        ended = started + timedelta(seconds=ran)
        conn.execute(update(jobs).where(row).values(status=status.value, finished_at=ended))


def claim_and_finish(store: Claims, database: Engine, status: JobStatus, waited: float, ran: float) -> None:
    """Claim a job that waited ``waited`` seconds, and end it (through the store: its webhook is queued)
    ``ran`` seconds after its start, give or take the milliseconds between statements."""
    now = datetime.now(UTC)
    with database.begin() as conn:  # the only queued job of the test's key goes next
        conn.execute(
            update(jobs)
            .where(jobs.c.status == JobStatus.QUEUED.value)
            .values(created_at=now - timedelta(seconds=waited))
        )
    job = store.claim("w-1")
    assert job is not None
    with database.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(started_at=now - timedelta(seconds=ran)))
    assert store.finish(job.id, "w-1", status, error=None if status is JobStatus.SUCCEEDED else "x")


def buckets(histogram: Histogram) -> dict[float, int]:
    return dict(histogram.buckets)


# --- the figures, on SQLite and on PostgreSQL --------------------------------------------------------------


def test_figures_and_live_workers_from_the_database(database_url: str, tmp_path: Path) -> None:
    database = open_database(database_url)
    migrate(database)
    limits = Limits(max_active=24, max_active_per_model={}, max_input_bytes=2**20, max_input_pixels=2**22)
    submitter = Submitter(
        SqlSubmissions(database), LocalBlobStore(tmp_path / "files"), limits, NetworkPolicy()
    )
    key = KeyStore(database).create("k").record
    first, second, third, _ = (submit(submitter, key).id for _ in range(4))
    run(database, first, JobStatus.SUCCEEDED, waited=0.3, ran=4.0)
    run(database, second, JobStatus.SUCCEEDED, waited=40.0, ran=12.5)
    run(database, third, JobStatus.FAILED, waited=2.0, ran=0.7)
    submit(submitter, key, model="flux-kontext-pro")
    registry = WorkerRegistry(database)
    stats = JobStats(database, registry, worker_seen_within=30)

    figures = stats.figures()
    # A status a model's jobs were in stays at 0 (its series does not vanish from Prometheus).
    assert figures.active == {
        ("flux-dev", "queued"): 1,
        ("flux-dev", "running"): 0,
        ("flux-kontext-pro", "queued"): 1,
    }
    assert figures.ended == {("flux-dev", "succeeded"): 2, ("flux-dev", "failed"): 1}
    wait, run_time = figures.queue_wait["flux-dev"], figures.run_time["flux-dev"]
    assert (wait.count, run_time.count) == (3, 3)
    assert wait.total == pytest.approx(42.3) and run_time.total == pytest.approx(17.2)
    assert buckets(wait)[0.5] == 1 and buckets(wait)[2.5] == 2 and buckets(wait)[30.0] == 2
    assert buckets(wait)[60.0] == 3
    assert buckets(run_time)[0.5] == 0 and buckets(run_time)[1.0] == 1 and buckets(run_time)[5.0] == 2
    assert buckets(run_time)[20.0] == 3
    assert "flux-kontext-pro" not in figures.queue_wait  # it never started
    assert figures.webhooks == {} and figures.live_workers == 0

    registry.seen("gpu-host-1-101", threads=1)
    registry.seen("gpu-host-2-202", threads=2)
    registry.seen("gpu-host-1-101", threads=1)  # a second beat refreshes the same row
    assert stats.live_workers() == 2
    with database.begin() as conn:  # one went silent a minute ago (killed: it never removed its row)
        conn.execute(
            update(workers)
            .where(workers.c.id == "gpu-host-2-202")
            .values(seen_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    assert stats.live_workers() == 1
    registry.leave("gpu-host-1-101")
    assert stats.figures().live_workers == 0
    database.dispose()


def test_a_worker_processs_beacon_refreshes_its_row_while_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry reads the test's clock: a stalled process's row is shown stale by moving the clock
    once the beacon has heard "not alive", not by waiting for wall time to pass."""
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    monkeypatch.setattr("fluxserve.jobs.workers.utcnow", lambda: clock[0])
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(database)
    registry = WorkerRegistry(database)
    stalled = threading.Event()
    told_stalled = threading.Semaphore(0)  # released each time the beacon asks and hears "not alive"

    def alive() -> bool:
        if stalled.is_set():
            told_stalled.release()
            return False
        return True

    stop = threading.Event()
    beacon = Beacon(alive, 0.05)
    seen = partial(registry.seen, "h-1", 1)
    beacon.add(seen)
    thread = beacon.start(stop)
    try:
        assert registry.live(30) == 1  # added: seen at once
        stalled.set()  # its database stalled: the row is no longer refreshed and goes stale
        assert told_stalled.acquire(timeout=10)  # the beacon heard it; a round begun before has ended
        clock[0] += timedelta(seconds=1)
        for _ in range(2):  # a whole round between two askings: a signal in it would carry the new time
            assert told_stalled.acquire(timeout=10)
        assert registry.live(0.5) == 0 and registry.live(30) == 1
    finally:  # a failed assertion leaves no beacon running
        stop.set()
        thread.join(timeout=5)
    beacon.remove(seen)
    registry.leave("h-1")  # as the process does on its way out
    assert registry.live(30) == 0


def test_a_failing_beacon_receiver_costs_no_other_its_signal() -> None:
    beacon, touched = Beacon(lambda: True, 0.01), threading.Semaphore(0)

    def broken() -> None:
        raise OSError("the data dir is gone")

    beacon.add(broken)
    beacon.add(touched.release)
    stop = threading.Event()
    thread = beacon.start(stop)
    try:
        for _ in range(3):  # round after round, past the failing one
            assert touched.acquire(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=5)


# --- the routes, in process (the app without workers, on SQLite) ------------------------------------------


class Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class App:
    client: TestClient
    services: Services
    database: Engine


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[object]:
    opened: list[TestClient] = []

    def make(**settings: object) -> App:
        values: dict[str, object] = {
            "data_dir": tmp_path / f"data{len(opened)}",
            "workers": 0,
            "metrics_refresh_seconds": 0.05,
            **settings,
        }
        app = create_app(Settings(**values))  # type: ignore[arg-type]
        client = TestClient(app).__enter__()
        opened.append(client)
        return App(client, app.state.services, app.state.runtime.database)

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_healthz_is_cheap_and_readyz_says_each_check(make_app) -> None:  # type: ignore[no-untyped-def]
    app: App = make_app()
    health = app.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["workers"] == 0
    ready = app.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "storage": "ok", "workers": "ok (none expected in this deployment)"},
    }
    assert app.services.blobs.list("") == []  # the storage probe leaves nothing behind


def test_readyz_needs_a_live_worker_when_workers_are_expected(make_app) -> None:  # type: ignore[no-untyped-def]
    app: App = make_app(expect_workers=True, stale_after_seconds=5)
    missing = app.client.get("/readyz")
    assert missing.status_code == 503
    assert missing.json()["failing"] == ["workers"]
    assert missing.json()["checks"]["workers"] == "no worker process heard from in the last 5 s"
    WorkerRegistry(app.database).seen(process_name(), threads=1)
    ready = app.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["workers"] == "ok (1 live)"


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_readyz_fails_when_storage_is_not_writable(make_app, tmp_path: Path, kind: str, request) -> None:  # type: ignore[no-untyped-def]
    if kind == "file":
        root = tmp_path / "blobs"
        app: App = make_app(storage_url=root.as_uri(), metrics_token=TOKEN)
        assert app.client.get("/readyz").status_code == 200
        shutil.rmtree(root)
        root.write_text("a file where the storage folder was")  # (tests run as root: modes would not stop it)
    else:
        request.getfixturevalue("s3_credentials")
        app = make_app(storage_url=storage_url("fluxserve-no-such-bucket", "p"), metrics_token=TOKEN)
    response = app.client.get("/readyz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["failing"] == ["storage"] and body["checks"]["storage"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    detailed = app.client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert (
        detailed["checks"]["storage"].startswith("unavailable: ") and len(detailed["checks"]["storage"]) > 13
    )


TOKEN = "operators-token-0123456789"


def test_readyz_and_metrics_when_the_database_is_unreachable(tmp_path: Path) -> None:
    """Anonymous callers learn which part is unavailable; the driver's words go only to the token's holder."""
    database = open_database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")
    stats = JobStats(database, WorkerRegistry(database), worker_seen_within=30)
    blobs = make_blob_store((tmp_path / "files").as_uri())
    threads = ThreadPoolExecutor(max_workers=3)
    readiness = ops.Readiness(stats, blobs, True, 30, threads, timeout=10)
    snapshot = ops.MetricsSnapshot(stats, 3600, threads)
    app = FastAPI()
    app.include_router(ops.router(readiness, snapshot, ops.Token(TOKEN), 1))
    client = TestClient(app)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database", "workers"]
    assert body["checks"] == {
        "database": "unavailable",
        "storage": "ok",
        "workers": "unknown: the database is unavailable",
    }
    assert "OperationalError" not in response.text and "127.0.0.1" not in response.text
    for wrong in ("Bearer nope", f"Basic {TOKEN}", TOKEN):
        assert (
            client.get("/readyz", headers={"Authorization": wrong}).json()["checks"]["database"]
            == "unavailable"
        )
    detailed = client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert detailed.status_code == 503
    assert detailed.json()["checks"]["database"].startswith("unavailable: OperationalError: ")
    assert client.get("/healthz").status_code == 200  # alive all the same: nothing to restart
    snapshot.refresh()
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert metrics.status_code == 200
    assert "fluxserve_database_up 0.0" in metrics.text and "fluxserve_jobs_total" not in metrics.text
    threads.shutdown()


def test_readyz_answers_within_its_timeout_when_the_database_hangs(tmp_path: Path) -> None:
    """A database that takes connections and never answers (a listening socket nobody reads): /readyz
    answers 503 after its own timeout, and callers meanwhile share the one probe instead of each adding
    a thread."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        database = open_database(f"postgresql+psycopg://nobody@127.0.0.1:{port}/none?connect_timeout=30")
        stats = JobStats(database, WorkerRegistry(database), worker_seen_within=30)
        threads = ThreadPoolExecutor(max_workers=3, thread_name_prefix="probe")
        readiness = ops.Readiness(stats, make_blob_store((tmp_path / "f").as_uri()), False, 30, threads, 0.5)
        app = FastAPI()
        app.include_router(
            ops.router(readiness, ops.MetricsSnapshot(stats, 3600, threads), ops.Token(None), 0)
        )
        with TestClient(app) as client:
            answers = [client.get("/readyz") for _ in range(4)]
            assert [answer.status_code for answer in answers] == [503] * 4
            assert {answer.json()["checks"]["database"] for answer in answers} == {"unavailable"}
            probes = [thread for thread in threading.enumerate() if thread.name.startswith("probe")]
            assert len(probes) == 2  # the hung database probe, and the storage probe's thread
        threads.shutdown(wait=False)


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_in_prometheus_format(make_app) -> None:  # type: ignore[no-untyped-def]
    app: App = make_app(allowed_private_networks="127.0.0.0/8")
    store = SqlClaims(app.database)  # a worker's, on the app's database
    key = app.services.keys.create("m").record
    with http_server(Hook) as hook:
        for _ in range(3):
            submit(app.services.submitter, key, webhook_url=f"{hook}/done")
        claim_and_finish(store, app.database, JobStatus.SUCCEEDED, waited=1.5, ran=3.0)
        claim_and_finish(store, app.database, JobStatus.FAILED, waited=0.2, ran=0.2)
        WorkerRegistry(app.database).seen("gpu-7-1", threads=1)
        deadline = time.monotonic() + 20
        while (figures := scrape(app.client)).get(
            ("fluxserve_webhooks_total", (("outcome", "delivered"),))
        ) != 2:
            assert time.monotonic() < deadline, figures
            time.sleep(0.1)
    dev = (("model", "flux-dev"),)
    assert figures[("fluxserve_database_up", ())] == 1
    assert figures[("fluxserve_jobs_active", (("model", "flux-dev"), ("status", "queued")))] == 1
    assert figures[("fluxserve_jobs_total", (("model", "flux-dev"), ("outcome", "succeeded")))] == 1
    assert figures[("fluxserve_jobs_total", (("model", "flux-dev"), ("outcome", "failed")))] == 1
    assert figures[("fluxserve_queue_wait_seconds_bucket", (("le", "1"), *dev))] == 1
    assert figures[("fluxserve_queue_wait_seconds_bucket", (("le", "2.5"), *dev))] == 2
    assert figures[("fluxserve_queue_wait_seconds_count", dev)] == 2
    assert figures[("fluxserve_queue_wait_seconds_sum", dev)] == pytest.approx(1.7, abs=0.2)
    assert figures[("fluxserve_run_seconds_bucket", (("le", "0.5"), *dev))] == 1
    assert figures[("fluxserve_run_seconds_bucket", (("le", "+Inf"), *dev))] == 2
    assert figures[("fluxserve_run_seconds_sum", dev)] == pytest.approx(3.2, abs=0.5)
    assert figures[("fluxserve_webhooks_pending", ())] == 0
    assert figures[("fluxserve_workers_live", ())] == 1


class Statements:
    """The SQL statements run on an database, and the thread of each, while listening."""

    def __init__(self, database: Engine) -> None:
        self.threads: list[str] = []
        event.listen(database, "before_cursor_execute", self._record)

    def _record(self, *args: object) -> None:
        self.threads.append(threading.current_thread().name)


def test_a_scrape_runs_no_sql_and_the_token_guards_it(make_app) -> None:  # type: ignore[no-untyped-def]
    """Scrapes answer the last refresh: none of them runs a statement, on any database, however many come.
    With a token set, a scrape without it (or with another) is refused."""
    app: App = make_app(metrics_token=TOKEN, metrics_refresh_seconds=3600)
    ops_database = app.client.app.state.ops_database  # type: ignore[attr-defined]
    first = app.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert first.status_code == 200 and "fluxserve_database_up 1.0" in first.text
    on_requests, on_ops = Statements(app.database), Statements(ops_database)
    for _ in range(16):
        again = app.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert again.status_code == 200 and again.text == first.text
    assert on_ops.threads == []  # (the request database serves the background sweeps, on their threads)
    assert [name for name in on_requests.threads if not name.startswith("asyncio_")] == []
    for refused in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = app.client.get("/metrics", headers=refused)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "fluxserve_" not in response.text


def test_without_a_token_metrics_are_open(make_app) -> None:  # type: ignore[no-untyped-def]
    app: App = make_app()
    deadline = time.monotonic() + 20
    while "fluxserve_database_up 1.0" not in (text := app.client.get("/metrics").text):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert app.client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_a_too_short_token_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="metrics_token"):
        Settings(data_dir=tmp_path, metrics_token="short")
