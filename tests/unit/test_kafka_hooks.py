"""The aiokafka internals PortPulse relies on: checked against the oldest and newest aiokafka the
pin admits, a change is detected (error log, gauge 0, public path), and ``BatchSender`` sends the
same records either way (a fake producer at the seam; aiokafka's own parser reads them back)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.consumer import fetcher
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.record.default_records import DefaultRecordBatch
from prometheus_client import REGISTRY

from portpulse.codecs.recordbatch import OutgoingRecords, encode_headers
from portpulse.kafka import BatchSender, check_hooks
from portpulse.kafka.hooks import columnar_consumer_options

ROOT = Path(__file__).resolve().parents[2]
COMPAT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["portpulse"]["aiokafka-compat"]
COMPAT_DIR = ROOT / ".venv" / "aiokafka-compat"

# Runs in a child process with one aiokafka version first on sys.path: the check, then a record
# set through aiokafka's own fetcher names (MemoryRecords -> PartitionRecords) with the hook on.
PROBE = """
import numpy as np, aiokafka
from aiokafka.consumer import fetcher
from aiokafka.record.util import calc_crc32c
from portpulse.codecs.recordbatch import RecordColumns, encode_headers, encode_records, frame_batch
from portpulse.kafka.hooks import check_hooks, columnar_consumer_options
status = check_hooks()
opts = columnar_consumer_options()
src = np.frombuffer(b"k1v1k2v2", dtype=np.uint8)
recs = encode_records(src, np.array([0, 4]), np.array([2, 2]), [(np.array([2, 6]), np.array([2, 2]))],
                      encode_headers([]))
raw = frame_batch(recs, 2, 0, 0, (-1, -1, -1), calc_crc32c)
parts = fetcher.PartitionRecords(None, fetcher.MemoryRecords(raw), None, 0, None, opts["value_deserializer"], True,
                                 fetcher.READ_UNCOMMITTED)
