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
    PayloadColumns,
    parse_metric_spans,
    parse_payloads,
)
from portpulse.contract.catalogue import Catalogue
from portpulse.contract.errors import ConfigError
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE, ReadingColumns, str_array
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
    first: int  # its metrics in the delivery's PayloadColumns (first_metric[i] .. first_metric[i + 1])
    stop: int
    payload_ts: int | None  # ms
    received_ns: int
    site: str
    sensor: str


class _TopLevel:
    """A delivery's :class:`PayloadColumns` as Python lists, for the per-message pass (a list
    index costs a tenth of a numpy scalar's); None where a payload lacks timestamp or seq."""

    def __init__(self, p: PayloadColumns) -> None:
        self.malformed: list[bool] = p.malformed.tolist()
        pairs = zip(p.timestamp.tolist(), p.has_timestamp.tolist(), strict=True)
        self.timestamp: list[int | None] = [t if has else None for t, has in pairs]
        self.seq: list[int | None] = [
            s if has else None for s, has in zip(p.seq.tolist(), p.has_seq.tolist(), strict=True)
        ]
        self.first_metric: list[int] = p.first_metric.tolist()


class Problem(NamedTuple):
    reason: str
    detail: str


class Rows(NamedTuple):
    """Readings decoded from Sparkplug messages, with the index of each one's message (int64 ``(n,)``)."""

    readings: ReadingColumns
    message: npt.NDArray[np.int64]

    @classmethod
    def empty(cls) -> Rows:
        return cls(ReadingColumns.empty(), np.zeros(0, dtype=np.int64))


