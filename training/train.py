"""Train the bundled FLUX model: `python -m training.train --seed 0 --out training/runs/main [--resume]`.

Rectified flow on VAE latents of the procedural scenes, text-to-image and Kontext-style edit batches in
one FluxTransformer2DModel, with the tiny CLIP and T5 encoders trained jointly. Position is the hard part,
so: 64 image tokens (128 px, 8x VAE, 2x2 packing), timesteps drawn logit-normal and shifted towards high
noise (where layout is decided), text encoders that give tokens positions, and an EMA of the weights.
Options for v2 (issue 22): `--default-frac` captions that name no background (the scene is on the default
one), `--bucket-frac` text-to-image steps at another aspect (BUCKETS) and `--pair-frac` two-object scenes;
those steps are rendered and encoded as they come (`rendered_batch`), the rest read the latent table.
Captions come from the grammar, or from v1's templates (`--captions templates`), with `--canonical-frac`
of them in the phrasing the server's reader gives the model (v4: a model tuned for the reader).

Deterministic: the data and noise of step k depend only on (seed, k), so a resumed run replays the same
stream. Every few minutes it checkpoints; every `--eval-every` minutes it samples held-out prompts with the
real FluxPipeline/FluxKontextPipeline, scores them with the scene scorer and, when the score improves,
saves the EMA weights as a diffusers folder in `<out>/best`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxPipeline
from PIL import Image

from fluxserve.engines.flux.planning import generation_size
from training.model import (
    MAX_TOKENS,
    SAMPLING_SHIFT,
    build_modules,
    build_scheduler,
    build_tokenizers,
    load_pipeline_weights,
    save_pipeline,
    tie_words,
    tokenize,
    true_cfg,
)
from training.scenes import (
    CAPTION_TEMPLATES,
    COLORS,
    SHAPES,
    SIZE,
    Scene,
    all_scenes,
    canonical_caption,
    caption,
    eval_edits,
    eval_pairs,
    eval_prompts,
    group_caption,
    heldout_triples,
    make_edit,
    pair_caption,
    random_group,
    random_pair,
    render,
    render_objects,
    score,
    score_pair,
    with_defaults,
)
from training.vae import PAIRS, contrast_factor, to_tensor, weighted_loss
from training.vae import batch as pixel_batch

# Aspect buckets: every size the catalog's pixel budget (SIZE * SIZE) turns a request of 256..1440 pixels a
# side into (engines/flux/planning.generation_size), so the model sees each latent grid it is run at.
BUCKETS = sorted(
    {generation_size(w, h, SIZE * SIZE) for w in range(256, 1441, 32) for h in range(256, 1441, 32)}
    - {(SIZE, SIZE)}
)
EDIT_KINDS = ["recolor", "background", "move"]
EDIT_WEIGHTS = [0.5, 0.3, 0.2]


def object_coverage(x: torch.Tensor) -> torch.Tensor:
    """Per image token (16x16 pixels, in packing order), the fraction of its pixels that show the object."""
    bg = x[:, :, :2, :2].flatten(2).median(dim=2).values  # the corners are always background
    obj = ((x - bg[:, :, None, None]).abs().sum(1, keepdim=True) > 0.05).float()
    return torch.nn.functional.avg_pool2d(obj, 16).flatten(1)


def encode_cached(
    paths: tuple[Path, Path], vae: AutoencoderKL, images: Callable[[int, int], list[Image.Image]], count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE latents and the object coverage of every image (``images(start, stop)`` renders a slice),
    both from one rendering, computed once and cached at ``paths``."""
    if all(path.exists() for path in paths):
        return torch.load(paths[0]), torch.load(paths[1])
    latents, coverage = [], []
    with torch.no_grad():
        for start in range(0, count, 64):
            x = to_tensor(images(start, min(start + 64, count)))
            latents.append(LatentTable.encode(vae, x))
            coverage.append(object_coverage(x))
    out = torch.cat(latents), torch.cat(coverage)
    for path, tensor in zip(paths, out, strict=True):
        torch.save(tensor, path)
    return out


