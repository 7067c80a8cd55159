"""The processor against the real Kafka: a known stream yields exactly the expected windows."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from portpulse.codecs.wire import VERSION_HEADER, encode_value
from portpulse.contract.points import (
    Categorical,
    MemoryPointSink,
    PointColumns,
    SeriesRange,
    StoredReadings,
    WriteReceipt,
)
from portpulse.contract.settings import KafkaSettings, ProcessorSettings, Settings
from portpulse.processors.loop import run_processor
from tests.services import KafkaEndpoint

pytestmark = pytest.mark.integration

T0 = int(time.time()) // 3600 * 3600 - 2 * 3600  # s, on a minute boundary, within the correction horizon
SENSORS = [f"no2-{i}" for i in range(6)]


def known_stream() -> tuple[list[tuple[str, str, int, float]], dict[str, int], tuple[str, str, int, float]]:
    """(sensor, metric, ts_s, value) in send order, the expected rejections, and the late reading."""
    rows = []
    for step in range(60):  # 5 minutes, every 5 s
        for i, sensor in enumerate(SENSORS):
            rows.append((sensor, "no2", T0 + 5 * step, 40.0 + i + (step % 7) * 0.5))
            if i < 2:
                rows.append((sensor, "pm25", T0 + 5 * step, 10.0 + (step % 3)))
    rows.insert(300, ("no2-1", "no2", T0 + 186, 400.0))  # a spike at its own instant
    rows.insert(310, ("no2-2", "no2", T0 + 50, 40.0 + 2 + (10 % 7) * 0.5))  # the same reading again: dropped
    rows.insert(315, ("no2-2", "no2", T0 + 55, 99.0))  # another value at an instant already seen
    rows.insert(320, ("no2-3", "no2", T0 + 122, -5.0))  # out of range
    late = ("no2-4", "no2", T0 + 12, 41.0)
    return rows, {"spike": 1, "duplicate": 1, "out_of_range": 1}, late


def expected_windows(rows: list[tuple[str, str, int, float]]) -> dict[tuple[str, str, int], dict[str, float]]:
    good: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    bad: dict[tuple[str, str, int], int] = {}
    seen: dict[tuple[str, str, int], float] = {}
    for sensor, metric, ts, value in rows:
        window = (sensor, metric, (ts // 60) * 60)
        if seen.get((sensor, metric, ts)) == value:
            continue  # delivered again: the same reading
        if value >= 400.0 or value < 0 or (sensor, metric, ts) in seen:  # the injected spikes are >= 400
            bad[window] = bad.get(window, 0) + 1
            continue
        seen[(sensor, metric, ts)] = value
        good.setdefault(window, []).append((ts, value))
    out = {}
    for window, values in good.items():
        v = [x for _, x in values]
        out[window] = {
            "count": len(v), "rejected": bad.get(window, 0), "mean": statistics.fmean(v), "min": min(v),
            "max": max(v), "last": max(values)[1], "stddev": statistics.pstdev(v),
            "p95": float(np.percentile(v, 95)),
        }  # fmt: skip
    return out


async def produce(kafka: KafkaEndpoint, prefix: str, rows: list[tuple[str, str, int, float]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for sensor, metric, ts, value in rows:
            record = encode_value("quai", [metric], [0], [ts * 10**9], [value], [0])
            await producer.send(f"{prefix}.readings.air", record, key=sensor.encode(), headers=[VERSION_HEADER])
        await producer.flush()
    finally:
        await producer.stop()


async def create_topic(kafka: KafkaEndpoint, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def windows_of(sink: MemoryPointSink) -> dict[tuple[str, str, int], dict[str, float]]:
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for source, points in sink.writes:
        if source != "processor:1m":
            continue
        sensors = points.tags["sensor_id"]
        names = sensors.categories[sensors.codes] if isinstance(sensors, Categorical) else sensors
        for field_name, column in points.fields.items():
            metric, _, stat = field_name.rpartition("_")
            for sensor, ts, value in zip(names.tolist(), points.ts_ns.tolist(), column.tolist(), strict=True):
                if not (isinstance(value, float) and math.isnan(value)):  # absent: the sensor's other metrics
                    out.setdefault((sensor, metric, ts // 10**9), {})[stat] = value
    return out


async def _late_count(kafka: KafkaEndpoint, prefix: str) -> int:
    from tests.integration.pipeline import consume

    return len(await consume(kafka, [f"{prefix}.late"], expect=1, timeout_s=1, idle_s=0))


def assert_windows_equal(
    got: dict[Any, dict[str, float]], expected: dict[Any, dict[str, float]], rel_tol: float = 1e-12
) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        have = got[key]
        assert have["count"] == want["count"] and have["rejected"] == want["rejected"], key
        for stat in ("mean", "min", "max", "last", "stddev", "p95"):
            assert math.isclose(have[stat], want[stat], rel_tol=rel_tol, abs_tol=rel_tol), (key, stat)


async def test_known_stream_gives_exactly_the_expected_windows(kafka: KafkaEndpoint, unique: str) -> None:
    rows, rejections, late = known_stream()
    await create_topic(kafka, f"{unique}.readings.air", 3)
    await produce(kafka, unique, rows)
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique,
                                            consumer_group=f"{unique}-g"))  # fmt: skip
    sink = MemoryPointSink()
    expected = expected_windows(rows)
    stop = asyncio.Event()
    task = start_member(settings, sink, stop)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while loop.time() < deadline and len(windows_of(sink)) < len(expected) and not task.done():
        await asyncio.sleep(0.2)
    await produce(kafka, unique, [late])  # behind its series' closed window: a correction
    expected = expected_windows([*rows, late])
    late_window = ("no2-4", "no2", T0)
    while loop.time() < deadline and not task.done():
        await asyncio.sleep(0.2)
        if windows_of(sink).get(late_window, {}).get("count") == expected[late_window]["count"]:
            break
    stop.set()
    stats = await asyncio.wait_for(task, 60)
    assert_windows_equal(windows_of(sink), expected)
    assert stats.rejected == rejections
    assert stats.repeated == 1 and stats.late == 0
    assert stats.corrections == 1 and stats.windows_corrected == 1
    raw_writes = [p for source, p in sink.writes if source == "processor:raw"]
    raw_values = sum(int(np.isfinite(column).sum()) for p in raw_writes for column in p.fields.values())
    # the late reading is a valid raw point
    assert raw_values == len(rows) + 1 - sum(rejections.values()) - stats.repeated
    # one line per sensor and instant: no2 and pm25 of no2-0 and no2-1 share theirs
    assert sum(len(p) for p in raw_writes) < raw_values
    assert await _late_count(kafka, unique) == 0


async def wait_for_members(kafka: KafkaEndpoint, group: str, members: int, timeout_s: float = 60) -> None:
    """Poll the group until ``members`` consumers are in it with partitions assigned and it is stable."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            described = await admin.describe_consumer_groups([group])
            state = described[0].groups[0] if hasattr(described[0], "groups") else None
            if state is not None and state[2] == "Stable" and len(state[5]) == members:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"group {group} did not reach {members} stable members")
    finally:
        await admin.close()


