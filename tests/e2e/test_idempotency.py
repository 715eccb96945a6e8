"""Idempotency-Key on both dialects' submits, and webhook_url vetted at submit: on a real server (API only,
no workers: the jobs stay queued) over loopback, plus the store's expiry on real SQLite."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, update

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database, utcnow
from fluxserve.db.tables import idempotency_keys, jobs
from fluxserve.errors import IdempotencyConflict
from fluxserve.jobs.store_sql import SqlSubmissions
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore
from tests.conftest import ServerProcess

HEADER = "Idempotency-Key"
BODY = {"prompt": "a red circle", "width": 256, "height": 256, "seed": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """API only, and no private network allowed to webhooks (the test env allows 127.0.0.0/8)."""
    process = ServerProcess(
        tmp_path_factory.mktemp("idem"), models_dir, {"FLUXSERVE_ALLOWED_PRIVATE_NETWORKS": ""}
    )
    process.start("--no-workers")
    yield process
    process.stop()


class Client:
    def __init__(self, server: ServerProcess, credits: str = "10") -> None:
        self.key = server.create_key(credits=credits)["key"]
        self.http = httpx.Client(base_url=server.base_url, timeout=30)

    def reseller(
        self, body: dict[str, Any], key: str | None = None, model: str = "flux-dev"
    ) -> httpx.Response:
        headers = {"TT-API-KEY": self.key, **({HEADER: key} if key is not None else {})}
        return self.http.post(f"/bfl/v1/{model}", json=body, headers=headers)

    def vendor(self, body: dict[str, Any], key: str | None = None, model: str = "flux-dev") -> httpx.Response:
        headers = {"x-key": self.key, **({HEADER: key} if key is not None else {})}
        return self.http.post(f"/v1/{model}", json=body, headers=headers)

    def credits(self) -> float:
        response = self.http.get("/v1/credits", headers={"x-key": self.key})
        assert response.status_code == 200, response.text
        return float(response.json()["credits"])


def job_count(server: ServerProcess) -> int:
    engine = create_engine(f"sqlite:///{server.data_dir / 'fluxserve.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())
    finally:
        engine.dispose()


def test_reseller_repeat_returns_the_same_job_charged_once(server: ServerProcess) -> None:
    client = Client(server)
    first = client.reseller(BODY, key="order-1")
    assert first.status_code == 200, first.text
    # the same request, written differently (numbers as strings, keys reordered): the same job
    again = client.reseller(
        {"seed": "5", "height": 256, "width": "256", "prompt": "a red circle"}, key="order-1"
    )
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert first.json()["status"] == "SUCCESS" and first.json()["data"]["jobId"]
    assert client.credits() == 7.5
    # without the header, or with another one, it is a new job
    assert client.reseller(BODY).json()["data"]["jobId"] != first.json()["data"]["jobId"]
    assert client.reseller(BODY, key="order-2").json()["data"]["jobId"] != first.json()["data"]["jobId"]
    assert client.credits() == 2.5


def test_vendor_repeat_returns_the_same_job_charged_once(server: ServerProcess) -> None:
    client = Client(server)
    first = client.vendor(BODY, key="v-1")
    assert first.status_code == 200, first.text
    assert set(first.json()) == {"id", "polling_url", "cost"}
    again = client.vendor({**BODY, "not_a_field": 1}, key="v-1")  # ignored fields do not count
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert client.credits() == 7.5


def test_the_same_key_for_another_request_is_refused_in_each_dialects_shape(server: ServerProcess) -> None:
    client = Client(server)
    job_id = client.reseller(BODY, key="k-1").json()["data"]["jobId"]
    other = client.reseller({**BODY, "prompt": "a blue square"}, key="k-1")
    assert other.status_code == 422
    assert other.json()["status"] == "FAILED" and other.json()["data"] is None
    assert other.json()["message"].startswith("Idempotency-Key: ")
    assert client.reseller(BODY, key="k-1", model="flux-pro").status_code == 422  # another model
    crossed = client.vendor(BODY, key="k-1")  # another dialect
    assert crossed.status_code == 422
    [item] = crossed.json()["detail"]
    assert item["loc"] == ["header", HEADER] and item["msg"].startswith("Idempotency-Key: ")
    vendor_first = client.vendor(BODY, key="k-2")
    assert client.vendor({**BODY, "seed": 6}, key="k-2").status_code == 422
    assert client.credits() == 10 - 2.5 * 2
    # the refusals changed nothing: the original still answers with its job
    assert client.reseller(BODY, key="k-1").json()["data"]["jobId"] == job_id
    assert client.vendor(BODY, key="k-2").json() == vendor_first.json()


def test_the_key_is_per_api_key(server: ServerProcess) -> None:
    alice, bob = Client(server), Client(server)
    a = alice.reseller(BODY, key="shared").json()["data"]["jobId"]
    b = bob.reseller({**BODY, "prompt": "something else"}, key="shared")
    assert b.status_code == 200, b.text
    assert b.json()["data"]["jobId"] != a
    assert alice.credits() == bob.credits() == 7.5


@pytest.mark.parametrize("value", ["has space", "x" * 256, "tab\there"])
def test_a_bad_header_value_is_a_400_naming_it(server: ServerProcess, value: str) -> None:
    client = Client(server)
    reseller = client.reseller(BODY, key=value)
    assert reseller.status_code == 400
    assert reseller.json()["status"] == "FAILED" and "Idempotency-Key" in reseller.json()["message"]
    vendor = client.vendor(BODY, key=value)
    assert vendor.status_code == 400
    assert "Idempotency-Key" in vendor.json()["detail"]
    assert client.credits() == 10
    assert client.reseller(BODY, key="x" * 255).status_code == 200  # the longest allowed


@pytest.mark.parametrize("dialect", ["reseller", "vendor"])
def test_concurrent_repeats_make_one_job(server: ServerProcess, dialect: str) -> None:
    client = Client(server)
    before = job_count(server)
    answers: list[httpx.Response] = []
    start = threading.Barrier(8)
    path, key_header = (
        ("/bfl/v1/flux-dev", "TT-API-KEY") if dialect == "reseller" else ("/v1/flux-dev", "x-key")
    )

    def send() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            start.wait()
            answers.append(http.post(path, json=BODY, headers={key_header: client.key, HEADER: "race"}))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * 8, [a.text for a in answers]
    ids = {
        answer.json()["data"]["jobId"] if dialect == "reseller" else answer.json()["id"] for answer in answers
    }
    assert len(ids) == 1
    assert job_count(server) == before + 1
    assert client.credits() == 7.5


PRIVATE = [
    "http://169.254.169.254/latest/meta-data/",  # metadata
    "http://10.0.0.7/hook",  # private
    "http://100.64.1.2/hook",  # CGNAT
    "http://127.0.0.1:9/hook",  # loopback, not allowed on this server
    "http://[::1]:9/hook",
    "http://localhost:9/hook",  # a name that resolves to loopback
]


@pytest.mark.parametrize("url", PRIVATE)
def test_a_private_webhook_url_is_refused_at_submit(server: ServerProcess, url: str) -> None:
    client = Client(server)
    reseller = client.reseller({**BODY, "webhook_url": url})
    assert reseller.status_code == 400, reseller.text
    assert (
        reseller.json()["message"].startswith("webhook_url: ") and "not allowed" in reseller.json()["message"]
    )
    vendor = client.vendor({**BODY, "webhook_url": url})
    assert vendor.status_code == 422, vendor.text
    [item] = vendor.json()["detail"]
    assert item["loc"] == ["body", "webhook_url"] and "not allowed" in item["msg"]
    assert client.credits() == 10


def test_a_public_or_unresolvable_webhook_url_is_accepted(server: ServerProcess) -> None:
    client = Client(server)
    for url in ("http://93.184.215.14/hook", "http://no-such-host.invalid/hook"):
        assert client.reseller({**BODY, "webhook_url": url}).status_code == 200
        assert client.vendor({**BODY, "webhook_url": url}).status_code == 200


# In process, on real SQLite and PostgreSQL: the 24-hour window.


def test_an_expired_entry_is_ignored_and_replaced(database_url: str, tmp_path: Path) -> None:
    database = open_database(database_url)
    migrate(database)
    store = SqlSubmissions(database)
    blobs = LocalBlobStore(tmp_path / "files")
    limits = Limits(max_active=24, max_active_per_model={}, max_input_bytes=2**20, max_input_pixels=2**22)
    submitter = Submitter(store, blobs, limits, NetworkPolicy())
    key = KeyStore(database).create("k", Decimal(10)).record

    def submit(prompt: str) -> str:
        params = GenerationParams(model="flux-dev", prompt=prompt, width=256, height=256)
        return submitter.submit(key, params, 1, None, SurfaceName.RESELLER, "again").id

    first = submit("one")
    assert submit("one") == first
    with pytest.raises(IdempotencyConflict):
        submit("two")
    with database.begin() as conn:  # 25 hours pass
        conn.execute(update(idempotency_keys).values(created_at=utcnow() - timedelta(hours=25)))
    second = submit("two")  # not a conflict any more: a new job, and the entry now points at it
    assert second != first
    assert submit("two") == second
    with pytest.raises(IdempotencyConflict):
        submit("one")
    with database.connect() as conn:
        entries = conn.execute(select(idempotency_keys.c.job_id)).scalars().all()
    assert entries == [second]
