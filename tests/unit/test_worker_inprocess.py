"""The worker built in-process on a real SQLite store and blob store: what each engine outcome does to the
job, the credits and the outbox, image field names on the way in, and a stalled engine giving up its job.

Engines here are small implementations of our own ``Engine`` interface, scripted per test; the real
pipelines are covered by the engine tests and the end-to-end ones.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Connection, event, select
from sqlalchemy import Engine as SqlEngine

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import webhook_deliveries
from fluxserve.engines.base import Engine, EngineHooks, EngineRequest, EngineResult
from fluxserve.errors import EngineError, JobCanceled, Moderated
from fluxserve.jobs.store import Reaped, Stores
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.safety.moderation import Moderator
from fluxserve.storage.base import BlobStore
from fluxserve.storage.local import LocalBlobStore
from fluxserve.wiring import make_stores
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.runner import Worker
from fluxserve.worker.upsample import StyleCueEnhancer


@dataclass
class Scripted:
    """An engine whose behaviour is a function of the request; it records what it was given."""

    behave: Callable[[EngineRequest, EngineHooks], EngineResult]
    seen: list[EngineRequest] = field(default_factory=list)

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        self.seen.append(request)
        return self.behave(request, hooks)


def paint(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
    for step in range(1, 5):
        hooks.step(step / 4)
    image = Image.new("RGB", (request.width, request.height), (10, 200, 30))
    return EngineResult(image=image, prompt=request.prompt, seed=request.seed)


def raising(error: BaseException) -> Callable[[EngineRequest, EngineHooks], EngineResult]:
    def behave(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        raise error

    return behave


@dataclass
class OneEngine:
    engine: Engine

    def get(self, model: str) -> Engine:
        return self.engine


@dataclass
class World:
    database: SqlEngine
    stores: Stores
    keys: KeyStore
    blobs: BlobStore
    submitter: Submitter
    inputs: InputLoader
    database_url: str

    def key(self, credits: str = "10") -> ApiKey:
        return self.keys.create(f"k-{uuid.uuid4().hex[:8]}", Decimal(credits)).record

    def submit(self, key: ApiKey, webhook_url: str | None = None, **fields: object) -> JobRecord:
        params = GenerationParams.model_validate(
            {"model": "flux-dev", "prompt": "p", "width": 256, "height": 256, "steps": 4, **fields}
        )
        return self.submitter.submit(key, params, 7, webhook_url, SurfaceName.RESELLER)

    def worker(self, engine: Engine, moderator: Moderator | None = None, **timing: float) -> Worker:
        settings = {"heartbeat_seconds": 30.0, "stale_after_seconds": 60.0, "engine_stall_seconds": 600.0}
        return Worker(
            "test-worker",
            self.stores.claims,
            OneEngine(engine),
            self.blobs,
            self.inputs,
            StyleCueEnhancer(),
            **{**settings, **timing},
            max_attempts=3,
            poll_seconds=0.05,
            moderator=moderator,
        )

    def end(self, job: JobRecord, status: JobStatus, **fields: Any) -> bool:
        """Claim ``job`` (it must be next in the queue) and end it, as a worker does."""
        claimed = self.stores.claims.claim("ender")
        assert claimed is not None and claimed.id == job.id
        return self.stores.claims.finish(job.id, "ender", status, **fields)

    def balance(self, key: ApiKey) -> Decimal | None:
        found = self.keys.get(key.id)
        assert found is not None
        return found.credits


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    """The world's files: a folder (test_retention overrides this to run on S3 as well)."""
    return LocalBlobStore(tmp_path / "files")


@pytest.fixture
def world(tmp_path: Path, database_url: str, blobs: BlobStore) -> World:
    url = database_url
    database = open_database(url)
    migrate(database)
    stores = make_stores(database)
    limits = Limits(max_active=24, max_active_per_model={}, max_input_bytes=2**20, max_input_pixels=2**22)
    inputs = InputLoader(blobs, 2**22)
    submitter = Submitter(stores.submissions, blobs, limits, NetworkPolicy([]))
    return World(database, stores, KeyStore(database), blobs, submitter, inputs, url)