def start_member(settings: Settings, sink: MemoryPointSink, stop: asyncio.Event) -> asyncio.Task[Any]:
    """A processor in this loop: 1-minute windows, 2 s lateness, 1 s idle timeout."""
    return asyncio.create_task(run_processor(settings, sink, stop, "1m", allowed_lateness_s=2, idle_timeout_s=1))


class MemberSink(MemoryPointSink):
    """One member's view of a store shared by the group (as InfluxDB is): it keeps its own writes
    (which windows this member emitted) and writes and reads through the shared store."""

    def __init__(self, shared: MemoryPointSink) -> None:
        super().__init__()
        self.shared = shared

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        self.writes.append((source, points))
        return await self.shared.write(points, source)

    async def read(self, query: SeriesRange) -> StoredReadings:
        return await self.shared.read(query)


async def two_member_setup(
    kafka: KafkaEndpoint, unique: str
) -> tuple[list[tuple[str, str, int, float]], Settings, list[MemberSink], dict[Any, Any], asyncio.Event]:
    """The known stream, a 4-partition topic, group settings, two members' views of one store,
    expected windows, a stop."""
    rows, _, _ = known_stream()
    await create_topic(kafka, f"{unique}.readings.air", 4)
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique,
                                            consumer_group=f"{unique}-g"))  # fmt: skip
    shared = MemoryPointSink()
    return rows, settings, [MemberSink(shared), MemberSink(shared)], expected_windows(rows), asyncio.Event()


