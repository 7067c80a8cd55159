"""The whole pipeline: simulators -> Mosquitto -> bridge -> Kafka -> processor -> InfluxDB.

The expected aggregates are computed here from the simulator's own record of what it sent
(plain Python, no PortPulse code), minus the faults it injected; the pipeline's DLQ and
rejection counts must account for every one of those faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from portpulse.app.pipeline import ProcessorOptions, run_pipeline
from portpulse.contract.settings import (
    InfluxSettings,
    KafkaSettings,
    MqttSettings,
    OpsSettings,
    ProcessorSettings,
    RetentionSettings,
    Settings,
    SinkSettings,
)  # fmt: skip
from portpulse.simulators.stream import FaultRecord, OutMessage, StreamConfig, generate
from tests.integration.pipeline import Publisher, consume
from tests.integration.test_sink_influx import query_rows
from tests.integration.test_smoke_services import rfc3339_to_ns
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint, free_port

pytestmark = pytest.mark.integration

Window = tuple[str, str, str, int]  # (domain, sensor, metric, window start ns)


def pipeline_settings(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, bucket: str, unique: str
) -> Settings:
    return Settings(
        mqtt=MqttSettings(
            host=mqtt.host, port=mqtt.port, client_id=f"{unique}-bridge", topic_prefix=unique,
            subscriptions=(f"{unique}/#",), session_expiry_s=120,
        ),
        kafka=KafkaSettings(
            bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique, partitions=2,
            consumer_group=f"{unique}-g", request_timeout_ms=5000,
        ),
        influx=InfluxSettings(url=influx.url, token=influx.token, org=influx.org, bucket=bucket),
        sink=SinkSettings(flush_interval_ms=50),
        # The record predicts range and duplicate verdicts, not the spike filter's: the simulator's
        # late readings carry the values of their sending time, and the filter judges them against
        # neighbours 120 s earlier (tests/unit/test_engine.py and test_kernels.py cover it).
        processor=ProcessorSettings(spike_k_sigma=1e9),
        # Retention tiers as shipped: raw points in the test's bucket (kept forever, as its
        # autogen policy is), each window's aggregates in its own policy ({database}/{window}) on
        # InfluxDB 1.x, its own bucket ({bucket}_{window}) on 2.x.
        retention=RetentionSettings(raw_s=-1),
        ops=OpsSettings(metrics_port=free_port()),
    )  # fmt: skip


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@contextlib.asynccontextmanager
async def running_pipeline(settings: Settings, options: ProcessorOptions) -> AsyncIterator[str]:
    """``portpulse run`` in this loop; yields its ops base URL once ``/readyz`` is green."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(settings, stop, processor=options))
    base = f"http://127.0.0.1:{settings.ops.metrics_port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    try:
        while loop.time() < deadline and not task.done():
            if (await asyncio.to_thread(http_get, f"{base}/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.2)
        if task.done():
            task.result()  # raises why the pipeline stopped
        status, body = await asyncio.to_thread(http_get, f"{base}/readyz")
        assert status == 200, f"pipeline not ready within 90 s: {body.decode(errors='replace')}"
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 90)


def stream(unique: str, sensors: int, seconds: float, faults: dict[str, float]) -> StreamConfig:
    minute = 60 * 10**9
    start = (time.time_ns() - int((seconds + 120) * 1e9)) // minute * minute  # in the past, minute-aligned
    return StreamConfig(
        fleets=("air", "crane", "cell"), sensors=sensors, rate=float(sensors), duration_s=seconds, seed=7,
        start_ns=start, fmt="json", topic_prefix=unique, faults=faults,
    )  # fmt: skip


def expected_from_record(
    messages: list[OutMessage], faults: list[FaultRecord]
) -> tuple[dict[Window, list[tuple[int, float]]], int, int]:
    """Readings (ts_ns, value) per 1-minute window from the sent messages, the independent way:
    JSON parsing and the manifest. Returns them, the readings the processor must reject (out of
    range, and another value at an instant already seen; the same reading again is no fault) and
    the messages the bridge must dead-letter."""
    malformed = {f.seq for f in faults if f.kind == "malformed"}
    out_of_range = {(f.sensor_id, f.metric, f.ts_ns // 10**6) for f in faults if f.kind == "out_of_range"}
    seen: dict[tuple[str, str, int], float] = {}
    windows: dict[Window, list[tuple[int, float]]] = {}
    rejected = 0
    for m in messages:
        if m.seq in malformed:
            continue
        _prefix, domain, _site, sensor = m.topic.split("/")
        body = json.loads(m.payload)
        for metric, value in body["metrics"].items():
            key = (sensor, metric, body["ts"])
            if seen.get(key) == value:
                continue
            if key in seen or key in out_of_range:
                rejected += 1
                continue
            seen[key] = value
            ts_ns = body["ts"] * 10**6
            window = (domain, sensor, metric, ts_ns // 60_000_000_000 * 60_000_000_000)
            windows.setdefault(window, []).append((ts_ns, value))
    return windows, rejected, sum(m.seq in malformed for m in messages)  # a duplicated one counts twice


def stored_aggregates(influx: InfluxEndpoint, bucket: str) -> dict[Window, dict[str, float]]:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement =~ /_1m$/)'
        ' |> keep(columns: ["_time", "_value", "_field", "_measurement", "sensor_id"])',
    )
    out: dict[Window, dict[str, float]] = {}
    for r in rows:
        metric, _, stat = r["_field"].rpartition("_")
        key = (r["_measurement"].removesuffix("_1m"), r["sensor_id"], metric, rfc3339_to_ns(r["_time"]))
        out.setdefault(key, {})[stat] = float(r["_value"])
    return out


def missing_readings(influx: InfluxEndpoint, bucket: str, expected: dict[Window, list[tuple[int, float]]]) -> str:
    """Which expected readings are not stored as raw points, and what is stored at their instants."""
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement !~ /_[0-9]+[smh]$/)'
        ' |> keep(columns: ["_time", "_value", "_field", "_measurement", "sensor_id"])',
    )
    stored = {(r["_measurement"], r["sensor_id"], r["_field"], rfc3339_to_ns(r["_time"])): r["_value"] for r in rows}
    lines = []
    for (domain, sensor, metric, _), readings in expected.items():
        for ts, value in readings:
            if (domain, sensor, metric, ts) not in stored:
                rejected = stored.get((f"{domain}_rejected", sensor, f"{metric}_reason", ts))
                lines.append(f"{domain}/{sensor}/{metric} at {ts}: {value} not stored (rejected: {rejected})")
    return "\n".join(lines[:20])


