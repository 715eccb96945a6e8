"""Webhooks from the real server to a real receiver: same JSON as fetch, signed, retried."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import Api, ServerProcess


class Receiver:
    """An HTTP endpoint (on loopback unless ``host`` says otherwise) that fails the first ``fail_first``
    deliveries with a 500."""

    def __init__(self, fail_first: int = 0, host: str = "127.0.0.1") -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = 500 if len(receiver.requests) < receiver.fail_first else 200
                receiver.requests.append((dict(self.headers.items()), body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, self.requests

    def close(self) -> None:
        self.server.shutdown()


def delivered(server: ServerProcess, job_id: str, timeout: float = 30) -> int:
    """Wait until the outbox records the job's webhook delivered (no try is made after that, so the
    receiver's list is final); returns the attempts it counted."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(server.data_dir / "fluxserve.db") as db:
            row = db.execute(
                "SELECT status, attempts FROM webhook_deliveries WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is not None and row[0] == "delivered":
            return int(row[1])
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    instance = Receiver(fail_first=2)
    yield instance
    instance.close()


def test_webhook_retries_until_delivered_and_is_signed(server: ServerProcess, receiver: Receiver) -> None:
    key = server.create_key("hooked")
    client = Api(server.base_url, key["key"])
    job_id = client.job("flux-dev", {"prompt": "hook me", "steps": 1, "webhook_url": receiver.url})
    assert delivered(server, job_id) == 3
    assert [code for _, _, code in receiver.requests] == [500, 500, 200]
    # One delivery, three tries: the same webhook-id each time (receivers deduplicate on it), with each
    # try's own timestamp and signature.
    ids = {{n.lower(): v for n, v in headers.items()}["webhook-id"] for headers, _, _ in receiver.requests}
    assert len(ids) == 1 and ids != {""}
    headers, body, _ = receiver.requests[-1]
    lower = {name.lower(): value for name, value in headers.items()}
    payload = Webhook(key["webhook_secret"]).verify(body, lower)
    fetched = client.fetch(job_id)
    assert payload["status"] == "SUCCESS"
    assert payload["jobId"] == job_id
    for field in ("mode", "jobId", "prompt", "quota", "size", "seed", "hookUrl"):
        assert payload["data"][field] == fetched["data"][field]
    assert payload["data"]["hookUrl"] == receiver.url
    with pytest.raises(WebhookVerificationError):
        Webhook(key["webhook_secret"]).verify(body.replace(b"hook me", b"hack me"), lower)
    assert json.loads(body)["data"]["imageUrl"].startswith(server.base_url + "/files/")


def test_failed_job_also_notifies(server: ServerProcess) -> None:
    receiver = Receiver()
    try:
        client = Api(server.base_url, server.create_key()["key"])
        job_id = client.job(
            "flux-kontext-pro",
            {"prompt": "x", "input_image": f"{server.base_url}/files/nope.png", "webhook_url": receiver.url},
        )
        receiver.wait(1)
        payload = json.loads(receiver.requests[0][1])
        assert payload["status"] == "FAILED" and payload["jobId"] == job_id
    finally:
        receiver.close()


def test_dead_webhook_target_does_not_delay_jobs(server: ServerProcess) -> None:
    client = Api(server.base_url, server.create_key()["key"])
    dead = client.job("flux-dev", {"prompt": "x", "steps": 1, "webhook_url": "http://127.0.0.1:9/dead"})
    assert client.wait(dead)["status"] == "SUCCESS"
    after = client.job("flux-dev", {"prompt": "y", "steps": 1})
    assert client.wait(after, timeout=30)["status"] == "SUCCESS"
