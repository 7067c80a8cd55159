"""Pure payload decoders: MQTT topic + payload bytes -> reading columns, or reasons.

Accepted payloads (see the README's wire contract):

1. JSON reading: ``{"ts": ..., "metrics": {"no2": 41.2, ...}}`` on ``sensors/{domain}/{site}/{sensor_id}``
2. JSON gateway batch: ``{"readings": [{"sensor_id": "...", "ts": ..., "metrics": {...}}, ...]}``
   on ``sensors/{domain}/{site}`` or ``sensors/{domain}/{site}/{gateway_id}``
3. InfluxDB line protocol, one or many lines; tags ``sensor_id`` and ``site`` override the topic.
4. Sparkplug B on ``spBv1.0/...``, with a :class:`portpulse.ingest.sparkplug.SparkplugHost`.

Timestamps: epoch s/ms/us/ns (told apart by magnitude) or RFC 3339 text; a reading without one
gets the receive time and ``FLAG_TS_FROM_RECEIVE``. Every rejected value is reported as a
:class:`Problem` with a stable ``reason`` code; the good readings of the same message still pass.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard, TypeVar, cast

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from portpulse.arrays import distinct_codes, factorise, factorise_column
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE, Coded, ReadingColumns, str_array
from portpulse.contract.topics import ID_RE, MqttTopic, parse_mqtt_topic, parse_mqtt_topics

if TYPE_CHECKING:
    from portpulse.ingest.sparkplug import SparkplugHost

__all__ = [
    "PAYLOAD_OF",
    "REASONS",
    "RECEIVED_OF",
    "TOPIC_OF",
    "DecodeLimits",
    "DecodedBatch",
    "Message",
    "Problem",
    "decode_messages",
    "parse_timestamp_ns",
]

#: Every reason code a rejection can carry (metrics are labelled with these).
REASONS = (
    "payload_too_large",
    "bad_topic",
    "not_utf8",
    "malformed_json",
    "malformed_line_protocol",
    "unsupported_shape",
    "missing_metrics",
    "bad_sensor_id",
    "bad_metric_name",
    "non_numeric_value",
    "non_finite_value",
    "bad_timestamp",
    "ts_too_far_future",
    "ts_too_far_past",
    # Sparkplug B (see portpulse.ingest.sparkplug)
    "sparkplug_bad_protobuf",
    "sparkplug_bad_seq",
    "sparkplug_seq_gap",
    "sparkplug_data_before_birth",
    "sparkplug_unknown_alias",
    "sparkplug_unmapped_metric",
    "sparkplug_unsupported_type",
    "sparkplug_datatype_mismatch",
    "sparkplug_stale_death",
)

T = TypeVar("T")

METRIC_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


class _Seen:
    """Names already validated: the same sensor ids, sites and metrics recur in every message,
    so a dict lookup replaces a regex match. Bounded (cleared when full)."""

    def __init__(self, pattern: re.Pattern[str], limit: int = 200_000) -> None:
        self._pattern = pattern
        self._limit = limit
        #: strings that matched, each mapped to its first-seen object: handing that one object on
        #: for every later equal string keeps the columns' strings few and hot in the cache, and
        #: a repeated object's hash is cached where a fresh one's must be computed
        self.known: dict[str, str] = {}

    def ok(self, name: object) -> TypeGuard[str]:
        """True for a string matching the pattern (JSON may hand over lists or objects too)."""
        if not isinstance(name, str):
            return False
        if name in self.known:
            return True
        if not self._pattern.fullmatch(name):
            return False
        if len(self.known) >= self._limit:
            self.known.clear()
        self.known[name] = name
        return True

    def canonical(self, names: list[Any]) -> list[str] | None:
        """The first-seen objects of ``names``, or None if any of them is not known (yet)."""
        try:
            found = list(map(self.known.get, names))
        except TypeError:  # an unhashable name
            return None
        return None if None in found else found  # type: ignore[return-value]

    def learned(self, names: list[str | None]) -> list[str] | None:
        """:meth:`canonical`, checking (and learning) the names not known yet; None if one of
        them does not match."""
        found = self.canonical(names)
        if found is None and all(map(self.ok, names)):
            found = self.canonical(names)
        return found


_IDS = _Seen(ID_RE)
_SPARKPLUG_PREFIX = "spBv1.0/"
_METRICS = _Seen(METRIC_RE)
_MAX_READINGS_PER_MESSAGE = 100_000


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What the decoder accepts. Times are ns; ``max_payload_bytes`` applies before parsing."""

    topic_prefix: str = "sensors"
    max_payload_bytes: int = 256 * 1024
    max_future_ns: int = 300 * 10**9
    max_past_ns: int = 7 * 24 * 3600 * 10**9


class Message(NamedTuple):
    """One MQTT message as received; ``received_ns`` is the bridge's wall clock (ns since epoch).
    (A named tuple: the bridge makes tens of thousands per second, and it is cheaper than a dataclass.)"""

    topic: str
    payload: bytes
    received_ns: int


#: a Message's fields, for passes over a list of them in C (``map``; a named tuple's items are
#: read by index, faster than by the attribute lookup of ``attrgetter``)
TOPIC_OF, PAYLOAD_OF, RECEIVED_OF = (itemgetter(Message._fields.index(f)) for f in ("topic", "payload", "received_ns"))


