"""The InfluxDB writer against the real InfluxDB (and the real Kafka for the DLQ)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.dialect import Dialect

from portpulse.contract.settings import InfluxSettings, KafkaSettings, SinkSettings
from portpulse.kafka import KafkaDeadLetters
from portpulse.sinks import InfluxWriter, PointColumns
from tests.integration.test_smoke_services import rfc3339_to_ns
from tests.services import InfluxEndpoint, KafkaEndpoint, is_local, local_service_control_async

pytestmark = pytest.mark.integration

HOSTILE = [
    "plain",
    "comma,inside",
    "space inside",
    "equals=inside",
    'quote"inside',
    "back\\slash-mid",
    "unicode-é€🚢",
    "a,b=c d",
    "x=1,y=2 z",
]


def _obj(values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def influx_settings(influx: InfluxEndpoint, bucket: str) -> InfluxSettings:
    from pydantic import SecretStr

    return InfluxSettings(url=influx.url, token=SecretStr(influx.token), org=influx.org, bucket=bucket)


def query_rows(influx: InfluxEndpoint, flux: str) -> list[dict[str, str]]:
    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org, timeout=60_000) as client:
        raw = client.query_api().query_csv(flux, dialect=Dialect(header=True, annotations=[]))
        rows = [r for r in raw if r]
    if not rows:
        return []
    header = rows[0]
    return [dict(zip(header, r, strict=True)) for r in rows[1:] if r != header]


async def dlq_records(kafka: KafkaEndpoint, topic: str, expect: int) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest")
    await consumer.start()
    out: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        for _ in range(60):  # bounded: 60 x 500 ms
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += [(r.value, dict(r.headers)) for r in records]
            if len(out) >= expect:
                break
    finally:
        await consumer.stop()
    return out


async def test_points_read_back_exactly_including_hostile_tags(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    n = 900
    rng = np.random.default_rng(3)
    sensors = _obj([f"{HOSTILE[i % len(HOSTILE)]}-{i % 30}" for i in range(n)])
    sites = _obj([HOSTILE[(i // 7) % len(HOSTILE)] for i in range(n)])
    values = np.concatenate([rng.normal(40, 9, n // 2).round(2), rng.normal(0, 1e6, n - n // 2)])
    ts = 1_764_000_000_123_456_789 + np.arange(n, dtype=np.int64) * 1_000_003
    points = PointColumns("air quality,zone", {"sensor_id": sensors, "site": sites}, {"no2": values}, ts)
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, influx_bucket), SinkSettings(batch_lines=200), dlq) as writer,
    ):
        ticket = await writer.write(points)
        await asyncio.wait_for(ticket.wait(), 60)
    assert ticket.dead_lettered == 0
    rows = query_rows(
        influx,
        f'from(bucket: "{influx_bucket}") |> range(start: 0)'
        ' |> keep(columns: ["_time", "_value", "_field", "_measurement", "sensor_id", "site"])',
    )
    got = sorted(
        (rfc3339_to_ns(r["_time"]), r["_measurement"], r["sensor_id"], r["site"], r["_field"], float(r["_value"]))
        for r in rows
    )
    expected = sorted(
        (int(t), "air quality,zone", s, si, "no2", float(v))
        for t, s, si, v in zip(ts, sensors, sites, values, strict=True)
    )
    assert got == expected


async def test_one_type_conflicting_point_goes_to_dlq_with_server_message(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    base = 1_764_000_000_000_000_000
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, influx_bucket), SinkSettings(batch_lines=1000), dlq) as writer,
    ):
        first = PointColumns(
            "crane", {"sensor_id": _obj(["sts-01"])}, {"wind_speed": np.array([3.5])}, np.array([base])
        )
        await (await writer.write(first))
        n = 101
        values = np.arange(n, dtype=np.float64)
        values[50] = np.nan  # no finite field: cannot be encoded at all
        mixed = PointColumns(
            "crane",
            {"sensor_id": _obj([f"sts-{i:02d}" for i in range(n)])},
            {"wind_speed": values},
            base + 1_000 + np.arange(n, dtype=np.int64),
        )
        # A string where the field is already float: InfluxDB refuses this one point.
        poison = PointColumns(
            "crane", {"sensor_id": _obj(["sts-50"])}, {"wind_speed": _obj(["gusty"])}, np.array([base + 1_050])
        )
        # Both calls land in one batch of 101 lines: 100 good ones around the bad one.
        t1 = await writer.write(mixed)
        t2 = await writer.write(poison)
        await writer.flush()
        assert t1.done() and t2.done()
        assert t1.dead_lettered == 1
    letters = await dlq_records(kafka, f"{unique}.dlq", expect=2)
    rejected = [(v, h) for v, h in letters if h["reason"] == b"influx_rejected"]
    unencodable = [(v, h) for v, h in letters if h["reason"] == b"unencodable_point"]
    # Row 50 of `mixed` has no finite value (NaN) -> unencodable; the string point -> refused by InfluxDB.
    assert len(unencodable) == 1 and b"sts-50" in unencodable[0][0]
    assert len(rejected) == 1
    value, headers = rejected[0]
    assert value == b'crane,sensor_id=sts-50 wind_speed="gusty" ' + str(base + 1_050).encode() + b"\n"
    assert b"conflict" in headers["detail"] and headers["stage"] == b"sink"
    rows = query_rows(
        influx, f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._field == "wind_speed")'
    )
    stored = sorted((r["sensor_id"], float(r["_value"])) for r in rows)
    assert len(stored) == 1 + 100
    assert ("sts-50", 50.0) not in stored and ("sts-49", 49.0) in stored and ("sts-51", 51.0) in stored


@pytest.mark.skipif(not is_local("influx"), reason="needs the local InfluxDB with its default max-values-per-tag")
async def test_points_over_influx_cardinality_guard_are_dead_lettered_and_the_rest_stored(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    limit = 100_000  # scripts/services starts InfluxDB with max-values-per-tag at its default
    base = 1_764_000_000_000_000_000
    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org, timeout=120_000) as client:
        lines = "\n".join(f"air,sensor_id=s{i} no2=1 {base + i}" for i in range(limit))
        client.write_api(write_options=SYNCHRONOUS).write(bucket=influx_bucket, record=lines, write_precision="ns")
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    sensors = ["s7", "rogue-1", "s99999", "rogue-2"]
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, influx_bucket), SinkSettings(batch_lines=1000), dlq) as writer,
    ):
        points = PointColumns(
            "air", {"sensor_id": _obj(sensors)}, {"no2": np.array([41.0, 42.0, 43.0, 44.0])},
            base + 10**12 + np.arange(4, dtype=np.int64),
        )  # fmt: skip
        ticket = await writer.write(points)
        await asyncio.wait_for(ticket.wait(), 60)
    letters = await dlq_records(kafka, f"{unique}.dlq", expect=2)
    assert sorted(h["reason"] for _, h in letters) == [b"cardinality_limit"] * 2
    assert sorted(v.split(b" ")[0] for v, _ in letters) == [b"air,sensor_id=rogue-1", b"air,sensor_id=rogue-2"]
    assert all(b"max-values-per-tag limit exceeded" in h["detail"] for _, h in letters)
    rows = query_rows(
        influx,
        f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._value > 40.0)'
        ' |> keep(columns: ["sensor_id", "_value"])',
    )
    assert sorted((r["sensor_id"], float(r["_value"])) for r in rows) == [("s7", 41.0), ("s99999", 43.0)]


@pytest.mark.skipif(not is_local("influx"), reason="needs an InfluxDB this test may stop (scripts/services)")
async def test_influx_outage_slows_the_caller_and_loses_nothing(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    sink = SinkSettings(
        batch_lines=500, max_pending_batches=4, flush_interval_ms=50, retry_initial_s=0.1, retry_max_s=1.0
    )
    per_call, calls = 250, 200
    base = 1_764_000_000_000_000_000
    outage_s = 12.0
    longest_call_s = 0.0
    max_queue = 0
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, influx_bucket), sink, dlq) as writer,
    ):
        stopped_at = restarted = None
        for call in range(calls):
            if call == 40:
                await local_service_control_async("influx", "down")
                stopped_at = time.monotonic()
            if stopped_at and not restarted and time.monotonic() - stopped_at >= outage_s:
                await local_service_control_async("influx", "up")
                restarted = True
            ts = base + (call * per_call + np.arange(per_call, dtype=np.int64)) * 1_000_000
            points = PointColumns(
                "air", {"sensor_id": _obj([f"s{i % 50}" for i in range(per_call)])}, {"no2": ts % 997 / 10}, ts
            )
            started = time.monotonic()
            # Without a bound the caller would be held until InfluxDB is back: run the restart
            # from here once the outage is long enough, whichever happens first.
            write = asyncio.ensure_future(writer.write(points))
            while not write.done():
                await asyncio.wait({write}, timeout=0.5)
                if stopped_at and not restarted and time.monotonic() - stopped_at >= outage_s:
                    assert not writer.healthy
                    await local_service_control_async("influx", "up")
                    restarted = True
            await write
            longest_call_s = max(longest_call_s, time.monotonic() - started)
            max_queue = max(max_queue, writer.queue_depth)
        await asyncio.wait_for(writer.flush(), 120)
        assert writer.healthy
    assert restarted
    # Backpressure: some write() call was held for most of the outage; the queue never grew past its bound.
    assert longest_call_s >= outage_s / 2
    assert max_queue <= sink.max_pending_batches
    rows = query_rows(
        influx, f'from(bucket: "{influx_bucket}") |> range(start: 0) |> group() |> count(column: "_value")'
    )
    assert int(rows[0]["_value"]) == per_call * calls


async def test_portpulse_query_matches_a_direct_flux_query(
    influx: InfluxEndpoint,
    influx_bucket: str,
    kafka: KafkaEndpoint,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from portpulse.app.cli import main

    base = 1_764_000_000_000_000_000
    n = 600  # 10 minutes at 1 Hz for two sensors of one site
    ts = base + np.repeat(np.arange(n // 2, dtype=np.int64), 2) * 2_000_000_000
    sensors = _obj(["no2-a", "no2-b"] * (n // 2))
    values = np.round(np.sin(np.arange(n) / 17) * 30 + 60, 3)
    points = PointColumns("air", {"sensor_id": sensors, "site": _obj(["quai-de-l-europe"] * n)}, {"no2": values}, ts)
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, influx_bucket), SinkSettings(), dlq) as writer,
    ):
        await (await writer.write(points))
    for name, value in {
        "PORTPULSE_INFLUX__URL": influx.url,
        "PORTPULSE_INFLUX__TOKEN": influx.token,
        "PORTPULSE_INFLUX__ORG": influx.org,
        "PORTPULSE_INFLUX__BUCKET": influx_bucket,
        "PORTPULSE_RETENTION__TIERS": "false",
        "PORTPULSE_RETENTION__RAW_S": "-1",
    }.items():
        monkeypatch.setenv(name, value)
    start, stop = "2025-11-24T16:00:00Z", "2025-11-24T17:00:00Z"
    assert (
        main(
            [
                "query",
                "--domain",
                "air",
                "--metric",
                "no2",
                "--site",
                "quai-de-l-europe",
                "--start",
                start,
                "--stop",
                stop,
                "--every",
                "1m",
                "--fn",
                "max",
                "--format",
                "json",
            ]
        )
        == 0
    )
    cli_rows = json.loads(capsys.readouterr().out)
    direct = query_rows(
        influx,
        f'from(bucket: "{influx_bucket}") |> range(start: {start}, stop: {stop})'
        ' |> filter(fn: (r) => r._measurement == "air" and r._field == "no2" and r.site == "quai-de-l-europe")'
        ' |> group() |> aggregateWindow(every: 1m, fn: max, createEmpty: false, timeSrc: "_start")',
    )
    assert len(cli_rows) == len(direct) >= 10
    assert [(r["time"], r["value"]) for r in cli_rows] == [(d["_time"], float(d["_value"])) for d in direct]
    # And against the numbers we wrote, computed here without InfluxDB.
    minute = (ts - ts[0] + (ts[0] % 60_000_000_000)) // 60_000_000_000
    expected_max = [float(values[minute == m].max()) for m in np.unique(minute)]
    assert [r["value"] for r in cli_rows] == expected_max


@contextlib.asynccontextmanager
async def stored_writer(
    influx: InfluxEndpoint, bucket: str, kafka: KafkaEndpoint, unique: str
) -> AsyncIterator[InfluxWriter]:
    """An InfluxWriter on ``bucket`` with its dead letters in this test's Kafka topics."""
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=unique)
    async with (
        KafkaDeadLetters(kafka_settings) as dlq,
        InfluxWriter(influx_settings(influx, bucket), SinkSettings(), dlq) as writer,
    ):
        yield writer


