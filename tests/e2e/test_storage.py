"""The blob store on local disk and on an S3-compatible server (moto on loopback), through the same contract;
the storage URL's options; result URLs (presigned or fluxserve's /files) and the /files route on both."""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.errors import BlobNotFound
from fluxserve.settings import Settings
from fluxserve.storage.base import BlobStore
from fluxserve.storage.local import LocalBlobStore
from fluxserve.storage.s3 import S3BlobStore
from fluxserve.wiring import make_blob_store
from tests.conftest import Api, ServerProcess, png_base64
from tests.support.s3_server import (
    CREDENTIALS,
    blob_url,
    endpoint,
    object_keys,
    s3_bucket,
    s3_credentials,
    storage_url,
)

__all__ = ["blob_url", "s3_bucket", "s3_credentials"]  # fixtures


@pytest.fixture
def blobs(blob_url: str) -> BlobStore:
    return make_blob_store(blob_url)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the contract, on both stores ---------------------------------------------------------------------------


def test_put_get_list_delete_and_missing_blobs(blobs: BlobStore) -> None:
    before = time.time()
    blobs.put("inputs/a/x.png", b"12345", "image/png")
    blobs.put("inputs/a/y.png", b"12", "image/png")
    blobs.put("inputs/ab/x.png", b"1", "image/png")  # a sibling folder whose name starts alike
    blobs.put("results/r.png", b"abc", "image/png")
    assert blobs.get("inputs/a/x.png") == b"12345" and blobs.exists("inputs/a/y.png")
    listed = blobs.list("inputs/")
    assert [(info.key, info.size) for info in listed] == [
        ("inputs/a/x.png", 5),
        ("inputs/a/y.png", 2),
        ("inputs/ab/x.png", 1),
    ]
    assert all(before - 2 <= info.modified <= time.time() + 2 for info in listed)  # (S3: whole seconds)
    assert [info.key for info in blobs.list("")] == [info.key for info in listed] + ["results/r.png"]
    assert sorted(info.key for info in blobs.delete_prefix("inputs/a/")) == [
        "inputs/a/x.png",
        "inputs/a/y.png",
    ]
    assert [info.key for info in blobs.list("inputs/")] == ["inputs/ab/x.png"]
    assert blobs.delete_prefix("inputs/a/") == []  # missing: not an error
    assert blobs.list("nothing/") == []
    assert blobs.delete("inputs/nothing.png") is None
    one = blobs.delete("inputs/ab/x.png")
    assert one is not None and (one.key, one.size) == ("inputs/ab/x.png", 1)
    assert not blobs.exists("inputs/ab/x.png")
    with pytest.raises(BlobNotFound):
        blobs.get("inputs/ab/x.png")
    blobs.put("inputs/b/z.png", b"ok", "image/png")  # a folder a sweep removed is there again
    blobs.put("inputs/b/z.png", b"ok2", "image/png")  # and a key is overwritten whole
    assert blobs.get("inputs/b/z.png") == b"ok2"
    assert [info.key for info in blobs.list("")] == ["inputs/b/z.png", "results/r.png"]


@pytest.mark.parametrize("key", ["../x.png", "/abs.png", "a/./b.png", "a/../../b.png", "a\\b.png", ""])
def test_keys_that_could_leave_the_store_are_refused(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.put(key, b"x", "image/png")
    with pytest.raises((ValueError, BlobNotFound)):
        blobs.get(key)


def test_the_disk_store_removes_folders_it_emptied(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    blobs.put("inputs/a/x.png", b"1", "image/png")
    blobs.put("inputs/a/deep/y.png", b"2", "image/png")
    assert len(blobs.delete_prefix("inputs/a/")) == 2
    assert not (tmp_path / "inputs").exists()
    assert blobs.direct_url("inputs/a/x.png", 60) is None  # disk files go through /files only


# --- S3: the storage URL, its options and its URLs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://b/p?endpoint=http://h:1&colour=red", "unknown option(s) colour"),
        ("s3://b/p?urls=public", "urls must be presigned or signed, not 'public'"),
        ("s3:///p", "no bucket"),
        ("s3://b/p?endpoint=ftp://h", "endpoint must be an http(s) URL"),
        ("gs://b/p", "unsupported scheme 'gs' (use file:// or s3://)"),
    ],
)
def test_a_wrong_storage_url_is_named(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"FLUXSERVE_STORAGE_URL: {message}")):
        make_blob_store(url)


def test_objects_land_under_the_prefix_with_their_content_type(s3_bucket: str, s3_credentials: None) -> None:
    blobs = make_blob_store(storage_url(s3_bucket, "deep/prefix"))
    blobs.put("results/one.png", png(), "image/png")
    assert object_keys(s3_bucket, "deep/") == ["deep/prefix/results/one.png"]
    url = blobs.direct_url("results/one.png", 600)
    assert url is not None and url.startswith(f"{endpoint()}/{s3_bucket}/deep/prefix/results/one.png?")
    response = httpx.get(url, timeout=10)  # (moto does not check signatures: what S3 enforces is not proven)
    assert response.status_code == 200 and response.content == png()
    assert response.headers["content-type"] == "image/png"


def test_presigned_urls_last_the_url_ttl_capped_at_seven_days(s3_bucket: str, s3_credentials: None) -> None:
    blobs = make_blob_store(storage_url(s3_bucket, "ttl"))
    for ttl, expected in ((90, "90"), (30 * 86400, "604800")):
        url = blobs.direct_url("results/x.png", ttl)
        assert url is not None and parse_qs(urlsplit(url).query)["X-Amz-Expires"] == [expected]


