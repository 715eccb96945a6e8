"""Fixtures that run fluxserve as users do: a real ``fluxserve serve`` process on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

# The throwaway PostgreSQL cluster, and the database_url and database fixtures (SQLite and PostgreSQL).
pytest_plugins = ["tests.support.pg_server"]

TINY_CATALOG = Path(__file__).parent / "support" / "tiny_catalog.toml"
FAST_ENV = {
    "FLUXSERVE_CATALOG": str(TINY_CATALOG),
    "FLUXSERVE_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
    "FLUXSERVE_HEARTBEAT_SECONDS": "0.3",
    "FLUXSERVE_STALE_AFTER_SECONDS": "2",
    "FLUXSERVE_POLL_SECONDS": "0.05",
    "FLUXSERVE_WEBHOOK_BACKOFF": "0.2,0.4,0.8,1.2,1.6",
    "FLUXSERVE_WEBHOOK_TIMEOUT_SECONDS": "2",
}


def catalog_env(catalog: Path) -> dict[str, str]:
    """Server environment with a test's catalog file layered over the tiny one."""
    return {"FLUXSERVE_CATALOG": os.pathsep.join((str(TINY_CATALOG), str(catalog)))}


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a loopback port in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``fluxserve serve`` in a subprocess; can be killed with SIGKILL and started again on its data."""

    def __init__(self, data_dir: Path, models_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_ENV, "FLUXSERVE_MODELS_DIR": str(models_dir), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "fluxserve", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def create_key(self, name: str | None = None, credits: str | None = None) -> dict[str, Any]:
        """A new key; unnamed ones get a fresh name (a name names one live key)."""
        args = ["keys", "create", "--name", name or f"test-{uuid.uuid4().hex[:8]}", "--json"]
        if credits is not None:
            args += ["--credits", credits]
        return json.loads(self.cli(*args))

    def start(self, *extra: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fluxserve", "serve",
                "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir), *extra,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Api:
    """A reseller-dialect client bound to one key."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.http = httpx.Client(base_url=base_url, headers={"TT-API-KEY": key}, timeout=30)

    def submit(self, model: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/bfl/v1/{model}", json=body)

    def job(self, model: str, body: dict[str, Any]) -> str:
        response = self.submit(model, body)
        assert response.status_code == 200, response.text
        return response.json()["data"]["jobId"]

    def fetch(self, job_id: str) -> dict[str, Any]:
        response = self.http.get("/flux/fetch", params={"jobId": job_id})
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.fetch(job_id)
            if body["status"] in ("SUCCESS", "FAILED"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {body}")

    def image(self, body: dict[str, Any]) -> Image.Image:
        response = httpx.get(body["data"]["imageUrl"], timeout=30)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(response.content))
        image.load()
        return image


def png_base64(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Torch in the test process on one thread: on a shared 2-core machine two OpenMP threads spin against
    the servers' and run the tiny pipeline some 30x slower than one thread does."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are made once per test session and shared by every server."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """One shared server with workers, for tests that do not restart or reconfigure it."""
    process = ServerProcess(tmp_path_factory.mktemp("server"), models_dir)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api(server: ServerProcess) -> Api:
    return Api(server.base_url, server.create_key("shared")["key"])


@pytest.fixture
def make_server(tmp_path: Path, models_dir: Path) -> Iterator[Any]:
    """Start servers with their own data dir and settings; all are stopped after the test."""
    started: list[ServerProcess] = []

    def make(env: dict[str, str] | None = None, data_dir: Path | None = None) -> ServerProcess:
        process = ServerProcess(data_dir or tmp_path / f"data{len(started)}", models_dir, env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier is the folder (unit, e2e, long); the backend marks let ``make test-fast`` keep a unit
    test's SQLite and disk runs. A unit test may not start a server or build models: that makes it e2e."""
    unit = Path(__file__).parent / "unit"
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "models_dir" in fixtures and item.path.is_relative_to(unit):
            raise pytest.UsageError(f"{item.nodeid} starts a server or builds models: move it to tests/e2e")
        # A test on the throwaway PostgreSQL or S3 server: make test-fast keeps to SQLite and disk.
        if "postgres" in fixtures:
            item.add_marker(pytest.mark.postgres)
        if "s3_bucket" in fixtures or "s3_credentials" in fixtures:
            item.add_marker(pytest.mark.s3)