@dataclass(frozen=True, slots=True)
class Problem:
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class SeriesCodes:
    """The domain, sensor and site columns of a batch's readings factorised once, for the
    admission gate and :func:`~portpulse.ingest.records.build_records` alike: codes int64
    ``(n,)`` into the distinct names (first-seen order); the metric column's too where the
    decoder had them at hand (None: the record builder factorises it)."""

    domain: npt.NDArray[np.int64]
    domains: list[str]
    sensor: npt.NDArray[np.int64]
    sensors: list[str]
    site: npt.NDArray[np.int64]
    sites: list[str]
    metric: npt.NDArray[np.int64] | None = None
    metrics: list[str] | None = None
    #: :meth:`distinct_series`, when the decoder had it at hand (from lines rather than values)
    distinct: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None

    @classmethod
    def of(cls, readings: ReadingColumns) -> SeriesCodes:
        domain, domains = factorise_column(readings.domain)
        sensor, sensors = factorise_column(readings.sensor_id)
        site, sites = factorise_column(readings.site)
        return cls(domain, domains, sensor, sensors, site, sites)

    def take(self, index: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> SeriesCodes:
        """The rows selected by ``index`` (the names stay: some may then be unused)."""
        return SeriesCodes(self.domain[index], self.domains, self.sensor[index], self.sensors, self.site[index],
                           self.sites, None if self.metric is None else self.metric[index],
                           self.metrics)  # fmt: skip

    def series(self) -> npt.NDArray[np.int64]:
        """One int64 per reading, equal for equal (domain, site, sensor)."""
        key = self.domain
        for column, size in ((self.site, len(self.sites)), (self.sensor, len(self.sensors))):
            if (int(key.max()) + 1) * size >= 2**62:  # too wide to extend (hostile input): renumber first
                key = distinct_codes(key)[1]
            key = key * size + column
        return key

    def distinct_series(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The distinct (domain, site, sensor) in order of first appearance: the row of each
        one's first reading ``(g,)`` and every reading's index into them ``(n,)``."""
        return distinct_codes(self.series()) if self.distinct is None else self.distinct


@dataclass(slots=True)
class DecodedBatch:
    """Readings of a batch of messages. ``message_index`` (int64 ``(n,)``) maps each reading to
    its message; ``problems`` maps a message index to what was rejected from it."""

    readings: ReadingColumns
    message_index: npt.NDArray[np.int64]
    problems: dict[int, list[Problem]] = field(default_factory=dict)
    #: the readings' names factorised, when the decoder had them at hand (a plain delivery)
    codes: SeriesCodes | None = None


class _Out:
    """Column builders shared by the per-format decoders: readings added one at a time or by the
    list (``add``, ``extend``) and whole column chunks (``extend_columns``), kept in call order."""

    __slots__ = ("chunks", "domain", "flags", "message", "metric", "scaled", "sensor", "site", "ts", "value")

    def __init__(self) -> None:
        self.sensor: list[str] = []
        self.site: list[str] = []
        self.domain: list[str] = []
        self.metric: list[str] = []
        self.ts: list[int] = []
        self.value: list[float] = []
        self.flags: list[int] = []
        self.message: list[int] = []
        # (start, stop, ns per unit): runs of ``ts`` still in s/ms/us, scaled to ns at the end in
        # one numpy step rather than one Python multiplication per reading.
        self.scaled: list[tuple[int, int, int]] = []
        #: finished chunks: (readings, message index), in the order they were added
        self.chunks: list[tuple[ReadingColumns, npt.NDArray[np.int64]]] = []

    def extend(
        self,
        msg: int,
        sensors: list[str],
        sites: list[str],
        domain: str,
        metrics: list[str],
        stamps: list[int],
        values: list[float],
        unit: int,
    ) -> None:
        """Add the readings of one message decoded whole (equal-length columns, no flags);
        ``stamps`` in ``unit`` ns each, scaled to ns with the rest at the end."""
        n = len(metrics)
        self.message += [msg] * n
        self.sensor += sensors
        self.site += sites
        self.domain += [domain] * n
        self.metric += metrics
        if unit != 1:
            self.scaled.append((len(self.ts), len(self.ts) + n, unit))
        self.ts += stamps
        self.value += values
        self.flags += [0] * n

    def add(self, msg: int, sensor: str, site: str, domain: str, metric: str, ts: int, value: float, flag: int) -> None:
        self.message.append(msg)
        self.sensor.append(sensor)
        self.site.append(site)
        self.domain.append(domain)
        self.metric.append(metric)
        self.ts.append(ts)
        self.value.append(value)
        self.flags.append(flag)

    def extend_columns(self, msg: int | npt.NDArray[np.int64], readings: ReadingColumns) -> None:
        """Add readings as columns (after whatever was added before), of message ``msg`` or of the
        messages ``msg`` gives for each reading."""
        self._flush()
        if isinstance(msg, int):
            msg = np.full(len(readings), msg, dtype=np.int64)
        self.chunks.append((readings, msg))

    def _flush(self) -> None:
        """Turn the readings added one at a time or by the list into a chunk."""
        if not self.message:
            return
        readings = ReadingColumns(
            sensor_id=str_array(self.sensor),
            site=str_array(self.site),
            domain=str_array(self.domain),
            metric=str_array(self.metric),
            ts_ns=_scaled(np.array(self.ts, dtype=np.int64), self.scaled),
            value=np.array(self.value, dtype=np.float64),
            flags=np.array(self.flags, dtype=np.uint8),
        )
        self.chunks.append((readings, np.array(self.message, dtype=np.int64)))
        for column in (self.sensor, self.site, self.domain, self.metric, self.ts, self.value, self.flags):
            column.clear()
        self.message, self.scaled = [], []

    def columns(self) -> tuple[ReadingColumns, npt.NDArray[np.int64]]:
        """Every reading added, as columns, and the index of its message."""
        self._flush()
        if len(self.chunks) == 1:
            return self.chunks[0]
        if not self.chunks:
            return ReadingColumns.empty(), np.zeros(0, dtype=np.int64)
        readings, messages = zip(*self.chunks, strict=True)
        return ReadingColumns.concat(list(readings)), np.concatenate(messages)


def decode_messages(
    messages: Sequence[Message],
    limits: DecodeLimits,
    refused: Mapping[int, Problem] | None = None,
    sparkplug: SparkplugHost | None = None,
) -> DecodedBatch:
    """Decode a batch of MQTT messages into reading columns and per-message problems. Messages
    in ``refused`` (by index) are not decoded: their problem is that refusal. With ``sparkplug``,
    messages on ``spBv1.0/...`` go to that host application (in receive order)."""
    out = _Out()
    problems: dict[int, list[Problem]] = {}
    refused = refused or {}
    for_sparkplug: list[tuple[int, str, bytes, int]] = []
    plain = None
    if (
        len(messages) > 1
        and not refused
        and (sparkplug is None or not any(m.topic.startswith(_SPARKPLUG_PREFIX) for m in messages))
    ):
        json_first = messages[0].payload[:1] == b"{"  # as the rest of a delivery most likely is too
        plain = (_plain_reports if json_first else _plain_delivery)(messages, limits, out)
        if plain is not None:
            messages = ()  # every message decoded at once
    for i, msg in enumerate(messages):
        if i in refused:
            problems[i] = [refused[i]]
            continue
        found: list[Problem] = []
        if sparkplug is not None and msg.topic.startswith(_SPARKPLUG_PREFIX):
            if len(msg.payload) > limits.max_payload_bytes:
                found.append(
                    Problem("payload_too_large", f"{len(msg.payload)} bytes > limit {limits.max_payload_bytes}")
                )
            else:
                for_sparkplug.append((i, msg.topic, msg.payload, msg.received_ns))
        else:
            _decode_one(i, msg, limits, out, found)
        if found:
            problems[i] = found
    readings, message_index = out.columns()
    if for_sparkplug:
        assert sparkplug is not None
        decoded, sparkplug_problems = sparkplug.decode(for_sparkplug)
        for i, found_there in sparkplug_problems.items():
            problems.setdefault(i, []).extend(Problem(*p) for p in found_there)
        if len(readings):
            readings = ReadingColumns.concat([readings, decoded.readings])
            message_index = np.concatenate([message_index, decoded.message])
        else:
            readings, message_index = decoded.readings, decoded.message
    return DecodedBatch(readings, message_index, problems, plain)


def _scaled(ts: npt.NDArray[np.int64], runs: list[tuple[int, int, int]]) -> npt.NDArray[np.int64]:
    """``ts`` with each run ``ts[start:stop]`` multiplied by its ns per unit (in place)."""
    for start, stop, unit in runs:
        ts[start:stop] *= unit
    return ts


def _decode_one(i: int, msg: Message, limits: DecodeLimits, out: _Out, problems: list[Problem]) -> None:
    if len(msg.payload) > limits.max_payload_bytes:
        problems.append(Problem("payload_too_large", f"{len(msg.payload)} bytes > limit {limits.max_payload_bytes}"))
        return
    topic = parse_mqtt_topic(msg.topic, limits.topic_prefix)
    if isinstance(topic, str):
        problems.append(Problem("bad_topic", f"{msg.topic!r}: {topic}"))
        return
    try:
        text = msg.payload.decode()
    except UnicodeDecodeError as exc:
        problems.append(Problem("not_utf8", str(exc)))
        return
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        _decode_json(i, stripped, topic, msg.received_ns, limits, out, problems)
    elif stripped:
        _decode_line_protocol(i, stripped, topic, msg.received_ns, limits, out, problems)
    else:
        problems.append(Problem("missing_metrics", "empty payload"))


# ---------------------------------------------------------------- timestamps


def parse_timestamp_ns(raw: object) -> int:
    """Epoch s/ms/us/ns (by magnitude) or RFC 3339 text -> ns since the epoch. Raises ValueError."""
    if isinstance(raw, bool):
        raise ValueError("boolean is not a timestamp")
    if isinstance(raw, int):
        if abs(raw) >= 10**19:
            raise ValueError(f"timestamp {raw} out of range")
        return raw * _ns_per_unit(abs(raw))
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError("timestamp is not finite")
        if abs(raw) < 1e11:
            return round(raw * 1e9)
        if abs(raw) < 1e14:
            return round(raw * 1e6)
        if abs(raw) < 1e17:
            return round(raw * 1e3)
        raise ValueError(f"float timestamp {raw} out of range (use an integer for ns)")
    if isinstance(raw, str):
        return _rfc3339_ns(raw)
    raise ValueError(f"timestamp must be a number or RFC 3339 text, not {type(raw).__name__}")


_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})")


def _rfc3339_ns(text: str) -> int:
    match = _RFC3339.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not RFC 3339: {text[:40]!r}")
    whole, frac, zone = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if zone in ("Z", "z") else zone))
    return int(moment.timestamp()) * 10**9 + int((frac or "0").ljust(9, "0"))


def _check_ts(ts: int, received_ns: int, limits: DecodeLimits) -> Problem | None:
    if ts > received_ns + limits.max_future_ns:
        return Problem("ts_too_far_future", f"{(ts - received_ns) / 1e9:.0f}s ahead of the bridge clock")
    if ts < received_ns - limits.max_past_ns:
        return Problem("ts_too_far_past", f"{(received_ns - ts) / 1e9:.0f}s behind the bridge clock")
    return None


def _value(metric: str, raw: object) -> tuple[float | None, Problem | None]:
    if not _METRICS.ok(metric):
        return None, Problem("bad_metric_name", f"{str(metric)[:80]!r} must match [A-Za-z0-9_]{{1,64}}")
    if isinstance(raw, bool):
        return float(raw), None
    if isinstance(raw, int | float):
        value = float(raw)
        if not math.isfinite(value):
            return None, Problem("non_finite_value", f"{metric}={raw}")
        return value, None
    return None, Problem("non_numeric_value", f"{metric}={str(raw)[:80]!r}")


# ---------------------------------------------------------------- JSON


def _parse_json(text: str) -> Any:
    """orjson (about 3x the standard library). What it refuses (``NaN``/``Infinity`` literals,
    ``1e400``, nesting beyond 1024 levels, malformed text) is re-read by the standard library, so
    those keep its verdicts (non-finite values, its error messages)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _decode_json(
    i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out, problems: list[Problem]
) -> None:
    if '"readings"' in text:
        if _plain_batch(i, text, topic, received_ns, limits, out):
            return
    elif topic.sensor_id and _plain_single(i, text, topic, received_ns, limits, out):
        return
    try:
        doc = _parse_json(text)
    except (ValueError, RecursionError) as exc:
        problems.append(Problem("malformed_json", str(exc)[:200]))
        return
    if not isinstance(doc, dict):
        problems.append(Problem("unsupported_shape", "JSON payload must be an object"))
        return
    if "readings" in doc:
        readings = doc["readings"]
        if not isinstance(readings, list) or not readings:
            problems.append(Problem("unsupported_shape", "'readings' must be a non-empty list"))
            return
        if len(readings) > _MAX_READINGS_PER_MESSAGE:
            problems.append(Problem("payload_too_large", f"{len(readings)} readings in one message"))
            return
        for k, reading in enumerate(readings):
            if not isinstance(reading, dict):
                problems.append(Problem("unsupported_shape", f"readings[{k}] is not an object"))
                continue
            sensor = reading.get("sensor_id", topic.sensor_id)
            _add_reading(i, reading, sensor, topic, received_ns, limits, out, problems, f"readings[{k}].")
        return
    if not topic.sensor_id:
        problems.append(Problem("bad_topic", "a single reading needs sensors/{domain}/{site}/{sensor_id}"))
        return
    _add_reading(i, doc, topic.sensor_id, topic, received_ns, limits, out, problems, "")


class _GatewayReading(msgspec.Struct, gc=False):
    """One reading of a clean gateway batch, typed so msgspec checks the types in C while parsing.
    Absent ``sensor_id``/``site`` stay ``UNSET`` (an explicit ``null`` fails the type check)."""

    ts: int
    metrics: dict[str, float]
    sensor_id: str | msgspec.UnsetType = msgspec.UNSET
    site: str | msgspec.UnsetType = msgspec.UNSET


class _GatewayBatch(msgspec.Struct, gc=False):
    readings: list[_GatewayReading]


_GATEWAY_BATCH = msgspec.json.Decoder(_GatewayBatch)
#: fields of a report or a gateway reading, and of an MqttTopic (domain, sensor_id, site)
_GET_DOMAIN, _GET_SENSOR, _GET_SITE, _GET_TS, _GET_METRICS = (
    attrgetter(name) for name in ("domain", "sensor_id", "site", "ts", "metrics")
)


def _plain_batch(i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out) -> bool:
    """Add every reading of a gateway batch at once when all are plain: names already validated,
    integer timestamps within the limits, finite numbers as values. Otherwise add nothing and
    return False: the general path then says exactly what is wrong (and learns new names).

    msgspec parses into typed structs (about half orjson's time with the dicts, and the types are
    checked as it goes); the remaining checks are whole-list passes in C (map/set/min/max), no
    Python frame per reading, and numpy's per-call cost would exceed the work for a hundred readings.
    """
    try:
        readings = _GATEWAY_BATCH.decode(text).readings
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):  # any doubt: the general path decides
        return False
    if not readings or len(readings) > _MAX_READINGS_PER_MESSAGE:
        return False
    sensors = _names(list(map(_GET_SENSOR, readings)), topic.sensor_id)
    sites = _names(list(map(_GET_SITE, readings)), topic.site)
    if sensors is None or sites is None:
        return False
    fields: list[dict[str, float]] = list(map(_GET_METRICS, readings))
    if not all(fields):
        return False
    metrics = list(chain.from_iterable(fields))
    if not all(map(_METRICS.known.__contains__, metrics)):  # (msgspec already shares short keys' objects)
        return False
    # Finite: JSON has no NaN/Infinity literals and msgspec refuses numbers beyond the float range.
    values = list(chain.from_iterable(map(dict.values, fields)))
    stamps: list[int] = list(map(_GET_TS, readings))
    lo, hi = min(stamps), max(stamps)
    unit = _ns_per_unit(hi)
    if lo < 0 or unit != _ns_per_unit(lo):  # negative or mixed units: the per-reading path
        return False
    if lo * unit < received_ns - limits.max_past_ns or hi * unit > received_ns + limits.max_future_ns:
        return False
    if hi * unit >= 2**63:  # beyond int64 ns (only with a huge ingest.max_future_s): the per-reading path
        return False
    n = len(metrics)
    if n != len(fields):  # several metrics per reading: repeat the reading's columns
        counts = list(map(len, fields))
        sensors, sites = _repeated(sensors, counts), _repeated(sites, counts)
        stamps = _repeated(stamps, counts)
    out.extend(i, sensors, sites, topic.domain, metrics, stamps, values, unit)
    return True


class _SingleReport(msgspec.Struct, gc=False):
    """A sensor's report on its own topic, typed like :class:`_GatewayReading` (other keys are
    ignored, as the general path does); ``site`` overrides the topic's."""

    ts: int
    metrics: dict[str, float]
    site: str | msgspec.UnsetType = msgspec.UNSET


_SINGLE_REPORT = msgspec.json.Decoder(_SingleReport)


def _plain_single(i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out) -> bool:
    """:func:`_plain_batch` for a sensor's single report: its readings added at once when its
    names are already validated, its timestamp an integer within the limits and its values finite
    numbers; otherwise nothing is added and the general path decides (and learns new names)."""
    try:
        report = _SINGLE_REPORT.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):  # skipping deep unknown keys recurses
        return False
    sensor = _IDS.known.get(topic.sensor_id)
    site = _IDS.known.get(topic.site if report.site is msgspec.UNSET else report.site)
    metrics = list(report.metrics)
    if sensor is None or site is None or not metrics or not all(map(_METRICS.known.__contains__, metrics)):
        return False
    ts = report.ts * _ns_per_unit(report.ts)  # a negative one falls before the past limit
    if ts < received_ns - limits.max_past_ns or ts > received_ns + limits.max_future_ns or ts >= 2**63:
        return False
    n = len(metrics)
    out.extend(i, [sensor] * n, [site] * n, topic.domain, metrics, [ts] * n, list(report.metrics.values()), 1)
    return True


