"""Output sizes for the routes that take an aspect ratio, or follow an input image, instead of a fixed size.

Kontext snaps to the preferred ~1 MP resolutions (multiples of 16) that FLUX.1 Kontext was trained on;
ultra targets ~4 MP (2048x2048 for 1:1), width and height rounded to multiples of 16. FLUX.2 takes width
and height in steps of 16 up to 4 MP, or follows its first input image (made to fit those rules); fill
keeps its image's size and expand adds its margins to it.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxserve.core.params import GenerationParams

# (width, height), the resolutions FLUX.1 Kontext prefers; the nearest aspect ratio wins.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip
ULTRA_AREA = 2048 * 2048
MAX_FLUX2_PIXELS = 2048 * 2048  # "4 MP": 2048x2048 is the largest square the vendor makes
FLUX2_DEFAULT = (1024, 1024)  # FLUX.2 without a size or an input image
FLUX2_MULTIPLE = 16
MIN_RATIO = 9 / 21
MAX_RATIO = 21 / 9
_RATIO = re.compile(r"^\s*([0-9]{1,5})\s*:\s*([0-9]{1,5})\s*$")  # ASCII digits: \d takes any script's


class SizeRule(StrEnum):
    """How a model's output size is decided; each model's rule is in the model table."""

    WIDTH_HEIGHT = "width_height"  # the request's width and height
    KONTEXT = "kontext"  # ~1 MP for the aspect ratio, else the first input image's, else 1:1
    ULTRA = "ultra"  # ~4 MP for the aspect ratio
    FLUX2 = "flux2"  # width x height (<= 4 MP), else the first input image's fitted to that, else 1024^2
    FILL = "fill"  # the image's own size
    EXPAND = "expand"  # the image's size plus the top/bottom/left/right margins


def parse_aspect_ratio(value: str) -> float:
    """``"16:9"`` -> 1.777...; ValueError unless it is W:H between 21:9 and 9:21."""
    match = _RATIO.match(value)
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise ValueError(value)
    ratio = int(match[1]) / int(match[2])
    if not MIN_RATIO - 1e-9 <= ratio <= MAX_RATIO + 1e-9:
        raise ValueError(value)
    return ratio


def kontext_size(ratio: float) -> tuple[int, int]:
    return min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - math.log(ratio)))


def ultra_size(ratio: float) -> tuple[int, int]:
    width = round(math.sqrt(ULTRA_AREA * ratio) / 16) * 16
    height = round(math.sqrt(ULTRA_AREA / ratio) / 16) * 16
    return width, height


def fit_flux2(width: int, height: int) -> tuple[int, int]:
    """An input image's size made a FLUX.2 output size: scaled down (same aspect) to at most
    :data:`MAX_FLUX2_PIXELS`, each side rounded to a multiple of 16 and at least 64."""
    scale = min(1.0, math.sqrt(MAX_FLUX2_PIXELS / (width * height)))
    sides = []
    for side in (width * scale, height * scale):
        sides.append(max(64, int(side // FLUX2_MULTIPLE) * FLUX2_MULTIPLE))
    return sides[0], sides[1]


def flux2_size(width: int | None, height: int | None, reference: tuple[int, int] | None) -> tuple[int, int]:
    """Both sides given (non-zero): those, refused (ValueError) above 4 MP; else ``reference``'s fitted
    size (:func:`fit_flux2`), else :data:`FLUX2_DEFAULT`."""
    if width and height:
        if width * height > MAX_FLUX2_PIXELS:
            raise ValueError(
                f"width x height must be at most {MAX_FLUX2_PIXELS} pixels (4 MP), not {width}x{height}"
            )
        return width, height
    return FLUX2_DEFAULT if reference is None else fit_flux2(*reference)


def output_size(
    rule: SizeRule, params: GenerationParams, reference: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The size a job will have; None while it depends on a first input image not yet fetched
    (``reference`` is that image's size once known).

    Kontext without an aspect ratio follows its first input image, or 1:1 without one.
    """
    if rule is SizeRule.FLUX2:
        if params.input_images and not (params.width and params.height) and reference is None:
            return None
        return flux2_size(params.width, params.height, reference)
    if rule in (SizeRule.FILL, SizeRule.EXPAND):
        if reference is None:
            return None
        if rule is SizeRule.FILL:
            return reference
        return (
            reference[0] + params.left + params.right,
            reference[1] + params.top + params.bottom,
        )
    if rule is SizeRule.ULTRA:
        return ultra_size(parse_aspect_ratio(params.aspect_ratio or "1:1"))
    if rule is SizeRule.KONTEXT:
        if params.aspect_ratio:
            return kontext_size(parse_aspect_ratio(params.aspect_ratio))
        if not params.input_images:
            return kontext_size(1.0)
        return None if reference is None else kontext_size(reference[0] / reference[1])
    if params.width is None or params.height is None:
        raise ValueError(f"{params.model}: width and height are required")
    return params.width, params.height
