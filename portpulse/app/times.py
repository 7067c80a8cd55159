"""Instants on the command line: what ``--since``, ``--until``, ``--from`` and ``--to`` accept, and
how commands print them."""

from __future__ import annotations

import datetime as dt

__all__ = ["iso_time", "parse_time_ns"]


def parse_time_ns(text: str, now_ns: int) -> int:
    """``-1h``/``-7d`` (back from now), RFC 3339 (``2026-11-30T10:00:00Z``) or epoch seconds, in
    ns since the epoch; ValueError naming the accepted forms."""
    from portpulse.processors.window import duration_ns

    try:
        if text.startswith("-"):
            return now_ns - duration_ns(text[1:])
        if text.replace(".", "", 1).isdigit():
            return int(float(text) * 1e9)
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time like -1h, -7d, 2026-11-30T10:00:00Z or epoch seconds: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e9)


def iso_time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
