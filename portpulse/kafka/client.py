"""The Kafka adapter every stage shares: client options (one place for security), producer
start-up, :class:`BatchSender` and committed offsets with their metadata."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from portpulse.codecs.recordbatch import (
    BATCH_HEADER_BYTES,
    OutgoingRecords,
    decode_headers,
    encode_headers,
    key_hashes,
)
from portpulse.contract.errors import ConfigError, ServiceUnavailableError
from portpulse.contract.settings import KafkaSettings
from portpulse.kafka.hooks import FramedBatch, framed_batches

log = logging.getLogger(__name__)

__all__ = [
    "BatchSender",
    "KafkaOut",
    "OutgoingRecords",
    "client_options",
    "committed_offsets",
    "diagnose",
    "kafka_refused",
    "ssl_context",
    "start_client",
    "start_producer",
]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the bootstrap servers and SASL/TLS settings."""
    out: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "security_protocol": kafka.security_protocol}
    if kafka.sasl_mechanism:
        out["sasl_mechanism"] = kafka.sasl_mechanism
        out["sasl_plain_username"] = kafka.sasl_username
        out["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    if (context := ssl_context(kafka)) is not None:
        out["ssl_context"] = context
    return out


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL``/``SASL_SSL`` (the CA of ``ssl_ca_file``, else the system's); None without TLS."""
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return ssl.create_default_context(cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)


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
    await start_client(producer, kafka, what)
    return producer


async def start_client(client: Any, kafka: KafkaSettings, what: str) -> None:
    """``await client.start()`` for an aiokafka producer, consumer or admin client; if it fails it
    is stopped, and a refusal retrying cannot fix is raised as :class:`ConfigError` (see
    :func:`kafka_refused`, :func:`diagnose`), anything else as :class:`ServiceUnavailableError`."""
    try:
        await client.start()
    except Exception as exc:
        await (client.close() if hasattr(client, "close") else client.stop())
        refused = kafka_refused(kafka, exc, f"the {what}") or await diagnose(kafka)
        if refused is not None:
            raise refused from None
        raise ServiceUnavailableError("kafka", f"{what} at {kafka.bootstrap_servers}: {type(exc).__name__}") from None


def kafka_refused(kafka: KafkaSettings | None, exc: BaseException, what: str) -> ConfigError | None:
    """The error for a refusal that retrying cannot fix (credentials, ACLs, an untrusted
    certificate), naming the hop, the user and the cause, never the password; None otherwise.
    ``what``: what was refused (``"writes to portpulse.readings.air"``)."""
    from aiokafka import errors

    where = f"Kafka {kafka.bootstrap_servers}" if kafka else "Kafka"
    mechanism = kafka.sasl_mechanism if kafka else None
    who = f"user {kafka.sasl_username!r}" if kafka and mechanism else "this client (no SASL user)"
    if isinstance(exc, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
        return ConfigError(
            f"{where} refused {who} ({mechanism}: authentication failed); "
            "check kafka.sasl_username and kafka.sasl_password"
        )
    if isinstance(exc, errors.AuthenticationMethodNotSupported | errors.UnsupportedSaslMechanismError):
        return ConfigError(f"{where} does not offer kafka.sasl_mechanism {mechanism} to {who}")
    denied = (
        errors.TopicAuthorizationFailedError, errors.ClusterAuthorizationFailedError,
        errors.GroupAuthorizationFailedError, errors.TransactionalIdAuthorizationFailed,
    )  # fmt: skip
    if isinstance(exc, denied):
        return ConfigError(f"{where} denied {who} {what} ({type(exc).__name__}): its ACLs do not allow it")
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = kafka.ssl_ca_file if kafka else None
        return ConfigError(
            f"{where}: its TLS certificate is not trusted ({exc.verify_message}); check kafka.ssl_ca_file "
            f"({ca or 'the system CAs'})"
        )
    if isinstance(exc, ssl.SSLError):
        return ConfigError(f"{where}: TLS failed ({exc.reason or exc}); check kafka.security_protocol")
    return None


async def diagnose(kafka: KafkaSettings, timeout_s: float = 10.0) -> ConfigError | None:
    """Why clients cannot bootstrap, where retrying cannot help: aiokafka's clients only log the
    cause (a failed SASL authentication, an untrusted certificate) and raise a bare connection
    error, so one connection to the first bootstrap server is made by hand to find it."""
    from aiokafka.conn import create_conn

    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    options = client_options(kafka)
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host.strip("[]"), int(port), request_timeout_ms=kafka.request_timeout_ms,
                ssl_context=options.get("ssl_context"), security_protocol=kafka.security_protocol,
                sasl_mechanism=options.get("sasl_mechanism"), sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            ),
            timeout_s,
        )  # fmt: skip
    except Exception as exc:
        return kafka_refused(kafka, exc, "a connection")
    conn.close()
    return None


#: A record to send: (topic, key, value, headers).
KafkaOut = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]


#: Kafka's codec ids (the low bits of a batch's attributes).
_CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


