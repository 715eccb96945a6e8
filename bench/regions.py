"""Scenes of several objects from the bundled model: when to join the objects' drawings, and what it costs.

    python -m bench.regions [--pairs 30]

1. Held-out two-object prompts (``training.scenes.eval_pairs``), read into one prompt per object
   (``engines/phrasing.py``) and drawn as the rows of one batch from the same noise, scored from their
   pixels (both objects in their colour and place): the engine's images, whose rows are joined by nearest
   place after the last step only (``engines/flux/regions.py``), against the same rows joined after every
   step (MultiDiffusion).
2. Through the shipped flux-dev engine (its catalog entry: 128x128, true CFG 4): the median seconds of
   a one-object image and of a two-object scene, the ratio measured in the same run.

One torch thread, on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fluxserve.core.catalog import load_catalog
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest
from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.planning import Plan
from fluxserve.engines.flux.regions import join
from fluxserve.engines.registry import EngineRegistry
from training.scenes import eval_pairs, score_pair


def joined_every_step(engine: DiffusersFluxEngine, plan: Plan) -> Image.Image:
    """The plan's objects as rows of one batch from its seed, as the engine draws them, but joined after
    every step (the engine joins after the last only)."""
    centres = [part.centre for part in plan.parts]

    def joining(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"latents": join(tensors["latents"], centres, plan.width, plan.height)}

    image: Image.Image = engine.model.text2image(
        prompt=[part.prompt for part in plan.parts],
        negative_prompt=[""] * len(plan.parts),
        true_cfg_scale=engine.options.true_cfg_scale,
        width=plan.width,
        height=plan.height,
        num_inference_steps=plan.steps,
        guidance_scale=plan.guidance,
        max_sequence_length=engine.max_sequence_length,
        generator=[torch.Generator().manual_seed(plan.request.seed) for _ in plan.parts],
        callback_on_step_end=joining,
    ).images[0]
    return image.resize((plan.request.width, plan.request.height), Image.Resampling.LANCZOS)


def both_right(engine: DiffusersFluxEngine, pairs: int, every_step: bool) -> float:
    """The share of held-out pairs with both objects right: the engine's image, or joined after every step."""
    right = []
    for seed, (pair, prompt) in enumerate(eval_pairs(pairs)):
        plan = engine.plan(request(prompt, seed))  # the engine's reading, steps and size
        assert len(plan.parts) == 2, prompt
        image = (
            joined_every_step(engine, plan)
            if every_step
            else engine.generate(plan.request, EngineHooks()).image
        )
        right.append(score_pair(image, pair)["both"])
    return float(np.mean(right))


def request(prompt: str, seed: int) -> EngineRequest:
    return EngineRequest(GenerationParams(model="flux-dev", prompt=prompt), prompt, 256, 256, seed)


def seconds(engine: DiffusersFluxEngine, prompt: str, images: int) -> float:
    """Median seconds of one request for ``prompt`` through the engine, after one warm-up."""
    times = []
    for seed in range(images + 1):
        started = time.perf_counter()
        engine.generate(request(prompt, seed), EngineHooks())
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--images", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = EngineRegistry(load_catalog(), Path(tempfile.mkdtemp())).get("flux-dev")
    assert isinstance(engine, DiffusersFluxEngine)
    at_end, every = both_right(engine, args.pairs, False), both_right(engine, args.pairs, True)
    print(f"{args.pairs} held-out pairs, both objects right: joined after the last step {at_end:.0%}, "
          f"after every step {every:.0%}")  # fmt: skip
    one = seconds(engine, "a red circle on the left", args.images)
    two = seconds(engine, "a red circle on the left and a blue square on the right", args.images)
    print(
        f"256x256 through the engine: one object {one:.2f} s, two objects {two:.2f} s, ratio {two / one:.2f}"
    )


if __name__ == "__main__":
    main()
