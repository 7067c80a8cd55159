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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from portpulse.codecs.recordbatch import RecordColumns, concat_columns, intern_slices
from portpulse.codecs.wire import decode_columns
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.points import PointStore, WriteReceipt
from portpulse.contract.schema import str_array
from portpulse.contract.settings import Settings
from portpulse.contract.topics import late_topic
from portpulse.kafka import BatchSender, client_options, columnar_consumer_options, fetched_columns, start_producer
from portpulse.processors.engine import EngineOutput, EngineSettings, ProcessorEngine, Readings
from portpulse.processors.metrics import PROCESSOR_METRICS
from portpulse.processors.window import parse_windows

__all__ = ["ProcessorStats", "run_processor"]

log = logging.getLogger("portpulse.processor")

_NEG = np.iinfo(np.int64).min


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


def _decode(
    records_by_tp: dict[Any, list[Any]], part_ids: dict[tuple[str, int], int], prefix: str
) -> tuple[Readings, npt.NDArray[np.int64], int, int]:
    """A fetch -> reading columns (one vectorised decode for all partitions); returns the columns,
    their series-key codes (see ``ProcessorEngine.ingest``), the count of records and the count
    of undecodable records."""
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
    names = str_array([k.decode(errors="replace") for k in distinct])
    of_tp = np.repeat(np.arange(len(sizes)), sizes)[r]
    readings = Readings(
        str_array(domains)[of_tp], names[key_codes[r]], wire.site, wire.metric, wire.ts_ns, wire.value,
        np.array(parts, dtype=np.int64)[of_tp], cols.offset[r],
    )  # fmt: skip
    key_code = (of_tp * len(distinct) + key_codes[r]) * (
        int(wire.name_code.max()) + 1 if len(r) else 1
    ) + wire.name_code
    return readings, key_code, len(cols), len(wire.bad)


def _late_record(late: tuple[int, str, str, str, int, float, int]) -> bytes:
    """The ``portpulse.late`` value: JSON with domain, sensor_id, metric, ts_ns, value, reason
    (``beyond_correction_horizon``) and lateness_ns (how far before the horizon it is).
    (orjson: the standard library's encoder was most of the processor's time while a backfilling
    load made many readings late.)"""
    _partition, domain, sensor, metric, ts_ns, value, lateness_ns = late
    return orjson.dumps(
        {"domain": domain, "sensor_id": sensor, "metric": metric, "ts_ns": ts_ns, "value": value,
         "reason": "beyond_correction_horizon", "lateness_ns": lateness_ns}
    )  # fmt: skip


def _commit_metadata(engine: ProcessorEngine, consumed_until: int, closed_before: tuple[int, ...]) -> str:
    return json.dumps({"next": consumed_until, "closed": dict(zip(engine.window_names(), closed_before, strict=True))})


def _restore(engine: ProcessorEngine, partition: int, metadata: str) -> bool:
    """Restore a partition from its commit metadata; False when there is none we can read."""
    try:
        m = json.loads(metadata)
        closed = {str(name): int(end) for name, end in m["closed"].items()}
        engine.restore(partition, int(m["next"]), closed)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


