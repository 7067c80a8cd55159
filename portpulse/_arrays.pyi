"""Compiled factorising of names and pairing of lines for portpulse/arrays.py (portpulse/_arrays.c)."""

from typing import Any

def factorise(items: list[Any], /) -> tuple[bytearray, list[Any]]:
    """int64 codes (n,) of the items and the distinct ones, in order of first appearance."""

def pair_lines(point: Any, ts: Any, /) -> tuple[bytearray, bytearray] | None:
    """int64 each row's line (n,) and each line's first row (k,), lines in (point, ts) order;
    None when the points span too wide a range."""

def distinct_codes(key: Any, /) -> tuple[bytearray, bytearray]:
    """int64 first row of each distinct value (g,) and every row's code (n,), first-seen order."""

def key_slots_put(slot_key: Any, slot_row: Any, keys: Any, first_row: int, /) -> None:
    """Keys (m,) into an open-addressing table (int64 slot_key, slot_row (s,)) with rows first_row + i."""

def key_slots_find(slot_key: Any, slot_row: Any, keys: Any, /) -> bytearray:
    """int64 each key's row in the table (m,), -1 where absent."""
