"""Every use of aiokafka internals, in one place, checked before use.

PortPulse's throughput needs two things aiokafka's public API does not offer:

- **Columnar fetch.** ``aiokafka.consumer.fetcher`` wraps each partition's fetched bytes in
  ``MemoryRecords(bytes)`` and hands them to ``PartitionRecords(tp, records, aborted_transactions,
  fetch_offset, key_deserializer, value_deserializer, check_crcs, isolation_level)``, which the
  fetcher drains with ``next()`` and ``next_fetch_offset``. :func:`columnar_consumer_options` swaps
  those two module globals so that consumers made with it get one :class:`RecordColumns` per
  partition fetch instead of one ``ConsumerRecord`` per record (about 8x less CPU per record).
  Other consumers in the process keep aiokafka's behaviour.
- **Pre-framed produce batches.** ``AIOKafkaProducer.send_batch(builder, topic, partition=)`` wraps
  its builder in a ``MessageBatch`` whose sender calls ``builder._set_producer_state(id, epoch,
  base_sequence)`` and then ``builder._build()``. :class:`FramedBatch` has that shape
  (:class:`ProducerBatchBuilder`) for records :func:`encode_records` encoded whole.

:func:`check_hooks` tests both against the installed aiokafka (names, signatures, the call sites,
and a batch built by :class:`FramedBatch` read back by aiokafka's own record parser). A hook that
does not fit is never used: an error log names what changed, the gauge
``portpulse_kafka_fast_path{hook}`` is 0, and the public path runs instead (records one by one).
Tests run the check against the oldest and newest aiokafka that pyproject's pin admits.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
from prometheus_client import Gauge

from portpulse.codecs.recordbatch import (
    RecordColumns,
    concat_columns,
    encode_headers,
    encode_records,
    frame_batch,
    parse_record_set,
)

__all__ = [
    "FetcherModule",
    "FramedBatch",
    "HookStatus",
    "ProducerBatchBuilder",
    "check_hooks",
    "columnar_consumer_options",
    "fetched_columns",
    "framed_batches",
]

log = logging.getLogger("portpulse.kafka")

#: ``PartitionRecords``' parameters, in the order the fetcher passes them.
PARTITION_RECORDS_PARAMETERS = (
    "tp",
    "records",
    "aborted_transactions",
    "fetch_offset",
    "key_deserializer",
    "value_deserializer",
    "check_crcs",
    "isolation_level",
)


class FetcherModule(Protocol):
    """The shape of ``aiokafka.consumer.fetcher`` the columnar fetch relies on."""

    MemoryRecords: Callable[[bytes], Any]
    PartitionRecords: Callable[..., Iterator[Any]]
    READ_UNCOMMITTED: int


class ProducerBatchBuilder(Protocol):
    """What aiokafka's ``MessageBatch`` calls on the builder given to ``send_batch``."""

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: int | None, headers: Any) -> Any: ...
    def close(self) -> None: ...
    def closed(self) -> bool: ...
    def size(self) -> int: ...
    def record_count(self) -> int: ...
    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None: ...
    def _build(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class HookStatus:
    """Whether each hook fits the installed aiokafka; ``problems`` says why one does not."""

    fetch: bool
    produce: bool
    problems: tuple[str, ...]


# ------------------------------------------------------------------ codecs behind both hooks

_LZ4_FAST = 1  # lz4 frame levels below 3 are its fast mode (aiokafka's own path uses 9)


def compress(codec: int, payload: bytes) -> bytes:
    """``payload`` compressed with Kafka codec id ``codec`` (1 gzip, 2 snappy, 3 lz4, 4 zstd)."""
    from aiokafka import codec as kc

    if codec == 3:
        return bytes(kc.lz4_encode(payload, level=_LZ4_FAST))
    encoders = {1: kc.gzip_encode, 2: kc.snappy_encode, 4: kc.zstd_encode}
    return bytes(encoders[codec](payload))


def decompress(codec: int, payload: bytes) -> bytes:
    """The inverse of :func:`compress`."""
    from aiokafka import codec as kc

    decoders = {1: kc.gzip_decode, 2: kc.snappy_decode, 3: kc.lz4_decode, 4: kc.zstd_decode}
    if codec not in decoders:
        raise ValueError(f"unknown compression codec {codec}")
    return bytes(decoders[codec](payload))


# ------------------------------------------------------------------ pre-framed produce batches


class FramedBatch:
    """A :class:`ProducerBatchBuilder` for records :func:`encode_records` already encoded:
    compression and the batch frame (which carries the idempotent producer's id and sequence,
    known only when the sender drains the batch) happen in ``_build``."""

    __slots__ = ("_buffer", "_codec", "_count", "_producer", "_records", "_timestamp_ms")

    def __init__(self, records: bytes, count: int, codec: int) -> None:
        self._records = records
        self._count = count
        self._codec = codec
        self._producer = (-1, -1, -1)
        self._timestamp_ms = int(time.time() * 1000)
        self._buffer: bytes | None = None

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: int | None, headers: Any) -> None:
        return None  # full: a producer.send() starts a batch of its own

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._buffer if self._buffer is not None else self._records)

    def record_count(self) -> int:
        return self._count

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self._producer = (producer_id, producer_epoch, base_sequence)

    def _build(self) -> bytes:
        from aiokafka.record.util import calc_crc32c

        if self._buffer is None:
            body, attributes = self._records, 0
            if self._codec:
                compressed = compress(self._codec, self._records)
                if len(compressed) < len(body):  # like aiokafka: only when it helps
                    body, attributes = compressed, self._codec
            self._buffer = frame_batch(body, self._count, self._timestamp_ms, attributes, self._producer,
                                       calc_crc32c)  # fmt: skip
        return self._buffer


