"""/metrics and /readyz against a real server on a table of finished jobs: a storm of anonymous scrapes (and
scrapes abandoned unread) leaves another key's fetches and the readiness check answering 200."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from fluxserve.accounts.keys import KeyStore
from fluxserve.db.connection import migrate, open_database
from tests.conftest import ServerProcess
from tests.e2e.test_metrics_counters import fill

SCRAPERS = 16


def abandoned_scrape(port: int) -> socket.socket:
    """A scrape whose client sends the request and never reads the answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_a_scrape_storm_leaves_fetches_and_readyz_answering(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    database = open_database(f"sqlite:///{data / 'fluxserve.db'}")
    migrate(database)
    fill(database, KeyStore(database).create("history").record.id, 5_000)
    database.dispose()
    server: ServerProcess = make_server({"FLUXSERVE_METRICS_REFRESH_SECONDS": "0.5"}, data_dir=data)
    server.start("--no-workers")
    key = server.create_key()["key"]
    client = httpx.Client(base_url=server.base_url, headers={"TT-API-KEY": key}, timeout=30)
    submitted = client.post("/bfl/v1/flux-dev", json={"prompt": "p", "width": 256, "height": 256})
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["data"]["jobId"]

    stop = threading.Event()

    def scrape() -> list[int]:
        statuses = []
        with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
            while not stop.is_set():
                statuses.append(anonymous.get("/metrics").status_code)
        return statuses

    abandoned = [abandoned_scrape(server.port) for _ in range(SCRAPERS)]
    fetches: list[int] = []
    ready: list[Any] = []
    with ThreadPoolExecutor(SCRAPERS) as pool:
        storm = [pool.submit(scrape) for _ in range(SCRAPERS)]
        try:
            for _ in range(20):
                fetches.append(client.get("/flux/fetch", params={"jobId": job_id}).status_code)
                answer = httpx.get(f"{server.base_url}/readyz", timeout=30)
                ready.append((answer.status_code, answer.json()["checks"]["database"]))
        finally:
            stop.set()
        scrapes = [status for each in storm for status in each.result()]
    for sock in abandoned:
        sock.close()
    assert fetches == [200] * 20
    assert ready == [(200, "ok")] * 20
    assert len(scrapes) >= SCRAPERS and set(scrapes) == {200}
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert 'fluxserve_jobs_total{model="flux-dev",outcome="failed"} 1250.0' in text
