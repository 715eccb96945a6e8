"""The diffusers engine on a real tiny FLUX pipeline: saved, loaded back with from_pretrained, and run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxserve.core.catalog import Catalog, ModelEntry
from fluxserve.engines import registry as registry_module
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.flux.planning import generation_size
from fluxserve.engines.registry import EngineRegistry
from fluxserve.errors import EngineError, JobCanceled
from tests.support.engine_fixtures import Recorder, entry, gradient, png, request, solid, tiny_weights


@pytest.fixture(scope="module")
def weights(models_dir: Path) -> Path:
    return tiny_weights(models_dir)


@pytest.fixture(scope="module")
def flux(weights: Path) -> FluxModel:
    return FluxModel(weights)


def engine_for(flux: FluxModel, **fields: Any) -> DiffusersFluxEngine:
    return DiffusersFluxEngine(flux.weights, entry(**fields), flux)


def run(engine: DiffusersFluxEngine, recorder: Recorder | None = None, **fields: Any) -> Any:
    return engine.generate(request(**fields), (recorder or Recorder()).hooks)


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "generated"),
    [
        (64, 64, None, None),
        (96, 48, None, None),
        (48, 112, None, None),
        (1440, 256, 16384, "272x48"),
        (256, 512, 16384, "80x160"),
    ],
)
def test_text_to_image_has_the_exact_requested_size(
    flux: FluxModel, width: int, height: int, max_pixels: int | None, generated: str | None
) -> None:
    result = run(engine_for(flux, max_pixels=max_pixels), width=width, height=height)
    assert result.image.mode == "RGB"
    assert result.image.size == (width, height)
    assert result.details["pipeline"] == "text2image"
    assert result.details.get("generated_size") == generated
    assert (result.prompt, result.seed) == ("a red fox in the snow", 7)


def test_generation_size_keeps_aspect_within_the_budget() -> None:
    assert generation_size(1024, 768, None) == (1024, 768)
    assert generation_size(1024, 768, 0) == (1024, 768)
    assert generation_size(256, 256, 65536) == (256, 256)
    width, height = generation_size(2752, 1536, 65536)  # ultra 16:9
    assert width * height <= 65536 and width % 16 == 0 and height % 16 == 0
    assert abs(width / height - 2752 / 1536) < 0.05
    assert width * height > 0.8 * 65536


def test_native_size_generates_at_its_square_whatever_the_request() -> None:
    """The bundled model knows 128x128 only (catalog option native_size); the budget then does not matter."""
    for width, height in ((1024, 768), (1440, 256), (256, 1440), (256, 256)):
        assert generation_size(width, height, 16384, 16, 128) == (128, 128)
        assert generation_size(width, height, None, 16, 128) == (128, 128)


def test_same_seed_same_bytes_across_loads_and_other_seeds_differ(flux: FluxModel, weights: Path) -> None:
    engine = engine_for(flux)
    first = png(run(engine, seed=11).image)
    assert png(run(engine, seed=11).image) == first
    reloaded = DiffusersFluxEngine(weights, entry())
    assert png(run(reloaded, seed=11).image) == first
    assert png(run(engine, seed=12).image) != first
    assert png(run(engine, seed=11, prompt="a blue boat").image) != first


def test_steps_and_guidance_come_from_request_then_catalog_then_defaults(flux: FluxModel) -> None:
    recorder = Recorder()
    result = run(engine_for(flux, steps=3, guidance=2.0), recorder)
    assert (result.details["steps"], result.details["guidance"], len(recorder.fractions)) == (3, 2.0, 3)
    result = run(engine_for(flux, steps=3, guidance=2.0), steps=1, guidance=4.5)
    assert (result.details["steps"], result.details["guidance"]) == (1, 4.5)
    defaults = DiffusersFluxEngine(flux.weights, ModelEntry(weights="builtin:tiny"), flux)
    result = run(defaults, width=16, height=16)
    assert (result.details["steps"], result.details["guidance"]) == (28, 3.5)
    # A route's documented default (the reseller's flux-dev: 40 steps, guidance 2.5) the request did not name
    # gives way to the model's own; named, or with no catalog setting, it stands.
    route_default = {"steps": 4, "guidance": 2.5}
    result = run(engine_for(flux, steps=3, guidance=2.0), **route_default, defaulted=["steps", "guidance"])
    assert (result.details["steps"], result.details["guidance"]) == (3, 2.0)
    result = run(engine_for(flux, steps=3, guidance=2.0), **route_default, defaulted=["guidance"])
    assert (result.details["steps"], result.details["guidance"]) == (4, 2.0)
    result = run(defaults, width=16, height=16, **route_default, defaulted=["steps", "guidance"])
    assert (result.details["steps"], result.details["guidance"]) == (4, 2.5)


def test_true_cfg_guides_against_the_empty_prompt_on_every_path(flux: FluxModel) -> None:
    """The catalog's true_cfg_scale gives the image the stock pipeline gives with an empty negative prompt."""
    guided = engine_for(flux, options={"true_cfg_scale": 3.0})
    result = run(guided, seed=5)
    plain = run(engine_for(flux), seed=5)
    assert result.details["true_cfg_scale"] == 3.0
    assert "true_cfg_scale" not in plain.details
    expected = flux.text2image(
        prompt="a red fox in the snow",
        negative_prompt="",
        true_cfg_scale=3.0,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(5),
        max_sequence_length=guided.max_sequence_length,
    ).images[0]
    assert png(result.image) == png(expected.convert("RGB"))
    assert png(result.image) != png(plain.image)
    edit = run(guided, model="flux-kontext-pro", images=[gradient()])
    assert edit.details["pipeline"] == "kontext" and edit.details["true_cfg_scale"] == 3.0
    assert png(edit.image) != png(run(engine_for(flux), model="flux-kontext-pro", images=[gradient()]).image)
    with pytest.raises(EngineError, match="true_cfg_scale"):
        engine_for(flux, options={"true_cfg_scale": 0.5})