def test_signed_mode_keeps_the_bucket_private(s3_bucket: str, s3_credentials: None) -> None:
    blobs = make_blob_store(storage_url(s3_bucket, "private", urls="signed"))
    assert isinstance(blobs, S3BlobStore) and blobs.direct_url("results/x.png", 600) is None


def test_a_missing_bucket_fails_writes_and_reads_clearly(s3_credentials: None) -> None:
    blobs = make_blob_store(storage_url("no-such-bucket-here", "p"))
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        blobs.put("results/x.png", b"x", "image/png")
    with pytest.raises(BlobNotFound):
        blobs.get("results/x.png")


# --- result URLs and the /files route, on both stores (in process: the app without workers) ---------------


@pytest.fixture(
    params=[
        "file",
        pytest.param("s3-presigned", marks=pytest.mark.s3),
        pytest.param("s3-signed", marks=pytest.mark.s3),
    ]
)
def app(
    request: pytest.FixtureRequest, tmp_path: Path, s3_bucket: str, s3_credentials: None
) -> Iterator[tuple[TestClient, Services, str]]:
    mode = request.param
    storage = None if mode == "file" else storage_url(s3_bucket, mode, urls=mode.removeprefix("s3-"))
    settings = Settings(data_dir=tmp_path, workers=0, storage_url=storage, public_url="http://testserver")
    with TestClient(create_app(settings)) as client:
        yield client, client.app.state.services, mode  # type: ignore[attr-defined]


def test_result_urls_and_the_files_route(app: tuple[TestClient, Services, str]) -> None:
    client, services, mode = app
    services.blobs.put("results/job.png", png(), "image/png")
    url = services.result_url("results/job.png")
    assert url is not None
    if mode == "s3-presigned":  # straight from the bucket
        assert url.startswith(endpoint()) and "X-Amz-Signature=" in url
        response = httpx.get(url, timeout=10)
    else:  # fluxserve's signed route, reading the blob from disk or from the private bucket
        assert url.startswith("http://testserver/files/results/job.png?expires=")
        response = client.get(url)
    assert response.status_code == 200 and response.content == png()
    assert response.headers["content-type"] == "image/png"
    files_url = "http://testserver" + services.signer.sign("results/job.png")
    forged = files_url.replace("signature=", "signature=x")
    assert client.get(forged).status_code == 403
    services.blobs.delete("results/job.png")
    gone = client.get(files_url)
    assert gone.status_code == 404 and "no longer stored" in gone.json()["message"]


# --- end to end: fluxserve serve on a bucket ---------------------------------------------------------------


def test_serve_on_s3_presigned_and_signed_urls(make_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """A server with a worker keeps inputs and results in the bucket and hands out presigned URLs; a second
    API process on the same database and bucket, with ``urls=signed``, serves the same result through
    its /files route (the bucket private)."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    env = {**CREDENTIALS, "FLUXSERVE_STORAGE_URL": storage_url(s3_bucket, prefix)}
    server: ServerProcess = make_server(env)
    server.start()
    # Started now, it comes up while the first server's worker process is still loading its model.
    replica: ServerProcess = make_server(
        {**env, "FLUXSERVE_STORAGE_URL": storage_url(s3_bucket, prefix, urls="signed")}, server.data_dir
    )
    replica.start("--no-workers")
    api = Api(server.base_url, server.create_key("s3")["key"])
    job_id = api.job(
        "flux-kontext-pro",
        {"prompt": "make it red", "input_image": png_base64((64, 64)), "aspect_ratio": "1:1"},
    )
    done = api.wait(job_id)
    assert done["status"] == "SUCCESS", done
    url = done["data"]["imageUrl"]
    assert url.startswith(f"{endpoint()}/{s3_bucket}/{prefix}/results/") and "X-Amz-Signature=" in url
    image = api.image(done)  # real PNG bytes, straight from the S3 server
    assert image.format == "PNG" and image.size == (1024, 1024)
    keys = object_keys(s3_bucket, f"{prefix}/")
    assert [key for key in keys if "/results/" in key] == [urlsplit(url).path.split(f"/{s3_bucket}/")[1]]
    assert not any("/inputs/" in key for key in keys)  # stored at submit, deleted as the job ended
    assert not (server.data_dir / "files").exists()  # nothing on local disk
    ready = httpx.get(f"{server.base_url}/readyz", timeout=10)  # its worker process wrote its row
    assert ready.status_code == 200 and ready.json()["checks"]["workers"] == "ok (1 live)", ready.text
    # Any replica: the same figures, once its refresh task has read them (every few seconds).
    deadline = time.monotonic() + 30
    succeeded = 'fluxserve_jobs_total{model="flux-kontext-pro",outcome="succeeded"} 1.0'
    while succeeded not in (metrics := httpx.get(f"{replica.base_url}/metrics", timeout=10).text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)
    assert "fluxserve_workers_live 1.0" in metrics

    signed = Api(replica.base_url, api.key).fetch(job_id)["data"]["imageUrl"]
    assert signed.startswith(f"{replica.base_url}/files/results/") and "signature=" in signed
    response = httpx.get(signed, timeout=10)
    assert response.status_code == 200 and response.content == httpx.get(url, timeout=10).content
