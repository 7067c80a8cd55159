"""Crane edge nodes speaking Sparkplug B (spec 3.0): the crane fleet as Ignition or HiveMQ Edge
would publish it.

One edge node per terminal (group = the terminal's site, edge node ``gw-{k}``), one device per
crane (device id = the crane's sensor id). :class:`EdgeNode` is pure (payloads, bdSeq, seq);
:func:`run_sparkplug_fleet` connects each node with its NDEATH as MQTT will, publishes NBIRTH and
DBIRTHs, then each crane report as a DDATA by alias, paced like the other fleets, and answers a
rebirth request (NCMD ``Node Control/Rebirth``) with its births.

Faults (``--faults``, probability per report, recorded in the manifest):

- ``outage``: the report's edge node drops off the network for ``OUTAGE_S`` s (disconnect with
  will: the broker publishes its NDEATH), keeps its cranes' reports, comes back with bdSeq + 1,
  births, and publishes what it kept as ``is_historical`` DDATA (store and forward);
- ``seq_gap``: one seq number is skipped, as if a message were lost (the host asks for a rebirth).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from portpulse.codecs.sparkplug import Payload
from portpulse.ingest.sparkplug import NAMESPACE, REBIRTH_METRIC
from portpulse.simulators.fleet import make_fleet, reports
from portpulse.simulators.publish import MqttTarget, PublishReport
from portpulse.simulators.stream import BLOCK_S, FaultRecord

__all__ = ["CRANE_METRICS", "SPARKPLUG_FAULTS", "EdgeNode", "SparkplugConfig", "run_sparkplug_fleet"]

SPARKPLUG_FAULTS = ("outage", "seq_gap")
OUTAGE_S = 5.0
_FLOAT, _DOUBLE, _BOOLEAN, _UINT64 = 9, 10, 11, 8

#: crane metric -> (Sparkplug name, datatype, factor from the catalogue's unit to the PLC's):
#: the names and units of portpulse/contract/sparkplug.toml.
CRANE_METRICS: dict[str, tuple[str, int, float]] = {
    "hoist_load": ("Hoist/Load", _FLOAT, 1000.0),  # kg
    "trolley_position": ("Trolley/Position", _DOUBLE, 1.0),
    "wind_speed": ("Environment/Wind Speed", _FLOAT, 3.6),  # km/h
    "motor_temperature": ("Hoist/Motor Temperature", _FLOAT, 1.0),
    "spreader_locked": ("Spreader/Locked", _BOOLEAN, 1.0),
    "move_counter": ("Counters/Moves", _UINT64, 1.0),
}


@dataclass(frozen=True, slots=True)
class SparkplugConfig:
    """``sensors`` cranes reporting ``rate`` reports per second in all for ``duration_s`` s."""

    sensors: int = 40
    rate: float = 20.0
    duration_s: float = 60.0
    seed: int = 1
    start_ns: int = 1_764_000_000 * 10**9
    faults: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = set(self.faults) - set(SPARKPLUG_FAULTS)
        if bad:
            raise ValueError(f"unknown Sparkplug fault(s) {sorted(bad)}; choose from {', '.join(SPARKPLUG_FAULTS)}")
        if self.rate <= 0 or self.sensors <= 0 or self.duration_s < 0:
            raise ValueError("rate and sensors must be positive, duration not negative")


def _set_value(metric: Any, datatype: int, value: float) -> None:
    if datatype == _FLOAT:
        metric.float_value = value
    elif datatype == _DOUBLE:
        metric.double_value = value
    elif datatype == _BOOLEAN:
        metric.boolean_value = bool(value)
    else:
        metric.long_value = int(value)


class EdgeNode:
    """One Sparkplug edge node and its devices (pure: builds payloads, keeps bdSeq and seq)."""

    def __init__(self, group: str, edge_node: str, devices: list[str]) -> None:
        self.group, self.edge_node, self.devices = group, edge_node, devices
        self.bd_seq = 0
        self.seq = 0
        self.aliases = {name: k for k, name in enumerate(CRANE_METRICS, start=1)}

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"{NAMESPACE}/{self.group}/{kind}/{self.edge_node}" + (f"/{device}" if device else "")

    def _next_seq(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq

    def skip_seq(self) -> None:
        """Lose a message: the next one's seq is one further on."""
        self._next_seq()

    def death(self) -> bytes:
        """The NDEATH, the MQTT will of the current connection: its bdSeq only."""
        payload = Payload()
        payload.metrics.add(name="bdSeq", datatype=_UINT64, long_value=self.bd_seq)
        return bytes(payload.SerializeToString())

    def births(self, now_ms: int, latest: dict[str, tuple[int, dict[str, float]]]) -> list[tuple[str, bytes]]:
        """NBIRTH (seq 0) and one DBIRTH per device with its metrics' names, aliases, datatypes and
        latest values (``latest``: device -> (ts ms, catalogue values))."""
        self.seq = 0
        node = Payload(timestamp=now_ms, seq=self._next_seq())
        node.metrics.add(name="bdSeq", datatype=_UINT64, long_value=self.bd_seq, timestamp=now_ms)
        node.metrics.add(name=REBIRTH_METRIC, alias=0, datatype=_BOOLEAN, boolean_value=False, timestamp=now_ms)
        out = [(self.topic("NBIRTH"), bytes(node.SerializeToString()))]
        for device in self.devices:
            ts_ms, values = latest[device]
            payload = Payload(timestamp=now_ms, seq=self._next_seq())
            for metric, (name, datatype, factor) in CRANE_METRICS.items():
                m = payload.metrics.add(name=name, alias=self.aliases[metric], datatype=datatype, timestamp=ts_ms)
                _set_value(m, datatype, values[metric] * factor)
            out.append((self.topic("DBIRTH", device), bytes(payload.SerializeToString())))
        return out

    def data(
        self, device: str, rows: list[tuple[int, dict[str, float]]], historical: bool = False
    ) -> tuple[str, bytes]:
        """A DDATA by alias with every metric of each (ts ms, catalogue values) row."""
        payload = Payload(timestamp=rows[-1][0], seq=self._next_seq())
        for ts_ms, values in rows:
            for metric, (_, datatype, factor) in CRANE_METRICS.items():
                m = payload.metrics.add(alias=self.aliases[metric], timestamp=ts_ms)
                if historical:
                    m.is_historical = True
                _set_value(m, datatype, values[metric] * factor)
        return self.topic("DDATA", device), bytes(payload.SerializeToString())


