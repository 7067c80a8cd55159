"""Retention tiers: raw points and each aggregate window kept as long as the settings say.

Raw points (and rejected readings) go to ``influx.bucket`` itself. On InfluxDB 1.8 (a bucket
``database/retention_policy``) a tier is a retention policy of the same database: a window's
aggregates go to ``{database}/{window}``. On InfluxDB 2.x (a bucket name without ``/``) a tier is
a bucket with its own retention: ``{bucket}_{window}``.
Pure: the plan (:func:`tier_plan`), which tier a measurement belongs to, what to create and the
mismatches to report (:func:`retention_statements`, :func:`bucket_changes`). I/O:
:func:`ensure_tiers` at start-up, and :class:`TieredStore`, a point store that sends each
measurement to its tier's writer.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from portpulse.contract.deadletter import DeadLetterSink
from portpulse.contract.errors import ConfigError, PortPulseError
from portpulse.contract.points import PointColumns, SeriesRange, StoredReadings, WriteReceipt
from portpulse.contract.settings import InfluxSettings, RetentionSettings, Settings
from portpulse.sinks.query import flux_string
from portpulse.sinks.writer import InfluxWriter

__all__ = [
    "Tier",
    "TieredStore",
    "bucket_changes",
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
    """The tiers for these window names (``"1m"``, ``"5m_1m"``), by name, ``"raw"`` first: each
    window in ``{database}/{window}`` for a bucket ``database/retention_policy`` (InfluxDB 1.x),
    else in the bucket ``{bucket}_{window}`` (InfluxDB 2.x). Without ``retention.tiers`` every
    tier is ``influx.bucket``."""
    plan = {RAW: Tier(RAW, influx.bucket, retention.raw_s)}
    database, slash, _ = influx.bucket.partition("/")
    for window in windows:
        if retention.tiers:
            bucket = f"{database}/{window}" if slash else f"{influx.bucket}_{window}"
            plan[window] = Tier(window, bucket, retention.windows_s.get(window, retention.other_windows_s))
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
        elif _differs(have, tier.retention_s):
            fix = (f"ALTER RETENTION POLICY {flux_string(tier.policy)} ON {flux_string(database)} "
                   f"DURATION {_influxql_duration(tier.retention_s)}")  # fmt: skip
            mismatches.append(_mismatch(tier, have, "a retention policy", fix))
    return creates, mismatches


def bucket_changes(existing: Mapping[str, float], plan: Mapping[str, Tier]) -> tuple[list[Tier], list[str]]:
    """InfluxDB 2.x: the tiers whose bucket is missing from ``existing`` (bucket -> retention, s;
    -1 forever), and a message per present one whose retention differs."""
    creates, mismatches = [], []
    for tier in {t.bucket: t for t in plan.values()}.values():
        have = existing.get(tier.bucket)
        if have is None:
            creates.append(tier)
        elif _differs(have, tier.retention_s):
            fix = f"influx bucket update --name {tier.bucket} --retention {_bucket_retention_s(tier.retention_s)}s"
            mismatches.append(_mismatch(tier, have, "a bucket", fix))
    return creates, mismatches


def _differs(have_s: float, want_s: float) -> bool:
    return abs(have_s - want_s) > 1 and not (have_s < 0 and want_s < 0)


def _mismatch(tier: Tier, have_s: float, what: str, fix: str) -> str:
    setting = "retention.raw_s" if tier.name == RAW else f"retention.windows_s.{tier.name}"
    return (
        f"InfluxDB keeps {tier.bucket} ({tier.name} tier) {_days(have_s)}; {setting} asks for "
        f"{_days(tier.retention_s)}. PortPulse does not change {what} that exists: {fix}, or set {setting} to match"
    )


def _bucket_retention_s(seconds: float) -> int:
    """InfluxDB 2.x's ``everySeconds``: 0 is forever, and the shortest is 1 h."""
    return 0 if seconds < 0 else max(3600, int(seconds))


