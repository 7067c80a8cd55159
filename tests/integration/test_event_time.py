"""Aggregates agree with the raw data whatever the fleet's clocks and connectivity.

Gateways publish batches of their sensors' readings through ``portpulse run`` (its own process,
real Mosquitto, Kafka and InfluxDB), with event time running ten times faster than the wall
clock: one sensor's clock runs 30 s ahead, one gateway goes silent for three and a half minutes
and then delivers its backlog, the readings inside every batch are shuffled, and ``portpulse
run`` is SIGKILLed mid-stream and restarted; another gateway loses 40 s of readings and resumes
inside the minute whose windows closed meanwhile. Then every stored 10-second and 1-minute aggregate
is compared with pandas over the raw points and rejected readings read back from InfluxDB (not
the project's kernels), and the raw points with what the gateways sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.integration.pipeline import Publisher, consume
from tests.integration.test_end_to_end import http_get
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.integration.test_smoke_services import rfc3339_to_ns
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

S = 10**9
SITES = ("quai-a", "quai-b", "quai-c", "quai-d")
SKEWED = "quai-a-0"  # its clock runs 30 s ahead
SILENT = "quai-d"  # this gateway is silent from 120 s to 330 s of event time, then sends its backlog
# This one loses its readings from 65 s to 105 s (4 s of wall time, past the idle timeout) and
# resumes inside the minute its windows closed in.
OUTAGE = ("quai-c", 65, 105)
SECONDS = 480  # of event time, one reading per sensor and second
SPEED = 10  # event seconds per wall second
WINDOWS = {"10s": 10 * S, "1m": 60 * S}
Key = tuple[str, str, str, int]  # (window name, sensor, metric, window start ns)


def fleet(start_ns: int) -> list[tuple[float, str, bytes, list[tuple[str, int, dict[str, float]]]]]:
    """(wall offset s, topic suffix, payload, readings) per gateway batch, in publishing order;
    each batch carries five seconds of its three sensors' readings, shuffled."""
    rng = np.random.default_rng(16)
    out = []
    backlog: list[tuple[str, int, dict[str, float]]] = []
    for t0 in range(0, SECONDS, 5):
        for site in SITES:
            readings = []
            for t in range(t0, t0 + 5):
                for k in range(3):
                    sensor = f"{site}-{k}"
                    no2 = round(40 + 5 * math.sin(t / 40 + k) + float(rng.normal(0, 0.5)), 2)
                    pm25 = round(12 + 2 * math.cos(t / 30 + k) + float(rng.normal(0, 0.2)), 2)
                    if rng.random() < 0.01:
                        no2 = -5.0  # out of range: a rejected reading
                    ts = start_ns + t * S + k * 10**6 + (30 * S if sensor == SKEWED else 0)
                    readings.append((sensor, ts, {"no2": no2, "pm25": pm25}))
            readings = [readings[i] for i in rng.permutation(len(readings))]
            if site == SILENT and 120 <= t0 < 330:
                backlog += readings
                continue
            if site == OUTAGE[0] and OUTAGE[1] <= t0 < OUTAGE[2]:
                continue
            if site == SILENT and t0 == 330:  # back online: the buffer first, in batches of 60
                for i in range(0, len(backlog), 60):
                    out.append((t0 / SPEED, site, _payload(backlog[i : i + 60]), backlog[i : i + 60]))
            out.append((t0 / SPEED, site, _payload(readings), readings))
    return out


def _payload(readings: list[tuple[str, int, dict[str, float]]]) -> bytes:
    body = [{"sensor_id": s, "ts": ts // 10**6, "metrics": m} for s, ts, m in readings]
    return json.dumps({"readings": body}).encode()


def raw_frame(influx: InfluxEndpoint, bucket: str, measurement: str) -> pd.DataFrame:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "{measurement}")'
        ' |> keep(columns: ["_time", "_value", "_field", "sensor_id"])',
    )
    return pd.DataFrame(
        {
            "ts": [rfc3339_to_ns(r["_time"]) for r in rows],
            "sensor": [r["sensor_id"] for r in rows],
            "field": [r["_field"] for r in rows],
            "value": [r["_value"] for r in rows],
        }
    )


