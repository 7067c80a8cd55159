"""What every benchmark needs: the services' endpoints, a free port, a fast MQTT publisher."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from simulators.rawmqtt import RawPublisher

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services"


def service_env(*services: str) -> dict[str, str]:
    """``PORTPULSE_*`` endpoints: the configured ones, else ``scripts/services`` started for
    ``services`` (all when none are named)."""
    if os.environ.get("PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"):
        return {k: v for k, v in os.environ.items() if k.startswith("PORTPULSE_")}
    subprocess.run([str(SERVICES), "up", *services], check=True)
    out = subprocess.run([str(SERVICES), "env"], check=True, capture_output=True, text=True).stdout
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def publish(host: str, port: int, messages: list[tuple[str, bytes]], qos: int, rate: float | None = None) -> float:
    """Publish (pipelined, :class:`simulators.rawmqtt.RawPublisher`) at most ``rate`` messages/s
    and wait for the broker's acks; returns seconds taken."""
    client = RawPublisher(host, port, f"pub-{uuid.uuid4().hex[:8]}", qos=qos)
    t0 = time.monotonic()
    try:
        for i, (topic, payload) in enumerate(messages):
            client.publish(topic, payload)
            if rate and i % 100 == 0:
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0:
                    client.flush()
                    time.sleep(ahead)
        client.settle(300)
        return time.monotonic() - t0
    finally:
        client.close()
