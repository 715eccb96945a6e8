"""Retention: input images go when their job ends, results go after the result TTL (the job's row stays and
reads as expired in both dialects), ``fluxserve prune`` does the sweep by hand, and disk use stays bounded.
The in-process tests run on each blob store: a folder, and a bucket of an S3 server on loopback (moto).

In-process tests run the real worker, store and blob store on SQLite and disk (``test_worker_inprocess``'s
world); the end-to-end one runs ``fluxserve serve`` on loopback with a short TTL and a fast sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from fluxserve.accounts.keys import ApiKey
from fluxserve.api import reseller
from fluxserve.api.deps import Services
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.db.tables import jobs
from fluxserve.errors import EngineError, JobCanceled
from fluxserve.finetunes.store import FinetuneStore
from fluxserve.jobs.predictions import PredictionStore
from fluxserve.jobs.retention import Retention
from fluxserve.jobs.store import Reaped
from fluxserve.settings import Settings
from fluxserve.storage.base import BlobStore
from fluxserve.storage.signing import UrlSigner
from fluxserve.surfaces.reseller import render_job
from fluxserve.surfaces.vendor import render_result
from fluxserve.wiring import make_blob_store
from tests.conftest import Api, ServerProcess, png_base64
from tests.support.s3_server import blob_url, s3_bucket, s3_credentials
from tests.unit import test_worker_inprocess
from tests.unit.test_worker_inprocess import Scripted, World, paint, raising, run_one

__all__ = ["blob_url", "s3_bucket", "s3_credentials"]  # fixtures

world = test_worker_inprocess.world  # the fixture: SQLite or PostgreSQL, files in tmp_path, a worker on them


@pytest.fixture
def blobs(request: pytest.FixtureRequest, blob_url: str) -> BlobStore:
    """The world's blob store, on disk and on S3 (overrides test_worker_inprocess's folder). S3 runs with
    SQLite only: retention reads the job store and the blob store apart, so the other pairing adds nothing."""
    params = request.node.callspec.params
    if params.get("blob_url") == "s3" and params.get("database_url") == "postgresql":
        pytest.skip("S3 is run with SQLite")
    return make_blob_store(blob_url)


def stored(blobs: BlobStore) -> list[str]:
    return [info.key for info in blobs.list("")]


def submit_with_image(world: World, key: ApiKey) -> JobRecord:
    """A kontext job with an uploaded image, stored under inputs/<job_id>/ at submit."""
    params = GenerationParams(
        model="flux-kontext-pro",
        prompt="edit",
        input_images=[ImageRef(field="input_image", ref=png_base64((64, 64)))],
    )
    job = world.submitter.submit(key, params, 1, None, SurfaceName.RESELLER)
    assert world.blobs.list(f"inputs/{job.id}/"), "the upload was stored at submit"
    return job


def services(world: World) -> Services:
    return Services(
        keys=world.keys,
        jobs=world.stores.submissions,
        submitter=world.submitter,
        blobs=world.blobs,
        signer=UrlSigner("secret", 3600),
        base_url="http://testserver",
        finetunes=FinetuneStore(world.database, world.blobs),
        predictions=PredictionStore(world.database, world.stores.reads),
    )


def small_paint(request, hooks):  # type: ignore[no-untyped-def]
    """paint at 64x64, whatever the size asked: keeps result files small and the tests fast."""
    request.width, request.height = 64, 64
    return paint(request, hooks)


# --- settings -----------------------------------------------------------------------------------------------


def test_result_ttl_defaults_to_the_url_life(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().result_ttl == Settings().url_ttl_seconds == 604800
    assert Settings().sweep_seconds == 300
    monkeypatch.setenv("FLUXSERVE_RESULT_TTL_SECONDS", "90")
    monkeypatch.setenv("FLUXSERVE_URL_TTL_SECONDS", "60")
    assert (Settings().result_ttl, Settings().url_ttl_seconds) == (90, 60)


# --- inputs go when the job ends ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behave", "status"),
    [
        (paint, JobStatus.SUCCEEDED),
        (raising(EngineError("flux-kontext-pro: out of memory")), JobStatus.FAILED),
        (raising(JobCanceled()), JobStatus.CANCELED),  # canceled while running: the worker stops it
    ],
    ids=["success", "failure", "canceled-running"],
)
def test_inputs_are_deleted_when_the_worker_ends_the_job(world: World, behave, status) -> None:  # type: ignore[no-untyped-def]
    job = submit_with_image(world, world.key())
    done = run_one(world, world.worker(Scripted(behave)))
    assert done.status is status
    assert world.blobs.list(f"inputs/{job.id}/") == []
    assert not any(name.startswith("inputs/") for name in stored(world.blobs))


def test_a_worker_that_lost_its_job_keeps_the_inputs_for_the_next(world: World) -> None:
    job = submit_with_image(world, world.key())
    worker = world.worker(Scripted(paint))
    claimed = world.stores.claims.claim(worker.worker_id)
    assert claimed is not None
    # It was given back to the queue meanwhile (this worker looked dead): its end is refused.
    assert world.stores.claims.requeue_stale(
        datetime.now(UTC) + timedelta(seconds=1), max_attempts=3
    ) == Reaped(1)
    worker.process(claimed)
    assert world.blobs.list(f"inputs/{job.id}/")  # the next attempt needs them
    assert run_one(world, worker).status is JobStatus.SUCCEEDED
    assert world.blobs.list(f"inputs/{job.id}/") == []


def test_inputs_are_deleted_when_a_queued_job_is_canceled_from_the_api(world: World) -> None:
    key = world.key()
    queued = submit_with_image(world, key)
    kept = submit_with_image(world, key)
    body = reseller.cancel(reseller.JobRef(jobId=queued.id), key, services(world))
    assert (body["status"], body["message"]) == ("FAILED", "Canceled by the client")
    assert world.blobs.list(f"inputs/{queued.id}/") == []
    assert world.blobs.list(f"inputs/{kept.id}/")  # another job's inputs stay


def test_inputs_are_deleted_when_the_reaper_fails_a_crash_looping_job(world: World) -> None:
    key = world.key()
    looping, retried = submit_with_image(world, key), submit_with_image(world, key)
    dead = world.worker(Scripted(paint))
    assert world.stores.claims.claim("dead-1") is not None and world.stores.claims.claim("dead-2") is not None
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with world.database.begin() as conn:  # both went silent; one is on its last attempt
        conn.execute(update(jobs).values(heartbeat_at=long_ago))
        conn.execute(update(jobs).where(jobs.c.id == looping.id).values(attempts=3))
    dead._reap()
    failed, requeued = world.stores.reads.get(looping.id), world.stores.reads.get(retried.id)
    assert failed is not None and failed.status is JobStatus.FAILED and "giving up" in (failed.error or "")
    assert requeued is not None and requeued.status is JobStatus.QUEUED
    assert world.blobs.list(f"inputs/{looping.id}/") == []
    assert world.blobs.list(f"inputs/{retried.id}/")  # it runs again and needs them


# --- results go after the TTL ------------------------------------------------------------------------------


def test_the_sweep_removes_a_result_past_the_ttl_and_keeps_a_fresh_one(world: World) -> None:
    key = world.key("100")
    worker = world.worker(Scripted(small_paint))
    world.submit(key)
    old = run_one(world, worker)
    with world.database.begin() as conn:  # it ended two hours ago: no waiting, no race with the clock
        finished = datetime.now(UTC) - timedelta(hours=2)
        conn.execute(update(jobs).where(jobs.c.id == old.id).values(finished_at=finished))
    world.submit(key)
    fresh = run_one(world, worker)
    assert old.result_key and fresh.result_key
    old_size = len(world.blobs.get(old.result_key))
    report = Retention(world.stores.expiry, world.blobs, ttl_seconds=3600).sweep()
    assert (report.results, report.inputs, report.bytes) == (1, 0, old_size)
    assert not world.blobs.exists(old.result_key) and world.blobs.exists(fresh.result_key)
    expired, kept = world.stores.reads.get(old.id), world.stores.reads.get(fresh.id)
    assert expired is not None and expired.result_expired_at is not None
    assert expired.status is JobStatus.SUCCEEDED  # the row stays, as it was
    assert kept is not None and kept.result_expired_at is None
    again = Retention(world.stores.expiry, world.blobs, ttl_seconds=3600).sweep()  # nothing twice
    assert (again.results, again.bytes) == (0, 0)
    assert world.stores.reads.get(old.id).result_expired_at == expired.result_expired_at  # type: ignore[union-attr]


def test_the_sweep_removes_orphaned_inputs_once_past_the_grace(world: World) -> None:
    active = submit_with_image(world, world.key())  # queued: its inputs are needed
    orphan = f"inputs/{uuid.uuid4()}/input_image.png"  # a submit refused after its upload was stored
    world.blobs.put(orphan, b"x" * 10, "image/png")
    retention = Retention(world.stores.expiry, world.blobs, ttl_seconds=3600)
    assert retention.sweep().inputs == 0  # young: maybe a submit whose row is not written yet
    report = retention.sweep(now=datetime.now(UTC) + timedelta(hours=1))
    assert (report.inputs, report.bytes) == (1, 10)
    assert not world.blobs.exists(orphan) and world.blobs.list(f"inputs/{active.id}/")


def test_an_expired_job_reads_as_such_in_both_dialects(world: World) -> None:
    key = world.key("100")
    world.submit(key)
    done = run_one(world, world.worker(Scripted(small_paint)))
    deps = services(world)
    assert render_job(done, deps)["data"]["imageUrl"] is not None
    assert done.finished_at is not None
    Retention(world.stores.expiry, world.blobs, ttl_seconds=7 * 86400).sweep(
        now=done.finished_at + timedelta(days=7, minutes=3)
    )
    expired = world.stores.reads.get(done.id)
    assert expired is not None
    body = render_job(expired, deps)
    assert body["status"] == "SUCCESS" and body["data"]["imageUrl"] is None
    assert body["data"]["quota"] == "2.5"  # it was delivered, and charged
    # The sweep ran at its real time here, just after the job: the age is what the row records.
    assert (
        body["message"].startswith("Result expired after ") and "the job's record is kept" in body["message"]
    )
    assert "prune" not in body["message"]  # the server's own sweep: retention, not an operator
    result = render_result(expired, expired.id, deps)
    assert result.status == "Ready" and result.result is not None and result.result["sample"] is None
    assert result.result["seed"] == 7 and result.details == {"result": body["message"]}
    expired.result_expired_at = expired.finished_at + timedelta(days=7, minutes=3)  # type: ignore[operator]
    assert render_job(expired, deps)["message"] == (
        "Result expired after 7 days (retention period); the job's record is kept"
    )


# --- fluxserve prune on a real data dir --------------------------------------------------------------------


def prune(world: World, data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fluxserve", "prune", "--data-dir", str(data_dir), *args],
        env={**os.environ, "FLUXSERVE_DATABASE_URL": world.database_url},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("blob_url", ["file"], indirect=True)  # it backdates a file's mtime
def test_prune_from_the_command_line(world: World, tmp_path: Path) -> None:
    # The world's database and files are where Settings(data_dir=tmp_path) finds them.
    key = world.key("100")
    worker = world.worker(Scripted(small_paint))
    done = []
    for _ in range(3):
        world.submit(key)
        done.append(run_one(world, worker))
    with world.database.begin() as conn:  # two of them ended two hours ago
        ids = [job.id for job in done[:2]]
        conn.execute(
            update(jobs).where(jobs.c.id.in_(ids)).values(finished_at=datetime.now(UTC) - timedelta(hours=2))
        )
    orphan = f"inputs/{uuid.uuid4()}/input_image.png"  # a submit refused after its upload was stored
    world.blobs.put(orphan, b"x" * 100, "image/png")
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "files" / orphan, (hour_ago, hour_ago))
    young = f"inputs/{uuid.uuid4()}/input_image.png"  # a submit in flight: its row is not written yet
    world.blobs.put(young, b"y", "image/png")
    sizes = sum(len(world.blobs.get(job.result_key)) for job in done[:2])  # type: ignore[arg-type]

    out = prune(world, tmp_path, "--older-than", "3600")
    assert out == f"removed 2 result(s) and 1 orphaned input file(s): {sizes + 100} bytes"
    assert stored(world.blobs) == sorted([done[2].result_key, young])  # type: ignore[type-var]
    assert [world.stores.reads.get(job.id).result_expired_at is not None for job in done] == [
        True,
        True,
        False,
    ]  # type: ignore[union-attr]
    pruned = world.stores.reads.get(done[0].id)
    assert pruned is not None and pruned.result_expired is not None
    assert pruned.result_expired.startswith(
        "Result deleted after 2 hours by the server's operator (fluxserve prune)"
    )
    assert (
        prune(world, tmp_path, "--older-than", "3600")
        == "removed 0 result(s) and 0 orphaned input file(s): 0 bytes"
    )
    assert prune(world, tmp_path).endswith(": 0 bytes")  # default: the TTL (a week), the last one stays
    assert world.blobs.exists(done[2].result_key)  # type: ignore[arg-type]


# --- disk use stays bounded --------------------------------------------------------------------------------


def test_disk_use_stays_bounded_to_the_recent_results(world: World) -> None:
    key = world.key("1000")
    worker = world.worker(Scripted(paint))
    retention = Retention(world.stores.expiry, world.blobs, ttl_seconds=60)
    recent: list[JobRecord] = []
    for round_ in range(3):  # three rounds of work, a sweep after each as the server's loop does
        recent = []
        for _ in range(4):
            submit_with_image(world, key)
            recent.append(run_one(world, worker))
        now = datetime.now(UTC)
        # The sweep runs a TTL after this round's start: every earlier round is past its time.
        retention.sweep(now=min(job.finished_at for job in recent) + timedelta(seconds=60))  # type: ignore[type-var, operator]
        assert stored(world.blobs) == sorted(job.result_key for job in recent), round_  # type: ignore[misc]
        assert now  # (the loop's clock is the sweep's argument)
    assert len(stored(world.blobs)) == 4  # 12 jobs with inputs ran; 4 results are kept


# --- end to end --------------------------------------------------------------------------------------------


def test_server_expires_results_and_drops_inputs(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        {"FLUXSERVE_RESULT_TTL_SECONDS": "3", "FLUXSERVE_SWEEP_SECONDS": "0.3"}
    )
    server.start()
    api = Api(server.base_url, server.create_key("ret")["key"])
    job_id = api.job(
        "flux-kontext-pro",
        {"prompt": "make it red", "input_image": png_base64((64, 64)), "aspect_ratio": "1:1"},
    )
    done = api.wait(job_id)
    assert done["status"] == "SUCCESS", done
    url = done["data"]["imageUrl"]
    assert api.image(done).size == (1024, 1024)
    files = server.data_dir / "files"
    assert not (files / "inputs" / job_id).exists()  # gone as the job ended
    deadline = time.monotonic() + 30
    while (body := api.fetch(job_id))["data"]["imageUrl"] is not None:
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    assert body["status"] == "SUCCESS" and body["message"].startswith("Result expired after "), body
    assert not any(files.rglob("*.png"))
    old = httpx.get(url, timeout=10)  # a URL handed out before: signed and in date, but the file is gone
    assert old.status_code == 404 and "no longer stored" in old.text, old.text
    got = httpx.get(
        f"{server.base_url}/v1/get_result", params={"id": job_id}, headers={"x-key": api.key}, timeout=10
    ).json()
    assert got["status"] == "Ready" and got["result"]["sample"] is None, got
    assert got["details"] == {"result": body["message"]}