def reference(influx: InfluxEndpoint, bucket: str) -> dict[Key, dict[str, float]]:
    """Every window's aggregates by pandas over the stored raw points and rejected readings."""
    raw = raw_frame(influx, bucket, "air")
    raw["value"] = raw["value"].astype(float)
    rejected = raw_frame(influx, bucket, "air_rejected")
    # A rejection marked "reinstated" was withdrawn (the reading was judged again and is a raw point).
    rejected = rejected[rejected["field"].str.endswith("_reason") & (rejected["value"] != "reinstated")].assign(
        field=lambda f: f["field"].str.removesuffix("_reason")
    )
    out: dict[Key, dict[str, float]] = {}
    for name, size in WINDOWS.items():
        frame = raw.assign(window=raw["ts"] // size * size).sort_values("ts")
        grouped = frame.groupby(["sensor", "field", "window"])["value"]
        stats = pd.DataFrame({
            "count": grouped.count(), "mean": grouped.mean(), "min": grouped.min(), "max": grouped.max(),
            "stddev": grouped.std(ddof=0), "p95": grouped.quantile(0.95), "last": grouped.last(),
        })  # fmt: skip
        bad = rejected.assign(window=rejected["ts"] // size * size).groupby(["sensor", "field", "window"])["ts"]
        stats = stats.join(bad.nunique().rename("rejected"), how="outer")
        stats["count"] = stats["count"].fillna(0)
        stats["rejected"] = stats["rejected"].fillna(0)
        for index, row in stats.iterrows():
            parts: tuple[Any, ...] = tuple(index)  # type: ignore[arg-type]
            sensor, field, window = parts
            out[(name, str(sensor), str(field), int(window))] = {
                str(k): float(v) for k, v in row.items() if pd.notna(v)
            }
    return out


def stored(influx: InfluxEndpoint, bucket: str) -> dict[Key, dict[str, float]]:
    out: dict[Key, dict[str, float]] = {}
    for name in WINDOWS:
        frame = raw_frame(influx, bucket, f"air_{name}")
        for ts, sensor, field, value in frame.itertuples(index=False):
            metric, _, stat = field.rpartition("_")
            out.setdefault((name, sensor, metric, ts), {})[stat] = float(value)
    return out


def differences(got: dict[Key, dict[str, float]], want: dict[Key, dict[str, float]]) -> list[str]:
    out = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    out += [f"not in the raw data {k}" for k in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        for stat, value in want[key].items():
            have = got[key].get(stat, math.nan)
            if not math.isclose(have, value, rel_tol=1e-9, abs_tol=1e-9):
                out.append(f"{key} {stat}: stored {have}, raw data gives {value}")
    return out


async def test_aggregates_equal_a_batch_computation_over_the_raw_points_under_skew_backlog_and_sigkill(
    mqtt: MqttEndpoint,
    kafka: KafkaEndpoint,
    influx: InfluxEndpoint,
    influx_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    start_ns = (time.time_ns() - 3600 * S) // (60 * S) * (60 * S)
    batches = fleet(start_ns)
    sent = {(s, ts, metric): v for _, _, _, readings in batches for s, ts, m in readings for metric, v in m.items()}
    accepted = sum(1 for v in sent.values() if v >= 0)
    options = ("--windows", "10s,1m", "--lateness", "2", "--idle-timeout", "3")
    pipeline = PipelineProcess(pipeline_env(mqtt, kafka, influx, influx_bucket, unique), tmp_path / "run.log", options)
    await pipeline.start()
    try:
        with Publisher(mqtt, f"{unique}-gateways") as publisher:
            began = time.monotonic()
            killed = False
            for due, site, payload, _ in batches:
                wait = due - (time.monotonic() - began)
                if wait > 0:
                    await asyncio.sleep(wait)
                if not killed and due >= 25:  # mid-stream, after the silent gateway's windows idled out
                    pipeline.kill()
                    killed = True
                    await pipeline.start()
                await asyncio.to_thread(publisher.publish, [(f"{unique}/air/{site}", payload)], 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240
        problems = ["not compared yet"]
        while loop.time() < deadline:
            raw = await asyncio.to_thread(raw_frame, influx, influx_bucket, "air")
            if len(raw) >= accepted:
                want = await asyncio.to_thread(reference, influx, influx_bucket)
                problems = differences(await asyncio.to_thread(stored, influx, influx_bucket), want)
                if not problems:
                    break
            await asyncio.sleep(1)
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{pipeline.port}/metrics")
        assert status == 200
        corrected = counter(body, "portpulse_processor_windows_corrected_total")
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()
    raw = raw_frame(influx, influx_bucket, "air")
    got_raw = {(s, int(ts), f): float(v) for ts, s, f, v in raw.itertuples(index=False)}
    assert got_raw == {k: v for k, v in sent.items() if v >= 0}, "raw points differ from what was sent"
    assert not problems, "\n".join(problems[:30])
    windows = stored(influx, influx_bucket)
    # Every whole window of a correctly clocked sensor holds all its readings, accepted or not.
    for site in SITES:
        for k in range(3):
            sensor = f"{site}-{k}"
            if sensor == SKEWED:
                continue
            for minute in range(1, SECONDS // 60):
                w = windows[("1m", sensor, "no2", start_ns + minute * 60 * S)]
                lost = OUTAGE[2] - OUTAGE[1] if site == OUTAGE[0] and minute == 1 else 0
                assert w["count"] + w["rejected"] == 60 - lost, (sensor, minute, w)
    late = await consume(kafka, [f"{unique}.late"], expect=1, timeout_s=2, idle_s=0)
    assert late == []
    # The silent gateway's last windows closed on the idle timeout before its backlog came.
    assert corrected > 0
    print(f"event time: {len(windows)} windows equal to pandas over {len(raw)} raw points; "
          f"{corrected} windows corrected after the restart")  # fmt: skip


def counter(metrics: bytes, name: str) -> float:
    """The sum of a Prometheus counter's samples in ``/metrics`` text."""
    total = 0.0
    for line in metrics.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total
