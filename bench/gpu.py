"""FLUX at full size on one GPU: seconds per image and peak GPU memory, to size a GPU for fluxserve.

    python -m bench.gpu [--root DIR] [--out result.json]     # on a CUDA GPU: the minimal set
    python -m bench.gpu --tiny                               # the same code on this CPU, tiny dimensions
    python -m bench.gpu --switch [--tiny]                    # cost of a worker switching models

The architectures are built from their published configurations (:data:`PUBLISHED`, no download) with
random weights and saved as diffusers folders under ``--root`` (kept: a second run reuses them). For
FLUX.1 [dev] at 1024x1024 and 28 steps, batch 1 and 4, each of plain bf16, torch.compile, and
torch.compile with fp8 compute (``quantize = "fp8-compute"``) is timed (a) as the diffusers pipeline
called directly in this process, PNG encoding included, with the knobs applied by fluxserve's own loading
code, and (b) through ``fluxserve serve`` (API, queue, worker process), from submit to PNG in hand; then
FLUX.2 [klein] 4B plain (4 steps, batch 1). An untimed round first at 2 steps (compilation and warm
caches for the same shapes), then one timed round. Peak memory is the direct run's
(``torch.cuda.max_memory_allocated``).

Text encoders are built at their published width, and so feed the transformer what the real ones do,
but with fewer layers (:data:`TEXT_LAYERS`; FLUX.2 keeps those it reads) and with byte-level tokenizers
made in code: their time per image is small next to the transformer's steps, and the published size of
each (for the memory table) is printed from the full configuration, counted without allocating.

Random weights make noise images, at the same cost as real ones.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from bench.engine import serve
from fluxserve.core.catalog import Catalog
from fluxserve.engines.flux.loading import compile_transformer, resolve_dtype, tune
from fluxserve.engines.flux.options import LoadOptions
from fluxserve.engines.registry import EngineRegistry
from fluxserve.engines.relay.vendor_api import VendorClient
from fluxserve.engines.tiny import _clip_tokenizer, _t5_tokenizer
from fluxserve.errors import UpstreamError

# The published configurations: black-forest-labs/FLUX.1-dev and FLUX.2-klein-4B, each component's
# config.json as diffusers and transformers read it (text encoders: CLIP ViT-L/14, T5 v1.1 XXL, Qwen3-4B).
PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    "flux1-dev": {
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
        "vae": {
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2,
            "latent_channels": 16,
            "norm_num_groups": 32,
            "sample_size": 1024,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "scheduler": {
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "max_image_seq_len": 4096,
            "max_shift": 1.15,
            "shift": 3.0,
            "use_dynamic_shifting": True,
        },
        "text_encoder": {  # CLIP ViT-L/14's text tower
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        "text_encoder_2": {  # T5 v1.1 XXL's encoder
            "vocab_size": 32128,
            "d_model": 4096,
            "d_kv": 64,
            "d_ff": 10240,
            "num_layers": 24,
            "num_heads": 64,
            "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
        },
    },
    "flux2-klein-4b": {
        "transformer": {
            "patch_size": 1,
            "in_channels": 128,
            "num_layers": 5,
            "num_single_layers": 20,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 7680,
            "timestep_guidance_channels": 256,
            "mlp_ratio": 3.0,
            "axes_dims_rope": [32, 32, 32, 32],
            "rope_theta": 2000,
            "guidance_embeds": False,
        },
        "vae": {},  # AutoencoderKLFlux2's defaults are the published ones
        "scheduler": {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"},
        "text_encoder": {  # Qwen3-4B
            "vocab_size": 151936,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
}

# --tiny: the same families with every width cut down (layer counts the pipelines read are kept).
TINY: dict[str, dict[str, dict[str, Any]]] = {
    "flux1-dev": {
        "transformer": {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 6, 6],
        },
        "vae": {"block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
        "text_encoder_2": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_heads": 2},
    },
    "flux2-klein-4b": {
        "transformer": {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 48,
            "timestep_guidance_channels": 16,
            "axes_dims_rope": [4, 4, 4, 4],
        },
        "vae": {"block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
        "text_encoder": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
        },
    },
}

# Text encoder layers built (of the published count): FLUX.1 reads the last layer's output, FLUX.2 [klein]
# the hidden states of layers 9, 18 and 27.
TEXT_LAYERS = {"flux1-dev": {"text_encoder": 1, "text_encoder_2": 1}, "flux2-klein-4b": {"text_encoder": 27}}
# The untimed round runs this many steps: the same shapes, so the same compiled graphs, in less time.
WARMUP_STEPS = 2
WAIT_SECONDS = 900  # for one round of jobs through the server, loading and compilation included
TEXT_LENGTH = 512  # FLUX's prompt tokens; the tiny run keeps its encoders' own short context

# The knobs timed: catalog options, as an operator writes them.
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "compile": {"compile": True},
    "compile+fp8": {"compile": True, "quantize": "fp8-compute"},
}
ROUTES = {"flux1-dev": "flux-dev", "flux2-klein-4b": "flux-2-klein-4b"}
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "flux1-dev": FluxPipeline,
    "flux2-klein-4b": Flux2KleinPipeline,
}


@dataclass
class Run:
    """One measured configuration (seconds and bytes None where it could not run, with the reason)."""

    family: str
    variant: str
    path: str
    batch: int
    seconds_per_image: float | None = None
    peak_gpu_bytes: int | None = None
    error: str | None = None


@dataclass
class Plan:
    device: str
    tiny: bool
    size: int
    steps: dict[str, int]
    batches: list[int]
    variants: list[str]
    max_pixels: int | None = None  # the catalog's: tiny runs generate 64x64 for the API's smallest size

    @property
    def generated(self) -> int:
        """The side the pipeline generates at (the direct call's size)."""
        return math.isqrt(self.max_pixels) if self.max_pixels else self.size


def plan(tiny: bool) -> Plan:
    if tiny:  # compile on the eager backend (Dynamo's path in seconds; inductor's C++ build is minutes)
        return Plan("cpu", True, 256, {"flux1-dev": 2, "flux2-klein-4b": 2}, [1, 2], list(VARIANTS), 64 * 64)
    return Plan("cuda", False, 1024, {"flux1-dev": 28, "flux2-klein-4b": 4}, [1, 4], list(VARIANTS))


def configs(family: str, tiny: bool) -> dict[str, dict[str, Any]]:
    published = PUBLISHED[family]
    scaled = TINY[family] if tiny else {}
    return {part: {**config, **scaled.get(part, {})} for part, config in published.items()}


@contextmanager
def building(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules made directly on ``device`` in ``dtype``: a 12B transformer is initialised on the GPU in
    seconds, where the CPU in float32 would take minutes and 48 GB."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_encoders(
    family: str, parts: dict[str, dict[str, Any]], layers: dict[str, int] | None
) -> dict[str, Any]:
    """The family's text encoders and tokenizers; ``layers`` None: the published depth (for sizes)."""
    depth = layers or {}
    if family == "flux1-dev":
        clip, t5 = _clip_tokenizer(), _t5_tokenizer()
        if layers is not None and parts["text_encoder_2"]["d_model"] > 32:
            t5.model_max_length = TEXT_LENGTH
        clip_config = {**parts["text_encoder"], "num_hidden_layers": depth.get("text_encoder", 12)}
        t5_config = {**parts["text_encoder_2"], "num_layers": depth.get("text_encoder_2", 24)}
        special = {"pad_token_id": t5.pad_token_id, "eos_token_id": t5.eos_token_id}
        return {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_config, bos_token_id=0, eos_token_id=1)),
            "tokenizer": clip,
            "text_encoder_2": T5EncoderModel(T5Config(**t5_config, **special)),
            "tokenizer_2": t5,
        }
    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    qwen = {**parts["text_encoder"], "num_hidden_layers": depth.get("text_encoder", 36)}
    return {"text_encoder": Qwen3ForCausalLM(Qwen3Config(**qwen, pad_token_id=0)), "tokenizer": tokenizer}


