"""Output sizes for the routes that take an aspect ratio instead of width and height.

Kontext snaps to the preferred ~1 MP resolutions (multiples of 16) that FLUX.1 Kontext was trained on;
ultra targets ~4 MP (2048x2048 for 1:1), width and height rounded to multiples of 16.
"""

from __future__ import annotations

import math
import re

# (width, height), the resolutions FLUX.1 Kontext prefers; the nearest aspect ratio wins.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip
ULTRA_AREA = 2048 * 2048
MIN_RATIO = 9 / 21
MAX_RATIO = 21 / 9
_RATIO = re.compile(r"^\s*(\d{1,5})\s*:\s*(\d{1,5})\s*$")


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


def output_size(
    model: str,
    width: int | None,
    height: int | None,
    aspect_ratio: str | None,
    reference: tuple[int, int] | None,
) -> tuple[int, int] | None:
    """The size a job will have; None while it depends on a reference image not yet fetched.

    Kontext without an aspect ratio follows its first reference image, or 1:1 without one.
    """
    if model == "flux-pro-1.1-ultra":
        return ultra_size(parse_aspect_ratio(aspect_ratio or "1:1"))
    if model.startswith("flux-kontext"):
        if aspect_ratio:
            return kontext_size(parse_aspect_ratio(aspect_ratio))
        if reference is not None:
            return kontext_size(reference[0] / reference[1])
        return None
    assert width is not None and height is not None
    return width, height