def _repeated(column: list[T], counts: list[int]) -> list[T]:
    """Each ``column[k]`` ``counts[k]`` times, in order (in C). Equal counts (a fleet's reports)
    take one slice assignment per count instead of an iterator per item."""
    width = counts[0] if counts else 0
    if counts.count(width) == len(counts) and width < 64:
        out: list[T] = column * width
        for j in range(width):
            out[j::width] = column
        return out
    return list(chain.from_iterable(map(repeat, column, counts)))


def _names(given: list[Any], default: str | None) -> list[str] | None:
    """A column of names already validated (their first-seen objects): as given, or the topic's where
    every reading leaves it out. None for anything else (new names, some given and some not): the
    per-reading path decides."""
    if given[0] is not msgspec.UNSET:
        return _IDS.canonical(given)
    if given.count(msgspec.UNSET) == len(given) and default in _IDS.known:
        return [_IDS.known[default]] * len(given)
    return None


def _ns_per_unit(magnitude: int) -> int:
    """ns per unit of an integer epoch timestamp of this (non-negative) magnitude: s, ms, us, ns."""
    if magnitude < 10**11:  # seconds until year 5138
        return 10**9
    if magnitude < 10**14:
        return 10**6
    if magnitude < 10**17:
        return 10**3
    return 1