def test_kontext_uses_the_input_image(flux: FluxModel) -> None:
    engine = engine_for(flux, max_pixels=4096)
    plain = run(engine, model="flux-kontext-pro", width=96, height=64)
    edited = run(engine, model="flux-kontext-pro", width=96, height=64, images=[gradient()])
    other = run(engine, model="flux-kontext-pro", width=96, height=64, images=[solid("blue")])
    assert plain.details["pipeline"] == "text2image"
    assert edited.details["pipeline"] == "kontext"
    assert edited.image.size == (96, 64)
    assert len({png(plain.image), png(edited.image), png(other.image)}) == 3


def test_kontext_references_are_fitted_to_the_generation_budget(flux: FluxModel) -> None:
    """A large reference is scaled down to the output's pixel budget: never a ~1 MP default."""
    started = time.monotonic()
    result = run(
        engine_for(flux, max_pixels=4096), model="flux-kontext-max", images=[solid("red", (1024, 1024))]
    )
    assert result.image.size == (64, 64)
    assert time.monotonic() - started < 5


def test_image_prompt_runs_img2img_with_the_documented_strength(flux: FluxModel) -> None:
    engine = engine_for(flux, steps=4)
    plain = run(engine)
    default = run(engine, image_prompt=gradient())
    assert default.details["pipeline"] == "img2img"
    assert default.details["image_prompt_strength"] == 0.25  # flux-dev has no strength field
    assert default.image.size == (64, 64)
    assert png(default.image) != png(plain.image)

    def ultra(image: Image.Image, strength: float) -> Any:
        return run(engine, model="flux-pro-1.1-ultra", image_prompt=image, image_prompt_strength=strength)

    # 0 = prompt only: the image is ignored, exactly text-to-image.
    assert ultra(gradient(), 0.0).details["pipeline"] == "text2image"
    assert png(ultra(gradient(), 0.0).image) == png(ultra(solid("red"), 0.0).image) == png(plain.image)
    # 1 = image only: one step at the lowest noise level; the image prompt decides the picture.
    image_only = ultra(gradient(), 1.0)
    assert image_only.details["denoise"] == 0.25
    assert png(image_only.image) != png(ultra(solid("red"), 1.0).image)
    assert png(image_only.image) != png(plain.image)


def test_progress_reports_each_step_up_to_one(flux: FluxModel) -> None:
    recorder = Recorder()
    run(engine_for(flux, steps=4), recorder)
    assert recorder.fractions == [0.25, 0.5, 0.75, 1.0]
    recorder = Recorder()
    run(engine_for(flux, steps=4), recorder, image_prompt=gradient(), image_prompt_strength=0.5)
    assert recorder.fractions == [0.5, 1.0]  # img2img runs half the schedule, still ends at 1.0


