"""Fault suite: the whole pipeline under steady simulated load while one thing breaks at a time.

For each scenario: ``portpulse run`` in its own process, a paced QoS 1 publisher, a fault a few
seconds in, then from InfluxDB and Kafka: every acknowledged reading stored (loss must be 0),
window aggregates equal to an independent computation, and the duplicates the at-least-once
path produced (reported, and absorbed by the processor's duplicate check).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from portpulse.codecs.wire import decode_values
from portpulse.simulators.stream import generate
from tests.integration.pipeline import Publisher, consume
from tests.integration.test_end_to_end import (
    Window,
    assert_aggregates_match,
    expected_from_record,
    http_get,
    stream,
    wait_until_stored,
)
from tests.services import (
    InfluxEndpoint,
    KafkaEndpoint,
    MqttEndpoint,
    free_port,
    is_local,
    local_service_control_async,
)

pytestmark = pytest.mark.integration

#: One line per scenario run, printed at the end of the pytest session (tests/conftest.py).
FAULT_REPORT: list[str] = []


def pipeline_env(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, bucket: str, unique: str
) -> dict[str, str]:
    """The environment of a ``portpulse run`` child that sees only this test's topics and bucket."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")},
        "PORTPULSE_MQTT__HOST": mqtt.host, "PORTPULSE_MQTT__PORT": str(mqtt.port),
        "PORTPULSE_MQTT__CLIENT_ID": f"{unique}-bridge", "PORTPULSE_MQTT__TOPIC_PREFIX": unique,
        "PORTPULSE_MQTT__SUBSCRIPTIONS": f'["{unique}/#"]', "PORTPULSE_MQTT__SESSION_EXPIRY_S": "600",
        "PORTPULSE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "PORTPULSE_KAFKA__TOPIC_PREFIX": unique,
        "PORTPULSE_KAFKA__CONSUMER_GROUP": f"{unique}-g", "PORTPULSE_KAFKA__PARTITIONS": "2",
        "PORTPULSE_KAFKA__REQUEST_TIMEOUT_MS": "5000",
        "PORTPULSE_INFLUX__URL": influx.url, "PORTPULSE_INFLUX__TOKEN": influx.token,
        "PORTPULSE_INFLUX__ORG": influx.org, "PORTPULSE_INFLUX__BUCKET": bucket,
        # one bucket for every table (tests/integration/test_tiers.py covers the tiers)
        "PORTPULSE_RETENTION__TIERS": "false", "PORTPULSE_RETENTION__RAW_S": "-1",
        "PORTPULSE_SINK__FLUSH_INTERVAL_MS": "100", "PORTPULSE_OPS__METRICS_PORT": str(free_port()),
    }  # fmt: skip


class PipelineProcess:
    """``portpulse run`` (or another ``command``, e.g. ``bridge``) as a child process, so it can
    be SIGKILLed and restarted; ready when its ``/readyz`` answers 200."""

    def __init__(
        self, env: dict[str, str], log: Path, options: tuple[str, ...] = ("--windows", "1m", "--lateness", "2",
                                                                          "--idle-timeout", "2"),
        command: str = "run",
    ) -> None:  # fmt: skip
        self.env, self.log, self.port = env, log, int(env["PORTPULSE_OPS__METRICS_PORT"])
        self.options, self.command = options, command
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "portpulse", self.command, *self.options]
        with open(self.log, "ab") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=err)

    async def start(self) -> None:
        """Spawn and wait until ready; a child that does not get there is killed, never left behind."""
        self.spawn()
        assert self.proc is not None
        try:
            for _ in range(600):  # bounded: 120 s
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"portpulse {self.command} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                    )
                if (await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.port}/readyz"))[0] == 200:
                    return
                await asyncio.sleep(0.2)
            raise AssertionError(f"portpulse {self.command} not ready in 120 s:\n{self.log.read_text()[-3000:]}")
        except BaseException:
            if self.proc.poll() is None:
                self.kill()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    async def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(600):  # bounded: 60 s to drain
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.1)
        self.proc.kill()
        return -9


async def _restart_service(service: str, kill: str, down_s: float) -> None:
    await local_service_control_async(service, kill)
    await asyncio.sleep(down_s)
    await local_service_control_async(service, "up")


def _scenarios(pipeline: PipelineProcess) -> dict[str, Callable[[], Awaitable[None]]]:
    async def pipeline_sigkill() -> None:
        pipeline.kill()
        await asyncio.sleep(1)
        await pipeline.start()

    async def kafka_sigstop() -> None:
        await local_service_control_async("kafka", "pause")
        await asyncio.sleep(15)  # beyond the consumer session timeout (10 s): the group rebalances
        await local_service_control_async("kafka", "resume")

    return {
        "pipeline_sigkill": pipeline_sigkill,
        "kafka_sigkill": lambda: _restart_service("kafka", "kill", 10),
        "influx_sigkill": lambda: _restart_service("influx", "kill", 10),
        "mqtt_restart": lambda: _restart_service("mqtt", "down", 3),
        "mqtt_sigkill": lambda: _restart_service("mqtt", "kill", 3),
        "kafka_sigstop": kafka_sigstop,
    }


