"""The bridge against every broker of the interop matrix: Mosquitto (control), mochi-mqtt,
rumqttd, ActiveMQ Artemis and amqtt, each with MQTT 5 and 3.1.1 (amqtt: 3.1.1 only) and both
MQTT clients.

Each broker comes from its own registry through ``scripts/services up BROKER``. Per combination:
QoS 0/1/2 and a gateway batch; a session queued while the bridge was stopped; SIGKILL of a bridge
process with a queued session; a shared subscription across two bridges; a broker restart. What a
broker documents it does not do is an expected failure with its reason (``KNOWN_LIMITS``),
declared only after the case ran and fell short.
Every test prints one ``MATRIX`` line (delivered/expected, duplicates) for the closing summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.integration.pipeline import Publisher, bridge_settings, consume, readings_of, running_bridge
from tests.integration.test_faults import PipelineProcess
from tests.services import (
    SERVICES_SCRIPT,
    KafkaEndpoint,
    MqttEndpoint,
    free_port,
    is_local,
    local_service_control_async,
    wait_for,
)

pytestmark = pytest.mark.integration

NOW_S = int(time.time())

#: One line per test, printed at the end of the pytest session (tests/conftest.py).
MATRIX_REPORT: list[str] = []

BROKERS = ("mosquitto", "mochi", "rumqttd", "artemis", "amqtt")
#: The name scripts/services knows each broker by.
SERVICE_NAME = {"mosquitto": "mqtt", "mochi": "mochi", "rumqttd": "rumqttd", "artemis": "artemis", "amqtt": "amqtt"}
#: The MQTT versions each broker speaks, where not both.
PROTOCOLS = {"amqtt": ("3.1.1",)}
#: (broker, scenario) -> why it cannot pass: the broker's own documented behaviour.
KNOWN_LIMITS: dict[tuple[str, str], str] = {
    ("mochi", "broker_restart"): (
        "mochi-mqtt keeps sessions in memory unless a storage hook is compiled in (its example server "
        "has none): a restart forgets the bridge's session, so what is published before the bridge "
        "resubscribes has no subscriber"
    ),
    ("rumqttd", "broker_restart"): (
        "rumqttd keeps sessions in memory only: a restart forgets the bridge's session, so what is "
        "published before the bridge resubscribes has no subscriber"
    ),
    ("amqtt", "queued_session"): "amqtt does not queue messages for a disconnected persistent session",
    ("amqtt", "sigkill"): "amqtt does not queue messages for a disconnected persistent session",
    ("amqtt", "shared"): (
        "amqtt has no shared subscriptions and grants '$share/...' as a plain filter that matches "
        "nothing; MQTT 3.1.1 gives the bridge no way to tell"
    ),
    ("amqtt", "broker_restart"): "amqtt keeps sessions in memory only: a restart forgets the bridge's session",
}


@dataclass(frozen=True)
class Broker:
    name: str
    protocol: str
    endpoint: MqttEndpoint

    @property
    def service(self) -> str:
        return SERVICE_NAME[self.name]


@pytest.fixture(scope="session")
def broker_ports() -> dict[str, tuple[str, int, int]]:
    """host, MQTT 3.1.1 port, MQTT 5 port per broker (starting each once)."""
    names = [SERVICE_NAME[b] for b in BROKERS if b != "mosquitto"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}
    up = subprocess.run([str(SERVICES_SCRIPT), "up", *names], capture_output=True, text=True, env=env, check=False)
    if up.returncode != 0:
        raise RuntimeError(f"scripts/services up {' '.join(names)} failed:\n{up.stderr}")
    out = subprocess.run(
        [str(SERVICES_SCRIPT), "endpoint", *names], capture_output=True, text=True, env=env, check=True
    ).stdout.split("\n")
    ports = {}
    for name, line in zip(names, out, strict=False):
        host, v311, v5 = line.split()
        ports[name] = (host, int(v311), int(v5))
    return ports


@pytest.fixture
def broker(request: pytest.FixtureRequest, mqtt: MqttEndpoint, broker_ports: dict[str, tuple[str, int, int]]) -> Broker:
    name, protocol = request.param
    if name == "mosquitto":
        return Broker(name, protocol, mqtt)
    host, v311, v5 = broker_ports[SERVICE_NAME[name]]
    return Broker(name, protocol, MqttEndpoint(host, v5 if protocol == "5" else v311))


def matrix(clients: tuple[str, ...] = ("asyncio", "paho")) -> pytest.MarkDecorator:
    """Parametrize a test over broker x protocol x client."""
    cases = [
        pytest.param((b, p), c, id=f"{b}-{p}-{c}")
        for b in BROKERS
        for p in PROTOCOLS.get(b, ("5", "3.1.1"))
        for c in clients
    ]
    return pytest.mark.parametrize(("broker", "client"), cases, indirect=["broker"])


def limited(broker: Broker, scenario: str) -> bool:
    """The broker documents it cannot deliver everything in ``scenario``."""
    return (broker.name, scenario) in KNOWN_LIMITS


def stall_s(broker: Broker, scenario: str) -> float | None:
    """How long a consumer waits without a new record before it concludes the rest is lost."""
    return 10.0 if limited(broker, scenario) else None


def known_limit(broker: Broker, scenario: str) -> None:
    """Call where delivery fell short: an expected failure when the broker documents it."""
    if reason := KNOWN_LIMITS.get((broker.name, scenario)):
        pytest.xfail(reason)


def messages(unique: str, start: int, n: int, sensor: str = "s1") -> list[tuple[str, bytes]]:
    """Messages ``start..start+n``, each with its own metric ``m{i}`` (countable)."""
    return [
        (f"{unique}/air/q/{sensor}", json.dumps({"ts": NOW_S, "metrics": {f"m{i}": float(i)}}).encode())
        for i in range(start, start + n)
    ]


def tally(records: list[tuple[str, bytes | None, bytes, dict[str, bytes]]]) -> Counter[str]:
    return Counter(r.metric for r in readings_of(records))


def report(scenario: str, broker: Broker, client: str, expected: set[str], got: Counter[str]) -> None:
    delivered = len(expected & set(got))
    duplicates = sum(got.values()) - len(got)
    MATRIX_REPORT.append(
        f"MATRIX {broker.name:9} {broker.protocol:5} {client:7} {scenario:16} "
        f"{delivered}/{len(expected)} delivered, {duplicates} duplicates"
    )


def client_settings(broker: Broker, client: str, qos: int = 1, **extra: object) -> dict[str, object]:
    return {"client": client, "protocol": broker.protocol, "qos": qos, **extra}


@matrix()
async def test_qos_levels_and_a_gateway_batch(broker: Broker, client: str, kafka: KafkaEndpoint, unique: str) -> None:
    # The asyncio client subscribes at QoS 2; paho refuses QoS 2 (see MqttSettings), so QoS 1.
    qos = 2 if client == "asyncio" else 1
    settings = bridge_settings(broker.endpoint, kafka, unique, mqtt_extra=client_settings(broker, client, qos))
    gateway = {"readings": [{"sensor_id": f"cell-{i}", "ts": NOW_S, "metrics": {f"g{i}": float(i)}} for i in range(20)]}
    async with running_bridge(settings):
        with Publisher(broker.endpoint, f"{unique}-pub", broker.protocol) as pub:
            for publish_qos in (0, 1, 2):
                pub.publish(messages(unique, publish_qos * 50, 50), qos=publish_qos)
            pub.publish([(f"{unique}/cell/port-2000", json.dumps(gateway).encode())], qos=1)
        records = await consume(kafka, [f"{unique}.readings.air", f"{unique}.readings.cell"], expect=170, idle_s=1)
    got = tally(records)
    expected = {f"m{i}" for i in range(150)} | {f"g{i}" for i in range(20)}
    report("qos012+gateway", broker, client, expected, got)
    assert set(got) == expected
    assert sum(got.values()) == len(expected), "a message arrived twice on a clean run"


@matrix()
async def test_a_session_queued_while_the_bridge_was_stopped_drains(
    broker: Broker, client: str, kafka: KafkaEndpoint, unique: str
) -> None:
    """More messages than any broker's in-flight window wait in the session before the bridge
    starts (the case where rumqttd holds the SUBACK behind their acks)."""
    settings = bridge_settings(broker.endpoint, kafka, unique, mqtt_extra=client_settings(broker, client))
    async with running_bridge(settings):
        pass  # creates the persistent session and its subscription
    n = 1500
    with Publisher(broker.endpoint, f"{unique}-pub", broker.protocol) as pub:
        pub.publish(messages(unique, 0, n))
    async with running_bridge(settings) as bridge:
        wait = stall_s(broker, "queued_session")
        records = await consume(kafka, [f"{unique}.readings.air"], expect=n, timeout_s=90, idle_s=1, stall_s=wait)
    got = tally(records)
    expected = {f"m{i}" for i in range(n)}
    report("queued_session", broker, client, expected, got)
    if set(got) != expected:
        known_limit(broker, "queued_session")
    assert set(got) == expected
    assert bridge.result().acked == bridge.result().messages >= n


def bridge_process(broker: Broker, client: str, kafka: KafkaEndpoint, unique: str, log: Path) -> PipelineProcess:
    """``portpulse bridge`` as a child process, so it can be SIGKILLed."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")},
        "PORTPULSE_MQTT__HOST": broker.endpoint.host, "PORTPULSE_MQTT__PORT": str(broker.endpoint.port),
        "PORTPULSE_MQTT__PROTOCOL": broker.protocol, "PORTPULSE_MQTT__CLIENT": client,
        "PORTPULSE_MQTT__QOS": "2" if client == "asyncio" else "1",
        "PORTPULSE_MQTT__CLIENT_ID": f"{unique}-bridge", "PORTPULSE_MQTT__TOPIC_PREFIX": unique,
        "PORTPULSE_MQTT__SUBSCRIPTIONS": f'["{unique}/#"]', "PORTPULSE_MQTT__SESSION_EXPIRY_S": "600",
        "PORTPULSE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "PORTPULSE_KAFKA__TOPIC_PREFIX": unique,
        "PORTPULSE_KAFKA__PARTITIONS": "2", "PORTPULSE_OPS__METRICS_PORT": str(free_port()),
    }  # fmt: skip
    return PipelineProcess(env, log, options=(), command="bridge")


