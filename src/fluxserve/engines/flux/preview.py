"""Live previews: the image a FLUX.1 pipeline is forming, decoded from its latents between steps.

The latents a step ends with are FLUX's packed sequence (2x2 patches of the VAE's latent channels). A
preview unpacks them, shrinks the latent grid so that the decoded image is at most :data:`PREVIEW_SIDE`
pixels on its long side, and runs the model's own VAE on that: a decoder pass over at most a 32x32 latent,
whatever the output size, so it costs a fraction of a step on any model (measured in BENCHMARKS.md,
``bench/previews.py``). The VAE at low resolution rather than a fixed latent->RGB projection: it needs no
constants per model (the tiny and bundled models have one latent channel, FLUX.1 sixteen) and shows the
picture as the final decode will, only smaller.

FLUX.2 pipelines pack their latents differently (and normalise them with the VAE's batch statistics):
they report progress without previews.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

PREVIEW_SIDE = 256  # the long side of a preview, in pixels, at most


def latent_grid(tokens: int, width: int, height: int) -> tuple[int, int]:
    """The (rows, columns) of 2x2 patches a packed sequence of ``tokens`` lays out for a ``width`` x
    ``height`` generation: the factor pair of ``tokens`` nearest that aspect (the pipeline may have
    snapped the size, so it is not taken as given)."""
    best = (1, tokens)
    for rows in range(1, math.isqrt(tokens) + 1):
        if tokens % rows:
            continue
        for pair in ((rows, tokens // rows), (tokens // rows, rows)):
            if abs(math.log(pair[1] / pair[0] * height / width)) < abs(
                math.log(best[1] / best[0] * height / width)
            ):
                best = pair
    return best


@torch.no_grad()
def decode_preview(pipe: Any, latents: torch.Tensor, width: int, height: int) -> Image.Image:
    """One packed latent sequence (``(tokens, channels * 4)``) as a small RGB image, through ``pipe``'s
    VAE at a reduced size (at most :data:`PREVIEW_SIDE` pixels on the long side)."""
    vae = pipe.vae
    tokens, packed = latents.shape
    channels = packed // 4
    rows, columns = latent_grid(tokens, width, height)
    grid = latents.reshape(1, rows, columns, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    grid = grid.reshape(1, channels, rows * 2, columns * 2)
    scale = pipe.vae_scale_factor
    longest = max(grid.shape[2], grid.shape[3])
    target = max(1, PREVIEW_SIDE // scale)
    if longest > target:
        size = (
            max(1, round(grid.shape[2] * target / longest)),
            max(1, round(grid.shape[3] * target / longest)),
        )
        grid = torch.nn.functional.interpolate(grid.float(), size=size, mode="area")
    grid = grid.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(grid, return_dict=False)[0]
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def drawing(
    pipe: Any, tensors: dict[str, Any], row: int, width: int, height: int
) -> Callable[[], Image.Image] | None:
    """A function that decodes row ``row`` of the step's latents, for :meth:`EngineHooks.step`; None when
    the step handed over no latents (the callback's tensor inputs do not include them)."""
    latents = tensors.get("latents")
    if latents is None or latents.dim() != 3:
        return None
    return lambda: decode_preview(pipe, latents[row], width, height)
