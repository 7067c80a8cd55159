"""Compiled Hampel checks and history append for clean's in-order batches (processors/_hampel.c)."""

from typing import Any

def judge_appended(
    values: Any,
    ts: Any,
    offsets: Any,
    verdicts: Any,
    series: Any,
    counts: Any,
    cv: Any,
    ct: Any,
    co: Any,
    floor: Any,
    max_rate: Any,
    k_sigma: float,
    window: int,
    out: Any,
    /,
) -> bool:
    """Verdicts into ``out`` and the history appended to; False (nothing changed) to decline."""

def earliest_offsets(offsets: Any, series: Any, out: Any, /) -> None:
    """Each row's smallest offset into ``out``."""
