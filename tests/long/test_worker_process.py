"""``serve --no-workers`` plus separate ``fluxserve worker`` processes on the same database."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import Api, ServerProcess
from tests.e2e.test_lifecycle import slow_env, wait_for


def start_worker(server: ServerProcess) -> subprocess.Popen[bytes]:
    log = (server.data_dir / "worker.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "fluxserve", "worker", "--data-dir", str(server.data_dir)],
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_separate_worker_runs_jobs_and_a_killed_one_is_replaced(make_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(slow_env(tmp_path))
    server.start("--no-workers")
    client = Api(server.base_url, server.create_key()["key"])
    job_id = client.job("flux-dev", {"prompt": "far away", "width": 1024, "height": 1024, "steps": 30})
    assert client.fetch(job_id)["status"] == "PENDING_QUEUE"

    first = start_worker(server)
    try:
        wait_for(client, job_id, "ON_QUEUE", timeout=120)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    second = start_worker(server)
    try:
        body = client.wait(job_id, timeout=180)
        assert body["status"] == "SUCCESS", body
        assert body["data"]["size"] == "1024x1024"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
