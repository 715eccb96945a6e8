"""Route semantics that live in the engine: pro's interval, ultra's raw, kontext references and steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fluxserve.core.catalog import Catalog, load_catalog
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.flux.planning import reference_canvas
from fluxserve.engines.registry import EngineRegistry
from tests.conftest import TINY_CATALOG
from tests.support.engine_fixtures import Recorder, entry, gradient, png, request, solid, tiny_weights


@pytest.fixture(scope="module")
def flux(models_dir: Path) -> FluxModel:
    return FluxModel(tiny_weights(models_dir))


def run(flux: FluxModel, options: dict[str, Any] | None = None, **fields: Any) -> Any:
    engine = DiffusersFluxEngine(flux.weights, entry(steps=4, guidance=3.0, options=options or {}), flux)
    return engine.generate(request(**fields), Recorder().hooks)


def test_interval_is_a_guidance_schedule_over_noise_levels(flux: FluxModel) -> None:
    plain = run(flux, model="flux-pro")
    schedules = {}
    for interval in (1, 2, 4):
        result = run(flux, model="flux-pro", interval=interval)
        assert result.details["interval"] == interval
        schedules[interval] = result.details["guidance_per_step"]
        if interval == 4:
            assert png(result.image) == png(plain.image)  # constant guidance: plain FLUX
        else:
            assert png(result.image) != png(plain.image)
    assert schedules[4] == [3.0, 3.0, 3.0, 3.0]
    for values in schedules.values():
        assert values[0] == 3.0 and values == sorted(values, reverse=True)  # guided first, then 1.0
        assert set(values) <= {3.0, 1.0}
    assert schedules[1].count(3.0) < schedules[2].count(3.0) < schedules[4].count(3.0)


def test_interval_on_a_model_without_guidance_input_is_reported_unused(flux: FluxModel) -> None:
    flux.takes_guidance = False
    try:
        result = run(flux, model="flux-pro", interval=2)
    finally:
        flux.takes_guidance = True
    assert result.details["interval"].startswith("unused")
    assert "guidance_per_step" not in result.details


def test_raw_caps_guidance(flux: FluxModel) -> None:
    polished = run(flux, model="flux-pro-1.1-ultra")
    raw = run(flux, model="flux-pro-1.1-ultra", raw=True)
    assert (polished.details["guidance"], raw.details["guidance"], raw.details["raw"]) == (3.0, 2.0, True)
    assert png(raw.image) != png(polished.image)
    configured = run(flux, {"raw_guidance": 1.5}, model="flux-pro-1.1-ultra", raw=True)
    assert configured.details["guidance"] == 1.5


def test_references_are_stitched_side_by_side_within_the_budget() -> None:
    canvas = reference_canvas([solid("red", (100, 100)), solid("blue", (200, 100))], 64 * 64)
    assert canvas.width % 16 == 0 and canvas.height % 16 == 0
    assert canvas.width * canvas.height <= 64 * 64
    assert canvas.width / canvas.height == pytest.approx(3, rel=0.2)
    assert canvas.getpixel((2, canvas.height // 2)) == (255, 0, 0)
    assert canvas.getpixel((canvas.width - 2, canvas.height // 2)) == (0, 0, 255)
    huge = reference_canvas([solid("red", (4096, 4096))] * 4, 256 * 256)
    assert huge.width * huge.height <= 256 * 256


def test_every_kontext_reference_changes_the_output(flux: FluxModel) -> None:
    first, second = gradient(), solid("blue", (64, 64))
    one = run(flux, model="flux-kontext-pro", images=[first])
    two = run(flux, model="flux-kontext-pro", images=[first, second])
    swapped = run(flux, model="flux-kontext-pro", images=[second, first])
    four = run(flux, model="flux-kontext-pro", images=[first, second, first, second])
    assert (one.details["references"], two.details["references"], four.details["references"]) == (1, 2, 4)
    assert len({png(r.image) for r in (one, two, swapped, four)}) == 4
    assert four.image.size == (64, 64)


def test_kontext_max_runs_more_steps_than_kontext_pro(models_dir: Path) -> None:
    """The tests' catalog: kontext-max 4 steps, kontext-pro 2, on the one shared tiny model."""
    registry = EngineRegistry(load_catalog([TINY_CATALOG]), models_dir)
    for model, steps in (("flux-kontext-max", 4), ("flux-kontext-pro", 2)):
        recorder = Recorder()
        result = registry.get(model).generate(request(model, images=[gradient()]), recorder.hooks)
        assert (result.details["steps"], len(recorder.fractions)) == (steps, steps)


def test_image_prompt_runs_the_redux_prior_when_the_catalog_names_one(models_dir: Path) -> None:
    tiny = {"weights": "builtin:tiny", "steps": 2, "options": {"redux": "builtin:tiny-redux"}}
    registry = EngineRegistry(
        Catalog.model_validate({"models": {"flux-dev": tiny, "flux-pro-1.1-ultra": tiny}}), models_dir
    )
    dev, ultra = registry.get("flux-dev"), registry.get("flux-pro-1.1-ultra")
    assert dev.model is ultra.model and dev.model.redux is not None  # type: ignore[attr-defined]

    def image(engine: Any, model: str, picture: Any, prompt: str = "a red fox", strength: Any = None) -> Any:
        fields = {"image_prompt": picture, "image_prompt_strength": strength, "prompt": prompt}
        return engine.generate(request(model, **fields), Recorder().hooks)

    stock = image(dev, "flux-dev", gradient())
    assert (stock.details["pipeline"], stock.details["image_prompt_strength"]) == ("redux", 0.5)
    assert png(stock.image) != png(image(dev, "flux-dev", solid("blue")).image)  # the image is used
    plain = dev.generate(request("flux-dev", prompt="a red fox"), Recorder().hooks)
    assert png(stock.image) != png(plain.image)
    # ultra's strength cross-fades: 0 = prompt only, 1 = image only.
    assert png(image(ultra, "flux-pro-1.1-ultra", gradient(), strength=0.0).image) == png(plain.image)
    only_image = image(ultra, "flux-pro-1.1-ultra", gradient(), strength=1.0)
    other_prompt = image(ultra, "flux-pro-1.1-ultra", gradient(), prompt="a blue boat", strength=1.0)
    assert png(only_image.image) == png(other_prompt.image)
    assert png(only_image.image) != png(image(ultra, "flux-pro-1.1-ultra", solid("blue"), strength=1.0).image)
    redux_plan = dev.plan(request("flux-dev", image_prompt=gradient()))  # type: ignore[attr-defined]
    assert dev.batch_key(redux_plan) is None  # type: ignore[attr-defined]
