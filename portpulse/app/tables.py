"""Rows of a listing command (``portpulse sensors``, ``portpulse dlq``) rendered for a terminal,
a spreadsheet or a program."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Mapping[str, object]], fmt: str, empty: str = "nothing to show") -> str:
    """``table`` (aligned columns; ``empty`` when there are no rows), ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(list(map(dict, rows)), indent=2)
    if not rows:
        return empty if fmt == "table" else ""
    columns = list(rows[0])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
        return out.getvalue().rstrip("\n")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
