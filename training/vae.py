"""Train the bundled model's AutoencoderKL on the scenes: `python -m training.vae --out runs/vae`.

Full 128x128 frames, with the loss on object pixels weighted up: objects are a few percent of the pixels,
and an unweighted loss is satisfied by the background alone (tried: colours of objects came out wrong).
A decoder pass on the fixed latent space (``--decoder-only``) can weigh pale objects up (``--contrast-ref``)
and draw the colour pairs it reconstructs worst more often (``--hard-pairs``): what made the shipped
decoder keep the points of a light blue star on white.
Afterwards the latent mean/std set `shift_factor`/`scaling_factor`, as FLUX's VAE does, so latents are
~unit scale for the transformer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from training.model import build_vae
from training.scenes import COLOR_NAMES, SIZE, Scene, all_triples, random_scene, render, score


def to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_images(x: torch.Tensor) -> list:
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# Every (object colour, background colour) pair a scene can have.
PAIRS: list[tuple[str, str]] = [(c, b) for c in COLOR_NAMES for b in COLOR_NAMES if c != b]


def draw_scenes(
    rng: np.random.Generator, n: int, star_share: float = 0.0, pair_weights: np.ndarray | None = None
) -> list[Scene]:
    """Random scenes of every triple (the VAE learns pixels, not captions): ``star_share`` of them stars,
    the shape whose thin points a small decoder loses first; with ``pair_weights`` (over PAIRS) half of
    them take their colours by weight (``--hard-pairs``)."""
    triples = all_triples()
    stars = [t for t in triples if t[0] == "star"]
    scenes = []
    for i in range(n):
        scene = random_scene(rng, stars if rng.random() < star_share else triples, jitters=64)
        if pair_weights is not None and i % 2 == 0:
            color, ground = PAIRS[rng.choice(len(PAIRS), p=pair_weights)]
            scene = replace(scene, color=color, background=ground)
        scenes.append(scene)
    return scenes


def batch(rng: np.random.Generator, n: int, crop: int | None, star_share: float = 0.0) -> torch.Tensor:
    """Frames of :func:`draw_scenes`, whole or at random ``crop`` squares."""
    x = to_tensor([render(s) for s in draw_scenes(rng, n, star_share)])
    if crop is None:
        return x
    out = torch.empty(n, 3, crop, crop)
    for i in range(n):
        y0, x0 = rng.integers(0, SIZE - crop + 1, size=2)
        out[i] = x[i, :, y0 : y0 + crop, x0 : x0 + crop]
    return out


def object_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's L1 distance to its frame's background (the border median), and the object mask."""
    bg = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
    delta = (x - bg[:, :, None, None]).abs().sum(1, keepdim=True)
    return delta, (delta > 0.05).float()


