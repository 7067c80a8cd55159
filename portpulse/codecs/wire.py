"""The compact Kafka value encoding of readings (pure; version 1).

The bridge writes one Kafka record per sensor (and site) and delivery, with every metric it
reported: up to ``MAX_READINGS_PER_RECORD`` readings (``portpulse.ingest.records``), from
however many MQTT messages. The record key is the sensor_id, the topic
``portpulse.readings.{domain}`` gives the domain, and the header ``pp-v`` the encoding version
(``b"1"``). Value layout, little-endian::

    u8   version (=1)
    u16  site length, then the site (UTF-8)
    u8   number of metric names M, then M x (u8 length, UTF-8 name)
    u32  number of readings N
    N x  record (i8 ts_ns, f8 value, u1 metric index, u1 flags)   -- 18 bytes, packed

A reading costs 18 bytes plus its share of the name table; decoding is one ``np.frombuffer``.
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from portpulse.codecs.recordbatch import intern_slices, zero_padded
from portpulse.contract.points import Categorical

__all__ = [
    "VERSION",
    "VERSION_HEADER",
    "WIRE_DECODER",
    "WireBatch",
    "WireError",
    "WireRecord",
    "decode_columns",
    "decode_value",
    "decode_values",
    "encode_value",
    "value_header",
]

VERSION = 1
VERSION_HEADER = ("pp-v", b"1")
_RECORD = np.dtype([("ts_ns", "<i8"), ("value", "<f8"), ("metric", "u1"), ("flags", "u1")])
_RECORD_STRUCT = struct.Struct("<qdBB")
# Byte offsets of the fields after ts_ns in a row (the layout _RECORD_STRUCT packs).
_VALUE_AT, _METRIC_AT, _FLAGS_AT = (struct.calcsize(f"<{head}") for head in ("q", "qd", "qdB"))
_MAX_METRICS = 255


class WireError(ValueError):
    """A Kafka value that is not a valid PortPulse encoding."""


@dataclass(frozen=True, slots=True)
class WireRecord:
    """Readings of one sensor: ``ts_ns`` int64 ``(n,)``, ``value`` float64 ``(n,)``,
    ``metric`` names per reading (``metrics[metric_index]``), ``flags`` uint8 ``(n,)``."""

    site: str
    metrics: tuple[str, ...]
    metric_index: npt.NDArray[np.uint8]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    flags: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.ts_ns)


def encode_value(
    site: str,
    metrics: Sequence[str],
    metric_index: npt.NDArray[np.integer] | Sequence[int],
    ts_ns: npt.NDArray[np.int64] | Sequence[int],
    value: npt.NDArray[np.float64] | Sequence[float],
    flags: npt.NDArray[np.uint8] | Sequence[int] | None = None,
) -> bytes:
    """Encode one sensor's readings; ``metric_index[i]`` indexes ``metrics``.

    Sequences of Python numbers take a ``struct`` path (fast for the few readings of one
    message); arrays take a numpy path (fast for many).
    """
    if len(metrics) > _MAX_METRICS:
        raise WireError(f"at most {_MAX_METRICS} metric names per record")
    n = len(ts_ns)
    if isinstance(ts_ns, np.ndarray):
        records = np.empty(n, dtype=_RECORD)
        records["ts_ns"] = ts_ns
        records["value"] = value
        records["metric"] = metric_index
        records["flags"] = 0 if flags is None else flags
        body = records.tobytes()
    else:
        pack = _RECORD_STRUCT.pack
        body = b"".join(
            pack(t, v, m, f)
            for t, v, m, f in zip(ts_ns, value, metric_index, flags if flags is not None else [0] * n, strict=True)
        )
    return b"".join((value_header(site, tuple(metrics)), struct.pack("<I", n), body))


def encode_rows(
    ts_ns: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    flags: npt.NDArray[np.uint8],
    metric_index: npt.NDArray[np.integer] | int = 0,
) -> npt.NDArray[np.uint8]:
    """The reading rows of :func:`encode_value` as a byte matrix ``(n, 18)``: a value is
    ``value_header(site, metrics)``, its count as ``<u4``, then its rows (``metric_index``
    into ``metrics``, per row or one for all)."""
    rows = np.empty(len(ts_ns), dtype=_RECORD)
    rows["ts_ns"] = ts_ns
    rows["value"] = value
    rows["metric"] = metric_index
    rows["flags"] = flags
    return rows.view(np.uint8).reshape(len(ts_ns), _RECORD.itemsize)


@functools.lru_cache(maxsize=65_536)
def value_header(site: str, metrics: tuple[str, ...]) -> bytes:
    """Version, site and metric-name table; the same few combinations recur, so cache them."""
    site_b = site.encode()
    parts = [struct.pack("<BH", VERSION, len(site_b)), site_b, struct.pack("<B", len(metrics))]
    for name in metrics:
        name_b = name.encode()
        if len(name_b) > 255:
            raise WireError(f"metric name longer than 255 bytes: {name[:40]!r}...")
        parts += [struct.pack("<B", len(name_b)), name_b]
    return b"".join(parts)


def decode_value(data: bytes) -> WireRecord:
    """Decode a value written by :func:`encode_value`; raises :class:`WireError` when malformed."""
    try:
        version, site_len = struct.unpack_from("<BH", data, 0)
        if version != VERSION:
            raise WireError(f"unsupported encoding version {version}")
        pos = 3
        site = data[pos : pos + site_len].decode()
        pos += site_len
        (count,) = struct.unpack_from("<B", data, pos)
        pos += 1
        names = []
        for _ in range(count):
            (length,) = struct.unpack_from("<B", data, pos)
            names.append(data[pos + 1 : pos + 1 + length].decode())
            pos += 1 + length
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if len(data) - pos != n * _RECORD.itemsize:
            raise WireError(f"expected {n} readings ({n * _RECORD.itemsize} bytes), got {len(data) - pos} bytes")
        records = np.frombuffer(data, dtype=_RECORD, count=n, offset=pos)
    except (struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"truncated or corrupt value: {exc}") from None
    if n and int(records["metric"].max()) >= len(names):
        raise WireError("metric index out of range")
    return WireRecord(
        site=site,
        metrics=tuple(names),
        metric_index=records["metric"].copy(),
        ts_ns=records["ts_ns"].copy(),
        value=records["value"].copy(),
        flags=records["flags"].copy(),
    )


@dataclass(frozen=True, slots=True)
class WireBatch:
    """Readings of many Kafka values, as columns over all readings ``(n,)``: ``record`` (index of
    the value each reading came from), ``site`` and ``metric`` (strings, dictionary-encoded),
    ``ts_ns``, ``value``, ``flags``; ``bad``: indices of the values that did not decode.
    ``header`` int64: readings with equal codes have equal site (their values share a header), the
    codes of ``site``; ``name_code`` int64: readings with equal codes have equal site and metric,
    the codes of ``metric``."""

    record: npt.NDArray[np.int64]
    site: Categorical
    metric: Categorical
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    flags: npt.NDArray[np.uint8]
    bad: list[int]
    header: npt.NDArray[np.int64]
    name_code: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.ts_ns)


def decode_values(values: Sequence[bytes]) -> WireBatch:
    """:func:`decode_columns` of a list of values (``record`` indexes ``values``)."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(values) else lengths
    return decode_columns(np.frombuffer(b"".join(values), dtype=np.uint8), starts, lengths)


