"""The processor's state machine: cleaning, windows per series, corrections, safe commit offsets.

No I/O and no clock: the Kafka loop passes decoded readings and the current time in, and gets
points for the sink, windows to recompute from the store, readings beyond the correction horizon
and per-partition commit positions out.

Event time is kept per series (one sensor's metric), never per partition: a series' windows close
when its own newest reading is ``allowed_lateness`` past their end, or when it has been quiet for
``idle_timeout_s`` (processing time) and its partition has nothing more to read. A sensor whose
clock runs ahead, or a gateway that delivers a backlog, moves only its own windows.

A reading for a window that was already emitted is a correction: the window is listed in
:attr:`EngineOutput.recompute`, the loop makes sure the window's raw points are stored, reads them
back and :meth:`ProcessorEngine.recomputed` turns them into the corrected aggregate (the same
series and timestamp, so the store overwrites the old point). A series that resumes inside
windows it closed on the idle timeout (its own event time has not passed them) opens them again
instead: they take its readings in memory and are recomputed from the store once, when they
close again, rather than read back at every step while it reports. The raw points are the truth; a
window aggregated in memory equals the same computation over them, because the engine holds every
reading of a window until it closes (exact p95) and the store keeps one point per series and time
like :func:`processors.window.aggregate` does.

Restarts and hand-overs: each partition commits the earliest offset a replay needs to rebuild its
open windows and cleaning history, with metadata (offset consumed until, and per window spec the
latest window end any of its series had closed). After a restart, a replayed reading whose window
its series had certainly closed before (the series' replayed event time is past it) is skipped;
a window that may have been emitted before (it starts before that latest closed end) is
recomputed from the store when it closes instead of from memory, which is exact either way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from portpulse.arrays import KeyIndex, code_groups, distinct_codes, factorise_column, group_starts, pair_lines
from portpulse.contract.catalogue import Catalogue, MetricSpec
from portpulse.contract.points import Categorical, PointColumns, SeriesRange, StoredReadings
from portpulse.contract.schema import str_array
from portpulse.processors.clean import (
    NO_OFFSET,
    OK,
    RATE,
    REASON_NAMES,
    REINSTATED,
    REPEAT,
    SPIKE,
    History,
    clean,
    series_time_order,
)  # fmt: skip
from portpulse.processors.window import (
    Aggregates,
    ClosedBuckets,
    ClosedRows,
    OpenWindows,
    WindowSpec,
    aggregate,
    assign,
    concat_rows,
)  # fmt: skip

__all__ = [
    "Deferred",
    "EngineOutput",
    "EngineSettings",
    "KeyCodes",
    "LateReading",
    "PartitionPosition",
    "ProcessorEngine",
    "Readings",
    "Recompute",
]

_NEG = np.iinfo(np.int64).min
_POS = np.iinfo(np.int64).max
_K = TypeVar("_K", bound=Hashable)
#: a series' lo, hi, max rate (per s) and spike floor, in its base metric's unit
_SeriesLimits = tuple[float, float, float, float]
#: (domain, metric as sent) pairs whose kind is cached; the cache starts over beyond this
_MAX_KINDS = 100_000


class _MetricKind(NamedTuple):
    """How readings of one metric name as sent, in one domain, are kept."""

    base: str  #: the series' metric: the name, or the catalogue's name when it carries a unit suffix
    factor: float  #: multiplies a value into the base metric's unit
    limits: _SeriesLimits


_Limits = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Windows; allowed lateness (ns of a series' own event time); idle timeout (s, processing
    time); the Hampel window (readings) and threshold; the correction horizon (ns: readings
    older than this behind the wall clock go to the late topic instead of correcting windows)."""

    windows: tuple[WindowSpec, ...]
    allowed_lateness_ns: int = 10 * 10**9
    idle_timeout_s: float = 30.0
    hampel_window: int = 7
    k_sigma: float = 4.0
    horizon_ns: int = 7 * 86_400 * 10**9
    # Readings kept per series beyond the Hampel window: a reading up to this many places out of
    # order is judged in memory; further back, against the store.
    reorder_slack: int = 8
    # A series without readings for this long (processing time, s) and no open window is
    # forgotten, so state follows the sensors that report, not every sensor ever seen.
    series_ttl_s: float = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class _NamesAt:
    """The rows ``rows`` ``(n,)`` of a column of strings, not gathered yet. A step reorders its
    readings once, then reads the names of a few of them at most (deferred readings): the name
    columns keep one shared index instead of a gather each (see :meth:`Readings.reordered`)."""

    column: npt.NDArray[np.object_] | Categorical
    rows: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> _NamesAt:
        return _NamesAt(self.column, self.rows[rows])

    def values(self) -> npt.NDArray[np.object_]:
        """Every row's string, as an object array ``(n,)``."""
        return _names_array(_take(self.column, self.rows))

    def tolist(self) -> list[Any]:
        return list(self.values().tolist())


#: a column of strings: an object array, dictionary-encoded, or rows of either not gathered yet
Names = npt.NDArray[np.object_] | Categorical | _NamesAt


@dataclass(frozen=True, slots=True)
class Readings:
    """Decoded Kafka records as columns ``(n,)``: strings ``domain``, ``sensor_id``, ``site``,
    ``metric`` (object arrays, or dictionary-encoded: taking rows then moves codes, not objects);
    int64 ``ts_ns``; float64 ``value``; int64 ``partition`` (the loop's id for a topic partition)
    and ``offset`` (the Kafka offset of the record that carried the reading)."""

    domain: Names
    sensor_id: Names
    site: Names
    metric: Names
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    partition: npt.NDArray[np.int64]
    offset: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.ts_ns)

    def take(self, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> Readings:
        """The readings at ``rows`` (indices or a mask)."""
        shared: dict[int, _NamesAt] = {}  # name columns reordered together stay together: one gather

        def one(column: Any) -> Any:
            if not isinstance(column, _NamesAt):
                return _take(column, rows)
            found = shared.get(id(column.rows))
            if found is None:
                found = shared[id(column.rows)] = column.take(rows)
            return _NamesAt(column.column, found.rows)

        return Readings(*(one(getattr(self, f)) for f in Readings.__dataclass_fields__))

    def reordered(self, order: npt.NDArray[np.int64]) -> Readings:
        """The readings in ``order`` (indices): the numbers gathered, the four name columns left
        where they are behind one shared index (:class:`_NamesAt`) until a name is read."""
        shared: dict[int, npt.NDArray[np.int64]] = {}

        def name(column: Names) -> _NamesAt:
            if not isinstance(column, _NamesAt):
                return _NamesAt(column, order)
            rows = shared.get(id(column.rows))
            if rows is None:
                rows = shared[id(column.rows)] = column.rows[order]
            return _NamesAt(column.column, rows)

        return Readings(name(self.domain), name(self.sensor_id), name(self.site), name(self.metric),
                        self.ts_ns[order], self.value[order], self.partition[order], self.offset[order])  # fmt: skip

    @staticmethod
    def empty() -> Readings:
        e = np.empty(0, dtype=object)
        i = np.empty(0, dtype=np.int64)
        return Readings(e, e, e, e, i, np.empty(0, dtype=np.float64), i, i)


def _take(column: Any, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> Any:
    return column.take(rows) if isinstance(column, Categorical | _NamesAt) else column[rows]


def _names_at(column: Names, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_] | None = None) -> list[str]:
    """The strings of ``column`` at ``rows`` (all when None)."""
    picked = column if rows is None else _take(column, rows)
    return list(picked.tolist())


def _names_array(column: Names) -> npt.NDArray[np.object_]:
    """``column`` as an object array ``(n,)``."""
    return column.values() if isinstance(column, Categorical | _NamesAt) else column


class KeyCodes(NamedTuple):
    """Labels of the readings' series keys, int64 ``(n,)`` each: readings with equal ``source``
    have equal (domain, sensor_id, site), readings with equal ``metric`` the same metric name.
    Unequal labels may still name equal keys. A decoder knows them cheaply (a Kafka key, a
    value's header); :meth:`of` computes them from the columns."""

    source: npt.NDArray[np.int64]
    metric: npt.NDArray[np.int64]

    def take(self, rows: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> KeyCodes:
        return KeyCodes(self.source[rows], self.metric[rows])

    @staticmethod
    def of(r: Readings) -> KeyCodes:
        domain, _ = factorise_column(_names_array(r.domain))
        sensor, sensors = factorise_column(_names_array(r.sensor_id))
        site, sites = factorise_column(_names_array(r.site))
        return KeyCodes(
            (domain * len(sensors) + sensor) * len(sites) + site, factorise_column(_names_array(r.metric))[0]
        )


_Windows = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]


@dataclass(frozen=True, slots=True)
class Recompute:
    """Windows to recompute, as columns ``(m,)`` of int64: window spec index, series id, window
    start (ns) and ``upto`` (ns); distinct windows, sorted. A window's readings at or before
    ``upto`` are read from the store, the later ones are in ``held`` (rows of windows opened again
    when their series resumed, which memory holds from then on); ``upto`` is at or past the end of
    a window read from the store whole."""

    spec: npt.NDArray[np.int64]
    series: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    upto: npt.NDArray[np.int64]
    held: ClosedRows | None = None

    def __len__(self) -> int:
        return len(self.spec)

    @staticmethod
    def of(parts: list[_Windows], held: list[ClosedRows] | None = None) -> Recompute:
        """Windows ``(spec, series, start, upto)`` from ``parts``; a window named twice keeps the
        latest ``upto`` (more of it from the store: exact whatever memory holds)."""
        kept = concat_rows([h for h in held or [] if len(h.spec)])
        if not parts:
            e = np.empty(0, dtype=np.int64)
            return Recompute(e, e, e, e, kept)
        stacked = np.unique(np.stack([np.concatenate(c) for c in zip(*parts, strict=True)]), axis=1)
        last = np.ones(stacked.shape[1], dtype=bool)
        last[:-1] = np.any(stacked[:3, 1:] != stacked[:3, :-1], axis=0)
        return Recompute(stacked[0, last], stacked[1, last], stacked[2, last], stacked[3, last], kept)


@dataclass(frozen=True, slots=True)
class Deferred:
    """Readings set aside for judging against their neighbours in the store: the readings, their
    series ids and their values in the catalogue's unit (all ``(m,)``)."""

    readings: Readings
    series: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]