def object_error(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per frame, the L1 error over its object's pixels as a share of the object's contrast with the
    background: how much of the object was lost, comparable between pale and vivid pairs."""
    delta, obj = object_mask(x)
    error = ((rec - x).abs().sum(1, keepdim=True) * obj).sum((1, 2, 3))
    return error / (delta * obj).sum((1, 2, 3)).clamp(min=1e-3)


def contrast_factor(contrast: torch.Tensor, ref: float) -> torch.Tensor:
    """How much more an object of this contrast with its background (L1 over RGB in the pixels' [-1, 1]
    units) weighs in a loss: ``ref`` over it, clipped to 0.5x-4x. A pale object errs by few levels where
    it loses its outline, and would otherwise weigh little."""
    return (ref / contrast.clamp(min=1e-3)).clamp(0.5, 4.0)


def weighted_loss(
    rec: torch.Tensor,
    x: torch.Tensor,
    object_weight: float = 8.0,
    edge_weight: float = 0.0,
    contrast_ref: float = 0.0,
) -> torch.Tensor:
    """L1 + MSE with pixels that differ from the frame's background (its border median) weighted up, and
    those within a pixel of the object's outline by ``edge_weight`` more (the outline is what tells shapes
    apart).

    With ``contrast_ref``, a frame's object and outline weights are scaled by :func:`contrast_factor` of
    the object's mean contrast over its pixels."""
    delta, obj = object_mask(x)
    extra = object_weight * obj
    if edge_weight:
        grown = torch.nn.functional.max_pool2d(obj, 3, 1, 1)
        shrunk = -torch.nn.functional.max_pool2d(-obj, 3, 1, 1)
        extra = extra + edge_weight * (grown - shrunk)
    if contrast_ref:
        contrast = (delta * obj).sum((1, 2, 3)) / obj.sum((1, 2, 3)).clamp(min=1.0)
        extra = extra * contrast_factor(contrast, contrast_ref)[:, None, None, None]
    w = 1.0 + extra
    err = (rec - x).abs() + (rec - x) ** 2
    return (err * w).sum() / (w.sum() * 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--init", type=Path, help="continue from a saved VAE folder")
    ap.add_argument("--decoder-only", action="store_true", help="train the decoder only (latent space fixed)")
    ap.add_argument("--star-share", type=float, default=0.0, help="share of training scenes that are stars")
    ap.add_argument("--edge-weight", type=float, default=0.0, help="extra loss weight on object outlines")
    ap.add_argument(
        "--contrast-ref", type=float, default=0.0, help="weigh objects by this over their contrast (0: off)"
    )
    ap.add_argument(
        "--hard-pairs",
        action="store_true",
        help="draw half of each batch's colour pairs by their recent object error (the hardest more often)",
    )
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument(
        "--channels", default="8,16,32,64", help="channels per level, full resolution first (a new VAE only)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    vae = AutoencoderKL.from_pretrained(str(args.init)) if args.init else build_vae(channels)
    if args.decoder_only:
        # The encoder defines the latent space a transformer may already be training on: keep it fixed.
        vae.encoder.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    start = time.time()
    step = 0
    pair_error = np.full(len(PAIRS), 0.1)  # a running mean of each colour pair's object error
    while time.time() - start < args.minutes * 60 and not (args.max_steps and step >= args.max_steps):
        scenes = draw_scenes(
            rng, args.batch, args.star_share, pair_error / pair_error.sum() if args.hard_pairs else None
        )
        x = to_tensor([render(s) for s in scenes])
        post = vae.encode(x).latent_dist
        # Mean plus a little noise: the decoder must tolerate the diffusion model's imperfect latents.
        z = post.mode() + args.noise * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = weighted_loss(rec, x, edge_weight=args.edge_weight, contrast_ref=args.contrast_ref) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.hard_pairs:
            for scene, error in zip(scenes, object_error(rec.detach(), x).tolist(), strict=True):
                pair = PAIRS.index((scene.color, scene.background))
                pair_error[pair] += 0.1 * (error - pair_error[pair])
        if step % 50 == 0:
            print(
                f"step {step} t={time.time() - start:.0f}s l1={l1.item():.4f} kl={kl.item():.3f}", flush=True
            )
        step += 1
    vae.eval()
    # Latent statistics and a reconstruction check with the scorer.
    rng = np.random.default_rng(123)
    triples = all_triples()
    scenes = [random_scene(rng, triples, jitters=64) for _ in range(256)]
    zs, ok, star_ok = [], [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 32):
            x = to_tensor([render(s) for s in scenes[i : i + 32]])
            z = vae.encode(x).latent_dist.mode()
            zs.append(z)
            for im, s in zip(to_images(vae.decode(z).sample), scenes[i : i + 32], strict=True):
                result = score(im, s)
                ok.append(all(result.values()))
                if s.shape == "star":
                    star_ok.append(result["shape"])
    z = torch.cat(zs)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    if args.decoder_only:
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(args.out))
    stats = {"steps": step, "minutes": (time.time() - start) / 60, "recon_all_correct": float(np.mean(ok))}
    stats["recon_star_shape"] = float(np.mean(star_ok))
    if args.hard_pairs:
        hardest = np.argsort(-pair_error)[:5]
        stats["hardest_pairs"] = {" on ".join(PAIRS[i]): round(float(pair_error[i]), 4) for i in hardest}
    stats |= {"shift_factor": shift, "scaling_factor": scale}
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
