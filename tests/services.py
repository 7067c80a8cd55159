"""Where the tests find real Mosquitto, Kafka and InfluxDB.

Per service, in this order: endpoints configured in the environment (``PORTPULSE_*``), else
Docker containers via testcontainers when a Docker engine answers (same images as compose.yaml),
else the project's own ``scripts/services up`` (real servers on 127.0.0.1). Never a skip: if no
way works, the fixture fails with the service's log tail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICES_SCRIPT = ROOT / "scripts" / "services"

# Keep in step with compose.yaml.
MOSQUITTO_IMAGE = "eclipse-mosquitto:2.0.20"
KAFKA_IMAGE = "apache/kafka:4.1.1"
INFLUX_IMAGE = "influxdb:2.7"


@dataclass(frozen=True)
class MqttEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class KafkaEndpoint:
    bootstrap_servers: str


@dataclass(frozen=True)
class InfluxEndpoint:
    url: str
    token: str
    org: str
    #: "1" for InfluxDB 1.8 (databases via InfluxQL, bucket "db/rp"), "2" for 2.x (buckets API).
    major: str


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns a truthy value and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may raise until the thing is ready
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"condition not met within {timeout_s:.0f}s: {what or condition}; last error: {last_exc!r}"
            )
        time.sleep(interval_s)
        interval_s = min(interval_s * 1.5, 0.5)


def docker_answers() -> bool:
    if os.environ.get("PORTPULSE_TEST_NO_DOCKER") or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def local_services_env(service: str) -> dict[str, str]:
    """Start one local service with scripts/services (idempotent) and return its PORTPULSE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}
    up = subprocess.run([str(SERVICES_SCRIPT), "up", service], capture_output=True, text=True, env=env, check=False)
    if up.returncode != 0:
        raise RuntimeError(f"scripts/services up {service} failed:\n{up.stderr}")
    out = subprocess.run([str(SERVICES_SCRIPT), "env"], capture_output=True, text=True, env=env, check=True).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    return {k: v for k, v in pairs}


@dataclass(frozen=True)
class SecuredServices:
    """``scripts/services up secure``: ``env`` runs PortPulse with every hop secured; ``pki`` holds the
    run's CA (``ca.pem``, ``ca.key``), certificates and ``credentials.json`` (passwords by
    ``service:user``); the MQTT ports take TLS with a password, mutual TLS, and TLS with the
    dynamic security plugin's users."""

    env: dict[str, str]
    pki: Path
    credentials: dict[str, str]
    mqtt_tls_port: int
    mqtt_mtls_port: int
    kafka_admin: str  # the plaintext listener, for administration

    @property
    def mqtt_dynsec_port(self) -> int:
        """TLS, users and ACLs of Mosquitto's dynamic security plugin (it refuses SUBSCRIBEs)."""
        return self.mqtt_tls_port + 2


def secured_services() -> SecuredServices:
    """Start the secured services (idempotent) and describe them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}
    up = subprocess.run([str(SERVICES_SCRIPT), "up", "secure"], capture_output=True, text=True, env=env, check=False)
    if up.returncode != 0:
        raise RuntimeError(f"scripts/services up secure failed:\n{up.stderr[-5000:]}")
    out = subprocess.run(
        [str(SERVICES_SCRIPT), "env", "secure"], capture_output=True, text=True, env=env, check=True
    ).stdout
    pairs = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    pki = Path(pairs["PORTPULSE_MQTT__CA_FILE"]).parent
    mtls = int(pairs["PORTPULSE_MQTT__PORT"])
    admin_port = int(pairs["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1]) - 2
    return SecuredServices(pairs, pki, json.loads((pki / "credentials.json").read_text()), mtls - 1, mtls,
                           f"127.0.0.1:{admin_port}")  # fmt: skip


def _connects(host: str, port: int) -> bool:
    with socket.create_connection((host, port), 1):
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mqtt_endpoint() -> Iterator[MqttEndpoint]:
    if host := os.environ.get("PORTPULSE_MQTT__HOST"):
        yield MqttEndpoint(host, int(os.environ.get("PORTPULSE_MQTT__PORT", "1883")))
    elif docker_answers():
        from testcontainers.core.container import DockerContainer

        port = free_port()
        container = (
            DockerContainer(MOSQUITTO_IMAGE)
            .with_bind_ports(1883, port)
            .with_command("mosquitto -c /mosquitto-no-auth.conf")
        )
        with container:
            wait_for(lambda: _connects("127.0.0.1", port), what="mosquitto")
            yield MqttEndpoint("127.0.0.1", port)
    else:
        env = local_services_env("mqtt")
        yield MqttEndpoint(env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"]))


@contextmanager
def kafka_endpoint() -> Iterator[KafkaEndpoint]:
    if bootstrap := os.environ.get("PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"):
        yield KafkaEndpoint(bootstrap)
    elif docker_answers():
        from testcontainers.core.container import DockerContainer

        port = free_port()
        container = (
            DockerContainer(KAFKA_IMAGE)
            .with_bind_ports(9092, port)
            .with_env("KAFKA_NODE_ID", "1")
            .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
            .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
            .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
            .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
            .with_env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT")
            .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
            .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        )
        with container:
            wait_for(lambda: b"Kafka Server started" in container.get_logs()[0], 120, what="kafka")
            yield KafkaEndpoint(f"127.0.0.1:{port}")
    else:
        bootstrap = local_services_env("kafka")["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"]
        prune_stale_topics(bootstrap)
        yield KafkaEndpoint(bootstrap)


#: Topic names earlier test sessions (the ``unique`` fixture) and benchmarks (their run prefixes) made.
STALE_TOPIC = re.compile(r"(t[0-9a-f]{12}|bench[0-9a-f]{8})\.")


def prune_stale_topics(bootstrap: str, chunk: int = 200) -> int:
    """Delete what earlier test sessions and benchmarks left on the broker ``scripts/services``
    runs (never on a configured one); returns how many topics. Left to pile up, 8 700 partitions
    made a SIGKILLed Kafka need more than the fault test's two minutes to load them again."""

    async def prune() -> int:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=120_000)
        await admin.start()
        try:
            stale = [t for t in await admin.list_topics() if STALE_TOPIC.match(t)]
            for i in range(0, len(stale), chunk):
                await admin.delete_topics(stale[i : i + chunk], timeout_ms=120_000)
            return len(stale)
        finally:
            await admin.close()

    with ThreadPoolExecutor(1) as pool:  # a loop of its own, whatever the caller runs
        return pool.submit(asyncio.run, prune()).result()


