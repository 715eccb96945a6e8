"""What a live preview costs, against the steps it is drawn between.

    python -m bench.previews [--steps 20] [--images 3]

1. The bundled model through the diffusers engine (shipped flux-dev entry: 128x128, true CFG 4): the median
   seconds of a step, and of a preview (``engines/flux/preview.py``: the latents unpacked and decoded by the
   model's VAE at <= 256 px), drawn after every step, over ``--images`` images after one warm-up.
2. FLUX.1's VAE at its published configuration (random weights: the cost does not depend on them): the
   decode a preview makes (a 32x32 latent, 256x256 pixels) against the decode every 1024x1024 image makes
   once at its end (128x128 latent).

One torch thread, on the CPU (the GPU row of BENCHMARKS.md needs a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from bench.gpu import PUBLISHED
from fluxserve.core.catalog import load_catalog
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest
from fluxserve.engines.registry import EngineRegistry


def bundled(steps: int, images: int) -> tuple[float, float]:
    """Median seconds of a step and of a preview of the bundled model, previews after every step."""
    engine = EngineRegistry(load_catalog(), Path(tempfile.mkdtemp())).get("flux-dev")
    step_times: list[float] = []
    preview_times: list[float] = []
    clock = [0.0]

    def progress(fraction: float) -> None:
        now = time.perf_counter()
        step_times.append(now - clock[0])
        clock[0] = now

    def preview(fraction: float, draw: Callable[[], Image.Image]) -> None:
        started = time.perf_counter()
        draw()
        preview_times.append(time.perf_counter() - started)
        clock[0] += preview_times[-1]  # a step's time leaves the preview out

    prompt = "a large red heart in the center on a blue background"
    params = GenerationParams(model="flux-dev", prompt=prompt, steps=steps)
    for seed in range(images + 1):
        if seed == 1:  # the first image warms up
            step_times.clear()
            preview_times.clear()
        clock[0] = time.perf_counter()
        request = EngineRequest(params, prompt, 128, 128, seed)
        engine.generate(request, EngineHooks(progress=progress, preview=preview))
    # A step's time includes the pipeline's work between callbacks; the first of each image its set-up.
    return statistics.median(step_times), statistics.median(preview_times)


@torch.no_grad()
def flux_vae(rounds: int) -> tuple[float, float]:
    """Median seconds of FLUX.1's VAE decoding a preview's latent and a 1024x1024 image's."""
    vae = AutoencoderKL(**PUBLISHED["flux1-dev"]["vae"]).eval()

    def timed(side: int) -> float:
        latent = torch.randn(1, 16, side, side)
        vae.decode(latent)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            vae.decode(latent)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return timed(32), timed(128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--vae-rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    step, preview = bundled(args.steps, args.images)
    print(f"bundled model, 128x128: step {step * 1000:.1f} ms, preview {preview * 1000:.1f} ms, "
          f"preview / step = {preview / step:.2f}")  # fmt: skip
    small, full = flux_vae(args.vae_rounds)
    print(f"FLUX.1 VAE: preview decode (256x256) {small * 1000:.0f} ms, "
          f"1024x1024 decode {full * 1000:.0f} ms, preview / full decode = {small / full:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