def test_cancellation_stops_at_the_next_step(flux: FluxModel) -> None:
    recorder = Recorder(cancel_after=2)
    with pytest.raises(JobCanceled):
        run(engine_for(flux, steps=6), recorder)
    assert recorder.fractions == [1 / 6, 2 / 6]
    assert run(engine_for(flux), Recorder()).image.size == (64, 64)  # the engine is usable afterwards


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (
            {"model": "flux-kontext-pro", "images": [solid("red", (64, 64)), solid("red", (65, 64))]},
            "input_image_2",
        ),
        ({"model": "flux-kontext-pro", "images": [solid("red", (80, 80))]}, "input_image"),
        ({"image_prompt": solid("red", (100, 50))}, "image_prompt"),
    ],
)
def test_oversized_inputs_are_refused_before_any_work(
    flux: FluxModel, fields: dict[str, Any], name: str
) -> None:
    recorder = Recorder()
    with pytest.raises(EngineError, match=rf"^{name}: .* at most 4096 pixels"):
        run(engine_for(flux, max_input_pixels=4096), recorder, **fields)
    assert recorder.fractions == []


def test_input_images_on_a_text_route_are_refused(flux: FluxModel) -> None:
    with pytest.raises(EngineError, match=r"^input_image: flux-dev does not take input images"):
        run(engine_for(flux), images=[solid("red")])


def test_pipeline_failures_become_engine_errors(flux: FluxModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong traceback follows")

    engine = engine_for(flux)
    monkeypatch.setattr(engine.model, "text2image", explode)
    with pytest.raises(EngineError) as caught:
        run(engine)
    assert str(caught.value) == "flux-dev: generation failed: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_unloadable_weights_are_an_engine_error(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(EngineError, match="cannot load FLUX weights from"):
        FluxModel(tmp_path)


def catalog(**models: dict[str, Any]) -> Catalog:
    return Catalog.model_validate({"models": models})


def test_registry_loads_each_weights_folder_once(
    models_dir: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    original = FluxPipeline.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FluxPipeline], path: Any, **kwargs: Any) -> FluxPipeline:
        loads.append(str(path))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(counting))
    tiny = {"weights": "builtin:tiny", "steps": 2}
    registry = EngineRegistry(
        catalog(
            **{
                "flux-dev": tiny,
                "flux-pro": tiny,
                "flux-kontext-max": {**tiny, "steps": 4},
                "flux-pro-1.1": {"weights": str(weights), "steps": 2},
            }
        ),
        models_dir,
    )
    dev, pro, kontext = registry.get("flux-dev"), registry.get("flux-pro"), registry.get("flux-kontext-max")
    assert dev is registry.get("flux-dev")
    assert dev is pro  # identical entries on one folder: one engine
    assert kontext is not dev and kontext.model is dev.model  # type: ignore[attr-defined]
    assert registry.get("flux-pro-1.1").model is dev.model  # type: ignore[attr-defined]
    assert loads == [str(weights)]
    recorder = Recorder()
    assert kontext.generate(request("flux-kontext-max"), recorder.hooks).details["steps"] == 4


def test_registry_names_what_it_cannot_serve(models_dir: Path, tmp_path: Path) -> None:
    registry = EngineRegistry(
        catalog(
            **{
                "flux-pro": {"engine": "relay"},
                "flux-dev": {"weights": "builtin:bundled"},
                "flux-pro-1.1": {"weights": str(tmp_path)},
                "flux-kontext-pro": {"weights": "builtin:huge"},
                "flux-kontext-max": {},
            }
        ),
        models_dir,
    )
    expected = {
        "flux-pro": "relay options: base_url: Field required",
        "flux-pro-1.1": "not a diffusers pipeline folder",
        "flux-kontext-pro": "unknown built-in weights 'builtin:huge'",
        "flux-kontext-max": "the catalog names no weights",
        "nope": "not in the catalog",
    }
    for model, message in expected.items():
        with pytest.raises(EngineError, match=message):
            registry.get(model)


def test_registry_resolves_bundled_weights_once_installed(
    models_dir: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = {"weights": "builtin:bundled", "steps": 2}
    registry = EngineRegistry(catalog(**{"flux-dev": bundled}), models_dir)
    monkeypatch.setattr(registry_module, "BUNDLED_WEIGHTS", tmp_path / "bundled")
    with pytest.raises(EngineError, match="bundled weights not installed"):
        registry.get("flux-dev")
    monkeypatch.setattr(registry_module, "BUNDLED_WEIGHTS", weights)
    assert registry.resolve_weights("flux-dev", ModelEntry.model_validate(bundled)) == weights
