"""Helpers for integration tests that run PortPulse stages against the real services."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from portpulse.codecs.wire import WireError, decode_value
from portpulse.contract.settings import IngestSettings, KafkaSettings, MqttSettings, Settings
from portpulse.ingest.bridge import BridgeStats, run_bridge
from tests.services import KafkaEndpoint, MqttEndpoint


async def within_one_hour(need_s: float) -> None:
    """Return once ``need_s`` s remain before the next UTC hour: wait for that hour if fewer do.
    The admission budgets count per UTC hour: a test of them must not span an hour's turn."""
    for _ in range(int(need_s * 10) + 10):  # bounded: need_s + 1 s
        left_s = 3600 - time.time() % 3600
        if left_s >= need_s:
            return
        await asyncio.sleep(min(left_s, 0.1))
    raise AssertionError(f"the clock did not reach the next hour within {need_s:g} s")


def bridge_settings(
    mqtt: MqttEndpoint,
    kafka: KafkaEndpoint,
    unique: str,
    client_id: str | None = None,
    mqtt_extra: dict[str, Any] | None = None,
    kafka_extra: dict[str, Any] | None = None,
    ingest_extra: dict[str, Any] | None = None,
) -> Settings:
    """A bridge that sees only this test's MQTT topics ``{unique}/...`` and writes ``{unique}.*`` in Kafka."""
    mqtt_fields: dict[str, Any] = {
        "host": mqtt.host,
        "port": mqtt.port,
        "client_id": client_id or f"{unique}-bridge",
        "topic_prefix": unique,
        "subscriptions": (f"{unique}/#",),
        "session_expiry_s": 120,
        **(mqtt_extra or {}),
    }
    kafka_fields: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic_prefix": unique,
        "partitions": 2,
        "request_timeout_ms": 5000,
        **(kafka_extra or {}),
    }
    return Settings(
        mqtt=MqttSettings(**mqtt_fields),
        kafka=KafkaSettings(**kafka_fields),
        ingest=IngestSettings(**(ingest_extra or {})),
    )


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[asyncio.Task[BridgeStats]]:
    """Run a bridge in this loop; it is subscribed when the block starts and drained when it ends."""
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(run_bridge(settings, stop, ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises why the bridge could not start
    assert ready.is_set(), "bridge did not subscribe within 60 s"
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


class Publisher:
    """A real MQTT client publishing test messages (its own paho thread; use ``with``).

    A broker may drop the connection under load; paho then reconnects and sends again what
    was not acknowledged, so a QoS 1 message can arrive twice after such a drop, never zero
    times."""

    def __init__(self, mqtt: MqttEndpoint, client_id: str, protocol: str = "5") -> None:
        version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        self._mqtt = mqtt
        self._connected = threading.Event()
        self._client.on_connect = lambda *_: self._connected.set()
        self._acked: set[int] = set()
        self._ack = threading.Condition()
        self._client.on_publish = self._on_publish

    def __enter__(self) -> Publisher:
        self._client.connect(self._mqtt.host, self._mqtt.port)
        self._client.loop_start()
        if not self._connected.wait(30):
            raise TimeoutError("publisher could not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_publish(self, _client: object, _userdata: object, mid: int, *_: object) -> None:
        with self._ack:
            self._acked.add(mid)
            self._ack.notify_all()

    def publish(self, messages: Sequence[tuple[str, bytes]], qos: int = 1, per_second: float = 0) -> None:
        """Publish and wait until the broker acknowledged each, for at most 60 s without a new
        acknowledgement; ``per_second`` paces it in chunks of 50 (0: as fast as the broker takes
        them, in chunks of 1 000 so message ids stay distinct within a chunk)."""
        chunk = 50 if per_second else 1000
        started = time.monotonic()
        for at in range(0, len(messages), chunk):
            with self._ack:
                self._acked.clear()
            # A message published while the connection is down is queued (QoS > 0) and sent
            # on reconnect: its ack arrives through on_publish like any other.
            pending = {
                self._client.publish(topic, payload, qos=qos).mid for topic, payload in messages[at : at + chunk]
            }
            self._wait_acked(pending, 60.0)
            if per_second:
                time.sleep(max(0.0, started + (at + chunk) / per_second - time.monotonic()))

    def _wait_acked(self, pending: set[int], quiet_s: float) -> None:
        deadline = time.monotonic() + quiet_s
        with self._ack:
            while pending:
                before = len(pending)
                pending -= self._acked
                now = time.monotonic()
                if len(pending) < before:
                    deadline = now + quiet_s
                elif now >= deadline:
                    raise TimeoutError(
                        f"{len(pending)} messages not acknowledged within {quiet_s:.0f} s of the last ack"
                    )
                if pending:
                    self._ack.wait(min(1.0, deadline - now))


@dataclass(frozen=True)
class KafkaReading:
    topic: str
    sensor_id: str
    site: str
    metric: str
    ts_ns: int
    value: float
    flags: int


async def consume(
    kafka: KafkaEndpoint,
    topics: Sequence[str],
    expect: int,
    timeout_s: float = 60.0,
    idle_s: float = 2.0,
    stall_s: float | None = None,
) -> list[tuple[str, bytes | None, bytes, dict[str, bytes]]]:
    """Records of ``topics`` from the beginning: stop at ``expect`` readings (a readings record
    counts its readings, any other record one; then wait ``idle_s`` more to catch extras such as
    duplicates), after ``timeout_s``, or after ``stall_s`` without a new record (for a source
    known to lose some)."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest", metadata_max_age_ms=1000
    )
    await consumer.start()
    out: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        reached_at: float | None = None
        count = 0
        last_new = loop.time()
        while loop.time() < deadline:
            if stall_s is not None and loop.time() - last_new > stall_s:
                break
            for records in (await consumer.getmany(timeout_ms=300)).values():
                got = [(r.topic, r.key, r.value, dict(r.headers)) for r in records]
                out += got
                count += sum(_units(value, headers) for _, _, value, headers in got)
                last_new = loop.time()
            if count >= expect and reached_at is None:
                reached_at = loop.time()
            if reached_at is not None and loop.time() - reached_at >= idle_s:
                break
    finally:
        await consumer.stop()
    return out


def _units(value: bytes | None, headers: dict[str, bytes]) -> int:
    """Readings in a bridge record (one record holds a series' readings of a delivery), else 1."""
    if value is None or headers.get("pp-v") != b"1":
        return 1
    try:
        return len(decode_value(value))
    except WireError:
        return 1


def readings_of(records: Sequence[tuple[str, bytes | None, bytes, dict[str, bytes]]]) -> list[KafkaReading]:
    out = []
    for topic, key, value, headers in records:
        assert headers.get("pp-v") == b"1"
        assert key is not None
        rec = decode_value(value)
        for i in range(len(rec)):
            out.append(
                KafkaReading(
                    topic,
                    key.decode(),
                    rec.site,
                    rec.metrics[rec.metric_index[i]],
                    int(rec.ts_ns[i]),
                    float(rec.value[i]),
                    int(rec.flags[i]),
                )
            )
    return out
