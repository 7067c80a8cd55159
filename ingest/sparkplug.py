"""The bridge as an Eclipse Sparkplug B host application (spec 3.0): births, aliases, seq, deaths.

Stateful core, no sockets: :class:`SparkplugHost` takes the ``spBv1.0/...`` messages of a
delivery in receive order and

- records each edge node's and device's birth certificate (metric names, aliases, datatypes) and
  stores the values births carry;
- decodes NDATA/DDATA by alias (or name) against the birth current when the message arrived,
  the metrics of the whole delivery parsed together (:func:`portpulse.codecs.sparkplug.parse_metrics`);
- checks ``seq`` (0-255, +1 per message of a node); a gap, an alias never born, or DATA before
  BIRTH asks the node for a rebirth (NCMD ``Node Control/Rebirth``, at most once per
  ``rebirth_interval_s``); a message it cannot decode goes to the DLQ with the reason;
- takes NDEATH (bdSeq checked against the birth) and DDEATH as offline, with the time.

What it wants published (rebirth requests) and written to the births topic (so a restarted
bridge decodes without asking every node again) is collected for the bridge to take.
"""

from __future__ import annotations

import math
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from portpulse.codecs.sparkplug import (
    DATATYPES,
    NUMERIC_VALUE_FIELD,
    DecodeError,
    MetricColumns,
    Payload,
    parse_metrics,
    split_payload,
)
from portpulse.contract.catalogue import Catalogue
from portpulse.contract.errors import ConfigError
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE
from portpulse.contract.topics import ID_RE

__all__ = [
    "NAMESPACE",
    "Birth",
    "NodeStatus",
    "SparkplugHost",
    "SparkplugMapping",
    "SparkplugTopic",
    "load_mapping",
    "parse_sparkplug_topic",
    "rebirth_request",
    "state_payload",
]

NAMESPACE = "spBv1.0"
MESSAGE_TYPES = frozenset({"NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD"})
#: Metrics every Sparkplug node may carry that are control, not telemetry: never stored, never reported.
CONTROL_PREFIXES = ("Node Control/", "Device Control/", "Properties/", "Node Info/")
REBIRTH_METRIC = "Node Control/Rebirth"
_UNSUPPORTED = "UUID, DataSet, Bytes, File, Template, PropertySet"
#: A seq this close behind the last one is the broker redelivering (a reconnect), not a gap.
_REDELIVERY_WINDOW = 32


class SparkplugTopic(NamedTuple):
    group: str
    kind: str
    edge_node: str
    device: str | None


def parse_sparkplug_topic(topic: str) -> SparkplugTopic | str:
    """``spBv1.0/{group}/{type}/{edge_node}[/{device}]`` (or ``spBv1.0/STATE/{host}``: kind STATE);
    the reason text for anything else."""
    parts = topic.split("/")
    if parts[0] != NAMESPACE:
        return f"not in the {NAMESPACE} namespace"
    if len(parts) == 3 and parts[1] == "STATE":
        return SparkplugTopic("", "STATE", parts[2], None)
    if len(parts) not in (4, 5) or not all(parts):
        return "expected spBv1.0/{group_id}/{message_type}/{edge_node_id}[/{device_id}]"
    kind = parts[2]
    if kind not in MESSAGE_TYPES:
        return f"unknown Sparkplug message type {kind!r}"
    if (kind[0] == "D") != (len(parts) == 5):
        return f"{kind} {'needs' if kind[0] == 'D' else 'takes no'} device id"
    return SparkplugTopic(parts[1], kind, parts[3], parts[4] if len(parts) == 5 else None)


# ---------------------------------------------------------------- mapping


