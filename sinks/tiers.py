"""Retention tiers: raw points and each aggregate window kept as long as the settings say.

On InfluxDB 1.8 a tier is a retention policy of ``influx.bucket``'s database: raw points (and
rejected readings) go to ``influx.bucket`` itself, a window's aggregates to ``{database}/{window}``.
Pure: the plan (:func:`tier_plan`), which tier a measurement belongs to, the InfluxQL to create
what is missing and the mismatches to report. I/O: :func:`ensure_tiers` at start-up, and
:class:`TieredStore`, a point store that sends each measurement to its tier's writer.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from portpulse.contract.deadletter import DeadLetterSink
from portpulse.contract.errors import PortPulseError
from portpulse.contract.points import PointColumns, SeriesRange, StoredReadings, WriteReceipt
from portpulse.contract.settings import InfluxSettings, RetentionSettings, Settings
from portpulse.sinks.query import flux_string
from portpulse.sinks.writer import InfluxWriter

__all__ = [
    "Tier",
    "TieredStore",
    "ensure_tiers",
    "go_duration_s",
    "open_tiered_store",
    "retention_statements",
    "tier_bucket",
    "tier_plan",
]

log = logging.getLogger("portpulse.sink")

RAW = "raw"


@dataclass(frozen=True, slots=True)
class Tier:
    """Where one tier is written (``database/retention_policy``) and how long it is kept (s; -1: forever)."""

    name: str
    bucket: str
    retention_s: float

    @property
    def policy(self) -> str:
        return self.bucket.partition("/")[2] or "autogen"


def tier_plan(influx: InfluxSettings, retention: RetentionSettings, windows: Sequence[str]) -> dict[str, Tier]:
    """The tiers for these window names (``"1m"``, ``"5m_1m"``), by name, ``"raw"`` first. Without
    ``retention.tiers``, or for a bucket that is not ``database/retention_policy`` (InfluxDB 2.x),
    every tier is ``influx.bucket``."""
    plan = {RAW: Tier(RAW, influx.bucket, retention.raw_s)}
    for window in windows:
        if retention.tiers and "/" in influx.bucket:
            database = influx.bucket.partition("/")[0]
            plan[window] = Tier(
                window, f"{database}/{window}", retention.windows_s.get(window, retention.other_windows_s)
            )
        else:
            plan[window] = plan[RAW]
    return plan


def tier_bucket(influx: InfluxSettings, retention: RetentionSettings, window: str | None) -> str:
    """The bucket holding a window's aggregates (None: raw points), for queries."""
    return tier_plan(influx, retention, [window] if window else [])[window or RAW].bucket


def _influxql_duration(seconds: float) -> str:
    return "INF" if seconds < 0 else f"{max(3600, int(seconds))}s"  # InfluxDB's shortest is 1 h


def go_duration_s(text: str) -> float:
    """InfluxDB's ``SHOW RETENTION POLICIES`` duration (``720h0m0s``; ``0s`` is forever) in s (-1: forever)."""
    parts = dict((unit, float(n)) for n, unit in re.findall(r"([\d.]+)([hms])", text))
    seconds = parts.get("h", 0.0) * 3600 + parts.get("m", 0.0) * 60 + parts.get("s", 0.0)
    return -1.0 if seconds == 0 else seconds


def _days(seconds: float) -> str:
    return "forever" if seconds < 0 else f"{seconds / 86_400:g} days"


def retention_statements(
    database: str, existing: Mapping[str, float], plan: Mapping[str, Tier]
) -> tuple[list[str], list[str]]:
    """InfluxQL creating the tiers' retention policies missing from ``existing`` (policy ->
    retention, s; -1 forever), and a message per present one whose retention differs."""
    creates, mismatches = [], []
    for tier in {t.bucket: t for t in plan.values()}.values():
        have = existing.get(tier.policy)
        if have is None:
            creates.append(
                f"CREATE RETENTION POLICY {flux_string(tier.policy)} ON {flux_string(database)} "
                f"DURATION {_influxql_duration(tier.retention_s)} REPLICATION 1"
            )
        elif abs(have - tier.retention_s) > 1 and not (have < 0 and tier.retention_s < 0):
            setting = "retention.raw_s" if tier.name == RAW else f"retention.windows_s.{tier.name}"
            mismatches.append(
                f"InfluxDB keeps {tier.bucket} ({tier.name} tier) {_days(have)}; {setting} asks for "
                f"{_days(tier.retention_s)}. PortPulse does not change a retention policy that exists: "
                f"ALTER RETENTION POLICY {flux_string(tier.policy)} ON {flux_string(database)} "
                f"DURATION {_influxql_duration(tier.retention_s)}, or set {setting} to match"
            )
    return creates, mismatches


