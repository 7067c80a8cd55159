"""``portpulse sensors``: the series the bridges admitted (the registry topic) and the registry
file's, per site, with when each was last seen."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from portpulse.ingest.admission import SeriesKey

__all__ = ["sensor_rows"]

Row = dict[str, str | int | bool]


def _when(s: float | None) -> str:
    return "never" if s is None else dt.datetime.fromtimestamp(s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sensor_rows(
    seen: Mapping[SeriesKey, tuple[float, float]],
    allowed: frozenset[SeriesKey],
    now_s: float,
    site: str | None = None,
    domain: str | None = None,
) -> list[Row]:
    """Without ``site``: one row per (domain, site) with its sensor counts and newest last-seen
    time; with ``site``: one row per sensor of that site. ``seen`` maps a series to its first and
    last seen times (s since the epoch; last-seen times are written every 10 minutes at most).
    Times print as ISO 8601 UTC."""
    keys = sorted(k for k in set(seen) | allowed if domain in (None, k[0]) and site in (None, k[1]))
    if site is not None:
        return [
            {"domain": k[0], "site": k[1], "sensor_id": k[2],
             "first_seen": _when(seen[k][0] if k in seen else None),
             "last_seen": _when(seen[k][1] if k in seen else None), "in_registry_file": k in allowed}
            for k in keys
        ]  # fmt: skip
    counts: dict[tuple[str, str], list[int]] = {}  # sensors, seen in the last hour, never seen
    newest: dict[tuple[str, str], float] = {}
    for key in keys:
        where = (key[0], key[1])
        count = counts.setdefault(where, [0, 0, 0])
        count[0] += 1
        times = seen.get(key)
        if times is None:
            count[2] += 1
            continue
        count[1] += now_s - times[1] <= 3600
        newest[where] = max(newest.get(where, times[1]), times[1])
    return [
        {"domain": d, "site": s, "sensors": n, "seen_last_hour": recent, "never_seen": never,
         "last_seen": _when(newest.get((d, s)))}
        for (d, s), (n, recent, never) in counts.items()
    ]  # fmt: skip
