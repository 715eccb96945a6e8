"""Numbers a client sends as text (headers, query strings, event ids): ASCII digits only, and few of them.

``str.isdigit()`` accepts ``²`` and ``int()`` accepts ``٣`` and refuses more than 4,300 digits with a
ValueError, so either check on its own lets a hostile value through to a 500. Every such number is read
here instead.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")


def ascii_int(text: str, max_digits: int) -> int | None:
    """``text`` as a non-negative integer of 1 to ``max_digits`` ASCII digits (nothing around them), or
    None for anything else."""
    if len(text) > max_digits or _DIGITS.fullmatch(text) is None:
        return None
    return int(text)