def framed_batches() -> bool:
    """True when :class:`FramedBatch` may be given to ``send_batch`` (see :func:`check_hooks`)."""
    return check_hooks().produce


# ------------------------------------------------------------------ columnar fetches


def _keep_raw(value: bytes) -> bytes:
    """The value deserializer that marks a consumer as columnar (and is the identity when the
    columnar hook is not installed, so such a consumer still works record by record)."""
    return value


_MEMORY_RECORDS: list[Callable[[bytes], Any]] = []  # aiokafka's own, once the hook is installed
_PARTITION_RECORDS: dict[str, Callable[..., Any]] = {}  # "original" (aiokafka's) and "installed" (ours)


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
    whole fetched record set of a partition."""

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
            cols = parse_record_set(raw, self.next_fetch_offset, decompress,
                                    calc_crc32c if self._check_crcs else None, _legacy_records)  # fmt: skip
        except ValueError as exc:
            raise CorruptRecordException(str(exc)) from None
        self.next_fetch_offset = cols.next_offset
        return cols


def _legacy_records(batch: bytes) -> list[tuple[int, bytes | None, bytes | None]]:
    """A pre-v2 (magic 0/1) batch read by aiokafka's own parser."""
    from aiokafka.record.memory_records import MemoryRecords

    records = MemoryRecords(batch)
    out: list[tuple[int, bytes | None, bytes | None]] = []
    while records.has_next():
        out += [(r.offset, r.key, r.value) for r in records.next_batch()]
    return out


def _install_columnar_fetch() -> None:
    from aiokafka.consumer import fetcher as module

    fetcher: FetcherModule = module  # the shape check_hooks verified
    if _MEMORY_RECORDS:
        return
    original_records = fetcher.PartitionRecords
    _MEMORY_RECORDS.append(fetcher.MemoryRecords)

    def partition_records(tp: Any, records: Any, aborted: Any, fetch_offset: int, key_deserializer: Any,
                          value_deserializer: Any, check_crcs: bool, isolation_level: int) -> Any:  # fmt: skip
        if value_deserializer is _keep_raw and isolation_level == fetcher.READ_UNCOMMITTED:
            return _ColumnarPartitionRecords(records.raw, fetch_offset, check_crcs)
        return original_records(tp, records, aborted, fetch_offset, key_deserializer, value_deserializer,
                                check_crcs, isolation_level)  # fmt: skip

    fetcher.MemoryRecords = _RawRecordSet
    fetcher.PartitionRecords = partition_records
    _PARTITION_RECORDS.update(original=original_records, installed=partition_records)


def columnar_consumer_options() -> dict[str, Any]:
    """Keyword arguments for an ``AIOKafkaConsumer`` whose ``getmany`` yields, per partition, a
    list of :class:`RecordColumns` when the fetch hook fits (else ``ConsumerRecord``s: read both
    with :func:`fetched_columns`)."""
    if check_hooks().fetch:
        _install_columnar_fetch()
    return {"value_deserializer": _keep_raw, "isolation_level": "read_uncommitted"}