class PartitionPosition(NamedTuple):
    """What a commit of one partition records (see :meth:`ProcessorEngine.safe_offsets`)."""

    commit: int  # the offset to commit: the earliest record a replay needs
    consumed_until: int  # one past the last record consumed (commit metadata "next")
    closed: tuple[int, ...]  # per window spec, the latest window end any series closed (ns)


class LateReading(NamedTuple):
    """A reading older than the correction horizon, for the late topic."""

    partition: int
    domain: str
    sensor_id: str
    metric: str
    ts_ns: int
    value: float
    lateness_ns: int  # how far before the horizon it is


@dataclass(slots=True)
class EngineOutput:
    points: list[tuple[str, PointColumns]] = field(default_factory=list)  # (kind "raw"/"rejected"/window name, points)
    late: list[LateReading] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    repeated: int = 0  # readings delivered again (same series, time and value): dropped
    windows_emitted: int = 0
    corrections: int = 0  # (reading, window) pairs behind an emitted window
    replayed: int = 0
    recompute: Recompute = field(default_factory=lambda: Recompute.of([]))
    deferred: Deferred | None = None  # to judge against the store: see ProcessorEngine.ingest_deferred
    rejudged: int = 0  # readings whose verdict changed when a reading before them arrived
    # Raw points to take out of the store (series ids, ts_ns): readings rejected on re-judging.
    retract: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = field(default_factory=list)

    def absorb(self, other: EngineOutput) -> None:
        """Add ``other``'s points, counts and windows to recompute to this output (not its deferred)."""
        self.points += other.points
        self.late += other.late
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.repeated += other.repeated
        self.windows_emitted += other.windows_emitted
        self.corrections += other.corrections
        self.replayed += other.replayed
        self.rejudged += other.rejudged
        self.retract += other.retract
        if len(other.recompute):
            theirs = other.recompute
            self.add_recompute([(theirs.spec, theirs.series, theirs.start, theirs.upto)], theirs.held)

    def add_recompute(self, windows: list[_Windows], held: ClosedRows | None = None) -> None:
        """Add windows ``(spec, series, start, upto)`` (and the rows memory holds of them) to
        those to recompute (see :class:`Recompute`)."""
        mine = self.recompute
        parts = [(mine.spec, mine.series, mine.start, mine.upto)] if len(mine) else []
        self.recompute = Recompute.of([*parts, *windows], [h for h in (mine.held, held) if h is not None])


@dataclass(slots=True)
class _Partition:
    next_offset: int = -1  # one past the highest offset consumed
    consumed_until: int = -1  # offsets below this were consumed before a restart
    closed_before: tuple[int, ...] = ()  # per spec: the latest window end any series had closed then


