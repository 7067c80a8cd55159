"""Sparkplug B through the real Mosquitto, Kafka and InfluxDB, with ``portpulse run`` as host:

- interop: an edge node built on pysparkplug (not ours) publishes births, data and dies (SIGKILL:
  the broker publishes its will); every value it sent is stored, converted to the catalogue's
  units by an independent table here; the node is shown offline and its crane stale; the
  bridge's retained STATE is online while it runs and offline once it stopped;
- our simulator with faults and a bridge restart in the middle: every report stored, each seq
  gap dead-lettered once with its values kept, the outage's backlog stored as history, and no
  dead letter from the restart (the births are read back, not asked again).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pandas as pd
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.test_dlq import poll
from tests.integration.test_end_to_end import http_get
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

PEER_PYTHON = Path(".venv/sparkplug-peer/bin/python")
PEER = Path(__file__).with_name("sparkplug_peer.py")

#: Sparkplug name -> (catalogue metric, to the catalogue's unit): written here from the catalogue
#: (t, m, °C, bool, moves, m/s), not taken from PortPulse's mapping code.
EXPECTED_MAPPING: dict[str, tuple[str, Any]] = {
    "Hoist/Load": ("hoist_load", lambda v: float(np.float32(v)) / 1000.0),  # kg -> t
    "Trolley/Position": ("trolley_position", float),
    "Hoist/Motor Temperature": ("motor_temperature", float),
    "Spreader/Locked": ("spreader_locked", lambda v: 1.0 if v else 0.0),
    "Counters/Moves": ("move_counter", float),
    "Environment/Wind Speed": ("wind_speed", lambda v: float(v) / 3.6),  # km/h -> m/s
}


def sparkplug_env(base: dict[str, str], unique: str) -> dict[str, str]:
    return {**base, "PORTPULSE_SPARKPLUG__ENABLED": "true", "PORTPULSE_SPARKPLUG__HOST_ID": f"{unique}-host",
            "PORTPULSE_SPARKPLUG__REBIRTH_INTERVAL_S": "1"}  # fmt: skip


def metric_value(port: int, name: str, **labels: str) -> float | None:
    """A sample of the pipeline's /metrics, None when absent."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return None
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.decode().splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return None


def stored(influx: InfluxEndpoint, bucket: str, site: str) -> list[tuple[str, str, int, float]]:
    """(sensor_id, metric, time ns, value) of every raw crane point of ``site``, sorted."""
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "crane"'
        f' and r.site == "{site}") |> keep(columns: ["sensor_id", "_field", "_time", "_value"])',
    )
    return sorted((r["sensor_id"], r["_field"], _ns(r["_time"]), float(r["_value"])) for r in rows)


def _ns(rfc3339: str) -> int:
    return int(pd.Timestamp(rfc3339).value)


