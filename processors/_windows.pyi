"""Compiled aggregation of closing windows whose rows are in order (processors/_windows.c)."""

from typing import Any

def aggregate_in_order(key: Any, ts: Any, value: Any, accepted: Any, /) -> tuple[int, bytearray, bytearray] | None:
    """(groups, 4 x g int64, 6 x g float64) of the rows' aggregates by key; None to decline."""