async def test_read_back_returns_exactly_the_stored_raw_points_and_rejected_readings(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    """What the processor reads back to recompute a window: raw points of the asked sensors and
    metrics in the range, rejected readings with their reason (and value where finite); nothing
    of other sensors, metrics or times."""
    from portpulse.contract.points import SeriesRange

    base = (time.time_ns() - 3600 * 10**9) // 60_000_000_000 * 60_000_000_000
    sensors = _obj(["s-1", "a,b=c d", "s-1", "a,b=c d", "other"])
    ts = base + np.array([0, 1, 2, 3, 4], dtype=np.int64) * 10**9
    raw = PointColumns("air", {"sensor_id": sensors, "site": _obj(["q"] * 5)},
                       {"no2": np.array([40.5, 41.0, 42.25, 43.0, 44.0]), "pm25": np.array([1.0] * 5)}, ts)  # fmt: skip
    rejected = PointColumns(
        "air_rejected", {"sensor_id": _obj(["s-1", "a,b=c d"]), "site": _obj(["q", "q"])},
        {"no2": np.array([999.0, np.nan]), "no2_reason": _obj(["spike", "non_finite"])},
        base + np.array([5, 6], dtype=np.int64) * 10**9,
    )  # fmt: skip
    async with stored_writer(influx, influx_bucket, kafka, unique) as writer:
        for points in (raw, rejected):
            await asyncio.wait_for((await writer.write(points)).wait(), 60)
        got = await writer.read(SeriesRange("air", ("s-1", "a,b=c d"), ("no2",), base, base + 6 * 10**9 + 1))
        narrower = await writer.read(SeriesRange("air", ("s-1",), ("no2",), base + 1, base + 5 * 10**9))
    values = [None if np.isnan(v) else v for v in got.value.tolist()]
    rows = sorted(zip(got.sensor_id.tolist(), got.metric.tolist(), (got.ts_ns - base).tolist(), values,
                      got.reason.tolist(), strict=True), key=lambda r: r[2])  # fmt: skip
    assert rows == [
        ("s-1", "no2", 0, 40.5, ""), ("a,b=c d", "no2", 10**9, 41.0, ""), ("s-1", "no2", 2 * 10**9, 42.25, ""),
        ("a,b=c d", "no2", 3 * 10**9, 43.0, ""), ("s-1", "no2", 5 * 10**9, 999.0, "spike"),
        ("a,b=c d", "no2", 6 * 10**9, None, "non_finite"),
    ]  # fmt: skip
    assert got.accepted.tolist().count(True) == 4
    assert (narrower.ts_ns - base).tolist() == [2 * 10**9]


async def test_retract_removes_one_field_of_a_point_and_keeps_the_others(
    influx: InfluxEndpoint, influx_bucket: str, kafka: KafkaEndpoint, unique: str
) -> None:
    """A reading rejected when judged again leaves the store: only its field of the point, the
    sensor's other metrics at that instant stay (InfluxDB deletes whole points)."""
    base = (time.time_ns() - 3600 * 10**9) // 60_000_000_000 * 60_000_000_000
    ts = base + np.array([0, 10**9], dtype=np.int64)
    points = PointColumns("air", {"sensor_id": _obj(["s-1", "s-1"]), "site": _obj(["quai", "quai"])},
                          {"no2": np.array([40.5, 41.5]), "pm25": np.array([11.0, 12.0])}, ts)  # fmt: skip
    other = PointColumns("air", {"sensor_id": _obj(["s-2"]), "site": _obj(["quai"])},
                         {"no2": np.array([50.0])}, ts[:1])  # fmt: skip
    async with stored_writer(influx, influx_bucket, kafka, unique) as writer:
        for p in (points, other):
            await asyncio.wait_for((await writer.write(p)).wait(), 60)
        await writer.retract("air", "no2", [("s-1", int(ts[0]))])
    rows = query_rows(
        influx,
        f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air")'
        ' |> keep(columns: ["_time", "_value", "_field", "sensor_id", "site"])',
    )
    got = sorted((r["sensor_id"], r["site"], r["_field"], rfc3339_to_ns(r["_time"]) - base, float(r["_value"]))
                 for r in rows)  # fmt: skip
    assert got == [
        ("s-1", "quai", "no2", 10**9, 41.5), ("s-1", "quai", "pm25", 0, 11.0), ("s-1", "quai", "pm25", 10**9, 12.0),
        ("s-2", "quai", "no2", 0, 50.0),
    ]  # fmt: skip
