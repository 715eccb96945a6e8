"""Train the bundled model's AutoencoderKL on the scenes: `python -m training.vae --out runs/vae`.

Full 128x128 frames, with the loss on object pixels weighted up: objects are a few percent of the pixels,
and an unweighted loss is satisfied by the background alone (tried: colours of objects came out wrong).
Afterwards the latent mean/std set `shift_factor`/`scaling_factor`, as FLUX's VAE does, so latents are
~unit scale for the transformer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from training.model import build_vae
from training.scenes import SIZE, all_triples, random_scene, render, score


def to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_images(x: torch.Tensor) -> list:
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def batch(rng: np.random.Generator, n: int, crop: int | None, star_share: float = 0.0) -> torch.Tensor:
    """Random scenes of every triple (the VAE learns pixels, not captions); ``star_share`` of them stars,
    the shape whose thin points a small decoder loses first."""
    triples = all_triples()
    stars = [t for t in triples if t[0] == "star"]
    images = [
        render(random_scene(rng, stars if rng.random() < star_share else triples, jitters=64))
        for _ in range(n)
    ]
    x = to_tensor(images)
    if crop is None:
        return x
    out = torch.empty(n, 3, crop, crop)
    for i in range(n):
        y0, x0 = rng.integers(0, SIZE - crop + 1, size=2)
        out[i] = x[i, :, y0 : y0 + crop, x0 : x0 + crop]
    return out


def weighted_loss(
    rec: torch.Tensor, x: torch.Tensor, object_weight: float = 8.0, edge_weight: float = 0.0
) -> torch.Tensor:
    """L1 + MSE with pixels that differ from the frame's background (its border median) weighted up, and
    those within a pixel of the object's outline by ``edge_weight`` more (the outline is what tells shapes
    apart)."""
    bg = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
    obj = ((x - bg[:, :, None, None]).abs().sum(1, keepdim=True) > 0.05).float()
    w = 1.0 + object_weight * obj
    if edge_weight:
        grown = torch.nn.functional.max_pool2d(obj, 3, 1, 1)
        shrunk = -torch.nn.functional.max_pool2d(-obj, 3, 1, 1)
        w = w + edge_weight * (grown - shrunk)
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
    while time.time() - start < args.minutes * 60 and not (args.max_steps and step >= args.max_steps):
        x = batch(rng, args.batch, None, args.star_share)
        post = vae.encode(x).latent_dist
        # Mean plus a little noise: the decoder must tolerate the diffusion model's imperfect latents.
        z = post.mode() + args.noise * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = weighted_loss(rec, x, edge_weight=args.edge_weight) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
    stats |= {"shift_factor": shift, "scaling_factor": scale}
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
