"""The fetch stage (jobs/fetching.py) on a real SQLite store, blob store and loopback HTTP origins: a URL
input is downloaded and stored before its job is queued; a failure ends the job naming the field and
refunds it; a key's slow URLs hold only its own slots; a canceled job leaves nothing; a dead process's
lease is taken over."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import utcnow
from fluxserve.db.tables import jobs
from fluxserve.jobs.fetching import InputFetcher
from fluxserve.jobs.submit import BLOB_PREFIX, inputs_prefix
from fluxserve.safety.fetch import NetworkPolicy, parse_networks
from tests.conftest import Api, ServerProcess, http_server
from tests.unit import test_worker_inprocess
from tests.unit.test_webhook_fairness import BlackHole
from tests.unit.test_worker_inprocess import World

world = test_worker_inprocess.world  # the same real store, keys and blob store
blobs = test_worker_inprocess.blobs

LOOPBACK = NetworkPolicy(parse_networks("127.0.0.0/8"))


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class Origin(BaseHTTPRequestHandler):
    """``/png/WxH`` answers with such a PNG, ``/text`` with a body that is no image, ``/hang`` never
    (until the test ends), anything else with 404."""

    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.startswith("/png/"):
            width, height = (int(part) for part in self.path.removeprefix("/png/").split("x"))
            body = png(width, height)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/text":
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")
        elif self.path == "/hang":
            Origin.release.wait(30)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    Origin.release.clear()
    with http_server(Origin) as url:
        yield url
    Origin.release.set()


def fetcher(
    world: World, timeout: float = 5.0, per_key: int = 2, concurrency: int = 8, max_pixels: int = 2**22
) -> InputFetcher:
    return InputFetcher(
        world.stores.fetches,
        world.blobs,
        LOOPBACK,
        max_bytes=2**20,
        max_pixels=max_pixels,
        timeout=timeout,
        concurrency=concurrency,
        per_key=per_key,
        poll_seconds=0.05,
    )


def kontext(world: World, key_credits: str, url: str) -> JobRecord:
    key = world.key(key_credits)
    image = {"field": "input_image", "ref": url}
    return world.submit(
        key, model="flux-kontext-pro", input_images=[image], width=None, height=None, steps=None
    )


def fetch_all(world: World, stage: InputFetcher) -> list[JobRecord]:
    """Lease what is waiting and run each fetch to its end; the jobs as they are after."""

    async def run() -> list[str]:
        leased = stage._leases.lease(stage.owner, 100, 100)
        await asyncio.gather(*(stage.fetch(job) for job in leased))
        return [job.id for job in leased]

    found = [world.stores.reads.get(job_id) for job_id in asyncio.run(run())]
    return [job for job in found if job is not None]


def test_a_url_input_is_stored_and_sizes_the_job_before_it_is_queued(world: World, origin: str) -> None:
    job = kontext(world, "10", f"{origin}/png/640x480")
    assert job.status is JobStatus.FETCHING and job.width is None
    # A worker never sees it before its inputs are stored.
    assert world.stores.claims.claim("a-worker") is None
    (done,) = fetch_all(world, fetcher(world))
    assert done.status is JobStatus.QUEUED
    assert done.width is not None and done.height is not None  # kontext: about 1 MP at the input's 4:3
    assert abs(done.width / done.height - 4 / 3) < 0.02 and 0.9e6 < done.width * done.height < 1.1e6
    (image,) = GenerationParams.model_validate(done.params).input_images
    assert image.field == "input_image" and image.ref.startswith(BLOB_PREFIX)
    stored = Image.open(io.BytesIO(world.blobs.get(image.ref.removeprefix(BLOB_PREFIX))))
    assert stored.size == (640, 480)
    claimed = world.stores.claims.claim("a-worker")
    assert claimed is not None and claimed.id == job.id


def test_url_references_end_at_the_inline_price_and_never_below_zero(world: World, origin: str) -> None:
    """The issue's case: flux-2-max at 64x1600 with two 4 MP references as URLs is quoted 28 credits, the
    inline price; a key holding exactly 28 keeps 0 after the fetch (it once ended at -3)."""
    key = world.key("28")
    refs = [{"field": field, "ref": f"{origin}/png/2048x2048"} for field in ("input_image", "input_image_2")]
    job = world.submit(key, model="flux-2-max", input_images=refs, width=64, height=1600, steps=None)
    assert job.cost == Decimal(28) and world.balance(key) == Decimal(0)
    (done,) = fetch_all(world, fetcher(world, max_pixels=2048 * 2048))
    assert done.status is JobStatus.QUEUED and done.cost == Decimal(28) and world.balance(key) == Decimal(0)


def test_an_inline_reference_beside_a_url_is_priced_from_its_stored_size(world: World, origin: str) -> None:
    key = world.key("100")
    inline = {"field": "input_image", "ref": base64.b64encode(png(1024, 1024)).decode()}
    url = {"field": "input_image_2", "ref": f"{origin}/png/64x64"}
    job = world.submit(
        key, model="flux-2-max", input_images=[inline, url], width=1024, height=1024, steps=None
    )
    assert job.cost == Decimal(7 + 3 * 5)  # 6 MP: 1.05 + 1.05 + 4.19 (the URL's bound)
    (done,) = fetch_all(world, fetcher(world))
    assert done.cost == Decimal(7 + 3 * 1) and world.balance(key) == Decimal(100 - 10)  # 2 MP


def test_a_failed_fetch_ends_the_job_naming_the_field_and_refunds_it(world: World, origin: str) -> None:
    job = kontext(world, "10", f"{origin}/missing")
    key = world.keys.get(job.key_id)
    assert key is not None and key.credits == Decimal("6")  # 4 held
    (done,) = fetch_all(world, fetcher(world))
    assert done.status is JobStatus.FAILED
    assert done.error is not None and done.error.startswith("input_image: HTTP 404"), done.error
    assert world.balance(key) == Decimal("10")
    not_an_image = kontext(world, "10", f"{origin}/text")
    (done,) = fetch_all(world, fetcher(world))
    assert done.id == not_an_image.id and done.status is JobStatus.FAILED
    assert done.error == "input_image: not a decodable image (PNG, JPEG or WebP)", done.error
    assert not list(world.blobs.list(inputs_prefix(done.id)))


def test_slow_urls_hold_only_their_own_keys_slots(world: World, origin: str) -> None:
    """Key A's three URLs never answer; key B's job is fetched and queued meanwhile, A has at most two
    fetches in flight, and A's jobs end as timed out naming the field."""
    slow = [kontext(world, "100", f"{origin}/hang") for _ in range(3)]
    slow_key = slow[0].key_id
    with world.database.begin() as conn:  # all three under one key
        conn.execute(jobs.update().where(jobs.c.id.in_([job.id for job in slow])).values(key_id=slow_key))
    quick = kontext(world, "10", f"{origin}/png/64x64")
    stage = fetcher(world, timeout=1.5, per_key=2)
    in_flight: list[int] = []
    when_quick_queued: list[JobStatus] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(stage.run(stop))
        while status(world, quick) is JobStatus.FETCHING:
            in_flight.append(leased_by(world, slow_key))
            await asyncio.sleep(0.02)
        when_quick_queued.extend(status(world, job) for job in slow)
        while any(status(world, job) is not JobStatus.FAILED for job in slow):
            in_flight.append(leased_by(world, slow_key))
            await asyncio.sleep(0.05)
        stop.set()
        await running

    asyncio.run(scenario())
    assert status(world, quick) is JobStatus.QUEUED
    assert when_quick_queued == [JobStatus.FETCHING] * 3  # B did not wait for A's hanging URLs
    assert max(in_flight) == 2  # A's third waited for a slot of A's own
    for job in slow:
        current = world.stores.reads.get(job.id)
        assert current is not None and current.error == "input_image: timed out after 1.5 s", current.error


