"""The MQTT -> Kafka bridge against real Mosquitto and Kafka."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import REGISTRY

from portpulse.contract.settings import MqttSettings
from portpulse.ingest.mqtt_asyncio import AsyncioMqttSource, _Connection
from portpulse.simulators.rawmqtt import publish_messages
from tests.integration.pipeline import Publisher, bridge_settings, consume, readings_of, running_bridge
from tests.services import KafkaEndpoint, MqttEndpoint, is_local, local_service_control_async

pytestmark = pytest.mark.integration

NOW_S = int(time.time())  # readings must be within the bridge's past/future window


def metric_per_message(unique: str, start: int, n: int) -> list[tuple[str, bytes]]:
    """Messages ``start..start+n`` of sensor s1, each with its own metric ``m{i}`` (countable)."""
    return [
        (f"{unique}/air/q/s1", json.dumps({"ts": NOW_S, "metrics": {f"m{i}": 1.0}}).encode())
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize(
    ("client", "protocol", "qos"), [("asyncio", "5", 1), ("asyncio", "3.1.1", 2), ("asyncio", "5", 0), ("paho", "5", 1)]
)
async def test_three_payload_formats_round_trip(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, unique: str, client: str, protocol: str, qos: int
) -> None:
    settings = bridge_settings(mqtt, kafka, unique, mqtt_extra={"client": client, "protocol": protocol, "qos": qos})
    ts_ms = NOW_S * 1000
    messages = [
        (
            f"{unique}/air/quai-de-l-europe/no2-1",
            json.dumps({"ts": ts_ms, "metrics": {"no2": 41.5, "pm25": 9.25}}).encode(),
        ),
        (
            f"{unique}/cell/port-2000",
            json.dumps(
                {
                    "readings": [
                        {
                            "sensor_id": "cell-1",
                            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(NOW_S))}.5Z",
                            "metrics": {"rsrp": -97.0},
                        },
                        {"sensor_id": "cell-2", "ts": NOW_S, "metrics": {"rsrp": -88.5, "connected_ues": 140}},
                    ]
                }
            ).encode(),
        ),
        (
            f"{unique}/crane/terminal-de-france/gw-7",
            f"crane,sensor_id=sts-04 hoist_load=41.2,spreader_locked=t {NOW_S * 10**9 + 7}\n"
            f"crane,sensor_id=sts-05,site=tnmsc wind_speed=12.5 {NOW_S * 10**9 + 8}".encode(),
        ),
    ]
    async with running_bridge(settings) as bridge:
        with Publisher(mqtt, f"{unique}-pub") as pub:
            pub.publish(messages, qos=qos)
        records = await consume(
            kafka, [f"{unique}.readings.air", f"{unique}.readings.cell", f"{unique}.readings.crane"], expect=8
        )
    got = sorted((r.topic, r.sensor_id, r.site, r.metric, r.ts_ns, r.value) for r in readings_of(records))
    ns = NOW_S * 10**9
    assert got == sorted(
        [
            (f"{unique}.readings.air", "no2-1", "quai-de-l-europe", "no2", ns, 41.5),
            (f"{unique}.readings.air", "no2-1", "quai-de-l-europe", "pm25", ns, 9.25),
            (f"{unique}.readings.cell", "cell-1", "port-2000", "rsrp", ns + 500_000_000, -97.0),
            (f"{unique}.readings.cell", "cell-2", "port-2000", "rsrp", ns, -88.5),
            (f"{unique}.readings.cell", "cell-2", "port-2000", "connected_ues", ns, 140.0),
            (f"{unique}.readings.crane", "sts-04", "terminal-de-france", "hoist_load", ns + 7, 41.2),
            (f"{unique}.readings.crane", "sts-04", "terminal-de-france", "spreader_locked", ns + 7, 1.0),
            (f"{unique}.readings.crane", "sts-05", "tnmsc", "wind_speed", ns + 8, 12.5),
        ]
    )
    # Kafka keys are the sensor ids, so one sensor's readings stay in one partition, in order.
    assert {(t, k) for t, k, _, _ in records} >= {(f"{unique}.readings.air", b"no2-1")}
    # Every message acknowledged (PUBACK / PUBREC + PUBCOMP), none left to redeliver.
    assert bridge.result().acked == len(messages) and bridge.result().ack_skipped == 0


BAD_INPUTS = {
    "malformed_json": ("air/q/s1", b'{"metrics": {"no2": 1'),
    "malformed_line_protocol": ("air/q/s1", b"air no2"),
    "non_numeric_value": ("air/q/s1", b'{"metrics": {"no2": "high"}}'),
    "missing_metrics": ("air/q/s1", b'{"ts": 1}'),
    "non_finite_value": ("air/q/s1", b'{"metrics": {"no2": NaN}}'),
    "bad_topic": ("Air/q/s1", b'{"metrics": {"no2": 1}}'),
    "ts_too_far_future": ("air/q/s1", json.dumps({"ts": NOW_S + 86400, "metrics": {"no2": 1}}).encode()),
    "ts_too_far_past": ("air/q/s1", json.dumps({"ts": NOW_S - 30 * 86400, "metrics": {"no2": 1}}).encode()),
    "payload_too_large": ("air/q/s1", b'{"metrics": {"no2": 1}, "pad": "' + b"x" * 3000 + b'"}'),
    "bad_sensor_id": ("air/q", b'{"readings": [{"sensor_id": "x,evil=1 v=9", "metrics": {"no2": 1}}]}'),
    "bad_metric_name": ("air/q/s1", b'{"metrics": {"no2 v=1": 1}}'),
    "not_utf8": ("air/q/s1", b"\xff\xfe\x00"),
    "bad_timestamp": ("air/q/s1", b'{"ts": "soon", "metrics": {"no2": 1}}'),
}


async def test_every_bad_input_lands_in_the_dlq_and_good_messages_still_arrive(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, unique: str
) -> None:
    settings = bridge_settings(mqtt, kafka, unique, ingest_extra={"max_payload_bytes": 2048})
    good = [
        (f"{unique}/air/q/good-{i}", json.dumps({"ts": NOW_S, "metrics": {"no2": float(i)}}).encode())
        for i in range(20)
    ]
    bad = [(f"{unique}/{topic}", payload) for topic, payload in BAD_INPUTS.values()]
    interleaved = [m for pair in zip(good, bad + [None] * len(good), strict=False) for m in pair if m is not None]
    async with running_bridge(settings) as bridge:
        with Publisher(mqtt, f"{unique}-pub") as pub:
            pub.publish(interleaved)
        dlq = await consume(kafka, [f"{unique}.dlq"], expect=len(bad))
        readings = await consume(kafka, [f"{unique}.readings.air"], expect=len(good), idle_s=0.5)
    assert not bridge.done() or bridge.result().messages == len(interleaved)
    by_reason = {h["reason"].decode(): (v, h) for _, _, v, h in dlq}
    assert sorted(by_reason) == sorted(BAD_INPUTS)
    assert len(dlq) == len(bad)
    for reason, (topic, payload) in BAD_INPUTS.items():
        value, headers = by_reason[reason]
        assert value == payload, reason  # the original bytes, untouched
        assert headers["source"] == f"{unique}/{topic}".encode()
        assert headers["stage"] == b"ingest" and headers["detail"] and int(headers["time_ns"]) > 0
    assert sorted(r.sensor_id for r in readings_of(readings)) == sorted(f"good-{i}" for i in range(20))
    stats = bridge.result()
    assert stats.messages == len(interleaved) and stats.dead_letters == len(bad)
    assert stats.acked == len(interleaved)


@pytest.mark.skipif(not is_local("kafka"), reason="needs a Kafka this test may stop (scripts/services)")
async def test_kafka_outage_loses_no_acknowledged_message(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, unique: str
) -> None:
    settings = bridge_settings(mqtt, kafka, unique)
    n_before, n_during, n_after = 200, 1000, 200

    def batch(start: int, n: int) -> list[tuple[str, bytes]]:
        return [
            (f"{unique}/air/q/s{i % 10}", json.dumps({"ts": NOW_S * 1000 + i, "metrics": {"no2": float(i)}}).encode())
            for i in range(start, start + n)
        ]

    async with running_bridge(settings) as bridge:
        with Publisher(mqtt, f"{unique}-pub") as pub:
            pub.publish(batch(0, n_before))
            await local_service_control_async("kafka", "down")
            down_at = time.monotonic()
            pub.publish(batch(n_before, n_during))  # the broker acks these; the bridge holds its own acks
            held = 0.0
            while time.monotonic() - down_at < 12:
                held = max(held, REGISTRY.get_sample_value("portpulse_ingest_in_flight") or 0.0)
                await asyncio.sleep(0.2)
            await local_service_control_async("kafka", "up")
            pub.publish(batch(n_before + n_during, n_after))
        total = n_before + n_during + n_after
        records = await consume(kafka, [f"{unique}.readings.air"], expect=total, timeout_s=120, idle_s=3)
    values = [r.value for r in readings_of(records)]
    assert set(values) == {float(i) for i in range(total)}  # nothing lost
    duplicates = len(values) - len(set(values))
    print(f"kafka outage: {total} published, {len(values)} in Kafka, {duplicates} duplicates")
    assert duplicates <= n_during  # at-least-once: only resends of the outage window may repeat
    # While Kafka was down the bridge held (did not ack) every message of the outage window.
    assert held >= n_during
    assert bridge.result().acked == bridge.result().messages


@pytest.mark.skipif(not is_local("mqtt"), reason="needs a Mosquitto this test may pause (scripts/services)")
async def test_a_silent_broker_is_dropped_and_the_session_resumed(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, unique: str
) -> None:
    """SIGSTOP keeps the TCP connection open but silent: only keepalive can notice it."""
    extra = {"keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 2}
    settings = bridge_settings(mqtt, kafka, unique, mqtt_extra=extra)

    async with running_bridge(settings) as bridge:
        with Publisher(mqtt, f"{unique}-pub-a") as pub:
            pub.publish(metric_per_message(unique, 0, 50))
        await consume(kafka, [f"{unique}.readings.air"], expect=50, idle_s=0)
        await local_service_control_async("mqtt", "pause")
        try:
            # Silent for 1.5 keepalives (7.5 s): the bridge gives the connection up.
            deadline = time.monotonic() + 30
            dropped = False
            while not dropped and time.monotonic() < deadline:
                dropped = REGISTRY.get_sample_value("portpulse_ingest_mqtt_connected") == 0
                await asyncio.sleep(0.2)
        finally:
            await local_service_control_async("mqtt", "resume")
        with Publisher(mqtt, f"{unique}-pub-b") as pub:
            pub.publish(metric_per_message(unique, 50, 50))
        records = await consume(kafka, [f"{unique}.readings.air"], expect=100, timeout_s=90)
    assert dropped, "the bridge kept a silent connection for 30 s"
    assert {r.metric for r in readings_of(records)} == {f"m{i}" for i in range(100)}
    assert bridge.result().mqtt_reconnects >= 1


@pytest.mark.parametrize("read_batch_bytes", [2048, 0])
async def test_a_stream_of_small_messages_is_read_in_gathered_reads_and_its_tail_arrives_after_silence(
    mqtt: MqttEndpoint, unique: str, monkeypatch: pytest.MonkeyPatch, read_batch_bytes: int
) -> None:
    """The asyncio client lets the kernel gather small packets (``mqtt.read_batch_bytes``, SO_RCVLOWAT):
    a fast stream arrives in reads of about the mark, and its last messages, which leave less than
    the mark waiting, still arrive with nothing behind them (keepalive 600 s: no PINGRESP comes to
    wake the reader)."""
    reads: list[int] = []
    data_received = _Connection.data_received

    def counted(self: _Connection, data: bytes) -> None:
        reads.append(len(data))
        data_received(self, data)

    monkeypatch.setattr(_Connection, "data_received", counted)
    settings = MqttSettings(
        host=mqtt.host, port=mqtt.port, client_id=f"{unique}-sub", subscriptions=(f"{unique}/#",), qos=1,
        keepalive_s=600, read_batch_bytes=read_batch_bytes,
    )  # fmt: skip
    n = 20_000
    messages = [(f"{unique}/air/q/s{i % 50}", f"air no2={i} {NOW_S * 10**9}".encode()) for i in range(n)]
    received: list[bytes] = []
    async with AsyncioMqttSource(settings, max_in_flight=50_000) as source:
        deadline = time.monotonic() + 30
        while not source.subscribed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert source.subscribed
        publishing = asyncio.create_task(asyncio.to_thread(publish_messages, mqtt.host, mqtt.port, messages, 1))
        reads.clear()
        deadline = time.monotonic() + 60
        while len(received) < n and time.monotonic() < deadline:
            batch = await source.get_batch(n, 0.5)
            for inbound in batch:
                source.ack(inbound)
            received += [inbound.message.payload for inbound in batch]
        await publishing
    assert sorted(received, key=lambda p: int(p.split(b"=")[1].split()[0])) == [p for _, p in messages]
    if read_batch_bytes:
        # The stream outruns the mark many times over; only reads at a tick's end are shorter.
        assert sum(reads) / len(reads) >= read_batch_bytes / 2, f"{len(reads)} reads of {sum(reads)} bytes"
