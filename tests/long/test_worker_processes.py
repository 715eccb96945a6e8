"""Models run in worker processes that ``serve`` supervises: a worker killed or hung mid-job costs that job
an attempt, never the API, and the supervisor starts another."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, ServerProcess, catalog_env
from tests.e2e.test_lifecycle import slow_env, wait_for
from tests.long.test_recovery import MEDIUM_JOB


def worker_pids(server: ServerProcess) -> list[int]:
    """The server's live child processes: its supervised workers."""
    assert server.process is not None
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == server.process.pid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class HealthProbe:
    """Asks /healthz every 20 ms in a thread and keeps each answer's latency."""

    def __init__(self, base_url: str) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)

    def _run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=5) as http:
            while not self._stop.wait(0.02):
                started = time.monotonic()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError as error:
                    ok, error_text = False, repr(error)
                else:
                    error_text = "not 200"
                self.latencies.append(time.monotonic() - started)
                if not ok:
                    self.failures.append(error_text)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_sigkill_of_a_worker_process_mid_job(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(slow_env(tmp_path))
    server.start()
    client = Api(server.base_url, server.create_key("k", credits="10")["key"])
    job_id = client.job("flux-dev", {**MEDIUM_JOB, "seed": 3})
    with HealthProbe(server.base_url) as probe:
        wait_for(client, job_id, "ON_QUEUE", timeout=120)
        (victim,) = worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        body = client.wait(job_id, timeout=240)
    assert body["status"] == "SUCCESS", body
    assert body["data"]["quota"] == "2.5"
    (replacement,) = worker_pids(server)
    assert replacement != victim
    # The API never stalled: every probe answered, typically in a few milliseconds.
    assert probe.failures == [] and len(probe.latencies) > 50
    assert statistics.median(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]
    # Exactly once: one result file, charged once, and the job's second attempt is the one that ran.
    results = list((server.data_dir / "files" / "results").rglob(f"{job_id}.*"))
    assert len(results) == 1
    keys = server.cli("keys", "list")
    assert '"credits": "7.5"' in keys


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An 'upstream' that accepts connections and never answers: a relay engine hangs on it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_hung_engine_costs_its_job_and_not_the_api(make_server, tmp_path: Path, black_hole: str) -> None:  # type: ignore[no-untyped-def]
    catalog = tmp_path / "hang.toml"
    catalog.write_text(
        '[models."flux-pro-1.1"]\nengine = "relay"\n[models."flux-pro-1.1".options]\n'
        f'base_url = "{black_hole}"\napi_key_env = "HANG_KEY"\nrequest_timeout = 600\nretries = 0\n'
    )
    env = {
        **catalog_env(catalog),
        "HANG_KEY": "k",
        "FLUXSERVE_ENGINE_STALL_SECONDS": "2",
        "FLUXSERVE_MAX_ATTEMPTS": "1",
    }
    server: ServerProcess = make_server(env)
    server.start()
    client = Api(server.base_url, server.create_key()["key"])
    with HealthProbe(server.base_url) as probe:
        (first,) = worker_pids(server)
        hung = client.job("flux-pro-1.1", {"prompt": "never answered", "width": 256, "height": 256})
        body = client.wait(hung, timeout=180)
    assert body["status"] == "FAILED", body
    assert "stopped or hung" in body["message"] and "no progress" in body["message"]
    assert body["data"]["quota"] == "0"
    assert probe.failures == []
    log = server.log_path.read_text()
    assert "stopped reporting" in log  # the supervisor killed the hung process...
    assert worker_pids(server) != [first]  # ...and started another, which serves the next job
    after = client.wait(client.job("flux-dev", {"prompt": "after", "width": 256, "height": 256, "steps": 1}))
    assert after["status"] == "SUCCESS", after
