"""Bridge benchmarks against the real Mosquitto and Kafka.

    .venv/bin/python -m benchmarks.bench_bridge [--messages 200000] [--batch-readings 2000000] [--outage-seconds 60]

Runs ``portpulse bridge`` as its own process (one core's worth of Python, as in production) and
measures the rate at which it moves messages into Kafka. The QoS1 single-reading run drains
messages queued in the bridge's persistent session, so the publisher does not compete for the
two cores, timed by the bridge's own counters from its first received message until every
message is acknowledged by Kafka; the peer is a bare paho subscriber draining the same kind of
queued session without doing anything. Counters are read live from ``/api/totals`` every 20 ms.
Gateway batches (``--batch-readings``, 100 per message) are published live to a subscribed
bridge and timed from the first publish until the bridge counted every reading acknowledged by
Kafka (a queued session of 7 KB messages arrives as one burst before the bridge's counters move,
which would hide the receiving from the timer). The QoS0 run publishes live (QoS0 is not queued
for offline clients) and is timed from the Kafka record timestamps of the first and last record.
The gateway batches' CPU per reading is then split by stage (decode, build, send) in this
process. The outage run stops Kafka for ``--outage-seconds`` while a publisher keeps going and
samples the bridge's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import ROOT, SERVICES, free_port, publish, service_env, stop_process
from portpulse.codecs.wire import decode_value

PROBE_KEY = b"p"


class Run:
    """One benchmark scenario: its own MQTT prefix, Kafka prefix and bridge client id."""

    def __init__(self, env: dict[str, str], name: str, qos: int) -> None:
        self.env = env
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.name = name
        self.qos = qos
        self.host = env["PORTPULSE_MQTT__HOST"]
        self.port = int(env["PORTPULSE_MQTT__PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.ops_port = free_port()

    def bridge_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.env,
            "PORTPULSE_MQTT__TOPIC_PREFIX": self.prefix,
            "PORTPULSE_MQTT__SUBSCRIPTIONS": json.dumps([f"{self.prefix}/#"]),
            "PORTPULSE_MQTT__CLIENT_ID": f"{self.prefix}-bridge",
            "PORTPULSE_MQTT__QOS": str(self.qos),
            "PORTPULSE_MQTT__SESSION_EXPIRY_S": "600",
            "PORTPULSE_KAFKA__TOPIC_PREFIX": self.prefix,
            "PORTPULSE_KAFKA__REQUEST_TIMEOUT_MS": "5000",
            "PORTPULSE_OPS__LOG_LEVEL": "WARNING",
            # The whole load comes from one site: its rate ceiling is raised out of the way (the
            # token bucket still runs, so its cost is in the figures).
            "PORTPULSE_ADMISSION__SITE_RATE_PER_S": "1e9",
            "PORTPULSE_OPS__METRICS_PORT": str(self.ops_port),
            "PORTPULSE_MQTT__PROTOCOL": os.environ.get("BENCH_MQTT_PROTOCOL", "5"),
        }

    def start_bridge(self) -> None:
        log = open(f"/tmp/{self.prefix}-bridge.log", "ab")  # noqa: SIM115, S108 (lives as long as the process)
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "portpulse"), "bridge"], env=self.bridge_env(), stderr=log
        )

    def wait_subscribed(self) -> None:
        """Publish probes until one reaches Kafka (the bridge is subscribed and producing)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited: see /tmp/{self.prefix}-bridge.log")
            publish(self.host, self.port, [(f"{self.prefix}/air/probe/p", b'{"metrics": {"probe": 1}}')], 1)
            if asyncio.run(kafka_stats(self.env, [f"{self.prefix}.readings.air"], 1, 3.0))[0] >= 1:
                return
        raise TimeoutError("bridge did not subscribe")

    def stop_bridge(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def totals(self) -> dict[str, float]:
        """The bridge's counters from its ops server, read now ({} while it is not answering).
        (``/api/state``'s totals are sampled once a second: too coarse to time runs of seconds.)"""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/api/totals", timeout=2) as r:
                return dict(json.loads(r.read()))
        except (OSError, ValueError, KeyError):
            return {}

    def time_drain(self, messages: int, timeout_s: float = 600) -> float:
        """Seconds from the bridge's first received message until all ``messages`` are received
        and acknowledged by Kafka (none in flight), polling its counters every 20 ms."""
        first = 0.0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            t = self.totals()
            now = time.monotonic()
            if not first and t.get("mqtt_messages", 0) > 0:
                first = now
            if t.get("mqtt_messages", 0) >= messages and t.get("in_flight", 1) == 0:
                return now - first
            time.sleep(0.02)
        raise TimeoutError(f"bridge did not drain {messages} messages in {timeout_s:.0f} s")

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def payloads(prefix: str, n: int, batch: int, t_ms: int) -> list[tuple[str, bytes]]:
    """``n`` readings, 1 ms apart, ending at ``t_ms``: stamps after it would pass the bridge's
    future limit (``ingest.max_future_s``, 300 s) in runs of more than 300 000 and go to the DLQ."""
    t_ms -= n
    if batch == 1:
        return [
            (f"{prefix}/air/quai/no2-{i % 1000}", b'{"ts": %d, "metrics": {"no2": %d.5}}' % (t_ms + i, i % 400))
            for i in range(n)
        ]
    out = []
    for m in range(n // batch):
        readings = [
            {"sensor_id": f"no2-{(m * batch + k) % 1000}", "ts": t_ms + m, "metrics": {"no2": k + 0.5}}
            for k in range(batch)
        ]
        out.append((f"{prefix}/air/quai", json.dumps({"readings": readings}).encode()))
    return out


def create_session(host: str, port: int, client_id: str, topic: str, qos: int) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    done = threading.Event()
    client.on_subscribe = lambda *_: done.set()
    client.connect(host, port, clean_start=False, properties=props)  # a new id: no session to resume yet
    client.loop_start()
    client.subscribe(topic, qos)
    done.wait(30)
    client.disconnect()
    client.loop_stop()


def bare_drain(host: str, port: int, client_id: str, expect: int, qos: int) -> float:
    """The peer: a bare paho subscriber receiving its queued session (auto-ack); msgs/s."""
    got = 0
    first = last = 0.0
    finished = threading.Event()

    def on_message(*_: object) -> None:
        nonlocal got, first, last
        got += 1
        now = time.monotonic()
        first = first or now
        last = now
        if got >= expect:
            finished.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(65535)
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    client.connect(host, port, clean_start=False, properties=props)
    client.loop_start()
    finished.wait(300)
    client.disconnect()
    client.loop_stop()
    return got / (last - first) if last > first else 0.0


async def kafka_stats(env: dict[str, str], topics: list[str], expect: int, timeout_s: float) -> tuple[int, float]:
    """(readings, readings per second between the first and last record's Kafka timestamp).

    Probe records (sensor ``p``, from :meth:`Run.wait_subscribed`) count but do not time: they
    were produced before the measured run began."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"],
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    count, lo, hi = 0, None, None
    try:
        deadline = time.monotonic() + timeout_s
        while count < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                for r in records:
                    count += len(decode_value(r.value))  # a record holds a sensor's readings of a delivery
                    if r.key == PROBE_KEY:
                        continue
                    lo = r.timestamp if lo is None else min(lo, r.timestamp)
                    hi = r.timestamp if hi is None else max(hi, r.timestamp)
    finally:
        await consumer.stop()
    span = ((hi or 0) - (lo or 0)) / 1000
    return count, count / span if span > 0 else 0.0


def drain_run(env: dict[str, str], n: int, batch: int, qos: int) -> tuple[float, float, int]:
    """Queue n messages in the bridge's session, then time the bridge draining them.
    Returns (messages/s, bare paho messages/s, readings in Kafka)."""
    run = Run(env, "drain", qos)
    run.start_bridge()
    run.wait_subscribed()
    run.stop_bridge()
    messages = payloads(run.prefix, n, batch, int(time.time() * 1000))
    publish(run.host, run.port, messages, qos)
    run.start_bridge()
    # Timed by the bridge's own counters, receive to Kafka ack: Kafka record timestamps would
    # time only the appends, after the decoding of a large first batch.
    seconds = run.time_drain(len(messages))
    records = len(messages) * batch
    count, _ = asyncio.run(kafka_stats(env, [f"{run.prefix}.readings.air"], records + 1, 600))
    run.stop_bridge()
    # Peer: the same queue drained by a bare paho client.
    peer_id = f"{run.prefix}-peer"
    create_session(run.host, run.port, peer_id, f"{run.prefix}/#", qos)
    publish(run.host, run.port, messages, qos)
    peer = bare_drain(run.host, run.port, peer_id, len(messages), qos)
    return len(messages) / seconds, peer, count


def live_batches(env: dict[str, str], n: int, batch: int, timeout_s: float = 600) -> tuple[float, int, float]:
    """Publish ``n`` readings in gateway batches to a subscribed bridge (QoS1, live) and time from
    the first publish until the bridge counted every reading acknowledged by Kafka.
    Returns (readings/s, readings in Kafka, readings/s the publisher managed).

    Live, not drained from a queued session: a session of thousands of 7 KB messages reaches the
    bridge as one burst before its counters move, which would hide the receiving from the timer."""
    run = Run(env, "batches", 1)
    run.start_bridge()
    run.wait_subscribed()
    messages = payloads(run.prefix, n, batch, int(time.time() * 1000))
    before = run.totals().get("kafka_readings", 0)
    t0 = time.monotonic()
    publish_s = publish(run.host, run.port, messages, 1)
    deadline = t0 + timeout_s
    while run.totals().get("kafka_readings", 0) < before + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bridge did not deliver {n} readings in {timeout_s:.0f} s")
        time.sleep(0.02)
    seconds = time.monotonic() - t0
    count, _ = asyncio.run(kafka_stats(env, [f"{run.prefix}.readings.air"], n + 1, 600))
    run.stop_bridge()
    return n / seconds, count, n / publish_s


def stage_cpu(env: dict[str, str], n: int, batch: int = 100, repeats: int = 3) -> dict[str, float]:
    """CPU seconds per reading of each bridge stage for gateway batches, in this process (best of
    ``repeats``): decode (JSON + checks), admit (the admission gate: budgets, registry, rate
    ceiling), build (records as columns), send (encode, compress, hand to aiokafka, wait for
    Kafka's acks). Deliveries of 2 MiB of payload, as the bridge cuts them."""
    import numpy as np

    from portpulse.app.runtime import tune_gc_for_streaming
    from portpulse.contract.settings import AdmissionSettings, KafkaSettings, Settings
    from portpulse.ingest.admission import Admission, SiteIndex
    from portpulse.ingest.bridge import MAX_DISPATCH_BYTES, KafkaRecordSink
    from portpulse.ingest.decode import DecodeLimits, Message, decode_messages
    from portpulse.ingest.records import SeriesCodes, build_records

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    now = time.time_ns()
    messages = [Message(t, p, now) for t, p in payloads(prefix, n, batch, now // 10**6)]
    per_dispatch = max(1, MAX_DISPATCH_BYTES // max(1, len(messages[0].payload)))
    limits = DecodeLimits(topic_prefix=prefix)
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"]))
    tune_gc_for_streaming()

    async def run() -> dict[str, float]:
        best = {"decode": float("inf"), "admit": float("inf"), "build": float("inf"), "send": float("inf")}
        admission = Admission(AdmissionSettings(site_rate_per_s=1e9))  # every check on, no ceiling reached
        site_index = SiteIndex(prefix)
        async with KafkaRecordSink(settings) as sink:
            for _ in range(repeats):
                spent = dict.fromkeys(best, 0.0)
                for i in range(0, len(messages), per_dispatch):
                    chunk = messages[i : i + per_dispatch]
                    t0 = time.process_time()
                    # the rate ceiling, as the bridge does
                    sites = site_index.of([m.topic for m in chunk], [len(m.payload) for m in chunk])
                    limited = admission.ration(sites, time.time())
                    tr = time.process_time()
                    decoded = decode_messages(chunk, limits)
                    tr2 = time.process_time()
                    admission.settle(sites, limited, np.bincount(decoded.message_index, minlength=len(chunk)))
                    assert not limited
                    t1 = time.process_time()
                    codes = SeriesCodes.of(decoded.readings)  # part of build: build_records uses them
                    t2 = time.process_time()
                    verdict = admission.admit(codes, time.time())
                    assert verdict.all_admitted
                    t3 = time.process_time()
                    records = build_records(decoded, prefix, codes)
                    t4 = time.process_time()
                    await sink.ensure_topics(records.topics)
                    t5 = time.process_time()
                    await sink.send(records.records, [])
                    t6 = time.process_time()
                    spent["decode"] += tr2 - tr
                    spent["admit"] += t3 - t2 + tr - t0 + t1 - tr2
                    spent["build"] += t2 - t1 + t4 - t3
                    spent["send"] += t6 - t5
                best = {k: min(best[k], spent[k] / n) for k in best}
        return best

    return asyncio.run(run())


def admission_bytes_per_series(series: int = 200_000) -> float:
    """Python heap bytes the admission gate holds per registered series (tracemalloc)."""
    import tracemalloc

    from portpulse.arrays import factorise
    from portpulse.contract.settings import AdmissionSettings
    from portpulse.ingest.admission import Admission
    from portpulse.ingest.records import SeriesCodes

    keys = [("air", f"site-{i % 40}", f"sensor-{i:07d}") for i in range(series)]
    (domain, domains), (site, sites), (sensor, sensors) = (factorise([k[j] for k in keys]) for j in range(3))
    codes = SeriesCodes(domain, domains, sensor, sensors, site, sites)
    off = AdmissionSettings(site_new_per_hour=0, site_new_per_day=0, domain_new_per_hour=0, domain_new_per_day=0,
                            max_series=0, site_rate_per_s=0)  # fmt: skip
    tracemalloc.start()
    gate = Admission(off)
    before = tracemalloc.get_traced_memory()[0]
    gate.admit(codes, time.time())
    gate.take_changes()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert gate.known_series == series
    return (after - before) / series


def live_qos0(env: dict[str, str], n: int) -> tuple[float, int, float]:
    run = Run(env, "qos0", 0)
    run.start_bridge()
    run.wait_subscribed()
    messages = payloads(run.prefix, n, 1, int(time.time() * 1000))
    pub_s = publish(run.host, run.port, messages, 0)
    count, rate = asyncio.run(kafka_stats(env, [f"{run.prefix}.readings.air"], n + 1, 120))
    run.stop_bridge()
    return rate, count - 1, n / pub_s


def outage(env: dict[str, str], seconds: float, rate: float) -> tuple[float, int, int]:
    run = Run(env, "outage", 1)
    run.start_bridge()
    run.wait_subscribed()
    n = int(seconds * rate)
    messages = payloads(run.prefix, n, 1, int(time.time() * 1000))
    subprocess.run([str(SERVICES), "down", "kafka"], check=True, capture_output=True)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, run.rss_mb())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    publish(run.host, run.port, messages, 1, rate=rate)
    subprocess.run([str(SERVICES), "up", "kafka"], check=True, capture_output=True)
    count, _ = asyncio.run(kafka_stats(env, [f"{run.prefix}.readings.air"], n + 1, 300))
    stop.set()
    sampler.join()
    run.stop_bridge()
    return peak, n, count - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--outage-seconds", type=float, default=60.0)
    parser.add_argument("--outage-rate", type=float, default=5_000.0, help="messages/s published during the outage")
    parser.add_argument(
        "--batch-readings", type=int, default=2_000_000, help="readings in the gateway-batch run (100 per message)"
    )
    parser.add_argument("--skip-outage", action="store_true")
    args = parser.parse_args()
    env = service_env("mqtt", "kafka")
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print("\n| scenario | bridge | target | vs target | bare paho peer | bridge / peer | readings in Kafka |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rate, peer, count = drain_run(env, args.messages, 1, 1)
    print(
        f"| QoS1, 1 reading/msg | {rate:,.0f} msg/s | 15,000 | {rate / 15000:.2f} | {peer:,.0f} msg/s | "
        f"{rate / peer:.2f} | {count:,} |"
    )
    rate0, count0, pub_rate = live_qos0(env, args.messages)
    print(
        f"| QoS0, 1 reading/msg (live, publisher {pub_rate:,.0f} msg/s) | {rate0:,.0f} msg/s | 30,000 | "
        f"{rate0 / 30000:.2f} | - | - | {count0:,} of {args.messages:,} |"
    )
    readings = max(100, args.batch_readings // 100 * 100)  # long enough that the first second's ramp is small
    rate_b, count_b, pub_b = live_batches(env, readings, 100)
    print(
        f"| QoS1, gateway batches of 100 (live from the first publish; publisher {pub_b:,.0f} readings/s) | "
        f"{rate_b:,.0f} readings/s | 300,000 | "
        f"{rate_b / 300000:.2f} | - | - | {count_b:,} of {readings:,} |"
    )
    cpu = stage_cpu(env, min(readings, 600_000))  # held in memory 3 times over: capped
    total = sum(cpu.values())
    print(
        "\nGateway batches, bridge CPU per reading by stage "
        f"(in this process, best of 3, {min(readings, 600_000):,} readings): "
        + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in cpu.items())
        + f"; total {total * 1e6:.2f} us = {1 / total:,.0f} readings/s per core before MQTT receiving"
    )
    singles = stage_cpu(env, min(args.messages, 200_000), batch=1)
    print(
        "Single readings (1 per message), the same stages: "
        + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in singles.items())
        + f"; admission {singles['admit'] / sum(singles.values()):.1%} of the bridge's CPU before MQTT receiving"
    )
    print(f"Admission registry: {admission_bytes_per_series():,.0f} bytes per known series (200 000 registered)")
    if not args.skip_outage:
        peak, sent, got = outage(env, args.outage_seconds, args.outage_rate)
        print(
            f"\nKafka down {args.outage_seconds:.0f} s while publishing {args.outage_rate:,.0f} msg/s QoS1: "
            f"bridge peak RSS {peak:.0f} MB (limit 300), {sent:,} published, {got:,} in Kafka afterwards"
        )


if __name__ == "__main__":
    main()