def leased_by(world: World, key_id: str) -> int:
    with world.database.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(jobs.c.key_id == key_id, jobs.c.status == "fetching", jobs.c.fetch_owner.is_not(None))
            ).scalar_one()
        )


def status(world: World, job: JobRecord) -> JobStatus:
    current = world.stores.reads.get(job.id)
    assert current is not None
    return current.status


def test_a_job_canceled_while_fetching_keeps_no_inputs(world: World, origin: str) -> None:
    job = kontext(world, "10", f"{origin}/png/64x64")
    stage = fetcher(world)
    (leased,) = world.stores.fetches.lease(stage.owner, 10, 10)
    canceled = world.stores.submissions.cancel(job.id, job.key_id)
    assert canceled is not None and canceled.status is JobStatus.CANCELED
    asyncio.run(stage.fetch(leased))
    assert status(world, job) is JobStatus.CANCELED
    assert not list(world.blobs.list(inputs_prefix(job.id)))
    assert world.balance(world.keys.get(job.key_id)) == Decimal("10")  # type: ignore[arg-type]


def test_a_dead_processes_lease_is_taken_over(world: World, origin: str) -> None:
    job = kontext(world, "10", f"{origin}/png/64x64")
    dead, alive = fetcher(world), fetcher(world)
    assert [leased.id for leased in world.stores.fetches.lease(dead.owner, 10, 10)] == [job.id]
    assert world.stores.fetches.lease(alive.owner, 10, 10) == []  # leased: nobody else takes it
    assert world.stores.fetches.release_stale(utcnow() - timedelta(seconds=60)) == 0  # still fresh
    assert world.stores.fetches.release_stale(utcnow() + timedelta(seconds=1)) == 1
    (done,) = fetch_all(world, alive)
    assert done.status is JobStatus.QUEUED
    assert not world.stores.fetches.renew(job.id, dead.owner)  # the dead owner's lease is gone