async def ensure_tiers(influx: InfluxSettings, plan: Mapping[str, Tier]) -> None:
    """Create the tiers that are missing (retention policies and the database on InfluxDB 1.x,
    buckets on 2.x) and log a warning for each present one whose retention differs. A bucket
    named in the other version's form raises :class:`ConfigError`, a refusal
    :class:`PortPulseError`; connection errors are raised as aiohttp raises them."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=influx.timeout_ms / 1000)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{influx.url}/ping", ssl=influx.ssl_option()) as response:
                version = response.headers.get("X-Influxdb-Version", "")
            if version.startswith("1."):
                await _ensure_policies(http, influx, plan)
            else:
                await _ensure_buckets(http, influx, plan)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ConfigError(
            f"InfluxDB {influx.url}: its TLS certificate is not trusted "
            f"({getattr(exc.certificate_error, 'verify_message', exc.certificate_error)}); "
            f"check influx.ca_file ({influx.ca_file or 'the system CAs'})"
        ) from None
    except aiohttp.ClientSSLError as exc:
        raise ConfigError(f"InfluxDB {influx.url}: TLS failed ({exc}); check influx.url and influx.ca_file") from None


def _refused(influx: InfluxSettings, status: int, body: object) -> PortPulseError:
    """The error for an answer that is no success: a refused login or right is configuration."""
    if status in (401, 403):
        user, colon, _ = influx.token.get_secret_value().partition(":")  # 1.x: user:password
        who = f"user {user!r}" if colon and user else "the token"
        return ConfigError(f"InfluxDB {influx.url} refused {who} (HTTP {status}: {body}); check influx.token")
    return PortPulseError(f"InfluxDB {influx.url} answered HTTP {status}: {body}")


async def _ensure_policies(http: Any, influx: InfluxSettings, plan: Mapping[str, Tier]) -> None:
    if any("/" not in t.bucket for t in plan.values() if t.bucket != influx.bucket):
        raise ConfigError(
            f"InfluxDB 1.x keeps tiers as retention policies: set influx.bucket to database/retention_policy "
            f"(e.g. {influx.bucket}/raw), or retention.tiers = false to keep everything in {influx.bucket}"
        )
    user, _, password = influx.token.get_secret_value().partition(":")
    auth = {"u": user, "p": password} if password else {}
    database = influx.bucket.partition("/")[0]

    async def influxql(q: str) -> dict[str, Any]:
        async with http.post(f"{influx.url}/query", params={"q": q, **auth}, ssl=influx.ssl_option()) as response:
            body = await response.json(content_type=None)
            if response.status in (401, 403):
                raise _refused(influx, response.status, body.get("error", body) if isinstance(body, dict) else body)
            if response.status >= 300:
                raise PortPulseError(f"InfluxDB refused {q.split(' ON ')[0]!r} (HTTP {response.status}): {body}")
            return body  # type: ignore[no-any-return]

    shown = await influxql(f"SHOW RETENTION POLICIES ON {flux_string(database)}")
    result = shown["results"][0]
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


async def _ensure_buckets(http: Any, influx: InfluxSettings, plan: Mapping[str, Tier]) -> None:
    headers = {"Authorization": f"Token {influx.token.get_secret_value()}"}

    async def api(method: str, path: str, missing_ok: bool = False, **kwargs: Any) -> dict[str, Any]:
        async with http.request(
            method, f"{influx.url}{path}", headers=headers, ssl=influx.ssl_option(), **kwargs
        ) as response:
            body = await response.json(content_type=None)
            if response.status == 404 and missing_ok:  # a lookup by name answers 404 for none
                return {}
            if response.status >= 300:
                what = body.get("message", body) if isinstance(body, dict) else body
                if response.status in (401, 403):
                    raise _refused(influx, response.status, what)
                raise PortPulseError(f"InfluxDB refused {method} {path} (HTTP {response.status}): {what}")
            return body  # type: ignore[no-any-return]

    orgs = (await api("GET", "/api/v2/orgs", params={"org": influx.org})).get("orgs", [])
    if not orgs:
        raise ConfigError(f"InfluxDB has no organisation {influx.org!r} (influx.org)")
    org_id = str(orgs[0]["id"])
    existing = {}
    for name in sorted({t.bucket for t in plan.values()}):
        lookup = await api("GET", "/api/v2/buckets", missing_ok=True, params={"orgID": org_id, "name": name})
        found = lookup.get("buckets", [])
        if found:
            rules = [r for r in found[0].get("retentionRules") or [] if r.get("type") == "expire"]
            every = int(rules[0].get("everySeconds", 0)) if rules else 0
            existing[name] = float(every) if every > 0 else -1.0
    creates, mismatches = bucket_changes(existing, plan)
    for tier in creates:
        every = _bucket_retention_s(tier.retention_s)
        rules = [{"type": "expire", "everySeconds": every}] if every else []
        await api("POST", "/api/v2/buckets", json={"orgID": org_id, "name": tier.bucket, "retentionRules": rules})
        log.info("created InfluxDB bucket %s (%s tier), kept %s", tier.bucket, tier.name, _days(tier.retention_s))
    for message in mismatches:
        log.warning("%s", message)


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
