"""Batching: compatible jobs share one pipeline call, and each gets exactly the image it gets alone."""

from __future__ import annotations

from collections.abc import Hashable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database
from fluxserve.engines.base import EngineRequest
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.planning import Plan, Planner
from fluxserve.errors import EngineError, JobCanceled
from fluxserve.wiring import make_stores
from fluxserve.worker.runner import Worker
from tests.support.engine_fixtures import Recorder, entry, gradient, png, request, solid, tiny_weights


@pytest.fixture(scope="module", params=[1.0, 3.0], ids=["plain", "true-cfg"])
def engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> DiffusersFluxEngine:
    weights = tiny_weights(tmp_path_factory.mktemp("models"))
    options = {"max_batch": 4, "true_cfg_scale": request.param}
    return DiffusersFluxEngine(weights, entry(steps=3, max_pixels=4096, options=options))


PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "a red fox in the snow")


def plans(engine: DiffusersFluxEngine, requests: list[EngineRequest]) -> list[Plan]:
    return [engine.plan(each) for each in requests]


def batch_requests(**fields: object) -> list:
    return [
        request("flux-pro", prompt=prompt, seed=seed, width=96, height=64, **fields)
        for prompt, seed in zip(PROMPTS, (1, 2, 3, 4), strict=True)
    ]


def test_a_batch_gives_each_job_its_solo_image(engine: DiffusersFluxEngine) -> None:
    requests = batch_requests(interval=2)
    assert engine.max_batch == 4
    assert len({engine.batch_key(engine.plan(r)) for r in requests}) == 1
    recorders = [Recorder() for _ in requests]
    batched = engine.generate_batch(plans(engine, requests), [r.hooks for r in recorders])
    alone = [engine.generate(r, Recorder().hooks) for r in requests]
    for together, solo, req in zip(batched, alone, requests, strict=True):
        assert not isinstance(together, JobCanceled)
        assert png(together.image) == png(solo.image)
        assert (together.prompt, together.seed, together.image.size) == (req.prompt, req.seed, (96, 64))
        assert together.details["batch"] == 4
        assert together.details["guidance_per_step"] == solo.details["guidance_per_step"]
    assert len({png(r.image) for r in batched if not isinstance(r, JobCanceled)}) == 4  # own prompt and seed
    assert all(r.fractions == [1 / 3, 2 / 3, 1.0] for r in recorders)


def test_only_compatible_text_to_image_jobs_batch(engine: DiffusersFluxEngine) -> None:
    def key(req: EngineRequest) -> Hashable | None:
        return engine.batch_key(engine.plan(req))

    base = request("flux-pro")
    assert key(base) == key(request("flux-dev", prompt="other", seed=99))
    assert key(request(steps=5)) != key(base)
    assert key(request(width=128)) != key(base)
    assert key(request(guidance=2.0)) != key(base)
    assert key(request(image_prompt=gradient())) is None
    assert key(request("flux-kontext-pro", images=[gradient()])) is None
    with pytest.raises(ValueError, match="cannot share a pipeline call"):
        engine.generate_batch(plans(engine, [base, request(steps=5)]), [Recorder().hooks] * 2)
    with pytest.raises(EngineError, match=r"^input_image"):
        engine.plan(request("flux-dev", images=[gradient()]))


def test_a_canceled_job_leaves_the_batch_and_the_others_finish(engine: DiffusersFluxEngine) -> None:
    requests = batch_requests()[:3]
    recorders = [Recorder(), Recorder(cancel_after=1), Recorder()]
    results = engine.generate_batch(plans(engine, requests), [r.hooks for r in recorders])
    assert isinstance(results[1], JobCanceled)
    assert recorders[1].fractions == [1 / 3]
    solo = engine.generate(requests[0], Recorder().hooks)
    assert png(results[0].image) == png(solo.image)  # type: ignore[union-attr]
    everyone = [Recorder(cancel_after=2) for _ in requests]
    assert all(
        isinstance(r, JobCanceled)
        for r in engine.generate_batch(plans(engine, requests), [r.hooks for r in everyone])
    )
    assert everyone[0].fractions == [1 / 3, 2 / 3]  # stopped as soon as nobody was left


class OneEngine:
    def __init__(self, engine: DiffusersFluxEngine) -> None:
        self.engine = engine

    def get(self, model: str) -> DiffusersFluxEngine:
        return self.engine


class Blobs:
    def put(self, key: str, data: bytes, content_type: str) -> None:
        pass


class Inputs:
    def load(self, ref: str, field: str) -> Image.Image:
        return solid("red")


def job(index: int, **fields: Any) -> JobRecord:
    params = GenerationParams(model="flux-dev", prompt=PROMPTS[index], width=96, height=64, **fields)
    return JobRecord(
        id=f"job-{index}",
        key_id="key",
        model="flux-dev",
        params=params.model_dump(),
        seed=index,
        output_format="png",
        prompt=params.prompt,
        cost=Decimal(0),
        width=96,
        height=64,
        created_at=datetime.now(UTC),
    )


def test_the_worker_plans_each_request_once_in_a_batched_run(
    engine: DiffusersFluxEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Keying a batch and running it use the one plan made per request; a refused one fails alone."""
    planned: list[int] = []
    plan = Planner.plan

    def counting(self: Planner, request: EngineRequest) -> Plan:
        planned.append(request.seed)
        return plan(self, request)

    monkeypatch.setattr(Planner, "plan", counting)
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(database)
    stores = make_stores(database)
    key = KeyStore(database).create("k").record
    refused = job(3, input_images=["https://example.com/in.png"])  # flux-dev takes no input image
    for queued in (job(0), job(1), refused, job(2)):  # as they were written, in this order
        queued.key_id = key.id
        stores.submissions.submit(queued, max_active=10)
    worker = Worker(
        "w",
        stores.claims,
        OneEngine(engine),  # type: ignore[arg-type]
        Blobs(),  # type: ignore[arg-type]
        Inputs(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        heartbeat_seconds=60,
        stale_after_seconds=600,
        engine_stall_seconds=600,
        max_attempts=3,
        poll_seconds=1,
    )
    first = stores.claims.claim("w")
    assert first is not None and first.id == "job-0"
    worker.process(first)
    assert sorted(planned) == [0, 1, 2, 3]  # once each: not again for batch_key, generate or generate_batch
    ended = {f"job-{i}": stores.reads.get(f"job-{i}") for i in range(4)}
    outcomes = {job_id: (done.status, done.error) for job_id, done in ended.items() if done is not None}
    assert outcomes == {
        "job-0": (JobStatus.SUCCEEDED, None),
        "job-1": (JobStatus.SUCCEEDED, None),
        "job-2": (JobStatus.SUCCEEDED, None),
        "job-3": (JobStatus.FAILED, "input_image: flux-dev does not take input images"),
    }
    assert {ended[f"job-{i}"].details["batch_size"] for i in range(3)} == {3}  # type: ignore[union-attr]
