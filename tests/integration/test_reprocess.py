"""``portpulse reprocess`` against the real services, with the retention tiers on: readings
rejected as ``out_of_range`` are stored once the catalogue is widened and the range reprocessed,
and their window's aggregate is corrected (checked against an independent computation); a dry
run changes nothing; a second run changes nothing more; what lies outside the range is left as
stored; a range Kafka no longer holds is refused, naming the first offset it still has.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from tests.integration.pipeline import Publisher
from tests.integration.test_dlq import poll
from tests.integration.test_end_to_end import assert_aggregates_match, stored_aggregates
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

MINUTE = 60 * 10**9
Window = tuple[str, str, str, int]


def reprocess_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portpulse", "reprocess", "--windows", "1m", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def stored_points(influx: InfluxEndpoint, bucket: str, measurement: str) -> list[tuple[str, str, str, float]]:
    """(sensor_id, field, time, value) of every point of ``measurement``, sorted."""
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "{measurement}"'
        ' and r._field !~ /_reason$/) |> keep(columns: ["sensor_id", "_field", "_time", "_value"])',
    )
    return sorted((r["sensor_id"], r["_field"], r["_time"], float(r["_value"])) for r in rows)


def widened_catalogue(path: Path) -> Path:
    """The shipped catalogue with air.no2 allowed up to 3000 µg/m³ (it stops at 2000)."""
    shipped = resources.files("portpulse.contract").joinpath("catalogue.toml").read_text(encoding="utf-8")
    header = "[air.no2]\n"
    head, _, tail = shipped.partition(header)
    assert "max = 2000.0" in tail.split("\n[", 1)[0]
    path.write_text(head + header + tail.replace("max = 2000.0", "max = 3000.0", 1), encoding="utf-8")
    return path


async def test_reprocess_after_a_catalogue_change_stores_the_rejected_readings_once(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await widen_and_reprocess(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def widen_and_reprocess(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    if influx.major != "1":
        pytest.skip("the retention tiers are InfluxDB 1.x retention policies")
    database = influx_bucket.split("/")[0]
    raw_bucket, minute_bucket = f"{database}/raw", f"{database}/1m"
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique) | {
        "PORTPULSE_INFLUX__BUCKET": raw_bucket, "PORTPULSE_RETENTION__TIERS": "true",
    }  # fmt: skip
    widened = env | {"PORTPULSE_PROCESSOR__CATALOGUE": str(widened_catalogue(tmp_path / "catalogue.toml"))}
    base = (time.time_ns() - 6 * MINUTE) // MINUTE * MINUTE  # the minute reprocessed; c's is the one before
    readings = {
        "a": [(base + k * 10 * 10**9, 1960.0 + 20 * k) for k in range(6)],  # 2020, 2040, 2060: over 2000
        "b": [(base + k * 10 * 10**9, 10.0 + k) for k in range(6)],
        "c": [(base - MINUTE + k * 10 * 10**9, 20.0 + k) for k in range(3)],
    }
    messages = [(f"{unique}/air/quai/{sensor}", json.dumps({"ts": ts // 10**6, "metrics": {"no2": value}}).encode())
                for sensor, values in readings.items() for ts, value in values]  # fmt: skip

    def expected(limit: float) -> dict[Window, list[tuple[int, float]]]:
        out: dict[Window, list[tuple[int, float]]] = {}
        for sensor, values in readings.items():
            for ts, value in values:
                if value <= limit:
                    out.setdefault(("air", sensor, "no2", ts // MINUTE * MINUTE), []).append((ts, value))
        return out

    def published(limit: float) -> list[tuple[str, float]]:
        return sorted((s, v) for s, values in readings.items() for _, v in values if v <= limit)

    def raw() -> list[tuple[str, float]]:
        return sorted((s, v) for s, _, _, v in stored_points(influx, raw_bucket, "air"))

    def rejected() -> list[tuple[str, float]]:
        return sorted((s, v) for s, _, _, v in stored_points(influx, raw_bucket, "air_rejected"))

    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")  # windows 1m
    await pipeline.start()
    try:
        with Publisher(mqtt, f"{unique}-gw") as publisher:
            await asyncio.to_thread(publisher.publish, messages, 1)
        await poll(lambda: sorted(stored_aggregates(influx, minute_bucket)) == sorted(expected(2000.0)),
                   lambda: f"windows {sorted(stored_aggregates(influx, minute_bucket))}")  # fmt: skip
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()
    assert raw() == published(2000.0)
    assert rejected() == [("a", 2020.0), ("a", 2040.0), ("a", 2060.0)]
    before = stored_aggregates(influx, minute_bucket)
    assert_aggregates_match(before, expected(2000.0))
    assert before[("air", "a", "no2", base)]["rejected"] == 3.0

    # The catalogue widened; the live pipeline runs with it while the past minute is reprocessed.
    live = PipelineProcess(widened, tmp_path / "live.log")
    await live.start()
    try:
        span = ("--from", str(base // 10**9), "--to", str((base + MINUTE) // 10**9), "--domain", "air")
        dry = await asyncio.to_thread(reprocess_cli, widened, *span, "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        # a record carries a sensor's readings of one bridge batch: between 3 (a, b, c) and 15 records
        said = r"would clear air, air_rejected, air_1m in the range and read (\d+) records from 2 partitions"
        found = re.search(said, dry.stdout)
        assert found and 3 <= int(found.group(1)) <= 15, dry.stdout
        records = int(found.group(1))
        assert rejected() == [("a", 2020.0), ("a", 2040.0), ("a", 2060.0)]  # nothing changed

        for attempt in range(2):  # the second run finds the same and changes nothing more
            done = await asyncio.to_thread(reprocess_cli, widened, *span)
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"{records} records read, 12 readings in the range, rejected: none; 2 window aggregates written" in (
                done.stdout
            ), (attempt, done.stdout, done.stderr[-2000:])
            assert f"100%  {records} / {records} records" in done.stderr, done.stderr
            assert raw() == published(3000.0)  # each reading once, the widened ones included
            assert rejected() == []
            after = stored_aggregates(influx, minute_bucket)
            assert_aggregates_match(after, expected(3000.0))
            assert after[("air", "a", "no2", base)]["rejected"] == 0.0
            assert after[("air", "c", "no2", base - MINUTE)] == before[("air", "c", "no2", base - MINUTE)]

        # Retention took the first record of each partition: the range is refused, nothing deleted.
        await delete_first_records(kafka, f"{unique}.readings.air")
        refused = await asyncio.to_thread(reprocess_cli, widened, *span)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"{unique}.readings.air[" in refused.stderr
        assert "no longer holds the start of the range: its first offset is 1, written " in refused.stderr
        assert raw() == published(3000.0)
        assert await live.stop() == 0, live.log.read_text()[-3000:]
    finally:
        await live.stop()


async def delete_first_records(kafka: KafkaEndpoint, topic: str) -> None:
    """Delete the first record of every partition of ``topic`` that holds more than one."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        (described,) = await admin.describe_topics([topic])
        tps = [TopicPartition(topic, int(p["partition"])) for p in described["partitions"]]
        ends = await consumer.end_offsets(tps)
        assert any(end > 1 for end in ends.values())
        await admin.delete_records({tp: RecordsToDelete(1) for tp in tps if ends[tp] > 1})
    finally:
        await consumer.stop()
        await admin.close()
