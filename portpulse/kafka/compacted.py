"""Topics: created where missing (compacted ones with ``cleanup.policy=compact``); a compacted
topic read whole at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

from portpulse.contract.errors import ServiceUnavailableError
from portpulse.contract.settings import KafkaSettings
from portpulse.kafka.client import client_options

__all__ = ["ensure_topics", "read_compacted"]


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
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **client_options(kafka), enable_auto_commit=False, request_timeout_ms=kafka.request_timeout_ms
    )
    deadline = time.monotonic() + timeout_s
    latest: dict[bytes, bytes | None] = {}
    try:
        await consumer.start()
        partitions = await asyncio.wait_for(_partitions(kafka, topic), timeout_s)
        if not partitions:
            return {}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceUnavailableError("kafka", f"{topic} not read whole within {timeout_s:g} s")
            batches = await consumer.getmany(*remaining, timeout_ms=int(min(left, 1.0) * 1000))
            for tp, records in batches.items():
                for record in records:
                    if record.key is not None:
                        latest[record.key] = record.value
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):  # compaction can leave the end offset past the last record
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return latest


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