(cols,) = list(parts)
assert isinstance(cols, RecordColumns), type(cols)
data = cols.data.tobytes()
got = [(int(o), data[s:s + n]) for o, s, n in zip(cols.offset, cols.value_start, cols.value_len)]
print(aiokafka.__version__, status.fetch, status.produce, got == [(0, b"v1"), (1, b"v2")], parts.next_fetch_offset)
"""


@pytest.mark.parametrize("version", COMPAT)
def test_hooks_fit_each_aiokafka_the_pin_admits(version: str) -> None:
    where = COMPAT_DIR / version
    assert (where / "aiokafka").is_dir(), f"{where} is missing: `make install` puts aiokafka {version} there"
    env = {**os.environ, "PYTHONPATH": str(where)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [version, "True", "True", "True", "2"]


def test_the_pinned_range_is_the_tested_range() -> None:
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("aiokafka"))  # fmt: skip
    assert pin.endswith(f">={COMPAT[0].removesuffix('.0')},<0.15"), pin
    assert COMPAT[-1].startswith("0.14.")


@pytest.fixture
def fresh_check() -> Iterator[None]:
    check_hooks.cache_clear()
    yield
    check_hooks.cache_clear()


def _gauge(hook: str) -> float | None:
    return REGISTRY.get_sample_value("portpulse_kafka_fast_path", {"hook": hook})


@pytest.mark.usefixtures("fresh_check")
def test_a_changed_fetcher_turns_the_columnar_fetch_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def partition_records(tp: Any, records: Any, fetch_offset: int, deserializer: Any) -> Any:
        raise AssertionError("never called")

    columnar_consumer_options()  # installed first, as in a process that already consumed
    check_hooks.cache_clear()
    monkeypatch.setattr(fetcher, "PartitionRecords", partition_records)
    with caplog.at_level(logging.ERROR, logger="portpulse.kafka"):
        status = check_hooks()
    assert (status.fetch, status.produce) == (False, True)
    assert "PartitionRecords takes ('tp', 'records', 'fetch_offset', 'deserializer')" in status.problems[0]
    assert _gauge("fetch") == 0 and _gauge("produce") == 1
    assert "fetch fast path does not fit" in caplog.text
    columnar_consumer_options()
    assert fetcher.PartitionRecords is partition_records  # not replaced


@pytest.mark.usefixtures("fresh_check")
def test_a_changed_message_batch_turns_framed_batches_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MessageBatch, "get_data_buffer", lambda self: self._builder.build())
    status = check_hooks()
    assert (status.fetch, status.produce) == (True, False)
    assert status.problems == ("MessageBatch.get_data_buffer no longer calls _builder._build(",)
    assert _gauge("produce") == 0


class FakeProducer:
    """The part of ``AIOKafkaProducer`` :class:`BatchSender` uses: batches are kept, acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, Any]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(16384, 0)  # compression type 0: none

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.sent.append((topic, partition, batch))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def records(self) -> list[tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        """Every sent record as aiokafka's own parser reads it: (topic, partition, key, value, headers)."""
        out = []
        for topic, partition, batch in self.sent:
            batch._set_producer_state(1, 0, 0)
            for rec in DefaultRecordBatch(bytearray(batch._build())):
                out.append((topic, partition, rec.key, rec.value, list(rec.headers)))
        return out


def _outgoing(values: bytes = b"abcdefghij") -> OutgoingRecords:
    """Ten records of three keys over two topics, one byte of ``values`` each."""
    keys = [b"crane-1", b"crane-2", b"crane-3"]
    data = np.frombuffer(b"".join(keys) + values, dtype=np.uint8)
    n = 10
    return OutgoingRecords(
        data=data,
        topics=["portpulse.readings.crane", "portpulse.readings.air"],
        topic=np.array([i % 2 for i in range(n)], dtype=np.int64),
        keys=keys,
        key=np.array([i % 3 for i in range(n)], dtype=np.int64),
        key_start=np.array([0, 7, 14], dtype=np.int64),
        value_parts=((np.arange(21, 21 + n, dtype=np.int64), np.ones(n, dtype=np.int64)),),
        headers=encode_headers([("v", b"1")]),
    )


@pytest.mark.usefixtures("fresh_check")
async def test_batch_sender_sends_the_same_records_with_and_without_framed_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = _outgoing()
    framed = FakeProducer()
    assert await BatchSender(framed).send_columns(records) == 0
    check_hooks.cache_clear()
    monkeypatch.setattr(MessageBatch, "set_producer_state", lambda self, *a: None)
    public = FakeProducer()
    assert await BatchSender(public).send_columns(records) == 0
    assert all(isinstance(b, BatchBuilder) for _, _, b in public.sent)
    assert not any(isinstance(b, BatchBuilder) for _, _, b in framed.sent)
    want = sorted((t, k, v, [("v", b"1")]) for t, k, v in records.as_tuples())
    sent = {"framed": framed.records(), "public": public.records()}
    for got in sent.values():
        assert sorted((t, k, v, h) for t, _, k, v, h in got) == want
        # a key's records share one partition
        by_key: dict[tuple[str, bytes | None], set[int]] = {}
        for t, p, k, _, _ in got:
            by_key.setdefault((t, k), set()).add(p)
        assert all(len(parts) == 1 for parts in by_key.values())
    placed = {how: sorted((t, p, k) for t, p, k, _, _ in got) for how, got in sent.items()}
    assert placed["framed"] == placed["public"]  # murmur2 partitions either way


@pytest.mark.usefixtures("fresh_check")
async def test_many_plain_tuples_are_sent_as_columns_and_arrive_as_tuples_would() -> None:
    """A registry's worth of new series (a key and a value each, no headers) takes the columnar
    path; Kafka gets the same records in the same partitions as through aiokafka's builder. One
    tombstone or one record with headers keeps the whole call on the tuple path."""
    from portpulse.kafka import client

    records: list[client.KafkaOut] = [
        ("portpulse.registry" if i % 3 else "other", f"air/quai/s-{i}".encode(), b'{"first_seen": %d}' % i, None)
        for i in range(client._COLUMNS_FROM + 5)
    ]
    as_columns, as_tuples = FakeProducer(), FakeProducer()
    assert await BatchSender(as_columns).send_all(records) == 0
    assert (
        await BatchSender(as_tuples)._until_acknowledged(records, BatchSender(as_tuples)._send_batches, list.__add__)
        == 0
    )
    assert not any(isinstance(b, BatchBuilder) for _, _, b in as_columns.sent)
    got = sorted(as_columns.records())
    assert got == sorted(as_tuples.records())
    assert sorted((t, k, v) for t, _, k, v, _ in got) == sorted((t, k, v) for t, k, v, _ in records)
    for odd in ((records[0][0], records[0][1], None, None), (*records[0][:3], [("h", b"1")])):
        mixed = FakeProducer()
        await BatchSender(mixed).send_all([*records, odd])
        assert all(isinstance(b, BatchBuilder) for _, _, b in mixed.sent)
        assert len(mixed.records()) == len(records) + 1


@pytest.mark.usefixtures("fresh_check")
async def test_batch_sender_places_keys_alike_with_the_compiled_murmur2_and_aiokafkas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from portpulse.kafka import client

    records = _outgoing()
    compiled = FakeProducer()
    await BatchSender(compiled).send_columns(records)
    monkeypatch.setattr(client, "key_hashes", lambda keys: None)  # an install without the C half
    python = FakeProducer()
    await BatchSender(python).send_columns(records)
    placed = [sorted((t, p, k) for t, p, k, _, _ in producer.records()) for producer in (compiled, python)]
    assert placed[0] == placed[1] and len(placed[0]) == 10
    assert len({p for _, p, _ in placed[0]}) > 1  # the keys spread over partitions


class QueueingProducer(FakeProducer):
    """aiokafka's accumulator at the seam: one batch queued per partition; a send that finds one
    waits (``asyncio.wait``, as aiokafka's ``wait_drain``) until the sender drains it, here
    ``drain_s`` after it was queued. ``on_drain`` (optional) runs after the first drain."""

    def __init__(self, drain_s: float) -> None:
        super().__init__()
        self.drain_s = drain_s
        self.queued: dict[tuple[str, int], asyncio.Future[None]] = {}
        self.on_drain: Callable[[], None] | None = None

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        tp = (topic, partition)
        while tp in self.queued:
            await asyncio.wait([self.queued[tp]])
        drained = self.queued[tp] = loop.create_future()
        self.sent.append((topic, partition, batch))

        def drain() -> None:
            del self.queued[tp]
            drained.set_result(None)
            hook, self.on_drain = self.on_drain, None
            if hook is not None:
                hook()

        loop.call_later(self.drain_s, drain)
        return await super().send_batch(batch, topic, partition=partition)


@pytest.mark.usefixtures("fresh_check")
async def test_concurrent_sends_keep_each_partition_in_call_order() -> None:
    """A send waiting for a partition's queued batch is woken a loop turn after the drain; a send
    starting in that turn finds the partition free. Sends still queue in call order, so a key's
    records stay in order across concurrent deliveries."""
    producer = QueueingProducer(drain_s=0.01)
    sender = BatchSender(producer)
    deliveries = {b"0123456789": "first", b"abcdefghij": "second", b"ABCDEFGHIJ": "third"}
    tasks = [asyncio.create_task(sender.send_columns(_outgoing(b"0123456789")))]
    await asyncio.sleep(0)  # the first delivery's batches are queued
    tasks.append(asyncio.create_task(sender.send_columns(_outgoing(b"abcdefghij"))))  # waits on a partition
    producer.on_drain = lambda: tasks.append(asyncio.create_task(sender.send_columns(_outgoing(b"ABCDEFGHIJ"))))
    for _ in range(200):  # bounded: every delivery is acknowledged well within 2 s
        await asyncio.sleep(0.01)
        if len(tasks) == 3 and all(t.done() for t in tasks):
            break
    assert [t.result() for t in tasks] == [0, 0, 0]
    order: dict[tuple[str, int], list[str]] = {}
    for topic, partition, _key, value, _ in producer.records():
        delivery = next(name for data, name in deliveries.items() if value is not None and value in data)
        sequence = order.setdefault((topic, partition), [])
        if not sequence or sequence[-1] != delivery:
            sequence.append(delivery)
    assert len(order) >= 2
    assert all(sequence == ["first", "second", "third"] for sequence in order.values()), order


class StalledProducer(FakeProducer):
    """A producer whose batches are never acknowledged (aiokafka #1101), and whose stop hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_called = False

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.sent.append((topic, partition, batch))
        return asyncio.get_running_loop().create_future()

    async def stop(self) -> None:
        self.stop_called = True
        await asyncio.Event().wait()


async def _send_until_replaced(
    producer: FakeProducer, delivery_timeout_s: float
) -> tuple[Any, BatchSender, FakeProducer, list[Exception], int]:
    """Send a delivery through ``producer``, with a fresh fake producer to replace it: the records,
    the sender, the fresh producer, the failures reported and the retries counted."""
    records = _outgoing()
    fresh = FakeProducer()
    failures: list[Exception] = []

    async def new_producer() -> FakeProducer:
        return fresh

    sender = BatchSender(producer, on_failure=failures.append, delivery_timeout_s=delivery_timeout_s,
                         new_producer=new_producer)  # fmt: skip
    retries = await asyncio.wait_for(sender.send_columns(records), 10)
    return records, sender, fresh, failures, retries


@pytest.mark.usefixtures("fresh_check")
async def test_batches_a_stalled_producer_never_acknowledges_are_sent_again_by_a_new_one() -> None:
    stalled = StalledProducer()
    records, sender, fresh, failures, retries = await _send_until_replaced(stalled, delivery_timeout_s=0.05)
    assert retries == 1
    assert sender.producer is fresh
    assert [type(f).__name__ for f in failures] == ["KafkaTimeoutError"]
    assert "0.05 s" in str(failures[0])
    want = sorted((t, k, v) for t, k, v in records.as_tuples())
    assert sorted((t, k, v) for t, _, k, v, _ in fresh.records()) == want
    assert len(stalled.sent) == len(fresh.sent) > 0
    await asyncio.sleep(0)
    assert stalled.stop_called


class FailingProducer(FakeProducer):
    """A producer that answers every batch with an error at once (stale metadata after a broker
    restart), never stalling: only the time spent failing can tell it is wedged."""

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        from aiokafka.errors import LeaderNotAvailableError

        self.sent.append((topic, partition, batch))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_exception(LeaderNotAvailableError())
        return future


@pytest.mark.usefixtures("fresh_check")
async def test_a_producer_that_keeps_failing_is_replaced_after_the_delivery_timeout() -> None:
    records, sender, fresh, failures, retries = await _send_until_replaced(FailingProducer(), delivery_timeout_s=0.3)
    assert sender.producer is fresh and retries >= 2  # it retried the failing one first
    assert {type(f).__name__ for f in failures} == {"LeaderNotAvailableError"}
    want = sorted((t, k, v) for t, k, v in records.as_tuples())
    assert sorted((t, k, v) for t, _, k, v, _ in fresh.records()) == want