def pipeline(family: str, tiny: bool, layers: dict[str, int] | None) -> DiffusionPipeline:
    parts = configs(family, tiny)
    torch.manual_seed(0)
    encoders = text_encoders(family, parts, layers)
    scheduler = FlowMatchEulerDiscreteScheduler(**parts["scheduler"])
    if family == "flux1-dev":
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**parts["transformer"]),
            vae=AutoencoderKL(**parts["vae"]),
            scheduler=scheduler,
            **encoders,
        )
    return Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(**parts["transformer"]),
        vae=AutoencoderKLFlux2(**parts["vae"]),
        scheduler=scheduler,
        is_distilled=True,
        **encoders,
    )


def build(family: str, root: Path, run: Plan) -> Path:
    """The family's folder under ``root`` in the vendor's diffusers layout, built once."""
    folder = root / f"{family}{'-tiny' if run.tiny else ''}"
    if (folder / "model_index.json").is_file():
        return folder
    dtype = resolve_dtype("auto", torch.device(run.device))
    with building(run.device, dtype):
        pipe = pipeline(family, run.tiny, TEXT_LAYERS[family])
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    release(run.device)
    return folder


def published_bytes(family: str) -> dict[str, int]:
    """Bytes each module of the published model holds in bf16, counted on the meta device (no memory)."""
    with building("meta", torch.bfloat16):
        pipe = pipeline(family, tiny=False, layers=None)
    return {
        name: sum(p.numel() * 2 for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def png(images: list[Any]) -> None:
    for image in images:
        image.save(io.BytesIO(), format="PNG")


def direct(folder: Path, family: str, variant: str, run: Plan) -> list[Run]:
    """The pipeline called in this process with the catalog knobs applied by fluxserve's loading code,
    loaded once for every batch size."""
    results = [Run(family, variant, "direct", batch) for batch in batches(family, run)]
    options = LoadOptions(device=run.device, **VARIANTS[variant], **compile_backend(run))
    device = torch.device(run.device)
    pipe = PIPELINES[family].from_pretrained(folder, dtype=resolve_dtype("auto", device))
    pipe.set_progress_bar_config(disable=True)
    try:
        large = pipe.text_encoder_2 if family == "flux1-dev" else pipe.text_encoder
        tune([pipe], options, device, [pipe.transformer, large])
        compile_transformer(pipe.transformer, options)
        for result in results:
            generate(pipe, family, run, result.batch, 0, WARMUP_STEPS)  # compiles this batch size's graph
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            generate(pipe, family, run, result.batch, 1, run.steps[family])
            result.seconds_per_image = (time.perf_counter() - started) / result.batch
            if device.type == "cuda":
                result.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    except Exception as exc:  # a knob this machine cannot run (fp8 without an fp8 GPU) is reported
        for result in results:
            if result.seconds_per_image is None:  # the sizes measured before it stand
                result.error = failure(exc)
    finally:
        del pipe
        release(run.device)
    return results


def generate(pipe: DiffusionPipeline, family: str, run: Plan, count: int, seed: int, steps: int) -> None:
    """One call for ``count`` images, each encoded as PNG as the worker does."""
    prompts = [f"benchmark image {seed}-{n}" for n in range(count)]
    size = {"width": run.generated, "height": run.generated, "num_inference_steps": steps}
    png(pipe(prompt=prompts, generator=torch.Generator("cpu").manual_seed(seed), **size).images)


def failure(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def batches(family: str, run: Plan) -> list[int]:
    return run.batches if family == "flux1-dev" else [1]


def compile_backend(run: Plan) -> dict[str, str]:
    return {"compile_backend": "eager"} if run.tiny else {}


def served(folder: Path, family: str, variant: str, run: Plan, scratch: Path) -> list[Run]:
    """Requests submitted at once through ``fluxserve serve``, as many as the batch (its worker batches
    them), from submit to PNG in hand; one server, its worker loaded with the same catalog knobs, for
    every batch size."""
    results = [Run(family, variant, "fluxserve", batch) for batch in batches(family, run)]
    route = ROUTES[family]
    data = scratch / f"{family}-{variant}"
    data.mkdir(parents=True)
    options = {"device": run.device, **VARIANTS[variant]}
    if family == "flux1-dev":  # a FLUX.1 knob: the FLUX.2 routes refuse it
        options["max_batch"] = max(batches(family, run))
    entry = {
        "weights": str(folder),
        "steps": run.steps[family],
        "max_pixels": run.max_pixels,
        "options": {**options, **compile_backend(run)},
    }
    catalog = data / "catalog.toml"
    catalog.write_text(toml_of(route, entry))
    env = {**os.environ, "FLUXSERVE_CATALOG": str(catalog), "FLUXSERVE_POLL_SECONDS": "0.02"}
    server, base, key = serve(data, env)
    try:
        body: dict[str, Any] = {"width": run.size, "height": run.size, "output_format": "png"}
        warm = body
        if family == "flux1-dev":  # the [klein] route has no steps field: the catalog's
            body, warm = {**body, "steps": run.steps[family]}, {**body, "steps": WARMUP_STEPS}
        for result in results:
            round_trip(base, key, route, warm, result.batch, 0)
            started = time.perf_counter()
            round_trip(base, key, route, body, result.batch, result.batch)
            result.seconds_per_image = (time.perf_counter() - started) / result.batch
    except (RuntimeError, UpstreamError) as exc:
        for result in results:
            if result.seconds_per_image is None:  # the sizes measured before it stand
                result.error = failure(exc)
    finally:
        server.terminate()
        server.wait(timeout=120)
    return results


def toml_of(route: str, entry: dict[str, Any]) -> str:
    """The catalog file for one route (JSON scalars and arrays are TOML's too; None is left out)."""
    fields = [f"{k} = {json.dumps(v)}" for k, v in entry.items() if k != "options" and v is not None]
    options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in entry["options"].items())
    return "\n".join([f'[models."{route}"]', *fields, f"options = {{ {options} }}", ""])


def round_trip(base: str, key: str, route: str, body: dict[str, Any], count: int, first_seed: int) -> None:
    """``count`` tasks submitted at once on the vendor API, each polled until its image is downloaded."""

    def one(seed: int) -> None:
        with VendorClient(base, key, request_timeout=900) as client:
            task = client.submit(route, {**body, "prompt": f"benchmark image {seed}", "seed": seed})
            deadline = time.monotonic() + WAIT_SECONDS
            while (state := client.result(task))["status"] == "Pending":
                if time.monotonic() > deadline:  # e.g. a worker that cannot start
                    raise RuntimeError(f"no result in {WAIT_SECONDS} s")
                time.sleep(0.02)
            if state["status"] != "Ready":
                raise RuntimeError(f"{state['status']}: {state.get('details')}")
            client.download(state["result"]["sample"], task_id=task.id, max_bytes=2**28)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(first_seed, first_seed + count)))


