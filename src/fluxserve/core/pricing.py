"""Credits per image (1 credit = 0.01 USD), as the vendor prices each model."""

from __future__ import annotations

from decimal import Decimal

PRICES: dict[str, Decimal] = {
    "flux-kontext-max": Decimal("8"),
    "flux-kontext-pro": Decimal("4"),
    "flux-pro-1.1-ultra": Decimal("6"),
    "flux-pro-1.1": Decimal("4"),
    "flux-pro": Decimal("5"),
    "flux-dev": Decimal("2.5"),
}


def format_credits(value: Decimal) -> str:
    """``Decimal("4.00")`` -> ``"4"``, ``Decimal("2.50")`` -> ``"2.5"``: how the reseller writes quota."""
    return format(value.normalize(), "f")
