"""Analyst queries: one series (a sensor or a site, a metric) over a time range, optionally
aggregated per window. Flux is built from validated parts; every user string enters the query
as an escaped Flux string literal, so no argument can change the query's shape.
"""

from __future__ import annotations

import calendar
import functools
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from portpulse.contract.errors import ConfigError, PortPulseError, ServiceUnavailableError
from portpulse.contract.points import SeriesRange, StoredReadings
from portpulse.contract.settings import InfluxSettings

__all__ = [
    "AGGREGATES", "QueryRow", "QuerySpec", "build_flux", "flux_string", "flux_time_ns", "influxql_delete",
    "parse_readback", "point_flux", "readback_flux", "rows_to_dataframe", "run_query",
]  # fmt: skip

AGGREGATES = ("mean", "min", "max", "count", "sum", "last", "first", "median", "stddev", "spread")
_DURATION = re.compile(r"-?(\d+(ns|us|ms|s|m|h|d|w|mo|y))+")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def flux_string(text: str) -> str:
    """A Flux string literal holding exactly ``text`` (escapes ``\\``, ``"`` and ``${``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _flux_time(text: str, what: str) -> str:
    if text == "now":
        return "now()"
    if _DURATION.fullmatch(text):
        return text
    if _RFC3339.fullmatch(text):
        return text
    raise ConfigError(f"{what} must be 'now', a duration like -1h / -30m, or RFC 3339 time, not {text!r}")


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """What an analyst asks for. ``every`` + ``fn`` aggregate per window; without them, raw points."""

    bucket: str
    measurement: str
    field: str
    sensor_id: str | None = None
    site: str | None = None
    start: str = "-1h"
    stop: str = "now"
    every: str | None = None
    fn: str = "mean"

    def __post_init__(self) -> None:
        _flux_time(self.start, "start")
        _flux_time(self.stop, "stop")
        if self.every is not None and (not _DURATION.fullmatch(self.every) or self.every.startswith("-")):
            raise ConfigError(f"window must be a positive duration like 1m or 15m, not {self.every!r}")
        if self.fn not in AGGREGATES:
            raise ConfigError(f"function must be one of {', '.join(AGGREGATES)}, not {self.fn!r}")
        if not self.measurement or not self.field:
            raise ConfigError("measurement and field are required")


def build_flux(spec: QuerySpec) -> str:
    """The Flux query for ``spec`` (pure)."""
    lines = [
        f"from(bucket: {flux_string(spec.bucket)})",
        f"  |> range(start: {_flux_time(spec.start, 'start')}, stop: {_flux_time(spec.stop, 'stop')})",
        f"  |> filter(fn: (r) => r._measurement == {flux_string(spec.measurement)}"
        f" and r._field == {flux_string(spec.field)})",
    ]
    if spec.sensor_id is not None:
        lines.append(f"  |> filter(fn: (r) => r.sensor_id == {flux_string(spec.sensor_id)})")
    if spec.site is not None:
        lines.append(f"  |> filter(fn: (r) => r.site == {flux_string(spec.site)})")
    if spec.sensor_id is None:
        # A site (or everything): one series per query, across its sensors.
        lines.append('  |> group(columns: ["_measurement", "_field"])')
    if spec.every is not None:
        # Label each window with its start, like the processor's {domain}_{window} tables.
        lines.append(f'  |> aggregateWindow(every: {spec.every}, fn: {spec.fn}, createEmpty: false, timeSrc: "_start")')
    else:
        lines.append('  |> sort(columns: ["_time"])')
    lines.append('  |> keep(columns: ["_time", "_value"])')
    return "\n".join(lines)


def _any_of(column: str, values: tuple[str, ...]) -> str:
    """``r.column == "a" or r.column == "b" ...``: equality predicates InfluxDB pushes down to
    its storage (``contains()`` is not: on 1.8 it scans the bucket, seconds per query)."""
    return "(" + " or ".join(f"r.{column} == {flux_string(v)}" for v in values) + ")"


def readback_flux(bucket: str, query: SeriesRange) -> str:
    """The Flux query for the processor's read-back of ``query`` (pure): raw points of the
    metrics, and the rejected readings' values and reasons; values as strings (one schema)."""
    measurements = (query.domain, f"{query.domain}_rejected")
    fields = query.metrics + tuple(f"{m}_reason" for m in query.metrics)
    return "\n".join([
        f"from(bucket: {flux_string(bucket)})",
        f"  |> range(start: time(v: {int(query.start_ns)}), stop: time(v: {int(query.stop_ns)}))",
        f"  |> filter(fn: (r) => {_any_of('_measurement', measurements)} and {_any_of('_field', fields)}"
        f" and {_any_of('sensor_id', query.sensor_ids)})",
        '  |> map(fn: (r) => ({_time: r._time, _measurement: r._measurement, _field: r._field,'
        " sensor_id: r.sensor_id, _value: string(v: r._value)}))",
        "  |> group()",
    ])  # fmt: skip


def point_flux(bucket: str, measurement: str, sensor_id: str, ts_ns: int) -> str:
    """The Flux query for every field of one sensor's point at ``ts_ns`` (pure), with its site."""
    return "\n".join([
        f"from(bucket: {flux_string(bucket)})",
        f"  |> range(start: time(v: {int(ts_ns)}), stop: time(v: {int(ts_ns) + 1}))",
        f"  |> filter(fn: (r) => r._measurement == {flux_string(measurement)}"
        f" and r.sensor_id == {flux_string(sensor_id)})",
        '  |> keep(columns: ["_time", "_field", "_value", "site"])',
        "  |> group()",
    ])  # fmt: skip