def release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def minimal_set(root: Path, run: Plan, scratch: Path) -> list[Run]:
    """FLUX.1 [dev] in every variant, then FLUX.2 [klein] 4B plain; each printed as it is measured."""
    runs: list[Run] = []
    for family, variants in (("flux1-dev", run.variants), ("flux2-klein-4b", ["bf16"])):
        folder = build(family, root, run)
        for variant in variants:
            for measured in (
                direct(folder, family, variant, run),
                served(folder, family, variant, run, scratch),
            ):
                report(measured)
                runs += measured
    return runs


def switch_cost(root: Path, run: Plan, rounds: int) -> dict[str, float]:
    """Seconds a worker spends when its next job is for the other model: the registry, capped to hold
    one model, evicts the last one and loads the next (``get``), alternating ``rounds`` times."""
    folders = {ROUTES[family]: build(family, root, run) for family in PUBLISHED}
    models = {
        route: {"weights": str(folder), "options": {"device": run.device}}
        for route, folder in folders.items()
    }
    registry = EngineRegistry(Catalog.model_validate({"models": models}), root, memory_cap_bytes=1)
    timings: dict[str, list[float]] = {route: [] for route in folders}
    for _ in range(rounds):
        for route in folders:
            started = time.perf_counter()
            registry.get(route)
            if run.device == "cuda":
                torch.cuda.synchronize()
            timings[route].append(time.perf_counter() - started)
    return {route: sorted(values)[len(values) // 2] for route, values in timings.items()}


def report(runs: list[Run]) -> None:
    for r in runs:
        seconds = f"{r.seconds_per_image:.3f} s/image" if r.seconds_per_image is not None else r.error
        peak = f", peak {r.peak_gpu_bytes / 2**30:.1f} GiB" if r.peak_gpu_bytes else ""
        print(f"{r.family:15} {r.variant:12} {r.path:9} batch {r.batch}: {seconds}{peak}", flush=True)


def ratios(runs: list[Run]) -> list[str]:
    """fluxserve / direct per configuration, and the speed-up of each variant over plain bf16."""
    found = {(r.family, r.variant, r.path, r.batch): r.seconds_per_image for r in runs}
    lines = []
    for (family, variant, path, batch), seconds in found.items():
        plain = found.get((family, "bf16", path, batch))
        mine = found.get((family, variant, "direct", batch))
        if path == "fluxserve" and seconds and mine:
            lines.append(f"{family} {variant} batch {batch}: fluxserve/direct {seconds / mine:.3f}")
        if path == "direct" and variant != "bf16" and seconds and plain:
            lines.append(f"{family} {variant} batch {batch}: {plain / seconds:.2f}x plain bf16")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions on this CPU (the tests run it)")
    parser.add_argument(
        "--root", type=Path, help="where the model folders are built and kept (default: temp)"
    )
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"FLUX.1 [dev] variants to time, of {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--switch", action="store_true", help="time a model switch instead")
    parser.add_argument("--rounds", type=int, default=3, help="switches of each model (--switch)")
    args = parser.parse_args(argv)
    run = plan(args.tiny)
    run.variants = [name.strip() for name in args.variants.split(",")]
    if unknown := set(run.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))} (known: {', '.join(VARIANTS)})")
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if run.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --tiny for the CPU check")
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        root = args.root or scratch / "models"
        if args.switch:
            result: Any = switch_cost(root, run, args.rounds)
            print(json.dumps(result))
        else:
            print(f"device {run.device}; {'tiny dimensions' if run.tiny else 'published configurations'}")
            print("text encoders: published widths, layers built " + json.dumps(TEXT_LAYERS))
            for family in PUBLISHED:
                sizes = {name: round(n / 2**30, 2) for name, n in published_bytes(family).items()}
                print(f"{family} published bf16 GiB per module: {json.dumps(sizes)}")
            runs = minimal_set(root, run, scratch)
            print("\n".join(ratios(runs)))
            result = [asdict(r) for r in runs]
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
