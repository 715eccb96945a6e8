"""What a job costs, and how credits are written (1 credit = 0.01 USD); each model's prices are in the
model table.

FLUX.2 is priced by the megapixel, as the vendor publishes it: one price for the first megapixel and one
for each further megapixel, counting the output and, when editing, the input images. Megapixels are
decimal (1024x1024 is 1.05 MP, as the vendor's own tables write it) and are billed in whole megapixels,
rounded to the nearest and at least one: 1024x1024 text to image costs the first megapixel's price, the
same size edited from a 1024x1024 input costs one further megapixel more (the vendor's "1 MP I2I" price).
An input image larger than 4 MP counts as 4 MP (FLUX.2 works on at most that), and a size not known yet
(a URL input not fetched) counts as 4 MP too: the hold is then an upper bound, brought to the exact
price (:func:`requote`, ``db.ledger.reprice``) by the fetch stage once it has the images. The requote
starts again from exact pixel counts (never from the rounded megapixels a job row keeps), so a URL input
costs what the same image sent inline costs, and never more than the quote.
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
CENT = Decimal("0.01")  # megapixels are reported to two decimals
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
    return _priced(spec, spec.further_mp_price, megapixels(output), sum(map(megapixels, inputs), Decimal(0)))


def requote(spec: ModelSpec, quoted: Quote, output: Size, references: Sequence[Size]) -> Quote:
    """``quoted`` (made by :func:`quote` before the URL inputs were fetched, each counted at the 4 MP
    bound) made exact once the output size and every reference image's size are known: the price the
    same job sent inline pays, and never more than was quoted (the key was told, and held, that much)."""
    if spec.further_mp_price is None or quoted.input_mp is None:
        return quoted
    exact = quote(spec, output, references)
    return exact if exact.cost <= quoted.cost else Quote(quoted.cost, exact.input_mp, exact.output_mp)


def _priced(spec: ModelSpec, further: Decimal, output_mp: Decimal, input_mp: Decimal) -> Quote:
    billed = max(1, int((output_mp + input_mp).to_integral_value(ROUND_HALF_UP)))
    return Quote(
        spec.price + further * (billed - 1),
        input_mp.quantize(CENT, ROUND_HALF_UP),
        output_mp.quantize(CENT, ROUND_HALF_UP),
    )


def format_credits(value: Decimal) -> str:
    """``Decimal("4.00")`` -> ``"4"``, ``Decimal("2.50")`` -> ``"2.5"``: how the reseller writes quota."""
    return format(value.normalize(), "f")


def refused_price(spec: ModelSpec, price: Decimal | None, count: int = 1, unit: str = "") -> str:
    """What a 402 says ``count`` jobs cost (``unit`` after the figure): their quote when the refused job
    was quoted, else (refused before its images were looked at) the model's lowest price, "at least" for a
    price by the megapixel."""
    if price is not None:
        return format_credits(price * count) + unit
    lowest = format_credits(spec.price * count) + unit
    if spec.further_mp_price is None:
        return lowest
    first, further = format_credits(spec.price), format_credits(spec.further_mp_price)
    return f"at least {lowest} ({first} for the first megapixel + {further} for each further one)"
