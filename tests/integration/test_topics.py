"""Kafka topics as the settings say, against the real broker: a starting pipeline creates every
topic with its retention and cleanup policy, and refuses to start on a readings topic that keeps
less than the correction horizon, naming the topic and the fix."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


async def topic_settings(kafka: KafkaEndpoint, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        wanted = {"retention.ms": None, "cleanup.policy": None}
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t, wanted) for t in topics])
        return {r[3]: {e[0]: e[1] for e in r[4]} for response in responses for r in response.resources}
    finally:
        await admin.close()


async def test_topics_are_created_with_their_retention_and_a_short_readings_retention_stops_start_up(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await check_topics(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def check_topics(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique) | {"PORTPULSE_KAFKA__DLQ_RETENTION_S": "-1"}
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    await pipeline.start()
    assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    topics = [f"{unique}.readings.air", f"{unique}.readings.crane", f"{unique}.readings.cell", f"{unique}.dlq",
              f"{unique}.late", f"{unique}.sensors"]  # fmt: skip
    configs = await topic_settings(kafka, topics)
    assert {
        t: (c["cleanup.policy"], c.get("retention.ms")) for t, c in configs.items() if t != f"{unique}.sensors"
    } == {
        f"{unique}.readings.air": ("delete", str(8 * DAY_MS)),
        f"{unique}.readings.crane": ("delete", str(8 * DAY_MS)),
        f"{unique}.readings.cell": ("delete", str(8 * DAY_MS)),
        f"{unique}.dlq": ("delete", "-1"),
        f"{unique}.late": ("delete", str(30 * DAY_MS)),
    }
    assert configs[f"{unique}.sensors"]["cleanup.policy"] == "compact"

    # another deployment's readings topic, made by hand with one day of retention
    other = f"{unique}x"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(f"{other}.readings.air", 1, 1, topic_configs={"retention.ms": str(DAY_MS)})]
        )
    finally:
        await admin.close()
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, other)
    for command in ("process", "bridge"):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "portpulse", command], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (command, done.returncode, done.stderr[-2000:])
        assert (
            f"Kafka topic {other}.readings.air keeps records 1 days (retention.ms={DAY_MS}), less than the "
            "correction horizon of 7 days (ingest.max_past_s)"
        ) in done.stderr, done.stderr[-2000:]
        assert f"--entity-name {other}.readings.air --add-config retention.ms={8 * DAY_MS}" in done.stderr


async def test_clients_creating_the_same_topics_at_once_each_report_only_their_own(
    kafka: KafkaEndpoint, unique: str
) -> None:
    """A bridge and a processor starting together both create the pipeline's topics: every
    topic is reported created by exactly one of them (one log line per topic)."""
    from portpulse.contract.settings import KafkaSettings
    from portpulse.kafka.compacted import ensure_topics

    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    topics = [f"{unique}.readings.d{k}" for k in range(6)]
    reports = await asyncio.gather(*[ensure_topics(settings, topics) for _ in range(3)])
    assert sorted(t for report in reports for t in report) == topics
    assert await ensure_topics(settings, topics) == []  # they all exist now
