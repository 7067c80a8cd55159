"""Compiled tokenizer for plain InfluxDB line protocol (ingest/_lineproto.c)."""

def tokenize(
    texts: list[str] | list[bytes], /
) -> tuple[bytearray, int, list[str], list[str], bytearray, bytearray, bytearray, bytearray, bytearray] | None:
    """(heads, known, added, names, codes, widths, lines, values, stamps) of plain line protocol
    texts (str, or bytes as received: plain text is ASCII), each of lines that hold the same
    fields in order, none twice, and one line at least;
    None for anything else. ``heads``: int64 per line, its head's code in the module's table of
    heads, which held ``known`` heads before the call and ``added`` (in code order) after them;
    ``names``: the distinct field names; ``codes``: int64 per value, into ``names``; ``widths``
    and ``lines``: int64 per text, its fields per line and its lines; ``values``: float64 per
    value, line by line; ``stamps``: int64 per line."""

def forget_heads() -> None:
    """Empty the table of heads."""

def tokenize_line(text: str, /) -> tuple[str, list[str], list[float], int] | None:
    """(head, names, values, stamp) of plain line protocol of one line; None for anything else."""
