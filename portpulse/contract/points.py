"""Points for the sink, as columns: what processors hand to a :class:`PointSink` (the contract)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "Categorical", "ForwardingStore", "MemoryPointSink", "PointColumns", "PointSink", "PointStore",
    "RewritableStore", "SeriesRange", "StoredReadings", "WriteReceipt",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Categorical:
    """A dictionary-encoded string column: row i is ``categories[codes[i]]``.

    ``codes``: int64 ``(n,)`` in ``[0, k)``; ``categories``: object array of str ``(k,)``. Stages that
    already grouped rows (the processors) pass tags this way and skip re-hashing every row.
    """

    codes: npt.NDArray[np.int64]
    categories: npt.NDArray[np.object_]

    def __len__(self) -> int:
        return len(self.codes)

    def take(self, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> Categorical:
        """The rows at ``rows`` (indices or a mask): their codes move, the strings stay."""
        return Categorical(self.codes[rows], self.categories)

    def values(self) -> npt.NDArray[np.object_]:
        """Every row's string, as an object array ``(n,)``."""
        out: npt.NDArray[np.object_] = self.categories[self.codes]
        return out

    def tolist(self) -> list[Any]:
        """Every row's string."""
        return list(self.values().tolist())


@dataclass(frozen=True, slots=True)
class PointColumns:
    """Points as columns, all of shape ``(n,)``.

    ``measurement``: object array of str, or one str for all rows; ``tags``: tag key -> object
    array of str or :class:`Categorical` (an empty value omits the tag on that row); ``fields``: field key -> float64
    array (NaN omits the field on that row) or object array of str (a string field; None omits);
    ``ts_ns``: int64 ns since the Unix epoch.
    """

    measurement: npt.NDArray[np.object_] | str
    tags: Mapping[str, npt.NDArray[np.object_] | Categorical]
    fields: Mapping[str, npt.NDArray[np.float64] | npt.NDArray[np.object_]]
    ts_ns: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.ts_ns)


class WriteReceipt(Protocol):
    """Completes when every point of one write is stored (or dead-lettered with its reason)."""

    def done(self) -> bool: ...

    async def wait(self) -> None: ...


class PointSink(Protocol):
    """Where processors send raw points and window aggregates (``sinks.InfluxWriter`` implements it).

    ``write`` may wait while the sink is saturated (backpressure) and returns a receipt; the
    processor commits Kafka offsets only after the receipts of their points are done.
    """

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SeriesRange:
    """Stored readings to read back: of ``sensor_ids`` and ``metrics`` in ``domain``, with time in
    ``[start_ns, stop_ns)``: raw points of measurement ``{domain}`` and rejected readings of
    ``{domain}_rejected`` (field ``{metric}_reason``)."""

    domain: str
    sensor_ids: tuple[str, ...]
    metrics: tuple[str, ...]
    start_ns: int
    stop_ns: int


@dataclass(frozen=True, slots=True)
class StoredReadings:
    """What a store holds for one :class:`SeriesRange`, as columns ``(n,)``: object arrays
    ``sensor_id`` and ``metric``, int64 ``ts_ns``, float64 ``value`` (NaN for rejected readings
    without a finite value), bool ``accepted`` (False: a rejected reading) and object ``reason``
    (why it was rejected; "" when accepted). One row per (sensor, metric, time, accepted)."""

    domain: str
    sensor_id: npt.NDArray[np.object_]
    metric: npt.NDArray[np.object_]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    accepted: npt.NDArray[np.bool_]
    reason: npt.NDArray[np.object_]

    def __len__(self) -> int:
        return len(self.ts_ns)

    @staticmethod
    def of(domain: str, rows: list[tuple[str, str, int, float, str]]) -> StoredReadings:
        """From rows (sensor_id, metric, ts_ns, value, reason: "" when accepted)."""
        cols = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
        reason = np.array(cols[4], dtype=object)
        return StoredReadings(
            domain,
            np.array(cols[0], dtype=object),
            np.array(cols[1], dtype=object),
            np.array(cols[2], dtype=np.int64),
            np.array(cols[3], dtype=np.float64),
            reason == "",
            reason,
        )

    @staticmethod
    def concat(domain: str, parts: list[StoredReadings]) -> StoredReadings:
        """The rows of ``parts`` (of one domain) one after the other."""
        if len(parts) <= 1:
            return parts[0] if parts else StoredReadings.of(domain, [])

        def joined(column: str) -> Any:
            return np.concatenate([getattr(part, column) for part in parts])

        return StoredReadings(domain, joined("sensor_id"), joined("metric"), joined("ts_ns"), joined("value"),
                              joined("accepted"), joined("reason"))  # fmt: skip