_MIN_VALUE = 8  # version, site length, name count, reading count


def decode_columns(
    data: npt.NDArray[np.uint8], start: npt.NDArray[np.int64], length: npt.NDArray[np.int64]
) -> WireBatch:
    """Decode the values ``data[start[i] : start[i] + length[i]]`` (a Kafka fetch as columns) at
    once: every value's framing is checked, the distinct headers (site + metric names) validated
    once each, and every reading gathered in one pass. ``record`` indexes the values; malformed
    ones (a null value has length -1) are listed in ``bad``. In C (``_records.c``) where it is
    built, else :func:`_decode_columns_numpy`; both give the same columns."""
    if _COMPILED_WIRE is None:
        return _decode_columns_numpy(data, start, length)
    headers, readings = _COMPILED_WIRE
    start, length = np.ascontiguousarray(start, dtype=np.int64), np.ascontiguousarray(length, dtype=np.int64)
    good, head_len, body, count = (np.frombuffer(c, dtype=np.int64) for c in headers(data, start, length))
    codes, distinct = intern_slices(data, start[good], head_len)
    valid, sites, table = _header_tables(distinct)
    keep = valid[codes]
    if not keep.all():
        good, body, count, codes = good[keep], body[keep], count[keep], codes[keep]
    widths = np.array([len(names) for names in table] or [0], dtype=np.int64)
    width = max(int(widths.max()), 1)
    record, header, name_code, ts, value, flags, kept = readings(data, body, count, codes, widths, good, width)
    decoded = np.zeros(len(start), dtype=bool)
    decoded[good[np.frombuffer(kept, dtype=np.bool_)]] = True
    header_codes = np.frombuffer(header, dtype=np.int64)
    name_codes = np.frombuffer(name_code, dtype=np.int64)
    return WireBatch(
        record=np.frombuffer(record, dtype=np.int64),
        site=Categorical(header_codes, sites),
        metric=Categorical(name_codes, _name_table(table, width)),
        ts_ns=np.frombuffer(ts, dtype=np.int64),
        value=np.frombuffer(value, dtype=np.float64),
        flags=np.frombuffer(flags, dtype=np.uint8),
        bad=np.flatnonzero(~decoded).tolist(),
        header=header_codes,
        name_code=name_codes,
    )