async def wait_for_all_windows(sinks: list[MemberSink], expected: dict[Any, Any], timeout_s: float = 90) -> None:
    """Poll (bounded) until the shared store holds every expected window's counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    def complete() -> bool:
        got = windows_of(sinks[0].shared)
        counts = ("count", "rejected")
        return all(tuple(got.get(k, {}).get(c) for c in counts) == tuple(w[c] for c in counts)
                   for k, w in expected.items())  # fmt: skip

    while loop.time() < deadline and not complete():
        await asyncio.sleep(0.2)


async def test_two_processors_split_partitions_and_together_match_one(kafka: KafkaEndpoint, unique: str) -> None:
    rows, settings, sinks, expected, stop = await two_member_setup(kafka, unique)
    tasks = [start_member(settings, sink, stop) for sink in sinks]
    # Both members hold partitions before the stream starts, so the split is deterministic.
    await wait_for_members(kafka, f"{unique}-g", 2)
    await produce(kafka, unique, rows)
    await wait_for_all_windows(sinks, expected)
    stop.set()
    stats = await asyncio.gather(*tasks)
    a, b = windows_of(sinks[0]), windows_of(sinks[1])
    assert a and b, "both processors should have owned partitions"
    assert not set(a) & set(b)  # a stable split: each window from exactly one processor
    assert_windows_equal({**a, **b}, expected)
    assert stats[0].readings + stats[1].readings == len(rows)
    print(f"split: {len(a)} / {len(b)} windows; readings {stats[0].readings} / {stats[1].readings}")


async def test_processor_joining_mid_stream_changes_no_window(kafka: KafkaEndpoint, unique: str) -> None:
    """A second member joins while the first is mid-stream: the eager rebalance hands the first
    its partitions back, and the windows it rebuilds from the committed offsets are still exact."""
    rows, settings, sinks, expected, stop = await two_member_setup(kafka, unique)
    await produce(kafka, unique, rows[:200])
    tasks = [start_member(settings, sinks[0], stop)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline and not any(source == "processor:raw" for source, _ in sinks[0].writes):
        await asyncio.sleep(0.05)
    assert sinks[0].writes, "the first processor never consumed"
    tasks.append(start_member(settings, sinks[1], stop))
    await wait_for_members(kafka, f"{unique}-g", 2)
    await produce(kafka, unique, rows[200:])
    await wait_for_all_windows(sinks, expected)
    stop.set()
    await asyncio.gather(*tasks)
    assert windows_of(sinks[0]) and windows_of(sinks[1]), "both members should have emitted windows"
    # The first 200 rows reach T0+120 s: the conflicting value at T0+55 (row 315) arrives after
    # its window was emitted and corrects it (its rejection counted there); nothing is late.
    assert await _late_count(kafka, unique) == 0
    assert_windows_equal(windows_of(sinks[0].shared), expected)  # the store's final state


async def test_a_new_domain_topic_mid_stream_resumes_partitions_from_memory(kafka: KafkaEndpoint, unique: str) -> None:
    """A topic of a new domain appears while the processor is mid-stream: the pattern
    subscription rebalances the group, which revokes every partition and hands each back. The
    processor resumes them from memory (nothing replayed, no window recomputed from the store)
    and the windows stay exact."""
    from portpulse.processors.loop import Processor

    rows, settings, sinks, expected, stop = await two_member_setup(kafka, unique)
    settings = Settings(kafka=settings.kafka, processor=ProcessorSettings(topic_discovery_s=2))
    sink = sinks[0]
    await produce(kafka, unique, rows[:200])
    async with Processor(settings, sink, "1m", allowed_lateness_s=2, idle_timeout_s=1) as processor:
        task = asyncio.create_task(processor.run(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline and processor.stats.readings < 200 and not task.done():
            await asyncio.sleep(0.05)
        assert processor.stats.readings == 200 and processor.stats.windows > 0
        await create_topic(kafka, f"{unique}.readings.berth", 1)
        # the consumer's metadata refresh (topic_discovery_s, 2 s), then a rebalance: well within 25 s,
        # and past it with the default discovery interval (30 s)
        deadline = loop.time() + 25
        while loop.time() < deadline and processor.stats.resumed == 0 and not task.done():
            await asyncio.sleep(0.1)
        await produce(kafka, unique, rows[200:])
        await wait_for_all_windows(sinks, expected)
        stop.set()
        stats = await asyncio.wait_for(task, 60)
    # every air partition with records consumed before the rebalance came back from memory
    air_partitions = len({hash_partition(sensor.encode(), 4) for sensor, *_ in rows[:200]})
    assert stats.resumed == air_partitions
    # replaying from the commit would have handed the engine records it had already read
    assert stats.replayed == 0 and stats.readings == len(rows)
    assert_windows_equal(windows_of(sink.shared), expected)


def hash_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key``."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("compression", ["lz4", "zstd", None])
async def test_columnar_fetch_reads_exactly_what_was_sent(
    kafka: KafkaEndpoint, unique: str, compression: str | None
) -> None:
    """The processor's fetch path (record sets parsed as columns) against the real broker, while an
    ordinary consumer in the same process still gets aiokafka's records."""
    from aiokafka import AIOKafkaConsumer

    from portpulse.codecs.recordbatch import RecordColumns
    from portpulse.kafka import columnar_consumer_options, fetched_columns

    topic = f"{unique}.readings.air"
    await create_topic(kafka, topic, 1)
    sent = [(f"s-{i % 37}".encode() if i % 50 else None, bytes([i % 251]) * (i % 300)) for i in range(2000)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=5,
                                compression_type=compression)  # fmt: skip
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value, key=key) for key, value in sent])
    finally:
        await producer.stop()

    async def read(columnar: bool) -> list[Any]:
        options = columnar_consumer_options() if columnar else {}
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
                                    enable_auto_commit=False, **options)  # fmt: skip
        await consumer.start()
        items: list[Any] = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while loop.time() < deadline:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    items += batch
                if sum(len(i) if isinstance(i, RecordColumns) else 1 for i in items) >= len(sent):
                    break
        finally:
            await consumer.stop()
        return items

    columnar, plain = await read(True), await read(False)
    assert columnar and all(isinstance(item, RecordColumns) for item in columnar)
    cols = fetched_columns(columnar)
    assert [(cols.key(i), cols.value(i)) for i in range(len(cols))] == sent
    assert cols.offset.tolist() == list(range(len(sent)))
    assert [(r.key, r.value) for r in plain] == sent


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
async def test_columns_written_by_portpulse_arrive_in_key_order_on_murmur2_partitions(
    kafka: KafkaEndpoint, unique: str, compression: str
) -> None:
    """BatchSender.send_columns (batches framed by PortPulse, delivered by aiokafka's idempotent
    producer) through the real broker: split into many small batches, every record arrives once,
    each key on the partition Kafka's own clients would choose, in the order it was sent."""
    from aiokafka import AIOKafkaConsumer

    from portpulse.codecs.recordbatch import OutgoingRecords, encode_headers
    from portpulse.kafka import BatchSender, start_producer

    topic = f"{unique}.readings.air"
    await create_topic(kafka, topic, 3)
    keys = [f"s-{k}".encode() for k in range(41)]
    values = [bytes([i % 251]) * (i % 300 + 1) for i in range(3000)]
    key_of = [i % 41 if i % 97 else -1 for i in range(3000)]  # some null keys
    blob = b"".join(keys) + b"".join(values)
    key_start = np.cumsum([0] + [len(k) for k in keys[:-1]], dtype=np.int64)
    value_len = np.array([len(v) for v in values], dtype=np.int64)
    value_start = len(b"".join(keys)) + np.cumsum(value_len) - value_len
    out = OutgoingRecords(np.frombuffer(blob, np.uint8), [topic], np.zeros(3000, np.int64), keys,
                          np.array(key_of, dtype=np.int64), key_start, ((value_start, value_len),),
                          encode_headers([("pp-v", b"1")]))  # fmt: skip
    producer = await start_producer(KafkaSettings(bootstrap_servers=kafka.bootstrap_servers), "test producer")
    try:
        sender = BatchSender(producer, compression=compression, max_batch_bytes=16_384)
        assert await sender.send_columns(out) == 0
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    got: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(got) < len(values) and loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                got += batch
    finally:
        await consumer.stop()
    assert len(got) == len(values)
    assert {tuple(tuple(h) for h in r.headers) for r in got} == {(("pp-v", b"1"),)}
    for k, key in enumerate(keys):
        mine = [r for r in got if r.key == key]
        assert {r.partition for r in mine} == {hash_partition(key, 3)}
        assert [r.value for r in mine] == [values[i] for i in range(3000) if key_of[i] == k]
    assert sorted(r.value for r in got if r.key is None) == sorted(values[i] for i in range(3000) if key_of[i] < 0)
