"""The simulator against the real Mosquitto: what a subscriber receives is the stream and its manifest."""

from __future__ import annotations

import io
import json
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from portpulse.simulators.publish import MqttTarget, publish
from portpulse.simulators.stream import StreamConfig, generate, parse_faults
from tests.services import MqttEndpoint, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("qos", "fmt"), [(1, "json"), (0, "json-batch"), (0, "line")])
def test_subscriber_receives_exactly_the_stream_and_the_manifest_matches(
    mqtt: MqttEndpoint, unique: str, qos: int, fmt: str
) -> None:
    config = StreamConfig(
        sensors=60,
        rate=2000,
        duration_s=1.5,
        seed=4,
        fmt=fmt,
        batch_size=20,
        topic_prefix=unique,
        faults=parse_faults("all=0.02"),
    )
    received: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{unique}-sub", protocol=paho.MQTTv311)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, m: received.append((m.topic, bytes(m.payload)))
    sub.connect(mqtt.host, mqtt.port)
    sub.loop_start()
    try:
        sub.subscribe(f"{unique}/#", qos=1)
        assert subscribed.wait(30)
        manifest = io.StringIO()
        report = publish(
            generate(config), MqttTarget(mqtt.host, mqtt.port, qos, f"{unique}-sim"), manifest, progress=None
        )
        wait_for(lambda: len(received) >= report.messages, 60, what=f"{report.messages} messages")
    finally:
        sub.disconnect()
        sub.loop_stop()
    expected = [(m.topic, m.payload) for b in generate(config) for m in b.messages]
    assert received == expected  # same bytes, same order (one publisher, one connection)
    faults = [json.loads(line) for line in manifest.getvalue().splitlines()]
    assert report.faults == len(faults) > 0
    kinds = {f["kind"] for f in faults}
    assert {"malformed", "duplicate", "spike", "dropout"} <= kinds

    # Every malformed message recorded in the manifest arrived, and nothing else was malformed.
    def broken(payload: bytes) -> bool:
        if fmt == "line":
            return b"\x00" in payload
        try:
            json.loads(payload)
            return False
        except ValueError:
            return True

    malformed_seqs = {f["seq"] for f in faults if f["kind"] == "malformed"}
    sent = [m for b in generate(config) for m in b.messages]
    assert {m.seq for m in sent if broken(m.payload)} == malformed_seqs
    assert sum(broken(p) for _, p in received) == sum(1 for m in sent if m.seq in malformed_seqs)
    duplicates = {f["seq"] for f in faults if f["kind"] == "duplicate"}
    assert len(received) == len({m.seq for m in sent}) + len(duplicates)
