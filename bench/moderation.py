"""The moderation classifiers' cost per item (one thread) and their false positives on benign sets.

    python bench/moderation.py [--images 100] [--repeat 50]

Cost: the median of ``--repeat`` calls, one item a call, after a warm-up (the first call loads the model:
its seconds are printed apart). Benign sets, each scored at every tolerance of
:data:`fluxserve.safety.moderation.THRESHOLDS` (a false positive is a score at or above the row's threshold):

- prompts: bench/benign_prompts.txt (everyday prompts, some with words a word list would trip on), the
  bundled model's held-out evaluation prompts (``training.scenes.eval_prompts``, 200) and its edit
  instructions (``training.scenes.eval_edits``, 100 of each kind);
- images: the scenes those prompts describe, rendered (``training.scenes.render``), and the bundled model's
  own outputs for the first ``--images`` prompts, made by the engine the server runs (shipped catalog,
  flux-dev, 256x256, seed = index).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fluxserve.safety.moderation import THRESHOLDS, ImageScorer, TextScorer
from training.scenes import eval_edits, eval_prompts, render

HERE = Path(__file__).parent


def cost(score: Callable[[list[Any]], list[float]], items: Sequence[Any], repeat: int) -> tuple[float, float]:
    """Seconds of the first call (loading included) and the median milliseconds of the next ``repeat``."""
    started = time.perf_counter()
    score([items[0]])
    first = time.perf_counter() - started
    times = []
    for index in range(repeat):
        started = time.perf_counter()
        score([items[index % len(items)]])
        times.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(times)


def flagged(scores: list[float], column: int) -> str:
    """Count at or above each tolerance's threshold, tolerance 0 first (6 checks nothing)."""
    counts = [
        str(sum(score >= limits[column] for score in scores)) if limits else "-"
        for limits in THRESHOLDS.values()
    ]
    return " / ".join(counts)


def report(name: str, scores: list[float], column: int) -> None:
    print(f"| {name} | {len(scores)} | {max(scores):.3f} | {flagged(scores, column)} |")


def bundled_outputs(prompts: list[str]) -> list[Image.Image]:
    import tempfile

    from fluxserve.core.catalog import load_catalog
    from fluxserve.core.params import GenerationParams
    from fluxserve.engines.base import EngineHooks, EngineRequest
    from fluxserve.engines.registry import EngineRegistry

    engine = EngineRegistry(load_catalog(), Path(tempfile.mkdtemp())).get("flux-dev")
    images = []
    for seed, prompt in enumerate(prompts):
        params = GenerationParams(model="flux-dev", prompt=prompt)
        images.append(engine.generate(EngineRequest(params, prompt, 256, 256, seed), EngineHooks()).image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100, help="bundled-model outputs to make (0: none)")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    text, image = TextScorer(), ImageScorer(threads=1)
    benign = (HERE / "benign_prompts.txt").read_text().splitlines()
    scenes = eval_prompts(200)
    prompts = [prompt for _, prompt in scenes]
    edits = [
        edit.instruction for kind in ("recolor", "background", "move") for edit in eval_edits(100, kind=kind)
    ]
    renders = [render(scene).resize((256, 256)) for scene, _ in scenes]

    first, each = cost(text, benign, args.repeat)
    print(f"text: first call (loads the model) {first:.2f} s, then {each:.2f} ms a prompt")
    first, each = cost(image, renders, args.repeat)
    print(f"image: first call (loads the model) {first:.2f} s, then {each:.1f} ms an image (256x256 in)")
    large = [Image.new("RGB", (1024, 1024), (90, 140, 200))]
    print(f"image: {cost(image, large, args.repeat)[1]:.1f} ms an image (1024x1024 in)")

    print("\n| set | items | highest score | flagged at tolerance 0 / 1 / 2 / 3 / 4 / 5 / 6 |")
    print("|---|---|---|---|")
    report("benign prompts (bench/benign_prompts.txt)", text(benign), 0)
    report("bundled model's evaluation prompts", text(prompts), 0)
    report("bundled model's edit instructions", text(edits), 0)
    report("rendered evaluation scenes (images)", [image([one])[0] for one in renders], 1)
    if args.images:
        started = time.perf_counter()
        outputs = bundled_outputs(prompts[: args.images])
        report(f"bundled model's outputs ({time.perf_counter() - started:.0f} s to make)", image(outputs), 1)


if __name__ == "__main__":
    main()
