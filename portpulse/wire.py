"""The compact Kafka value encoding of readings (pure; version 1).

One Kafka record carries the readings of one sensor from one MQTT message; the record key is
the sensor_id, the topic ``portpulse.readings.{domain}`` gives the domain, and the header
``pp-v`` the encoding version (``b"1"``). Value layout, little-endian::

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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "VERSION",
    "VERSION_HEADER",
    "WireBatch",
    "WireError",
    "WireRecord",
    "decode_value",
    "decode_values",
    "encode_single",
    "encode_value",
]

VERSION = 1
VERSION_HEADER = ("pp-v", b"1")
_RECORD = np.dtype([("ts_ns", "<i8"), ("value", "<f8"), ("metric", "u1"), ("flags", "u1")])
_RECORD_STRUCT = struct.Struct("<qdBB")
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
    return b"".join((_header(site, tuple(metrics)), struct.pack("<I", n), body))


_SINGLE_STRUCT = struct.Struct("<IqdBB")  # count 1, then one reading


def encode_single(site: str, metric: str, ts_ns: int, value: float, flags: int = 0) -> bytes:
    """:func:`encode_value` for exactly one reading (same bytes, a fraction of the cost)."""
    return _header(site, (metric,)) + _SINGLE_STRUCT.pack(1, ts_ns, value, 0, flags)


@functools.lru_cache(maxsize=65_536)
def _header(site: str, metrics: tuple[str, ...]) -> bytes:
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
    the value each reading came from), ``site`` and ``metric`` (object arrays of str), ``ts_ns``,
    ``value``, ``flags``; ``bad``: indices of the values that did not decode."""

    record: npt.NDArray[np.int64]
    site: npt.NDArray[np.object_]
    metric: npt.NDArray[np.object_]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    flags: npt.NDArray[np.uint8]
    bad: list[int]

    def __len__(self) -> int:
        return len(self.ts_ns)


def decode_values(values: Sequence[bytes]) -> WireBatch:
    """Decode many values at once (a Kafka fetch): the per-value work is a header lookup in a
    cache of the distinct headers seen (site + metric names) and one slice; every reading body is
    decoded by a single ``np.frombuffer`` over all of them. Malformed values are listed in ``bad``."""
    headers: dict[bytes, int] = {}  # header bytes (up to the reading count) -> header id
    header_site: list[str] = []
    header_names: list[tuple[str, ...]] = []
    bodies: list[bytes] = []
    counts: list[int] = []
    record_of: list[int] = []
    header_of: list[int] = []
    bad: list[int] = []
    size = _RECORD.itemsize
    header_lengths: list[int] = []  # of the validated headers, most recent first
    for i, data in enumerate(values):
        # Fast path: a value that starts with a header already validated in this fetch (headers
        # are self-delimiting, so a known prefix ends exactly where a parse would) and whose
        # count matches its length skips the header parse.
        hid = None
        for length in header_lengths:
            hid = headers.get(data[:length])
            if hid is not None:
                n = int.from_bytes(data[length : length + 4], "little")
                if len(data) - length - 4 == n * size:
                    bodies.append(data[length + 4 :])
                    counts.append(n)
                    record_of.append(i)
                    header_of.append(hid)
                    break
                hid = None
        if hid is not None:
            continue
        try:
            if data[0] != VERSION:
                raise WireError("version")
            pos = 4 + data[1] + (data[2] << 8)
            for _ in range(data[pos - 1]):
                pos += 1 + data[pos]
            key = data[:pos]
            n = int.from_bytes(data[pos : pos + 4], "little")
            if len(data) - pos - 4 != n * size or pos + 4 > len(data):
                raise WireError("length")
            hid = headers.get(key)
            if hid is None:
                head = decode_value(key + b"\0\0\0\0")  # validates the site and the names
                hid = headers[key] = len(header_site)
                header_site.append(head.site)
                header_names.append(head.metrics)
                if len(key) not in header_lengths and len(header_lengths) < 4:
                    header_lengths.insert(0, len(key))
        except (IndexError, WireError):
            bad.append(i)
            continue
        bodies.append(data[pos + 4 :])
        counts.append(n)
        record_of.append(i)
        header_of.append(hid)
    records = np.frombuffer(b"".join(bodies), dtype=_RECORD)
    header = np.repeat(np.array(header_of, dtype=np.int64), counts)
    record = np.repeat(np.array(record_of, dtype=np.int64), counts)
    local = records["metric"].astype(np.int64)
    widths = np.array([len(names) for names in header_names] or [0], dtype=np.int64)
    keep = local < widths[header]
    if not keep.all():  # a metric index beyond its name table: the whole value is bad
        broken = np.unique(record[~keep])
        keep = ~np.isin(record, broken)
        bad = sorted(bad + broken.tolist())
    table = np.empty((len(widths), max(int(widths.max()), 1)), dtype=object)
    for h, names in enumerate(header_names):
        table[h, : len(names)] = names
    sites = np.empty(len(widths), dtype=object)
    sites[: len(header_site)] = header_site
    header, local = header[keep], local[keep]
    return WireBatch(
        record=record[keep],
        site=sites[header],
        metric=table[header, local],
        ts_ns=records["ts_ns"][keep],
        value=records["value"][keep],
        flags=records["flags"][keep],
        bad=bad,
    )