async def ensure_tiers(influx: InfluxSettings, plan: Mapping[str, Tier]) -> bool:
    """Create the tiers' retention policies that are missing (and the database), and log a
    warning for each present one whose retention differs. Returns False on a server that is not
    InfluxDB 1.x (logged: its bucket's retention is set in InfluxDB), True otherwise. Connection
    errors are raised as aiohttp raises them."""
    import aiohttp

    token = influx.token.get_secret_value()
    user, _, password = token.partition(":")
    auth = {"u": user, "p": password} if password else {}
    database = influx.bucket.partition("/")[0]
    timeout = aiohttp.ClientTimeout(total=influx.timeout_ms / 1000)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def influxql(q: str) -> dict[str, object]:
            async with http.post(f"{influx.url}/query", params={"q": q, **auth}, ssl=influx.verify_ssl) as response:
                body = await response.json(content_type=None)
                if response.status >= 300:
                    raise PortPulseError(f"InfluxDB refused {q.split(' ON ')[0]!r} (HTTP {response.status}): {body}")
                return body  # type: ignore[no-any-return]

        async with http.get(f"{influx.url}/ping", ssl=influx.verify_ssl) as response:
            version = response.headers.get("X-Influxdb-Version", "")
        if not version.startswith("1."):
            log.warning(
                "InfluxDB %s: retention tiers are retention policies of InfluxDB 1.x; every tier goes to %s: "
                "give that bucket its retention in InfluxDB", version or "(no version header)", influx.bucket,
            )  # fmt: skip
            return False
        shown = await influxql(f"SHOW RETENTION POLICIES ON {flux_string(database)}")
        result = shown["results"][0]  # type: ignore[index]
        if "database not found" in str(result.get("error", "")):
            await influxql(f"CREATE DATABASE {flux_string(database)}")
            result = {}
        rows = result.get("series", [{}])[0].get("values", []) if result.get("series") else []
        existing = {str(row[0]): go_duration_s(str(row[1])) for row in rows}
        creates, mismatches = retention_statements(database, existing, plan)
        for statement in creates:
            await influxql(statement)
            log.info("created InfluxDB retention policy: %s", statement)
        for message in mismatches:
            log.warning("%s", message)
    return True


class TieredStore:
    """A point store over one writer per tier bucket: raw points, rejected readings, read-backs and
    retractions go to the raw tier; a window's aggregates (measurement ``{domain}_{window}``) to
    its tier."""

    def __init__(self, plan: Mapping[str, Tier], writers: Mapping[str, InfluxWriter]) -> None:
        self._writers = writers  # by bucket
        self._raw = writers[plan[RAW].bucket]
        # longest first: a window named "5m_1m" is not taken for "1m"
        self._suffixes = sorted(((f"_{name}", t.bucket) for name, t in plan.items() if name != RAW),
                                key=lambda s: -len(s[0]))  # fmt: skip

    def _writer_for(self, measurement: str) -> InfluxWriter:
        for suffix, bucket in self._suffixes:
            if measurement.endswith(suffix):
                return self._writers[bucket]
        return self._raw

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        if isinstance(points.measurement, str):
            return await self._writer_for(points.measurement).write(points, source)
        writers = {id(w): w for w in map(self._writer_for, set(points.measurement.tolist()))}
        if len(writers) > 1:
            raise ValueError("the points of one write belong to one retention tier (one window)")
        return await (next(iter(writers.values())) if writers else self._raw).write(points, source)

    async def flush(self) -> None:
        for writer in self._writers.values():
            await writer.flush()

    async def read(self, query: SeriesRange) -> StoredReadings:
        return await self._raw.read(query)

    async def retract(self, domain: str, metric: str, instants: list[tuple[str, int]]) -> None:
        await self.flush()
        await self._raw.retract(domain, metric, instants)

    async def delete_range(self, measurement: str, start_ns: int, stop_ns: int) -> None:
        await self.flush()
        await self._writer_for(measurement).delete_range(measurement, start_ns, stop_ns)

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self._writers.values())

    @property
    def last_error(self) -> str:
        return "; ".join(w.last_error for w in self._writers.values() if not w.healthy)


async def open_tiered_store(
    stack: contextlib.AsyncExitStack, settings: Settings, plan: Mapping[str, Tier], dlq: DeadLetterSink
) -> TieredStore:
    """A :class:`TieredStore` with one writer per bucket of ``plan``, each closed with ``stack``."""
    writers = {
        bucket: await stack.enter_async_context(
            InfluxWriter(settings.influx.model_copy(update={"bucket": bucket}), settings.sink, dlq)
        )
        for bucket in sorted({tier.bucket for tier in plan.values()})
    }
    return TieredStore(plan, writers)