def _add_reading(
    i: int,
    reading: dict[str, Any],
    sensor: object,
    topic: MqttTopic,
    received_ns: int,
    limits: DecodeLimits,
    out: _Out,
    problems: list[Problem],
    where: str,
) -> None:
    if not _IDS.ok(sensor):
        problems.append(Problem("bad_sensor_id", f"{where}sensor_id {str(sensor)[:80]!r}"))
        return
    site = reading.get("site", topic.site)
    if not _IDS.ok(site):
        problems.append(Problem("bad_sensor_id", f"{where}site {str(site)[:80]!r}"))
        return
    metrics = reading.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        problems.append(Problem("missing_metrics", f"{where}metrics must be a non-empty object"))
        return
    flag = 0
    if reading.get("ts") is None:
        ts, flag = received_ns, int(FLAG_TS_FROM_RECEIVE)
    else:
        try:
            ts = parse_timestamp_ns(reading["ts"])
        except ValueError as exc:
            problems.append(Problem("bad_timestamp", f"{where}ts: {exc}"))
            return
        if problem := _check_ts(ts, received_ns, limits):
            problems.append(Problem(problem.reason, where + problem.detail))
            return
    for metric, raw in metrics.items():
        value, problem = _value(metric, raw)
        if problem:
            problems.append(Problem(problem.reason, where + problem.detail))
        else:
            assert value is not None
            out.add(i, sensor, site, topic.domain, metric, ts, value, flag)


# ---------------------------------------------------------------- line protocol


