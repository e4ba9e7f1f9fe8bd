"""Single values in and out of the state store, parsed: finite floats, bounded integers, bounded text.

The primitives every parser of a stored row uses (``rows.py`` for whole rows, ``facts.py`` for a
round's privacy and secure-aggregation facts): each returns the value within its bound, or None.
"""

from __future__ import annotations

import math
from typing import Any

INT64 = 2**63  # SQLite's INTEGER is signed 64-bit: a Python int outside it cannot even be bound
NODE_ID_LIMIT = 2**64  # Flower node ids are unsigned 64-bit
MAX_ROUND = 2**31 - 1
MAX_RANK = 1 << 16
CLIENT_SETTINGS = {  # column -> (low, high) of what 0006 added to a client result
    "staleness": (0, 2**31 - 1),
    "release_round": (0, 2**31 - 1),
    "contributions": (1, 2**31 - 1),
    "memory_budget_mb": (1, 1 << 24),
    "micro_batch_size": (0, 1 << 16),
    "gradient_checkpointing": (0, 1),
}
"""Highest LoRA rank a client result may record."""
MAX_ID = 256
"""Longest run id or client key kept (longer: the row is left out; writers truncate)."""
MAX_NAME = 200
"""Longest display name kept (a client's self-reported name, a run's name); longer ones are cut."""
MAX_TEXT = 4096
"""Longest reason, path or other free text kept; longer text is cut."""


def finite(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None (NaN, inf, text, bytes, bool, out of range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def integer(value: Any, low: int = 0, high: int = INT64 - 1) -> int | None:
    """Return ``value`` as an int in ``[low, high]`` (a whole float counts), else None."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if low <= value <= high else None


def text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """Return ``value`` if it is text, cut to ``limit`` characters; anything else is None."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def within(value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float | None:
    """Return ``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``), else None."""
    number = finite(value)
    if number is None or not low <= number <= high or (open_low and number == low):
        return None
    return number


def ident(value: Any) -> str | None:
    """Return ``value`` if it is a non-empty identifier of at most :data:`MAX_ID` characters, else None."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID else None


def node_id(value: Any) -> str | None:
    """Return a Flower node id (an int, or its decimal text, in ``[0, 2**64)``) as decimal text, else None.

    Kept as text because JavaScript's numbers lose digits above 2**53.
    """
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)
    number = integer(value, 0, NODE_ID_LIMIT - 1)
    return None if number is None else str(number)