def influxql_delete(measurement: str, sensor_id: str | None, start_ns: int, stop_ns: int | None = None) -> str:
    """InfluxQL that deletes the points of ``measurement`` at ``start_ns`` (``stop_ns`` None) or in
    ``[start_ns, stop_ns)``, of one sensor or (``sensor_id`` None) all (pure; identifiers and the
    string literal escaped). InfluxDB 1.x deletes them from every retention policy of the database."""
    name = measurement.replace("\\", "\\\\").replace('"', '\\"')
    when = f"time = {int(start_ns)}" if stop_ns is None else f"time >= {int(start_ns)} AND time < {int(stop_ns)}"
    if sensor_id is None:
        return f'DELETE FROM "{name}" WHERE {when}'  # noqa: S608 (escaped)
    value = sensor_id.replace("\\", "\\\\").replace("'", "\\'")
    return f'DELETE FROM "{name}" WHERE "sensor_id" = \'{value}\' AND {when}'  # noqa: S608 (escaped)


def flux_time_ns(text: str) -> int:
    """Flux's ``2023-11-14T22:13:20.123456789Z`` -> ns since the epoch, exactly (no float)."""
    whole, _, frac = text.rstrip("Z").partition(".")
    return _epoch_seconds(whole) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


@functools.lru_cache(maxsize=65_536)
def _epoch_seconds(whole: str) -> int:
    """``2023-11-14T22:13:20`` (UTC) -> s since the epoch. Cached: a read-back's rows share
    their seconds (a fleet reports on the same ones), and ``strptime`` costs microseconds."""
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))


def parse_readback(query: SeriesRange, csv_rows: list[list[str]]) -> StoredReadings:
    """Rows of :func:`readback_flux`'s CSV (a header row per table) as :class:`StoredReadings`:
    raw points are accepted readings; in ``{domain}_rejected``, ``{metric}_reason`` names a
    rejected reading and ``{metric}`` carries its value where it had a finite one. Rows outside
    ``[start_ns, stop_ns)`` are left out (InfluxDB 1.8's Flux includes the stop instant)."""
    domain = query.domain
    accepted: list[tuple[str, str, int, float, str]] = []
    rejected: dict[tuple[str, str, int], list[Any]] = {}
    header: list[str] = []
    t = v = f = s = m = 0
    for row in csv_rows:
        if not row or not any(row):
            continue
        if "_time" in row and "_value" in row:
            header = row
            t, v, f, s, m = (header.index(c) for c in ("_time", "_value", "_field", "sensor_id", "_measurement"))
            continue
        if not header:
            continue
        name, ts = row[f], flux_time_ns(row[t])
        if not query.start_ns <= ts < query.stop_ns:
            continue
        if row[m] == domain:
            accepted.append((row[s], name, ts, float(row[v]), ""))
        elif name.endswith("_reason"):
            rejected.setdefault((row[s], name[: -len("_reason")], ts), [float("nan"), ""])[1] = row[v]
        else:
            rejected.setdefault((row[s], name, ts), [float("nan"), ""])[0] = float(row[v])
    # "reinstated": a rejection withdrawn when the reading was judged again (it is a raw point now).
    rows = accepted + [
        (sn, mt, ts, val, why) for (sn, mt, ts), (val, why) in rejected.items() if why and why != "reinstated"
    ]
    return StoredReadings.of(domain, rows)


@dataclass(frozen=True, slots=True)
class QueryRow:
    """One result row: time as RFC 3339 text (ns precision kept) and the value."""

    time: str
    value: float


def run_query(influx: InfluxSettings, spec: QuerySpec) -> list[QueryRow]:
    """Run ``spec`` against InfluxDB and return the rows in time order."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.domain.dialect import Dialect
    from influxdb_client.rest import ApiException

    try:
        with InfluxDBClient(
            url=influx.url, token=influx.token.get_secret_value(), org=influx.org, timeout=influx.timeout_ms,
            verify_ssl=influx.verify_ssl, ssl_ca_cert=str(influx.ca_file) if influx.ca_file else None,
        ) as client:  # fmt: skip
            csv = client.query_api().query_csv(build_flux(spec), dialect=Dialect(header=True, annotations=[]))
            raw = [r for r in csv if r]
    except ApiException as exc:
        body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body)
        raise PortPulseError(f"InfluxDB refused the query (HTTP {exc.status}): {body[:500]}") from None
    except Exception as exc:  # urllib3/socket errors: InfluxDB is not answering
        raise ServiceUnavailableError("influx", f"{type(exc).__name__} talking to {influx.url}") from None
    if not raw:
        return []
    header = raw[0]
    t, v = header.index("_time"), header.index("_value")
    rows = [QueryRow(r[t], float(r[v])) for r in raw[1:] if r != header and r[v] != ""]
    return sorted(rows, key=lambda r: r.time)


def rows_to_dataframe(rows: list[QueryRow]) -> Any:
    """A pandas DataFrame indexed by UTC time (needs pandas installed)."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("pandas is not installed: pip install pandas") from exc
    frame = pd.DataFrame({"time": pd.to_datetime([r.time for r in rows], utc=True), "value": [r.value for r in rows]})
    return frame.set_index("time")


OutputFormat = Literal["table", "csv", "json"]


def format_rows(rows: list[QueryRow], fmt: OutputFormat) -> str:
    """Render rows for the terminal (table), spreadsheets (csv) or programs (json)."""
    import json

    if fmt == "json":
        return json.dumps([{"time": r.time, "value": r.value} for r in rows])
    if fmt == "csv":
        return "\n".join(["time,value", *(f"{r.time},{r.value!r}" for r in rows)])
    width = max((len(r.time) for r in rows), default=4)
    return "\n".join(
        [f"{'time':<{width}}  value", *(f"{r.time:<{width}}  {r.value!r}" for r in rows), f"({len(rows)} rows)"]
    )
