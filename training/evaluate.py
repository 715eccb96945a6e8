"""Score the bundled model on held-out prompts: through a running server, or directly with diffusers.

    python -m training.evaluate --base-url http://127.0.0.1:8000 --key KEY [--n 200] [--edits 100]
    python -m training.evaluate --direct src/fluxserve/weights/bundled [--n 200] [--edits 100]

Prompts come from `training.scenes.eval_prompts`: every (shape, colour, position) triple in them was held
out of training. Each image is read back by the pixel scorer (`training.scenes.analyse`). Edits are recolour
instructions through the Kontext route, scored on the new colour and the kept position; background edits,
on the new background and the kept colour and place; moves (a stretch goal), on the new place and the kept
colour.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from training.model import true_cfg
from training.scenes import SHAPES, SIZE, Edit, eval_edits, eval_prompts, render, score

TARGETS = {"background": 0.95, "color": 0.90, "position": 0.70, "shape": 0.60, "edit_recolor_pos": 0.80}

# Sampler settings the engine should use for the bundled model (see training/RESULTS.md).
STEPS = 20
MAX_SEQUENCE_LENGTH = 32


def http_generators(base: str, key: str, width: int, timeout: float) -> tuple[Callable, Callable]:
    """Text-to-image and edit callables that go through the reseller dialect of a running server."""
    import httpx

    client = httpx.Client(timeout=60.0)
    headers = {"TT-API-KEY": key}

    def run(route: str, body: dict) -> Image.Image:
        r = client.post(f"{base}/bfl/v1/{route}", headers=headers, json=body)
        r.raise_for_status()
        payload = r.json()
        if payload.get("status") != "SUCCESS":
            raise RuntimeError(f"submit failed: {payload}")
        data = payload["data"]
        job = data.get("jobId") or data.get("job_id")
        deadline = time.time() + timeout
        while time.time() < deadline:
            f = client.get(f"{base}/flux/fetch", params={"jobId": job}, headers=headers).json()
            if f.get("status") == "SUCCESS":
                img = client.get(f["data"]["imageUrl"], headers=headers)
                img.raise_for_status()
                return Image.open(io.BytesIO(img.content)).convert("RGB")
            if f.get("status") == "FAILED":
                raise RuntimeError(f"job {job} failed: {f.get('message')}")
            time.sleep(0.1)
        raise TimeoutError(f"job {job} did not finish in {timeout}s")

    def t2i(prompt: str, seed: int) -> Image.Image:
        body = {"prompt": prompt, "width": width, "height": width, "seed": seed, "output_format": "png"}
        return run("flux-dev", body)

    def edit(image: Image.Image, prompt: str, seed: int) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        body = {
            "prompt": prompt,
            "input_image": base64.b64encode(buf.getvalue()).decode(),
            "aspect_ratio": "1:1",
            "seed": seed,
            "output_format": "png",
        }
        return run("flux-kontext-pro", body)

    return t2i, edit


def direct_generators(folder: Path, width: int, steps: int, cfg: float) -> tuple[Callable, Callable]:
    """The same calls the server's diffusers engine makes, in-process: native size, then LANCZOS resize."""
    import torch
    from diffusers import FluxKontextPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder))
    kontext = FluxKontextPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    kontext.set_progress_bar_config(disable=True)
    guided = true_cfg(cfg, "")

    def t2i(prompt: str, seed: int) -> Image.Image:
        im = pipe(
            prompt=prompt,
            **guided,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return im.resize((width, width), Image.Resampling.LANCZOS)

    def edit(image: Image.Image, prompt: str, seed: int) -> Image.Image:
        im = kontext(
            image=image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS),
            prompt=prompt,
            **guided,
            height=SIZE,
            width=SIZE,
            max_area=SIZE * SIZE,
            _auto_resize=False,
            num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return im.resize((width, width), Image.Resampling.LANCZOS)

    return t2i, edit


def run_edits(edit: Callable, edits: list[Edit]) -> tuple[list[dict[str, bool]], list[Image.Image]]:
    """Scores of each edit's result against its target scene, and the first six (source, result) pairs."""
    scores, shown = [], []
    for k, e in enumerate(edits):
        src = render(e.source)
        im = edit(src, e.instruction, k)
        scores.append(score(im, e.target))
        if len(shown) < 12:
            shown += [src, im]
    return scores, shown


def share(scores: list[dict[str, bool]], *keys: str) -> float:
    """The fraction of scored images that got every one of `keys` right."""
    return float(np.mean([all(r[k] for k in keys) for r in scores]))


def grid(images: list[Image.Image], cols: int, cell: int = 128) -> Image.Image:
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.resize((cell, cell), Image.Resampling.LANCZOS), ((i % cols) * cell, (i // cols) * cell))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Score held-out prompts and edits.")
    ap.add_argument("--base-url", help="a running fluxserve, e.g. http://127.0.0.1:8000")
    ap.add_argument("--key", help="TT-API-KEY for the reseller dialect")
    ap.add_argument("--direct", type=Path, help="a diffusers folder to run in-process instead of a server")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument(
        "--prompt-seed", type=int, default=7, help="another seed draws other held-out prompts (a fresh check)"
    )
    ap.add_argument("--backgrounds", type=int, default=50, help="held-out background edits")
    ap.add_argument("--moves", type=int, default=50, help="held-out move edits (a stretch goal)")
    ap.add_argument("--width", type=int, default=256, help="requested output size (square)")
    ap.add_argument("--steps", type=int, default=STEPS, help="--direct only; a server uses its catalog")
    ap.add_argument("--cfg", type=float, default=1.0, help="--direct only: the catalog's true_cfg_scale")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one job")
    ap.add_argument("--samples", type=Path, help="write sample grids (PNG) into this folder")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.direct:
        t2i, edit = direct_generators(args.direct, args.width, args.steps, args.cfg)
        via = f"direct:{args.direct} steps={args.steps} cfg={args.cfg}"
    elif args.base_url and args.key:
        t2i, edit = http_generators(args.base_url.rstrip("/"), args.key, args.width, args.timeout)
        via = args.base_url
    else:
        ap.error("give --base-url and --key, or --direct FOLDER")

    prompts = eval_prompts(max(args.n, 200), args.prompt_seed)[: args.n]
    edits, moves = eval_edits(args.edits), eval_edits(args.moves, kind="move")
    backgrounds = eval_edits(args.backgrounds, kind="background")
    results, seconds, shown = [], [], []
    for i, (scene, prompt) in enumerate(prompts):
        t0 = time.time()
        im = t2i(prompt, i)
        seconds.append(time.time() - t0)
        results.append(score(im, scene))
        if len(shown) < 24:
            shown.append(im)
    edit_scores, edit_shown = run_edits(edit, edits)
    move_scores, move_shown = run_edits(edit, moves)
    bg_scores, bg_shown = run_edits(edit, backgrounds)

    figures = {k: share(results, k) for k in results[0]}
    figures["all_four"] = share(results, *(k for k in TARGETS if k in results[0]))
    for kind in SHAPES:  # shape by kind: which shapes the model draws, and which it does not
        hits = [r for r, (scene, _) in zip(results, prompts, strict=True) if scene.shape == kind]
        if hits:
            figures[f"shape_{kind}"] = share(hits, "shape")
    if edit_scores:
        figures["edit_recolor_pos"] = share(edit_scores, "color", "position")
        figures["edit_color"] = share(edit_scores, "color")
        figures["edit_position_kept"] = share(edit_scores, "position")
    if bg_scores:
        # A background edit is right when the background changes and the object keeps its colour and place.
        figures["edit_background"] = share(bg_scores, "background", "color", "position")
        figures["edit_background_new"] = share(bg_scores, "background")
    if move_scores:
        # A move is right when the object lands on the named place and keeps its colour (stretch goal).
        figures["move_pos_color"] = share(move_scores, "color", "position")
        figures["move_position"] = share(move_scores, "position")
    report = {
        "via": via,
        "n": len(results),
        "prompt_seed": args.prompt_seed,
        "edits": len(edit_scores),
        "moves": len(move_scores),
        "backgrounds": len(bg_scores),
        "width": args.width,
        "median_seconds_per_image": statistics.median(seconds),
        "figures": figures,
        "targets": TARGETS,
    }
    print(f"{'metric':<20}{'score':>8}{'target':>8}")
    for k, v in figures.items():
        tgt = TARGETS.get(k)
        print(f"{k:<20}{v:>8.1%}{(f'{tgt:.0%}' if tgt else ''):>8}")
    print(f"median seconds per {args.width}x{args.width} image: {report['median_seconds_per_image']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.samples:
        args.samples.mkdir(parents=True, exist_ok=True)
        grid(shown, 6).save(args.samples / "text_to_image.png")
        if edit_shown:
            grid(edit_shown, 6).save(args.samples / "edits.png")
        if move_shown:
            grid(move_shown, 6).save(args.samples / "moves.png")
        if bg_shown:
            grid(bg_shown, 6).save(args.samples / "backgrounds.png")
        sections = [[p for _, p in prompts[: len(shown)]]] + [
            [e.instruction for e in items[: len(pairs) // 2]]
            for items, pairs in ((edits, edit_shown), (moves, move_shown), (backgrounds, bg_shown))
        ]
        (args.samples / "prompts.txt").write_text("\n\n".join("\n".join(lines) for lines in sections) + "\n")


if __name__ == "__main__":
    main()