def _header_tables(
    distinct: list[bytes],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.object_], list[tuple[str, ...]]]:
    """Each distinct header (site and metric names) parsed once by the strict decoder: whether it
    is valid ``(h,)``, its site ``(h,)`` ("" when not) and its metric names (none when not)."""
    valid = np.ones(len(distinct), dtype=bool)
    sites = np.empty(max(len(distinct), 1), dtype=object)
    names: list[tuple[str, ...]] = []
    for h, head_bytes in enumerate(distinct):
        try:
            head = decode_value(head_bytes + b"\0\0\0\0")
            sites[h] = head.site
            names.append(head.metrics)
        except WireError:
            valid[h] = False
            sites[h] = ""
            names.append(())
    return valid, sites, names


def _name_table(names: list[tuple[str, ...]], width: int) -> npt.NDArray[np.object_]:
    """The headers' metric names as one flat table ``(h * width,)``: header h's names from h * width."""
    table = np.empty((max(len(names), 1), width), dtype=object)
    for h, row in enumerate(names):
        table[h, : len(row)] = row
    return table.reshape(-1)


def _compiled_wire() -> tuple[Callable[..., tuple[bytearray, ...]], Callable[..., tuple[bytearray, ...]]] | None:
    if sys.byteorder != "little":  # the compiled reader copies the readings' numbers as they lie
        return None
    try:
        from portpulse.codecs._records import wire_headers, wire_readings
    except ImportError:  # installed where no C compiler was at hand: numpy walks the values
        return None
    return wire_headers, wire_readings


_COMPILED_WIRE = _compiled_wire()
#: what decodes a fetch's wire values: "compiled" or "numpy" (logged at start-up)
WIRE_DECODER = "numpy" if _COMPILED_WIRE is None else "compiled"


