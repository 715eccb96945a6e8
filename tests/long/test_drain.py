"""Deploys that drain: SIGTERM makes a worker process (``fluxserve worker``, or the ones ``serve``
supervises) claim nothing more, finish its running jobs within ``FLUXSERVE_WORKER_DRAIN_SECONDS`` and exit;
only the jobs still running after that go back to the queue, at once and without losing an attempt."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import httpx

from tests.conftest import Api, ServerProcess
from tests.e2e.test_lifecycle import slow_env, wait_for
from tests.long.test_recovery import MEDIUM_JOB
from tests.long.test_worker_process import start_worker

# A stale job is requeued only after 10 minutes here: what goes back to the queue, went back by hand-back.
DRAIN_ENV = {"FLUXSERVE_STALE_AFTER_SECONDS": "600"}


def row(server: ServerProcess, job_id: str) -> tuple[str, int, str | None]:
    """The job's status, attempts and worker, as stored."""
    with sqlite3.connect(server.data_dir / "fluxserve.db") as db:
        found = db.execute("SELECT status, attempts, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert found is not None
    return found[0], found[1], found[2]


def stopped_mid_job(server: ServerProcess, exit_within: float) -> tuple[Api, str, str]:
    """On a server without workers, a medium job and one queued behind it; a ``fluxserve worker`` sent
    SIGTERM while it runs the first. Returns once the worker exited 0: the client and the two job ids."""
    server.start("--no-workers")
    client = Api(server.base_url, server.create_key()["key"])
    job_id = client.job("flux-dev", MEDIUM_JOB)
    waiting = client.job("flux-dev", {"prompt": "after", "steps": 1})
    worker = start_worker(server)
    try:
        wait_for(client, job_id, "ON_QUEUE", timeout=120)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=exit_within) == 0
    finally:
        worker.kill()
    return client, job_id, waiting


def test_a_stopped_worker_finishes_its_running_job_and_exits_0(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        {**slow_env(tmp_path), **DRAIN_ENV, "FLUXSERVE_WORKER_DRAIN_SECONDS": "600"}
    )
    client, job_id, waiting = stopped_mid_job(server, exit_within=600)
    assert client.fetch(job_id)["status"] == "SUCCESS"  # ended before the process did
    status, attempts, worker_id = row(server, job_id)
    assert (status, attempts) == ("succeeded", 1) and worker_id is not None
    assert row(server, waiting) == ("queued", 0, None)  # not claimed while draining
    assert "worker process draining" in (server.data_dir / "worker.log").read_text()


def test_a_job_outlasting_the_drain_goes_back_at_once_and_another_worker_ends_it(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        {**slow_env(tmp_path), **DRAIN_ENV, "FLUXSERVE_WORKER_DRAIN_SECONDS": "0.2"}
    )
    client, job_id, waiting = stopped_mid_job(server, exit_within=60)
    # Back in the queue as the process exits (the stale timeout is 10 minutes), its attempt not counted.
    assert row(server, job_id) == ("queued", 0, None)
    assert row(server, waiting) == ("queued", 0, None)
    assert client.fetch(job_id)["status"] == "PENDING_QUEUE"
    second = start_worker(server)
    try:
        body = client.wait(job_id, timeout=300)
        assert body["status"] == "SUCCESS", body
        assert row(server, job_id)[:2] == ("succeeded", 1)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0


def test_a_stopped_server_stops_taking_requests_and_drains_its_workers(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        {**slow_env(tmp_path), **DRAIN_ENV, "FLUXSERVE_WORKER_DRAIN_SECONDS": "600"}
    )
    server.start()
    client = Api(server.base_url, server.create_key()["key"])
    job_id = client.job("flux-dev", MEDIUM_JOB)
    wait_for(client, job_id, "ON_QUEUE", timeout=120)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # the listener closes first; the process lives on while its worker finishes the job
        try:
            httpx.get(f"{server.base_url}/healthz", timeout=1)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "still taking requests 30 s after SIGTERM"
        time.sleep(0.05)
    # uvicorn ends a clean shutdown by dying of the signal it caught, as uvicorn.run does
    assert server.process.wait(timeout=600) == -signal.SIGTERM
    status, attempts, _ = row(server, job_id)
    assert (status, attempts) == ("succeeded", 1)
    log = server.log_path.read_text()
    assert "worker process draining" in log and "handed back" not in log
