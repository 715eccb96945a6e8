"""Keys: required, checked, and scoped to their own jobs. Result URLs: signed and tamper-proof."""

from __future__ import annotations

import hashlib
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from fluxserve.accounts.keys import CACHE_MAX_AGE
from tests.conftest import Api, ServerProcess


@pytest.mark.parametrize("headers", [{}, {"TT-API-KEY": ""}, {"TT-API-KEY": "fs_wrong"}])
def test_missing_or_wrong_key_is_401(server: ServerProcess, headers: dict[str, str]) -> None:
    for method, path, kwargs in (
        ("POST", "/bfl/v1/flux-dev", {"json": {"prompt": "x"}}),
        ("POST", "/bfl/v1/flux-kontext-max", {"json": {}}),
        ("GET", "/flux/fetch?jobId=x", {}),
        ("POST", "/flux/fetch", {"json": {"jobId": "x"}}),
    ):
        response = httpx.request(method, server.base_url + path, headers=headers, **kwargs)
        assert response.status_code == 401, (path, response.text)
        body = response.json()
        assert body["status"] == "FAILED" and body["data"] is None
        assert "TT-API-KEY" in body["message"]


def test_a_key_sees_only_its_own_jobs(server: ServerProcess, api: Api) -> None:
    job_id = api.job("flux-dev", {"prompt": "mine", "steps": 1})
    other = Api(server.base_url, server.create_key("other")["key"])
    response = other.http.get("/flux/fetch", params={"jobId": job_id})
    assert response.status_code == 404
    assert api.fetch(job_id)["jobId"] == job_id


def test_revoked_key_stops_working(server: ServerProcess) -> None:
    key = server.create_key("short-lived")
    client = Api(server.base_url, key["key"])
    assert client.submit("flux-dev", {"prompt": "x", "steps": 1}).status_code == 200
    server.cli("keys", "revoke", "short-lived")
    time.sleep(CACHE_MAX_AGE + 0.1)  # the API process trusts a verified key this long, no longer
    assert client.submit("flux-dev", {"prompt": "x", "steps": 1}).status_code == 401


def test_keys_are_stored_hashed(server: ServerProcess) -> None:
    key = server.create_key("hashed")["key"]
    # The database with its write-ahead log, where a new row lives until a checkpoint: the row is found
    # (its hash and its shown prefix), so the check reads the right bytes, and the key itself is not.
    stored = b"".join(path.read_bytes() for path in server.data_dir.glob("fluxserve.db*"))
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored
    assert key[:10].encode() in stored
    assert key.encode() not in stored


def test_signed_url_refuses_tampering(api: Api) -> None:
    body = api.wait(api.job("flux-dev", {"prompt": "x", "width": 256, "height": 256, "steps": 1}))
    url = body["data"]["imageUrl"]
    assert httpx.get(url).status_code == 200
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    signature, expires = query["signature"][0], query["expires"][0]
    forged_signature = ("A" if signature[0] != "A" else "B") + signature[1:]
    tampered = [
        f"{base}?expires={expires}&signature={forged_signature}",
        f"{base}?expires={int(expires) + 3600}&signature={signature}",
        f"{base.replace('.png', '.jpeg')}?expires={expires}&signature={signature}",
        f"{base}?expires={expires}",
        base,
    ]
    for candidate in tampered:
        response = httpx.get(candidate)
        assert response.status_code == 403, candidate
        assert response.json()["status"] == "FAILED"


def test_expired_url_is_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    # Long enough for a fresh URL to be used within its life on a busy machine, short enough to wait out.
    server = make_server({"FLUXSERVE_URL_TTL_SECONDS": "4", "FLUXSERVE_RESULT_TTL_SECONDS": "600"})
    server.start()
    client = Api(server.base_url, server.create_key()["key"])
    body = client.wait(client.job("flux-dev", {"prompt": "x", "width": 256, "height": 256, "steps": 1}))
    time.sleep(4.2)
    response = httpx.get(body["data"]["imageUrl"])
    assert response.status_code == 403
    fresh = client.fetch(body["jobId"])["data"]["imageUrl"]
    assert httpx.get(fresh).status_code == 200
