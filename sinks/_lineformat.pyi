"""Compiled line-protocol encoding of float fields for encode_lines (sinks/_lineformat.c)."""

from typing import Any

def encode(
    keys: bytes,
    key_ends: Any,
    series: Any,
    ts: Any,
    accepted: Any,
    names: tuple[bytes, ...],
    columns: tuple[Any, ...],
    /,
) -> tuple[bytes, bytearray]:
    """(one line per accepted row, the int64 offsets just past each line's newline)."""