class SparkplugHost:
    """Sparkplug host application state: :meth:`decode` a delivery's messages at a time."""

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
        #: topic -> what :meth:`_resolve` made of it: a fleet's topics recur in every delivery
        self._topics: dict[str, tuple[SparkplugTopic | str, str, str | None]] = {}
        self._pending: list[_Data] = []
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

    def _resolve(self, topic: str) -> tuple[SparkplugTopic | str, str, str | None]:
        """(the parsed topic or why not, site, sensor id or None when the ids are not valid)."""
        where = parse_sparkplug_topic(topic)
        if isinstance(where, str):
            return where, "", None
        site, sensor = self.mapping.ids(where.group, where.edge_node, where.device)
        return where, site, sensor if self._valid_id(site) and self._valid_id(sensor) else None

    def _node(self, group: str, edge_node: str) -> NodeStatus:
        node = self.nodes.get((group, edge_node))
        if node is None:
            node = self.nodes[(group, edge_node)] = NodeStatus(group, edge_node)
        return node

    # ------------------------------------------------------------ per message

    def decode(self, messages: list[tuple[int, str, bytes, int]]) -> tuple[Rows, dict[int, list[Problem]]]:
        """Follow a delivery's Sparkplug messages ``(index, topic, payload, received ns)`` in receive
        order; their readings, and the problems per message index."""
        payloads = parse_payloads([payload for _, _, payload, _ in messages])
        top = _TopLevel(payloads)
        for k, (index, topic, payload, received_ns) in enumerate(messages):
            self._take(index, topic, payload, received_ns, top, k)
        pending, problems = self._pending, self._problems
        self._pending, self._problems = [], {}
        if not pending:
            return Rows.empty(), problems
        # The metrics of the messages that carry readings, in their order, parsed together.
        first = np.array([d.first for d in pending], dtype=np.int64)
        counts = np.array([d.stop - d.first for d in pending], dtype=np.int64)
        picked = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        columns = parse_metric_spans(payloads.buffer, payloads.metric_start[picked], payloads.metric_stop[picked])
        return self._decode(pending, columns, problems), problems

    def _take(self, index: int, topic: str, payload: bytes, received_ns: int, top: _TopLevel, k: int) -> None:
        known_topic = self._topics.get(topic)
        if known_topic is None:
            known_topic = self._topics[topic] = self._resolve(topic)
            if len(self._topics) > 100_000:  # bounded: a flood of distinct topics only costs re-parsing
                self._topics.clear()
        where, site, sensor = known_topic
        if isinstance(where, str):
            self._problem(index, "bad_topic", f"{topic!r}: {where}")
            return
        if where.kind in ("STATE", "NCMD", "DCMD"):
            self.counts["commands_ignored"] += 1  # host state and commands: not telemetry
            return
        if top.malformed[k]:
            self._problem(index, "sparkplug_bad_protobuf", f"{where.kind}: not a Sparkplug B protobuf Payload")
            return
        payload_ts, seq = top.timestamp[k], top.seq[k]
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
        if sensor is None:
            self._problem(index, "bad_sensor_id", f"site {site!r} / sensor from the topic {topic!r} not valid ids")
            return
        first, stop = top.first_metric[k], top.first_metric[k + 1]
        self._pending.append(_Data(index, node, birth, first, stop, payload_ts, received_ns, site, sensor))

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

    def _decode(self, pending: list[_Data], c: MetricColumns, problems: dict[int, list[Problem]]) -> Rows:
        """Every metric of the delivery at once: each row looked up in the birth its message was
        decoded against, checked and converted in whole-array steps; Python loops run only over
        messages with a problem and over metrics sent by name."""
        per_message = np.array([d.stop - d.first for d in pending], dtype=np.int64)
        owner = np.repeat(np.arange(len(pending)), per_message)  # row -> index into pending
        row_of = np.cumsum(per_message) - per_message  # each message's first row
        table = _BirthTable([d.birth for d in pending])
        # Which birth entry each row is: by alias (birth, alias) in one sorted search; else by name.
        at, known = table.find(table.birth_of[owner], c.alias, c.has_alias)
        for row in np.flatnonzero(~known).tolist():
            name = c.name(row)
            birth = pending[owner[row]].birth
            if name is not None and name in birth.by_name:
                at[row], known[row] = table.start[table.index[id(birth)]] + birth.by_name[name], True
        bad_message = np.zeros(len(pending), dtype=np.bool_)
        bad_message[owner[c.malformed]] = True
        usable = ~bad_message[owner]
        datatype = np.where(known, table.datatypes[at], 0)
        null = (c.is_null | (c.value_field == 0)) & known  # a metric without a value counts as null
        mapped = known & table.stored[at]
        expected = _VALUE_FIELD_OF[np.clip(datatype, 0, len(_VALUE_FIELD_OF) - 1)]
        stated = c.has_datatype & (c.datatype.astype(np.int64) != datatype)
        unsupported = mapped & ~null & (expected < 0)
        mismatch = mapped & ~null & ~unsupported & ((c.value_field != expected) | stated)
        use = usable & mapped & ~null & ~unsupported & ~mismatch
        self.counts["null"] += int((null & usable).sum())
        self.counts["unmapped"] += int((usable & known & ~mapped & ~null & ~table.control[at]).sum())
        found: dict[int, list[Problem]] = {}
        values = _values(c, datatype, use, owner, found)
        use &= ~np.isnan(values)
        values *= table.scale[at]
        # Event time: the metric's, else the payload's, else the bridge's receive time.
        payload_ts = np.array([-1 if d.payload_ts is None else d.payload_ts for d in pending], dtype=np.int64)[owner]
        received = np.array([d.received_ns for d in pending], dtype=np.int64)[owner]
        from_receive = ~c.has_timestamp & (payload_ts < 0)
        ts_ms = np.where(
            c.has_timestamp, np.minimum(c.timestamp, np.uint64(2**62 // 10**6)).astype(np.int64), payload_ts
        )
        ts = np.where(from_receive, received, ts_ms * 10**6)
        future = use & (ts > received + self._max_future_ns)
        past = use & (ts < received - self._max_past_ns)
        use &= ~future & ~past
        self.counts["historical"] += int((use & c.is_historical).sum())
        # Problems, per message: the loops run over the messages concerned only.
        for m in np.flatnonzero(bad_message).tolist():
            bad = np.flatnonzero(c.malformed[row_of[m] : row_of[m] + per_message[m]])
            found.setdefault(m, []).append(
                Problem("sparkplug_bad_protobuf", f"metrics {bad[:10].tolist()} are not Sparkplug metrics")
            )
        for m, rows_of in _by_message(owner, usable & ~known):
            names = [f"alias {int(c.alias[r])}" if c.has_alias[r] else repr(c.name(r)) for r in rows_of[:10]]
            found.setdefault(m, []).append(
                Problem("sparkplug_unknown_alias", f"never born: {', '.join(names)}; rebirth requested")
            )
            self._ask_rebirth(pending[m].node, pending[m].received_ns / 1e9)
        for kind, mask, text in (
            (
                "sparkplug_unsupported_type",
                usable & unsupported,
                f"datatypes PortPulse does not store ({_UNSUPPORTED})",
            ),
            ("sparkplug_datatype_mismatch", usable & mismatch, "value not of the datatype the birth announced"),
        ):
            for m, rows_of in _by_message(owner, mask):
                where = [f"{table.metric[at[r]]} ({DATATYPES.get(int(datatype[r]), int(datatype[r]))})"
                         for r in rows_of[:10]]  # fmt: skip
                found.setdefault(m, []).append(Problem(kind, f"{text}: {', '.join(where)}"))
        for kind, mask, word in (("ts_too_far_future", future, "ahead of"), ("ts_too_far_past", past, "behind")):
            for m, rows_of in _by_message(owner, mask):
                gap = np.abs(ts[rows_of] - received[rows_of]).max() / 1e9
                found.setdefault(m, []).append(
                    Problem(kind, f"{len(rows_of)} metrics up to {gap:.0f}s {word} the bridge clock")
                )
        for m, found_there in found.items():
            problems.setdefault(pending[m].message, []).extend(found_there)
        keep = np.flatnonzero(use)
        kept_owner = owner[keep]
        for m in np.flatnonzero(np.bincount(kept_owner, minlength=len(pending))).tolist():
            pending[m].node.sensors.add((pending[m].site, pending[m].sensor))
        message = np.array([d.message for d in pending], dtype=np.int64)
        site = str_array([d.site for d in pending])
        sensor = str_array([d.sensor for d in pending])
        readings = ReadingColumns(
            sensor_id=sensor[kept_owner],
            site=site[kept_owner],
            domain=str_array([self.mapping.domain]).repeat(len(keep)),
            metric=table.metric[at[keep]],
            ts_ns=ts[keep],
            value=values[keep],
            flags=(from_receive[keep] * FLAG_TS_FROM_RECEIVE).astype(np.uint8),
        )
        return Rows(readings, message[kept_owner])

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


#: The Metric value field each datatype code is carried in (-1: a type PortPulse does not store).
_VALUE_FIELD_OF = np.full(22, -1, dtype=np.int64)
_VALUE_FIELD_OF[list(NUMERIC_VALUE_FIELD)] = list(NUMERIC_VALUE_FIELD.values())


class _BirthTable:
    """The births a delivery's messages decode against, concatenated: row ``start[k] + j`` is
    entry ``j`` of birth ``k``; ``find`` looks up (birth, alias) pairs with one sorted search."""

    def __init__(self, births: list[Birth]) -> None:
        self.index: dict[int, int] = {}
        distinct: list[Birth] = []
        owners = []
        for birth in births:
            k = self.index.get(id(birth))
            if k is None:
                k = self.index[id(birth)] = len(distinct)
                distinct.append(birth)
            owners.append(k)
        self.birth_of = np.array(owners, dtype=np.int64)  # per message of the delivery
        sizes = np.array([len(b.aliases) for b in distinct], dtype=np.int64)
        self.start = np.cumsum(sizes) - sizes
        join = np.concatenate
        # One extra entry at the end: what unknown rows point at (no metric, not stored).
        self.datatypes = join([*(b.datatypes for b in distinct), [0]]).astype(np.int64)
        self.metric = join([*(b.metric for b in distinct), np.array([None], dtype=object)])
        self.scale = join([*(b.scale for b in distinct), [1.0]])
        self.stored = join([*(b.stored for b in distinct), [False]]).astype(np.bool_)
        self.control = join([*(b.control for b in distinct), [False]]).astype(np.bool_)
        aliases = join([*(b.aliases for b in distinct), np.zeros(0, dtype=np.uint64)]).astype(np.uint64)
        owner = np.repeat(np.arange(len(distinct)), sizes)
        # (birth, alias) as one uint64 where the alias fits in 40 bits (aliases are small in
        # practice; a name-only birth's placeholders do not fit and are never looked up by alias).
        fits = aliases < 2**40
        keys = (owner[fits].astype(np.uint64) << np.uint64(40)) | aliases[fits]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._rows = np.flatnonzero(fits)[order]
        self._none = len(self.datatypes) - 1

    def find(
        self, birth: npt.NDArray[np.int64], alias: npt.NDArray[np.uint64], has_alias: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """(row of each (birth, alias) in the table, found); unknown rows point at the empty entry."""
        fits = has_alias & (alias < 2**40)
        keys = (birth.astype(np.uint64) << np.uint64(40)) | np.where(fits, alias, 0).astype(np.uint64)
        pos = np.searchsorted(self._keys, keys).clip(0, max(len(self._keys) - 1, 0))
        found = fits & (self._keys[pos] == keys) if len(self._keys) else np.zeros(len(keys), dtype=np.bool_)
        rows = np.where(found, self._rows[pos] if len(self._rows) else 0, self._none)
        return rows.astype(np.int64), found


def _by_message(owner: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> list[tuple[int, npt.NDArray[np.int64]]]:
    """(message, its rows) for the rows of ``mask``, grouped by message (empty when none)."""
    rows = np.flatnonzero(mask)
    if not rows.size:
        return []
    starts = np.flatnonzero(np.diff(owner[rows], prepend=-1))
    return [(int(owner[rows[a]]), rows[a:b]) for a, b in zip(starts, [*starts[1:], len(rows)], strict=True)]


def _values(
    c: MetricColumns,
    datatype: npt.NDArray[np.int64],
    use: npt.NDArray[np.bool_],
    owner: npt.NDArray[np.int64],
    found: dict[int, list[Problem]],
) -> npt.NDArray[np.float64]:
    """float64 values by datatype (NaN where not used or not a number); problems per message."""
    raw = c.int_value
    values = np.full(len(raw), np.nan)
    # Int8/16/32 in a uint32: some encoders sign-extend to 32 bits (Tahu), others keep the
    # type's width (pysparkplug: Int16 -5 is 65531); the low bits read as signed fit both.
    for code, bits in ((1, 8), (2, 16), (3, 32)):
        signed = use & (datatype == code)
        low = (raw[signed] & np.uint64(2**bits - 1)).astype(np.int64)
        values[signed] = np.where(low >= 2 ** (bits - 1), low - 2**bits, low)
    unsigned = use & (((datatype >= 5) & (datatype <= 8)) | (datatype == 13))
    values[unsigned] = raw[unsigned]
    boolean = use & (datatype == 11)
    values[boolean] = raw[boolean] != 0
    signed64 = use & (datatype == 4)
    values[signed64] = raw[signed64].view(np.int64)
    floats = use & ((datatype == 9) | (datatype == 10))
    values[floats] = c.float_value[floats]
    text = use & ((datatype == 12) | (datatype == 14))
    not_numbers = np.zeros(len(raw), dtype=np.bool_)
    for m, rows in _by_message(owner, text):
        bad = []
        for r in rows.tolist():
            try:
                values[r] = float(c.text(r))
            except ValueError:
                bad.append(c.text(r)[:40])
                not_numbers[r] = True
        if bad:
            found.setdefault(m, []).append(
                Problem("non_numeric_value", f"string metrics that are not numbers: {bad[:10]}")
            )
    # NaN as well as infinities: a float metric without a value is sent as null (is_null), and
    # InfluxDB cannot store either, so the message is dead-lettered with the reason, as JSON's NaN.
    not_finite = use & ~not_numbers & ~np.isfinite(values)
    for m, rows in _by_message(owner, not_finite):
        nan = int(np.isnan(values[rows]).sum())
        found.setdefault(m, []).append(
            Problem("non_finite_value", f"{len(rows)} metrics are not finite ({nan} NaN, {len(rows) - nan} infinite)")
        )
    values[not_finite] = np.nan
    return values


def rebirth_request(group: str, edge_node: str, now_ms: int) -> tuple[str, bytes]:
    """The NCMD asking an edge node to publish its births again (topic, payload)."""
    payload = Payload(timestamp=now_ms)
    payload.metrics.add(name=REBIRTH_METRIC, timestamp=now_ms, datatype=11, boolean_value=True)
    return f"{NAMESPACE}/{group}/NCMD/{edge_node}", payload.SerializeToString()


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """A primary host's STATE (spec 3.0: JSON, the will's timestamp equal to the birth's)."""
    return f'{{"online":{"true" if online else "false"},"timestamp":{timestamp_ms}}}'.encode()