@dataclass(frozen=True, slots=True)
class SparkplugMapping:
    """Sparkplug ids -> (site, sensor id) through templates over ``{group}``, ``{edge_node}`` and
    ``{device}`` (the edge node's id for node metrics); metric names -> (the catalogue's metric of
    ``domain``, the factor to its unit)."""

    domain: str
    site: str = "{group}"
    sensor: str = "{device}"
    metrics: Mapping[str, tuple[str, float]] = field(default_factory=dict)

    def ids(self, group: str, edge_node: str, device: str | None) -> tuple[str, str]:
        names = {"group": group, "edge_node": edge_node, "device": device or edge_node}
        return self.site.format_map(names), self.sensor.format_map(names)


_TEMPLATE_FIELDS = re.compile(r"\{([^}]*)\}")


def load_mapping(path: Path, catalogue: Catalogue) -> SparkplugMapping:
    """Read a mapping file (see ``portpulse/contract/sparkplug.toml``), checked against the catalogue."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"sparkplug mapping {path}: {exc}") from None
    where = f"sparkplug mapping {path}"
    domain = raw.get("domain")
    if domain not in catalogue.domains():
        raise ConfigError(f"{where}: domain {domain!r} is not in the catalogue ({', '.join(catalogue.domains())})")
    site, sensor = str(raw.get("site", "{group}")), str(raw.get("sensor", "{device}"))
    for name, template in (("site", site), ("sensor", sensor)):
        unknown = set(_TEMPLATE_FIELDS.findall(template)) - {"group", "edge_node", "device"}
        if unknown:
            raise ConfigError(f"{where}: {name} uses {sorted(unknown)}; only {{group}}, {{edge_node}}, {{device}}")
    metrics: dict[str, tuple[str, float]] = {}
    for name, target in dict(raw.get("metrics", {})).items():
        metric, unit = (target, None) if isinstance(target, str) else (target.get("metric"), target.get("unit"))
        spec = catalogue.get(domain, str(metric))
        if spec is None:
            raise ConfigError(f"{where}: {name!r} -> {metric!r}, which the catalogue's {domain} domain lacks")
        if unit is not None and unit != spec.unit and unit not in spec.convert:
            raise ConfigError(
                f"{where}: {name!r} in {unit!r}, but {domain}.{metric} is in {spec.unit!r} and converts only "
                f"{', '.join(spec.convert) or 'nothing'} (add it to the catalogue's convert)"
            )
        metrics[str(name)] = (str(metric), spec.convert[unit] if unit is not None and unit != spec.unit else 1.0)
    return SparkplugMapping(domain=str(domain), site=site, sensor=sensor, metrics=metrics)


# ---------------------------------------------------------------- births


@dataclass(frozen=True, slots=True)
class Birth:
    """A birth certificate's metrics: ``aliases`` uint64 ``(k,)`` sorted, with the ``datatypes``,
    the ``metric`` (PortPulse name, or None when not stored: control metrics such as bdSeq and
    ``Node Control/*``, and names the mapping lacks), the ``scale`` to the catalogue's unit and
    whether it is ``control`` of each; ``by_name`` for DATA that names its metrics instead of
    using aliases: name -> index."""

    aliases: npt.NDArray[np.uint64]
    datatypes: npt.NDArray[np.int64]
    metric: npt.NDArray[np.object_]
    scale: npt.NDArray[np.float64]
    stored: npt.NDArray[np.bool_]
    control: npt.NDArray[np.bool_]
    by_name: dict[str, int]
    bd_seq: int | None
    unmapped: tuple[str, ...]


def _birth(payload: Any, mapping: SparkplugMapping) -> Birth:
    rows: list[tuple[int, int, str | None, float, bool, str]] = []
    bd_seq = None
    unmapped = []
    for m in payload.metrics:
        control = m.name == "bdSeq" or m.name.startswith(CONTROL_PREFIXES)
        if m.name == "bdSeq":
            bd_seq = _integer(m)
        metric, scale = mapping.metrics.get(m.name, (None, 1.0))
        if metric is None and not control:
            unmapped.append(m.name)
        # A metric born without an alias gets one no DATA can carry: such DATA names it instead.
        alias = m.alias if m.HasField("alias") else 2**64 - 1 - len(rows)
        rows.append((alias, m.datatype, metric, scale, control, m.name))
    rows.sort(key=lambda r: r[0])
    return Birth(
        aliases=np.array([r[0] for r in rows], dtype=np.uint64),
        datatypes=np.array([r[1] for r in rows], dtype=np.int64),
        metric=np.array([r[2] for r in rows], dtype=object),
        scale=np.array([r[3] for r in rows], dtype=np.float64),
        stored=np.array([r[2] is not None for r in rows], dtype=np.bool_),
        control=np.array([r[4] for r in rows], dtype=np.bool_),
        by_name={r[5]: k for k, r in enumerate(rows)},
        bd_seq=bd_seq,
        unmapped=tuple(unmapped),
    )


def _integer(metric: Any) -> int | None:
    kind = metric.WhichOneof("value")
    return int(getattr(metric, kind)) if kind in ("int_value", "long_value") else None


# ---------------------------------------------------------------- host


@dataclass
class NodeStatus:
    """What the host knows of one edge node (and its devices)."""

    group: str
    edge_node: str
    birth: Birth | None = None
    devices: dict[str, Birth] = field(default_factory=dict)
    seq: int | None = None
    online: bool = False
    devices_online: set[str] = field(default_factory=set)
    changed_s: float = 0.0  # when it last came online or went offline (s since the epoch)
    rebirth_asked_s: float = -math.inf
    rebirths_asked: int = 0
    sensors: set[tuple[str, str]] = field(default_factory=set)  # (site, sensor) it reported for


class _Data(NamedTuple):
    """A DATA or BIRTH message whose metrics are decoded at the end of the delivery."""

    message: int  # the message's index in the delivery
    node: NodeStatus
    birth: Birth
    first: int  # its metrics' rows in the delivery's parsed metrics
    stop: int
    payload_ts: int | None  # ms
    received_ns: int
    site: str
    sensor: str


class Problem(NamedTuple):
    reason: str
    detail: str


class Rows(NamedTuple):
    """Readings decoded from Sparkplug messages (equal-length lists, ``ts`` in ns)."""

    message: list[int]
    site: list[str]
    sensor: list[str]
    metric: list[str]
    ts: list[int]
    value: list[float]
    flags: list[int]


class SparkplugHost:
    """Sparkplug host application state: feed a delivery's messages with :meth:`take` in receive
    order, then :meth:`finish` for its readings and problems."""

    def __init__(
        self,
        mapping: SparkplugMapping,
        *,
        max_future_ns: int,
        max_past_ns: int,
        rebirth_interval_s: float = 30.0,
        valid_id: Any = ID_RE.fullmatch,
        live: bool = True,
    ) -> None:
        self.mapping = mapping
        #: False for a DLQ replay: messages decode against the births held now (a birth against its
        #: own), and nothing is checked or changed: no seq, no state, no rebirth request.
        self.live = live
        self._max_future_ns = max_future_ns
        self._max_past_ns = max_past_ns
        self._rebirth_interval_s = rebirth_interval_s
        self._valid_id = valid_id
        self.nodes: dict[tuple[str, str], NodeStatus] = {}
        self._pending: list[_Data] = []
        self._blobs: list[bytes] = []
        self._problems: dict[int, list[Problem]] = {}
        #: (topic, payload) of the rebirth requests to publish (QoS 0, as commands are)
        self.commands: list[tuple[str, bytes]] = []
        #: births topic records: key ``group/edge_node[/device]`` -> birth payload, None when dead
        self.birth_records: list[tuple[bytes, bytes | None]] = []
        self.counts: dict[str, int] = {"null": 0, "unmapped": 0, "historical": 0, "commands_ignored": 0}

    # ------------------------------------------------------------ state kept across restarts

    def restore(self, records: Mapping[bytes, bytes | None], now_s: float | None = None) -> int:
        """Take the births the births topic holds (see :attr:`birth_records`); returns how many."""
        taken = 0
        for key, value in sorted(records.items(), key=lambda kv: kv[0].count(b"/")):  # nodes before devices
            if value is None:
                continue
            parts = key.decode("utf-8", "replace").split("/")
            try:
                birth = _birth(Payload.FromString(value), self.mapping)
            except DecodeError:
                continue
            if len(parts) == 2:
                node = self._node(parts[0], parts[1])
                node.birth, node.online, node.changed_s = birth, True, now_s if now_s is not None else time.time()
            elif len(parts) == 3 and (parent := self.nodes.get((parts[0], parts[1]))) is not None:
                parent.devices[parts[2]] = birth
                parent.devices_online.add(parts[2])
            else:
                continue
            taken += 1
        return taken

    def _node(self, group: str, edge_node: str) -> NodeStatus:
        node = self.nodes.get((group, edge_node))
        if node is None:
            node = self.nodes[(group, edge_node)] = NodeStatus(group, edge_node)
        return node

    # ------------------------------------------------------------ per message

    def take(self, index: int, topic: str, payload: bytes, received_ns: int) -> None:
        """Follow one message (receive order); its readings and problems come from :meth:`finish`."""
        where = parse_sparkplug_topic(topic)
        if isinstance(where, str):
            self._problem(index, "bad_topic", f"{topic!r}: {where}")
            return
        if where.kind in ("STATE", "NCMD", "DCMD"):
            self.counts["commands_ignored"] += 1  # host state and commands: not telemetry
            return
        try:
            payload_ts, seq, blobs = split_payload(payload)
        except DecodeError as exc:
            self._problem(index, "sparkplug_bad_protobuf", f"{where.kind}: {exc}")
            return
        node = self._node(where.group, where.edge_node)
        now_s = received_ns / 1e9
        birth: Birth | None
        if not self.live:  # a replay: births decode their own values and change nothing
            if where.kind in ("NDEATH", "DDEATH"):
                return
            birth = self._parse_birth(index, where, payload) if where.kind.endswith("BIRTH") else None
        elif where.kind == "NBIRTH":
            birth = self._node_birth(index, node, payload, seq, now_s)
            if birth is None:
                return
        elif where.kind == "NDEATH":
            self._node_death(index, node, payload, now_s)
            return
        elif not self._in_sequence(index, node, where, seq, now_s):
            return
        elif where.kind == "DDEATH":
            assert where.device is not None
            node.devices_online.discard(where.device)
            return
        elif where.kind == "DBIRTH":
            assert where.device is not None
            birth = self._parse_birth(index, where, payload)
            if birth is None:
                return
            node.devices[where.device] = birth
            node.devices_online.add(where.device)
            self.birth_records.append((f"{where.group}/{where.edge_node}/{where.device}".encode(), payload))
        else:
            birth = None
        if birth is None:
            birth = node.birth if where.device is None else node.devices.get(where.device)
            if birth is None:
                what = "NBIRTH" if where.device is None else f"DBIRTH of device {where.device!r}"
                self._problem(index, "sparkplug_data_before_birth", f"{where.kind} before its {what}")
                self._ask_rebirth(node, now_s)
                return
        site, sensor = self.mapping.ids(where.group, where.edge_node, where.device)
        if not (self._valid_id(site) and self._valid_id(sensor)):
            self._problem(index, "bad_sensor_id", f"site {site!r} / sensor {sensor!r} from the topic {topic!r}")
            return
        first = len(self._blobs)
        self._blobs += blobs
        self._pending.append(_Data(index, node, birth, first, len(self._blobs), payload_ts, received_ns, site, sensor))

    def _node_birth(self, index: int, node: NodeStatus, payload: bytes, seq: int | None, now_s: float) -> Birth | None:
        birth = self._parse_birth(index, SparkplugTopic(node.group, "NBIRTH", node.edge_node, None), payload)
        if birth is None:
            return None
        # A new session of the node: its devices are born again after it, and seq restarts.
        node.birth, node.devices, node.devices_online = birth, {}, set()
        node.seq, node.online, node.changed_s = seq, True, now_s
        self.birth_records.append((f"{node.group}/{node.edge_node}".encode(), payload))
        return birth

    def _parse_birth(self, index: int, where: SparkplugTopic, payload: bytes) -> Birth | None:
        try:
            birth = _birth(Payload.FromString(payload), self.mapping)
        except DecodeError as exc:
            self._problem(index, "sparkplug_bad_protobuf", f"{where.kind}: {exc}")
            return None
        if birth.unmapped:
            names = ", ".join(repr(n) for n in birth.unmapped[:20])
            self._problem(
                index, "sparkplug_unmapped_metric",
                f"{where.kind} announces {len(birth.unmapped)} metrics the mapping file does not map "
                f"(their values are not stored): {names}",
            )  # fmt: skip
        return birth

    def _node_death(self, index: int, node: NodeStatus, payload: bytes, now_s: float) -> None:
        try:
            bd_seq = _birth(Payload.FromString(payload), self.mapping).bd_seq
        except DecodeError as exc:
            self._problem(index, "sparkplug_bad_protobuf", f"NDEATH: {exc}")
            return
        born = node.birth.bd_seq if node.birth is not None else None
        if born is not None and bd_seq is not None and bd_seq != born:
            # The will of an earlier session, delivered after the node was born again: not a death.
            self._problem(index, "sparkplug_stale_death", f"NDEATH bdSeq {bd_seq}, but the node was born with {born}")
            return
        key = f"{node.group}/{node.edge_node}"
        self.birth_records += [(key.encode(), None)] + [(f"{key}/{d}".encode(), None) for d in sorted(node.devices)]
        node.online, node.changed_s, node.devices_online, node.seq = False, now_s, set(), None
        node.devices = {}

    def _in_sequence(self, index: int, node: NodeStatus, where: SparkplugTopic, seq: int | None, now_s: float) -> bool:
        """Check and advance the node's seq; False when the message cannot be used (no seq at all)."""
        if seq is None or not 0 <= seq <= 255:
            self._problem(index, "sparkplug_bad_seq", f"{where.kind} without a seq in 0..255 ({seq})")
            return False
        last, node.seq = node.seq, seq
        if last is None or seq == (last + 1) % 256:
            return True
        if (last - seq) % 256 < _REDELIVERY_WINDOW:
            return True  # redelivered after a reconnect: the values are repeats the store overwrites
        missing = (seq - last - 1) % 256
        asked = self._ask_rebirth(node, now_s)
        self._problem(
            index, "sparkplug_seq_gap",
            f"{where.kind} seq {seq} after {last}: {missing} messages of the node missing; its values are "
            f"stored, rebirth {'requested' if asked else 'already requested'}",
        )  # fmt: skip
        return True

    def _ask_rebirth(self, node: NodeStatus, now_s: float) -> bool:
        if not self.live or now_s - node.rebirth_asked_s < self._rebirth_interval_s:
            return False
        node.rebirth_asked_s = now_s
        node.rebirths_asked += 1
        self.commands.append(rebirth_request(node.group, node.edge_node, int(now_s * 1000)))
        return True

    def _problem(self, index: int, reason: str, detail: str) -> None:
        self._problems.setdefault(index, []).append(Problem(reason, detail))

    # ------------------------------------------------------------ per delivery

    def finish(self) -> tuple[Rows, dict[int, list[Problem]]]:
        """The readings and per-message problems of the messages taken since the last call."""
        pending, blobs, problems = self._pending, self._blobs, self._problems
        self._pending, self._blobs, self._problems = [], [], {}
        rows = Rows([], [], [], [], [], [], [])
        if pending:
            columns = parse_metrics(blobs)
            for data in pending:
                self._decode(data, columns, rows, problems)
        return rows, problems

    def _decode(self, data: _Data, c: MetricColumns, rows: Rows, problems: dict[int, list[Problem]]) -> None:
        span = slice(data.first, data.stop)
        found: list[Problem] = []
        if c.malformed[span].any():
            bad = np.flatnonzero(c.malformed[span])
            problems.setdefault(data.message, []).append(
                Problem("sparkplug_bad_protobuf", f"metrics {bad[:10].tolist()} are not Sparkplug metrics")
            )
            return
        birth = data.birth
        # Which birth entry each metric is: by alias, else by name.
        alias, has_alias = c.alias[span], c.has_alias[span]
        at = np.searchsorted(birth.aliases, alias).clip(0, max(len(birth.aliases) - 1, 0))
        known = has_alias & (birth.aliases[at] == alias) if len(birth.aliases) else np.zeros(len(alias), bool)
        for k in np.flatnonzero(~known).tolist():
            name = c.name(data.first + k)
            if name is not None and name in birth.by_name:
                at[k], known[k] = birth.by_name[name], True
        if not known.all():
            unknown = np.flatnonzero(~known)
            labels = [f"alias {int(alias[k])}" if has_alias[k] else repr(c.name(data.first + k)) for k in unknown[:10]]
            found.append(Problem("sparkplug_unknown_alias", f"never born: {', '.join(labels)}; rebirth requested"))
            self._ask_rebirth(data.node, data.received_ns / 1e9)
        datatype = np.where(known, birth.datatypes[at] if len(birth.datatypes) else 0, 0)
        stated = c.has_datatype[span] & (c.datatype[span].astype(np.int64) != datatype) & known
        null = c.is_null[span]
        self.counts["null"] += int((null & known).sum())
        metric = birth.metric[at] if len(birth.metric) else np.empty(len(alias), dtype=object)
        mapped = known & (birth.stored[at] if len(birth.stored) else False)
        control = birth.control[at] if len(birth.control) else np.zeros(len(alias), bool)
        self.counts["unmapped"] += int((known & ~mapped & ~null & ~control).sum())
        expected = np.array([NUMERIC_VALUE_FIELD.get(d, -1) for d in datatype.tolist()], dtype=np.int64)
        field_no = c.value_field[span]
        unsupported = mapped & ~null & (expected < 0)
        mismatch = mapped & ~null & ~unsupported & ((field_no != expected) | stated)
        for kind, mask, text in (
            ("sparkplug_unsupported_type", unsupported, f"datatypes PortPulse does not store ({_UNSUPPORTED})"),
            ("sparkplug_datatype_mismatch", mismatch, "value not of the datatype the birth announced"),
        ):
            if mask.any():
                where = [f"{birth.metric[at[k]]} ({DATATYPES.get(int(datatype[k]), datatype[k])})"
                         for k in np.flatnonzero(mask)[:10]]  # fmt: skip
                found.append(Problem(kind, f"{text}: {', '.join(where)}"))
        use = mapped & ~null & ~unsupported & ~mismatch
        values = self._values(c, span, datatype, use, found, data.first)
        use &= ~np.isnan(values)
        if len(birth.scale):
            values *= birth.scale[at]
        # Event time: the metric's, else the payload's, else the bridge's receive time.
        ts_ms = np.where(c.has_timestamp[span], c.timestamp[span], np.uint64(data.payload_ts or 0))
        from_receive = ~c.has_timestamp[span] & (data.payload_ts is None)
        ts_ms = np.minimum(ts_ms, np.uint64(2**62 // 10**6)).astype(np.int64)
        ts = np.where(from_receive, data.received_ns, ts_ms * 10**6)
        future = use & (ts > data.received_ns + self._max_future_ns)
        past = use & (ts < data.received_ns - self._max_past_ns)
        for kind, mask, word in (("ts_too_far_future", future, "ahead of"), ("ts_too_far_past", past, "behind")):
            if mask.any():
                gap = np.abs(ts[mask] - data.received_ns).max() / 1e9
                found.append(Problem(kind, f"{int(mask.sum())} metrics up to {gap:.0f}s {word} the bridge clock"))
        use &= ~future & ~past
        self.counts["historical"] += int((use & c.is_historical[span]).sum())
        if found:
            problems.setdefault(data.message, []).extend(found)
        keep = np.flatnonzero(use)
        n = len(keep)
        if not n:
            return
        data.node.sensors.add((data.site, data.sensor))
        rows.message.extend([data.message] * n)
        rows.site.extend([data.site] * n)
        rows.sensor.extend([data.sensor] * n)
        rows.metric.extend(metric[keep].tolist())
        rows.ts.extend(ts[keep].tolist())
        rows.value.extend(values[keep].tolist())
        rows.flags.extend((from_receive[keep] * int(FLAG_TS_FROM_RECEIVE)).tolist())

    @staticmethod
    def _values(
        c: MetricColumns,
        span: slice,
        datatype: npt.NDArray[np.int64],
        use: npt.NDArray[np.bool_],
        found: list[Problem],
        first: int,
    ) -> npt.NDArray[np.float64]:
        """float64 values (NaN where not used or not numeric) by datatype."""
        raw = c.int_value[span]
        values = np.full(len(raw), np.nan)
        # Int8/16/32 in a uint32: some encoders sign-extend to 32 bits (Tahu), others keep the
        # type's width (pysparkplug: Int16 -5 is 65531); the low bits read as signed fit both.
        for code, bits in ((1, 8), (2, 16), (3, 32)):
            signed = use & (datatype == code)
            low = (raw[signed] & np.uint64(2**bits - 1)).astype(np.int64)
            values[signed] = np.where(low >= 2 ** (bits - 1), low - 2**bits, low)
        unsigned = use & (((datatype >= 5) & (datatype <= 8)) | (datatype == 13) | (datatype == 11))
        values[unsigned] = raw[unsigned]
        values[datatype == 11] = values[datatype == 11] != 0
        signed = use & (datatype == 4)
        values[signed] = raw[signed].view(np.int64)
        floats = use & ((datatype == 9) | (datatype == 10))
        values[floats] = c.float_value[span][floats]
        bad = []
        for k in np.flatnonzero(use & ((datatype == 12) | (datatype == 14))).tolist():
            text = c.text(first + k)
            try:
                values[k] = float(text)
            except ValueError:
                bad.append(text[:40])
        infinite = use & ~np.isfinite(values) & ~np.isnan(values)
        if infinite.any():
            found.append(Problem("non_finite_value", f"{int(infinite.sum())} metrics are infinite"))
            values[infinite] = np.nan
        if bad:
            found.append(Problem("non_numeric_value", f"string metrics that are not numbers: {bad[:10]}"))
        return values

    # ------------------------------------------------------------ status

    def status(self, now_s: float) -> list[dict[str, Any]]:
        """One row per edge node: group, edge_node, online, devices online/born, since (s), rebirths asked."""
        return [
            {"group": n.group, "edge_node": n.edge_node, "online": n.online,
             "devices_online": len(n.devices_online), "devices": len(n.devices),
             "for_s": round(now_s - n.changed_s, 1), "rebirths_asked": n.rebirths_asked}
            for n in sorted(self.nodes.values(), key=lambda n: (n.group, n.edge_node))
        ]  # fmt: skip

    def stale_sensors(self) -> Iterable[tuple[NodeStatus, str, str]]:
        """(node, site, sensor) of every sensor whose edge node is offline: its last values are stale."""
        for node in self.nodes.values():
            if not node.online:
                for site, sensor in sorted(node.sensors):
                    yield node, site, sensor


def rebirth_request(group: str, edge_node: str, now_ms: int) -> tuple[str, bytes]:
    """The NCMD asking an edge node to publish its births again (topic, payload)."""
    payload = Payload(timestamp=now_ms)
    payload.metrics.add(name=REBIRTH_METRIC, timestamp=now_ms, datatype=11, boolean_value=True)
    return f"{NAMESPACE}/{group}/NCMD/{edge_node}", payload.SerializeToString()


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """A primary host's STATE (spec 3.0: JSON, the will's timestamp equal to the birth's)."""
    return f'{{"online":{"true" if online else "false"},"timestamp":{timestamp_ms}}}'.encode()
