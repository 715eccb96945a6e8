"""Finetunes on the diffusers engine: LoRA adapters made in the test, in a real tiny FLUX pipeline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image

from fluxserve.engines.base import Adapter
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.flux2 import Flux2Engine, Flux2Model
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.flux.options import LoadOptions
from fluxserve.errors import EngineError
from tests.support.engine_fixtures import Recorder, entry, png, request, tiny_weights
from tests.support.loras import adapter, make_lora
from tests.support.tiny_pipelines import tiny_pipeline

# The adapter applied at strength 1 and the same adapter fused into the weights differ only by float
# rounding (the LoRA product added before or after the matmul): at most this much on any 8-bit channel.
FUSED_TOLERANCE = 2


@pytest.fixture(scope="module")
def weights(models_dir: Path) -> Path:
    return tiny_weights(models_dir)


@pytest.fixture(scope="module")
def loras(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    # Scaled up so that each changes the tiny model's image well beyond rounding.
    return [make_lora(weights, root / f"lora{seed}", seed=seed, scale=8.0) for seed in range(3)]


@pytest.fixture(scope="module")
def flux(weights: Path) -> FluxModel:
    return FluxModel(weights, LoadOptions(max_adapters=2))


def image(flux: FluxModel, finetune: Adapter | None = None, seed: int = 7) -> bytes:
    engine = DiffusersFluxEngine(flux.weights, entry(), flux)
    return png(engine.generate(request(seed=seed, adapter=finetune), Recorder().hooks).image)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_an_adapter_changes_the_image_and_strength_zero_is_the_base_bit_for_bit(
    flux: FluxModel, loras: list[Path]
) -> None:
    base = image(flux)
    assert image(flux, adapter(loras[0])) != base
    assert image(flux, adapter(loras[0], strength=0.0)) == base
    assert image(flux) == base, "a request without a finetune after one with it runs on the base weights"


def test_changing_only_the_strength_takes_effect(flux: FluxModel, loras: list[Path]) -> None:
    full = image(flux, adapter(loras[0], 1.0))
    half = image(flux, adapter(loras[0], 0.5))
    assert half != full
    assert image(flux, adapter(loras[0], 1.0)) == full


def test_strength_one_matches_the_adapter_fused_into_the_weights(weights: Path, loras: list[Path]) -> None:
    with_adapter = pixels(image(FluxModel(weights), adapter(loras[0])))
    fused = FluxModel(weights)
    fused.text2image.load_lora_weights(str(loras[0]))
    fused.text2image.fuse_lora(lora_scale=1.0)
    fused.text2image.unload_lora_weights()
    base = pixels(image(FluxModel(weights)))
    merged = pixels(image(fused))
    assert np.abs(merged - base).max() > 10 * FUSED_TOLERANCE, "the adapter must change the image to compare"
    assert np.abs(merged - with_adapter).max() <= FUSED_TOLERANCE


def test_the_loaded_adapters_are_bounded_and_a_reused_slot_gives_the_same_image(
    flux: FluxModel, loras: list[Path]
) -> None:
    first = image(flux, adapter(loras[0]))
    for lora in loras:  # three adapters through two slots
        image(flux, adapter(lora))
    assert len(flux.adapters.loaded) == 2
    assert len(flux.text2image.get_list_adapters()["transformer"]) == 2
    assert f"file:{loras[0]}" not in flux.adapters.loaded
    assert image(flux, adapter(loras[0])) == first, "swapped back into a reused slot"


def test_plans_batch_only_with_the_same_adapter_at_the_same_strength(
    flux: FluxModel, loras: list[Path]
) -> None:
    engine = DiffusersFluxEngine(flux.weights, entry(options={"max_batch": 4}), flux)

    def key(finetune: Adapter | None) -> object:
        return engine.batch_key(engine.plan(request(adapter=finetune)))

    assert key(adapter(loras[0])) == key(adapter(loras[0]))
    assert len({key(None), key(adapter(loras[0])), key(adapter(loras[1])), key(adapter(loras[0], 0.5))}) == 4
    plans = [engine.plan(request(seed=seed, adapter=adapter(loras[1]))) for seed in (1, 2)]
    batched = [png(result.image) for result in engine.generate_batch(plans, [Recorder().hooks] * 2)]  # type: ignore[union-attr]
    assert batched == [image(flux, adapter(loras[1]), seed=seed) for seed in (1, 2)]


def test_an_unreadable_adapter_fails_the_job_naming_the_finetune(flux: FluxModel) -> None:
    broken = Adapter("broken", "file:broken", 1.0, lambda: b"not a safetensors file")
    with pytest.raises(EngineError, match="finetune_id: broken: unreadable adapter file"):
        image(flux, broken)
    assert image(flux) == image(flux), "the model still runs"


def test_a_flux2_klein_model_runs_its_finetunes(models_dir: Path, tmp_path: Path) -> None:
    weights = tiny_pipeline(models_dir, "tiny-flux2-klein")
    lora = make_lora(
        weights, tmp_path, scale=8.0, pipeline=Flux2KleinPipeline, transformer_class=Flux2Transformer2DModel
    )
    engine = Flux2Engine(weights, entry(), Flux2Model(weights))

    def run(finetune: Adapter | None) -> bytes:
        result = engine.generate(request("flux-2-klein-4b-finetuned", adapter=finetune), Recorder().hooks)
        return png(result.image)

    base = run(None)
    assert run(adapter(lora)) != base
    assert run(adapter(lora, strength=0.0)) == base