class _Link:
    """An edge node's MQTT session (paho, MQTT 5): the NDEATH as will, NCMD rebirth requests noted."""

    def __init__(self, node: EdgeNode, target: MqttTarget) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.node = node
        self.rebirth = threading.Event()
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{target.client_id}-{node.group}-{node.edge_node}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if target.username:
            self.client.username_pw_set(target.username, target.password)
        self.client.max_inflight_messages_set(1000)
        self.client.will_set(node.topic("NDEATH"), node.death(), qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.node.topic("NCMD"), qos=0)
            self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(Exception):  # a command we cannot read is not ours to act on
            for m in Payload.FromString(msg.payload).metrics:
                if m.name == REBIRTH_METRIC and m.boolean_value:
                    self.rebirth.set()

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        return self.client.publish(topic, payload, qos=qos)

    def close(self, *, with_will: bool) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        if with_will:  # MQTT 5 "disconnect with will message": the broker publishes the NDEATH
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        else:
            self.client.publish(self.node.topic("NDEATH"), self.node.death(), qos=1).wait_for_publish(5.0)
            self.client.disconnect()
        self.client.loop_stop()


def run_sparkplug_fleet(
    config: SparkplugConfig,
    target: MqttTarget,
    manifest: TextIO | None = None,
    progress: TextIO | None = sys.stderr,
    connect_timeout_s: float = 10.0,
) -> PublishReport:
    """Publish the crane fleet as Sparkplug edge nodes in real time (see the module docstring)."""
    fleet = make_fleet(("crane",), config.sensors, config.seed, config.start_ns)
    noise, faults = np.random.default_rng([config.seed, 4]), np.random.default_rng([config.seed, 3])
    sites = sorted(set(fleet.site.tolist()))
    nodes = {site: EdgeNode(site, f"gw-{k}", []) for k, site in enumerate(sites)}
    for sensor, site in zip(fleet.sensor_id.tolist(), fleet.site.tolist(), strict=True):
        nodes[site].devices.append(sensor)
    # The values the cranes hold before the stream starts (a second before it): the first births carry them.
    before = config.start_ns - 10**9
    first = reports(fleet, np.arange(len(fleet)), np.full(len(fleet), before), np.random.default_rng([config.seed, 5]))
    latest = {
        str(fleet.sensor_id[k]): (before // 10**6, {m: float(first.values[m][k]) for m in CRANE_METRICS})
        for k in range(len(fleet))
    }
    links: dict[str, _Link] = {}
    kept: dict[str, list[tuple[str, tuple[int, dict[str, float]]]]] = {}  # during an outage
    back_at: dict[str, float] = {}
    messages = faults_count = reports_done = 0
    pending: list[Any] = []

    def send(link: _Link, topic: str, payload: bytes) -> None:
        nonlocal messages
        info = link.publish(topic, payload, target.qos)
        messages += 1
        if target.qos:
            pending.append(info)

    def connect(site: str) -> None:
        link = links[site] = _Link(nodes[site], target)
        if not link.connected.wait(connect_timeout_s):
            raise ConnectionError(f"MQTT broker {target.host}:{target.port} did not accept edge node {site}")
        for topic, payload in nodes[site].births(int(time.time() * 1000), latest):
            send(link, topic, payload)

    def record(kind: str, site: str, sensor: str, ts_ns: int) -> None:
        nonlocal faults_count
        faults_count += 1
        if manifest is not None:
            manifest.write(
                FaultRecord(kind, messages, nodes[site].topic("DDATA", sensor), sensor, ts_ns=ts_ns).to_json() + "\n"
            )

    def bring_back(site: str) -> None:
        """End an outage: a new session (bdSeq + 1), births, then what was kept, as history."""
        del back_at[site]
        node = nodes[site]
        node.bd_seq = (node.bd_seq + 1) % 256
        connect(site)
        by_device: dict[str, list[tuple[int, dict[str, float]]]] = {}
        for device, row in kept.pop(site, []):
            by_device.setdefault(device, []).append(row)
        for device, rows in by_device.items():
            for chunk in range(0, len(rows), 50):
                send(links[site], *node.data(device, rows[chunk : chunk + 50], historical=True))

    for site in sites:
        connect(site)
    total = round(config.duration_s * config.rate)
    start = time.monotonic()
    next_progress = start + 1.0
    try:
        for block_start in range(0, total, max(1, round(BLOCK_S * config.rate))):
            block = np.arange(block_start, min(total, block_start + max(1, round(BLOCK_S * config.rate))))
            due = block / config.rate
            sensor = block % len(fleet)
            ts_ns = config.start_ns + (due * 1e9).astype(np.int64)
            values = reports(fleet, sensor, ts_ns, noise)
            draws = faults.random((len(block), 2))
            for k in range(len(block)):
                elapsed = time.monotonic() - start
                for site, at in list(back_at.items()):
                    if elapsed >= at:
                        bring_back(site)
                for site, link in links.items():
                    if link.rebirth.is_set() and site not in back_at:
                        link.rebirth.clear()
                        for topic, payload in nodes[site].births(int(time.time() * 1000), latest):
                            send(link, topic, payload)
                ahead = due[k] - elapsed
                if ahead > 0.002:
                    time.sleep(ahead)
                device = str(fleet.sensor_id[sensor[k]])
                site = str(fleet.site[sensor[k]])
                row = (int(ts_ns[k]) // 10**6, {m: float(values.values[m][k]) for m in CRANE_METRICS})
                latest[device] = row
                reports_done += 1
                if site in back_at:
                    kept.setdefault(site, []).append((device, row))
                    continue
                if draws[k, 0] < config.faults.get("outage", 0.0):
                    record("outage", site, device, int(ts_ns[k]))
                    links[site].close(with_will=True)
                    back_at[site] = time.monotonic() - start + OUTAGE_S
                    kept.setdefault(site, []).append((device, row))
                    continue
                if draws[k, 1] < config.faults.get("seq_gap", 0.0):
                    record("seq_gap", site, device, int(ts_ns[k]))
                    nodes[site].skip_seq()
                send(links[site], *nodes[site].data(device, [row]))
            if progress is not None and time.monotonic() >= next_progress:
                next_progress += 1.0
                progress.write(f"{time.monotonic() - start:6.1f}s  {messages:,} messages  {reports_done:,} reports\n")
        for site, at in sorted(back_at.items(), key=lambda item: item[1]):
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            bring_back(site)
        for info in pending:
            info.wait_for_publish(30.0)
    finally:
        for site, link in links.items():
            if site not in back_at:
                link.close(with_will=False)
    return PublishReport(messages, reports_done, faults_count, time.monotonic() - start)
