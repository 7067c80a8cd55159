"""Kafka client options and producer start-up shared by every stage (one place for security)."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from portpulse.errors import ServiceUnavailableError
from portpulse.recordbatch import (
    BATCH_HEADER_BYTES,
    OutgoingRecords,
    RecordColumns,
    concat_columns,
    frame_batch,
    parse_record_set,
)
from portpulse.settings import KafkaSettings

__all__ = [
    "BatchSender",
    "KafkaOut",
    "OutgoingRecords",
    "client_options",
    "columnar_consumer_options",
    "fetched_columns",
    "start_producer",
]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the bootstrap servers and SASL/TLS settings."""
    out: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "security_protocol": kafka.security_protocol}
    if kafka.sasl_mechanism:
        out["sasl_mechanism"] = kafka.sasl_mechanism
        out["sasl_plain_username"] = kafka.sasl_username
        out["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = ssl.create_default_context(cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)
    return out


async def start_producer(kafka: KafkaSettings, what: str, **options: Any) -> Any:
    """An idempotent ``acks=all`` producer, started; raises :class:`ServiceUnavailableError` if Kafka
    does not answer (the message names the servers, never credentials)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **client_options(kafka),
        acks="all",
        enable_idempotence=True,
        compression_type=None if kafka.compression == "none" else kafka.compression,
        request_timeout_ms=kafka.request_timeout_ms,
        **options,
    )
    try:
        await producer.start()
    except Exception as exc:
        await producer.stop()
        raise ServiceUnavailableError("kafka", f"{what} at {kafka.bootstrap_servers}: {type(exc).__name__}") from None
    return producer


#: A record to send: (topic, key, value, headers).
KafkaOut = tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]


#: Kafka's codec ids (the low bits of a batch's attributes).
_CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
_LZ4_FAST = 1  # lz4 frame levels below 3 are its fast mode (aiokafka's own path uses 9)


def _compress(codec: int, payload: bytes) -> bytes:
    from aiokafka import codec as kc

    if codec == 3:
        return bytes(kc.lz4_encode(payload, level=_LZ4_FAST))
    encoders = {1: kc.gzip_encode, 2: kc.snappy_encode, 4: kc.zstd_encode}
    return bytes(encoders[codec](payload))


class _FramedBatch:
    """Stands in for aiokafka's ``BatchBuilder`` in ``send_batch``: the records were encoded by
    :func:`encode_records`; compression and the batch frame (which carries the idempotent
    producer's id and sequence, known only when the sender drains it) happen in ``_build``."""

    __slots__ = ("_buffer", "_codec", "_count", "_producer", "_records", "_timestamp_ms")

    def __init__(self, records: bytes, count: int, codec: int) -> None:
        self._records = records
        self._count = count
        self._codec = codec
        self._producer = (-1, -1, -1)
        self._timestamp_ms = int(time.time() * 1000)
        self._buffer: bytes | None = None

    def append(self, **_: Any) -> None:  # full: producer.send() starts a batch of its own
        return None

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self._producer = (producer_id, producer_epoch, base_sequence)

    def _build(self) -> bytes:
        from aiokafka.record.util import calc_crc32c

        if self._buffer is None:
            body, attributes = self._records, 0
            if self._codec:
                compressed = _compress(self._codec, self._records)
                if len(compressed) < len(body):  # like aiokafka: only when it helps
                    body, attributes = compressed, self._codec
            self._buffer = frame_batch(body, self._count, self._timestamp_ms, attributes, self._producer,
                                       calc_crc32c)  # fmt: skip
        return self._buffer

    def size(self) -> int:
        return len(self._buffer if self._buffer is not None else self._records)

    def record_count(self) -> int:
        return self._count


#: Records of one send and the future of their batch's acknowledgement.
_Sent = list[tuple[Any, Any]]


class BatchSender:
    """Send records through ``producer`` until Kafka acknowledged every one.

    Records are packed into per-partition batches here (``send_batch``): tuples through aiokafka's
    ``BatchBuilder`` (:meth:`send_all`, about 7x the rate of one ``send()`` per record), columns
    encoded whole by :func:`encode_records` (:meth:`send_columns`, about 3x less CPU again).
    Partitions come from Kafka's murmur2 of the key, like every other client, so a key's records
    always share a partition. Failed batches are retried with exponential backoff and jitter (0.1 s
    doubling to 5 s), forever: callers bound what they hand over, and report health through
    ``on_failure`` / ``on_recovery(retries)``. ``compression`` and ``max_batch_bytes`` (records
    before compression) apply to :meth:`send_columns`; :meth:`send_all` uses the producer's.
    """

    def __init__(
        self,
        producer: Any,
        on_failure: Callable[[Exception], None] | None = None,
        on_recovery: Callable[[int], None] | None = None,
        compression: str = "none",
        max_batch_bytes: int = 1_048_576,
    ) -> None:
        self._producer = producer
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self._codec = _CODEC_IDS[compression]
        self._max_batch_bytes = max_batch_bytes
        self._partition_counts: dict[str, int] = {}
        self._partition_of: dict[str, dict[bytes, int]] = {}  # topic -> key -> partition
        self._key_hashes: dict[bytes, int] = {}  # key -> murmur2 (positive)
        self._rng = random.Random()

    async def send_all(self, records: list[KafkaOut]) -> int:
        """Send ``(topic, key, value, headers)`` tuples; returns the number of retries it took."""
        return await self._until_acknowledged(records, self._send_batches, list.__add__)

    async def send_columns(self, records: OutgoingRecords) -> int:
        """Send records given as columns; returns the number of retries it took."""
        rows = np.arange(len(records), dtype=np.int64)
        return await self._until_acknowledged(rows, lambda r: self._send_columns(records, r), _concat_rows)

    async def _until_acknowledged(
        self, pending: Any, send: Callable[[Any], Any], join: Callable[[Any, Any], Any]
    ) -> int:
        from aiokafka.errors import KafkaError

        retries = 0
        while True:
            failed = pending[:0]
            try:
                sent = await send(pending)
            except KafkaError as exc:
                sent, failed = [], pending
                self._failed(exc)
            for members, fut in sent:
                try:
                    await fut
                except KafkaError as exc:
                    failed = join(failed, members)
                    self._failed(exc)
            if not len(failed):
                if self._on_recovery is not None:
                    self._on_recovery(retries)
                return retries
            pending = failed
            delay = min(5.0, 0.1 * 2 ** min(retries, 6)) * (0.5 + self._rng.random() / 2)
            retries += 1
            await asyncio.sleep(delay)

    def _failed(self, exc: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure(exc)

    async def _send_batches(self, records: list[KafkaOut]) -> _Sent:
        from aiokafka.partitioner import murmur2

        # Per topic: its partition count, the partition of each key seen, and this call's buckets.
        topics: dict[str, tuple[int, dict[bytes, int], list[list[KafkaOut]]]] = {}
        rng = self._rng
        for rec in records:
            topic, key = rec[0], rec[1]
            state = topics.get(topic)
            if state is None:
                count = await self._partition_count(topic)
                state = topics[topic] = (count, self._partition_of.setdefault(topic, {}), [[] for _ in range(count)])
            count, known, buckets = state
            if key is None:
                part = rng.randrange(count)
            else:
                part = known.get(key, -1)
                if part < 0:
                    part = known[key] = (murmur2(key) & 0x7FFFFFFF) % count
            buckets[part].append(rec)
        if sum(len(known) for known in self._partition_of.values()) > 1_000_000:
            self._partition_of.clear()
        sent: _Sent = []
        for topic, (_, _, buckets) in topics.items():
            for part, recs in enumerate(buckets):
                if recs:
                    sent += await self._send_partition(topic, part, recs)
        return sent

    async def _partition_count(self, topic: str) -> int:
        from aiokafka.errors import KafkaTimeoutError

        count = self._partition_counts.get(topic)
        if count is None:
            partitions = await asyncio.wait_for(self._producer.partitions_for(topic), 30)
            if not partitions:
                raise KafkaTimeoutError(f"no partitions for {topic}")
            count = self._partition_counts[topic] = len(partitions)
        return count

    async def _send_partition(self, topic: str, part: int, recs: list[KafkaOut]) -> _Sent:
        sent: _Sent = []
        batch = self._producer.create_batch()
        members: list[KafkaOut] = []
        for rec in recs:
            if batch.append(key=rec[1], value=rec[2], timestamp=None, headers=rec[3]) is None:
                sent.append((members, await self._producer.send_batch(batch, topic, partition=part)))
                batch, members = self._producer.create_batch(), []  # next batch of this partition
                if batch.append(key=rec[1], value=rec[2], timestamp=None, headers=rec[3]) is None:
                    raise ValueError(f"record of {len(rec[2])} bytes exceeds kafka.max_batch_bytes")
            members.append(rec)
        if members:
            sent.append((members, await self._producer.send_batch(batch, topic, partition=part)))
        return sent

    def _partitions(
        self, records: OutgoingRecords, rows: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """The partition of each row: murmur2 of its key (once per distinct key) modulo its topic's
        partition count; null keys spread at random."""
        from aiokafka.partitioner import murmur2

        known = self._key_hashes
        if len(known) > 1_000_000:
            known.clear()
        hashes = np.array([known.get(k) or known.setdefault(k, murmur2(k) & 0x7FFFFFFF) for k in records.keys] + [0],
                          dtype=np.int64)  # fmt: skip
        key = records.key[rows]
        count = counts[records.topic[rows]]
        part = hashes[key] % count
        null = key < 0
        if null.any():
            part[null] = np.random.default_rng().integers(0, count[null])
        return part

    async def _send_columns(self, records: OutgoingRecords, rows: npt.NDArray[np.int64]) -> _Sent:
        counts = np.array([await self._partition_count(t) for t in records.topics], dtype=np.int64)
        part = self._partitions(records, rows, counts)
        # Rows grouped by (topic, partition), in their order within a group: a key's order holds.
        group = records.topic[rows] * int(counts.max()) + part
        order = np.argsort(group, kind="stable")
        rows, group, part = rows[order], group[order], part[order]
        size = records.size_estimate(rows)
        room = self._max_batch_bytes - BATCH_HEADER_BYTES  # like aiokafka: the frame counts too
        bounds = np.flatnonzero(np.diff(group)) + 1
        sent: _Sent = []
        for first, stop in zip([0, *bounds.tolist()], [*bounds.tolist(), len(rows)], strict=True):
            topic, partition = records.topics[int(records.topic[rows[first]])], int(part[first])
            cum = np.cumsum(size[first:stop])
            start = 0
            while start < stop - first:
                taken = int(cum[start - 1]) if start else 0
                end = max(int(np.searchsorted(cum, taken + room, side="right")), start + 1)
                chunk = rows[first + start : first + end]
                batch = _FramedBatch(records.encode(chunk), len(chunk), self._codec)
                sent.append((chunk, await self._producer.send_batch(batch, topic, partition=partition)))
                start = end
        return sent


def _concat_rows(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.concatenate([a, b])


# ------------------------------------------------------------------ columnar fetches


def _keep_raw(value: bytes) -> bytes:
    """The value deserializer that marks a consumer as columnar (and is the identity if the
    columnar hook is not installed, so such a consumer still works record by record)."""
    return value


class _RawRecordSet:
    """aiokafka's ``MemoryRecords`` that also keeps the fetch response's bytes."""

    __slots__ = ("_inner", "raw")

    def __init__(self, data: bytes) -> None:
        self.raw = data
        self._inner = _MEMORY_RECORDS[0](data)

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def next_batch(self) -> Any:
        return self._inner.next_batch()


class _ColumnarPartitionRecords:
    """Stands in for aiokafka's ``PartitionRecords``: yields one :class:`RecordColumns` for the
    whole fetched record set of a partition instead of one ``ConsumerRecord`` per record."""

    def __init__(self, raw: bytes, fetch_offset: int, check_crcs: bool) -> None:
        self.next_fetch_offset = fetch_offset
        self._raw: bytes | None = raw
        self._check_crcs = check_crcs

    def __iter__(self) -> _ColumnarPartitionRecords:
        return self

    def __next__(self) -> RecordColumns:
        from aiokafka.errors import CorruptRecordException
        from aiokafka.record.util import calc_crc32c

        if self._raw is None:
            raise StopIteration
        raw, self._raw = self._raw, None
        try:
            cols = parse_record_set(raw, self.next_fetch_offset, _decompress,
                                    calc_crc32c if self._check_crcs else None, _legacy_records)  # fmt: skip
        except ValueError as exc:
            raise CorruptRecordException(str(exc)) from None
        self.next_fetch_offset = cols.next_offset
        return cols


def _decompress(codec: int, payload: bytes) -> bytes:
    from aiokafka import codec as kc

    decoders = {1: kc.gzip_decode, 2: kc.snappy_decode, 3: kc.lz4_decode, 4: kc.zstd_decode}
    if codec not in decoders:
        raise ValueError(f"unknown compression codec {codec}")
    return bytes(decoders[codec](payload))


def _legacy_records(batch: bytes) -> list[tuple[int, bytes | None, bytes | None]]:
    records = _MEMORY_RECORDS[0](batch)
    out: list[tuple[int, bytes | None, bytes | None]] = []
    while records.has_next():
        out += [(r.offset, r.key, r.value) for r in records.next_batch()]
    return out


_MEMORY_RECORDS: list[Any] = []


def _install_columnar_fetch() -> bool:
    """Route fetches of consumers made with :func:`columnar_consumer_options` through
    :func:`parse_record_set`; other consumers keep aiokafka's behaviour. True when installed.

    This swaps two names in ``aiokafka.consumer.fetcher`` (the same in aiokafka 0.12 and 0.14,
    pinned in pyproject); if they are not what is expected, nothing is changed and columnar
    consumers fall back to records (:func:`fetched_columns` accepts both)."""
    from aiokafka.consumer import fetcher

    if _MEMORY_RECORDS:
        return True
    original_records = getattr(fetcher, "PartitionRecords", None)
    memory_records = getattr(fetcher, "MemoryRecords", None)
    if original_records is None or memory_records is None or not hasattr(fetcher, "READ_UNCOMMITTED"):
        return False
    _MEMORY_RECORDS.append(memory_records)

    def partition_records(tp: Any, records: Any, aborted: Any, fetch_offset: int, key_deserializer: Any,
                          value_deserializer: Any, check_crcs: bool, isolation_level: int) -> Any:  # fmt: skip
        if value_deserializer is _keep_raw and isolation_level == fetcher.READ_UNCOMMITTED:
            return _ColumnarPartitionRecords(records.raw, fetch_offset, check_crcs)
        return original_records(tp, records, aborted, fetch_offset, key_deserializer, value_deserializer,
                                check_crcs, isolation_level)  # fmt: skip

    fetcher.MemoryRecords = _RawRecordSet
    fetcher.PartitionRecords = partition_records
    return True


def columnar_consumer_options() -> dict[str, Any]:
    """Keyword arguments for an ``AIOKafkaConsumer`` whose ``getmany`` yields, per partition, a
    list of :class:`RecordColumns` (about 8x less CPU per record than ``ConsumerRecord``s)."""
    _install_columnar_fetch()
    return {"value_deserializer": _keep_raw, "isolation_level": "read_uncommitted"}


def fetched_columns(items: list[Any]) -> RecordColumns:
    """One partition's ``getmany`` items as columns: :class:`RecordColumns` from the columnar
    fetch, or ``ConsumerRecord``s (the fallback path) turned into columns."""
    parts = [item for item in items if isinstance(item, RecordColumns)]
    records = [(r.offset, r.key, r.value) for r in items if not isinstance(r, RecordColumns)]
    if records:
        parts.append(RecordColumns.of(records))
    if not parts:
        return RecordColumns.of([])
    return concat_columns(parts)