def start_peer(mqtt: MqttEndpoint, group: str, edge_node: str, device: str, reports: int) -> subprocess.Popen[str]:
    assert PEER_PYTHON.is_file(), "the Sparkplug peer venv is missing: run `make install`"
    return subprocess.Popen(
        [str(PEER_PYTHON), str(PEER), mqtt.host, str(mqtt.port), group, edge_node, device, str(reports)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


class RetainedState:
    """The retained STATE of a host, as an MQTT subscriber sees it (its own paho thread)."""

    def __init__(self, mqtt: MqttEndpoint, topic: str, client_id: str) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.connect(mqtt.host, mqtt.port)
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.payloads.append(json.loads(msg.payload))

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self.payloads[-1] if self.payloads else None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def test_a_pysparkplug_edge_node_is_stored_exactly_and_its_death_seen(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await _a_pysparkplug_edge_node_is_stored_exactly_and_its_death_seen(
        mqtt, kafka, influx, influx_bucket, unique, tmp_path
    )


async def _a_pysparkplug_edge_node_is_stored_exactly_and_its_death_seen(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    env = sparkplug_env(pipeline_env(mqtt, kafka, influx, influx_bucket, unique), unique)
    pipeline = PipelineProcess(env, tmp_path / "run.log")
    state = RetainedState(mqtt, f"spBv1.0/STATE/{unique}-host", f"{unique}-state")
    peer: subprocess.Popen[str] | None = None
    try:
        await pipeline.start()
        await poll(lambda: (state.last() or {}).get("online") is True, "the host's STATE online", 30)
        online = state.last()
        assert online is not None and isinstance(online["timestamp"], int)

        group, edge_node, device = unique, "gw-1", "sts-77"
        peer = start_peer(mqtt, group, edge_node, device, 5)
        assert peer.stdout is not None
        sent = []
        for _ in range(200):  # bounded: the peer prints 6 values per report and "sent"
            line = await asyncio.to_thread(peer.stdout.readline)
            if line.strip() == "sent" or not line:
                break
            sent.append(json.loads(line))
        assert len(sent) == 6 * 6, sent

        expected = sorted(
            (device, EXPECTED_MAPPING[v["name"]][0], v["ts"] * 10**6, EXPECTED_MAPPING[v["name"]][1](v["value"]))
            for v in sent
        )
        await poll(lambda: len(stored(influx, influx_bucket, group)) >= len(expected), "every value stored", 60)
        got = stored(influx, influx_bucket, group)
        assert [g[:3] for g in got] == [e[:3] for e in expected]
        assert np.allclose([g[3] for g in got], [e[3] for e in expected], rtol=1e-12, atol=0)
        assert metric_value(pipeline.port, "portpulse_sparkplug_node_online", group=group, edge_node=edge_node) == 1.0
        for reason in ("sparkplug_data_before_birth", "sparkplug_unknown_alias", "sparkplug_bad_protobuf"):
            assert metric_value(pipeline.port, "portpulse_ingest_dlq_total", reason=reason) is None

        peer.send_signal(signal.SIGKILL)  # no NDEATH of its own: the broker publishes the will
        peer.wait(10)
        await poll(
            lambda: (
                metric_value(pipeline.port, "portpulse_sparkplug_node_online", group=group, edge_node=edge_node) == 0.0
            ),
            "the node offline after its will",
            30,
        )
        status, body = http_get(f"http://127.0.0.1:{pipeline.port}/api/state")
        alerts = [a for a in json.loads(body)["alerts"] if a.get("site") == group]
        assert status == 200 and [(a["sensor_id"], a["alert"].split(":")[0]) for a in alerts] == [(device, "stale")]

        def dashboard_check() -> str:
            return str(json.loads(http_get(f"http://127.0.0.1:{pipeline.port}/api/state")[1])["health"]["checks"]
                       .get("sparkplug", {}).get("detail"))  # fmt: skip

        await poll(lambda: f"{group}/{edge_node} offline" in dashboard_check(), dashboard_check, 30)
    finally:
        if peer is not None:
            if peer.poll() is None:
                peer.kill()
            peer.wait(10)
            for pipe in (peer.stdin, peer.stdout):
                if pipe is not None:
                    pipe.close()
        code = await pipeline.stop()
        try:
            await poll(lambda: (state.last() or {}).get("online") is False, "the host's STATE offline once stopped", 30)
        finally:
            state.close()
    offline = state.last()
    assert code == 0
    assert offline is not None and offline["timestamp"] == online["timestamp"]  # spec 3.0: the birth's timestamp


async def dead_letter_reasons(kafka: KafkaEndpoint, prefix: str) -> dict[str, int]:
    """Dead letters per reason in the DLQ topic of ``prefix``."""
    from portpulse.contract.settings import KafkaSettings
    from portpulse.kafka import read_topic

    counts: dict[str, int] = {}
    async for records in read_topic(KafkaSettings(bootstrap_servers=kafka.bootstrap_servers), f"{prefix}.dlq"):
        for record in records:
            reason = dict(record.headers)["reason"].decode()
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def simulate(env: dict[str, str], manifest: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "portpulse", "simulate", "--format", "sparkplug", "--qos", "1",
         "--manifest", str(manifest), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def test_simulated_cranes_with_gaps_an_outage_and_a_bridge_restart_lose_nothing(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await _simulated_cranes_with_gaps_an_outage_and_a_bridge_restart_lose_nothing(
        mqtt, kafka, influx, influx_bucket, unique, tmp_path
    )


async def _simulated_cranes_with_gaps_an_outage_and_a_bridge_restart_lose_nothing(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    env = sparkplug_env(pipeline_env(mqtt, kafka, influx, influx_bucket, unique), unique)
    pipeline = PipelineProcess(env, tmp_path / "run.log")
    manifest = tmp_path / "faults.jsonl"
    start_s = float(int(time.time()) - 3600)  # an hour ago: its own time range in the bucket
    sim_env = {**env, "PORTPULSE_MQTT__CLIENT_ID": f"{unique}-sim"}
    await pipeline.start()
    try:
        sim = simulate(sim_env, manifest, "--sensors", "4", "--rate", "8", "--duration", "12", "--seed", "2",
                       "--start", str(start_s), "--faults", "seq_gap=0.05,outage=0.02")  # fmt: skip
        await asyncio.sleep(0)
        await poll(lambda: metric_value(pipeline.port, "portpulse_sparkplug_node_online",
                                        group="terminal-de-france", edge_node="gw-1") == 1.0,
                   "an edge node born", 30)  # fmt: skip
        await pipeline.stop()  # a restart while the nodes publish: the broker keeps their messages
        await pipeline.start()
        out, err = await asyncio.to_thread(sim.communicate, timeout=120)
        assert sim.returncode == 0, err
        reports = int(re.search(r"([\d,]+) crane reports", out).group(1).replace(",", ""))  # type: ignore[union-attr]
        faults = [json.loads(line) for line in manifest.read_text().splitlines()]
        gaps = sum(f["kind"] == "seq_gap" for f in faults)
        outages = sum(f["kind"] == "outage" for f in faults)
        assert reports == 96 and gaps >= 1 and outages >= 1, (reports, faults)

        sites = ("port-2000-tnmsc", "terminal-de-france", "terminal-de-normandie", "terminal-porte-oceane")

        def points() -> list[tuple[str, str, int, float]]:
            return [p for site in sites for p in stored(influx, influx_bucket, site) if p[2] >= (start_s - 1) * 1e9]

        # every report's 6 metrics, plus each crane's first birth (its values a second before the start)
        await poll(lambda: len(points()) >= 6 * (reports + 4), "every report stored", 90)
        got = points()
        per_metric: dict[tuple[str, str], int] = {}
        for sensor, metric, _, _ in got:
            per_metric[(sensor, metric)] = per_metric.get((sensor, metric), 0) + 1
        assert len(got) == 6 * (reports + 4)
        assert set(per_metric.values()) == {reports // 4 + 1}
        # The gaps are dead-lettered (their values kept) and each asks for a rebirth; the restart and
        # the outage cost no dead letter. (A gap while the bridge restarts can go unseen: the first
        # message after a restart sets the node's seq.)
        letters = await dead_letter_reasons(kafka, unique)
        assert set(letters) == {"sparkplug_seq_gap"} and 1 <= letters["sparkplug_seq_gap"] <= gaps, (letters, gaps)
        assert (
            sum(
                metric_value(pipeline.port, "portpulse_sparkplug_rebirth_requests_total", group=g, edge_node=e) or 0
                for g, e in zip(sites, ("gw-0", "gw-1", "gw-2", "gw-3"), strict=True)
            )
            >= 1
        )
    finally:
        await pipeline.stop()