def test_urls_that_never_answer_cost_their_key_not_the_worker(make_server: Any) -> None:
    """End to end: key A's four ``input_image`` URLs accept the connection and never answer; key B's
    two-step job runs to the end while all of A's jobs still wait for their images (two downloads at a
    time: A's own slots), and healthz stays quick. A's jobs can be canceled while they wait."""
    server: ServerProcess = make_server({"FLUXSERVE_INPUT_FETCH_TIMEOUT_SECONDS": "600"})
    a, b = (Api(server.base_url, server.create_key()["key"]) for _ in range(2))
    server.start()
    hole = BlackHole()
    answered = 0
    try:
        body = {"prompt": "p", "input_image": hole.url}
        waiting = [a.job("flux-kontext-pro", {**body, "seed": index}) for index in range(4)]
        done = b.job("flux-dev", {"prompt": "a red circle", "steps": 2, "width": 256, "height": 256})
        while b.fetch(done)["status"] not in ("SUCCESS", "FAILED"):
            # A blocked event loop would hang this for the URLs' 600 s: the client's 5 s timeout fails it.
            assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
            answered += 1
            time.sleep(0.05)
        assert b.fetch(done)["status"] == "SUCCESS"
        assert [a.fetch(job)["status"] for job in waiting] == ["PENDING_QUEUE"] * 4
        assert hole.connections == 2  # A's downloads hang in its two slots; its other two wait
        assert answered  # healthz was asked while A's downloads hung, and answered each time
        for job in waiting:  # a job waiting for its URL can be canceled at once
            canceled = a.http.post("/flux/cancel", json={"jobId": job})
            assert canceled.status_code == 200, canceled.text
            assert a.fetch(job)["status"] == "FAILED"
    finally:
        hole.close()


def test_a_fetch_whose_lease_lapsed_leaves_the_job_and_its_inputs_to_the_new_owner(
    world: World, origin: str
) -> None:
    job = kontext(world, "10", f"{origin}/png/64x64")
    slow, taker = fetcher(world), fetcher(world)
    (leased,) = world.stores.fetches.lease(slow.owner, 10, 10)
    assert world.stores.fetches.release_stale(utcnow() + timedelta(seconds=1)) == 1  # slow seemed dead
    assert [again.id for again in world.stores.fetches.lease(taker.owner, 10, 10)] == [job.id]
    asyncio.run(slow.fetch(leased))  # it was only slow: its download ends after the lease changed hands
    assert status(world, job) is JobStatus.FETCHING  # the taker's to queue, not the slow one's
    assert list(world.blobs.list(inputs_prefix(job.id)))  # nor are the job's inputs the slow one's to drop
