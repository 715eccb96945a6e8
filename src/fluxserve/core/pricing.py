"""What a job costs, and how credits are written (1 credit = 0.01 USD); each model's prices are in the
model table.

FLUX.2 is priced by the megapixel, as the vendor publishes it: one price for the first megapixel and one
for each further megapixel, counting the output and, when editing, the input images. Megapixels are
decimal (1024x1024 is 1.05 MP, as the vendor's own tables write it) and are billed in whole megapixels,
rounded to the nearest and at least one: 1024x1024 text to image costs the first megapixel's price, the
same size edited from a 1024x1024 input costs one further megapixel more (the vendor's "1 MP I2I" price).
An input image larger than 4 MP counts as 4 MP (FLUX.2 works on at most that), and a size not known yet
(a URL input not fetched) counts as 4 MP too: the hold is then an upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

from fluxserve.core.sizes import MAX_FLUX2_PIXELS

if TYPE_CHECKING:
    from fluxserve.core.models import ModelSpec

MEGAPIXEL = 1_000_000
Size = tuple[int, int]


@dataclass(frozen=True)
class Quote:
    """A job's price, and for megapixel-priced models the megapixels it was reckoned from (2 decimals)."""

    cost: Decimal
    input_mp: Decimal | None = None
    output_mp: Decimal | None = None


def megapixels(size: Size | None) -> Decimal:
    """Decimal megapixels of a size, an unknown one (None) and anything above 4 MP counting as 4 MP."""
    pixels = MAX_FLUX2_PIXELS if size is None else min(size[0] * size[1], MAX_FLUX2_PIXELS)
    return Decimal(pixels) / MEGAPIXEL


def quote(spec: ModelSpec, output: Size | None, inputs: Sequence[Size | None] = ()) -> Quote:
    """The price of one job of ``spec`` making ``output`` from ``inputs`` (None: not known yet)."""
    if spec.further_mp_price is None:
        return Quote(spec.price)
    output_mp = megapixels(output)
    input_mp = sum((megapixels(size) for size in inputs), Decimal(0))
    billed = max(1, int((output_mp + input_mp).to_integral_value(ROUND_HALF_UP)))
    cost = spec.price + spec.further_mp_price * (billed - 1)
    cent = Decimal("0.01")
    return Quote(cost, input_mp.quantize(cent, ROUND_HALF_UP), output_mp.quantize(cent, ROUND_HALF_UP))


def format_credits(value: Decimal) -> str:
    """``Decimal("4.00")`` -> ``"4"``, ``Decimal("2.50")`` -> ``"2.5"``: how the reseller writes quota."""
    return format(value.normalize(), "f")