async def _recompute(engine: ProcessorEngine, out: EngineOutput, sink: PointStore) -> EngineOutput:
    """Windows behind a correction (or possibly emitted before a restart): make sure the store
    holds everything written so far, read their readings back, aggregate them."""
    await sink.flush()
    stored = [await sink.read(query) for query in engine.stored_ranges(out.recompute)]
    return engine.recomputed(out.recompute, stored)


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
    """Consume ``{prefix}.readings.*`` in group ``kafka.consumer_group`` until ``stop`` is set;
    sets ``ready`` once the consumer has started. ``fetch_max_bytes`` bounds one step (a fetch,
    compressed bytes as stored: several times as many bytes of records)."""
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
    from aiokafka.errors import KafkaError
    from aiokafka.structs import OffsetAndMetadata

    k = settings.kafka
    engine = ProcessorEngine(
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
    stats = ProcessorStats()
    part_ids: dict[tuple[str, int], int] = {}
    tps: dict[int, Any] = {}
    pending: list[tuple[list[WriteReceipt], dict[int, tuple[int, int, tuple[int, ...]]]]] = []
    consumer = AIOKafkaConsumer(
        **client_options(k),
        group_id=k.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=fetch_max_bytes,
        max_partition_fetch_bytes=min(fetch_max_bytes, 2 * 1024 * 1024),
        metadata_max_age_ms=5000,
        **columnar_consumer_options(),
    )

    def safe_commit() -> dict[Any, Any]:
        """The offsets to commit: the state before the oldest batch whose points are not all
        stored yet. Each pending entry holds the engine's positions from *before* its batch, so a
        commit never covers records (or emitted windows, via the commit metadata) that are
        not durable."""
        while pending and all(r.done() for r in pending[0][0]):
            pending.pop(0)
        positions = pending[0][1] if pending else engine.safe_offsets()
        return {
            tps[p]: OffsetAndMetadata(offset, _commit_metadata(engine, nxt, closed))
            for p, (offset, nxt, closed) in positions.items()
            if p in tps and offset >= 0
        }

    async def commit(offsets: dict[Any, Any]) -> None:
        """Commit; a commit refused because the group is rebalancing is skipped (the revocation
        commits again, and an older commit only means a longer replay)."""
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            stats.commits += 1
        except KafkaError as exc:
            log.info("commit skipped (%s); the next one covers it", type(exc).__name__)

    # The rebalance listener runs in the coordinator's task, concurrently with the fetch loop: the
    # lock keeps a batch from being processed half before and half after a revocation, and keeps
    # records of a newly assigned partition out of the engine until its state is restored.
    state_lock = asyncio.Lock()

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            async with state_lock:
                await sink.flush()
                for receipts, _ in pending:
                    for r in receipts:
                        await r.wait()
                await commit(safe_commit())  # allowed inside the rebalance callback
                ids = [part_ids[(tp.topic, tp.partition)] for tp in revoked if (tp.topic, tp.partition) in part_ids]
                engine.drop(ids)
                for tp in revoked:
                    with contextlib.suppress(KeyError):
                        PROCESSOR_METRICS.consumer_lag.remove(tp.topic, str(tp.partition))
            log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

        async def on_partitions_assigned(self, assigned: Any) -> None:
            async with state_lock:
                committed: dict[Any, Any] = {}
                with contextlib.suppress(Exception):
                    committed = await consumer._coordinator.fetch_committed_offsets(list(assigned))
                for tp in assigned:
                    pid = part_ids.setdefault((tp.topic, tp.partition), len(part_ids))
                    tps[pid] = tp
                    # Consumption restarts at the committed offset: any state of ours is stale.
                    engine.drop([pid])
                    entry = committed.get(tp)
                    if entry is not None and entry.offset >= 0 and not _restore(engine, pid, entry.metadata or ""):
                        # Committed without metadata we can read: whatever was emitted is unknown,
                        # so every window recomputes from the store (exact, only slower).
                        engine.restore(pid, entry.offset, {name: 2**63 - 1 for name in engine.window_names()})
            log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    late_producer = await start_producer(k, "late-record producer")
    late_sender = BatchSender(late_producer)
    await consumer.start()
    try:
        consumer.subscribe(pattern=f"^{re.escape(k.topic_prefix)}\\.readings\\..+", listener=Listener())
        if ready is not None:
            ready.set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            async with state_lock:
                # Never process records of a partition taken away by a rebalance during this fetch:
                # its new owner replays them from the committed offset.
                owned = consumer.assignment()
                batch = {tp: records for tp, records in batch.items() if tp in owned}
                started = time.perf_counter()
                before = engine.safe_offsets()
                readings, key_code, records, bad = _decode(batch, part_ids, k.topic_prefix)
                for tp in batch:
                    tps[part_ids[(tp.topic, tp.partition)]] = tp
                stats.records += records
                stats.readings += len(readings)
                stats.bad_records += bad
                caught_up = set()
                for pid, tp in list(tps.items()):
                    with contextlib.suppress(AssertionError, KafkaError):  # not ours any more
                        high = consumer.highwater(tp)
                        if tp in owned and high is not None:
                            consumed = max(engine.next_offset(pid), 0)
                            PROCESSOR_METRICS.consumer_lag.labels(tp.topic, str(tp.partition)).set(high - consumed)
                            if consumed >= high:
                                caught_up.add(pid)
                out = engine.ingest(readings, time.monotonic(), frozenset(caught_up), key_code, time.time_ns())
                receipts = [await sink.write(points, source=f"processor:{kind}") for kind, points in out.points]
                if out.deferred is not None:
                    # Readings too far out of order for the in-memory history: judged against
                    # their neighbours in the store (after it holds everything written so far).
                    await sink.flush()
                    stored = [await sink.read(query) for query in engine.neighbour_ranges(out.deferred)]
                    more = engine.ingest_deferred(out.deferred, stored, time.monotonic())
                    receipts += [await sink.write(points, source=f"processor:{kind}") for kind, points in more.points]
                    more.points = []
                    out.absorb(more)
                    stats.deferred += len(out.deferred.series)
                if out.retract:
                    # Readings rejected when judged again: their raw values leave the store
                    # before any window is recomputed from it.
                    await sink.flush()
                    for domain, metric, instants in engine.retractions(out.retract):
                        await sink.retract(domain, metric, instants)
                stats.rejudged += out.rejudged
                PROCESSOR_METRICS.rejudged.inc(out.rejudged)
                if len(out.recompute):
                    received = time.perf_counter()
                    fixed = await _recompute(engine, out, sink)
                    receipts += [await sink.write(points, source=f"processor:{kind}") for kind, points in fixed.points]
                    stats.windows_corrected += fixed.windows_emitted
                    PROCESSOR_METRICS.windows_corrected.inc(fixed.windows_emitted)
                    PROCESSOR_METRICS.correction_seconds.observe(time.perf_counter() - received)
                    PROCESSOR_METRICS.correction_lag.set(time.perf_counter() - received)
                stats.corrections += out.corrections
                stats.repeated += out.repeated
                PROCESSOR_METRICS.corrections.inc(out.corrections)
                PROCESSOR_METRICS.repeated.inc(out.repeated)
                for reason, count in out.rejected.items():
                    stats.rejected[reason] = stats.rejected.get(reason, 0) + count
                    PROCESSOR_METRICS.rejected.labels(reason).inc(count)
                stats.windows += out.windows_emitted
                stats.replayed += out.replayed
                if out.late:
                    # Batched like the bridge's records: a backfilling gateway can make many late.
                    topic = late_topic(k.topic_prefix)
                    await late_sender.send_all(
                        [(topic, late[2].encode(), _late_record(late), None) for late in out.late]
                    )
                    stats.late += len(out.late)
                    PROCESSOR_METRICS.late.inc(len(out.late))
                PROCESSOR_METRICS.records.inc(len(readings))
                PROCESSOR_METRICS.windows.inc(out.windows_emitted)
                PROCESSOR_METRICS.batch_seconds.observe(time.perf_counter() - started)
                PROCESSOR_METRICS.event_time_lag.set(engine.event_time_lag_ns(time.time_ns()) / 1e9)
                PROCESSOR_METRICS.series.set(engine.series_count)
                pending.append((receipts, before))
                offsets = safe_commit()
            # Outside the lock: a commit may wait for a rebalance, whose callback needs the lock.
            await commit(offsets)
        await sink.flush()
        for receipts, _ in pending:
            for r in receipts:
                await r.wait()
        await commit(safe_commit())
    finally:
        await consumer.stop()
        await late_producer.stop()
    return stats
