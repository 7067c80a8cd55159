"""One smoke test per real service: each does real work, not just a ping."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt_client
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.dialect import Dialect
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint, wait_for

pytestmark = pytest.mark.integration

_ANNOTATIONLESS = Dialect(header=True, annotations=[], delimiter=",")


def rfc3339_to_ns(text: str) -> int:
    """'2023-11-14T22:13:20.123456789Z' -> ns since the epoch, exactly (no float on the way)."""
    import calendar
    import time

    whole, _, frac = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def test_mqtt_qos1_round_trip(mqtt: MqttEndpoint, unique: str) -> None:
    topic = f"sensors/air/{unique}/no2-1"
    got: list[tuple[str, bytes, int]] = []
    subscribed = threading.Event()

    sub = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id=f"{unique}-sub", protocol=mqtt_client.MQTTv5)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, msg: got.append((msg.topic, bytes(msg.payload), msg.qos))
    sub.connect(mqtt.host, mqtt.port)
    sub.loop_start()
    pub = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id=f"{unique}-pub", protocol=mqtt_client.MQTTv5)
    pub.connect(mqtt.host, mqtt.port)
    pub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(30)
        payloads = [f'{{"ts": {1_700_000_000_000 + i}, "metrics": {{"no2": {i}.5}}}}'.encode() for i in range(50)]
        infos = [pub.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
        wait_for(lambda: len(got) >= len(payloads), 30, what="all 50 QoS1 messages")
        assert got == [(topic, p, 1) for p in payloads]
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


async def test_kafka_idempotent_produce_and_group_commit(kafka: KafkaEndpoint, unique: str) -> None:
    topic, group = f"{unique}.smoke", f"{unique}-group"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        sent = {f"sensor-{i % 5}".encode(): [] for i in range(5)}  # type: dict[bytes, list[bytes]]
        for i in range(100):
            key, value = f"sensor-{i % 5}".encode(), f"reading-{i}".encode()
            await producer.send(topic, value, key=key)
            sent[key].append(value)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received: dict[bytes, list[bytes]] = {k: [] for k in sent}
        count = 0
        for _ in range(200):  # bounded: each getmany waits at most 500 ms
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for r in records:
                    received[r.key].append(r.value)
                    count += 1
            if count >= 100:
                break
        # Per key (one partition each) the order is the send order; nothing lost, nothing twice.
        assert received == sent
        await consumer.commit()
        committed = {
            tp.partition: await consumer.committed(tp) for tp in (TopicPartition(topic, 0), TopicPartition(topic, 1))
        }
        assert sum(committed.values()) == 100
    finally:
        await consumer.stop()


def test_influx_write_and_flux_query(influx: InfluxEndpoint, influx_bucket: str) -> None:
    base_ns = 1_700_000_000_123_456_789
    points = [
        Point("air")
        .tag("sensor_id", f"no2-{i}")
        .tag("site", "quai-de-l-europe")
        .field("no2", 40.0 + i)
        .time(base_ns + i * 1_000_000_001, WritePrecision.NS)
        for i in range(10)
    ]
    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org) as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            bucket=influx_bucket, record=points, write_precision=WritePrecision.NS
        )
        flux = (
            f'from(bucket: "{influx_bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air")'
            ' |> keep(columns: ["_time", "_value", "_field", "sensor_id", "site"])'
        )
        # CSV keeps _time as RFC 3339 with all nine fractional digits, so ns survive the round trip.
        csv_rows = wait_for(
            lambda: [r for r in client.query_api().query_csv(flux, dialect=_ANNOTATIONLESS) if r],
            30,
            what="points queryable",
        )
    header, data = csv_rows[0], [r for r in csv_rows[1:] if r != csv_rows[0]]
    rows = sorted(
        tuple(dict(zip(header, r, strict=True))[k] for k in ("sensor_id", "site", "_field", "_value", "_time"))
        for r in data
    )
    assert len(rows) == 10
    for i, (sensor, site, field, value, t) in enumerate(rows):
        assert (sensor, site, field, float(value)) == (f"no2-{i}", "quai-de-l-europe", "no2", 40.0 + i)
        assert rfc3339_to_ns(t) == base_ns + i * 1_000_000_001