#: Records of one send and the future of their batch's acknowledgement.
_Sent = list[tuple[Any, Any]]
#: Records at least in one :meth:`BatchSender.send_all` for it to try them as columns.
_COLUMNS_FROM = 32
_NO_HEADERS = encode_headers([])


def _as_columns(records: list[KafkaOut]) -> OutgoingRecords | None:
    """``records`` as columns when every one has a key and a value and no headers, else None."""
    if any(key is None or value is None or headers for _, key, value, headers in records):
        return None
    topics: dict[str, int] = {}
    topic = np.fromiter((topics.setdefault(t, len(topics)) for t, *_ in records), dtype=np.int64, count=len(records))
    keys = cast(list[bytes], [key for _, key, _, _ in records])
    values = cast(list[bytes], [value for _, _, value, _ in records])
    key_blob = b"".join(keys)
    key_len = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    value_len = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    key_start = np.cumsum(key_len) - key_len
    value_start = len(key_blob) + np.cumsum(value_len) - value_len
    data = np.frombuffer(key_blob + b"".join(values), dtype=np.uint8)
    rows = np.arange(len(records), dtype=np.int64)
    return OutgoingRecords(data, list(topics), topic, keys, rows, key_start, ((value_start, value_len),), _NO_HEADERS)


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

    Concurrent sends (the bridge keeps a second delivery in flight under load) hand their
    batches to the producer one send at a time, in call order: aiokafka queues one batch per
    partition and wakes the sends waiting for it later than a send arriving meanwhile finds the
    slot free, so two sends queuing side by side could swap a key's records.

    A batch not acknowledged within ``delivery_timeout_s`` counts as failed and is sent again.
    aiokafka can leave a batch's future pending for good after a long broker outage (aiokafka
    #1101), so with ``new_producer`` such a stall also replaces the producer: the new one is
    started first, the stalled one is stopped in the background (bounded), and :attr:`producer`
    names the one in use. A batch sent twice this way is a duplicate in Kafka, never a loss.
    """

    def __init__(
        self,
        producer: Any,
        on_failure: Callable[[Exception], None] | None = None,
        on_recovery: Callable[[int], None] | None = None,
        compression: str = "none",
        max_batch_bytes: int = 1_048_576,
        delivery_timeout_s: float = 120.0,
        new_producer: Callable[[], Awaitable[Any]] | None = None,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.producer = producer
        self._kafka = kafka  # named in the error when Kafka refuses the writes
        self._delivery_timeout_s = delivery_timeout_s
        self._new_producer = new_producer
        self._retired: set[asyncio.Task[None]] = set()
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self._codec = _CODEC_IDS[compression]
        self._max_batch_bytes = max_batch_bytes
        self._partition_counts: dict[str, int] = {}
        self._partition_of: dict[str, dict[bytes, int]] = {}  # topic -> key -> partition
        self._key_hashes: dict[bytes, int] = {}  # key -> murmur2 (positive)
        self._rng = random.Random()
        self._queuing = asyncio.Lock()  # one send at a time hands batches to the producer (FIFO)

    async def send_all(self, records: list[KafkaOut]) -> int:
        """Send ``(topic, key, value, headers)`` tuples; returns the number of retries it took.
        Many records that all have a key and a value and no headers (the admission registry's
        new series) are sent as columns (:meth:`send_columns`)."""
        if len(records) >= _COLUMNS_FROM and framed_batches():
            columns = _as_columns(records)
            if columns is not None:
                return await self.send_columns(columns)
        return await self._until_acknowledged(records, self._send_batches, list.__add__)

    async def send_columns(self, records: OutgoingRecords) -> int:
        """Send records given as columns; returns the number of retries it took."""
        if not framed_batches():
            headers = decode_headers(records.headers) or None
            return await self.send_all([(t, k, v, headers) for t, k, v in records.as_tuples()])
        rows = np.arange(len(records), dtype=np.int64)
        return await self._until_acknowledged(rows, lambda r: self._send_columns(records, r), _concat_rows)

    async def _until_acknowledged(
        self, pending: Any, send: Callable[[Any], Any], join: Callable[[Any, Any], Any]
    ) -> int:
        from aiokafka.errors import KafkaError, KafkaTimeoutError

        retries = 0
        last_error: Exception | None = None
        # A producer that keeps failing for as long as a batch may stay unacknowledged is replaced
        # too (after a broker restart aiokafka can keep answering from stale metadata for good).
        replace_at = time.monotonic() + self._delivery_timeout_s
        while True:
            failed = pending[:0]
            try:
                async with self._queuing:
                    sent = await send(pending)
            except KafkaError as exc:
                self._refused(exc)
                sent, failed, last_error = [], pending, exc
                self._failed(exc)
            if sent:
                await asyncio.wait([fut for _, fut in sent], timeout=self._delivery_timeout_s)
            stalled = False
            for members, fut in sent:
                if not fut.done():
                    fut.cancel()
                    failed, stalled = join(failed, members), True
                    continue
                try:
                    fut.result()
                except KafkaError as exc:
                    self._refused(exc)
                    failed, last_error = join(failed, members), exc
                    self._failed(exc)
            if stalled:
                self._failed(KafkaTimeoutError(f"no acknowledgement within {self._delivery_timeout_s:g} s"))
                await self._replace_producer()
                replace_at = time.monotonic() + self._delivery_timeout_s
            elif len(failed) and time.monotonic() >= replace_at:
                log.warning(
                    "Kafka sends still failing after %d retries (%r): replacing the producer", retries, last_error
                )
                await self._replace_producer()
                replace_at = time.monotonic() + self._delivery_timeout_s
            if not len(failed):
                if self._on_recovery is not None:
                    self._on_recovery(retries)
                return retries
            pending = failed
            delay = min(5.0, 0.1 * 2 ** min(retries, 6)) * (0.5 + self._rng.random() / 2)
            retries += 1
            await asyncio.sleep(delay)

    async def _replace_producer(self) -> None:
        if self._new_producer is None:
            return
        try:
            fresh = await self._new_producer()
        except Exception as exc:  # Kafka still away: keep the producer, the next round tries again
            log.warning("could not replace the stalled Kafka producer: %s", exc)
            return
        stalled, self.producer = self.producer, fresh
        log.warning("Kafka producer replaced: batches stayed unacknowledged for %g s", self._delivery_timeout_s)
        task = asyncio.create_task(_stop_within(stalled, 10.0))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _refused(self, exc: Exception) -> None:
        """Raise what retrying cannot fix (the ACLs deny the writes): callers stop, nothing is
        acknowledged upstream."""
        if (refused := kafka_refused(self._kafka, exc, "writes")) is not None:
            raise refused

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
            partitions = await asyncio.wait_for(self.producer.partitions_for(topic), 30)
            if not partitions:
                raise KafkaTimeoutError(f"no partitions for {topic}")
            count = self._partition_counts[topic] = len(partitions)
        return count

    async def _send_partition(self, topic: str, part: int, recs: list[KafkaOut]) -> _Sent:
        sent: _Sent = []
        batch = self.producer.create_batch()
        members: list[KafkaOut] = []
        for rec in recs:
            if batch.append(key=rec[1], value=rec[2], timestamp=None, headers=rec[3]) is None:
                sent.append((members, await self.producer.send_batch(batch, topic, partition=part)))
                batch, members = self.producer.create_batch(), []  # next batch of this partition
                if batch.append(key=rec[1], value=rec[2], timestamp=None, headers=rec[3]) is None:
                    raise ValueError(f"record of {len(rec[2] or b'')} bytes exceeds kafka.max_batch_bytes")
            members.append(rec)
        if members:
            sent.append((members, await self.producer.send_batch(batch, topic, partition=part)))
        return sent

    def _partitions(
        self, records: OutgoingRecords, rows: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """The partition of each row: murmur2 of its key (once per distinct key) modulo its topic's
        partition count; null keys spread at random."""
        hashes = key_hashes(records.keys)
        if hashes is None:  # no compiled half: aiokafka's murmur2 in Python, about 5 us a key, once a key
            from aiokafka.partitioner import murmur2

            known = self._key_hashes
            if len(known) > 1_000_000:
                known.clear()
            hashes = np.array([known[k] if k in known else known.setdefault(k, murmur2(k) & 0x7FFFFFFF)
                               for k in records.keys], dtype=np.int64)  # fmt: skip
        hashes = np.append(hashes, 0)  # a null key's row (-1)
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
                batch = FramedBatch(records.encode(chunk), len(chunk), self._codec)
                sent.append((chunk, await self.producer.send_batch(batch, topic, partition=partition)))
                start = end
        return sent


async def _stop_within(producer: Any, timeout_s: float) -> None:
    """Stop ``producer``, giving up after ``timeout_s``: a stalled producer's stop waits for
    batches that may never be acknowledged."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except Exception as exc:
        log.warning("stalled Kafka producer not stopped cleanly: %s", type(exc).__name__)


def _concat_rows(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.concatenate([a, b])


async def committed_offsets(
    kafka: KafkaSettings, group_id: str, partitions: Sequence[Any], attempts: int = 5
) -> dict[Any, Any]:
    """The committed ``OffsetAndMetadata`` of ``partitions`` (aiokafka ``TopicPartition``s) in
    ``group_id``, read with the admin client; partitions without a commit are left out. Retries
    ``attempts`` times (0.2 s doubling); raises :class:`ServiceUnavailableError` after that."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    last = ""
    try:
        await admin.start()
        for attempt in range(attempts):
            try:
                found = await admin.list_consumer_group_offsets(group_id, partitions=list(partitions))
                return {tp: entry for tp, entry in found.items() if entry.offset >= 0}
            except KafkaError as exc:
                last = type(exc).__name__
                await asyncio.sleep(0.2 * 2**attempt)
    except KafkaError as exc:
        last = type(exc).__name__
    finally:
        await admin.close()
    raise ServiceUnavailableError("kafka", f"committed offsets of group {group_id}: {last}")
