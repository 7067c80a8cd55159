"""SIGKILL the processor mid-stream, restart it: the same windows in InfluxDB, none missing or doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_processor import (
    SENSORS,
    T0,
    assert_windows_equal,
    create_topic,
    expected_windows,
    produce,
)
from tests.integration.test_sink_influx import query_rows
from tests.services import InfluxEndpoint, KafkaEndpoint

pytestmark = pytest.mark.integration


def stream() -> list[tuple[str, str, int, float]]:
    rows = []
    for step in range(120):  # 10 minutes of event time, every 5 s
        for i, sensor in enumerate(SENSORS):
            rows.append((sensor, "no2", T0 + 5 * step, 40.0 + i + (step % 9) * 0.25))
    rows[200] = (rows[200][0], "no2", rows[200][2], 900.0)  # a spike
    return rows


def start_processor(
    kafka: KafkaEndpoint, influx: InfluxEndpoint, bucket: str, unique: str, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")},
        "PORTPULSE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "PORTPULSE_KAFKA__TOPIC_PREFIX": unique,
        "PORTPULSE_KAFKA__CONSUMER_GROUP": f"{unique}-g",
        "PORTPULSE_INFLUX__URL": influx.url,
        "PORTPULSE_INFLUX__TOKEN": influx.token,
        "PORTPULSE_INFLUX__ORG": influx.org,
        "PORTPULSE_INFLUX__BUCKET": bucket,
        "PORTPULSE_RETENTION__TIERS": "false",
        "PORTPULSE_RETENTION__RAW_S": "-1",
        "PORTPULSE_SINK__FLUSH_INTERVAL_MS": "50",
    }
    cmd = [
        sys.executable,
        "-m",
        "portpulse",
        "process",
        "--windows",
        "1m",
        "--lateness",
        "2",
        "--idle-timeout",
        "1",
    ]
    with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)


def stored_windows(influx: InfluxEndpoint, bucket: str) -> dict[tuple[str, str, int], dict[str, float]]:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air_1m")'
        ' |> keep(columns: ["_time", "_value", "_field", "sensor_id"])',
    )
    from tests.integration.test_smoke_services import rfc3339_to_ns

    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in rows:
        metric, _, stat = r["_field"].rpartition("_")
        out.setdefault((r["sensor_id"], metric, rfc3339_to_ns(r["_time"]) // 10**9), {})[stat] = float(r["_value"])
    return out


async def test_sigkill_and_restart_gives_the_same_windows(
    kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    rows = stream()
    log = tmp_path / "processor.log"
    expected = expected_windows(rows)
    await create_topic(kafka, f"{unique}.readings.air", 3)
    first = start_processor(kafka, influx, influx_bucket, unique, log)
    try:
        chunk = len(rows) // 6
        for k in range(3):
            await produce(kafka, unique, rows[k * chunk : (k + 1) * chunk])
            await asyncio.sleep(0.5)
        # Wait until some windows are stored, then kill without any chance to drain or commit.
        for _ in range(240):
            if first.poll() is not None or len(stored_windows(influx, influx_bucket)) >= 6:
                break
            await asyncio.sleep(0.25)
        assert first.poll() is None, log.read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_with = len(stored_windows(influx, influx_bucket))
        await produce(kafka, unique, rows[3 * chunk :])
        second = start_processor(kafka, influx, influx_bucket, unique, log)
        try:
            for _ in range(480):
                if len(stored_windows(influx, influx_bucket)) >= len(expected) or second.poll() is not None:
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(2)  # a window written twice would show here as a changed value
            got = stored_windows(influx, influx_bucket)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    print(f"windows stored when killed: {killed_with}; after restart: {len(got)} of {len(expected)}")
    assert 0 < killed_with < len(expected)
    assert_windows_equal(got, expected, rel_tol=1e-9)  # InfluxDB returns floats as text