@contextmanager
def influx_endpoint() -> Iterator[InfluxEndpoint]:
    if url := os.environ.get("PORTPULSE_INFLUX__URL"):
        token = os.environ.get("PORTPULSE_INFLUX__TOKEN", "")
        yield InfluxEndpoint(url, token, os.environ.get("PORTPULSE_INFLUX__ORG", "portpulse"), influx_major(url))
    elif docker_answers():
        from testcontainers.core.container import DockerContainer

        port = free_port()
        token = "portpulse-test-token"
        container = (
            DockerContainer(INFLUX_IMAGE)
            .with_bind_ports(8086, port)
            .with_env("DOCKER_INFLUXDB_INIT_MODE", "setup")
            .with_env("DOCKER_INFLUXDB_INIT_USERNAME", "portpulse")
            .with_env("DOCKER_INFLUXDB_INIT_PASSWORD", "portpulse-password")
            .with_env("DOCKER_INFLUXDB_INIT_ORG", "portpulse")
            .with_env("DOCKER_INFLUXDB_INIT_BUCKET", "portpulse")
            .with_env("DOCKER_INFLUXDB_INIT_ADMIN_TOKEN", token)
        )
        with container:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: influx_major(url) == "2", 120, what="influxdb 2 ready")
            yield InfluxEndpoint(url, token, "portpulse", "2")
    else:
        env = local_services_env("influx")
        local_url = env["PORTPULSE_INFLUX__URL"]
        yield InfluxEndpoint(
            local_url, env["PORTPULSE_INFLUX__TOKEN"], env["PORTPULSE_INFLUX__ORG"], influx_major(local_url)
        )


def influx_major(url: str) -> str:
    """Ask /health which InfluxDB answers: "1" or "2"."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        health = json.loads(r.read())
    if health.get("status") != "pass":
        raise RuntimeError(f"InfluxDB at {url} is not healthy: {health}")
    version = str(health.get("version", ""))
    # Our local 1.8 build reports "1.8.10"; 2.x reports "v2.7.x" or "2.7.x".
    return "2" if version.lstrip("v").startswith("2") else "1"


def local_service_control(service: str, action: str) -> None:
    """Stop, kill or start a service that scripts/services manages (fault tests only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}
    result = subprocess.run(
        [str(SERVICES_SCRIPT), action, service], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/services {action} {service} failed:\n{result.stderr}")


def local_service_pid(service: str) -> int | None:
    """The pid scripts/services recorded for ``service`` (in its cache directory), if any."""
    cache = Path(os.environ.get("PORTPULSE_CACHE", Path.home() / ".cache" / "portpulse"))
    try:
        return int((cache / "run" / service / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def is_local(service: str) -> bool:
    """True when the tests use the service scripts/services runs (so a test may stop it)."""
    var = {
        "mqtt": "PORTPULSE_MQTT__HOST",
        "kafka": "PORTPULSE_KAFKA__BOOTSTRAP_SERVERS",
        "influx": "PORTPULSE_INFLUX__URL",
    }
    return not os.environ.get(var[service]) and not docker_answers()


async def local_service_control_async(service: str, action: str) -> None:
    """:func:`local_service_control` without blocking the event loop (and without a thread)."""
    import asyncio

    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}
    proc = await asyncio.create_subprocess_exec(
        str(SERVICES_SCRIPT), action, service, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/services {action} {service} failed:\n{err.decode()}")