def _split_escaped(text: str, sep: str) -> list[str]:
    if "\\" not in text and '"' not in text:
        return text.split(sep)
    parts, cur, k, quoted = [], [], 0, False
    while k < len(text):
        c = text[k]
        if c == "\\" and k + 1 < len(text):
            cur.append(text[k : k + 2])
            k += 2
            continue
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        k += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([,= \\\"])", r"\1", text) if "\\" in text else text


def _is_ascii_int(text: str) -> bool:
    """``-?[0-9]+``: str.isdigit alone also accepts digits like '²' that int() refuses."""
    return text.isascii() and text.removeprefix("-").isdigit()


def _lp_value(text: str) -> object:
    if text.endswith(("i", "u")) and _is_ascii_int(text[:-1]):
        return int(text[:-1])
    if text in ("t", "T", "true", "True", "TRUE"):
        return True
    if text in ("f", "F", "false", "False", "FALSE"):
        return False
    if text.startswith('"') or not text.isascii():
        return text  # a string field, or digits line protocol does not have: reported as non-numeric
    try:
        return float(text)
    except ValueError:
        return text


def _pairs(parts: list[str], parse: Callable[[str], T]) -> dict[str, T] | None:
    """``key=value`` items of a tag or field set (keys unescaped), or None if one is malformed."""
    out: dict[str, T] = {}
    for part in parts:
        k, eq, v = part.partition("=")
        if not eq or not k or not v:
            return None
        out[_unescape(k)] = parse(v)
    return out


#: Besides "\n", what ``str.splitlines``/``str.strip`` treat as line breaks or blanks in ASCII text,
#: and what line protocol escapes or quotes: text holding one of these takes the per-line path.
_NOT_PLAIN = ("\\", '"', "#", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")
#: measurement and tag set text -> (sensor_id or None, site or None), for names already validated
_TAG_SETS: dict[str, tuple[str | None, str | None]] = {}


def _tag_set(head: str) -> tuple[str | None, str | None] | None:
    """:func:`_parse_tag_set`, cached by head text (for the per-line path: the delivery-wide path
    keeps its parses in its table of heads)."""
    known = _TAG_SETS.get(head)
    if known is not None:
        return known
    found = _parse_tag_set(head)
    if found is not None:
        if len(_TAG_SETS) >= 200_000:
            _TAG_SETS.clear()
        _TAG_SETS[head] = found
    return found


def _parse_tag_set(head: str) -> tuple[str | None, str | None] | None:
    """``sensor_id`` and ``site`` (first-seen objects) of a plain ``measurement[,tags]`` whose names
    are valid ids (new ones are learned); None for anything else (an empty measurement, a bad
    name, a malformed pair, a repeated key): the per-line path decides."""
    measurement, _, text = head.partition(",")
    if not measurement:
        return None
    pairs = [pair.partition("=") for pair in text.split(",")] if text else []
    tags = {k: v for k, eq, v in pairs if eq and k and v}
    if len(tags) != len(pairs):
        return None
    sensor, site = tags.get("sensor_id"), tags.get("site")
    if (sensor is not None and not _IDS.ok(sensor)) or (site is not None and not _IDS.ok(site)):
        return None  # the per-line path says which is wrong
    return (_IDS.known[sensor] if sensor else None, _IDS.known[site] if site else None)


_CompiledTokenize = Callable[
    [list[str] | list[bytes]],
    tuple[bytearray, int, list[str], list[str], bytearray, bytearray, bytearray, bytearray, bytearray] | None,
]
_CompiledTokenizeLine = Callable[[str], tuple[str, list[str], list[float], int] | None]


def _compiled() -> tuple[_CompiledTokenize | None, _CompiledTokenizeLine | None, Callable[[], None]]:
    try:
        from portpulse.ingest._lineproto import forget_heads, tokenize, tokenize_line
    except ImportError:  # installed where no C compiler was at hand: the Python tokenizer does it all
        return None, None, lambda: None
    return tokenize, tokenize_line, forget_heads


_compiled_tokenize, _compiled_tokenize_line, _compiled_forget_heads = _compiled()


class _Heads:
    """The tag sets of line-protocol heads (measurement and tags, as written) by head code. A
    tokenizer interns each line's head and hands over codes, so a fleet's heads, which recur in
    every delivery, are parsed once and a delivery makes no string per line. The sensor ids and
    sites they name (and their topics' where a head has no such tag) get codes too, so a delivery
    factorises them as integers. Bounded: past ``limit`` heads or names the table starts over
    (``forget`` empties the tokenizer's table too)."""

    def __init__(self, forget: Callable[[], None], limit: int = 200_000) -> None:
        self._forget, self._limit = forget, limit
        self.forget()

    def forget(self) -> None:
        """Start over, with the tokenizer's table."""
        self._forget()
        self.size = 0
        self.valid = np.zeros(0, dtype=bool)  #: a plain tag set of valid names (else the per-line path decides)
        #: the code of its sensor_id and site tags' names, -1 where it has none
        self.tag = {"sensor": np.zeros(0, dtype=np.int64), "site": np.zeros(0, dtype=np.int64)}
        self._codes: dict[str, int] = {}
        self.names = np.zeros(0, dtype=object)  #: the names by code (first-seen objects)

    def bounded(self) -> None:
        """Start over once past the limit."""
        if max(self.size, len(self._codes)) > self._limit:
            self.forget()

    def learn(self, known: int, added: list[str]) -> None:
        """The heads ``added`` to the tokenizer's table after its ``known`` ones."""
        if known != self.size:
            raise RuntimeError(f"the tokenizer's table held {known} heads, this one {self.size}")
        n = self.size + len(added)
        tags = list(map(_parse_tag_set, added))
        self.valid = _filled(self.valid, self.size, [t is not None for t in tags])
        for k, column in enumerate(self.tag):
            self.tag[column] = _filled(self.tag[column], self.size, self._coded([t and t[k] for t in tags]))
        self.size = n

    def _coded(self, names: Sequence[str | None]) -> list[int]:
        """The codes of ``names`` (-1 for None), new ones added."""
        before, added = len(self._codes), list[str]()
        codes = _codes_of(names, self._codes, added)
        if added:
            self.names = _filled(self.names, before, added)
        return codes

    def ids(
        self, column: str, head: npt.NDArray[np.int64], of_topic: list[str | None], text_of_line: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64] | None:
        """Each line's sensor id or site (``column``) as its code into :attr:`names`: its head's
        tag, its text's topic's (``of_topic``, one per text) where the head has none; None when
        one of those is not a valid id (new ones are learned)."""
        code = self.tag[column][head]
        untagged = code < 0
        if untagged.any():
            texts = np.unique(text_of_line[untagged]).tolist()
            known = _IDS.learned([of_topic[i] for i in texts])
            if known is None:
                return None
            of_text = np.full(len(of_topic), -1, dtype=np.int64)
            of_text[texts] = self._coded(known)
            code = np.where(untagged, of_text[text_of_line], code)
        return code


def _codes_of(items: Sequence[str | None], codes: dict[str, int], added: list[str]) -> list[int]:
    """The code of each item in ``codes`` (-1 for None); new ones are given the next codes and
    appended to ``added``."""
    out = []
    for item in items:
        if item is None:
            out.append(-1)
            continue
        code = codes.get(item)
        if code is None:
            code = codes[item] = len(codes)
            added.append(item)
        out.append(code)
    return out


def _filled(array: npt.NDArray[Any], size: int, items: Sequence[Any]) -> npt.NDArray[Any]:
    """``array`` holding ``items`` after its first ``size`` rows: grown (doubled at least) when short."""
    n = size + len(items)
    if n > len(array):
        grown = np.zeros(max(n, 2 * len(array), 1024), dtype=array.dtype)
        grown[:size] = array[:size]
        array = grown
    array[size:n] = items
    return array


#: the heads the compiled tokenizer interned, and those the Python one did (in ``_PYTHON_HEAD_CODES``)
_COMPILED_HEADS = _Heads(_compiled_forget_heads)
_PYTHON_HEAD_CODES: dict[str, int] = {}
_PYTHON_HEADS = _Heads(_PYTHON_HEAD_CODES.clear)

#: the line-protocol tokenizer this install runs: "compiled" or "python" (logged at start-up)
LINE_TOKENIZER = "python" if _compiled_tokenize is None else "compiled"


class _Text(NamedTuple):
    """One text of plain line protocol cut into its parts (see :func:`_tokenize_python`)."""

    heads: list[str]  #: measurement and tag set of each line, as written
    names: list[str]  #: field names: of one line when ``counts`` is None, else of every value
    counts: list[int] | None  #: fields per line; None when every line has ``names`` in that order
    values: npt.NDArray[np.float64]  #: every field value, line by line, shape (values,)
    stamps: npt.NDArray[np.int64]  #: each line's timestamp as written (unit not applied), shape (lines,)


class _Tokens(NamedTuple):
    """The plain line protocol of several texts (a delivery's messages) cut into its parts (see
    :func:`_tokenize`): lines text by text, values line by line."""

    heads: _Heads  #: the table of the tokenizer's heads
    head: npt.NDArray[np.int64]  #: each line's head (measurement and tag set) as its code in ``heads``, shape (lines,)
    names: list[str]  #: the distinct field names
    codes: npt.NDArray[np.int64]  #: each value's field name, as an index into ``names``, shape (values,)
    counts: npt.NDArray[np.int64]  #: fields of each line, none repeated, shape (lines,)
    lines: npt.NDArray[np.int64]  #: lines of each text, one at least, shape (texts,)
    values: npt.NDArray[np.float64]  #: every field value, shape (values,)
    stamps: npt.NDArray[np.int64]  #: each line's timestamp as written (unit not applied), shape (lines,)


def _tokenize_python(text: str) -> _Text | None:
    """``text`` cut into a :class:`_Text` when it is plain: ASCII, nothing escaped or quoted, every
    line ``head fields timestamp`` with single spaces, every field ``name=value`` with a finite
    float value (as ``float`` reads it), timestamps of digits below 2**63. None otherwise.

    The work per line runs in C: splits, one split of the joined field sets, ``float`` and ``int``
    mapped over them."""
    if not text.isascii() or any(map(text.__contains__, _NOT_PLAIN)):
        return None
    lines = list(map(str.split, filter(None, text.split("\n")), repeat(" ")))
    if not lines or set(map(len, lines)) != {3}:
        return None
    heads, field_texts, stamp_texts = zip(*lines, strict=True)
    if not all(stamp_texts) or not "".join(stamp_texts).isdigit() or not all(field_texts):
        return None
    fields = ",".join(field_texts)
    # "name=value,name=value": split at both separators, names and values alternate. One "=" per
    # field means every piece is in its place (a value holding "=" or "," takes the per-line path).
    parts = fields.replace("=", ",").split(",")
    n = len(parts) // 2
    if len(parts) % 2 or fields.count("=") != n or fields.count(",") != n - 1:
        return None
    names, raw_values = parts[0::2], parts[1::2]
    commas = list(map(str.count, field_texts, repeat(",")))
    width = commas[0] + 1
    uniform = commas.count(width - 1) == len(lines) and names == names[:width] * len(lines)
    try:
        values = list(map(float, raw_values))
    except ValueError:  # integers (1i), booleans, anything float() refuses: the per-line path
        return None
    if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):  # inf and nan propagate
        return None
    stamps = list(map(int, stamp_texts))
    if max(stamps) >= 2**63:
        return None
    return _Text(
        list(heads),
        names[:width] if uniform else names,
        None if uniform else [c + 1 for c in commas],
        np.array(values, dtype=np.float64),
        np.array(stamps, dtype=np.int64),
    )


def _tokenize_texts_python(texts: list[str]) -> _Tokens | None:
    """:func:`_tokenize` in Python: each text through :func:`_tokenize_python`, then joined."""
    found = list(map(_tokenize_python, texts))
    if not found or None in found:
        return None
    texts_cut = cast(list[_Text], found)
    names: dict[str, int] = {}
    codes: list[int] = []
    counts: list[int] = []
    for text in texts_cut:
        if text.counts is None:  # every line has these fields: one line's check holds for all
            per_line, of_values, lines = [len(text.names)] * len(text.heads), text.names * len(text.heads), [text.names]
        else:
            per_line, of_values = text.counts, text.names
            starts = [0, *itertools.accumulate(per_line)]
            lines = [of_values[a:b] for a, b in itertools.pairwise(starts)]
        if any(len(set(line)) != len(line) for line in lines):
            return None  # a field repeated in a line: the per-line path keeps the last value
        codes += [names.setdefault(name, len(names)) for name in of_values]
        counts += per_line
    known, added = len(_PYTHON_HEAD_CODES), list[str]()
    head = _codes_of([head for text in texts_cut for head in text.heads], _PYTHON_HEAD_CODES, added)
    _PYTHON_HEADS.learn(known, added)
    return _Tokens(
        _PYTHON_HEADS,
        np.array(head, dtype=np.int64),
        list(names),
        np.array(codes, dtype=np.int64),
        np.array(counts, dtype=np.int64),
        np.array([len(text.heads) for text in texts_cut], dtype=np.int64),
        np.concatenate([text.values for text in texts_cut]),
        np.concatenate([text.stamps for text in texts_cut]),
    )


def _tokenize(texts: list[str] | list[bytes]) -> _Tokens | None:
    """Plain line protocol of ``texts`` (see :func:`_tokenize_python`, one line in each text at
    least; payloads as received are read as they are, plain text being ASCII) cut into
    :class:`_Tokens`, None when one is not plain. Through the compiled tokenizer when it is
    built: it takes the usual case (every line of a text with the same fields) and leaves the
    rest to the Python one."""
    _COMPILED_HEADS.bounded()
    _PYTHON_HEADS.bounded()
    if _compiled_tokenize is not None:
        found = _compiled_tokenize(texts)
        if found is not None and found[1] != _COMPILED_HEADS.size:
            # The compiled table started over on an error (or was used without this one): again
            # from an empty table.
            _COMPILED_HEADS.forget()
            found = _compiled_tokenize(texts)
        if found is not None:
            head, known, added, names, codes, widths, lines, values, stamps = found
            _COMPILED_HEADS.learn(known, added)
            lines_array = np.frombuffer(lines, dtype=np.int64)
            return _Tokens(
                _COMPILED_HEADS,
                np.frombuffer(head, dtype=np.int64),
                names,
                np.frombuffer(codes, dtype=np.int64),
                np.repeat(np.frombuffer(widths, dtype=np.int64), lines_array),
                lines_array,
                np.frombuffer(values, dtype=np.float64),
                np.frombuffer(stamps, dtype=np.int64),
            )
    if texts and isinstance(texts[0], bytes):
        try:
            texts = list(map(bytes.decode, texts))
        except UnicodeDecodeError:
            return None
    return _tokenize_texts_python(cast(list[str], texts))


def _plain_lines(i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out) -> bool:
    """Add every reading of a line-protocol message at once when every line is plain (see
    :func:`_tokenize` and :func:`_plain_columns`). Otherwise add nothing and return False: the
    per-line path then says exactly what is wrong (and learns new names)."""
    if "\n" not in text[:-1]:
        return _plain_line(i, text, topic, received_ns, limits, out)
    tokens = _tokenize([text])
    if tokens is None or len(tokens.head) > _MAX_READINGS_PER_MESSAGE:
        return False
    found = _plain_columns(tokens, [topic], np.array([received_ns], dtype=np.int64), limits)
    if found is None:
        return False
    out.extend_columns(i, found[0])
    return True


def _plain_delivery(messages: Sequence[Message], limits: DecodeLimits, out: _Out) -> SeriesCodes | None:
    """Add the readings of a delivery of plain line-protocol messages (sensors' one-line reports,
    gateways' batches of lines) at once: every message tokenized in one call and turned into
    columns in one go, instead of a Python pass per message; returns their names factorised.
    Add nothing and return None when one message is anything else (JSON, a bad topic, a doubt of
    :func:`_plain_columns`): the caller decodes them one by one."""
    payloads = list(map(PAYLOAD_OF, messages))
    if payloads[0][:1] in (b"{", b"[") or max(map(len, payloads)) > limits.max_payload_bytes:
        return None  # JSON, as the rest of a delivery most likely is too
    tokens = _tokenize(payloads)
    if tokens is None or int(tokens.lines.max()) > _MAX_READINGS_PER_MESSAGE:
        return None
    parsed = parse_mqtt_topics(list(map(TOPIC_OF, messages)), limits.topic_prefix)
    if set(map(type, parsed)) != {MqttTopic}:  # a bad topic
        return None
    received = np.fromiter(map(RECEIVED_OF, messages), dtype=np.int64, count=len(messages))
    found = _plain_columns(tokens, cast(list[MqttTopic], parsed), received, limits)
    if found is None:
        return None
    readings, message, codes = found
    out.extend_columns(message, readings)
    return codes


def _plain_reports(messages: Sequence[Message], limits: DecodeLimits, out: _Out) -> SeriesCodes | None:
    """Add the readings of a delivery of sensors' clean single reports at once: each payload
    typed by msgspec in one pass over the delivery, the checks of :func:`_plain_single` made on
    whole columns and the names factorised per report rather than per value, instead of a Python
    pass per message; returns those codes. Add nothing and return None when one message is
    anything else (a gateway batch, a bad topic, a doubt of those checks, or timestamps in more
    than one unit): the caller decodes them one by one."""
    payloads = list(map(PAYLOAD_OF, messages))
    if max(map(len, payloads)) > limits.max_payload_bytes:
        return None
    parsed = parse_mqtt_topics(list(map(TOPIC_OF, messages)), limits.topic_prefix)
    if set(map(type, parsed)) != {MqttTopic}:  # a bad topic
        return None
    topics = cast(list[MqttTopic], parsed)
    joined = b"".join(payloads)
    if not all(map(_GET_SENSOR, topics)) or b'"readings"' in joined:  # a gateway's batch
        return None
    try:
        # UTF-8 throughout, as the per-message path checks (msgspec skips ignored keys unchecked).
        # The payloads are valid one by one when they are together: each one msgspec takes begins
        # and ends in ASCII, so no character spans two of them.
        joined.decode()
        reports = list(map(_SINGLE_REPORT.decode, payloads))  # from bytes: msgspec reads them faster than str
    except (UnicodeDecodeError, msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    given = list(map(_GET_SITE, reports))
    if given.count(msgspec.UNSET) == len(given):
        site, sites = factorise(list(map(_GET_SITE, topics)))
    else:
        site, sites = factorise([t.site if s is msgspec.UNSET else s for s, t in zip(given, topics, strict=True)])
    sensor, sensors = factorise(list(map(_GET_SENSOR, topics)))
    if not all(map(_IDS.known.__contains__, chain(sensors, sites))):
        return None
    fields: list[dict[str, float]] = list(map(_GET_METRICS, reports))
    if not all(fields):
        return None
    metric, metrics = factorise(list(chain.from_iterable(fields)))
    if not all(map(_METRICS.known.__contains__, metrics)):
        return None
    stamps: list[int] = list(map(_GET_TS, reports))
    lo, hi = min(stamps), max(stamps)
    unit = _ns_per_unit(hi)
    if lo < 0 or unit != _ns_per_unit(lo) or hi * unit >= 2**63:
        return None
    received: list[int] = list(map(RECEIVED_OF, messages))
    # Against the delivery's extreme receive times (a few ms apart): a stamp that only passes
    # against its own message's is left to the per-message path.
    if lo * unit < max(received) - limits.max_past_ns or hi * unit > min(received) + limits.max_future_ns:
        return None
    domain, domains = factorise(list(map(_GET_DOMAIN, topics)))
    values = np.fromiter(chain.from_iterable(map(dict.values, fields)), dtype=np.float64, count=len(metric))
    readings, message, codes = _report_columns(
        SeriesCodes(domain, domains, sensor, sensors, site, sites), np.arange(len(messages)),
        np.fromiter(map(len, fields), dtype=np.int64, count=len(fields)), metric, metrics,
        np.array(stamps, dtype=np.int64) * unit, values,
    )  # fmt: skip
    out.extend_columns(message, readings)
    return codes


def _report_columns(
    reports: SeriesCodes,
    message_of_report: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    metric: npt.NDArray[np.int64],
    metrics: list[str],
    stamps: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
) -> tuple[ReadingColumns, npt.NDArray[np.int64], SeriesCodes]:
    """Coded reading columns from reports (a line, a sensor's JSON report) whose values share
    their series and time: ``reports`` their names factorised, ``message_of_report``, ``counts``
    (values per report) and ``stamps`` (ns) ``(r,)`` each; ``metric`` (codes into ``metrics``)
    and ``values`` ``(n,)``, report after report. Returns the readings, each one's message and
    their codes, with the distinct series found among reports rather than values."""
    report_of_value = np.repeat(np.arange(len(counts)), counts)
    report_first, report_series = reports.distinct_series()
    first_value = np.cumsum(counts) - counts
    distinct = first_value[report_first], report_series[report_of_value]
    codes = SeriesCodes(reports.domain[report_of_value], reports.domains, reports.sensor[report_of_value],
                        reports.sensors, reports.site[report_of_value], reports.sites, metric, metrics,
                        distinct)  # fmt: skip
    # The string columns stay coded: the bridge reads the codes only.
    readings = ReadingColumns(
        sensor_id=Coded(codes.sensor, str_array(reports.sensors)),
        site=Coded(codes.site, str_array(reports.sites)),
        domain=Coded(codes.domain, str_array(reports.domains)),
        metric=Coded(metric, str_array(metrics)),
        ts_ns=stamps[report_of_value],
        value=values,
        flags=np.zeros(len(values), dtype=np.uint8),
    )
    return readings, message_of_report[report_of_value], codes


def _plain_columns(
    tokens: _Tokens, topics: list[MqttTopic], received_ns: npt.NDArray[np.int64], limits: DecodeLimits
) -> tuple[ReadingColumns, npt.NDArray[np.int64], SeriesCodes] | None:
    """The readings of plain lines, the index of each one's text and their names factorised
    (line by line, not value by value), when every name is valid (new ones are learned) and every
    timestamp has one unit and is within the limits; None otherwise. The texts came on
    ``topics`` (their sensor and site stand in for missing tags, their domain is the lines') at
    ``received_ns``, one of each per text.

    Tag sets are parsed once per head, in the tokenizer's table of heads; field names are
    checked once each. What the per-line path would judge differently is left to it."""
    heads, head = tokens.heads, tokens.head
    if not heads.valid[head].all():
        return None
    text_of_line = np.repeat(np.arange(len(topics)), tokens.lines)
    sensors = heads.ids("sensor", head, list(map(_GET_SENSOR, topics)), text_of_line)
    sites = heads.ids("site", head, list(map(_GET_SITE, topics)), text_of_line)
    names = _METRICS.learned(cast(list[str | None], tokens.names))
    if sensors is None or sites is None or names is None:
        return None
    lo, hi = int(tokens.stamps.min()), int(tokens.stamps.max())
    unit = _ns_per_unit(hi)
    if unit != _ns_per_unit(lo) or hi * unit >= 2**63:
        return None
    stamps = tokens.stamps * unit
    if len(topics) == 1:
        if lo * unit < received_ns[0] - limits.max_past_ns or hi * unit > received_ns[0] + limits.max_future_ns:
            return None
    else:
        received = received_ns[text_of_line]
        if ((stamps < received - limits.max_past_ns) | (stamps > received + limits.max_future_ns)).any():
            return None
    sensor_first, sensor = distinct_codes(sensors)
    site_first, site = distinct_codes(sites)
    domain, domain_names = factorise(list(map(_GET_DOMAIN, topics)))
    lines = SeriesCodes(domain[text_of_line], domain_names, sensor, heads.names[sensors[sensor_first]].tolist(), site,
                        heads.names[sites[site_first]].tolist())  # fmt: skip
    return _report_columns(lines, text_of_line, tokens.counts, tokens.codes, names, stamps, tokens.values)


def _tokenize_line(text: str) -> tuple[str, list[str], list[float], int] | None:
    """:func:`_tokenize` for text of one line, as Python objects: (head, names, values, stamp)."""
    if _compiled_tokenize_line is not None:
        found = _compiled_tokenize_line(text)
        if found is not None:
            return found
    tokens = _tokenize_python(text)
    if tokens is None or len(tokens.heads) != 1:
        return None
    return tokens.heads[0], tokens.names, tokens.values.tolist(), int(tokens.stamps[0])


def _plain_line(i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out) -> bool:
    """:func:`_plain_lines` for a message of one line (a sensor's own report): the same checks
    on one line, without arrays."""
    found = _tokenize_line(text)
    if found is None:
        return False
    head, fields, values, ts = found
    tags = _tag_set(head)
    if tags is None:
        return False
    sensor = _IDS.known.get(topic.sensor_id if tags[0] is None else tags[0])
    site = _IDS.known.get(topic.site if tags[1] is None else tags[1])
    if sensor is None or site is None:
        return False
    ts_ns = ts * _ns_per_unit(ts)
    if ts_ns >= 2**63 or not received_ns - limits.max_past_ns <= ts_ns <= received_ns + limits.max_future_ns:
        return False
    if len(fields) == 1:  # the usual single report of one metric
        metric = _METRICS.known.get(fields[0])
        if metric is None:
            return False
        out.add(i, sensor, site, topic.domain, metric, ts_ns, values[0], 0)
        return True
    names = _METRICS.canonical(fields)
    n = len(fields)
    if names is None or len(set(names)) != n:
        return False  # a new name, or a field repeated: the per-line path
    out.extend(i, [sensor] * n, [site] * n, topic.domain, names, [ts_ns] * n, values, 1)
    return True


def _decode_line_protocol(
    i: int, text: str, topic: MqttTopic, received_ns: int, limits: DecodeLimits, out: _Out, problems: list[Problem]
) -> None:
    if _plain_lines(i, text, topic, received_ns, limits, out):
        return
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:  # only comments: nothing to store, and it must not vanish silently
        problems.append(Problem("missing_metrics", "line protocol with comment lines only"))
        return
    if len(lines) > _MAX_READINGS_PER_MESSAGE:
        problems.append(Problem("payload_too_large", f"{len(lines)} lines in one message"))
        return
    for n, line in enumerate(lines):
        sections = _split_escaped(line.strip(), " ")
        if len(sections) not in (2, 3) or not sections[1]:
            problems.append(
                Problem("malformed_line_protocol", f"line {n + 1}: expected 'measurement[,tags] fields [ts]'")
            )
            continue
        tags = _pairs(_split_escaped(sections[0], ",")[1:], _unescape)
        if tags is None:
            problems.append(Problem("malformed_line_protocol", f"line {n + 1}: bad tag set"))
            continue
        fields = _pairs(_split_escaped(sections[1], ","), _lp_value)
        if fields is None:
            problems.append(Problem("malformed_line_protocol", f"line {n + 1}: bad field set"))
            continue
        reading: dict[str, Any] = {"metrics": fields, "site": tags.get("site", topic.site)}
        if len(sections) == 3:
            if not _is_ascii_int(sections[2]):
                problems.append(Problem("bad_timestamp", f"line {n + 1}: {sections[2][:40]!r} is not an integer"))
                continue
            reading["ts"] = int(sections[2])
        sensor = tags.get("sensor_id", topic.sensor_id)
        _add_reading(i, reading, sensor, topic, received_ns, limits, out, problems, f"line {n + 1}: ")
