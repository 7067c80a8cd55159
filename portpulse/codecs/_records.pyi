"""Compiled Kafka record encoding for encode_records (portpulse/codecs/_records.c)."""

from typing import Any

def encode(
    src: Any,
    key_start: Any,
    key_len: Any,
    value_starts: tuple[Any, ...],
    value_lens: tuple[Any, ...],
    headers: bytes,
    /,
) -> bytes:
    """The records section of one v2 batch: every record's varints, key, value parts and headers."""

def key_hashes(keys: list[bytes], /) -> bytearray:
    """int64 (n,): Kafka's murmur2 of each key, sign bit cleared (the default partitioner's hash)."""

def intern(src: Any, start: Any, length: Any, /) -> tuple[bytearray, list[bytes]]:
    """int64 codes (n,) of the slices and the distinct ones, in order of first appearance."""

def parse(
    data: Any, ends: Any, counts: Any, base: Any, /
) -> tuple[bytearray, bytearray, bytearray, bytearray, bytearray]:
    """int64 (n,) offset, key_start, key_len, value_start, value_len of joined record sections."""

def wire_headers(data: Any, start: Any, length: Any, /) -> tuple[bytearray, bytearray, bytearray, bytearray]:
    """int64 (g,) index, header length, readings' start and reading count of each well-framed wire value."""

def wire_readings(
    data: Any, body: Any, count: Any, header: Any, widths: Any, good: Any, table_width: int, /
) -> tuple[bytearray, bytearray, bytearray, bytearray, bytearray, bytearray, bytearray]:
    """The readings of wire values: int64 (r,) record, header, name_code, ts_ns; float64 value;
    uint8 flags; uint8 (g,) kept."""