@matrix()
async def test_sigkill_with_a_queued_session_loses_no_acknowledged_message(
    broker: Broker, client: str, kafka: KafkaEndpoint, unique: str, tmp_path: Path
) -> None:
    bridge = bridge_process(broker, client, kafka, unique, tmp_path / "bridge.log")
    n_before, n_after = 1000, 1000
    await bridge.start()
    try:
        with Publisher(broker.endpoint, f"{unique}-pub", broker.protocol) as pub:
            # Paced over about 3 s, so the SIGKILL lands mid-stream: once part of it is in
            # Kafka, the rest in flight in the bridge or still to come.
            stream = messages(unique, 0, n_before)
            publishing = asyncio.create_task(asyncio.to_thread(pub.publish, stream, 1, n_before / 3))
            early = await consume(kafka, [f"{unique}.readings.air"], expect=n_before // 4, timeout_s=60, idle_s=0)
            bridge.kill()
            assert len(tally(early)) < n_before, "the stream had finished before the SIGKILL"
            await publishing
            pub.publish(messages(unique, n_before, n_after))  # queued in the session meanwhile
        await bridge.start()
        records = await consume(
            kafka,
            [f"{unique}.readings.air"],
            expect=n_before + n_after,
            timeout_s=90,
            idle_s=2,
            stall_s=stall_s(broker, "sigkill"),
        )
    finally:
        await bridge.stop()
    got = tally(records)
    expected = {f"m{i}" for i in range(n_before + n_after)}
    report("sigkill", broker, client, expected, got)
    if set(got) != expected:
        known_limit(broker, "sigkill")
    assert set(got) == expected, f"lost: {sorted(expected - set(got))[:20]}"


@matrix()
async def test_a_shared_subscription_splits_the_stream_across_two_bridges(
    broker: Broker, client: str, kafka: KafkaEndpoint, unique: str
) -> None:
    extra = client_settings(broker, client, shared_group=f"{unique}-g")
    a = bridge_settings(broker.endpoint, kafka, unique, client_id=f"{unique}-a", mqtt_extra=extra)
    b = bridge_settings(broker.endpoint, kafka, unique, client_id=f"{unique}-b", mqtt_extra=extra)
    n = 1000
    async with running_bridge(a) as bridge_a, running_bridge(b) as bridge_b:
        with Publisher(broker.endpoint, f"{unique}-pub", broker.protocol) as pub:
            pub.publish(messages(unique, 0, n))
        records = await consume(
            kafka, [f"{unique}.readings.air"], expect=n, idle_s=1, stall_s=stall_s(broker, "shared")
        )
    got = tally(records)
    expected = {f"m{i}" for i in range(n)}
    report("shared", broker, client, expected, got)
    share_a, share_b = bridge_a.result().messages, bridge_b.result().messages
    if set(got) != expected:
        known_limit(broker, "shared")
    assert set(got) == expected
    assert share_a > 0 and share_b > 0 and share_a + share_b == n, f"split {share_a} / {share_b}"


@matrix()
async def test_a_broker_restart_resubscribes_and_delivers(
    broker: Broker, client: str, kafka: KafkaEndpoint, unique: str
) -> None:
    """Messages before the restart, while the bridge is still away (queued in its session, for a
    broker that keeps sessions across a restart) and after the bridge is back all arrive."""
    if broker.name == "mosquitto" and not is_local("mqtt"):
        pytest.skip("needs a Mosquitto this test may restart (scripts/services)")
    extra = client_settings(broker, client, reconnect_min_s=2, reconnect_max_s=2)
    settings = bridge_settings(broker.endpoint, kafka, unique, mqtt_extra=extra)
    topic = [f"{unique}.readings.air"]
    keeps_sessions = not limited(broker, "broker_restart")
    said_before = shortfalls_said("session_not_resumed")
    async with running_bridge(settings) as bridge:
        with Publisher(broker.endpoint, f"{unique}-pub-a", broker.protocol) as pub:
            pub.publish(messages(unique, 0, 100))
        await consume(kafka, topic, expect=100, idle_s=0)
        await local_service_control_async(broker.service, "down")
        await local_service_control_async(broker.service, "up")
        with Publisher(broker.endpoint, f"{unique}-pub-b", broker.protocol) as pub:
            pub.publish(messages(unique, 100, 100))  # the bridge retries every 2 s: not back yet
        await asyncio.to_thread(wait_for, bridge_subscribed, 60, what="the bridge resubscribed after the restart")
        with Publisher(broker.endpoint, f"{unique}-pub-c", broker.protocol) as pub:
            pub.publish(messages(unique, 200, 100))
        records = await consume(kafka, topic, expect=300 if keeps_sessions else 200, timeout_s=60, idle_s=1)
    got = tally(records)
    expected = {f"m{i}" for i in range(300)}
    report("broker_restart", broker, client, expected, got)
    assert bridge.result().mqtt_reconnects >= 1
    assert {f"m{i}" for i in range(100)} | {f"m{i}" for i in range(200, 300)} <= set(got)
    # A broker that forgot the session must be said to have done so, once per reconnect (rumqttd
    # may drop the fresh connection again while it settles: "Duplicate client_id" in its log).
    reconnects = bridge.result().mqtt_reconnects
    assert shortfalls_said("session_not_resumed") - said_before == (0 if keeps_sessions else reconnects)
    if not {f"m{i}" for i in range(100, 200)} <= set(got):
        known_limit(broker, "broker_restart")
    assert set(got) == expected, f"lost while the bridge was away: {len(expected - set(got))}"


def bridge_subscribed() -> bool:
    """True once the bridge's subscription is acknowledged again (the metric is process-wide)."""
    return REGISTRY.get_sample_value("portpulse_ingest_mqtt_subscribed") == 1


def shortfalls_said(kind: str) -> float:
    return REGISTRY.get_sample_value("portpulse_ingest_mqtt_broker_shortfalls_total", {"kind": kind}) or 0.0
