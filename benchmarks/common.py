"""What every benchmark needs: the services' endpoints, a free port, a fast MQTT publisher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from portpulse.simulators.rawmqtt import publish_messages

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services"
#: The benchmarks' publisher: pipelined, at QoS 0 or 1, paced to a rate if asked.
publish = publish_messages


def service_env(*services: str) -> dict[str, str]:
    """``PORTPULSE_*`` endpoints: the configured ones, else ``scripts/services`` started for
    ``services`` (all when none are named)."""
    if os.environ.get("PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"):
        return {k: v for k, v in os.environ.items() if k.startswith("PORTPULSE_")}
    subprocess.run([str(SERVICES), "up", *services], check=True)
    out = subprocess.run([str(SERVICES), "env"], check=True, capture_output=True, text=True).stdout
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))


#: Where ``scripts/services`` keeps its pid files (the same default as the script's).
SERVICES_RUN = Path(os.environ.get("PORTPULSE_CACHE", Path.home() / ".cache" / "portpulse")) / "run"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuBudget:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`: the local
    services ``scripts/services`` started (their pid files), plus ``extra`` (name -> pid)."""

    def __init__(self, extra: dict[str, int]) -> None:
        self.pids = dict(extra)
        for name in ("mqtt", "kafka", "influx"):
            with contextlib.suppress(OSError, ValueError):
                self.pids[name] = int((SERVICES_RUN / name / "pid").read_text().strip())
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used


def wait_until_quiet(max_share: float = 0.1, window_s: float = 2.0, timeout_s: float = 120.0) -> float:
    """Wait (bounded) until the local services together use at most ``max_share`` of one core
    over ``window_s``: a restarted InfluxDB loads its shards and a broker settles, and a run
    started meanwhile measures their start-up, not the load. Returns the seconds waited."""
    started = time.monotonic()
    budget = CpuBudget({})
    while time.monotonic() - started < timeout_s:
        budget.start()
        time.sleep(window_s)
        if sum(budget.stop().values()) <= max_share * window_s:
            break
    return time.monotonic() - started


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGTERM (PortPulse drains and commits), SIGKILL if it has not exited within ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def delete_topics(env: dict[str, str], prefix: str) -> None:
    """Delete the Kafka topics ``{prefix}.*`` one run made: the next runs' figures must not depend
    on how many ran before (a pattern-subscribed consumer reads every topic's metadata)."""
    asyncio.run(_delete_topics(env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"], prefix))


async def _delete_topics(bootstrap_servers: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        ours = [topic for topic in await admin.list_topics() if topic.startswith(f"{prefix}.")]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
