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
    "WireError",
    "WireRecord",
    "decode_value",
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
