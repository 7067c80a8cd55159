"""``portpulse reprocess``: cleaning and aggregation run again over the readings Kafka still holds
for a range of event time, written over what the store holds for it.

For a catalogue change (a range widened, a unit fixed) or to repair a tier. The range is widened
to whole windows of the largest size; Kafka is read from the first record that can carry a
reading of it (written ``ingest.max_future_s`` before its start: the bridge refuses readings
further ahead) to the last (written ``ingest.max_past_s`` after its end: the bridge refuses older
ones), or to the end of the topic where that is sooner. Before anything is written, every
partition is checked to still hold that start, and the range's raw points, rejected readings and
aggregates are deleted; then the readings of the range go through a fresh
:class:`~portpulse.processors.engine.ProcessorEngine` (the catalogue of today, no correction
horizon) and the same :class:`~portpulse.processors.loop.Emitter` as the live processor. Nothing
is committed: an interrupted run is started again with the same command, which deletes and
rewrites the range again.

Pure: the range (:func:`plan_reprocess`), the Kafka timestamps to read (:meth:`ReprocessPlan.scan_ms`),
what is deleted (:meth:`ReprocessPlan.deletions`), whether a partition still holds the range
(:func:`lost_range`) and the progress line (:func:`progress_line`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portpulse.app.times import iso_time
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.errors import ConfigError, ServiceUnavailableError
from portpulse.contract.points import ForwardingStore, PointColumns, RewritableStore, WriteReceipt
from portpulse.contract.settings import Settings
from portpulse.contract.topics import readings_topic
from portpulse.processors.engine import EngineSettings, ProcessorEngine, Readings
from portpulse.processors.loop import Emitter, ProcessorStats, decode_fetch
from portpulse.processors.window import WindowSpec

__all__ = [
    "ReprocessPlan",
    "ReprocessProgress",
    "ReprocessReport",
    "describe",
    "lost_range",
    "plan_reprocess",
    "progress_line",
    "reprocess",
]


@dataclass(frozen=True, slots=True)
class ReprocessPlan:
    """Event time ``[start_ns, stop_ns)`` (whole windows of the largest size) of ``domains``."""

    start_ns: int
    stop_ns: int
    domains: tuple[str, ...]
    windows: tuple[WindowSpec, ...]

    def scan_ms(self, max_future_s: float, max_past_s: float) -> tuple[int, int]:
        """The Kafka timestamps (ms) between which a record can carry a reading of the range."""
        return (self.start_ns - int(max_future_s * 1e9)) // 10**6, -(-(self.stop_ns + int(max_past_s * 1e9)) // 10**6)

    def deletions(self) -> list[tuple[str, int, int]]:
        """(measurement, start_ns, stop_ns) cleared before the rewrite: raw points and rejected
        readings of the range, and the aggregates of every window that lies inside it."""
        out = []
        for domain in self.domains:
            out += [(domain, self.start_ns, self.stop_ns), (f"{domain}_rejected", self.start_ns, self.stop_ns)]
            for w in self.windows:
                last_start = self.stop_ns - w.size_ns
                if last_start >= self.start_ns:
                    out.append((f"{domain}_{w.name}", self.start_ns, last_start + 1))
        return out

    def window_inside(self, name: str, start_ns: np.ndarray[Any, np.dtype[np.int64]]) -> np.ndarray[Any, Any]:
        """Which windows named ``name`` starting at ``start_ns`` lie inside the range (a hopping
        window across an end holds readings from outside it: it is left as stored)."""
        size = next(w.size_ns for w in self.windows if w.name == name)
        return (start_ns >= self.start_ns) & (start_ns + size <= self.stop_ns)


def plan_reprocess(
    start_ns: int, stop_ns: int, domains: Sequence[str], windows: tuple[WindowSpec, ...], latest_ns: int
) -> ReprocessPlan:
    """The range widened to whole windows of the largest size; ValueError for an empty range or
    one ending after ``latest_ns`` (windows there may still be open in the live processor)."""
    if not windows:
        raise ValueError("no windows to reprocess")
    if stop_ns <= start_ns:
        raise ValueError(f"--to ({iso_time(stop_ns)}) must be after --from ({iso_time(start_ns)})")
    size = max(w.size_ns for w in windows)
    start, stop = start_ns // size * size, -(-stop_ns // size) * size
    if stop > latest_ns:
        raise ValueError(
            f"the range ends at {iso_time(stop)} (--to widened to whole windows): windows after "
            f"{iso_time(latest_ns)} may still be open in the live processor; choose an earlier --to"
        )
    return ReprocessPlan(start, stop, tuple(domains), windows)


def lost_range(
    topic: str, partition: int, log_start: int, end: int, first_at_or_after: int | None, first_ms: int | None
) -> str | None:
    """Why a partition cannot be reprocessed, or None. ``log_start``/``end``: its first offset still
    held and its end offset; ``first_at_or_after``: the first offset written at or after the
    scan's start (None: none), written at ``first_ms``. Records before ``log_start`` are gone (by
    retention): if the scan would start there, or the partition holds nothing at all, some of
    them may have carried readings of the range."""
    if log_start == 0:
        return None
    if first_at_or_after is None and log_start == end:
        return f"{topic}[{partition}] holds no records any more: its first offset, {log_start}, is its end"
    if first_at_or_after != log_start:
        return None
    written = f", written {iso_time(first_ms * 10**6)}" if first_ms is not None else ""
    return (
        f"{topic}[{partition}] no longer holds the start of the range: its first offset is {log_start}{written}; "
        f"the records before it were deleted"
    )


@dataclass(frozen=True, slots=True)
class ReprocessProgress:
    """Offsets read of those to read (all partitions), readings of the range so far, seconds since the start."""

    done: int
    total: int
    readings: int
    elapsed_s: float


def progress_line(p: ReprocessProgress, width: int = 30) -> str:
    """``[#####-----]  42%  120 000 / 285 000 records  55 000 readings/s  ETA 3 s``."""
    share = 1.0 if p.total <= 0 else min(1.0, p.done / p.total)
    filled = int(share * width)
    bar = "#" * filled + "-" * (width - filled)
    rate = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    readings_rate = p.readings / p.elapsed_s if p.elapsed_s > 0 else 0.0
    eta = f"ETA {math.ceil((p.total - p.done) / rate)} s" if rate > 0 and p.done < p.total else ""
    line = f"[{bar}] {share:4.0%}  {p.done:,} / {p.total:,} records  {readings_rate:,.0f} readings/s  {eta}"
    return line.replace(",", " ").rstrip()


@dataclass
class ReprocessReport:
    """What a reprocess did: ``plan`` (its domains those with a readings topic), partitions and
    records read, readings of the range, the measurements cleared, and the processor's counters
    (rejections by reason, windows written)."""

    plan: ReprocessPlan
    partitions: int = 0
    without_topic: list[str] = field(default_factory=list)  # domains left as stored: Kafka has no readings topic
    to_read: int = 0  # records between the first and last offset that can carry a reading of the range
    records: int = 0
    readings: int = 0
    deleted: list[str] = field(default_factory=list)
    stats: ProcessorStats = field(default_factory=ProcessorStats)


class _InRange(ForwardingStore):
    """The store as the engine sees it: aggregates of windows across an end of the range stay as stored."""

    def __init__(self, inner: RewritableStore, plan: ReprocessPlan) -> None:
        super().__init__(inner)
        self._plan = plan
        self._names = {w.name for w in plan.windows}

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        name = source.removeprefix("processor:")
        if name in self._names:
            inside = self._plan.window_inside(name, points.ts_ns)
            if not inside.all():
                points = _rows(points, np.flatnonzero(inside))
        return await self._inner.write(points, source)


def _rows(points: PointColumns, rows: np.ndarray[Any, np.dtype[np.int64]]) -> PointColumns:
    from portpulse.contract.points import Categorical

    tags = {k: Categorical(v.codes[rows], v.categories) if isinstance(v, Categorical) else v[rows]
            for k, v in points.tags.items()}  # fmt: skip
    measurement = points.measurement if isinstance(points.measurement, str) else points.measurement[rows]
    return PointColumns(measurement, tags, {k: v[rows] for k, v in points.fields.items()}, points.ts_ns[rows])


async def reprocess(
    settings: Settings,
    store: RewritableStore,
    plan: ReprocessPlan,
    on_progress: Callable[[ReprocessProgress], None] | None = None,
    progress_every_s: float = 1.0,
    stall_timeout_s: float = 120.0,
    dry_run: bool = False,
) -> ReprocessReport:
    """Delete what ``store`` holds for ``plan`` and write it again from the readings Kafka holds;
    ``on_progress`` is called about every ``progress_every_s``. Raises :class:`ConfigError`
    (before anything is deleted) where a partition no longer holds the range, and
    :class:`ServiceUnavailableError` when Kafka gives nothing for ``stall_timeout_s``.
    ``dry_run``: only the checks, and the count of records a run would read."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from portpulse.kafka import client_options, columnar_consumer_options, start_client, topic_partitions

    k = settings.kafka
    report = ReprocessReport(plan)
    consumer = AIOKafkaConsumer(
        **client_options(k), enable_auto_commit=False, request_timeout_ms=k.request_timeout_ms,
        fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=2 * 1024 * 1024, **columnar_consumer_options(),
    )  # fmt: skip
    await start_client(consumer, k, "reprocess consumer")
    try:
        partitions = await topic_partitions(k, [readings_topic(d, k.topic_prefix) for d in plan.domains])
        present = tuple(d for d in plan.domains if readings_topic(d, k.topic_prefix) in partitions)
        report.without_topic = [d for d in plan.domains if d not in present]
        if not present:
            raise ConfigError(f"Kafka has no readings topic for {', '.join(plan.domains)}: nothing to reprocess")
        plan = report.plan = dataclasses.replace(plan, domains=present)
        tps = [TopicPartition(t, p) for t, ids in sorted(partitions.items()) for p in ids]
        consumer.assign(tps)
        scan_from_ms, scan_to_ms = plan.scan_ms(settings.ingest.max_future_s, settings.ingest.max_past_s)
        firsts = await consumer.offsets_for_times(dict.fromkeys(tps, scan_from_ms))
        lasts = await consumer.offsets_for_times(dict.fromkeys(tps, scan_to_ms))
        highs = await consumer.end_offsets(tps)
        log_starts = await consumer.beginning_offsets(tps)
        lost = []
        for tp in tps:
            first = firsts[tp]
            at, written = (first.offset, first.timestamp) if first is not None else (None, None)
            if reason := lost_range(tp.topic, tp.partition, log_starts[tp], highs[tp], at, written):
                lost.append(reason)
        if lost:
            raise ConfigError("; ".join(lost) + ". Reprocess a later range, or nothing is rewritten")
        starts = {tp: (firsts[tp].offset if firsts[tp] is not None else highs[tp]) for tp in tps}
        ends = {tp: (lasts[tp].offset if lasts[tp] is not None else highs[tp]) for tp in tps}
        report.to_read = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        report.partitions = len(tps)
        if dry_run:
            return report
        for measurement, start_ns, stop_ns in plan.deletions():
            await store.delete_range(measurement, start_ns, stop_ns)
            report.deleted.append(measurement)
        await _rewrite(consumer, settings, store, plan, starts, ends, report, on_progress, progress_every_s,
                       stall_timeout_s)  # fmt: skip
    finally:
        await consumer.stop()
    return report


async def _rewrite(
    consumer: Any,
    settings: Settings,
    store: RewritableStore,
    plan: ReprocessPlan,
    starts: dict[Any, int],
    ends: dict[Any, int],
    report: ReprocessReport,
    on_progress: Callable[[ReprocessProgress], None] | None,
    progress_every_s: float,
    stall_timeout_s: float,
) -> None:
    engine_settings = EngineSettings(plan.windows, k_sigma=settings.processor.spike_k_sigma, series_ttl_s=math.inf)
    engine = ProcessorEngine(engine_settings, load_catalogue(settings.processor.catalogue))
    emitter = Emitter(engine, _InRange(store, plan), report.stats)
    part_ids: dict[tuple[str, int], int] = {}
    end_of: dict[int, int] = {}
    for tp in starts:
        end_of[part_ids.setdefault((tp.topic, tp.partition), len(part_ids))] = ends[tp]
        consumer.seek(tp, starts[tp])
    end_table = np.array([end_of[p] for p in range(len(part_ids))], dtype=np.int64)  # by the engine's id
    remaining = {tp for tp in starts if ends[tp] > starts[tp]}
    for tp in set(starts) - remaining:
        consumer.pause(tp)
    total = sum(max(0, ends[tp] - starts[tp]) for tp in starts)
    position = dict(starts)
    began = last_report = time.monotonic()
    deadline = began + stall_timeout_s
    receipts: list[WriteReceipt] = []

    def progress() -> ReprocessProgress:
        done = sum(min(position[tp], ends[tp]) - starts[tp] for tp in starts)
        return ReprocessProgress(done, total, report.readings, time.monotonic() - began)

    while remaining:
        if time.monotonic() > deadline:
            raise ServiceUnavailableError("kafka", f"no records for {stall_timeout_s:g} s while reprocessing")
        batch = await consumer.getmany(*remaining, timeout_ms=1000)
        if batch:
            deadline = time.monotonic() + stall_timeout_s
        readings, codes, records, _bad = decode_fetch(batch, part_ids, settings.kafka.topic_prefix)
        keep = (
            (readings.offset < end_table[readings.partition])
            & (readings.ts_ns >= plan.start_ns) & (readings.ts_ns < plan.stop_ns)
        )  # fmt: skip
        readings, codes = readings.take(keep), codes.take(keep)
        report.records += records
        report.readings += len(readings)
        for tp in list(remaining):
            position[tp] = await consumer.position(tp)
            if position[tp] >= ends[tp]:
                remaining.discard(tp)
                consumer.pause(tp)
        finished = frozenset(part_ids[(tp.topic, tp.partition)] for tp in starts if tp not in remaining)
        out = engine.ingest(readings, time.monotonic(), finished, codes)
        receipts += await emitter.emit(out, len(readings))
        receipts = [r for r in receipts if not r.done()]
        if on_progress is not None and time.monotonic() - last_report >= progress_every_s:
            on_progress(progress())
            last_report = time.monotonic()
    # Every partition is read: close every window that is still open.
    closing = time.monotonic() + engine_settings.idle_timeout_s + 1
    out = engine.ingest(Readings.empty(), closing, frozenset(part_ids.values()))
    receipts += await emitter.emit(out, 0)
    await store.flush()
    for receipt in receipts:
        await receipt.wait()
    if on_progress is not None:
        on_progress(progress())


def describe(report: ReprocessReport) -> str:
    """The closing summary of a run, for the terminal."""
    s, p = report.stats, report.plan
    rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(s.rejected.items())) or "none"
    return (
        f"reprocessed {iso_time(p.start_ns)} .. {iso_time(p.stop_ns)} of {', '.join(p.domains)}: "
        f"{report.records} records read, {report.readings} readings in the range, rejected: {rejected}; "
        f"{s.windows + s.windows_corrected} window aggregates written"
    )