class PointStore(PointSink, Protocol):
    """A sink that can also read back what it stored (the processor recomputes windows from it)
    and take a raw value out again (a reading rejected when judged again)."""

    async def read(self, query: SeriesRange) -> StoredReadings: ...

    async def retract(self, domain: str, metric: str, instants: list[tuple[str, int]]) -> None:
        """Remove field ``metric`` of measurement ``domain`` at each (sensor_id, ts_ns), keeping
        the point's other fields; after everything written before it is stored."""
        ...


class RewritableStore(PointStore, Protocol):
    """A point store whose stored range can be cleared, for a rewrite (``portpulse reprocess``)."""

    async def delete_range(self, measurement: str, start_ns: int, stop_ns: int) -> None:
        """Delete every point of ``measurement`` in ``[start_ns, stop_ns)``, after everything
        written before it is stored."""
        ...


class ForwardingStore:
    """A :class:`PointStore` that hands everything to ``inner``: subclasses change what they need."""

    def __init__(self, inner: PointStore) -> None:
        self._inner = inner

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        return await self._inner.write(points, source)

    async def flush(self) -> None:
        await self._inner.flush()

    async def read(self, query: SeriesRange) -> StoredReadings:
        return await self._inner.read(query)

    async def retract(self, domain: str, metric: str, instants: list[tuple[str, int]]) -> None:
        await self._inner.retract(domain, metric, instants)


class _Done:
    def done(self) -> bool:
        return True

    async def wait(self) -> None:
        return None


class MemoryPointSink:
    """A :class:`PointStore` that keeps what it is given (for tools and tests of the processor
    logic); reads answer like InfluxDB would: one value per (measurement, tags, field, time), the
    last written."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, PointColumns]] = []
        self._stored: dict[tuple[str, str, str, int], float | str] = {}
        self._indexed = 0

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        self.writes.append((source, points))
        return _Done()

    async def flush(self) -> None:
        return None

    async def retract(self, domain: str, metric: str, instants: list[tuple[str, int]]) -> None:
        self.stored()
        for sensor, ts in instants:
            self._stored.pop((domain, sensor, metric, ts), None)

    async def delete_range(self, measurement: str, start_ns: int, stop_ns: int) -> None:
        self.stored()
        for key in [k for k in self._stored if k[0] == measurement and start_ns <= k[3] < stop_ns]:
            del self._stored[key]

    def stored(self) -> dict[tuple[str, str, str, int], float | str]:
        """Everything stored: (measurement, sensor_id, field, ts_ns) -> the last value written."""
        for _, points in self.writes[self._indexed :]:
            sensors = _strings(points.tags["sensor_id"])
            measurements = (
                [points.measurement] * len(points) if isinstance(points.measurement, str) else points.measurement
            )
            for name, column in points.fields.items():
                for m, sensor, ts, v in zip(measurements, sensors, points.ts_ns.tolist(), column.tolist(), strict=True):
                    if v is not None and not (isinstance(v, float) and v != v):
                        self._stored[(str(m), str(sensor), name, int(ts))] = v
        self._indexed = len(self.writes)
        return self._stored

    async def read(self, query: SeriesRange) -> StoredReadings:
        self.stored()
        sensors_wanted, metrics_wanted = set(query.sensor_ids), set(query.metrics)
        rows: list[tuple[str, str, int, float, str]] = []
        rejected = f"{query.domain}_rejected"
        for (m, sensor, name, ts), v in self._stored.items():
            if sensor not in sensors_wanted or not query.start_ns <= ts < query.stop_ns:
                continue
            if m == query.domain and name in metrics_wanted:
                rows.append((sensor, name, ts, float(v), ""))
            elif (
                m == rejected and name.endswith("_reason") and name[: -len("_reason")] in metrics_wanted
                and v != "reinstated"
            ):  # fmt: skip
                metric = name[: -len("_reason")]
                value = self._stored.get((m, sensor, metric, ts), float("nan"))
                rows.append((sensor, metric, ts, float(value), str(v)))
        return StoredReadings.of(query.domain, rows)


def _strings(column: npt.NDArray[np.object_] | Categorical) -> list[str]:
    if isinstance(column, Categorical):
        return [str(x) for x in column.categories[column.codes].tolist()]
    return [str(x) for x in column.tolist()]
