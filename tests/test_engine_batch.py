"""Batching: compatible jobs share one pipeline call, and each gets exactly the image it gets alone."""

from __future__ import annotations

import pytest

from engine_fixtures import Recorder, entry, gradient, png, request, tiny_weights
from fluxserve.engines.diffusers_flux import DiffusersFluxEngine
from fluxserve.errors import EngineError, JobCanceled


@pytest.fixture(scope="module", params=[1.0, 3.0], ids=["plain", "true-cfg"])
def engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> DiffusersFluxEngine:
    weights = tiny_weights(tmp_path_factory.mktemp("models"))
    options = {"max_batch": 4, "true_cfg_scale": request.param}
    return DiffusersFluxEngine(weights, entry(steps=3, max_pixels=4096, options=options))


PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "a red fox in the snow")


def batch_requests(**fields: object) -> list:
    return [
        request("flux-pro", prompt=prompt, seed=seed, width=96, height=64, **fields)
        for prompt, seed in zip(PROMPTS, (1, 2, 3, 4), strict=True)
    ]


def test_a_batch_gives_each_job_its_solo_image(engine: DiffusersFluxEngine) -> None:
    requests = batch_requests(interval=2)
    assert engine.max_batch == 4
    assert len({engine.batch_key(r) for r in requests}) == 1
    recorders = [Recorder() for _ in requests]
    batched = engine.generate_batch(requests, [r.hooks for r in recorders])
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
    base = request("flux-pro")
    assert engine.batch_key(base) == engine.batch_key(request("flux-dev", prompt="other", seed=99))
    assert engine.batch_key(request(steps=5)) != engine.batch_key(base)
    assert engine.batch_key(request(width=128)) != engine.batch_key(base)
    assert engine.batch_key(request(guidance=2.0)) != engine.batch_key(base)
    assert engine.batch_key(request(image_prompt=gradient())) is None
    assert engine.batch_key(request("flux-kontext-pro", images=[gradient()])) is None
    with pytest.raises(ValueError, match="cannot share a pipeline call"):
        engine.generate_batch([base, request(steps=5)], [Recorder().hooks] * 2)
    with pytest.raises(EngineError, match=r"^input_image"):
        engine.batch_key(request("flux-dev", images=[gradient()]))


def test_a_canceled_job_leaves_the_batch_and_the_others_finish(engine: DiffusersFluxEngine) -> None:
    requests = batch_requests()[:3]
    recorders = [Recorder(), Recorder(cancel_after=1), Recorder()]
    results = engine.generate_batch(requests, [r.hooks for r in recorders])
    assert isinstance(results[1], JobCanceled)
    assert recorders[1].fractions == [1 / 3]
    solo = engine.generate(requests[0], Recorder().hooks)
    assert png(results[0].image) == png(solo.image)  # type: ignore[union-attr]
    everyone = [Recorder(cancel_after=2) for _ in requests]
    assert all(
        isinstance(r, JobCanceled) for r in engine.generate_batch(requests, [r.hooks for r in everyone])
    )
    assert everyone[0].fractions == [1 / 3, 2 / 3]  # stopped as soon as nobody was left