SCENARIOS = [
    "pipeline_sigkill", "kafka_sigkill", "influx_sigkill", "kafka_sigstop", "mqtt_restart", "mqtt_sigkill",
    "in_flight_full",
]  # fmt: skip


def windows_from_kafka(
    records: list[tuple[str, bytes | None, bytes, dict[str, bytes]]],
) -> dict[Window, list[tuple[int, float]]]:
    """What PortPulse acknowledged to MQTT is exactly what is in Kafka: its distinct readings per
    1-minute window (for a broker SIGKILL, which loses what only the broker had)."""
    wire = decode_values([value for _, _, value, _ in records])
    seen: set[tuple[str, str, int]] = set()
    windows: dict[Window, list[tuple[int, float]]] = {}
    for rec, metric, ts, value in zip(wire.record.tolist(), wire.metric.tolist(), wire.ts_ns.tolist(),
                                      wire.value.tolist(), strict=True):  # fmt: skip
        topic, key = records[rec][0], (records[rec][1] or b"").decode()
        if (key, metric, ts) in seen:
            continue
        seen.add((key, metric, ts))
        window = ts // 60_000_000_000 * 60_000_000_000
        windows.setdefault((topic.rsplit(".", 1)[-1], key, metric, window), []).append((ts, value))
    return windows


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_no_acknowledged_reading_is_lost(
    scenario: str,
    mqtt: MqttEndpoint,
    kafka: KafkaEndpoint,
    influx: InfluxEndpoint,
    influx_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    service = {"kafka_sigkill": "kafka", "kafka_sigstop": "kafka", "influx_sigkill": "influx", "mqtt_restart": "mqtt",
               "mqtt_sigkill": "mqtt", "in_flight_full": "kafka"}.get(scenario)  # fmt: skip
    if service and not is_local(service):
        pytest.skip(f"{service} is not managed by scripts/services here; this fault needs to stop it")
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique) | {
        # Loss, not cleaning, is under test: a broker SIGKILL leaves gaps in the series, and the
        # spike filter may then rightly reject a jump across one, which would read as a loss here.
        "PORTPULSE_PROCESSOR__SPIKE_K_SIGMA": "1e9",
        # The in-flight scenario: a small limit that Kafka's outage fills while publishers go on.
        "PORTPULSE_INGEST__MAX_IN_FLIGHT": "50" if scenario == "in_flight_full" else "20000",
    }
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    faults = _scenarios(pipeline)
    faults["in_flight_full"] = lambda: _restart_service("kafka", "down", 12)
    config = stream(unique, sensors=24, seconds=100, faults={})
    messages = [(m.topic, m.payload) for b in generate(config) for m in b.messages]
    expected, _, _ = expected_from_record([m for b in generate(config) for m in b.messages], [])
    published = sum(len(v) for v in expected.values())
    topics = [f"{unique}.readings.{d}" for d in ("air", "crane", "cell")]

    await pipeline.start()
    acked = 0
    publish_error: list[BaseException] = []

    def publish_paced() -> None:  # about 25 s of publishing, 100 messages per 1 s chunk
        nonlocal acked
        try:
            with Publisher(mqtt, f"{unique}-pub") as publisher:
                for i in range(0, len(messages), 100):
                    started = time.monotonic()
                    chunk = messages[i : i + 100]
                    for attempt in range(121):  # like a gateway: resend what the broker did not take
                        try:
                            publisher.publish(chunk, 1)  # returns once the broker acknowledged each
                            break
                        except RuntimeError:  # not connected (Mosquitto restarting); paho reconnects
                            if attempt == 120:
                                raise
                            time.sleep(0.5)
                    acked += len(chunk)
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        except BaseException as exc:  # surfaced by the test below
            publish_error.append(exc)

    publisher = threading.Thread(target=publish_paced)
    publisher.start()
    try:
        await asyncio.sleep(6)
        await faults[scenario]()
        await asyncio.to_thread(publisher.join, 300)
        assert not publish_error, publish_error
        assert acked == len(messages)
        if scenario == "mqtt_sigkill":
            # The broker loses what it held in memory; PortPulse owes what it acknowledged.
            records = await consume(kafka, topics, expect=len(messages), timeout_s=60, idle_s=5)
            expected = windows_from_kafka(records)
        readings = sum(len(v) for v in expected.values())
        raw, stored = await wait_until_stored(influx, influx_bucket, expected, timeout_s=240)
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        if publisher.is_alive():
            publisher.join(300)
        await pipeline.stop()

    lost = readings - raw
    records = await consume(kafka, topics, expect=len(messages), timeout_s=60, idle_s=2)
    in_kafka = len(decode_values([value for _, _, value, _ in records]))
    FAULT_REPORT.append(
        f"| {scenario} | {acked} | {readings} | {lost} | {in_kafka - readings} | {published - readings} |"
    )
    assert lost == 0, f"{lost} acknowledged readings missing from InfluxDB"
    assert_aggregates_match(stored, expected)
