"""How credits are written (1 credit = 0.01 USD); each model's price is in the model table."""

from __future__ import annotations

from decimal import Decimal


def format_credits(value: Decimal) -> str:
    """``Decimal("4.00")`` -> ``"4"``, ``Decimal("2.50")`` -> ``"2.5"``: how the reseller writes quota."""
    return format(value.normalize(), "f")