def run_one(world: World, worker: Worker) -> JobRecord:
    claimed = world.stores.claims.claim(worker.worker_id)
    assert claimed is not None
    worker.process(claimed)
    done = world.stores.reads.get(claimed.id)
    assert done is not None
    return done


def test_a_job_runs_is_stored_charged_once_and_queues_its_webhook(world: World) -> None:
    key = world.key("10")
    job = world.submit(key, webhook_url="https://example.com/hook")
    assert world.balance(key) == Decimal("7.5")  # held at submit
    done = run_one(world, world.worker(Scripted(paint)))
    assert done.status is JobStatus.SUCCEEDED and done.progress == 1.0 and done.attempts == 1
    assert done.result_key is not None
    image = Image.open(io.BytesIO(world.blobs.get(done.result_key)))
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert world.balance(key) == Decimal("7.5")  # kept, not taken twice
    with world.database.connect() as conn:  # the outbox row written with the job's end
        rows = conn.execute(select(webhook_deliveries.c.job_id, webhook_deliveries.c.url)).all()
    assert [(row.job_id, row.url) for row in rows] == [(job.id, "https://example.com/hook")]


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (EngineError("flux-dev: out of memory"), JobStatus.FAILED, "flux-dev: out of memory"),
        (Moderated("request", "nudity"), JobStatus.REQUEST_MODERATED, "Request Moderated: nudity"),
        (Moderated("content"), JobStatus.CONTENT_MODERATED, "Content Moderated"),
        (JobCanceled(), JobStatus.CANCELED, "Canceled by the client"),
        (ZeroDivisionError("a bug"), JobStatus.FAILED, "Internal error while generating: ZeroDivisionError"),
    ],
)  # fmt: skip
def test_each_engine_outcome_ends_the_job_its_way_and_refunds(
    world: World, error: BaseException, status: JobStatus, message: str
) -> None:
    key = world.key("10")
    world.submit(key)
    done = run_one(world, world.worker(Scripted(raising(error))))
    assert (done.status, done.error) == (status, message)
    assert world.balance(key) == Decimal("10")  # nothing charged for a job that did not deliver
    assert done.result_key is None


def test_input_images_reach_the_engine_under_their_own_field_names(world: World) -> None:
    def png(color: tuple[int, int, int], size: tuple[int, int]) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    images = [
        ImageRef(field="input_image", ref=png((255, 0, 0), (64, 32))),
        ImageRef(field="input_image_3", ref=png((0, 0, 255), (16, 16))),
    ]
    key = world.key()
    job = world.submitter.submit(
        key,
        GenerationParams(model="flux-kontext-pro", prompt="edit", input_images=images),
        1,
        None,
        SurfaceName.VENDOR,
    )
    assert (job.width, job.height) == (1456, 720)  # the Kontext resolution nearest the first image's 2:1
    engine = Scripted(paint)
    assert run_one(world, world.worker(engine)).status is JobStatus.SUCCEEDED
    (request,) = engine.seen
    assert [(named.field, named.image.size) for named in request.images] == [
        ("input_image", (64, 32)),
        ("input_image_3", (16, 16)),
    ]


