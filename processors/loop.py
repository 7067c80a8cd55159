"""The Kafka consumer loop that drives the processor engine (the thin I/O edge).

``getmany`` batch -> decode the compact values into columns -> engine (clean, windows per series)
-> sink writes -> windows behind a correction recomputed from the store (after flushing it) ->
readings beyond the correction horizon to ``portpulse.late`` -> commit each partition up to the
oldest record still needed (open window or unwritten point), with what a restart needs to know
as commit metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import orjson

from portpulse.codecs.recordbatch import RecordColumns, concat_columns, intern_slices
from portpulse.codecs.wire import WIRE_DECODER, decode_columns
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.errors import ServiceUnavailableError
from portpulse.contract.points import Categorical, PointStore, WriteReceipt
from portpulse.contract.schema import str_array
from portpulse.contract.settings import Settings
from portpulse.contract.topics import late_topic, pipeline_topics
from portpulse.kafka import (
    BatchSender,
    client_options,
    columnar_consumer_options,
    committed_offsets,
    ensure_topics,
    fetched_columns,
    start_client,
    start_producer,
)
from portpulse.processors.clean import HAMPEL_KERNEL
from portpulse.processors.engine import (
    EngineOutput,
    EngineSettings,
    KeyCodes,
    LateReading,
    PartitionPosition,
    ProcessorEngine,
    Readings,
)
from portpulse.processors.metrics import PROCESSOR_METRICS
from portpulse.processors.window import AGGREGATE_KERNEL, parse_windows

__all__ = ["Emitter", "Processor", "ProcessorStats", "decode_fetch", "run_processor"]

log = logging.getLogger("portpulse.processor")

#: Per partition id, the engine's positions before a step.
Positions = dict[int, PartitionPosition]


@dataclass
class ProcessorStats:
    records: int = 0
    readings: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    late: int = 0
    repeated: int = 0
    deferred: int = 0  # readings judged against their neighbours in the store
    rejudged: int = 0  # readings whose verdict changed when a reading before them arrived
    corrections: int = 0  # (reading, window) pairs behind an emitted window
    windows_corrected: int = 0
    replayed: int = 0
    bad_records: int = 0
    commits: int = 0
    resumed: int = 0  # partitions handed back by a rebalance and resumed from memory


#: Kafka keys decoded to sensor names, kept across fetches (at most this many, then started over)
_MAX_KEY_NAMES = 1_000_000


def decode_fetch(
    records_by_tp: dict[Any, list[Any]],
    part_ids: dict[tuple[str, int], int],
    prefix: str,
    key_names: dict[bytes, str] | None = None,
) -> tuple[Readings, KeyCodes, int, int]:
    """A fetch -> reading columns (one vectorised decode for all partitions); returns the columns,
    labels of their series keys, the count of records and the count of undecodable records.
    ``key_names``: the sensor names of keys seen before, updated (a fleet's keys recur in every
    fetch: each is decoded once, and later stages get the same string objects)."""
    head = f"{prefix}.readings."
    columns = []
    domains: list[str] = []
    parts: list[int] = []
    for tp, items in records_by_tp.items():
        cols = fetched_columns(items)
        columns.append(cols)
        domains.append(tp.topic[len(head) :])
        parts.append(part_ids.setdefault((tp.topic, tp.partition), len(part_ids)))
    cols = concat_columns(columns) if columns else RecordColumns.of([])
    sizes = [len(c) for c in columns]
    wire = decode_columns(cols.data, cols.value_start, cols.value_len)
    r = wire.record
    key_codes, distinct = intern_slices(cols.data, cols.key_start, cols.key_len)
    # Null keys (length -1) and empty ones both name no sensor.
    known = {} if key_names is None else key_names
    found = list(map(known.get, distinct))
    if None in found:
        if len(known) > _MAX_KEY_NAMES:
            known.clear()
        found = [
            known.setdefault(key, key.decode(errors="replace")) if name is None else name
            for key, name in zip(distinct, found, strict=True)
        ]
    names = str_array(cast(list[str], found))
    of_tp = np.repeat(np.arange(len(sizes)), sizes)[r]
    # The names stay dictionary-encoded: the engine reorders and filters rows many times.
    readings = Readings(
        Categorical(of_tp, str_array(domains)), Categorical(key_codes[r], names), wire.site, wire.metric,
        wire.ts_ns, wire.value, np.array(parts, dtype=np.int64)[of_tp], cols.offset[r],
    )  # fmt: skip
    # A record's key names its sensor within its topic (domain); its value's header, the site.
    headers = int(wire.header.max()) + 1 if len(r) else 1
    codes = KeyCodes((of_tp * len(distinct) + key_codes[r]) * headers + wire.header, wire.name_code)
    return readings, codes, len(cols), len(wire.bad)


class Emitter:
    """Sends what the engine emits to the store, each phase leaving it consistent (points
    written, retractions done) before the next one reads it back: points -> retractions ->
    deferred readings judged against the store -> windows recomputed from it -> late readings
    (to ``send_late``; None: the engine was given no correction horizon). Counts into ``stats``."""

    def __init__(
        self,
        engine: ProcessorEngine,
        sink: PointStore,
        stats: ProcessorStats,
        send_late: Callable[[list[LateReading]], Awaitable[None]] | None = None,
    ) -> None:
        self.engine, self._sink, self.stats, self._send_late = engine, sink, stats, send_late

    async def emit(self, out: EngineOutput, readings: int) -> list[WriteReceipt]:
        """Everything ``out`` (from a step of ``readings`` readings) asks for; the receipts of its writes."""
        receipts = await self._write(out)
        await self._retract(out.retract)
        if out.deferred is not None:
            receipts += await self._judge_deferred(out)
        if len(out.recompute):
            receipts += await self._recompute(out)
        if out.late:
            if self._send_late is None:
                raise ValueError("the engine sent readings to the late topic, and this run has none")
            await self._send_late(out.late)
        self._count(out, readings)
        return receipts

    async def _write(self, out: EngineOutput) -> list[WriteReceipt]:
        return [await self._sink.write(points, source=f"processor:{kind}") for kind, points in out.points]

    async def _judge_deferred(self, out: EngineOutput) -> list[WriteReceipt]:
        """Readings too far out of order for the in-memory history, judged against their
        neighbours in the store once it holds everything written so far; their results join
        ``out`` (for the retractions and recomputations that follow)."""
        assert out.deferred is not None
        await self._sink.flush()
        stored = [await self._sink.read(query) for query in self.engine.neighbour_ranges(out.deferred)]
        more = self.engine.ingest_deferred(out.deferred, stored, time.monotonic())
        receipts = await self._write(more)
        await self._retract(more.retract)
        more.points, more.retract = [], []
        out.absorb(more)
        self.stats.deferred += len(out.deferred.series)
        return receipts

    async def _retract(self, retract: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]) -> None:
        """Readings rejected when judged again: once their rejections are stored, their raw
        values leave the store, before anything reads it back."""
        if not retract:
            return
        await self._sink.flush()
        for domain, metric, instants in self.engine.retractions(retract):
            await self._sink.retract(domain, metric, instants)

    async def _recompute(self, out: EngineOutput) -> list[WriteReceipt]:
        """Windows behind a correction (or possibly emitted before a restart): once the store
        holds everything written so far, read their readings back and aggregate them again."""
        received = time.perf_counter()
        await self._sink.flush()
        stored = [await self._sink.read(query) for query in self.engine.stored_ranges(out.recompute)]
        fixed = self.engine.recomputed(out.recompute, stored)
        receipts = await self._write(fixed)
        self.stats.windows_corrected += fixed.windows_emitted
        PROCESSOR_METRICS.windows_corrected.inc(fixed.windows_emitted)
        PROCESSOR_METRICS.correction_seconds.observe(time.perf_counter() - received)
        PROCESSOR_METRICS.correction_lag.set(time.perf_counter() - received)
        return receipts

    def _count(self, out: EngineOutput, readings: int) -> None:
        stats = self.stats
        stats.rejudged += out.rejudged
        stats.corrections += out.corrections
        stats.repeated += out.repeated
        stats.windows += out.windows_emitted
        stats.replayed += out.replayed
        for reason, count in out.rejected.items():
            stats.rejected[reason] = stats.rejected.get(reason, 0) + count
            PROCESSOR_METRICS.rejected.labels(reason).inc(count)
        PROCESSOR_METRICS.rejudged.inc(out.rejudged)
        PROCESSOR_METRICS.corrections.inc(out.corrections)
        PROCESSOR_METRICS.repeated.inc(out.repeated)
        PROCESSOR_METRICS.records.inc(readings)
        PROCESSOR_METRICS.windows.inc(out.windows_emitted)


def late_record(late: LateReading) -> bytes:
    """The ``portpulse.late`` value: JSON with domain, sensor_id, metric, ts_ns, value, reason
    (``beyond_correction_horizon``) and lateness_ns (how far before the horizon it is). orjson,
    because a backfilling gateway can make many readings late at once."""
    return orjson.dumps(
        {"domain": late.domain, "sensor_id": late.sensor_id, "metric": late.metric, "ts_ns": late.ts_ns,
         "value": late.value, "reason": "beyond_correction_horizon", "lateness_ns": late.lateness_ns}
    )  # fmt: skip


def commit_metadata(engine: ProcessorEngine, consumed_until: int, closed_before: tuple[int, ...]) -> str:
    return json.dumps({"next": consumed_until, "closed": dict(zip(engine.window_names(), closed_before, strict=True))})


def restore(engine: ProcessorEngine, partition: int, metadata: str) -> bool:
    """Restore a partition from its commit metadata; False when there is none we can read."""
    try:
        m = json.loads(metadata)
        closed = {str(name): int(end) for name, end in m["closed"].items()}
        engine.restore(partition, int(m["next"]), closed)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


class Processor:
    """Consumes ``{prefix}.readings.*`` in group ``kafka.consumer_group`` into the engine and writes
    what it emits to ``sink``; use with ``async with`` and :meth:`run`.

    One step (:meth:`step`) is one fetch: decode -> :meth:`ProcessorEngine.ingest` -> write points ->
    judge deferred readings against the store -> retract raw values rejected on re-judging ->
    recompute corrected windows from the store -> late readings to their topic -> commit.
    ``fetch_max_bytes`` bounds a step (compressed bytes as stored: several times as many bytes of
    records). The rebalance callbacks run in aiokafka's coordinator task: one lock keeps a step
    from running half before and half after a revocation, and keeps records of a newly assigned
    partition out of the engine until its state is restored from the commit metadata.
    """

    def __init__(
        self,
        settings: Settings,
        sink: PointStore,
        windows: str = "10s,1m,15m",
        allowed_lateness_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        fetch_max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._fetch_max_bytes = fetch_max_bytes
        self.engine = ProcessorEngine(
            EngineSettings(
                parse_windows(windows),
                int(allowed_lateness_s * 1e9),
                idle_timeout_s,
                k_sigma=settings.processor.spike_k_sigma,
                horizon_ns=int(settings.ingest.max_past_s * 1e9),
                series_ttl_s=settings.processor.series_ttl_s,
            ),
            load_catalogue(settings.processor.catalogue),
        )
        self.stats = ProcessorStats()
        self._emitter = Emitter(self.engine, sink, self.stats, self._send_late)
        self._part_ids: dict[tuple[str, int], int] = {}  # (topic, partition) -> the engine's partition id
        self._key_names: dict[bytes, str] = {}  # Kafka key -> sensor name (see decode_fetch)
        self._tps: dict[int, Any] = {}  # the engine's partition id -> aiokafka TopicPartition
        # Steps whose points are not all stored yet, with the engine's positions before each.
        self._pending: list[tuple[list[WriteReceipt], Positions]] = []
        self._lock = asyncio.Lock()
        self._consumer: Any = None
        self._late_producer: Any = None
        self._late_sender: BatchSender | None = None
        self._failure: BaseException | None = None  # raised by the next step: see _assigned
        # Engine partition ids revoked, until the next assignment says whether they come back,
        # and per partition the (offset, metadata) this member committed last.
        self._kept: set[int] = set()
        self._committed: dict[int, tuple[int, str] | None] = {}

    async def __aenter__(self) -> Processor:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

        k = self._settings.kafka
        processor = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await processor._revoked(revoked)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await processor._assigned(assigned)

        domains = load_catalogue(self._settings.processor.catalogue).domains()
        created = await ensure_topics(
            k, pipeline_topics(k.topic_prefix, domains), horizon_s=self._settings.ingest.max_past_s
        )
        if created:
            log.info("created Kafka topics %s", ", ".join(created))
        self._late_producer = await start_producer(k, "late-record producer")
        self._late_sender = BatchSender(self._late_producer, kafka=k)
        self._consumer = AIOKafkaConsumer(
            **client_options(k),
            group_id=k.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=self._fetch_max_bytes,
            max_partition_fetch_bytes=min(self._fetch_max_bytes, 2 * 1024 * 1024),
            # the pattern subscription finds new domains' topics when the metadata is refreshed
            metadata_max_age_ms=int(self._settings.processor.topic_discovery_s * 1000),
            fetch_min_bytes=self._settings.processor.fetch_min_bytes,
            fetch_max_wait_ms=self._settings.processor.fetch_wait_ms,
            **columnar_consumer_options(),
        )
        try:
            await start_client(self._consumer, k, "readings consumer")
            self._consumer.subscribe(pattern=f"^{re.escape(k.topic_prefix)}\\.readings\\..+", listener=Listener())
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._late_producer is not None:
            await self._late_producer.stop()
            self._late_producer = None

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> ProcessorStats:
        """Steps until ``stop`` is set (sets ``ready`` first), then writes and commits everything."""
        if ready is not None:
            ready.set()
        while not stop.is_set():
            await self.step()
        await self._sink.flush()
        await self._wait_pending()
        await self._commit(self._safe_commit())
        return self.stats

    async def step(self, timeout_ms: int = 200) -> None:
        """One fetch through the engine to the sink, then a commit of what is safe."""
        if self._failure is not None:
            raise self._failure
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        async with self._lock:
            # Never process records of a partition taken away by a rebalance during this fetch:
            # its new owner replays them from the committed offset.
            owned = self._consumer.assignment()
            await self._process({tp: records for tp, records in batch.items() if tp in owned}, owned)
            offsets = self._safe_commit()
        # Outside the lock: a commit may wait for a rebalance, whose callback needs the lock.
        await self._commit(offsets)

    async def _process(self, batch: dict[Any, list[Any]], owned: Any) -> None:
        engine, stats = self.engine, self.stats
        started = time.perf_counter()
        before = engine.safe_offsets()
        readings, codes, records, bad = decode_fetch(
            batch, self._part_ids, self._settings.kafka.topic_prefix, self._key_names
        )
        for tp in batch:
            self._tps[self._part_ids[(tp.topic, tp.partition)]] = tp
        stats.records += records
        stats.readings += len(readings)
        stats.bad_records += bad
        out = engine.ingest(readings, time.monotonic(), self._caught_up(owned), codes, time.time_ns())
        receipts = await self._emitter.emit(out, len(readings))
        PROCESSOR_METRICS.batch_seconds.observe(time.perf_counter() - started)
        PROCESSOR_METRICS.event_time_lag.set(engine.event_time_lag_ns(time.time_ns()) / 1e9)
        PROCESSOR_METRICS.series.set(engine.series_count)
        self._pending.append((receipts, before))

    def _caught_up(self, owned: Any) -> frozenset[int]:
        """Partitions consumed up to their high watermark (their quiet series may close on idle);
        sets the consumer-lag gauge on the way."""
        from aiokafka.errors import KafkaError

        caught_up = set()
        for pid, tp in list(self._tps.items()):
            with contextlib.suppress(AssertionError, KafkaError):  # not ours any more
                high = self._consumer.highwater(tp)
                if tp in owned and high is not None:
                    consumed = max(self.engine.next_offset(pid), 0)
                    PROCESSOR_METRICS.consumer_lag.labels(tp.topic, str(tp.partition)).set(high - consumed)
                    if consumed >= high:
                        caught_up.add(pid)
        return frozenset(caught_up)

    async def _send_late(self, late: list[LateReading]) -> None:
        assert self._late_sender is not None
        topic = late_topic(self._settings.kafka.topic_prefix)
        await self._late_sender.send_all([(topic, r.sensor_id.encode(), late_record(r), None) for r in late])
        self.stats.late += len(late)
        PROCESSOR_METRICS.late.inc(len(late))

    # ---------------------------------------------------------------- commits and rebalances

    def _safe_commit(self) -> dict[Any, Any]:
        """The offsets to commit: the state before the oldest step whose points are not all
        stored yet. Each pending entry holds the engine's positions from *before* its step, so a
        commit never covers records (or emitted windows, via the commit metadata) that are not
        durable."""
        from aiokafka.structs import OffsetAndMetadata

        pending = self._pending
        while pending and all(r.done() for r in pending[0][0]):
            pending.pop(0)
        positions = pending[0][1] if pending else self.engine.safe_offsets()
        return {
            self._tps[p]: OffsetAndMetadata(at.commit, commit_metadata(self.engine, at.consumed_until, at.closed))
            for p, at in positions.items()
            if p in self._tps and p not in self._kept and at.commit >= 0
        }

    async def _commit(self, offsets: dict[Any, Any]) -> None:
        """Commit; a commit refused because the group is rebalancing is skipped (the revocation
        commits again, and an older commit only means a longer replay)."""
        from aiokafka.errors import KafkaError

        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            log.info("commit skipped (%s); the next one covers it", type(exc).__name__)
            return
        for tp, at in offsets.items():
            self._committed[self._part_ids[(tp.topic, tp.partition)]] = (at.offset, at.metadata)
        self.stats.commits += 1

    async def _wait_pending(self) -> None:
        for receipts, _ in self._pending:
            for r in receipts:
                await r.wait()

    async def _revoked(self, revoked: Any) -> None:
        """Commit what is safe, and keep the state of the revoked partitions aside: an eager
        rebalance (a member joins, a new domain's topic appears) revokes every partition and
        mostly hands each back to the same member, which then resumes where it was instead of
        replaying and recomputing every open window of a fleet from the store."""
        async with self._lock:
            await self._sink.flush()
            await self._wait_pending()
            # Refused when the subscription itself changed (a new topic matched the pattern):
            # aiokafka has already dropped the assignment. The kept state then stays ahead of
            # the group's commit, which is still the one we made last.
            await self._commit(self._safe_commit())
            for tp in revoked:
                pid = self._part_ids.get((tp.topic, tp.partition))
                if pid is not None:
                    self._kept.add(pid)
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    def _forget(self, pid: int) -> None:
        """Drop a partition's state (now someone else's, or stale)."""
        self.engine.drop([pid])
        self._kept.discard(pid)
        self._committed.pop(pid, None)
        tp = self._tps.get(pid)
        if tp is not None:
            with contextlib.suppress(KeyError):
                PROCESSOR_METRICS.consumer_lag.remove(tp.topic, str(tp.partition))

    async def _assigned(self, assigned: Any) -> None:
        from aiokafka.errors import IllegalStateError

        async with self._lock:
            k = self._settings.kafka
            try:
                committed = await committed_offsets(k, k.consumer_group, list(assigned))
            except ServiceUnavailableError as exc:
                # Without the commit metadata a restart is no longer exact: stop, loudly (aiokafka
                # would only log an exception raised here and go on).
                self._failure = exc
                return
            kept, self._kept = self._kept, set()
            resumed = []
            for tp in assigned:
                pid = self._part_ids.setdefault((tp.topic, tp.partition), len(self._part_ids))
                self._tps[pid] = tp
                entry = committed.get(tp)
                group_commit = None if entry is None else (entry.offset, entry.metadata)
                kept.discard(pid)
                if self.engine.next_offset(pid) >= 0 and group_commit == self._committed.get(pid):
                    # Nobody has committed since we last did: whoever held it in between (if
                    # anyone) read the same records and wrote the same points, so our state is
                    # still the group's; go on from where it stands instead of replaying.
                    try:
                        self._consumer.seek(tp, self.engine.next_offset(pid))
                    except IllegalStateError:  # reassigned again meanwhile: replay, as below
                        pass
                    else:
                        resumed.append(tp)
                        continue
                # Consumption restarts at the committed offset: any state of ours is stale.
                self._forget(pid)
                if entry is not None:
                    self._committed[pid] = group_commit
                    if not restore(self.engine, pid, entry.metadata or ""):
                        # Committed without metadata we can read: whatever was emitted is unknown,
                        # so every window recomputes from the store (exact, only slower).
                        log.warning("%s[%d]: commit metadata unreadable; windows recompute from the store",
                                    tp.topic, tp.partition)  # fmt: skip
                        self.engine.restore(pid, entry.offset,
                                            {name: 2**63 - 1 for name in self.engine.window_names()})  # fmt: skip
            for pid in kept:  # revoked and now someone else's
                self._forget(pid)
            self.stats.resumed += len(resumed)
        log.info("partitions assigned: %s (%d resumed from memory)",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned), len(resumed))  # fmt: skip


async def run_processor(
    settings: Settings,
    sink: PointStore,
    stop: asyncio.Event,
    windows: str = "10s,1m,15m",
    allowed_lateness_s: float = 10.0,
    idle_timeout_s: float = 30.0,
    fetch_max_bytes: int = 16 * 1024 * 1024,
    ready: asyncio.Event | None = None,
) -> ProcessorStats:
    """A :class:`Processor` run until ``stop`` is set; sets ``ready`` once it has started."""
    processor = Processor(settings, sink, windows, allowed_lateness_s, idle_timeout_s, fetch_max_bytes)
    log.info(
        "processor: wire decoding %s, Hampel checks %s, window aggregates %s",
        WIRE_DECODER, HAMPEL_KERNEL, AGGREGATE_KERNEL,
    )  # fmt: skip
    for kernel, what, cost in (
        (WIRE_DECODER, "the wire decoding", "reading a fetch costs about 1.6 times the CPU"),
        (HAMPEL_KERNEL, "the Hampel checks", "cleaning costs about three times the CPU"),
        (AGGREGATE_KERNEL, "the window aggregation", "closing windows costs more CPU"),
    ):
        if kernel != "compiled":
            log.warning(
                "%s is not compiled (no C compiler at install time?): %s; reinstall with gcc to build it (setup.py)",
                what, cost,
            )  # fmt: skip
    async with processor:
        return await processor.run(stop, ready)