def stored_raw_count(influx: InfluxEndpoint, bucket: str) -> int:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement !~ /_/)'
        " |> group() |> count()",
    )
    return int(rows[0]["_value"]) if rows else 0


async def wait_until_stored(
    influx: InfluxEndpoint,
    bucket: str,
    expected: dict[Window, list[tuple[int, float]]],
    timeout_s: float = 180,
    aggregates_bucket: str | None = None,
) -> tuple[int, dict[Window, dict[str, float]]]:
    """Poll InfluxDB (bounded) until every expected raw point is stored in ``bucket`` and the
    aggregates in ``aggregates_bucket`` (default: ``bucket``) equal the expected ones
    (corrections may rewrite a window after it first appears)."""
    readings = sum(len(v) for v in expected.values())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    raw, stored = 0, {}
    while loop.time() < deadline:
        raw = await asyncio.to_thread(stored_raw_count, influx, bucket)
        if raw >= readings:
            stored = await asyncio.to_thread(stored_aggregates, influx, aggregates_bucket or bucket)
            try:
                assert_aggregates_match(stored, expected)
                break
            except AssertionError:
                pass
        await asyncio.sleep(1)
    return raw, stored


def assert_aggregates_match(
    stored: dict[Window, dict[str, float]], expected: dict[Window, list[tuple[int, float]]]
) -> None:
    """Every expected window is stored with its count, mean, min, max, last, stddev and p95; no
    other window is."""
    assert sorted(stored) == sorted(expected)
    for key, readings in expected.items():
        got = stored[key]
        values = [v for _, v in readings]
        assert got["count"] == len(values), key
        assert math.isclose(got["mean"], statistics.fmean(values), rel_tol=1e-9, abs_tol=1e-9), key
        assert (got["min"], got["max"], got["last"]) == (min(values), max(values), max(readings)[1]), key
        assert math.isclose(got["stddev"], statistics.pstdev(values), rel_tol=1e-6, abs_tol=1e-9), key
        assert math.isclose(got["p95"], float(np.percentile(values, 95)), rel_tol=1e-9, abs_tol=1e-9), key


