"""The operator's knobs in the catalog's ``options``, each run on the tiny pipeline on this CPU.

What a CPU cannot run (CUDA devices, flash attention) is exercised up to the point where the library
needs the GPU, and must fail there with an error that names the option.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fluxserve.core.catalog import Catalog
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.registry import EngineRegistry
from fluxserve.errors import EngineError
from tests.support.engine_fixtures import Recorder, entry, png, request, tiny_weights


@pytest.fixture(scope="module")
def weights(models_dir: Path) -> Path:
    return tiny_weights(models_dir)


@pytest.fixture(scope="module")
def baseline(weights: Path) -> bytes:
    return png(generate(engine(weights)).image)


def engine(weights: Path, **options: Any) -> DiffusersFluxEngine:
    return DiffusersFluxEngine(weights, entry(options=options))


def generate(engine: DiffusersFluxEngine, **fields: Any) -> Any:
    return engine.generate(request(**fields), Recorder().hooks)


def test_dtype_defaults_to_float32_on_cpu_and_bfloat16_runs(weights: Path) -> None:
    assert engine(weights).model.text2image.transformer.dtype == torch.float32
    bf16 = engine(weights, dtype="bfloat16")
    modules = [bf16.model.text2image.transformer, bf16.model.text2image.vae, bf16.model.kontext.transformer]
    assert {module.dtype for module in modules} == {torch.bfloat16}  # from_pipe kept the dtype
    assert generate(bf16).image.size == (64, 64)


def test_a_missing_device_is_named(weights: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EngineError, match=r"^options.device: 'cuda' is not available"):
        engine(weights, device="cuda")


def test_attention_backend_is_selected_or_refused_by_name(weights: Path) -> None:
    math = engine(weights, attention="_native_math")
    processor = math.model.text2image.transformer.transformer_blocks[0].attn.processor
    assert processor._attention_backend == "_native_math"
    assert generate(math).image.size == (64, 64)
    with pytest.raises(EngineError, match=r"^options.attention='flash': "):
        engine(weights, attention="flash")  # needs flash-attn and a GPU


def test_vae_tiling_decodes_in_tiles(weights: Path) -> None:
    tiled, plain = engine(weights, vae_tiling=True), engine(weights)
    assert tiled.model.text2image.vae.use_tiling
    size = {"width": 160, "height": 96}  # larger than the tiny VAE's 64-pixel tiles
    tiled_image, plain_image = generate(tiled, **size).image, generate(plain, **size).image
    assert tiled_image.size == (160, 96)
    assert png(tiled_image) != png(plain_image)  # the seams are blended: tiling really ran


def test_cpu_offload_installs_its_hooks_and_gives_the_same_image(weights: Path, baseline: bytes) -> None:
    offloaded = engine(weights, cpu_offload=True)
    assert hasattr(offloaded.model.text2image.transformer, "_hf_hook")
    assert png(generate(offloaded).image) == baseline
    assert png(generate(offloaded).image) == baseline  # the hooks re-arm after each call


def test_unknown_or_invalid_options_are_refused_when_the_registry_starts(models_dir: Path) -> None:
    models = {"flux-dev": {"weights": "builtin:tiny", "options": {"compil": True}}}
    with pytest.raises(EngineError, match=r"^flux-dev: catalog options: compil: Extra inputs"):
        EngineRegistry(Catalog.model_validate({"models": models}), models_dir)
    models = {"flux-dev": {"weights": "builtin:tiny", "options": {"dtype": "float64"}}}
    with pytest.raises(EngineError, match=r"^flux-dev: catalog options: dtype: "):
        EngineRegistry(Catalog.model_validate({"models": models}), models_dir)
    relay = {"flux-dev": {"engine": "relay", "options": {"url": "https://example.invalid"}}}
    EngineRegistry(
        Catalog.model_validate({"models": relay}), models_dir
    )  # not the diffusers engine's options


def test_routes_share_a_loaded_model_only_when_loading_options_agree(models_dir: Path) -> None:
    tiny = {"weights": "builtin:tiny", "steps": 2}
    registry = EngineRegistry(
        Catalog.model_validate(
            {
                "models": {
                    "flux-dev": tiny,
                    "flux-pro": {**tiny, "options": {"raw_guidance": 1.5}},
                    "flux-pro-1.1": {**tiny, "options": {"dtype": "bfloat16"}},
                }
            }
        ),
        models_dir,
    )
    dev, pro, bf16 = (registry.get(name) for name in ("flux-dev", "flux-pro", "flux-pro-1.1"))
    assert dev.model is pro.model  # type: ignore[attr-defined]
    assert bf16.model is not dev.model  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_weights_quantize_with_torchao(weights: Path, baseline: bytes, kind: str) -> None:
    pytest.importorskip("torchao")
    quantized = engine(weights, quantize=kind)
    layer = quantized.model.text2image.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.weight).__module__.startswith("torchao")
    t5_layer = quantized.model.text2image.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q
    assert type(t5_layer.weight).__module__.startswith("torchao")
    assert quantized.model.kontext.transformer is quantized.model.text2image.transformer
    image = generate(quantized).image
    assert image.size == (64, 64)
    assert quantized.model.nbytes < engine(weights).model.nbytes
    first = png(image)
    assert png(generate(quantized).image) == first  # still reproducible


def test_compiled_transformer_warms_up_and_gives_the_same_images(models_dir: Path, baseline: bytes) -> None:
    """The eager backend runs the torch.compile path (Dynamo) in seconds; inductor's C++ build is minutes."""
    tiny = {"weights": "builtin:tiny", "steps": 2}
    options = {"compile": True, "compile_backend": "eager", "warmup": [[64, 64], [96, 64]]}
    registry = EngineRegistry(
        Catalog.model_validate(
            {"models": {"flux-kontext-pro": {**tiny, "options": options}, "flux-dev": tiny}}
        ),
        models_dir,
    )
    timings = registry.warm_up()
    assert list(timings) == ["flux-kontext-pro"]  # only models with warm-up sizes
    compiled = registry.get("flux-kontext-pro")
    forward = compiled.model.text2image.transformer.forward  # type: ignore[attr-defined]
    assert hasattr(forward, "_torchdynamo_orig_callable")
    started = time.monotonic()
    assert png(generate(compiled, model="flux-kontext-pro").image) == baseline  # type: ignore[arg-type]
    assert time.monotonic() - started < 1  # no compilation left for a warmed size
    scheduled = generate(compiled, model="flux-pro", interval=1)  # type: ignore[arg-type]
    assert scheduled.details["guidance_per_step"][-1] == 1.0  # the guidance hook still runs
