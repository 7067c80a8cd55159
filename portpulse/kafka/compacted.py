"""Topics: created where missing (compacted ones with ``cleanup.policy=compact``); a topic read
from a time or the beginning to its end without a consumer group (a compacted one whole at
start-up, the DLQ for ``portpulse dlq``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from portpulse.contract.errors import ServiceUnavailableError
from portpulse.contract.settings import KafkaSettings
from portpulse.kafka.client import client_options

__all__ = ["ensure_topics", "read_compacted", "read_topic"]


async def ensure_topics(kafka: KafkaSettings, topics: Iterable[str], compacted: Iterable[str] = ()) -> list[str]:
    """Create those of ``topics`` that do not exist, with the configured partitions and
    replication; those also in ``compacted`` with ``cleanup.policy=compact``. Returns the topics
    created (another client creating one at the same moment is fine)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    compact = set(compacted)
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    await admin.start()
    try:
        missing = sorted(set(topics) - set(await admin.list_topics()))
        new = [
            NewTopic(t, kafka.partitions, kafka.replication_factor,
                     topic_configs={"cleanup.policy": "compact"} if t in compact else {})
            for t in missing
        ]  # fmt: skip
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
        return missing
    finally:
        await admin.close()


async def read_compacted(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> dict[bytes, bytes | None]:
    """The latest value of every key of ``topic`` (None for a tombstone), read from the beginning
    to the end offsets found at the start; ``{}`` if the topic does not exist. Raises
    :class:`ServiceUnavailableError` if that takes longer than ``timeout_s``."""
    latest: dict[bytes, bytes | None] = {}
    async for records in read_topic(kafka, topic, timeout_s=timeout_s):
        for record in records:
            if record.key is not None:
                latest[record.key] = record.value
    return latest


async def read_topic(
    kafka: KafkaSettings, topic: str, since_ms: int | None = None, timeout_s: float = 60.0
) -> AsyncIterator[list[Any]]:
    """Batches of aiokafka ``ConsumerRecord``s of every partition of ``topic``, from the first
    record at or after ``since_ms`` (Kafka timestamp; None: the beginning) to the end offsets
    found at the start; nothing if the topic does not exist. No consumer group: nothing is
    committed. Raises :class:`ServiceUnavailableError` past ``timeout_s`` without progress."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **client_options(kafka), enable_auto_commit=False, request_timeout_ms=kafka.request_timeout_ms
    )
    try:
        await consumer.start()
        partitions = await asyncio.wait_for(_partitions(kafka, topic), timeout_s)
        if not partitions:
            return
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = (
            {tp: (found.offset if found is not None else ends[tp]) for tp, found in
             (await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))).items()}
            if since_ms is not None else await consumer.beginning_offsets(tps)
        )  # fmt: skip
        for tp in tps:
            consumer.seek(tp, starts[tp])
        remaining = {tp for tp in tps if ends[tp] > starts[tp]}
        deadline = time.monotonic() + timeout_s
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceUnavailableError("kafka", f"{topic} not read to its end within {timeout_s:g} s")
            batches = await consumer.getmany(*remaining, timeout_ms=int(min(left, 1.0) * 1000))
            for tp, records in batches.items():
                records = [r for r in records if r.offset < ends[tp]]
                if records:
                    deadline = time.monotonic() + timeout_s  # progress
                    yield records
            for tp in list(remaining):  # compaction can leave the end offset past the last record
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def _partitions(kafka: KafkaSettings, topic: str) -> list[int]:
    """The partition ids of ``topic``; empty if it does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            return []
        (described,) = await admin.describe_topics([topic])
        return sorted(int(p["partition"]) for p in described["partitions"])
    finally:
        await admin.close()
