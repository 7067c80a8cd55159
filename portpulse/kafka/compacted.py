"""Topics: created where missing with their retention and cleanup policy, checked where present; a topic read
from a time or the beginning to its end without a consumer group (a compacted one whole at
start-up, the DLQ for ``portpulse dlq``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from portpulse.contract.errors import ConfigError, ServiceUnavailableError
from portpulse.contract.settings import KafkaSettings
from portpulse.contract.topics import is_readings_topic, retention_shortfall, topic_configs
from portpulse.kafka.client import client_options, kafka_refused, start_client

__all__ = ["ensure_topics", "read_compacted", "read_topic"]

log = logging.getLogger("portpulse.kafka")


async def ensure_topics(kafka: KafkaSettings, topics: Iterable[str], horizon_s: float | None = None) -> list[str]:
    """Create those of ``topics`` that do not exist, with the configured partitions, replication
    and :func:`topic_configs` (retention and cleanup by kind). With ``horizon_s`` (the correction
    horizon, s), check the retention of those that existed: a readings topic keeping less raises
    :class:`ConfigError`; a DLQ or late topic keeping less than configured is logged. Returns the
    topics this call created (another client creating one at the same moment is fine: that one
    is not listed, so a bridge and a processor starting together log each topic once)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    await start_client(admin, kafka, "admin client")
    try:
        wanted = set(topics)
        existing = wanted & set(await admin.list_topics())
        missing = sorted(wanted - existing)
        new = [NewTopic(t, kafka.partitions, kafka.replication_factor, topic_configs=topic_configs(t, kafka))
               for t in missing]  # fmt: skip
        created: list[str] = []
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics(new)
                for topic, code, *_ in response.topic_errors:
                    if not code:
                        created.append(topic)
                        continue
                    error = for_code(code)
                    if (refused := kafka_refused(kafka, error(), f"creating topic {topic}")) is not None:
                        raise refused
        if horizon_s is not None and existing:
            for topic, retention_ms in (await _retentions(admin, sorted(existing))).items():
                problem = retention_shortfall(topic, retention_ms, kafka, horizon_s)
                if problem and is_readings_topic(topic, kafka.topic_prefix):
                    raise ConfigError(problem)
                if problem:
                    log.warning("%s", problem)
        return sorted(created)
    finally:
        await admin.close()


async def _retentions(admin: Any, topics: list[str]) -> dict[str, int]:
    """``retention.ms`` of each topic, as the broker reports it (its default where not set)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    resources = [ConfigResource(ConfigResourceType.TOPIC, t, {"retention.ms": None}) for t in topics]
    out: dict[str, int] = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _kind, name, entries in (r[:5] for r in response.resources):
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    out[name] = int(entry[1])
    return out


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
        await start_client(consumer, kafka, f"reader of {topic}")
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


async def topic_partitions(kafka: KafkaSettings, topics: Iterable[str]) -> dict[str, list[int]]:
    """The partition ids of each of ``topics`` that exists (those that do not are left out)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    await start_client(admin, kafka, "admin client")
    try:
        existing = sorted(set(topics) & set(await admin.list_topics()))
        if not existing:
            return {}
        return {d["topic"]: sorted(int(p["partition"]) for p in d["partitions"])
                for d in await admin.describe_topics(existing)}  # fmt: skip
    finally:
        await admin.close()


async def _partitions(kafka: KafkaSettings, topic: str) -> list[int]:
    """The partition ids of ``topic``; empty if it does not exist."""
    return (await topic_partitions(kafka, [topic])).get(topic, [])
