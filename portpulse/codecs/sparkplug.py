"""Eclipse Sparkplug B payloads (spec 3.0): protobuf, decoded two ways (pure).

- :data:`Payload` is the whole ``org.eclipse.tahu.protobuf.Payload`` message through the
  ``protobuf`` package (upb): births (names, aliases, datatypes) and what the simulator encodes.
  Sub-messages PortPulse does not read (metadata, property sets, DataSet, Template) are declared
  as ``bytes``: the same wire format, skipped rather than parsed.
- :func:`parse_payloads` and :func:`parse_metric_spans` are the DATA path: the payloads of a whole
  delivery, then all their metrics, are parsed together with numpy, one protobuf field of every
  payload or metric per step (a metric has 3-6 fields), because reading upb's fields from Python
  costs about 2 us per metric and making a bytes object per metric about 0.4 us.

Timestamps are ms since the epoch, as the spec says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

__all__ = [
    "DATATYPES",
    "NUMERIC_VALUE_FIELD",
    "DecodeError",
    "Metric",
    "MetricColumns",
    "Payload",
    "PayloadColumns",
    "parse_metric_spans",
    "parse_metrics",
    "parse_payloads",
]

#: Sparkplug datatype code -> name (spec 3.0, 6.4.16).
DATATYPES: dict[int, str] = {
    1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16", 7: "UInt32", 8: "UInt64",
    9: "Float", 10: "Double", 11: "Boolean", 12: "String", 13: "DateTime", 14: "Text", 15: "UUID",
    16: "DataSet", 17: "Bytes", 18: "File", 19: "Template", 20: "PropertySet", 21: "PropertySetList",
}  # fmt: skip

#: The Metric value field (protobuf field number) each scalar datatype is carried in.
NUMERIC_VALUE_FIELD: dict[int, int] = {
    1: 10, 2: 10, 3: 10, 5: 10, 6: 10, 7: 10,  # int_value (uint32; signed types in two's complement)
    4: 11, 8: 11, 13: 11,  # long_value (uint64); DateTime is ms since the epoch
    9: 12, 10: 13, 11: 14,  # float_value, double_value, boolean_value
    12: 15, 14: 15,  # string_value: String, Text
}  # fmt: skip

_F = descriptor_pb2.FieldDescriptorProto
_METRIC_FIELDS = (
    ("name", 1, _F.TYPE_STRING, False),
    ("alias", 2, _F.TYPE_UINT64, False),
    ("timestamp", 3, _F.TYPE_UINT64, False),
    ("datatype", 4, _F.TYPE_UINT32, False),
    ("is_historical", 5, _F.TYPE_BOOL, False),
    ("is_transient", 6, _F.TYPE_BOOL, False),
    ("is_null", 7, _F.TYPE_BOOL, False),
    ("metadata", 8, _F.TYPE_BYTES, False),
    ("properties", 9, _F.TYPE_BYTES, False),
    ("int_value", 10, _F.TYPE_UINT32, True),
    ("long_value", 11, _F.TYPE_UINT64, True),
    ("float_value", 12, _F.TYPE_FLOAT, True),
    ("double_value", 13, _F.TYPE_DOUBLE, True),
    ("boolean_value", 14, _F.TYPE_BOOL, True),
    ("string_value", 15, _F.TYPE_STRING, True),
    ("bytes_value", 16, _F.TYPE_BYTES, True),
    ("dataset_value", 17, _F.TYPE_BYTES, True),
    ("template_value", 18, _F.TYPE_BYTES, True),
    ("extension_value", 19, _F.TYPE_BYTES, True),
)


def _message_classes() -> tuple[Any, Any]:
    """The Payload and Metric classes."""
    package = "portpulse.sparkplug_b"
    proto = descriptor_pb2.FileDescriptorProto(name="portpulse_sparkplug_b.proto", package=package, syntax="proto2")
    metric = proto.message_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, number, kind, in_oneof in _METRIC_FIELDS:
        field = metric.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
        if in_oneof:
            field.oneof_index = 0
    payload = proto.message_type.add(name="Payload")
    payload.field.add(name="timestamp", number=1, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    payload.field.add(name="metrics", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                      type_name=f".{package}.Metric")  # fmt: skip
    payload.field.add(name="seq", number=3, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    payload.field.add(name="uuid", number=4, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    payload.field.add(name="body", number=5, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    payload.extension_range.add(start=6, end=536870912)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{m}"))
                 for m in ("Payload", "Metric"))  # type: ignore[return-value]  # fmt: skip


#: The ``Payload`` and ``Metric`` protobuf message classes.
Payload, Metric = _message_classes()


@dataclass(frozen=True, slots=True)
class PayloadColumns:
    """The top level of ``n`` payloads (``(n,)`` arrays): ``timestamp`` (ms) and ``seq`` with their
    presence, ``malformed`` (not a protobuf Payload), and the metrics of payload ``i`` at
    ``buffer[metric_start[k]:metric_stop[k]]`` for ``k`` in ``range(first_metric[i], first_metric[i + 1])``."""

    buffer: bytes
    timestamp: npt.NDArray[np.uint64]
    has_timestamp: npt.NDArray[np.bool_]
    seq: npt.NDArray[np.uint64]
    has_seq: npt.NDArray[np.bool_]
    malformed: npt.NDArray[np.bool_]
    first_metric: npt.NDArray[np.int64]  # (n + 1,)
    metric_start: npt.NDArray[np.int64]
    metric_stop: npt.NDArray[np.int64]


_METRIC_TAG = 2 << 3 | 2  # Payload field 2 (metrics), length-delimited


def parse_payloads(payloads: list[bytes]) -> PayloadColumns:
    """The top level of every payload at once (one protobuf field of each per step, as
    :func:`parse_metric_spans`): timestamp, seq and where each metric's bytes are, without
    making a Python object per metric."""
    n = len(payloads)
    joined = b"".join(payloads)
    buf = np.frombuffer(joined + bytes(_PAD), dtype=np.uint8)
    sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    end = np.cumsum(sizes)
    pos = end - sizes
    timestamp, seq = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
    has_timestamp, has_seq, malformed = (np.zeros(n, dtype=np.bool_) for _ in range(3))
    owners, starts, stops = [], [], []
    rows = np.flatnonzero(pos < end)
    while rows.size:
        tags, tag_len = _varints(buf, pos[rows])
        at = pos[rows] + tag_len
        if tags[0] == _METRIC_TAG and (tags == _METRIC_TAG).all():  # mid-payload: a metric in every row
            size, lengths = _varints(buf, at)
            stop = at + lengths + np.minimum(size, 2**40).astype(np.int64)
            bad = (lengths == 0) | (stop > end[rows])
            good = ~bad
            owners.append(rows[good])
            starts.append((at + lengths)[good])
            stops.append(stop[good])
            malformed[rows[bad]] = True
            pos[rows] = stop
            rows = rows[good & (stop < end[rows])]
            continue
        field = (tags >> np.uint64(3)).astype(np.int64)
        wire = (tags & np.uint64(7)).astype(np.int64)
        expected = np.where((field == 1) | (field == 3), 0, np.where((field >= 2) & (field <= 5), 2, wire))
        bad = (tag_len == 0) | (field == 0) | (field >= 2**29) | (wire != expected) | (wire == 3) | (wire == 4)
        bad |= wire > 5
        stop = at.copy()
        v = np.flatnonzero((wire == 0) & ~bad)
        if v.size:
            values, lengths = _varints(buf, at[v])
            bad[v[lengths == 0]] = True
            stop[v] = at[v] + lengths
            for number, column, present in ((1, timestamp, has_timestamp), (3, seq, has_seq)):
                hit = v[field[v] == number]
                column[rows[hit]] = values[field[v] == number]
                present[rows[hit]] = True
        stop[(wire == 1) & ~bad] += 8
        stop[(wire == 5) & ~bad] += 4
        d = np.flatnonzero((wire == 2) & ~bad)
        if d.size:
            size, lengths = _varints(buf, at[d])
            size[size >= 2**40] = 2**40  # beyond any payload: caught by the end check below
            bad[d[lengths == 0]] = True
            stop[d] = at[d] + lengths + size.astype(np.int64)
            metric = d[field[d] == 2]
            owners.append(rows[metric])
            starts.append(stop[metric] - size[field[d] == 2].astype(np.int64))
            stops.append(stop[metric])
        bad |= stop > end[rows]
        malformed[rows[bad]] = True
        pos[rows] = stop
        rows = rows[~bad & (stop < end[rows])]
    owner = np.concatenate([*owners, np.zeros(0, dtype=np.int64)])
    start = np.concatenate([*starts, np.zeros(0, dtype=np.int64)])
    end_at = np.concatenate([*stops, np.zeros(0, dtype=np.int64)])
    keep = ~malformed[owner]
    order = np.lexsort((start[keep], owner[keep]))  # by payload, then in the payload's order
    owner, start, end_at = owner[keep][order], start[keep][order], end_at[keep][order]
    first = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]).astype(np.int64)
    return PayloadColumns(joined, timestamp, has_timestamp, seq, has_seq, malformed, first, start, end_at)


@dataclass(frozen=True, slots=True)
class MetricColumns:
    """The fields of ``n`` encoded metrics, one row each (``(n,)`` arrays).

    ``has_*`` say whether the optional field was present. ``value_field`` is the protobuf field
    number of the value (10..19; 0: none). The value is in ``int_value`` (uint64: fields 10, 11 and
    14), ``float_value`` (float64: fields 12 and 13) or, for string_value (15), ``text_at`` (offset
    and length in ``buffer``); ``name_at`` likewise for the name. ``malformed``: the metric's
    bytes are not a protobuf Metric (truncated, a field of the wrong wire type)."""

    buffer: bytes
    alias: npt.NDArray[np.uint64]
    has_alias: npt.NDArray[np.bool_]
    timestamp: npt.NDArray[np.uint64]
    has_timestamp: npt.NDArray[np.bool_]
    datatype: npt.NDArray[np.uint64]
    has_datatype: npt.NDArray[np.bool_]
    is_historical: npt.NDArray[np.bool_]
    is_null: npt.NDArray[np.bool_]
    value_field: npt.NDArray[np.int64]
    int_value: npt.NDArray[np.uint64]
    float_value: npt.NDArray[np.float64]
    text_at: npt.NDArray[np.int64]  # (n, 2): offset, length
    name_at: npt.NDArray[np.int64]  # (n, 2): offset, length; length -1 when absent
    malformed: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.alias)

    def text(self, row: int) -> str:
        """The string value of metric ``row`` (UTF-8, undecodable bytes replaced)."""
        at, size = self.text_at[row].tolist()
        return self.buffer[at : at + size].decode("utf-8", "replace")

    def name(self, row: int) -> str | None:
        at, size = self.name_at[row].tolist()
        return None if size < 0 else self.buffer[at : at + size].decode("utf-8", "replace")


_PAD = 16  # zero bytes after the buffer: a varint read past a truncated metric stays in bounds
_VARINT_FIELDS = frozenset({2, 3, 4, 5, 6, 7, 10, 11, 14})
#: The wire type of each Metric field number below 20 (-1: none); higher numbers are unknown fields.
_WIRE_TYPE = np.full(20, -1, dtype=np.int64)
_WIRE_TYPE[sorted(_VARINT_FIELDS)] = 0
_WIRE_TYPE[[12, 13]] = [5, 1]
_WIRE_TYPE[[1, 8, 9, 15, 16, 17, 18, 19]] = 2


def _uniform_varints(
    buf: npt.NDArray[np.uint8], at: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]] | None:
    """The varints at ``at`` when all have the length of the first (timestamps: 6 bytes each in
    ms), read a byte column at a time with no per-row bookkeeping; None when they do not."""
    length = int(np.argmin(buf[at[0] : at[0] + 10] >= 0x80)) + 1
    if length == 1 and buf[at[0]] >= 0x80:  # ten continuation bytes: no varint
        return None
    values = np.zeros(len(at), dtype=np.uint64)
    same = True
    for k in range(length):
        byte = buf[at + k]
        same = same and bool((byte >= 0x80).all() if k < length - 1 else (byte < 0x80).all())
        if not same:
            return None
        values |= (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values, np.full(len(at), length, dtype=np.int64)


def _varints(
    buf: npt.NDArray[np.uint8], at: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The base-128 varints starting at byte offsets ``at``: (values, lengths in bytes; 0 where
    no byte of the first ten ends the varint)."""
    first = buf[at]
    if not (first & 0x80).any():  # the common case for tags, aliases and small sizes: one byte each
        return first.astype(np.uint64), np.ones(len(at), dtype=np.int64)
    uniform = _uniform_varints(buf, at)
    if uniform is not None:
        return uniform
    values = np.zeros(len(at), dtype=np.uint64)
    lengths = np.zeros(len(at), dtype=np.int64)
    live = np.arange(len(at))
    for k in range(10):
        byte = buf[at[live] + k]
        values[live] |= (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        done = byte < 0x80
        lengths[live[done]] = k + 1
        live = live[~done]
        if not live.size:
            break
    return values, lengths


#: Known Metric fields read as varints: field number -> (column, its presence column or None).
_VARINT_COLUMNS = {2: ("alias", "has_alias"), 3: ("timestamp", "has_timestamp"), 4: ("datatype", "has_datatype"),
                   10: ("int_value", None), 11: ("int_value", None), 14: ("int_value", None)}  # fmt: skip


def _uniform_step(
    tag: int,
    buf: npt.NDArray[np.uint8],
    rows: npt.NDArray[np.int64],
    pos: npt.NDArray[np.int64],
    end: npt.NDArray[np.int64],
    cols: dict[str, Any],
    tag_len: npt.NDArray[np.int64],
) -> bool:
    """Read the field every row of this step has (the usual case: a source encodes all its
    metrics alike) without splitting the rows by wire type; False to leave it to the general
    path (a field it does not handle here)."""
    field, wire = tag >> 3, tag & 7
    if field == 0 or field >= 2**29 or wire not in (0, 1, 5) or (field < 20 and _WIRE_TYPE[field] != wire):
        return False
    if wire == 0 and field not in _VARINT_COLUMNS:
        return False  # flags and unknown varints: rare, the general path
    at = pos[rows] + tag_len
    if wire == 0:
        values, lengths = _varints(buf, at)
        column, present = _VARINT_COLUMNS[field]
        cols[column][rows] = values
        if present is not None:
            cols[present][rows] = True
        stop = at + lengths
        bad = (lengths == 0) | (stop > end[rows])
    else:
        width, dtype = (8, "<f8") if wire == 1 else (4, "<f4")
        if field in (12, 13):
            raw = buf[at[:, None] + np.arange(width)]
            with np.errstate(invalid="ignore"):  # a float32 signalling NaN widens to a NaN
                cols["float_value"][rows] = np.ascontiguousarray(raw).view(dtype).ravel()
        stop = at + width
        bad = stop > end[rows]
    if 10 <= field <= 19:
        cols["value_field"][rows] = field
    cols["malformed"][rows[bad]] = True
    pos[rows] = stop
    return True


def parse_metrics(blobs: list[bytes]) -> MetricColumns:
    """Parse encoded Sparkplug ``Metric`` messages into columns (see :func:`parse_metric_spans`)."""
    sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    end = np.cumsum(sizes)
    return parse_metric_spans(b"".join(blobs), end - sizes, end)


def parse_metric_spans(joined: bytes, start: npt.NDArray[np.int64], stop: npt.NDArray[np.int64]) -> MetricColumns:
    """Parse the encoded ``Metric`` messages at ``joined[start[k]:stop[k]]`` into columns, one row
    each (see :class:`MetricColumns`; its offsets are into ``joined``).

    All metrics advance together: step ``k`` reads the ``k``-th field of every metric that has
    one, so the Python work is per field position, not per metric. Unknown fields are skipped,
    as protobuf requires; a later occurrence of a field replaces an earlier one (as in protobuf).
    """
    n = len(start)
    buf = np.frombuffer(joined + bytes(_PAD), dtype=np.uint8)
    end = np.asarray(stop, dtype=np.int64)
    pos = np.array(start, dtype=np.int64)
    cols: dict[str, Any] = {
        name: np.zeros(n, dtype=np.uint64) for name in ("alias", "timestamp", "datatype", "int_value")
    }
    cols |= {name: np.zeros(n, dtype=np.bool_)
             for name in ("has_alias", "has_timestamp", "has_datatype", "is_historical", "is_null")}  # fmt: skip
    cols |= {
        "value_field": np.zeros(n, dtype=np.int64), "float_value": np.zeros(n),
        "text_at": np.zeros((n, 2), dtype=np.int64), "name_at": np.full((n, 2), -1, dtype=np.int64),
        "malformed": np.zeros(n, dtype=np.bool_),
    }  # fmt: skip
    malformed = cols["malformed"]
    rows = np.flatnonzero(pos < end)
    while rows.size:
        tags, tag_len = _varints(buf, pos[rows])
        if tag_len[0] and (tags == tags[0]).all() and _uniform_step(int(tags[0]), buf, rows, pos, end, cols, tag_len):
            rows = rows[~malformed[rows] & (pos[rows] < end[rows])]
            continue
        field = (tags >> np.uint64(3)).astype(np.int64)
        wire = (tags & np.uint64(7)).astype(np.int64)
        at = pos[rows] + tag_len
        expected = np.where(field < 20, _WIRE_TYPE[np.minimum(field, 19)], wire)
        bad = (tag_len == 0) | (field == 0) | (field >= 2**29) | (wire != expected) | (wire == 3) | (wire == 4)
        bad |= wire > 5
        stop = at.copy()
        # varint fields (wire type 0)
        v = np.flatnonzero((wire == 0) & ~bad)
        values, lengths = _varints(buf, at[v])
        bad[v[lengths == 0]] = True
        stop[v] = at[v] + lengths
        for number, column, present in ((2, "alias", "has_alias"), (3, "timestamp", "has_timestamp"),
                                        (4, "datatype", "has_datatype")):  # fmt: skip
            hit = field[v] == number
            cols[column][rows[v[hit]]] = values[hit]
            cols[present][rows[v[hit]]] = True
        for number, column in ((5, "is_historical"), (7, "is_null")):
            hit = field[v] == number
            cols[column][rows[v[hit]]] = values[hit] != 0
        fv = field[v]
        hit = (fv == 10) | (fv == 11) | (fv == 14)
        cols["int_value"][rows[v[hit]]] = values[hit]
        # fixed64 (double_value) and fixed32 (float_value)
        for wire_type, width, dtype in ((1, 8, "<f8"), (5, 4, "<f4")):
            w = np.flatnonzero((wire == wire_type) & ~bad)
            stop[w] = at[w] + width
            if w.size:
                raw = buf[at[w, None] + np.arange(width)]
                with np.errstate(invalid="ignore"):  # a float32 signalling NaN widens to a NaN
                    floats = np.ascontiguousarray(raw).view(dtype).ravel().astype(np.float64)
                known = (field[w] == 12) | (field[w] == 13)
                cols["float_value"][rows[w[known]]] = floats[known]
        # length-delimited (name, string_value, skipped sub-messages and bytes)
        d = np.flatnonzero((wire == 2) & ~bad)
        sizes_d, lengths = _varints(buf, at[d])
        sizes_d[sizes_d >= 2**40] = 2**40  # beyond any payload: caught by the end check below
        bad[d[lengths == 0]] = True
        start = at[d] + lengths
        stop[d] = start + sizes_d.astype(np.int64)
        for number, column in ((1, "name_at"), (15, "text_at")):
            hit = field[d] == number
            cols[column][rows[d[hit]]] = np.column_stack([start[hit], sizes_d[hit].astype(np.int64)])
        # the value field, for every wire type
        valued = (field >= 10) & (field <= 19) & ~bad
        cols["value_field"][rows[valued]] = field[valued]
        bad |= stop > end[rows]
        malformed[rows[bad]] = True
        pos[rows] = stop
        rows = rows[~bad & (stop < end[rows])]
    return MetricColumns(buffer=joined, **cols)
