"""Points for the sink, as columns: what processors hand to a :class:`PointSink` (the contract)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Categorical", "MemoryPointSink", "PointColumns", "PointSink", "WriteReceipt"]


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


class _Done:
    def done(self) -> bool:
        return True

    async def wait(self) -> None:
        return None


class MemoryPointSink:
    """A :class:`PointSink` that keeps what it is given (for tools and tests of the processor logic)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, PointColumns]] = []

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        self.writes.append((source, points))
        return _Done()

    async def flush(self) -> None:
        return None
