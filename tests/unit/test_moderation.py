"""Local moderation with the real classifiers: the tolerance table and the operator's floor, then the worker
in-process on a real store: a flagged prompt or input refuses the job before any work, a flagged output
refuses only its own job (in a batch too), nothing is charged, and an engine that moderates itself (the
relay) gets the capped tolerance and no local checks."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.core.job import JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult
from fluxserve.errors import JobCanceled, Moderated
from fluxserve.jobs.store import Claims
from fluxserve.safety.moderation import (
    THRESHOLDS,
    ImageScorer,
    Moderator,
    TextScorer,
    make_moderator,
    parse_setting,
)
from fluxserve.settings import Settings
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.runner import Worker
from fluxserve.worker.upsample import StyleCueEnhancer
from tests.support.flagged import flagged_image, flagged_png_base64
from tests.unit import test_worker_inprocess as inprocess
from tests.unit.test_worker_inprocess import OneEngine, Scripted, World, paint, run_one

world, blobs = inprocess.world, inprocess.blobs  # the in-process worker's fixtures, shared

FLAGGED_PROMPT = "a photo of a fucking idiot"  # the text model scores it 1.0
BENIGN_PROMPT = "a red fox sitting in fresh snow at sunrise"
TEXT, IMAGES = TextScorer(), ImageScorer()  # loaded once for the module


def moderator(floor: int = 6) -> Moderator:
    return Moderator(floor, TEXT, IMAGES)


def draw_flagged(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
    image = flagged_image(request.width)
    return EngineResult(image=image, prompt=request.prompt, seed=request.seed)


# The classifiers and the table


def test_the_table_grows_more_lenient_with_the_tolerance_and_six_checks_nothing() -> None:
    rows = [THRESHOLDS[level] for level in range(6)]
    assert all(row is not None for row in rows) and THRESHOLDS[6] is None
    for column in (0, 1):
        limits = [row[column] for row in rows if row is not None]
        assert limits == sorted(limits) and len(set(limits)) == 6


def test_a_flagged_prompt_is_request_moderated_naming_the_text_check() -> None:
    with pytest.raises(Moderated) as caught:
        moderator().check_prompt(FLAGGED_PROMPT, 2)
    assert caught.value.kind == "request"
    assert str(caught.value).startswith("Request Moderated: prompt: the text check scored 1.00 (tolerance 2)")


def test_a_benign_prompt_and_image_pass_even_at_the_strictest_tolerance() -> None:
    moderator().check_prompt(BENIGN_PROMPT, 0)
    moderator().check_output(Image.new("RGB", (256, 256), (10, 200, 30)), 0)
    moderator().check_prompt("", 0)  # an image-only request has nothing to check


def test_a_flagged_image_is_refused_as_an_input_naming_its_field_or_as_content() -> None:
    with pytest.raises(Moderated) as caught:
        moderator().check_input(flagged_image(256), "input_image_2", 2)
    assert caught.value.kind == "request" and caught.value.reason.startswith("input_image_2: the image check")
    with pytest.raises(Moderated) as caught:
        moderator().check_output(flagged_image(512), 5)
    assert caught.value.kind == "content" and caught.value.reason.startswith("output image: the image check")


def test_tolerance_six_lets_it_through_unless_the_floor_is_lower() -> None:
    moderator(6).check_prompt(FLAGGED_PROMPT, 6)
    moderator(6).check_output(flagged_image(256), 6)
    with pytest.raises(Moderated, match=r"\(tolerance 3\)"):
        moderator(3).check_prompt(FLAGGED_PROMPT, 6)
    assert moderator(3).tolerance(6) == 3 and moderator(3).tolerance(1) == 1


@pytest.mark.parametrize(("value", "floor"), [("off", None), (" OFF ", None), ("0", 0), ("6", 6)])
def test_the_setting_is_off_or_a_floor(value: str, floor: int | None) -> None:
    assert parse_setting(value) == floor
    assert Settings(moderation=value).moderation == value
    assert (make_moderator(value) is None) == (floor is None)


@pytest.mark.parametrize("value", ["7", "-1", "on", "", "2.5"])
def test_a_bad_setting_is_refused_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match="moderation"):
        parse_setting(value)
    with pytest.raises(ValidationError, match="moderation"):
        Settings(moderation=value)


def test_a_missing_classifier_is_named_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(RuntimeError, match=r"needs onnxruntime: pip install 'fluxserve\[local\]'"):
        make_moderator("2")


# The worker


def test_a_flagged_prompt_ends_the_job_before_any_work_and_is_not_charged(world: World) -> None:
    key = world.key("10")
    world.submit(key, prompt=FLAGGED_PROMPT)
    engine = Scripted(paint)
    done = run_one(world, world.worker(engine, moderator()))
    assert done.status is JobStatus.REQUEST_MODERATED and engine.seen == []
    assert done.error is not None and done.error.startswith("Request Moderated: prompt: the text check")
    assert world.balance(key) == Decimal("10") and done.result_key is None


def test_a_flagged_input_image_is_request_moderated_naming_its_field(world: World) -> None:
    key = world.key("10")
    images = [
        ImageRef(field="input_image", ref=flagged_png_base64(256)),
    ]
    params = GenerationParams(model="flux-kontext-pro", prompt="make it blue", input_images=images)
    world.submitter.submit(key, params, 1, None, SurfaceName.VENDOR)
    engine = Scripted(paint)
    done = run_one(world, world.worker(engine, moderator()))
    assert done.status is JobStatus.REQUEST_MODERATED and engine.seen == []
    assert done.error is not None and done.error.startswith("Request Moderated: input_image: the image check")
    assert world.balance(key) == Decimal("10")


def test_a_flagged_output_is_content_moderated_not_stored_and_not_charged(world: World) -> None:
    key = world.key("10")
    world.submit(key, prompt=BENIGN_PROMPT)
    done = run_one(world, world.worker(Scripted(draw_flagged), moderator()))
    assert done.status is JobStatus.CONTENT_MODERATED
    assert done.error is not None and done.error.startswith(
        "Content Moderated: output image: the image check"
    )
    assert done.result_key is None and world.balance(key) == Decimal("10")


def test_tolerance_six_generates_what_the_checks_would_refuse_unless_the_floor_says_otherwise(
    world: World,
) -> None:
    key = world.key("10")
    world.submit(key, prompt=FLAGGED_PROMPT, safety_tolerance=6)
    assert run_one(world, world.worker(Scripted(draw_flagged), moderator(6))).status is JobStatus.SUCCEEDED
    world.submit(key, prompt=FLAGGED_PROMPT, safety_tolerance=6)
    done = run_one(world, world.worker(Scripted(draw_flagged), moderator(4)))
    assert done.status is JobStatus.REQUEST_MODERATED and "(tolerance 4)" in (done.error or "")


def test_moderation_off_checks_nothing(world: World) -> None:
    key = world.key("10")
    world.submit(key, prompt=FLAGGED_PROMPT)
    assert run_one(world, world.worker(Scripted(draw_flagged), make_moderator("off"))).status is (
        JobStatus.SUCCEEDED
    )


@dataclass
class SelfModerating(Scripted):
    """Stands for the relay: the vendor moderates, so the worker only caps the tolerance it forwards."""

    handles_moderation: bool = True


def test_an_engine_that_moderates_itself_gets_the_capped_tolerance_and_no_local_checks(world: World) -> None:
    key = world.key("10")
    world.submit(key, prompt=FLAGGED_PROMPT, safety_tolerance=5)
    engine = SelfModerating(draw_flagged)
    assert run_one(world, world.worker(engine, moderator(3))).status is JobStatus.SUCCEEDED
    assert [request.params.safety_tolerance for request in engine.seen] == [3]


@dataclass
class Batching:
    """A batching engine that draws the flagged picture for the prompts that ask for ellipses."""

    calls: list[int] = field(default_factory=list)
    max_batch: int = 4

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        return self.generate_batch([request], [hooks])[0]  # type: ignore[return-value]

    def plan(self, request: EngineRequest) -> EngineRequest:
        return request

    def batch_key(self, plan: EngineRequest) -> Hashable | None:
        return (plan.width, plan.height)

    def generate_batch(
        self, plans: Sequence[EngineRequest], hooks: Sequence[EngineHooks]
    ) -> list[EngineResult | JobCanceled]:
        self.calls.append(len(plans))
        return [
            draw_flagged(plan, hook) if "ellipses" in plan.prompt else paint(plan, hook)
            for plan, hook in zip(plans, hooks, strict=True)
        ]


def test_in_a_batch_only_the_flagged_image_is_refused(world: World) -> None:
    key = world.key("10")
    prompts = [BENIGN_PROMPT, "pink ellipses on green", BENIGN_PROMPT]
    jobs = [world.submit(key, prompt=prompt) for prompt in prompts]
    engine = Batching()
    first = world.stores.claims.claim("test-worker")
    assert first is not None
    world.worker(engine, moderator()).process(first)  # type: ignore[arg-type]
    assert engine.calls == [3]
    done = [world.stores.submissions.get(job.id) for job in jobs]
    statuses = [job.status if job else None for job in done]
    assert statuses == [JobStatus.SUCCEEDED, JobStatus.CONTENT_MODERATED, JobStatus.SUCCEEDED]
    assert world.balance(key) == Decimal("10") - 2 * Decimal("2.5")  # two delivered, one refunded


# The OpenAI dialect in process: the app without worker processes, and a real worker thread beside it


@pytest.fixture
def openai_app(tmp_path: Path) -> Iterator[tuple[TestClient, Services, Claims]]:
    settings = Settings(data_dir=tmp_path, workers=0, poll_seconds=0.05)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.services, app.state.runtime.stores.claims


@contextmanager
def worker_thread(services: Services, claims: Claims, engine: Scripted) -> Iterator[None]:
    """A real worker on the app's store and files, with the real moderator, until the block ends."""
    worker = Worker(
        "openai-worker",
        claims,
        OneEngine(engine),
        services.blobs,
        InputLoader(services.blobs, 2**22),
        StyleCueEnhancer(),
        heartbeat_seconds=30.0,
        stale_after_seconds=60.0,
        engine_stall_seconds=600.0,
        max_attempts=3,
        poll_seconds=0.05,
        moderator=moderator(),
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def images(client: TestClient, services: Services, n: int, prompt: str) -> httpx.Response:
    key = services.keys.create(f"k-{uuid.uuid4().hex[:6]}", Decimal("100")).key
    body = {"model": "flux-dev", "prompt": prompt, "n": n, "size": "256x256", "response_format": "b64_json"}
    return client.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"})


OpenAIApp = tuple[TestClient, Services, Claims]


def test_openai_leaves_out_only_the_refused_image_of_n(openai_app: OpenAIApp) -> None:
    client, services, claims = openai_app
    calls: list[int] = []

    def second_flagged(request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        calls.append(1)
        return draw_flagged(request, hooks) if len(calls) == 2 else paint(request, hooks)

    with worker_thread(services, claims, Scripted(second_flagged)):
        response = images(client, services, 3, BENIGN_PROMPT)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    (refused,) = response.headers["X-Moderated-Job-Ids"].split(",")
    assert refused in response.headers["X-Job-Ids"].split(",")
    job = services.jobs.get(refused)
    assert job is not None and job.status is JobStatus.CONTENT_MODERATED


def test_openai_answers_content_policy_violation_when_every_image_is_refused(
    openai_app: tuple[TestClient, Services, Claims],
) -> None:
    client, services, claims = openai_app
    with worker_thread(services, claims, Scripted(paint)):
        response = images(client, services, 2, FLAGGED_PROMPT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation"
    assert error["message"].startswith("Request Moderated: prompt: the text check")
