"""The FLUX.2 and Fill engines on real tiny pipelines: saved, loaded back with from_pretrained, and run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from fluxserve.core.catalog import Catalog
from fluxserve.engines.base import NamedImage
from fluxserve.engines.flux.fill import FillEngine, FillModel
from fluxserve.engines.flux.flux2 import Flux2Engine, Flux2Model
from fluxserve.engines.flux.options import LoadOptions
from fluxserve.engines.registry import EngineRegistry
from fluxserve.errors import EngineError, JobCanceled
from tests.support.engine_fixtures import Recorder, entry, gradient, png, request, solid
from tests.support.tiny_pipelines import tiny_pipeline

KLEIN = "flux-2-klein-4b"
PRO = "flux-2-pro"
FILL = "flux-pro-1.0-fill"
EXPAND = "flux-pro-1.0-expand"


@pytest.fixture(scope="module")
def dev(models_dir: Path) -> Flux2Model:
    return Flux2Model(tiny_pipeline(models_dir, "tiny-flux2-dev"))


@pytest.fixture(scope="module")
def klein(models_dir: Path) -> Flux2Model:
    return Flux2Model(tiny_pipeline(models_dir, "tiny-flux2-klein"))


@pytest.fixture(scope="module")
def fill(models_dir: Path) -> FillModel:
    return FillModel(tiny_pipeline(models_dir, "tiny-flux-fill"))


def flux2(model: Flux2Model, **fields: Any) -> Flux2Engine:
    return Flux2Engine(model.weights, entry(**fields), model)


def filler(model: FillModel, **fields: Any) -> FillEngine:
    return FillEngine(model.weights, entry(**fields), model)


def run(engine: Flux2Engine | FillEngine, model: str, recorder: Recorder | None = None, **fields: Any) -> Any:
    return engine.generate(request(model, **fields), (recorder or Recorder()).hooks)


def named(**images: Image.Image) -> list[NamedImage]:
    return [NamedImage(field, image) for field, image in images.items()]


def test_flux2_dev_and_klein_make_the_asked_size_and_seeds_are_deterministic(
    dev: Flux2Model, klein: Flux2Model
) -> None:
    recorder = Recorder()
    image = run(flux2(dev), PRO, recorder, width=96, height=64, seed=3)
    assert image.image.size == (96, 64) and image.image.mode == "RGB"
    assert image.details == {"pipeline": "Flux2Pipeline", "steps": 2, "guidance": 4.0}
    assert recorder.fractions == [0.5, 1.0]
    assert png(run(flux2(dev), PRO, width=96, height=64, seed=3).image) == png(image.image)
    assert png(run(flux2(dev), PRO, width=96, height=64, seed=4).image) != png(image.image)
    edited = run(flux2(dev), PRO, width=96, height=64, seed=3, images=[gradient((96, 64))])
    assert edited.details["references"] == 1 and png(edited.image) != png(image.image)
    small = run(flux2(klein, max_pixels=64 * 64), KLEIN, width=128, height=64)
    assert small.image.size == (128, 64)
    assert small.details["pipeline"] == "Flux2KleinPipeline"
    assert small.details["guidance"] == "unused: step-distilled model"
    assert small.details["generated_size"] == "64x32"


def test_references_reach_the_pipeline_in_order(klein: Flux2Model) -> None:
    engine = flux2(klein)
    plain = png(run(engine, KLEIN).image)
    red = run(engine, KLEIN, images=[gradient((64, 64))])
    assert red.details["references"] == 1
    outputs = {
        plain,
        png(red.image),
        png(run(engine, KLEIN, images=[solid("blue", (64, 64))]).image),
        png(run(engine, KLEIN, images=[gradient((64, 64)), solid("blue", (64, 64))]).image),
        png(run(engine, KLEIN, images=[solid("blue", (64, 64)), gradient((64, 64))]).image),
    }
    assert len(outputs) == 5
    small = run(engine, KLEIN, images=[solid("green", (40, 24))])  # under the pipeline's 64-pixel minimum
    assert small.image.size == (64, 64)
    with pytest.raises(EngineError, match=r"^input_image_2: 720x80 is more elongated than 8:1"):
        run(engine, KLEIN, images=[gradient((64, 64)), solid("red", (720, 80))])
    prompted = run(engine, KLEIN, images=[gradient((64, 64))], image_prompt=solid("blue", (64, 64)))
    assert prompted.details["references"] == 2  # the reseller's image_prompt is one more reference
    assert png(prompted.image) == png(
        run(engine, KLEIN, images=[gradient((64, 64)), solid("blue", (64, 64))]).image
    )
    with pytest.raises(EngineError, match=r"^input_image: 64x64 is 4096 pixels; flux-2-klein-4b accepts at"):
        run(flux2(klein, max_input_pixels=4000), KLEIN, images=[gradient((64, 64))])


def test_klein_base_guides_with_true_cfg_and_distilled_klein_ignores_guidance(
    models_dir: Path, klein: Flux2Model
) -> None:
    base = flux2(Flux2Model(tiny_pipeline(models_dir, "tiny-flux2-klein-base")))
    assert png(run(base, KLEIN, guidance=1.5).image) != png(run(base, KLEIN, guidance=4.0).image)
    assert run(base, KLEIN).details["guidance"] == 4.0
    distilled = flux2(klein)
    assert png(run(distilled, KLEIN, guidance=1.5).image) == png(run(distilled, KLEIN, guidance=4.0).image)


def test_fill_repaints_the_mask_and_keeps_every_other_pixel(fill: FillModel) -> None:
    source = gradient((80, 48))  # not a multiple of 16: generated at 80x48, the size rule's size kept
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (16, 16, 48, 40))
    result = run(filler(fill), FILL, images=named(image=source, mask=mask), width=80, height=48)
    assert result.image.size == (80, 48)
    assert result.details["pipeline"] == "fill"
    kept = ImageChops.difference(result.image, source)
    assert kept.crop((0, 0, 80, 16)).getbbox() is None and kept.crop((48, 0, 80, 48)).getbbox() is None
    assert kept.crop((16, 16, 48, 40)).getbbox() is not None  # the masked part was painted
    transparent = source.convert("RGBA")
    transparent.putalpha(ImageChops.invert(mask))
    from_alpha = run(filler(fill), FILL, images=named(image=transparent), width=80, height=48)
    assert png(from_alpha.image) == png(result.image)  # the same mask, from the image's alpha
    with pytest.raises(EngineError, match=r"^mask: is required"):
        run(filler(fill), FILL, images=named(image=source), width=80, height=48)


def test_expand_grows_the_canvas_around_the_unchanged_image(fill: FillModel) -> None:
    source = gradient((48, 32))
    margins = {"left": 16, "top": 16, "right": 0, "bottom": 16}
    result = run(filler(fill), EXPAND, images=named(image=source), width=64, height=64, **margins)
    assert result.image.size == (64, 64)
    assert result.details["pipeline"] == "expand"
    assert ImageChops.difference(result.image.crop((16, 16, 64, 48)), source).getbbox() is None
    assert result.image.crop((0, 0, 64, 16)).getextrema() != ((0, 0), (0, 0), (0, 0))  # painted, not blank
    with pytest.raises(EngineError, match=r"^image: is required"):
        run(filler(fill), EXPAND, width=64, height=64, **margins)


def test_cancellation_and_pipeline_failures(klein: Flux2Model, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobCanceled):
        run(flux2(klein), KLEIN, Recorder(cancel_after=1))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory\nmore detail")

    engine = flux2(klein)
    monkeypatch.setattr(engine.model.pipe.transformer, "forward", broken)
    with pytest.raises(EngineError, match=r"^flux-2-klein-4b: generation failed: CUDA out of memory$"):
        run(engine, KLEIN)


def test_loading_knobs_apply_and_flux1_only_ones_are_refused(models_dir: Path, klein: Flux2Model) -> None:
    weights = tiny_pipeline(models_dir, "tiny-flux2-klein")
    baseline = png(run(flux2(klein), KLEIN).image)
    offloaded = Flux2Engine(weights, entry(options={"cpu_offload": True}))
    assert hasattr(offloaded.model.pipe.transformer, "_hf_hook")
    assert png(run(offloaded, KLEIN).image) == baseline
    assert png(run(offloaded, KLEIN).image) == baseline  # the hooks re-arm after each call
    math = Flux2Engine(weights, entry(options={"attention": "_native_math"}))
    processor = math.model.pipe.transformer.transformer_blocks[0].attn.processor
    assert processor._attention_backend == "_native_math"
    assert run(math, KLEIN).image.size == (64, 64)
    pytest.importorskip("torchao")
    small = Flux2Engine(weights, entry(options={"quantize": "int8", "vae_tiling": True}))
    pipe = small.model.pipe
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__module__.startswith("torchao")
    assert type(pipe.text_encoder.model.layers[0].self_attn.q_proj.weight).__module__.startswith("torchao")
    assert pipe.vae.use_tiling and small.model.nbytes < klein.nbytes
    assert run(small, KLEIN).image.size == (64, 64)
    with pytest.raises(EngineError, match=r"^options.attention='flash': "):
        Flux2Model(weights, LoadOptions(attention="flash"))  # needs flash-attn and a GPU
    with pytest.raises(EngineError, match=r"^catalog options: true_cfg_scale: FLUX.1 routes only"):
        Flux2Engine(weights, entry(options={"true_cfg_scale": 3.0}))


def test_registry_picks_the_engine_by_the_weights_folder(models_dir: Path) -> None:
    folders = {name: str(tiny_pipeline(models_dir, name)) for name in ("tiny-flux2-klein", "tiny-flux-fill")}
    fill = {"weights": folders["tiny-flux-fill"], "steps": 2}
    catalog = {
        KLEIN: {"weights": folders["tiny-flux2-klein"], "steps": 2, "options": {"warmup": [[64, 64]]}},
        FILL: fill,
        EXPAND: fill,
        "flux-dev": fill,
        "flux-pro": {"weights": "builtin:tiny"},
        PRO: {"weights": folders["tiny-flux2-klein"], "options": {"max_batch": 2}},
    }
    with pytest.raises(EngineError, match=r"^flux-2-pro: catalog options: max_batch: FLUX.1 routes only"):
        EngineRegistry(Catalog.model_validate({"models": catalog}), models_dir)
    del catalog[PRO]
    registry = EngineRegistry(Catalog.model_validate({"models": catalog}), models_dir)
    assert list(registry.warm_up()) == [KLEIN]  # the models with warm-up sizes
    assert isinstance(registry.get(KLEIN), Flux2Engine)
    fill_engine, expand_engine = registry.get(FILL), registry.get(EXPAND)
    assert isinstance(fill_engine, FillEngine) and isinstance(expand_engine, FillEngine)
    assert fill_engine.model is expand_engine.model  # one copy of the Fill weights
    with pytest.raises(EngineError, match=r"^flux-dev: .* holds FluxFillPipeline weights, which serve"):
        registry.get("flux-dev")
    assert type(registry.get("flux-pro")).__name__ == "DiffusersFluxEngine"
    with pytest.raises(EngineError, match=r"holds a FluxPipeline pipeline; this route needs one of Flux2"):
        Flux2Model(models_dir / "tiny")


def test_unloadable_weights_folders_are_named(tmp_path: Path, models_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    catalog = Catalog.model_validate({"models": {KLEIN: {"weights": str(broken)}}})
    with pytest.raises(EngineError, match=r"/broken/model_index.json: unreadable"):
        EngineRegistry(catalog, models_dir).get(KLEIN)
    with pytest.raises(EngineError, match=r"^cannot load weights from .*/broken: "):
        Flux2Model(broken)
    (broken / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    with pytest.raises(EngineError, match=r"^cannot load Flux2KleinPipeline weights from .*/broken: "):
        Flux2Model(broken)


def test_warm_up_runs_each_size_and_the_compile_knob_wraps_the_transformer(
    klein: Flux2Model, fill: FillModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiling for real is FLUX.1's test (test_engine_options): the same compile_transformer, and
    Dynamo on this transformer costs seconds more than the whole module's budget."""
    references: list[int] = []
    engine = flux2(klein, options={"warmup": [[64, 64], [96, 64]]})
    monkeypatch.setattr(engine, "generate", lambda request, hooks: references.append(len(request.images)))
    assert engine.warm_up(KLEIN) >= 0
    assert references == [0, 1, 0, 1]  # each size without and with a reference
    assert filler(fill, options={"warmup": [[64, 48]]}).warm_up(FILL) > 0  # a real fill step
    compiled = Flux2Engine(klein.weights, entry(options={"compile": True, "compile_backend": "eager"}))
    assert hasattr(compiled.model.pipe.transformer.forward, "_torchdynamo_orig_callable")