class LatentTable:
    """VAE latents of every scene (all jitter variants), normalised the way the pipelines normalise them,
    and how much of each image token the object covers; both cached in the run's folder."""

    def __init__(self, vae: AutoencoderKL, jitters: int, cache: Path) -> None:
        self.scenes = list(all_scenes(jitters))
        self.index = {s: i for i, s in enumerate(self.scenes)}

        def images(start: int, stop: int) -> list[Image.Image]:
            return [render(s) for s in self.scenes[start:stop]]

        self.latents, self.coverage = encode_cached(
            (cache / "latents.pt", cache / "coverage.pt"), vae, images, len(self.scenes)
        )
        held = heldout_triples()
        self.train_ids = [i for i, s in enumerate(self.scenes) if s.triple not in held]
        self.train_set = set(self.train_ids)

    @staticmethod
    def encode(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        z = vae.encode(x).latent_dist.mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def get(self, scenes: list[Scene]) -> torch.Tensor:
        return self.latents[[self.index[s] for s in scenes]]

    def cover(self, scenes: list[Scene]) -> torch.Tensor:
        return self.coverage[[self.index[s] for s in scenes]]


class GroupTable:
    """Latents of a fixed draw of scenes with two objects (three for a quarter of them) of training triples,
    with their object coverage; too many combinations for a table of all, so a seeded sample, cached."""

    def __init__(
        self, vae: AutoencoderKL, triples: list[tuple[str, str, str]], count: int, cache: Path
    ) -> None:
        rng = np.random.default_rng(77)
        self.groups = [random_group(rng, triples, 3 if rng.random() < 0.25 else 2) for _ in range(count)]

        def images(start: int, stop: int) -> list[Image.Image]:
            return [render_objects(g) for g in self.groups[start:stop]]

        self.latents, self.coverage = encode_cached(
            (cache / f"groups{count}.pt", cache / f"groups{count}_coverage.pt"), vae, images, count
        )


def pack(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def image_ids(first: int, width: int = SIZE, height: int = SIZE) -> torch.Tensor:
    ids = FluxPipeline._prepare_latent_image_ids(
        1, height // 16, width // 16, torch.device("cpu"), torch.float32
    )
    ids[..., 0] = first
    return ids


def sample_t(gen: torch.Generator, n: int, shift: float = SAMPLING_SHIFT) -> torch.Tensor:
    """Logit-normal timesteps pushed towards noise by a shift (by default the one the sampler uses)."""
    t = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * t / (1 + (shift - 1) * t)


Describe = Callable[[Scene, np.random.Generator], str]


def captioner(style: str, canonical_share: float) -> Describe:
    """How one-object scenes are captioned: the grammar or v1's templates (``style``), and a
    ``canonical_share`` of them in the phrasing the server's reader writes (a model tuned for the reader)."""
    templates = CAPTION_TEMPLATES if style == "templates" else None

    def describe(scene: Scene, rng: np.random.Generator) -> str:
        if canonical_share and rng.random() < canonical_share:
            return canonical_caption(scene, sized=rng.random() < 0.5)
        return caption(scene, rng, templates)

    return describe


def make_batch(
    table: LatentTable,
    rng: np.random.Generator,
    n: int,
    edit: bool,
    dropout: float,
    default_share: float = 0.0,
    groups: GroupTable | None = None,
    group_share: float = 0.0,
    describe: Describe = caption,
    weights: np.ndarray | None = None,
):
    """(prompts, target latents, reference latents or None, object coverage per token) for one step.

    A text-to-image batch mixes one-object scenes with a ``group_share`` of several-object ones; one-object
    scenes are drawn uniformly from the training scenes, or by ``weights`` (see :func:`scene_weights`)."""
    prompts, latents, covers, refs = [], [], [], []
    while len(prompts) < n:
        if not edit and groups is not None and rng.random() < group_share:
            k = int(rng.integers(len(groups.groups)))
            prompts.append("" if rng.random() < dropout else group_caption(groups.groups[k], rng))
            latents.append(groups.latents[k])
            covers.append(groups.coverage[k])
            continue
        pick = rng.integers(len(table.train_ids)) if weights is None else rng.choice(len(weights), p=weights)
        src = table.scenes[table.train_ids[pick]]
        if not edit:
            src = with_defaults(src, rng, default_share)
            prompts.append("" if rng.random() < dropout else describe(src, rng))
            latents.append(table.get([src])[0])
            covers.append(table.cover([src])[0])
            continue
        e = make_edit(src, EDIT_KINDS[rng.choice(3, p=EDIT_WEIGHTS)], rng)
        if e.target not in table.index or table.index[e.target] not in table.train_set:
            continue
        prompts.append(e.instruction)
        latents.append(table.get([e.target])[0])
        covers.append(torch.maximum(table.cover([e.target])[0], table.cover([src])[0]))
        refs.append(src)
    return prompts, torch.stack(latents), (table.get(refs) if edit else None), torch.stack(covers)


def scene_weights(scenes: list[Scene], boosts: dict[str, float]) -> np.ndarray | None:
    """Sampling probabilities of the training ``scenes``, each boosted one drawn that many times as often; a
    key is a shape (``--oversample star=3``: a model's weakest shape seen more) or a colour on a background
    (``"light blue/white=4"``: a pair it draws badly). Boosts multiply; None when nothing is boosted."""
    if not boosts:
        return None
    known = set(SHAPES) | {f"{color}/{ground}" for color, ground in PAIRS}
    if unknown := sorted(set(boosts) - known):
        raise ValueError(f"--oversample: {unknown} is neither a shape nor COLOUR/BACKGROUND")
    w = np.array([boosts.get(s.shape, 1.0) * boosts.get(f"{s.color}/{s.background}", 1.0) for s in scenes])
    return w / w.sum()


def scene_contrast_factors(scenes: list[Scene], ref: float) -> torch.Tensor:
    """Each scene's object weight (``--contrast-ref``): :func:`training.vae.contrast_factor` of its colours'
    contrast, so a pale star on a pale background is learnt as closely as a vivid one."""
    contrast = torch.tensor(
        [sum(abs(a - b) for a, b in zip(COLORS[s.color], COLORS[s.background], strict=True)) for s in scenes]
    )
    return contrast_factor(contrast / 127.5, ref)


def rendered_batch(
    table: LatentTable,
    vae: AutoencoderKL,
    rng: np.random.Generator,
    n: int,
    size: tuple[int, int],
    pairs: float,
    dropout: float,
    default_share: float,
    describe: Describe = caption,
):
    """Like :func:`make_batch` for text-to-image, rendered and encoded now: at ``size`` (an aspect
    bucket) and with a ``pairs`` share of two-object scenes, which no table could hold."""
    train = [table.scenes[i].triple for i in table.train_ids]
    prompts, images = [], []
    for _ in range(n):
        if rng.random() < pairs:
            pair = random_pair(rng, train, default_share)
            prompts.append(pair_caption(pair, rng))
            images.append(render_objects(list(pair), *size))
        else:
            scene = with_defaults(
                table.scenes[table.train_ids[rng.integers(len(table.train_ids))]], rng, default_share
            )
            prompts.append(describe(scene, rng))
            images.append(render_objects([scene], *size))
        if rng.random() < dropout:
            prompts[-1] = ""
    x = to_tensor(images)
    with torch.no_grad():
        z = LatentTable.encode(vae, x)
    return prompts, z, None, object_coverage(x)


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        torch.manual_seed(args.seed)
        self.clip_tok, self.t5_tok = build_tokenizers()
        self.modules = build_modules(
            self.clip_tok, self.t5_tok, args.width, args.heads, args.double, args.single
        )
        self.transformer, self.clip, self.t5 = (self.modules[k] for k in ("transformer", "clip", "t5"))
        vae_dir = args.vae
        if args.init:
            # Continue from an exported pipeline (e.g. the shipped weights): its VAE defines the latent space.
            load_pipeline_weights(self.modules, args.init, self.clip_tok, self.t5_tok)
            vae_dir = args.init / "vae"
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        # The encoder (the latent space) is fixed; the decoder may keep learning alongside the transformer.
        self.vae.decoder.requires_grad_(args.decoder_every > 0)
        self.vae_opt = torch.optim.AdamW(self.vae.decoder.parameters(), lr=args.decoder_lr, weight_decay=0.0)
        self.table = LatentTable(self.vae, args.jitters, args.out)
        train_triples = sorted({self.table.scenes[i].triple for i in self.table.train_ids})
        self.describe = captioner(args.captions, args.canonical_frac)
        boosts = {key: float(k) for key, k in (each.rsplit("=", 1) for each in args.oversample)}
        self.weights = scene_weights([self.table.scenes[i] for i in self.table.train_ids], boosts)
        if args.contrast_ref:
            factors = scene_contrast_factors(self.table.scenes, args.contrast_ref)
            self.table.coverage = self.table.coverage * factors[:, None]
        self.groups = GroupTable(self.vae, train_triples, args.groups, args.out) if args.group_frac else None
        self.ema = copy.deepcopy(self.modules).requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.modules.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99)
        )
        self.step = 0
        self.train_seconds = 0.0
        self.best = -1.0
        self.txt_ids = torch.zeros(MAX_TOKENS, 3)
        self.ids_edit = torch.cat([image_ids(0), image_ids(1)])

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = {
            "modules": self.modules.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "vae": self.vae.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "best": self.best,
            "args": {k: str(v) for k, v in vars(self.args).items()},
        }
        tmp = self.args.out / "ckpt.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.args.out / "ckpt.pt")

    def load(self) -> None:
        state = torch.load(self.args.out / "ckpt.pt", weights_only=False)
        self.modules.load_state_dict(state["modules"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.step, self.train_seconds, self.best = state["step"], state["train_seconds"], state["best"]

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """Warm-up, then constant; with ``--cooldown N`` and ``--max-steps``, a linear decay to a tenth over
        the last N steps (a finishing phase)."""
        a = self.args
        scale = min(1.0, (step + 1) / a.warmup)
        if a.cooldown and a.max_steps:
            scale = min(scale, 0.1 + 0.9 * max(0.0, (a.max_steps - step) / a.cooldown))
        return a.lr * scale

    def train_step(self) -> float:
        a = self.args
        rng = np.random.default_rng([a.seed, self.step])
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + self.step)
        edit = rng.random() < a.edit_frac
        size = (SIZE, SIZE)
        if not edit and rng.random() < a.bucket_frac:
            size = BUCKETS[rng.integers(len(BUCKETS))]
        if not edit and (size != (SIZE, SIZE) or rng.random() < a.pair_frac):
            prompts, z0, zref, cover = rendered_batch(
                self.table,
                self.vae,
                rng,
                a.batch,
                size,
                a.pair_frac,
                a.caption_dropout,
                a.default_frac,
                self.describe,
            )
        else:
            prompts, z0, zref, cover = make_batch(
                self.table,
                rng,
                a.batch,
                edit,
                a.caption_dropout,
                a.default_frac,
                self.groups,
                a.group_frac,
                self.describe,
                self.weights,
            )
        clip_ids, t5_ids = tokenize(self.clip_tok, self.t5_tok, prompts)
        pooled = self.clip(clip_ids).pooler_output
        seq = self.t5(t5_ids)[0]
        x0 = pack(z0)
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_t(gen, x0.shape[0], a.t_shift)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        inp = xt if zref is None else torch.cat([xt, pack(zref)], dim=1)
        out = self.transformer(
            hidden_states=inp,
            timestep=t,
            guidance=None,
            pooled_projections=pooled,
            encoder_hidden_states=seq,
            txt_ids=self.txt_ids,
            img_ids=image_ids(0, *size) if zref is None else self.ids_edit,
            return_dict=False,
        )[0][:, : x0.shape[1]]
        # Tokens the object covers weigh more: the object is a few of 64 tokens, and its outline (the shape)
        # is a small part of even their loss. Weight 0 is the plain mean squared error.
        w = 1.0 + a.object_weight * cover
        loss = (w[:, :, None] * (out - (noise - x0)) ** 2).sum() / (w.sum() * out.shape[-1])
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.opt.step()
        decay = min(a.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.modules.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        self.step += 1
        return loss.item()

    def decoder_step(self) -> float:
        """One VAE-decoder update on fresh full frames (the latent space itself stays fixed)."""
        rng = np.random.default_rng([self.args.seed, self.step, 1])
        x = pixel_batch(rng, 4, None)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mode()
            z = z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(self.step))
        rec = self.vae.decode(z).sample
        loss = weighted_loss(rec, x)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return loss.item()

    # ------------------------------------------------------------------ evaluation
    def pipelines(self) -> tuple[FluxPipeline, FluxKontextPipeline]:
        tie_words(self.ema["clip"], self.ema["t5"], self.clip_tok, self.t5_tok)
        parts = {
            "scheduler": build_scheduler(),
            "vae": self.vae,
            "text_encoder": self.ema["clip"],
            "tokenizer": self.clip_tok,
            "text_encoder_2": self.ema["t5"],
            "tokenizer_2": self.t5_tok,
            "transformer": self.ema["transformer"],
        }
        return FluxPipeline(**parts), FluxKontextPipeline(**parts)

    @torch.no_grad()
    def evaluate(self, n: int, n_edits: int) -> dict[str, float]:
        pipe, kontext = self.pipelines()
        pipe.set_progress_bar_config(disable=True)
        kontext.set_progress_bar_config(disable=True)
        items = eval_prompts(200)[:n]

        results: list[dict[str, bool]] = []
        for i in range(0, n, 16):
            chunk = items[i : i + 16]
            images = pipe(
                prompt=[p for _, p in chunk],
                **true_cfg(self.args.eval_cfg, [""] * len(chunk)),
                height=SIZE,
                width=SIZE,
                num_inference_steps=self.args.eval_steps,
                max_sequence_length=MAX_TOKENS,
                generator=torch.Generator().manual_seed(i),
            ).images
            results += [score(im, s) for im, (s, _) in zip(images, chunk, strict=True)]
        edits = []
        for k, e in enumerate(eval_edits(n_edits)):
            im = kontext(
                image=render(e.source),
                prompt=e.instruction,
                **true_cfg(self.args.eval_cfg, ""),
                height=SIZE,
                width=SIZE,
                max_area=SIZE * SIZE,
                _auto_resize=False,
                num_inference_steps=self.args.eval_steps,
                max_sequence_length=MAX_TOKENS,
                generator=torch.Generator().manual_seed(k),
            ).images[0]
            r = score(im, e.target)
            edits.append(r["color"] and r["position"])
        pairs = []
        for i, (pair, prompt) in enumerate(eval_pairs(self.args.eval_pairs)):
            im = pipe(
                prompt=prompt,
                **true_cfg(self.args.eval_cfg, ""),
                height=SIZE,
                width=SIZE,
                num_inference_steps=self.args.eval_steps,
                max_sequence_length=MAX_TOKENS,
                generator=torch.Generator().manual_seed(i),
            ).images[0]
            pairs.append(score_pair(im, pair)["both"])
        out = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        out["edit_recolor_pos"] = float(np.mean(edits)) if edits else 0.0
        out["pairs"] = float(np.mean(pairs)) if pairs else 0.0
        return out

    def export_best(self, metrics: dict[str, float]) -> None:
        s = float(
            np.mean(
                [
                    metrics[k]
                    for k in ("background", "color", "position", "shape", "edit_recolor_pos", "pairs")
                ]
            )
        )
        if s <= self.best:
            return
        self.best = s
        best = self.args.out / "best"
        save_pipeline(best, self.ema, self.vae, self.clip_tok, self.t5_tok)
        info = {"step": self.step, "train_minutes": self.train_seconds / 60, "score": s, **metrics}
        (best / "training_state.json").write_text(json.dumps(info, indent=2))


def log(out: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock budget of this invocation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae", type=Path, default=Path("training/runs/vae"))
    ap.add_argument("--init", type=Path, help="start from an exported pipeline folder (weights and its VAE)")
    ap.add_argument("--object-weight", type=float, default=0.0, help="extra loss weight of object tokens")
    ap.add_argument(
        "--t-shift", type=float, default=SAMPLING_SHIFT, help="shift of the training timesteps (1: unshifted)"
    )
    ap.add_argument("--eval-cfg", type=float, default=1.0, help="true CFG scale of the held-out samples")
    ap.add_argument("--jitters", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--edit-frac", type=float, default=0.3)
    ap.add_argument("--caption-dropout", type=float, default=0.05)
    ap.add_argument("--ckpt-every", type=float, default=4.0, help="minutes")
    ap.add_argument("--eval-every", type=float, default=12.0, help="minutes")
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-edits", type=int, default=24)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-pairs", type=int, default=16, help="held-out two-object prompts per evaluation")
    ap.add_argument(
        "--bucket-frac", type=float, default=0.0, help="share of text-to-image steps at aspect buckets"
    )
    ap.add_argument(
        "--pair-frac", type=float, default=0.0, help="share of two-object scenes in rendered steps"
    )
    ap.add_argument(
        "--group-frac", type=float, default=0.0, help="share of several-object scenes in text-to-image steps"
    )
    ap.add_argument("--groups", type=int, default=12000, help="size of the several-object latent table")
    ap.add_argument(
        "--captions", choices=["grammar", "templates"], default="grammar", help="templates: v1's phrasings"
    )
    ap.add_argument(
        "--canonical-frac", type=float, default=0.0, help="share of captions in the reader's phrasing"
    )
    ap.add_argument(
        "--contrast-ref",
        type=float,
        default=0.0,
        help="scale one-object scenes' object weight by this over their colours' contrast (0: off)",
    )
    ap.add_argument(
        "--oversample",
        nargs="*",
        default=[],
        metavar="KEY=K",
        help="draw the scenes of KEY (a shape, or COLOUR/BACKGROUND) K times as often",
    )
    ap.add_argument("--default-frac", type=float, default=0.0, help="share of captions naming no background")
    ap.add_argument("--decoder-every", type=int, default=3, help="a VAE decoder step every N steps (0: off)")
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--cooldown", type=int, default=0, help="decay the learning rate over the last N steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(args)
    if args.resume and (args.out / "ckpt.pt").exists():
        trainer.load()
        log(args.out, {"event": "resumed", "step": trainer.step})
    start = time.time()
    last_ckpt = last_eval = start
    losses: list[float] = []
    dec_losses: list[float] = []
    while time.time() - start < args.minutes * 60 and not (args.max_steps and trainer.step >= args.max_steps):
        t0 = time.time()
        losses.append(trainer.train_step())
        if args.decoder_every and trainer.step % args.decoder_every == 0:
            dec_losses.append(trainer.decoder_step())
        trainer.train_seconds += time.time() - t0
        now = time.time()
        if trainer.step % 50 == 0:
            log(
                args.out,
                {
                    "step": trainer.step,
                    "loss": float(np.mean(losses)),
                    "decoder_loss": float(np.mean(dec_losses)) if dec_losses else None,
                    "train_min": trainer.train_seconds / 60,
                },
            )
            losses, dec_losses = [], []
        if now - last_eval > args.eval_every * 60:
            t1 = time.time()
            metrics = trainer.evaluate(args.eval_n, args.eval_edits)
            trainer.export_best(metrics)
            log(
                args.out,
                {"step": trainer.step, "eval": metrics, "eval_s": time.time() - t1, "best": trainer.best},
            )
            last_eval = time.time()
        if now - last_ckpt > args.ckpt_every * 60:
            trainer.save()
            last_ckpt = time.time()
    metrics = trainer.evaluate(args.eval_n, args.eval_edits)
    trainer.export_best(metrics)
    trainer.save()
    log(args.out, {"step": trainer.step, "eval": metrics, "best": trainer.best, "event": "done"})


if __name__ == "__main__":
    main()