def fetched_columns(items: list[Any]) -> RecordColumns:
    """One partition's ``getmany`` items as columns: :class:`RecordColumns` from the columnar
    fetch, or ``ConsumerRecord``s (the public path) turned into columns."""
    parts = [item for item in items if isinstance(item, RecordColumns)]
    records = [(r.offset, r.key, r.value) for r in items if not isinstance(r, RecordColumns)]
    if records:
        parts.append(RecordColumns.of(records))
    if not parts:
        return RecordColumns.of([])
    return concat_columns(parts)


# ------------------------------------------------------------------ the start-up check


def _fetch_problems(fetcher: Any) -> list[str]:
    missing = [n for n in ("MemoryRecords", "PartitionRecords", "READ_UNCOMMITTED") if not hasattr(fetcher, n)]
    if missing:
        return [f"aiokafka.consumer.fetcher has no {', '.join(missing)}"]
    current = fetcher.PartitionRecords
    if _PARTITION_RECORDS and current is _PARTITION_RECORDS["installed"]:
        current = _PARTITION_RECORDS["original"]  # installed after an earlier check: check what it wraps
    problems = []
    params = tuple(inspect.signature(current).parameters)
    if params != PARTITION_RECORDS_PARAMETERS:
        problems.append(f"PartitionRecords takes {params}, not {PARTITION_RECORDS_PARAMETERS}")
    source = inspect.getsource(fetcher)
    for call in ("MemoryRecords(", "PartitionRecords(", ".next_fetch_offset"):
        if call not in source:
            problems.append(f"the fetcher no longer uses {call!r}")
    return problems


def _produce_problems() -> list[str]:
    from aiokafka.producer import message_accumulator
    from aiokafka.record.default_records import DefaultRecordBatch

    batch_class = getattr(message_accumulator, "MessageBatch", None)
    if batch_class is None:
        return ["aiokafka.producer.message_accumulator has no MessageBatch"]
    problems = []
    for method, call in (
        ("set_producer_state", "_builder._set_producer_state("),
        ("get_data_buffer", "_builder._build("),
    ):
        fn = getattr(batch_class, method, None)
        if fn is None or call not in inspect.getsource(fn):
            problems.append(f"MessageBatch.{method} no longer calls {call}")
    if problems:
        return problems
    # What the sender does with a drained batch, on a stand-in MessageBatch; aiokafka's own parser
    # must read the result with our producer id, epoch and sequence and a valid CRC.
    headers = encode_headers([("v", b"1")])
    src = np.frombuffer(b"keyvalue", dtype=np.uint8)
    one = np.array([0], dtype=np.int64)
    records = encode_records(src, one, np.array([3]), [(np.array([3]), np.array([5]))], headers)
    fake = SimpleNamespace(_builder=FramedBatch(records, 1, 0), _drain_waiter=SimpleNamespace(done=lambda: False))
    batch_class.set_producer_state(fake, 7, 1, 42)
    read = DefaultRecordBatch(bytearray(batch_class.get_data_buffer(fake)))
    got = (read.producer_id, read.producer_epoch, read.base_sequence, read.validate_crc())
    rec = next(iter(read))
    if got != (7, 1, 42, True) or (rec.key, rec.value, list(rec.headers)) != (b"key", b"value", [("v", b"1")]):
        problems.append(f"aiokafka reads a framed batch as {got}, {rec.key!r}, {rec.value!r}, {rec.headers!r}")
    return problems


@functools.cache
def check_hooks() -> HookStatus:
    """Check both hooks against the installed aiokafka, once per process; logs an error and sets
    ``portpulse_kafka_fast_path{hook}`` to 0 for a hook that does not fit."""
    from aiokafka.consumer import fetcher

    fetch = _checked("fetch", lambda: _fetch_problems(fetcher))
    produce = _checked("produce", _produce_problems)
    return HookStatus(not fetch, not produce, tuple(fetch + produce))


def _checked(hook: str, problems_of: Callable[[], list[str]]) -> list[str]:
    try:
        problems = problems_of()
    except Exception as exc:  # any surprise in aiokafka's internals means the hook does not fit
        problems = [f"{type(exc).__name__}: {exc}"]
    _fast_path_gauge().labels(hook).set(0 if problems else 1)
    if problems:
        import aiokafka

        log.error("aiokafka %s: the %s fast path does not fit and is off (public API instead, slower): %s",
                  aiokafka.__version__, hook, "; ".join(problems))  # fmt: skip
    return problems


@functools.cache
def _fast_path_gauge() -> Gauge:
    return Gauge("portpulse_kafka_fast_path", "1 when an aiokafka fast path is in use, 0 when it did not fit", ["hook"])
