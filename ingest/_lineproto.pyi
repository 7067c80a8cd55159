"""Compiled tokenizer for plain InfluxDB line protocol (ingest/_lineproto.c)."""

def tokenize(text: str, /) -> tuple[list[str], list[str], bytearray, bytearray] | None:
    """(heads, names, values, stamps) of plain line protocol whose lines hold the same fields, in
    order; None for anything else. ``values``: float64, line by line; ``stamps``: int64 per line."""

def tokenize_line(text: str, /) -> tuple[str, list[str], list[float], int] | None:
    """(head, names, values, stamp) of plain line protocol of one line; None for anything else."""
