"""The size table of docs/reseller.md for aspect-ratio routes, pinned with literal values.

Other tests derive expected sizes from the functions under test; these pin what those functions return.
"""

from __future__ import annotations

import pytest

from fluxserve.core.sizes import kontext_size, ultra_size

# aspect (width, height), kontext size, ultra size: docs/reseller.md "Sizes for aspect-ratio routes".
TABLE = [
    ((21, 9), (1568, 672), (3136, 1344)),
    ((16, 9), (1392, 752), (2736, 1536)),
    ((3, 2), (1248, 832), (2512, 1680)),
    ((4, 3), (1184, 880), (2368, 1776)),
    ((1, 1), (1024, 1024), (2048, 2048)),
    ((3, 4), (880, 1184), (1776, 2368)),
    ((2, 3), (832, 1248), (1680, 2512)),
    ((9, 16), (752, 1392), (1536, 2736)),
    ((9, 21), (672, 1568), (1344, 3136)),
]
IDS = [f"{w}:{h}" for (w, h), _, _ in TABLE]


@pytest.mark.parametrize(("aspect", "kontext", "ultra"), TABLE, ids=IDS)
def test_kontext_size_matches_the_readme_table(
    aspect: tuple[int, int], kontext: tuple[int, int], ultra: tuple[int, int]
) -> None:
    assert kontext_size(aspect[0] / aspect[1]) == kontext


@pytest.mark.parametrize(("aspect", "kontext", "ultra"), TABLE, ids=IDS)
def test_ultra_size_matches_the_readme_table(
    aspect: tuple[int, int], kontext: tuple[int, int], ultra: tuple[int, int]
) -> None:
    assert ultra_size(aspect[0] / aspect[1]) == ultra