async def test_simulated_port_end_to_end_matches_an_independent_computation(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str
) -> None:
    faults = {"malformed": 0.01, "duplicate": 0.01, "out_of_range": 0.01, "late": 0.02, "clock_skew": 0.1}
    config = stream(unique, sensors=30, seconds=150, faults=faults)
    blocks = list(generate(config))
    messages = [m for b in blocks for m in b.messages]
    injected = [f for b in blocks for f in b.faults]
    expected, expected_rejected, expected_dlq = expected_from_record(messages, injected)
    assert expected_rejected > 0 and expected_dlq > 0, "the stream should carry faults"
    readings = sum(len(v) for v in expected.values())
    settings = pipeline_settings(mqtt, kafka, influx, influx_bucket, unique)
    async with running_pipeline(settings, ProcessorOptions("1m", lateness_s=2, idle_timeout_s=2)) as base:
        with Publisher(mqtt, f"{unique}-sim") as publisher:
            await asyncio.to_thread(publisher.publish, [(m.topic, m.payload) for m in messages], 1)
        # a policy of the database on 1.x, a bucket of its own on 2.x
        minute_tier = f"{influx_bucket.split('/')[0]}/1m" if "/" in influx_bucket else f"{influx_bucket}_1m"
        raw, stored = await wait_until_stored(influx, influx_bucket, expected, aggregates_bucket=minute_tier)
        status, metrics = await asyncio.to_thread(http_get, f"{base}/metrics")
        assert status == 200 and b"portpulse_processor_consumer_lag{" in metrics
        state = json.loads((await asyncio.to_thread(http_get, f"{base}/api/state"))[1])
        assert set(state["latest"]) == {"air", "crane", "cell"}
    assert raw == readings, missing_readings(influx, influx_bucket, expected)  # each once per (series, time)
    assert_aggregates_match(stored, expected)
    assert stored_aggregates(influx, influx_bucket) == {}  # the raw tier holds no aggregate
    # Every fault is accounted for: rejected readings in the windows, malformed messages in the DLQ.
    assert sum(v.get("rejected", 0.0) for v in stored.values()) == expected_rejected
    dlq = await consume(kafka, [f"{unique}.dlq"], expect=expected_dlq, timeout_s=30, idle_s=1)
    assert len(dlq) == expected_dlq
    assert {headers["reason"] for _, _, _, headers in dlq} == {b"malformed_json"}
    late = await consume(kafka, [f"{unique}.late"], expect=1, timeout_s=2, idle_s=0)
    assert late == []
    print(f"end to end: {len(messages)} messages, {readings} readings, {len(expected)} windows, "
          f"{expected_rejected} rejected, {expected_dlq} dead letters")  # fmt: skip


def pipeline_state(base: str) -> dict[str, Any]:
    status, body = http_get(f"{base}/api/state")
    assert status == 200
    state: dict[str, Any] = json.loads(body)
    return state