class ProcessorEngine:
    """Clean, window per series and track safe offsets for the partitions this processor owns."""

    def __init__(self, settings: EngineSettings, catalogue: Catalogue) -> None:
        self._s = settings
        self._catalogue = catalogue
        self._series: dict[tuple[str, str, str], int] = {}
        self._kinds: dict[tuple[str, str], _MetricKind] = {}
        self._series_domain: list[str] = []
        self._series_sensor: list[str] = []
        self._series_site: list[str] = []
        self._series_metric: list[str] = []
        # Each series' metric as a code into _metric_names, as an array (extended in _metrics_of).
        self._metric_codes: dict[str, int] = {}
        self._metric_names: list[str] = []
        self._series_metric_array = np.empty(0, dtype=np.int64)
        self._lo: list[float] = []
        self._hi: list[float] = []
        self._rate: list[float] = []
        self._floor: list[float] = []
        self._limit_arrays: _Limits | None = None
        # Each (domain, sensor, site, metric as sent) is resolved once to its series id and unit
        # factor. Sources (domain, sensor, site) and metric names get ids; the resolved keys
        # (source id << 32 | metric id) are kept sorted, so a step finds its readings' series with
        # one searchsorted, and Python runs per distinct source only.
        self._source_ids: dict[tuple[str, str, str], int] = {}
        self._metric_ids: dict[str, int] = {}
        self._fresh_ids = itertools.count()
        self._resolved = KeyIndex()  # (source id << 32 | metric id) -> row of the two below
        self._resolved_series = np.empty(0, dtype=np.int64)
        self._resolved_factor = np.empty(0, dtype=np.float64)
        # Stored points: one per (domain, sensor, site) and instant, holding every metric of that
        # sensor as a field. The point of each series, and how many live series each point has.
        self._points: dict[tuple[str, str, str], int] = {}
        self._point_key: list[tuple[str, str, str]] = []
        self._point_users: list[int] = []
        self._free_points: list[int] = []
        self._domain_codes: dict[str, int] = {}
        self._series_point: list[int] = []
        self._series_point_array = np.empty(0, dtype=np.int64)
        self._point_domain_array = np.empty(0, dtype=np.int64)
        self._point_sensor_array = np.empty(0, dtype=object)
        self._point_site_array = np.empty(0, dtype=object)
        self._history = History.empty(0, settings.hampel_window + settings.reorder_slack)
        # Per series: the partition that last carried it (a revoked partition's series forget
        # their state), its newest event time, the newest event time of its readings replayed
        # from before a restart, and when (processing time, s) its last reading arrived.
        self._series_part = np.full(0, -1, dtype=np.int64)
        self._max_ts = np.full(0, _NEG, dtype=np.int64)
        self._replayed_ts = np.full(0, _NEG, dtype=np.int64)
        self._arrival = np.full(0, -np.inf)
        # Series whose event time moved since the last close: only they and idle ones close more.
        self._advanced: list[npt.NDArray[np.int64]] = []
        # Idle series whose windows the idle timeout has closed since their last reading: nothing
        # more closes for them until they report again, so an idle fleet is not re-examined at
        # every step.
        self._idle_closed = np.zeros(0, dtype=bool)
        # Per window spec and series: windows ending at or before this are closed (a reading for
        # one is a correction), and windows ending at or before this may have been emitted. They
        # differ for a series that resumed inside windows closed on the idle timeout: those open
        # again and are recomputed from the store when they close (see _add_to_windows).
        self._closed = np.full((len(settings.windows), 0), _NEG, dtype=np.int64)
        self._emitted = np.full((len(settings.windows), 0), _NEG, dtype=np.int64)
        # Per series: its newest event time when it last resumed inside such windows. The store
        # holds their readings up to it; memory holds all the later ones.
        self._resumed_after = np.full(0, _NEG, dtype=np.int64)
        self._parts: dict[int, _Partition] = {}
        self._open = OpenWindows()
        self._sizes = np.array([w.size_ns for w in settings.windows], dtype=np.int64)
        # Slots of evicted series, reused by new ones; when the last eviction pass ran (s).
        self._free: list[int] = []
        self._evicted_at = -np.inf

    # ------------------------------------------------------------ series registry

    def _kind(self, domain: str, metric: str) -> _MetricKind:
        """How readings of ``metric`` (as sent) in ``domain`` are kept (cached per pair)."""
        found = self._kinds.get((domain, metric))
        if found is not None:
            return found
        base, factor = metric, 1.0
        spec = self._catalogue.get(domain, metric)
        if spec is None and "_" in metric:
            # Unit normalisation: "no2_ppb" is no2 given in ppb when the catalogue converts ppb.
            name, _, unit = metric.rpartition("_")
            candidate = self._catalogue.get(domain, name)
            if candidate is not None and unit in candidate.convert:
                spec, base, factor = candidate, name, candidate.convert[unit]
        limits = (spec.min if spec else -np.inf, spec.max if spec else np.inf,
                  spec.max_rate_per_s if spec else np.inf, _spike_floor(spec))  # fmt: skip
        if len(self._kinds) >= _MAX_KINDS:  # names sent once each must not grow it without bound
            self._kinds.clear()
        found = self._kinds[(domain, metric)] = _MetricKind(base, factor, limits)
        return found

    def _register(
        self, domains: list[str], sensors: list[str], sites: list[str], metrics: list[str]
    ) -> tuple[list[int], list[float]]:
        """Series id and unit factor of each (domain, sensor, site, metric as sent); series not
        known yet are added (in bulk: a fleet's first steps bring tens of thousands)."""
        kinds = [self._kinds.get(pair) or self._kind(*pair) for pair in zip(domains, metrics, strict=True)]
        keys = [(domain, sensor, kind.base) for domain, sensor, kind in zip(domains, sensors, kinds, strict=True)]
        ids = [self._series.get(key, -1) for key in keys]
        appended: list[int] = []  # rows whose series take new slots at the end, in slot order
        start = len(self._series_domain)
        for row in [row for row, sid in enumerate(ids) if sid < 0]:
            key = keys[row]
            sid = self._series.get(key, -1)  # added by an earlier row: the same series in another unit
            if sid < 0:
                if self._free:
                    sid = self._free.pop()
                    self._reuse_slot(sid, key, sites[row], kinds[row].limits)
                else:
                    sid = start + len(appended)
                    appended.append(row)
                self._series[key] = sid
            ids[row] = sid
        if appended:
            self._append_series([domains[row] for row in appended], [sensors[row] for row in appended],
                                [sites[row] for row in appended], [keys[row][2] for row in appended],
                                [kinds[row].limits for row in appended])  # fmt: skip
        return ids, [kind.factor for kind in kinds]

    def _metric_code(self, base: str) -> int:
        code = self._metric_codes.get(base)
        if code is None:
            code = self._metric_codes[base] = len(self._metric_names)
            self._metric_names.append(base)
        return code

    def _reuse_slot(self, sid: int, key: tuple[str, str, str], site: str, limits: _SeriesLimits) -> None:
        """Series ``key`` of ``site`` in the slot ``sid`` an evicted series left (its arrays were reset then)."""
        domain, sensor, base = key
        point = self._point_of(domain, sensor, site)
        code = self._metric_code(base)
        self._series_domain[sid], self._series_sensor[sid], self._series_site[sid] = domain, sensor, site
        self._series_metric[sid], self._series_point[sid] = base, point
        if sid < len(self._series_metric_array):
            self._series_metric_array[sid] = code
        for column, limit in zip((self._lo, self._hi, self._rate, self._floor), limits, strict=True):
            column[sid] = limit
        if self._limit_arrays is not None and sid < len(self._limit_arrays[0]):
            for array, limit in zip(self._limit_arrays, limits, strict=True):
                array[sid] = limit
        if sid < len(self._series_point_array):
            self._series_point_array[sid] = point

    def _append_series(
        self, domains: list[str], sensors: list[str], sites: list[str], bases: list[str], limits: list[_SeriesLimits]
    ) -> None:
        """Series of ``domains``, ``sensors``, ``sites`` and base metrics ``bases`` (one of each per
        series), in new slots at the end."""
        for base in dict.fromkeys(bases):  # first-seen order, as one at a time would give
            self._metric_code(base)
        # A report's metrics come side by side: each run of one (domain, sensor, site) looks its
        # point up once.
        points: list[int] = []
        last: tuple[str, str, str] | None = None
        point = -1
        for key in zip(domains, sensors, sites, strict=True):
            if key == last:
                self._point_users[point] += 1
            else:
                point, last = self._point_of(*key), key
            points.append(point)
        self._series_point += points
        self._series_domain += domains
        self._series_sensor += sensors
        self._series_site += sites
        self._series_metric += bases
        for column, k in ((self._lo, 0), (self._hi, 1), (self._rate, 2), (self._floor, 3)):
            column += map(itemgetter(k), limits)

    def _point_of(self, domain: str, sensor: str, site: str) -> int:
        """The stored point a new series of ``(domain, sensor, site)`` writes its values into."""
        key = (domain, sensor, site)
        point = self._points.get(key)
        if point is None:
            point = self._free_points.pop() if self._free_points else len(self._point_key)
            if point == len(self._point_key):
                self._point_key.append(key)
                self._point_users.append(0)
            else:
                self._point_key[point] = key
            self._points[key] = point
            if point < len(self._point_domain_array):
                self._point_domain_array[point] = self._domain_codes.setdefault(domain, len(self._domain_codes))
                self._point_sensor_array[point], self._point_site_array[point] = sensor, site
        self._point_users[point] += 1
        return point

    def _point_arrays(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Each series' point and each point's domain code, as arrays (extended when series were added)."""
        # Only the new entries are appended: a fleet's first minutes add series every step, and
        # reused slots are kept current where they are reused (_register, _point_of).
        have = len(self._series_point_array)
        if have != len(self._series_point):
            new_points = np.array(self._series_point[have:], dtype=np.int64)
            self._series_point_array = np.concatenate([self._series_point_array, new_points])
        have = len(self._point_domain_array)
        if have != len(self._point_key):
            added = self._point_key[have:]
            codes = [self._domain_codes.setdefault(domain, len(self._domain_codes)) for domain, _, _ in added]
            self._point_domain_array = np.concatenate([self._point_domain_array, np.array(codes, dtype=np.int64)])
            self._point_sensor_array = np.concatenate([self._point_sensor_array,
                                                       str_array([sensor for _, sensor, _ in added])])  # fmt: skip
            self._point_site_array = np.concatenate([self._point_site_array, str_array([site for _, _, site in added])])
        return self._series_point_array, self._point_domain_array

    def _limits(self) -> _Limits:
        """Per-series lo, hi, max rate and spike floor as arrays, rebuilt only when series were added."""
        have = 0 if self._limit_arrays is None else len(self._limit_arrays[0])
        if self._limit_arrays is None or have != len(self._lo):
            # Append only the new series' limits: a fleet's first minutes add series every step.
            new = [np.array(x[have:], dtype=np.float64) for x in (self._lo, self._hi, self._rate, self._floor)]
            old = self._limit_arrays or tuple(np.empty(0) for _ in range(4))
            lo, hi, rate, floor = (np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
            self._limit_arrays = (lo, hi, rate, floor)
        return self._limit_arrays

    def _grow(self) -> None:
        """Per-series arrays sized for every registered series (new ones empty)."""
        k = len(self._series_domain)
        self._history = self._history.grow(k)
        more = k - len(self._series_part)
        if more > 0:
            self._series_part = np.concatenate([self._series_part, np.full(more, -1, dtype=np.int64)])
            self._max_ts = np.concatenate([self._max_ts, np.full(more, _NEG, dtype=np.int64)])
            self._replayed_ts = np.concatenate([self._replayed_ts, np.full(more, _NEG, dtype=np.int64)])
            self._arrival = np.concatenate([self._arrival, np.full(more, -np.inf)])
            self._idle_closed = np.concatenate([self._idle_closed, np.zeros(more, dtype=bool)])
            self._resumed_after = np.concatenate([self._resumed_after, np.full(more, _NEG, dtype=np.int64)])
            self._closed = np.hstack([self._closed, np.full((len(self._s.windows), more), _NEG, dtype=np.int64)])
            self._emitted = np.hstack([self._emitted, np.full((len(self._s.windows), more), _NEG, dtype=np.int64)])

    def _series_ids(self, r: Readings, codes: KeyCodes | None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Series id and unit factor of every reading ``(n,)``. ``codes``: labels of the readings'
        keys (None: computed from the columns)."""
        if codes is None:
            codes = KeyCodes.of(r)
        first, source = distinct_codes(codes.source)
        sources = zip(_names_at(r.domain, first), _names_at(r.sensor_id, first), _names_at(r.site, first), strict=True)
        source_ids = _interned(self._source_ids, list(sources), self._fresh_ids)
        first, metric = distinct_codes(codes.metric)
        metric_ids = _interned(self._metric_ids, _names_at(r.metric, first), self._fresh_ids)
        key = (source_ids << 32)[source] | metric_ids[metric]
        at = self._resolved.find(key)
        if (at < 0).any():
            self._resolve_new(r, key, at < 0)
            at = self._resolved.find(key)
        return self._resolved_series[at], self._resolved_factor[at]

    def _resolve_new(self, r: Readings, key: npt.NDArray[np.int64], new: npt.NDArray[np.bool_]) -> None:
        """Resolve the keys of the readings at ``new`` (mask ``(n,)``) and add them."""
        rows = np.flatnonzero(new)
        rows = rows[distinct_codes(key[rows])[0]]
        ids, factors = self._register(
            _names_at(r.domain, rows), _names_at(r.sensor_id, rows), _names_at(r.site, rows), _names_at(r.metric, rows)
        )
        self._resolved.add(key[rows])
        self._resolved_series = np.concatenate([self._resolved_series, np.array(ids, dtype=np.int64)])
        self._resolved_factor = np.concatenate([self._resolved_factor, np.array(factors, dtype=np.float64)])

    # ------------------------------------------------------------ main step

    def ingest(
        self,
        r: Readings,
        now_s: float,
        caught_up: frozenset[int] = frozenset(),
        codes: KeyCodes | None = None,
        wall_ns: int | None = None,
    ) -> EngineOutput:
        """Clean ``r``, add it to windows, close what each series' event time (or idleness) allows;
        returns what to send. ``now_s``: processing time (s, monotonic); ``wall_ns``: the wall
        clock (ns) for the correction horizon (None: no horizon). ``codes``: optional labels
        of the readings' series keys (see :class:`KeyCodes`).

        ``caught_up``: partitions with nothing more to read (no lag). Only their series can be
        idle: a partition that merely was not fetched for a while (a rebalance, a slow sink)
        still has data.
        """
        out = EngineOutput()
        # Before anything of this step: what the step returns must name series that still exist.
        if now_s - self._evicted_at >= min(60.0, self._s.series_ttl_s / 10):
            self._evict(now_s)
        if len(r):
            series, factor = self._series_ids(r, codes)
            if wall_ns is not None:
                beyond = r.ts_ns < wall_ns - self._s.horizon_ns
                if beyond.any():
                    self._beyond_horizon(r, beyond, wall_ns, out)
                    keep = ~beyond
                    r = r.take(keep)
                    series, factor = series[keep], factor[keep]
        if len(r):
            # One (series, ts) order for the whole step: cleaning, windows and aggregates then
            # work on grouped rows and skip their own sorts and gathers.
            order, series_sorted, _ = series_time_order(series, r.ts_ns)
            if not np.array_equal(order, np.arange(len(order))):
                r = r.reordered(order)
                series, factor = series_sorted, factor[order]
            value = r.value * factor
            self._grow()
            self._series_part[series] = r.partition
            replayed = self._replayed(r)
            behind = self._behind(series, r.ts_ns) | replayed
            if replayed.any():
                # A series' new readings are judged with its replayed ones, after them and against
                # the store: a new reading may conflict with a replayed one (a duplicate) or have
                # it in its Hampel window, and the history the replay would rebuild is incomplete.
                behind |= np.isin(series, series[replayed])
            if behind.any():
                rows = np.flatnonzero(behind)
                out.deferred = Deferred(r.take(rows),
                                        series[rows], value[rows])  # fmt: skip
                keep = ~behind
                r = r.take(keep)
                series, value = series[keep], value[keep]
            # Replaying from here rebuilds the cleaning history these readings were judged with
            # (read once per series: the rows are in series order).
            starts = group_starts(series)
            held = self._history.earliest_offset(series[starts])
            replay_from = np.minimum(r.offset, np.repeat(held, np.diff(np.append(starts, len(series)))))
            reason, self._history, rejudged = clean(
                series, r.ts_ns, value,
                *self._limits(),
                self._history, self._s.k_sigma, r.offset, self._s.hampel_window,
            )  # fmt: skip
            if len(rejudged):
                self._apply_rejudged(rejudged.series, rejudged.ts_ns, rejudged.value, rejudged.verdict, out)
            self._judged(series, r, value, reason, replay_from, now_s, out)
        self._close(now_s, caught_up, out)
        return out

    def _evict(self, now_s: float) -> None:
        """Forget series quiet for ``series_ttl_s`` with no open window; their slots are reused.

        The windows they had emitted may be corrected later by a reading of theirs: their
        partition's ``closed_before`` grows to cover them, so such a window is recomputed from the
        store, never from a fresh in-memory start."""
        self._evicted_at = now_s
        stale = np.zeros(len(self._arrival), dtype=bool)
        stale[: len(self._series_domain)] = now_s - self._arrival[: len(self._series_domain)] >= self._s.series_ttl_s
        stale[self._free] = False
        stale[self._open.series()] = False
        ids = np.flatnonzero(stale)
        if not len(ids):
            return
        for p in np.unique(self._series_part[ids]).tolist():
            state = self._parts.get(p)
            if state is None:
                continue
            mine = ids[self._series_part[ids] == p]
            latest = self._emitted[:, mine].max(axis=1).tolist()
            before = state.closed_before or tuple([_NEG] * len(latest))
            state.closed_before = tuple(max(a, int(b)) for a, b in zip(before, latest, strict=True))
        for sid in ids.tolist():
            self._series.pop((self._series_domain[sid], self._series_sensor[sid], self._series_metric[sid]), None)
            point = self._series_point[sid]
            self._point_users[point] -= 1
            if self._point_users[point] == 0:
                del self._points[self._point_key[point]]
                self._free_points.append(point)
        self._forget_resolved(ids)
        self._history = self._history.forget(stale)
        self._series_part[ids] = -1
        self._max_ts[ids] = _NEG
        self._replayed_ts[ids] = _NEG
        self._arrival[ids] = -np.inf
        self._idle_closed[ids] = False
        self._resumed_after[ids] = _NEG
        self._closed[:, ids] = _NEG
        self._emitted[:, ids] = _NEG
        self._free.extend(ids.tolist())

    def _forget_resolved(self, ids: npt.NDArray[np.int64]) -> None:
        """Drop the resolved keys of the evicted series ``ids``, and the source and metric ids no
        resolved key uses any more (a fleet that renames its sensors does not grow them)."""
        keep = ~np.isin(self._resolved_series, ids)
        self._resolved.keep(keep)
        self._resolved_series = self._resolved_series[keep]
        self._resolved_factor = self._resolved_factor[keep]
        sources = set((self._resolved.keys >> 32).tolist())
        self._source_ids = {k: i for k, i in self._source_ids.items() if i in sources}
        metrics = set((self._resolved.keys & 0xFFFFFFFF).tolist())
        self._metric_ids = {k: i for k, i in self._metric_ids.items() if i in metrics}

    def _replayed(self, r: Readings) -> npt.NDArray[np.bool_]:
        """Readings consumed before a restart (below the committed ``next``): their verdicts are in
        the store already, and judging them again with the history the replay rebuilds could
        differ (a reading judged against the store the first time), so they take the stored one."""
        consumed_until = self._per_partition({p: st.consumed_until for p, st in self._parts.items()}, -1, r.partition)
        replayed: npt.NDArray[np.bool_] = r.offset < consumed_until
        return replayed

    def _behind(self, series: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Readings the history cannot judge exactly: their series has dropped older readings
        from it (it is full) and fewer than W of the readings it holds are older than them, so
        their Hampel window, or the reading they repeat, may be in the store only."""
        w = self._s.hampel_window
        full = self._history.ts[series, 0] != _NEG
        behind: npt.NDArray[np.bool_] = full & (ts_ns <= self._history.ts[series, w - 1])
        return behind

    def _judged(
        self,
        series: npt.NDArray[np.int64],
        r: Readings,
        value: npt.NDArray[np.float64],
        reason: npt.NDArray[np.uint8],
        replay_from: npt.NDArray[np.int64],
        now_s: float,
        out: EngineOutput,
        counted: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Readings with their verdicts: counted (those ``counted`` marks; default all), stored (raw
        or rejected), into the windows."""
        tally = np.bincount(reason if counted is None else reason[counted], minlength=len(REASON_NAMES))
        for code, count in enumerate(tally.tolist()):
            if not count or code == OK:
                continue
            if code == REPEAT:
                out.repeated += count
            else:
                name = REASON_NAMES[code]
                out.rejected[name] = out.rejected.get(name, 0) + count
        ok = reason == OK
        self._stored_points(series[ok], r.ts_ns[ok], value[ok], None, out)
        self._consumed(r.partition, r.offset)
        judged = reason != REPEAT
        rejected = judged & ~ok
        if rejected.any():
            self._stored_points(series[rejected], r.ts_ns[rejected], value[rejected], reason[rejected], out)
        if not judged.all():
            r = r.take(judged)
            series, value, ok, replay_from = series[judged], value[judged], ok[judged], replay_from[judged]
        replayed = self._replayed(r)
        newest_before = self._max_ts[series]
        self._advance(series, r, replayed, now_s)
        self._add_to_windows(series, r, value, ok, replay_from, replayed, newest_before, out)

    def neighbour_ranges(self, deferred: Deferred) -> list[SeriesRange]:
        """What to read back to judge ``deferred`` readings: per domain, their sensors and metrics
        from a lookback before the oldest (three Hampel windows at the series' usual interval, at
        least a minute) to the newest."""
        d = deferred
        w = self._s.hampel_window
        kept = self._history.ts.shape[1]
        span = self._history.ts[d.series, -1] - self._history.ts[d.series, 0]
        lookback = np.maximum(3 * w * span // max(kept - 1, 1), 60 * 10**9)
        start = d.readings.ts_ns - np.minimum(lookback, self._s.horizon_ns)
        out = []
        domains = _names_array(d.readings.domain)
        for domain in sorted(set(domains.tolist())):
            mine = domains == domain
            ids = np.unique(d.series[mine]).tolist()
            out.append(
                SeriesRange(
                    str(domain),
                    tuple(sorted({self._series_sensor[i] for i in ids})),
                    tuple(sorted({self._series_metric[i] for i in ids})),
                    int(start[mine].min()),
                    # Up to the series' newest: the readings after the deferred ones are judged
                    # again (their Hampel windows change).
                    int(max(int(d.readings.ts_ns[mine].max()), int(self._max_ts[ids].max()))) + 1,
                )
            )
        return out

    def ingest_deferred(self, deferred: Deferred, stored: list[StoredReadings], now_s: float) -> EngineOutput:
        """Judge readings :meth:`ingest` deferred against their neighbours in the store (``stored``:
        what :meth:`neighbour_ranges` asked for), then treat them like any other reading (most
        fall in emitted windows: corrections)."""
        out = EngineOutput()
        d = deferred
        uniq, local = np.unique(d.series, return_inverse=True)
        local = local.reshape(-1).astype(np.int64)
        position = {int(sid): j for j, sid in enumerate(uniq.tolist())}
        # Each series' stored readings that passed checks 1-3 (the Hampel window's material), one
        # per instant: where a raw point and a rejection meet (a crash between storing a
        # rejection and retracting the raw value), the rejection is the newer verdict.
        by_ts: list[dict[int, tuple[float, int]]] = [{} for _ in uniq.tolist()]
        passed = {"": OK, "spike": SPIKE, "rate_of_change": RATE}
        for part in stored:
            for sensor, metric, ts, v, why in zip(part.sensor_id.tolist(), part.metric.tolist(), part.ts_ns.tolist(),
                                                  part.value.tolist(), part.reason.tolist(), strict=True):  # fmt: skip
                j = position.get(self._series.get((part.domain, sensor, metric), -1), -1)
                if j >= 0 and why in passed and (why or int(ts) not in by_ts[j]):
                    by_ts[j][int(ts)] = (float(v), passed[why])
        rows = [[(ts, v, verdict) for ts, (v, verdict) in items.items()] for items in by_ts]
        width = max(max((len(x) for x in rows), default=0), self._s.hampel_window)
        history = History.empty(len(uniq), width)
        for j, items in enumerate(rows):
            items.sort()
            if items:
                history.ts[j, width - len(items) :] = [t for t, _, _ in items]
                history.values[j, width - len(items) :] = [v for _, v, _ in items]
                history.verdict[j, width - len(items) :] = [d for _, _, d in items]
        lo, hi, rate, floor = (x[uniq] for x in self._limits())
        stored_verdict = {(j, t): v for j, items in enumerate(rows) for t, _, v in items}
        reason, _, rejudged = clean(
            local, d.readings.ts_ns, d.value, lo, hi, rate, floor, history, self._s.k_sigma, d.readings.offset,
            self._s.hampel_window,
        )  # fmt: skip
        # A reading that finds itself in the store (a repeat: replayed after a restart, or taken by
        # a step whose commit was lost) takes the verdict stored then and joins its windows again
        # (they count one reading per instant), as the first copy may have been lost with the
        # memory of the process that took it.
        # Counted as repeats (once per delivery), not as new verdicts.
        again_stored = np.zeros(len(reason), dtype=bool)
        for i in np.flatnonzero(reason == REPEAT).tolist():
            kept = stored_verdict.get((int(local[i]), int(d.readings.ts_ns[i])))
            if kept is not None:
                reason[i] = kept
                again_stored[i] = True
        out.repeated += int((again_stored & ~self._replayed(d.readings)).sum())
        passed_now = np.isin(reason, (OK, SPIKE, RATE))
        again = uniq[rejudged.series]
        # The deferred readings join the history where they are among the newest; re-judged ones
        # it holds take their new verdict (their offsets: the deferred readings' replay needs them).
        self._history = self._history.merge(
            np.concatenate([d.series[passed_now], again]),
            np.concatenate([d.readings.ts_ns[passed_now], rejudged.ts_ns]),
            np.concatenate([d.value[passed_now], rejudged.value]),
            np.concatenate([d.readings.offset[passed_now], np.full(len(again), NO_OFFSET, dtype=np.int64)]),
            np.concatenate([reason[passed_now], rejudged.verdict]),
        )
        if len(rejudged):
            self._apply_rejudged(again, rejudged.ts_ns, rejudged.value, rejudged.verdict, out)
        self._judged(d.series, d.readings, d.value, reason, d.readings.offset, now_s, out, counted=~again_stored)
        return out

    def _apply_rejudged(
        self,
        series: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        verdict: npt.NDArray[np.uint8],
        out: EngineOutput,
    ) -> None:
        """Readings whose verdict changed: now accepted, a raw point (and the rejection marked
        ``reinstated``); now rejected, the raw point retracted and the rejection stored. Their
        windows are fixed in memory while open, recomputed from the store once emitted."""
        ok = verdict == OK
        out.rejudged += len(series)
        if ok.any():
            self._stored_points(series[ok], ts[ok], value[ok], None, out)
            self._stored_points(series[ok], ts[ok], value[ok], np.full(int(ok.sum()), REINSTATED, np.uint8), out)
        if (~ok).any():
            self._stored_points(series[~ok], ts[~ok], value[~ok], verdict[~ok], out)
            out.retract.append((series[~ok], ts[~ok]))
        behind: list[_Windows] = []
        for spec_i, spec in enumerate(self._s.windows):
            rows, starts = assign(ts, spec)
            closed = starts + spec.size_ns <= self._closed[spec_i, series[rows]]
            for i in np.flatnonzero(~closed).tolist():
                row = int(rows[i])
                self._open.set_ok(spec_i, int(starts[i]), int(self._series_part[series[row]]), int(series[row]),
                                  int(ts[row]), bool(ok[row]))  # fmt: skip
            if closed.any():
                behind.append((np.full(int(closed.sum()), spec_i, dtype=np.int64), series[rows][closed],
                               starts[closed], starts[closed] + spec.size_ns))  # fmt: skip
        if behind:
            out.add_recompute(behind)

    def _beyond_horizon(self, r: Readings, beyond: npt.NDArray[np.bool_], wall_ns: int, out: EngineOutput) -> None:
        """Readings older than the correction horizon: to the late topic with how far behind they are."""
        cutoff = wall_ns - self._s.horizon_ns
        rows = np.flatnonzero(beyond)
        names = zip(_names_at(r.domain, rows), _names_at(r.sensor_id, rows), _names_at(r.metric, rows), strict=True)
        for i, (domain, sensor, metric) in zip(rows.tolist(), names, strict=True):
            out.late.append(LateReading(int(r.partition[i]), str(domain), str(sensor), str(metric),
                                        int(r.ts_ns[i]), float(r.value[i]), cutoff - int(r.ts_ns[i])))  # fmt: skip
        self._consumed(r.partition[beyond], r.offset[beyond])

    def _consumed(self, partition: npt.NDArray[np.int64], offset: npt.NDArray[np.int64]) -> None:
        """Each partition's consumed offset, over every reading taken from it (a repeat too: a
        partition whose last records repeat earlier ones is caught up, and its quiet series may
        close)."""
        if not len(partition):
            return
        # Partition ids are the loop's small numbers: one pass for every partition's newest offset
        # (a Kafka offset is never int64's minimum, so that marks a partition absent).
        lo = int(partition.min())
        absent = np.iinfo(np.int64).min
        newest = np.full(int(partition.max()) - lo + 1, absent, dtype=np.int64)
        np.maximum.at(newest, partition - lo, offset)
        for i in np.flatnonzero(newest != absent).tolist():
            state = self._parts.setdefault(lo + i, _Partition())
            state.next_offset = max(state.next_offset, int(newest[i]) + 1)

    def _stored_points(
        self,
        series: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        reason: npt.NDArray[np.uint8] | None,
        out: EngineOutput,
    ) -> None:
        """Raw points (``reason`` None) to ``{domain}``, or rejected readings to ``{domain}_rejected``
        with field ``{metric}_reason`` (the value too, where finite): one line per sensor and
        instant, its metrics as fields (a metric without a value there is absent from the line)."""
        if not len(series):
            return
        names = None if reason is None else np.array(REASON_NAMES, dtype=object)[reason]
        for domain, rows, line, point, lines in self._lines(series, ts):
            # One (metric, line) table per domain, filled by one scatter: row k is metric k's column.
            metric, local = self._metrics_of(series[rows])
            table = np.full((len(metric), len(point)), np.nan)
            table[local, line] = value[rows]
            fields: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.object_]] = {}
            if names is None:
                fields = {self._metric_names[code]: table[k] for k, code in enumerate(metric.tolist())}
            else:
                reasons = np.full((len(metric), len(point)), None, dtype=object)
                reasons[local, line] = names[rows]
                for k, code in enumerate(metric.tolist()):
                    fields[self._metric_names[code]] = table[k]
                    fields[f"{self._metric_names[code]}_reason"] = reasons[k]
            kind, measurement = ("raw", domain) if names is None else ("rejected", f"{domain}_rejected")
            out.points.append((kind, PointColumns(measurement, self._point_tags(point), fields, lines)))

    def _lines(
        self, series: npt.NDArray[np.int64], ts: npt.NDArray[np.int64]
    ) -> Iterable[
        tuple[str, npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]
    ]:
        """Rows of ``series`` and ``ts`` ``(n,)`` as lines, one per point and instant, per domain:
        ``(domain, rows (r,), each row's line (r,), each line's point (k,) and time (k,))``."""
        series_point, point_domain = self._point_arrays()
        point = series_point[series]
        domain_code = point_domain[point]
        domains = {code: name for name, code in self._domain_codes.items()}
        for code, rows in code_groups(domain_code):
            line, first = pair_lines(point[rows], ts[rows])
            yield domains[code], rows, line, point[rows][first], ts[rows][first]

    def _metrics_of(self, series: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The distinct metrics of ``series`` ``(n,)`` as codes into ``_metric_names`` ``(k,)``,
        ascending, and each row's index among them ``(n,)`` (a table lookup, no sort)."""
        have = len(self._series_metric_array)
        if have != len(self._series_metric):  # series added since: append theirs
            added = np.fromiter(map(self._metric_codes.__getitem__, self._series_metric[have:]), dtype=np.int64)
            self._series_metric_array = np.concatenate([self._series_metric_array, added])
        code = self._series_metric_array[series]
        present = np.flatnonzero(np.bincount(code, minlength=1))
        index = np.zeros(len(self._metric_names), dtype=np.int64)
        index[present] = np.arange(len(present))
        return present, index[code]

    def _point_tags(self, point: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.object_] | Categorical]:
        """The ``sensor_id`` and ``site`` tags of lines of ``point`` ``(k,)``."""
        first, inv = distinct_codes(point)
        uniq = point[first]
        return {"sensor_id": Categorical(inv, self._point_sensor_array[uniq]),
                "site": Categorical(inv, self._point_site_array[uniq])}  # fmt: skip

    def _advance(
        self, series: npt.NDArray[np.int64], r: Readings, replayed: npt.NDArray[np.bool_], now_s: float
    ) -> None:
        """Each series' event time and arrival. ``series`` and ``r`` are in (series, ts) order, so
        a series' last row holds its newest time; ``replayed``: which rows were consumed before a
        restart (see :meth:`_replayed`)."""
        if not len(series):
            return
        last = np.append(group_starts(series)[1:], len(series)) - 1
        uniq = series[last]
        self._max_ts[uniq] = np.maximum(self._max_ts[uniq], r.ts_ns[last])
        self._arrival[uniq] = now_s
        self._idle_closed[uniq] = False
        self._advanced.append(uniq)
        if replayed.any():
            np.maximum.at(self._replayed_ts, series[replayed], r.ts_ns[replayed])

    def _add_to_windows(
        self,
        series: npt.NDArray[np.int64],
        r: Readings,
        value: npt.NDArray[np.float64],
        ok: npt.NDArray[np.bool_],
        replay_from: npt.NDArray[np.int64],
        replayed_rows: npt.NDArray[np.bool_],
        newest_before: npt.NDArray[np.int64],
        out: EngineOutput,
    ) -> None:
        """The readings into their windows (``newest_before``: each one's series' newest event time
        before this step)."""
        behind: list[_Windows] = []
        for spec_i, spec in enumerate(self._s.windows):
            rows, starts = assign(r.ts_ns, spec)
            tumbling = spec.size_ns == spec.step_ns  # one window per reading: rows are 0..n-1
            s_rows = series if tumbling else series[rows]
            ends = starts + spec.size_ns
            # Consumed before a restart, into a window its series had closed then: already stored.
            replayed = (replayed_rows if tumbling else replayed_rows[rows]) & (
                ends <= self._replayed_ts[s_rows] - self._s.allowed_lateness_ns
            )
            closed = ends <= self._closed[spec_i, s_rows]
            correction = closed & ~replayed
            out.replayed += int(replayed.sum())
            # Behind an emitted window: read back now, or taken by a window opened again.
            out.corrections += int(((ends <= self._emitted[spec_i, s_rows]) & ~replayed).sum())
            if correction.any():
                # A series back inside windows it closed on the idle timeout (its event time has
                # not passed them): they open again rather than being read back from the store at
                # every step while it reports; each is recomputed from the store once, when it
                # closes again (_close), since memory holds only its readings from now on.
                resumed = correction & (ends > self._max_ts[s_rows] - self._s.allowed_lateness_ns)
                if resumed.any():
                    again = s_rows[resumed]
                    self._resumed_after[again] = np.maximum(self._resumed_after[again], newest_before[rows[resumed]])
                    ids = np.unique(again)
                    watermark = self._max_ts[ids] - self._s.allowed_lateness_ns
                    by_time = (watermark - spec.size_ns) // spec.step_ns * spec.step_ns + spec.size_ns
                    self._closed[spec_i, ids] = np.minimum(self._closed[spec_i, ids], by_time)
                    closed = ends <= self._closed[spec_i, s_rows]
                    correction = closed & ~replayed
            if correction.any():
                behind.append((np.full(int(correction.sum()), spec_i, dtype=np.int64), s_rows[correction],
                               starts[correction], ends[correction]))  # fmt: skip
            live = ~(closed | replayed)
            if tumbling and live.all():  # the usual step: every reading into its one window, no gathers
                self._open.add(spec_i, starts, r.partition, series, r.ts_ns, value, ok, replay_from)
                continue
            rows, starts = rows[live], starts[live]
            self._open.add(spec_i, starts, r.partition[rows], series[rows], r.ts_ns[rows], value[rows], ok[rows],
                           replay_from[rows])  # fmt: skip
        if behind:
            out.add_recompute(behind)

    def _per_partition(
        self, values: dict[int, int], default: int, partitions: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """``values[p]`` for each entry of ``partitions``: a small lookup table, not a loop per row."""
        if not len(partitions):
            return np.empty(0, dtype=np.int64)
        table = np.full(int(partitions.max()) + 1, default, dtype=np.int64)
        for p, v in values.items():
            if p < len(table):
                table[p] = v
        return table[partitions]

    def _close(self, now_s: float, caught_up: frozenset[int], out: EngineOutput) -> None:
        """Advance each series' closed-until time (its event time minus the lateness; everything it
        holds once idle) and emit the windows that closed."""
        if not len(self._max_ts):
            return
        # A series' target moves only with its event time, or when it turns idle (arrived before
        # now - idle timeout, on a caught-up partition): the others are left as they are.
        idle = self._arrival <= now_s - self._s.idle_timeout_s
        idle &= self._max_ts > _NEG
        idle &= ~self._idle_closed
        idle_rows = np.flatnonzero(idle) if caught_up else np.empty(0, dtype=np.int64)
        if len(idle_rows):
            parts = np.fromiter(caught_up, dtype=np.int64, count=len(caught_up))
            idle_rows = idle_rows[np.isin(self._series_part[idle_rows], parts)]
        idle[:] = False
        idle[idle_rows] = True
        self._idle_closed[idle_rows] = True
        rows = np.concatenate([*self._advanced, idle_rows])
        self._advanced = []
        max_ts, idle = self._max_ts[rows], idle[rows]
        seen = max_ts > _NEG
        watermark = np.where(seen, max_ts - self._s.allowed_lateness_ns, _NEG // 2)  # no wrap-around below
        for spec_i, spec in enumerate(self._s.windows):
            # The latest window end at or before the watermark; once idle, the end of every
            # window holding the series' newest reading.
            by_time = np.where(seen, (watermark - spec.size_ns) // spec.step_ns * spec.step_ns + spec.size_ns, _NEG)
            by_idle = max_ts // spec.step_ns * spec.step_ns + spec.size_ns
            target = np.where(idle, np.maximum(by_time, by_idle), by_time)
            self._closed[spec_i, rows] = np.maximum(self._closed[spec_i, rows], target)
        closed = self._open.close(self._sizes.tolist(), self._closed)
        partial = None if closed is None else self._emitted_before(closed)
        self._emitted[:, rows] = np.maximum(self._emitted[:, rows], self._closed[:, rows])
        if closed is None or partial is None:
            return
        bucket = closed.bucket()
        restarted = self._restarted(closed)
        partial |= restarted[bucket]
        if partial.any():
            at = np.flatnonzero(partial)
            b = bucket[at]
            ends = closed.start[b] + self._sizes[closed.spec[b]]
            # Read from the store up to when the series resumed, the rest from memory; a window
            # replayed after a restart from the store whole (memory holds only what the replay brought).
            resumed_after = self._resumed_after[closed.series[at]]
            upto = np.where((resumed_after > _NEG) & ~restarted[b], resumed_after, ends)
            held = np.zeros(len(partial), dtype=bool)
            held[at[upto < ends]] = True
            out.add_recompute([(closed.spec[b], closed.series[at], closed.start[b], upto)],
                              closed.rows(held) if held.any() else None)  # fmt: skip
        # One aggregate over every bucket: key (bucket, series), rows of a key in the order added.
        width = len(self._series_domain)
        key = bucket * width + closed.series
        whole = ~partial
        if partial.any():
            key, ts_ns, value, ok = key[whole], closed.ts_ns[whole], closed.value[whole], closed.ok[whole]
        else:
            ts_ns, value, ok = closed.ts_ns, closed.value, closed.ok
        if not len(key):
            return
        agg = aggregate(key, ts_ns, value, ok)
        of = agg.key // width
        self._window_points(closed.spec[of], agg.key % width, closed.start[of], agg, out)

    def _emitted_before(self, closed: ClosedBuckets) -> npt.NDArray[np.bool_]:
        """Which closed rows ``(m,)`` are of a window its series may have emitted before (it opened
        again when the series resumed inside it): it ends within what the series had emitted."""
        partial = np.empty(len(closed.series), dtype=bool)
        bounds = closed.bounds.tolist()
        for j, (spec, start) in enumerate(zip(closed.spec.tolist(), closed.start.tolist(), strict=True)):
            lo, hi = bounds[j], bounds[j + 1]
            partial[lo:hi] = self._emitted[spec, closed.series[lo:hi]] >= start + int(self._sizes[spec])
        return partial

    def _restarted(self, closed: ClosedBuckets) -> npt.NDArray[np.bool_]:
        """Which closed buckets ``(b,)`` hold windows that may have been emitted before a restart:
        they start before the latest end their partition's series had closed then."""
        out = np.zeros(len(closed.spec), dtype=bool)
        for p, state in self._parts.items():
            if state.closed_before:
                before = np.array(state.closed_before, dtype=np.int64)[closed.spec]
                out |= (closed.partition == p) & (closed.start < before)
        return out

    def _window_points(
        self,
        spec: npt.NDArray[np.int64],
        series: npt.NDArray[np.int64],
        start: npt.NDArray[np.int64],
        agg: Aggregates,
        out: EngineOutput,
    ) -> None:
        """Window aggregates ``(m,)`` (one per spec, series, start) as points of ``{domain}_{window}``:
        one line per sensor and window, with fields ``{metric}_{statistic}`` for each of its metrics."""
        out.windows_emitted += len(agg)
        statistics = {
            "count": agg.count.astype(np.float64), "rejected": agg.rejected.astype(np.float64), "mean": agg.mean,
            "min": agg.min, "max": agg.max, "last": agg.last, "stddev": agg.stddev, "p95": agg.p95,
        }  # fmt: skip
        for spec_i, of_spec in code_groups(spec):
            name = self._s.windows[spec_i].name
            for domain, rows, line, point, lines in self._lines(series[of_spec], start[of_spec]):
                taken = of_spec[rows]
                metric, local = self._metrics_of(series[taken])
                tables = {}
                for statistic, values in statistics.items():  # a (metric, line) table each, one scatter
                    tables[statistic] = np.full((len(metric), len(point)), np.nan)
                    tables[statistic][local, line] = values[taken]
                fields: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.object_]] = {
                    f"{self._metric_names[code]}_{statistic}": table[k]
                    for k, code in enumerate(metric.tolist())
                    for statistic, table in tables.items()
                }
                out.points.append((name, PointColumns(f"{domain}_{name}", self._point_tags(point), fields, lines)))

    # ------------------------------------------------------------ recomputing from the store

    def retractions(
        self, retract: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    ) -> list[tuple[str, str, list[tuple[str, int]]]]:
        """``EngineOutput.retract`` as (domain, metric, [(sensor_id, ts_ns), ...]) for the store."""
        grouped: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for series, ts in retract:
            for sid, t in zip(series.tolist(), ts.tolist(), strict=True):
                key = (self._series_domain[sid], self._series_metric[sid])
                grouped.setdefault(key, []).append((self._series_sensor[sid], int(t)))
        return [(domain, metric, instants) for (domain, metric), instants in grouped.items()]

    def stored_ranges(self, windows: Recompute) -> list[SeriesRange]:
        """What to read back from the store to recompute ``windows``: one range per domain, over
        every sensor and metric involved, from the earliest start to the latest end (or ``upto``,
        for windows memory holds the rest of); none for a domain whose windows memory holds whole."""
        ends = np.minimum(windows.start + self._sizes[windows.spec], windows.upto + 1)
        needed = ends > windows.start
        series, starts, ends = windows.series[needed], windows.start[needed], ends[needed]
        domains = np.array(self._series_domain, dtype=object)[series]
        out = []
        for domain in sorted(set(domains.tolist())):
            mine = domains == domain
            ids = np.unique(series[mine]).tolist()
            out.append(
                SeriesRange(
                    domain,
                    tuple(sorted({self._series_sensor[i] for i in ids})),
                    tuple(sorted({self._series_metric[i] for i in ids})),
                    int(starts[mine].min()),
                    int(ends[mine].max()),
                )
            )
        return out

    def recomputed(self, windows: Recompute, stored: list[StoredReadings]) -> EngineOutput:
        """The aggregates of ``windows`` over the readings the store holds (``stored``: what
        :meth:`stored_ranges` asked for) up to each window's ``upto`` and those memory holds after
        it, as window points; a window with no reading is skipped."""
        out = EngineOutput()
        if not len(windows):
            return out
        lookup = self._series
        ids, ts, val, acc = [], [], [], []
        for part in stored:
            sid = np.fromiter(
                (lookup.get((part.domain, s, m), -1) for s, m in zip(part.sensor_id.tolist(), part.metric.tolist(),
                                                                     strict=True)),
                dtype=np.int64, count=len(part.ts_ns),
            )  # fmt: skip
            known = sid >= 0
            ids.append(sid[known])
            ts.append(part.ts_ns[known])
            val.append(part.value[known])
            acc.append(part.accepted[known])
        series = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        ts_ns = np.concatenate(ts) if ts else np.empty(0, dtype=np.int64)
        value = np.concatenate(val) if val else np.empty(0)
        accepted = np.concatenate(acc) if acc else np.empty(0, dtype=bool)
        # Every stored reading in every window of the asked specs, then the rows memory holds.
        parts: list[ClosedRows] = []
        for spec_i, spec in enumerate(self._s.windows):
            if (windows.spec == spec_i).any():
                rows, starts = assign(ts_ns, spec)
                parts.append(ClosedRows(np.full(len(rows), spec_i, dtype=np.int64), series[rows], starts, ts_ns[rows],
                                        value[rows], accepted[rows], np.zeros(len(rows), dtype=np.int64)))  # fmt: skip
        from_store = sum(len(p.spec) for p in parts)
        rows_c = concat_rows([*parts, *([windows.held] if windows.held is not None else [])])
        if rows_c is None or not len(rows_c.spec):
            return out
        m = len(windows)
        keys = _window_key(np.concatenate([windows.spec, rows_c.spec]), np.concatenate([windows.series, rows_c.series]),
                           np.concatenate([windows.start, rows_c.start]), self._s.windows)  # fmt: skip
        asked, key = keys[:m], keys[m:]  # sorted, as the windows are (see Recompute.of)
        at = np.minimum(np.searchsorted(asked, key), m - 1)
        upto = windows.upto[at]
        stored_row = np.arange(len(key)) < from_store
        keep = (asked[at] == key) & np.where(stored_row, rows_c.ts_ns <= upto, rows_c.ts_ns > upto)
        if not keep.any():
            return out
        rows_c, key = rows_c.take(keep), key[keep]
        # The store keeps one point per instant and has no arrival order: order rows by time.
        by_time = np.lexsort((rows_c.ts_ns, key))
        rows_c, key = rows_c.take(by_time), key[by_time]
        agg = aggregate(key, rows_c.ts_ns, rows_c.value, rows_c.ok)
        first = agg.first_row
        self._window_points(rows_c.spec[first], rows_c.series[first], rows_c.start[first], agg, out)
        return out

    # ------------------------------------------------------------ offsets and rebalances

    def safe_offsets(self) -> dict[int, PartitionPosition]:
        """Per partition: the offset to commit, the next offset consumed, and per window spec the
        latest window end any of its series has closed.

        The commit offset is the earliest record a replay needs to rebuild the open windows *and*
        the cleaning history their readings and the next ones are judged with (so a restarted
        processor makes the same decisions), or one past the last consumed record when nothing is
        open; the other two travel as commit metadata for :meth:`restore`.
        """
        parts = [p for p, state in self._parts.items() if state.next_offset >= 0]
        if not parts:
            return {}
        size = max(parts) + 1
        need = np.full(size, NO_OFFSET, dtype=np.int64)
        owned = np.flatnonzero((self._series_part >= 0) & (self._series_part < size))
        np.minimum.at(need, self._series_part[owned], self._history.earliest_offset(owned))
        for p, replay_from in self._open.replay_from().items():
            if p < size:
                need[p] = min(int(need[p]), replay_from)
        # Per window spec the latest end any series closed, over all partitions: at least each
        # partition's own (a restart then recomputes a few more windows from the store; exact
        # per partition would cost a scatter over every series at every step).
        closed = self._emitted.max(axis=1).tolist() if self._emitted.size else [_NEG] * len(self._s.windows)
        out = {}
        for p in parts:
            state = self._parts[p]
            before = tuple(max(int(c), b) for c, b in zip(closed, state.closed_before or closed, strict=True))
            out[p] = PartitionPosition(min(int(need[p]), state.next_offset), state.next_offset, before)
        return out

    def restore(self, partition: int, consumed_until: int, closed_before: dict[str, int]) -> None:
        """A partition assigned with committed metadata: records below ``consumed_until`` were
        consumed before, and per window name no series had closed a window ending after
        ``closed_before[name]`` (a window not named there was not computed then). Replayed
        readings for windows their series had closed are skipped (counted as replayed); windows
        starting before that end are recomputed from the store when they close."""
        state = self._parts.setdefault(partition, _Partition())
        state.consumed_until = max(state.consumed_until, consumed_until)
        state.closed_before = tuple(int(closed_before.get(w.name, _NEG)) for w in self._s.windows)

    def window_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self._s.windows)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions (their windows are rebuilt by whoever gets them)."""
        gone = set(partitions)
        for p in gone:
            self._parts.pop(p, None)
        forget = np.isin(self._series_part, np.array(sorted(gone), dtype=np.int64))
        if forget.any():
            self._history = self._history.forget(forget)
            self._series_part[forget] = -1
            self._max_ts[forget] = _NEG
            self._replayed_ts[forget] = _NEG
            self._arrival[forget] = -np.inf
            self._idle_closed[forget] = False
            self._resumed_after[forget] = _NEG
            self._closed[:, forget] = _NEG
            self._emitted[:, forget] = _NEG
        self._open.drop(gone)

    @property
    def open_rows(self) -> int:
        return self._open.rows

    @property
    def series_count(self) -> int:
        """Series (sensor and metric) with state here: evicted ones are not counted."""
        return len(self._series)

    def next_offset(self, partition: int) -> int:
        """One past the highest offset consumed from ``partition`` (-1 before the first record)."""
        state = self._parts.get(partition)
        return state.next_offset if state else -1

    def event_time_lag_ns(self, wall_ns: int) -> int:
        """Wall clock minus the median series' newest event time (0 before any reading): how far
        window closing trails real time for a typical series."""
        seen = self._max_ts[self._max_ts > _NEG]
        return max(0, wall_ns - int(np.median(seen))) if len(seen) else 0


def _interned(table: dict[_K, int], keys: list[_K], fresh: Iterator[int]) -> npt.NDArray[np.int64]:
    """The id of each of ``keys`` in ``table``, new keys taking ids from ``fresh``; int64 ``(n,)``."""
    ids = list(map(table.get, keys))
    if None in ids:
        ids = [table.setdefault(key, next(fresh)) if i is None else i for key, i in zip(keys, ids, strict=True)]
    return np.array(ids, dtype=np.int64)


def _window_key(
    spec: npt.NDArray[np.int64],
    series: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    windows: tuple[WindowSpec, ...],
) -> npt.NDArray[np.int64]:
    """One int64 key per (window spec, series, window start), ordered like those triples: packed
    arithmetic when it fits 63 bits (window starts are multiples of the steps' gcd), else ranks."""
    if not len(spec):
        return np.empty(0, dtype=np.int64)
    step = math.gcd(*(w.step_ns for w in windows))
    slot = (start - int(start.min())) // step
    n_slots, n_series = int(slot.max()) + 1, int(series.max()) + 1
    if len(windows) * n_series * n_slots < 2**62:
        return (spec * n_series + series) * n_slots + slot
    _, key = np.unique(np.stack([spec, series, start]), axis=1, return_inverse=True)
    return key.reshape(-1).astype(np.int64)


def _spike_floor(spec: MetricSpec | None) -> float:
    """The Hampel scale floor of a metric: infinite turns the spike check off."""
    if spec is None:
        return 1e-9
    if not spec.spike_check:
        return np.inf
    return spec.spike_floor if spec.spike_floor is not None else 0.01 * (spec.max - spec.min)
