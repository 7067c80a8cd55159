"""A misbehaving gateway cannot take the platform down: ``portpulse run`` with its default
admission budgets, a normal simulated fleet, and a rogue gateway minting 100 000 sensor ids.

Checked against the real services: every reading of the fleet stored and aggregated (against
an independent computation), the rogue readings over budget in the DLQ with their reason and
payload, InfluxDB's series count within the budget, both processes' memory bounded, and the
refusal visible in the metrics, the health document and the dashboard's alerts.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from portpulse.simulators.stream import generate
from tests.integration.pipeline import Publisher, within_one_hour
from tests.integration.test_end_to_end import (
    Window,
    assert_aggregates_match,
    expected_from_record,
    http_get,
    stored_aggregates,
    stream,
)
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.integration.test_smoke_services import rfc3339_to_ns
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint, is_local, local_service_pid

pytestmark = pytest.mark.integration

ROGUE_IDS = 100_000
SITE_BUDGET = 1_000  # AdmissionSettings.site_new_per_hour, the default under test
#: s the rogue test needs inside one UTC hour: the budget is per calendar hour, so a test that
#: spans an hour's turn sees the restarted bridge grant the rogue site a fresh budget.
ROGUE_TEST_S = 240.0
#: One line per figure, printed at the end of the pytest session (tests/conftest.py).
CARDINALITY_REPORT: list[str] = []


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def series_cardinality(influx: InfluxEndpoint, bucket: str) -> int:
    """InfluxDB's own count of the series in the test's database (InfluxQL, 1.8)."""
    from influxdb_client import InfluxDBClient

    database = bucket.split("/")[0]
    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org) as client:
        raw = client.api_client.call_api(
            "/query", "GET", query_params=[("db", database), ("q", "SHOW SERIES EXACT CARDINALITY")],
            _return_http_data_only=True, _preload_content=False,
        )  # fmt: skip
        doc = json.loads(raw.data)
    return sum(int(s["values"][0][0]) for s in doc["results"][0].get("series", []))


def stored_fleet_count(influx: InfluxEndpoint, bucket: str, rogue_site: str) -> int:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0)'
        f' |> filter(fn: (r) => r._measurement !~ /_/ and r.site != "{rogue_site}") |> group() |> count()',
    )
    return int(rows[0]["_value"]) if rows else 0


def calm_fleet(unique: str) -> tuple[list[tuple[str, bytes]], dict[Window, list[tuple[int, float]]]]:
    """A normal simulated fleet (24 sensors, 100 s) and its windows, computed independently."""
    config = stream(unique, sensors=24, seconds=100, faults={})
    fleet = [(m.topic, m.payload) for b in generate(config) for m in b.messages]
    expected, _, _ = expected_from_record([m for b in generate(config) for m in b.messages], [])
    return fleet, expected


def publishing(mqtt: MqttEndpoint, unique: str, loads: list[tuple[str, list[tuple[str, bytes]], float]],
               errors: list[BaseException]) -> list[threading.Thread]:  # fmt: skip
    """One started thread per ``(client, messages, per_second)`` publishing at QoS 1; failures go to ``errors``."""

    def publish(client: str, messages: list[tuple[str, bytes]], per_second: float) -> None:
        try:
            with Publisher(mqtt, f"{unique}-{client}") as publisher:
                publisher.publish(messages, 1, per_second=per_second)
        except BaseException as exc:  # surfaced by the caller
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=load) for load in loads]
    for thread in threads:
        thread.start()
    return threads


async def fleet_stored(
    influx: InfluxEndpoint, bucket: str, expected: dict[Window, list[tuple[int, float]]], other_site: str,
    other_prefix: str, timeout_s: float = 240,
) -> dict[Window, dict[str, float]]:  # fmt: skip
    """Poll (bounded) until the fleet's readings are stored and its windows aggregated; its
    aggregates (those of sensors named ``other_prefix...`` left out)."""
    readings = sum(len(v) for v in expected.values())
    deadline = time.monotonic() + timeout_s
    stored: dict[Window, dict[str, float]] = {}
    while time.monotonic() < deadline:
        if await asyncio.to_thread(stored_fleet_count, influx, bucket, other_site) >= readings:
            every = await asyncio.to_thread(stored_aggregates, influx, bucket)
            stored = {k: v for k, v in every.items() if not k[1].startswith(other_prefix)}
            if sorted(stored) == sorted(expected):
                break
        await asyncio.sleep(1)
    return stored


async def dead_letters(kafka: KafkaEndpoint, topic: str, expect: int, timeout_s: float = 120) -> list[dict[str, bytes]]:
    """The DLQ's records (headers plus ``payload``), read until ``expect`` of them (bounded)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest")
    await consumer.start()
    out: list[dict[str, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
                out += [{**dict(r.headers), "payload": r.value or b""} for r in records]
    finally:
        await consumer.stop()
    return out


@pytest.mark.skipif(not is_local("influx"), reason="reads the local InfluxDB's resident memory (scripts/services)")
async def test_a_rogue_gateway_minting_ids_is_held_to_its_budget_and_the_fleet_is_untouched(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await rogue_beside_fleet(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def rogue_beside_fleet(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await within_one_hour(ROGUE_TEST_S)
    hour = time.time() // 3600
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique)
    env = {k: v for k, v in env.items() if not k.startswith("PORTPULSE_ADMISSION__")}  # the defaults
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    fleet, expected = calm_fleet(unique)
    rogue_site = "gw-firmware-7"
    now_ms = time.time_ns() // 1_000_000
    rogue = [
        (f"{unique}/air/{rogue_site}/rogue-{i}", json.dumps({"ts": now_ms - i % 60_000, "metrics": {"no2": 1}}))
        for i in range(ROGUE_IDS)
    ]
    rogue_payloads = {topic: payload.encode() for topic, payload in rogue}
    influx_pid = local_service_pid("influx")
    assert influx_pid is not None, "scripts/services runs InfluxDB here but left no pid file"

    await pipeline.start()  # kills its child if it fails
    assert pipeline.proc is not None
    base = f"http://127.0.0.1:{pipeline.port}"
    before = {"portpulse run": rss_mb(pipeline.proc.pid), "InfluxDB": rss_mb(influx_pid)}
    errors: list[BaseException] = []
    # 20 s of normal fleet; the rogue as fast as the broker's acks come back
    threads = publishing(mqtt, unique, [("fleet", fleet, len(fleet) / 20),
                                        ("rogue", list(rogue_payloads.items()), 50_000)], errors)  # fmt: skip
    try:
        for thread in threads:
            await asyncio.to_thread(thread.join, 300)
        assert not errors, errors
        refused = ROGUE_IDS - SITE_BUDGET
        letters = await dead_letters(kafka, f"{unique}.dlq", expect=refused)
        readings = sum(len(v) for v in expected.values())
        stored = await fleet_stored(influx, influx_bucket, expected, rogue_site, "rogue-")
        after = {"portpulse run": rss_mb(pipeline.proc.pid), "InfluxDB": rss_mb(influx_pid)}
        status, metrics = await asyncio.to_thread(http_get, f"{base}/metrics")
        _, state_doc = await asyncio.to_thread(http_get, f"{base}/api/state")
        state = json.loads(state_doc)
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        for thread in threads:
            thread.join(300)
        await pipeline.stop()

    # the fleet: every reading stored, every window equal to the independent computation
    assert stored_fleet_count(influx, influx_bucket, rogue_site) == readings
    assert_aggregates_match(stored, expected)
    # the rogue: the site's hourly budget admitted, the rest in the DLQ with reason and payload
    assert len(letters) == refused
    assert {letter["reason"] for letter in letters} == {b"cardinality_limit"}
    refused_topics = {letter["source"].decode() for letter in letters}
    assert len(refused_topics) == refused  # one letter per refused message
    assert all(letter["payload"] == rogue_payloads[letter["source"].decode()] for letter in letters[::97])
    assert b"site gw-firmware-7 has had 1000 new series this hour" in letters[-1]["detail"]
    rows = query_rows(
        influx,
        f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air"'
        f' and r.site == "{rogue_site}") |> keep(columns: ["sensor_id"])',
    )
    admitted_topics = {f"{unique}/air/{rogue_site}/{r['sensor_id']}" for r in rows}
    assert len(rows) == len(admitted_topics) == SITE_BUDGET
    assert admitted_topics | refused_topics == set(rogue_payloads) and not admitted_topics & refused_topics
    # InfluxDB: one raw and one 1-minute series per admitted sensor, nothing else
    fleet_sensors = len({k[1] for k in expected})
    series = series_cardinality(influx, influx_bucket)
    assert fleet_sensors + SITE_BUDGET <= series <= 2 * (fleet_sensors + SITE_BUDGET), series
    # seen by operators: counters, the health document, the dashboard's alerts
    assert status == 200
    assert f'portpulse_ingest_refused_readings_total{{reason="cardinality_limit"}} {float(refused)}'.encode() in metrics
    assert f"air/{rogue_site}: cardinality_limit x{refused}" in " ".join(state["health"]["warnings"]["admission"])
    (alert,) = [a for a in state["alerts"] if a["site"] == rogue_site]
    assert alert["value"] == refused and alert["sensor_id"].startswith("rogue-")
    # `portpulse sensors` lists what the bridge registered; a restarted bridge reads it back and
    # does not grant the site's hourly budget again
    lister = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "portpulse", "sensors", "--format", "json", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(lister.communicate(), 120)
    assert lister.returncode == 0
    listed = json.loads(out)
    sites = {(row["domain"], row["site"]): row["sensors"] for row in listed}
    assert sites[("air", rogue_site)] == SITE_BUDGET
    assert sum(sites.values()) == SITE_BUDGET + fleet_sensors
    bridge = PipelineProcess(env, tmp_path / "bridge.log", options=(), command="bridge")
    try:
        await bridge.start()
        assert time.time() // 3600 == hour, f"the test took more than ROGUE_TEST_S ({ROGUE_TEST_S:g} s)"
        with Publisher(mqtt, f"{unique}-rogue") as publisher:
            publisher.publish([(f"{unique}/air/{rogue_site}/rogue-after-restart", rogue[0][1].encode())], 1)
        more = await dead_letters(kafka, f"{unique}.dlq", expect=refused + 1)
        late = [letter for letter in more if letter["source"].endswith(b"rogue-after-restart")]
        assert len(more) == refused + 1 and len(late) == 1 and late[0]["reason"] == b"cardinality_limit"
    finally:
        assert await bridge.stop() == 0, bridge.log.read_text()[-3000:]
    assert f"{SITE_BUDGET + fleet_sensors} known series read back" in bridge.log.read_text()
    growth = {name: after[name] - before[name] for name in before}
    CARDINALITY_REPORT.append(
        f"{ROGUE_IDS} rogue ids, {refused} refused; InfluxDB series {series}; "
        + "; ".join(f"{n} RSS {before[n]:.0f} -> {after[n]:.0f} MB" for n in before)
    )
    # bounded memory: without the budget the same load grew InfluxDB by ~1.6 GB and the pipeline
    # by ~350 MB (16 KB and 3.5 KB per series)
    assert growth["InfluxDB"] < 400, growth
    assert growth["portpulse run"] < 200, growth


FLOOD_SITE, FLOOD_MESSAGES, FLOOD_BATCH = "flood-1", 400, 50
CEILING, BUCKET_S = 500, 2  # readings/s per site, and the bucket in seconds of it


async def test_a_site_over_its_rate_ceiling_is_dead_lettered_and_the_others_are_stored_exactly(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await flood_beside_fleet(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def flood_beside_fleet(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique)
    env |= {"PORTPULSE_ADMISSION__SITE_RATE_PER_S": str(CEILING), "PORTPULSE_ADMISSION__SITE_BURST_S": str(BUCKET_S)}
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    fleet, expected = calm_fleet(unique)
    # Gateway batches of 50 readings, each (sensor, ts) once: 20 000 readings at 10 000/s, 20x the
    # ceiling, beside the fleet's sites at well under 100 readings/s each.
    now_ms = time.time_ns() // 1_000_000
    flood = {
        json.dumps({"readings": [{"sensor_id": f"f-{k % 20}", "ts": now_ms - 60_000 + m * FLOOD_BATCH + k,
                                  "metrics": {"no2": 1.0}} for k in range(FLOOD_BATCH)]}).encode()
        for m in range(FLOOD_MESSAGES)
    }  # fmt: skip
    sent = {(r["sensor_id"], r["ts"]) for payload in flood for r in json.loads(payload)["readings"]}
    errors: list[BaseException] = []
    await pipeline.start()
    base = f"http://127.0.0.1:{pipeline.port}"
    flood_started, flood_s = time.monotonic(), math.inf
    threads = publishing(mqtt, unique, [("fleet", fleet, len(fleet) / 20),
                                        ("flood", [(f"{unique}/air/{FLOOD_SITE}", p) for p in flood], 200)],
                         errors)  # fmt: skip
    try:
        for thread in threads:
            await asyncio.to_thread(thread.join, 300)
        assert not errors, errors
        readings = sum(len(v) for v in expected.values())
        deadline = time.monotonic() + 240
        letters: list[dict[str, bytes]] = []
        flood_stored: set[tuple[str, int]] = set()
        while time.monotonic() < deadline:  # bounded poll: every flood reading stored or dead-lettered
            letters = await dead_letters(kafka, f"{unique}.dlq", expect=1, timeout_s=5)
            rows = await asyncio.to_thread(
                query_rows, influx,
                f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air"'
                f' and r.site == "{FLOOD_SITE}") |> keep(columns: ["sensor_id", "_time"])',
            )  # fmt: skip
            flood_stored = {(r["sensor_id"], rfc3339_to_ns(r["_time"]) // 10**6) for r in rows}
            if len(flood_stored) + FLOOD_BATCH * len(letters) >= len(sent):
                flood_s = time.monotonic() - flood_started
                break
            await asyncio.sleep(1)
        stored = await fleet_stored(influx, influx_bucket, expected, FLOOD_SITE, "f-")
        status, metrics = await asyncio.to_thread(http_get, f"{base}/metrics")
        _, state_doc = await asyncio.to_thread(http_get, f"{base}/api/state")
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        for thread in threads:
            thread.join(300)
        await pipeline.stop()

    # the calm sites: every reading stored, every window equal to the independent computation
    assert stored_fleet_count(influx, influx_bucket, FLOOD_SITE) == readings
    assert_aggregates_match(stored, expected)
    # the flood: each reading either stored or in a dead-lettered message, never both, never lost
    assert letters and {letter["reason"] for letter in letters} == {b"rate_limit"}
    assert all(letter["payload"] in flood for letter in letters)
    assert len({letter["payload"] for letter in letters}) == len(letters)
    refused = {(r["sensor_id"], r["ts"]) for letter in letters for r in json.loads(letter["payload"])["readings"]}
    assert flood_stored | refused == sent and not flood_stored & refused
    assert f"air/{FLOOD_SITE} over {CEILING} readings/s (admission.site_rate_per_s".encode() in letters[0]["detail"]
    # held to the ceiling: at most the bucket, the rate over the time from the first flood
    # message to the last one accounted for, and one message (a message passes while tokens last)
    assert len(flood_stored) <= CEILING * BUCKET_S + CEILING * flood_s + FLOOD_BATCH, (len(flood_stored), flood_s)
    CARDINALITY_REPORT.append(
        f"rate ceiling {CEILING}/s: {len(flood_stored)} of {len(sent)} flood readings stored, "
        f"{len(letters)} messages dead-lettered, over {flood_s:.1f} s; the fleet stored exactly"
    )
    # seen by operators
    assert status == 200
    assert f'portpulse_ingest_dlq_total{{reason="rate_limit"}} {float(len(letters))}'.encode() in metrics
    state = json.loads(state_doc)
    warnings = " ".join(state["health"]["warnings"]["admission"])
    assert f"air/{FLOOD_SITE}: rate_limit x{len(letters)} messages" in warnings