def _decode_columns_numpy(
    data: npt.NDArray[np.uint8], start: npt.NDArray[np.int64], length: npt.NDArray[np.int64]
) -> WireBatch:
    """:func:`decode_columns` with vectorised reads: headers are walked one name per step over
    all values, and every reading gathered in one pass.

    The positions computed for value ``i`` (layout in the module docstring)::

        start                                    pos        pos + 4            end
        | v | u16 len | site | M | len | name |... | u32 N   | N x 18-byte readings |
        '------------- header (interned) ---------'

    ``pos`` starts just past ``M`` and moves past one name per step. ``u16_at[x]``, ``u32_at[x]``
    and ``records[x]`` are stride-1 views of the padded buffer: element ``x`` is the value that
    starts at byte ``x``, so an unaligned read is an index, and a read past the end lands in the
    zero padding (and fails the length checks) instead of raising.
    """
    n = len(start)
    # Padding: reads past the end land in zeros. Unaligned views read a u16/u32/reading at any byte.
    padded = zero_padded(data, _RECORD.itemsize)
    last = len(data)
    u16_at = np.ndarray((last + 1,), dtype="<u2", buffer=padded, strides=(1,))
    u32_at = np.ndarray((last + 1,), dtype="<u4", buffer=padded, strides=(1,))
    end = start + length
    ok = length >= _MIN_VALUE
    ok &= padded[np.minimum(start, last)] == VERSION
    pos = start + 4 + u16_at[np.minimum(start + 1, last)]  # just past the name count
    ok &= pos <= end
    name_count = np.where(ok, padded[np.minimum(pos - 1, last)], 0)
    for j in range(int(name_count.max()) if n else 0):  # name lengths are sequential: one step per name
        pos = np.where(j < name_count, pos + 1 + padded[np.minimum(pos, last)], pos)
    count = u32_at[np.minimum(pos, last)].astype(np.int64)
    ok &= (pos + 4 <= end) & (end - pos - 4 == count * _RECORD.itemsize)
    good = np.flatnonzero(ok)
    codes, distinct = intern_slices(data, start[good], pos[good] - start[good])
    # Each distinct header is parsed once by the strict decoder; values with a bad one are bad.
    valid, sites, header_names = _header_tables(distinct)
    keep_value = valid[codes]
    good, codes = good[keep_value], codes[keep_value]
    counts = count[good]
    body = np.repeat(pos[good] + 4, counts)
    if len(body):
        first = np.cumsum(counts) - counts
        body += (np.arange(len(body)) - np.repeat(first, counts)) * _RECORD.itemsize
    # Each field of the 18-byte rows read straight from its byte offset (unaligned views):
    # cheaper than gathering whole structured rows and then copying their fields out.
    header = np.repeat(codes, counts)
    record = np.repeat(good, counts)
    local = padded[body + _METRIC_AT].astype(np.int64)
    widths = np.array([len(names) for names in header_names] or [0], dtype=np.int64)
    keep = local < widths[header]
    if not keep.all():  # a metric index beyond its name table: the whole value is bad
        keep = ~np.isin(record, np.unique(record[~keep]))
        body, record, header, local = body[keep], record[keep], header[keep], local[keep]
    width = max(int(widths.max()), 1)
    decoded = np.zeros(n, dtype=bool)
    decoded[record] = True
    decoded[good[counts == 0]] = True  # an empty value of a good header decodes to nothing
    name_code = header * width + local
    return WireBatch(
        record=record,
        site=Categorical(header, sites),
        metric=Categorical(name_code, _name_table(header_names, width)),
        ts_ns=np.ndarray((last + 1,), dtype="<i8", buffer=padded, strides=(1,))[body],
        value=np.ndarray((last + 1,), dtype="<f8", buffer=padded, offset=_VALUE_AT, strides=(1,))[body],
        flags=padded[body + _FLAGS_AT],
        bad=np.flatnonzero(~decoded).tolist(),
        header=header,
        name_code=name_code,
    )