def test_a_stalled_engine_stops_vouching_for_its_job_which_another_worker_takes_back(world: World) -> None:
    release = threading.Event()

    def hang(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        hooks.step(0.1)
        release.wait(30)  # stuck: no progress, no cancellation check
        return paint(request, hooks)

    world.submit(world.key())
    worker = world.worker(Scripted(hang), heartbeat_seconds=0.05, engine_stall_seconds=0.3)
    claimed = world.stores.claims.claim(worker.worker_id)
    assert claimed is not None
    running = threading.Thread(target=worker.process, args=(claimed,))
    running.start()
    try:
        deadline = time.monotonic() + 20
        while worker.liveness.alive():  # the process-wide beacon would stop here too
            assert time.monotonic() < deadline, "the stall was never noticed"
            time.sleep(0.02)
        job = world.stores.reads.get(claimed.id)
        assert job is not None and job.heartbeat_at is not None
        last_beat = job.heartbeat_at
        time.sleep(0.3)  # several heartbeat intervals: none may come now
        job = world.stores.reads.get(claimed.id)
        assert job is not None and job.heartbeat_at == last_beat
        assert world.stores.claims.requeue_stale(
            datetime.now(UTC) - timedelta(seconds=0.2), max_attempts=3
        ) == Reaped(1)
    finally:
        release.set()
        running.join(30)
    job = world.stores.reads.get(claimed.id)
    assert job is not None
    # The hung worker came back too late: its result is refused, the job waits for its next attempt.
    assert (job.status, job.worker_id, job.attempts) == (JobStatus.QUEUED, None, 1)


def test_a_job_is_vouched_for_while_its_model_loads(world: World) -> None:
    loading, loaded = threading.Event(), threading.Event()

    @dataclass
    class SlowLoad:
        def get(self, model: str) -> Engine:
            loading.set()
            loaded.wait(30)  # a cold worker reading weights: no engine yet, no steps
            return Scripted(paint)

    world.submit(world.key())
    worker = world.worker(Scripted(paint), heartbeat_seconds=0.05)
    worker._engines = SlowLoad()
    claimed = world.stores.claims.claim(worker.worker_id)
    assert claimed is not None
    running = threading.Thread(target=worker.process, args=(claimed,))
    running.start()
    try:
        assert loading.wait(10)
        time.sleep(0.5)  # ten heartbeat intervals into the load
        assert world.stores.claims.requeue_stale(
            datetime.now(UTC) - timedelta(seconds=0.3), max_attempts=3
        ) == Reaped(0)
    finally:
        loaded.set()
        running.join(30)
    job = world.stores.reads.get(claimed.id)
    assert job is not None and job.status is JobStatus.SUCCEEDED and job.attempts == 1


class Transactions:
    """The transactions run on a database, each as the statements it ran (SQLAlchemy's events)."""

    def __init__(self, database: SqlEngine) -> None:
        self.ended: list[list[str]] = []
        self._open: dict[int, list[str]] = {}
        self._lock = threading.Lock()  # heartbeats run on threads of their own
        event.listen(database, "begin", self._begin)
        event.listen(database, "before_cursor_execute", self._statement)
        event.listen(database, "commit", self._end)
        event.listen(database, "rollback", self._end)

    def _begin(self, conn: Connection) -> None:
        with self._lock:
            self._open[id(conn)] = []

    def _statement(self, conn: Connection, _cursor: object, statement: str, *_: object) -> None:
        with self._lock:
            self._open.setdefault(id(conn), []).append(" ".join(statement.split()))

    def _end(self, conn: Connection) -> None:
        with self._lock:
            self.ended.append(self._open.pop(id(conn), []))

    def writes(self) -> list[list[str]]:
        """The transactions that wrote (a claim is ``WITH ... UPDATE``), less heartbeats (an UPDATE of
        heartbeat_at and progress alone)."""
        return [
            statements
            for statements in self.ended
            if any(re.match(r"(WITH .* )?(INSERT|UPDATE|DELETE) ", s) for s in statements)
            and not all(_columns(s) and _columns(s) <= {"heartbeat_at", "progress"} for s in statements)
        ]


def _columns(statement: str) -> set[str]:
    """The columns an ``UPDATE jobs`` sets (empty for any other statement)."""
    found = re.search(r"UPDATE jobs SET (.*?) WHERE", statement)
    return {part.split("=")[0] for part in found.group(1).split(", ")} if found else set()


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_job_is_claimed_and_ended_in_two_writes_and_the_end_is_one_transaction(
    world: World, outcome: str
) -> None:
    def relayed(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        hooks.step(0.5)
        if outcome == "failed":
            raise EngineError("flux-dev: out of memory")
        image = Image.new("RGB", (320, 192), (10, 200, 30))  # the vendor's prompt, seed and size win
        return EngineResult(image=image, prompt="the vendor's prompt", seed=99, details={})

    key = world.key("10")
    job = world.submit(key, webhook_url="https://example.com/hook")
    transactions = Transactions(world.database)
    done = run_one(world, world.worker(Scripted(relayed)))
    claim, finish = transactions.writes()
    assert len(claim) == 1 and {"status", "worker_id", "attempts"} <= _columns(claim[0])
    assert finish[0].startswith("UPDATE jobs SET ")
    written = _columns(finish[0])
    if outcome == "succeeded":
        assert {"status", "result_key", "prompt", "seed", "width", "height"} <= written
        assert (done.status, done.prompt, done.seed, done.size) == (
            JobStatus.SUCCEEDED, "the vendor's prompt", 99, "320x192",
        )  # fmt: skip
        assert world.balance(key) == Decimal("7.5")  # the hold is kept: its ledger entry says so
        assert [s.split()[0:3] for s in finish[1:]] == [
            ["INSERT", "INTO", "credit_ledger"],
            ["INSERT", "INTO", "webhook_deliveries"],
        ]
    else:
        assert "status" in written and "prompt" not in written  # a failed job keeps what it was sent
        assert (done.status, done.prompt, done.seed) == (JobStatus.FAILED, "p", 7)
        assert world.balance(key) == Decimal("10")  # the refund, in the same transaction
        assert [s.split()[0:3] for s in finish[1:]] == [
            ["UPDATE", "api_keys", "SET"],
            ["INSERT", "INTO", "credit_ledger"],
            ["INSERT", "INTO", "webhook_deliveries"],
        ]
    assert done.id == job.id


def test_hand_back_requeues_a_workers_running_jobs_at_once_without_counting_the_attempt(world: World) -> None:
    key = world.key()
    mine, theirs = world.submit(key), world.submit(key)
    assert (
        world.stores.claims.claim("stopping") is not None and world.stores.claims.claim("staying") is not None
    )
    assert world.stores.claims.hand_back(["stopping", "gone"]) == 1
    back, other = world.stores.reads.get(mine.id), world.stores.reads.get(theirs.id)
    assert back is not None and other is not None
    assert (back.status, back.worker_id, back.attempts, back.progress) == (JobStatus.QUEUED, None, 0, 0.0)
    assert (other.status, other.worker_id, other.attempts) == (JobStatus.RUNNING, "staying", 1)
    # The stopping worker's late result is refused; the job is the next claim's, and counts as its first.
    assert not world.stores.claims.finish(
        mine.id, "stopping", JobStatus.SUCCEEDED, result_key="results/late.png"
    )
    assert world.stores.claims.hand_back([]) == 0
    again = world.stores.claims.claim("next")
    assert again is not None and (again.id, again.attempts) == (mine.id, 1)


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_a_stopped_worker_drains_then_hands_back_what_is_still_running(world: World, grace: float) -> None:
    from fluxserve.worker.process import drain  # imports torch

    release, started = threading.Event(), threading.Event()

    def slow(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        started.set()
        while not release.wait(0.02):  # a step at a time until released, or until canceled
            hooks.step(0.5)
        return paint(request, hooks)

    key = world.key()
    running, waiting = world.submit(key), world.submit(key)
    worker = world.worker(Scripted(slow), heartbeat_seconds=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    assert started.wait(20)
    stop.set()
    if grace:  # the job ends within the drain time
        threading.Timer(0.3, release.set).start()
    drain(world.stores.claims, [worker], [thread], grace)
    release.set()
    thread.join(20)
    assert not thread.is_alive()
    ran, queued = world.stores.reads.get(running.id), world.stores.reads.get(waiting.id)
    assert ran is not None and queued is not None
    assert (queued.status, queued.attempts) == (JobStatus.QUEUED, 0)  # nothing claimed while draining
    if grace:
        assert (ran.status, ran.attempts) == (JobStatus.SUCCEEDED, 1)
    else:  # handed back: the engine stopped at its next step and its end was not recorded
        assert (ran.status, ran.worker_id, ran.attempts) == (JobStatus.QUEUED, None, 0)
