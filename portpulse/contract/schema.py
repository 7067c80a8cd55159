"""The reading schema: one reading is (sensor_id, site, domain, metric, ts_ns, value, flags).

Stages pass readings as :class:`ReadingColumns`, parallel numpy arrays of equal length ``n``,
so cleaning, windowing and encoding work on whole batches at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FLAG_TS_FROM_RECEIVE",
    "Coded",
    "Reading",
    "ReadingColumns",
    "str_array",
]

#: The payload had no timestamp; ``ts_ns`` is the bridge's receive time.
FLAG_TS_FROM_RECEIVE = np.uint8(1)

StrArray = npt.NDArray[np.object_]


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one metric of one sensor at one instant (``ts_ns``: ns since the Unix epoch, UTC)."""

    sensor_id: str
    site: str
    domain: str
    metric: str
    ts_ns: int
    value: float
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Coded:
    """A string column kept dictionary-encoded: ``names[codes]``, made when first read. A decoder
    that has the codes at hand (the bridge's, for line protocol) spares the per-value gathers of
    string objects for batches whose names nobody reads as strings."""

    codes: npt.NDArray[np.int64]  #: int64 ``(n,)``, indexes into ``names``
    names: StrArray  #: the distinct strings

    def __len__(self) -> int:
        return len(self.codes)


class ReadingColumns:
    """A batch of readings as columns, all of shape ``(n,)``.

    ``sensor_id``, ``site``, ``domain``, ``metric``: object arrays of ``str`` (each given as one,
    or as :class:`Coded` and made on first read); ``ts_ns``: int64 ns since the Unix epoch (UTC);
    ``value``: float64 in the metric's canonical unit; ``flags``: uint8 bit set (see ``FLAG_*``).
    """

    __slots__ = ("_strings", "flags", "ts_ns", "value")

    def __init__(
        self,
        sensor_id: StrArray | Coded,
        site: StrArray | Coded,
        domain: StrArray | Coded,
        metric: StrArray | Coded,
        ts_ns: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        flags: npt.NDArray[np.uint8],
    ) -> None:
        self._strings = [sensor_id, site, domain, metric]
        self.ts_ns, self.value, self.flags = ts_ns, value, flags
        n = len(ts_ns)
        for name, column in zip(("sensor_id", "site", "domain", "metric", "value", "flags"),
                                (*self._strings, value, flags), strict=True):  # fmt: skip
            if len(column) != n:
                raise ValueError(f"column {name} has length {len(column)}, expected {n}")

    def _string(self, k: int) -> StrArray:
        column = self._strings[k]
        if isinstance(column, Coded):
            column = self._strings[k] = column.names[column.codes]
        return column

    @property
    def sensor_id(self) -> StrArray:
        return self._string(0)

    @property
    def site(self) -> StrArray:
        return self._string(1)

    @property
    def domain(self) -> StrArray:
        return self._string(2)

    @property
    def metric(self) -> StrArray:
        return self._string(3)

    def __len__(self) -> int:
        return len(self.ts_ns)

    @classmethod
    def empty(cls) -> ReadingColumns:
        return cls.from_readings(())

    @classmethod
    def from_readings(cls, readings: Iterable[Reading]) -> ReadingColumns:
        rows = list(readings)
        return cls(
            sensor_id=str_array([r.sensor_id for r in rows]),
            site=str_array([r.site for r in rows]),
            domain=str_array([r.domain for r in rows]),
            metric=str_array([r.metric for r in rows]),
            ts_ns=np.fromiter((r.ts_ns for r in rows), dtype=np.int64, count=len(rows)),
            value=np.fromiter((r.value for r in rows), dtype=np.float64, count=len(rows)),
            flags=np.fromiter((r.flags for r in rows), dtype=np.uint8, count=len(rows)),
        )

    @classmethod
    def concat(cls, parts: Sequence[ReadingColumns]) -> ReadingColumns:
        if not parts:
            return cls.empty()
        return cls(
            sensor_id=np.concatenate([p.sensor_id for p in parts]),
            site=np.concatenate([p.site for p in parts]),
            domain=np.concatenate([p.domain for p in parts]),
            metric=np.concatenate([p.metric for p in parts]),
            ts_ns=np.concatenate([p.ts_ns for p in parts]),
            value=np.concatenate([p.value for p in parts]),
            flags=np.concatenate([p.flags for p in parts]),
        )

    def take(self, index: npt.NDArray[Any]) -> ReadingColumns:
        """Rows selected by an integer index or boolean mask of shape ``(n,)`` (coded columns stay coded)."""
        sensor_id, site, domain, metric = (
            Coded(c.codes[index], c.names) if isinstance(c, Coded) else c[index] for c in self._strings
        )
        return ReadingColumns(
            sensor_id=sensor_id,
            site=site,
            domain=domain,
            metric=metric,
            ts_ns=self.ts_ns[index],
            value=self.value[index],
            flags=self.flags[index],
        )

    def rows(self) -> list[Reading]:
        return [
            Reading(str(s), str(si), str(d), str(m), int(t), float(v), int(f))
            for s, si, d, m, t, v, f in zip(
                self.sensor_id, self.site, self.domain, self.metric, self.ts_ns, self.value, self.flags, strict=True
            )
        ]


def str_array(values: Sequence[str]) -> StrArray:
    """A 1-d object array of ``values`` (``np.array`` would make a fixed-width unicode array)."""
    out: StrArray = np.fromiter(values, dtype=object, count=len(values))
    return out
