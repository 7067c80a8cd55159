"""PortPulse beside Telegraf on the same Mosquitto, Kafka and InfluxDB 1.8, the same loads.

    .venv/bin/python -m benchmarks.bench_telegraf [--runs 3] [--messages 100000] [--batches 5000]

Telegraf is built from its Go module with only the plugins it needs (``scripts/services build
telegraf``: once, cached) and runs the equivalent pipeline as its users would, two agents:

- bridge: ``inputs.mqtt_consumer`` (QoS 1, persistent session, line protocol) -> ``outputs.kafka``
- processor: ``inputs.kafka_consumer`` -> ``aggregators.basicstats`` (60 s windows, a grace for
  readings behind the clock, raw points kept) -> ``outputs.influxdb``

with batch sizes and buffers raised so that it drops nothing. PortPulse runs with 1 minute
windows in two topologies: ``portpulse run`` (bridge, processor and sink on one event loop, one
process) and ``portpulse bridge`` + ``portpulse process`` (two processes, like Telegraf's two
agents). All get the same bytes: InfluxDB line protocol published at QoS 1 by one pipelined
publisher, one metric per line (the loads below), each pipeline in turn, ``--runs`` times. The
figures: wall time from the first publish until InfluxDB holds every raw value (stored =
published is checked for every peer), CPU per reading of every process from /proc.

Loads: ``--messages`` single-line messages from 1 000 sensors; ``--batches`` messages of 100
lines. Event time: each sensor reports once a second, ending about now. After each round the
same load also goes to ``mosquitto_sub -q 1`` (the broker's own client, which only
acknowledges): the *broker ceiling*, what the publisher and Mosquitto forward on this machine
with nothing behind them. A pipeline near it is paced by them, not by itself (one that batches
its acks may pass it a little); the report prints each peer's share of it.

Fleet loads (``--fleet-sensors``, 0 to skip): the simulators' air, crane and cell fleets, every
sensor reporting its 6-7 metrics once a second for ``--fleet-seconds`` of event time, as line
protocol gateway batches of 100 reports, JSON gateway batches and JSON single reports, every
peer on each (Telegraf reads the JSON through its json_v2 parser, the domain, site and sensor
from the topic: :data:`TELEGRAF_INPUTS`). Event time is *paced*:
the fleet is large enough that one second of its event time is about as many values as the
pipelines store per second of wall time (the report prints event seconds per wall second). The
60 s of event time span one minute's end (plus the allowed lateness) at their middle, whatever
the wall clock says: PortPulse closes one 1-minute window of every series in every run, the
real-time rate of a fleet's minute aggregates. Telegraf's basicstats pushes on the wall clock's
minutes, so in some of its runs; the report prints the aggregate lines stored in each run. Stored
= published counts every metric of every report (PortPulse: raw plus rejected by cleaning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import TOPOLOGIES, Influx, Pipeline
from benchmarks.common import SERVICES, CpuBudget, delete_topics, publish, service_env, stop_process, wait_until_quiet
from portpulse.simulators.fleet import DOMAIN_METRICS

SENSORS = 1000
#: The Kafka protocol version Telegraf's client (sarama) speaks: its default is older than Kafka 4
#: accepts (the connection ends in EOF).
KAFKA_PROTOCOL = "3.9.0"


def telegraf_exe() -> Path:
    out = subprocess.run([str(SERVICES), "build", "telegraf"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def lines(prefix: str, n: int, per_message: int, t0_ms: int) -> list[tuple[str, bytes]]:
    """``n`` messages of ``per_message`` NO2 lines (line protocol, ns timestamps) on
    ``{prefix}/air/quai``: sensor ``i % 1000`` reports once per second of event time."""
    out = []
    for m in range(n):
        body = []
        for k in range(m * per_message, (m + 1) * per_message):
            ts_ns = (t0_ms + (k // SENSORS) * 1000) * 10**6
            body.append(f"air,sensor_id=no2-{k % SENSORS:04d},site=quai no2={40.0 + (k // SENSORS) % 5 * 0.5} {ts_ns}")
        out.append((f"{prefix}/air/quai", "\n".join(body).encode()))
    return out


#: Telegraf's MQTT input for each payload format, as its users configure it: line protocol as
#: is, a fleet gateway's site taken from its topic (``{prefix}/{domain}/{site}/{gateway}``); the
#: fleets' JSON through the json_v2 parser, the domain (measurement), site and sensor taken from
#: the topic (``{prefix}/{domain}/{site}[/{sensor}]``), each report's metrics as fields named as
#: in the JSON. The input adds no ``topic`` tag (see :class:`Telegraf`): both pipelines store the
#: same series.
TELEGRAF_INPUTS = {
    "line": """
  data_format = "influx"
  [[inputs.mqtt_consumer.topic_parsing]]
    topic = "{prefix}/+/+/+"
    tags = "_/_/site/_"
""",
    "json": """
  data_format = "json_v2"
  [[inputs.mqtt_consumer.topic_parsing]]
    topic = "{prefix}/+/+/+"
    measurement = "_/measurement/_/_"
    tags = "_/_/site/sensor_id"
  [[inputs.mqtt_consumer.json_v2]]
    timestamp_path = "ts"
    timestamp_format = "unix_ms"
    [[inputs.mqtt_consumer.json_v2.object]]
      path = "metrics"
""",
    "json-batch": """
  data_format = "json_v2"
  [[inputs.mqtt_consumer.topic_parsing]]
    topic = "{prefix}/+/+"
    measurement = "_/measurement/_"
    tags = "_/_/site"
  [[inputs.mqtt_consumer.json_v2]]
    [[inputs.mqtt_consumer.json_v2.object]]
      path = "readings"
      tags = ["sensor_id"]
      timestamp_key = "ts"
      timestamp_format = "unix_ms"
      disable_prepend_keys = true
""",
}


class Telegraf:
    """Telegraf's two agents on this run's topic, consumer group and database; the bridge reads
    ``fmt`` payloads (a key of :data:`TELEGRAF_INPUTS`)."""

    def __init__(self, exe: Path, env: dict[str, str], prefix: str, fmt: str = "line") -> None:
        self.prefix = prefix
        self.env = env
        self.influx = Influx(env, prefix)
        self.influx.query(f'CREATE DATABASE "{prefix}"')
        user, _, password = env.get("PORTPULSE_INFLUX__TOKEN", "").partition(":")
        kafka = json.dumps(env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"].split(","))
        mqtt = f"tcp://{env['PORTPULSE_MQTT__HOST']}:{env['PORTPULSE_MQTT__PORT']}"
        agent = """
[agent]
  interval = "1s"
  flush_interval = "100ms"
  metric_batch_size = 20000
  metric_buffer_limit = 5000000
  omit_hostname = true
"""
        bridge = (
            agent
            + f"""
[[inputs.mqtt_consumer]]
  servers = ["{mqtt}"]
  topics = ["{prefix}/#"]
  qos = 1
  client_id = "{prefix}-telegraf"
  persistent_session = true
  max_undelivered_messages = 20000
  topic_tag = ""
{TELEGRAF_INPUTS[fmt].replace("{prefix}", prefix)}
[[outputs.kafka]]
  brokers = {kafka}
  version = "{KAFKA_PROTOCOL}"
  topic = "{prefix}.telegraf"
  data_format = "influx"
"""
        )
        processor = (
            agent
            + f"""
[[inputs.kafka_consumer]]
  brokers = {kafka}
  version = "{KAFKA_PROTOCOL}"
  topics = ["{prefix}.telegraf"]
  consumer_group = "{prefix}-telegraf"
  offset = "oldest"
  max_undelivered_messages = 20000
  data_format = "influx"

[[aggregators.basicstats]]
  period = "60s"
  grace = "1h"
  drop_original = false
  stats = ["count", "min", "max", "mean", "sum"]

[[outputs.influxdb]]
  urls = ["{env["PORTPULSE_INFLUX__URL"]}"]
  database = "{prefix}"
  skip_database_creation = true
  username = "{user}"
  password = "{password}"
"""
        )
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-telegraf-"))
        self.log = open(self.dir / "telegraf.log", "wb")  # noqa: SIM115 (closed in stop)
        self.procs: list[subprocess.Popen[bytes]] = []
        for name, config in (("bridge", bridge), ("processor", processor)):
            path = self.dir / f"{name}.conf"
            path.write_text(config)
            self.procs.append(subprocess.Popen([str(exe), "--config", str(path)], stdout=self.log, stderr=self.log))

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.log.close()
        self.influx.query(f'DROP DATABASE "{self.prefix}"')
        delete_topics(self.env, self.prefix)


def poll(pause_s: Callable[[], float | None], timeout_s: float, what: str) -> None:
    """Call ``pause_s()`` until it returns None (done), sleeping the seconds it returns between
    calls; SystemExit past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pause = pause_s()
        if pause is None:
            return
        time.sleep(pause)
    raise SystemExit(f"not {what} within {timeout_s:.0f} s")


def wait_for(condition: Any, timeout_s: float, what: str, every_s: float = 0.5) -> None:
    """Poll every ``every_s``: a COUNT over hundreds of thousands of points costs InfluxDB real
    CPU, which a tighter loop would take from both pipelines."""
    poll(lambda: None if condition() else every_s, timeout_s, what)


def wait_for_stored(
    stored: Callable[[], int], target: int, started: float, timeout_s: float, every_s: float = 0.5, tail_s: float = 0.05
) -> None:
    """Poll ``stored()`` until it reaches ``target``, the same way for every peer. Each pause is half
    of what the rest should take at the run's mean store rate so far (stored over the seconds
    since ``started``, a ``time.monotonic()``), within [``tail_s``, ``every_s``]: polls stay sparse
    while much is missing (see :func:`wait_for`) and close in on the end, so a run is timed about
    ``tail_s`` after its last value is stored, not up to ``every_s`` (a fifth of a 2.5-s run) late."""

    def pause_s() -> float | None:
        count = stored()
        if count >= target:
            return None
        rate = count / max(time.monotonic() - started, 1e-3)
        rest_s = (target - count) / rate if rate > 0 else every_s
        return min(every_s, max(tail_s, rest_s / 2))

    poll(pause_s, timeout_s, "stored")


#: The peers: Telegraf's two agents, and PortPulse as ``portpulse run`` (bridge, processor and sink
#: on one event loop: one process, one core) or as ``portpulse bridge`` + ``portpulse process``
#: (two processes, as Telegraf's two agents: each gets a core).
PEER_NAMES = {
    "telegraf": "Telegraf 1.37.2",
    "portpulse": "PortPulse run",
    "portpulse-split": "PortPulse bridge+process",
}
PORTPULSE_TOPOLOGY = {"portpulse": "run", "portpulse-split": "split"}
PORTPULSE_PEERS = tuple(PORTPULSE_TOPOLOGY)
#: PortPulse's allowed lateness (s of a series' event time) in these runs.
FLEET_LATENESS_S = 2


def start_peer(env: dict[str, str], exe: Path, peer: str, fmt: str = "line") -> tuple[Any, dict[str, int]]:
    """``peer`` running on this run's topic, group and database, reading ``fmt`` payloads, and its
    processes' pids by name."""
    if peer == "telegraf":
        tg = Telegraf(exe, env, f"tg{uuid.uuid4().hex[:8]}", fmt)
        return tg, {"telegraf bridge": tg.procs[0].pid, "telegraf processor": tg.procs[1].pid}
    topology = PORTPULSE_TOPOLOGY[peer]
    # The default idle timeout (30 s): a shorter one closes every series' open window on idle
    # while the run's last values are being counted, and a slower machine then writes a second
    # aggregate line per series into the next measured interval's InfluxDB.
    windows = ["--windows", "1m", "--lateness", str(FLEET_LATENESS_S), "--idle-timeout", "30"]
    pipe = Pipeline(env, peer, topology, processor_args=windows)
    names = [f"portpulse {args[0]}" for args in TOPOLOGIES[topology]]
    return pipe, {name: proc.pid for name, proc in zip(names, pipe.procs, strict=True)}


def load_start_ms(n: int, per_message: int) -> int:
    """Event time (ms) of a NO2 load's first second: its last second falls 2 minutes before now."""
    return int(time.time() * 1000) - (n * per_message // SENSORS + 120) * 1000


def run_once(env: dict[str, str], exe: Path, peer: str, n: int, per_message: int) -> dict[str, Any]:
    """One pipeline, one load: values/s from the first publish until stored = published."""
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    t0_ms = load_start_ms(n, per_message)
    pipe, pids = start_peer(env, exe, peer)
    measurement = "air"
    try:
        # warm-up: connected, subscribed, topics made, first write done
        warm = lines(pipe.prefix, 1, 1, t0_ms - 1000)
        wait_for(lambda: _try_publish(host, port, warm) and pipe.influx.count(measurement, "no2") >= 1, 180, "warm")
        messages = lines(pipe.prefix, n, per_message, t0_ms)
        readings = n * per_message
        budget = CpuBudget(pids | {"benchmark (publisher)": os.getpid()})
        budget.start()
        started = time.monotonic()
        publish(host, port, messages, qos=1)
        wait_for_stored(lambda: pipe.influx.count(measurement, "no2") - 1, readings, started, 900)
        elapsed = time.monotonic() - started
        cpu = budget.stop()
        stored = pipe.influx.count(measurement, "no2") - 1
        per_reading = {k: v / readings * 1e6 for k, v in cpu.items()}
        return {"peer": peer, "readings": readings, "stored": stored, "elapsed_s": elapsed,
                "readings_per_s": readings / elapsed, "cpu_us": per_reading}  # fmt: skip
    finally:
        pipe.stop()


#: What Mosquitto forwards of a load to its own C client, which only acknowledges (one PUBACK per write).
CEILING = "broker ceiling"


def run_ceiling(env: dict[str, str], n: int, per_message: int) -> dict[str, Any]:
    """The same load to ``mosquitto_sub -q 1``, which only acknowledges and prints: readings/s from
    the first publish until it has every message, and CPU per reading of the publisher, the broker
    and ``mosquitto_sub``: the pace the publisher and the broker set on this machine."""
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    prefix = f"ceiling{uuid.uuid4().hex[:8]}"
    t0_ms = load_start_ms(n, per_message)
    with tempfile.TemporaryFile() as out:
        argv = ["-h", host, "-p", str(port), "-i", prefix, "-t", f"{prefix}/#", "-q", "1", "-C", str(n + 1)]
        sub = subprocess.Popen(["mosquitto_sub", *argv], stdout=out)
        try:
            # warm-up: subscribed once it has printed a message
            warm = lines(prefix, 1, 1, t0_ms - 1000)
            wait_for(lambda: _try_publish(host, port, warm) and os.fstat(out.fileno()).st_size > 0, 60, "warm")
            messages = lines(prefix, n, per_message, t0_ms)
            budget = CpuBudget({"mosquitto_sub": sub.pid, "benchmark (publisher)": os.getpid()})
            budget.start()
            started = time.monotonic()
            publish(host, port, messages, qos=1)
            # exited, not reaped: its CPU is still in /proc
            os.waitid(os.P_PID, sub.pid, os.WEXITED | os.WNOWAIT)
            elapsed = time.monotonic() - started
            cpu = budget.stop()
        finally:
            stop_process(sub)
    readings = n * per_message
    return {"peer": CEILING, "readings": readings, "elapsed_s": elapsed, "readings_per_s": readings / elapsed,
            "cpu_us": {k: v / readings * 1e6 for k, v in cpu.items() if k not in ("kafka", "influx")}}  # fmt: skip


def _try_publish(host: str, port: int, messages: list[tuple[str, bytes]]) -> bool:
    publish(host, port, messages, qos=1)
    time.sleep(0.5)
    return True


def fleet_messages(
    prefix: str, fmt: str, sensors: int, seconds: float, start_ns: int
) -> tuple[list[tuple[str, bytes]], int, int]:
    """The simulated fleets' reports as ``fmt`` messages on ``{prefix}/...``: the messages, the
    reports and the metric values they hold."""
    from portpulse.simulators.stream import StreamConfig, generate

    config = StreamConfig(sensors=sensors, rate=float(sensors), duration_s=seconds, start_ns=start_ns, fmt=fmt,
                          batch_size=100, topic_prefix=prefix)  # fmt: skip
    messages = [(m.topic, m.payload) for block in generate(config) for m in block.messages]
    reports = values = 0
    for _, payload in messages:
        if fmt == "line":
            found = [line.split(b" ")[1].count(b",") + 1 for line in payload.split(b"\n") if line]
        else:
            body = json.loads(payload)
            found = [len(r["metrics"]) for r in body["readings"]] if fmt == "json-batch" else [len(body["metrics"])]
        reports += len(found)
        values += sum(found)
    return messages, reports, values


def _counts(influx: Influx, measurement: str, fields: list[str], where: str = "") -> int:
    columns = ",".join(f'count("{f}")' for f in fields)
    q = f'SELECT {columns} FROM "{measurement}"{where}'  # noqa: S608 (our own names)
    series = influx.query(q)["results"][0].get("series")
    return int(sum(v or 0 for v in series[0]["values"][0][1:])) if series else 0  # null: a field never written


def fleet_start_ns(now_ns: int, seconds: float) -> int:
    """Event time (ns) of a fleet load's first report: ``seconds`` of event time whose middle is
    the end of a minute plus the processor's allowed lateness, ending no later than 2 s after
    ``now_ns``. PortPulse then closes one 1-minute window of every series in the middle of every
    run, whatever second of the wall clock the run starts at; a span ending at the wall clock
    closed windows in some runs and not in others, and InfluxDB's CPU per value doubled in those
    that did (a window's aggregate line has 56 fields)."""
    minute = 60 * 10**9
    half = int(seconds * 1e9) // 2
    close = (now_ns + 2 * 10**9 - half - FLEET_LATENESS_S * 10**9) // minute * minute + FLEET_LATENESS_S * 10**9
    return close - half


def fleet_aggregates(influx: Influx, peer: str) -> int:
    """Aggregate lines the fleet's domains hold: PortPulse's 1-minute windows, Telegraf's basicstats
    (pushed on the wall clock's minutes, so in some of its runs and not in others)."""
    total = 0
    for domain, metrics in DOMAIN_METRICS.items():
        measurement = domain if peer == "telegraf" else f"{domain}_1m"
        total += _counts(influx, measurement, [f"{metrics[-1]}_count"])
    return total


def fleet_stored(influx: Influx, rejected_too: bool, last_metric_only: bool = False) -> int:
    """Metric values the fleets' measurements hold as raw points (and, for PortPulse, as readings
    rejected by cleaning); ``last_metric_only``: of each domain's last metric, i.e. the reports
    stored so far (a report's metrics travel together)."""
    total = 0
    for domain, all_metrics in DOMAIN_METRICS.items():
        metrics = list(all_metrics[-1:] if last_metric_only else all_metrics)
        total += _counts(influx, domain, metrics)
        if rejected_too:  # "reinstated": a rejection withdrawn, the raw point counted above
            for m in metrics:
                total += _counts(
                    influx, f"{domain}_rejected", [f"{m}_reason"], f" WHERE \"{m}_reason\" != 'reinstated'"
                )
    return total


def run_fleet(env: dict[str, str], exe: Path, peer: str, fmt: str, sensors: int, seconds: float) -> dict[str, Any]:
    """One pipeline, one fleet load: metric values/s from the first publish until stored = published."""
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    # A freshly started InfluxDB for each run: after a database of millions of values is
    # dropped, InfluxDB 1.8 keeps compacting and deleting for minutes (measured: its CPU per
    # value doubled on the next run), which would land on whichever pipeline runs next. The
    # databases of interrupted runs go first: it would load and compact them too.
    Influx(env, "").drop_leftovers()
    for action in ("down", "up"):
        subprocess.run([str(SERVICES), action, "influx"], check=True, capture_output=True)
    wait_until_quiet()
    pipe, pids = start_peer(env, exe, peer, fmt)
    rejected_too = peer != "telegraf"
    try:
        start_ns = fleet_start_ns(time.time_ns(), seconds)
        # warm-up: a report of the fleet's first sensor of each domain in the load's format, a second
        # before the load, so inside the window the load's first reports open
        warm, warm_reports, warm_values = fleet_messages(pipe.prefix, fmt, 3, 1, start_ns - 10**9)
        wait_for(lambda: _try_publish(host, port, warm) and pipe.influx.count("air", "no2") >= 1, 180, "warm")
        messages, reports, values = fleet_messages(pipe.prefix, fmt, sensors, seconds, start_ns)
        budget = CpuBudget(pids | {"benchmark (publisher)": os.getpid()})
        budget.start()
        started = time.monotonic()
        publish(host, port, messages, qos=1)
        everything = reports + warm_reports
        # a poll of the fleet is six COUNTs over up to millions of points: its end every 0.2 s
        wait_for_stored(lambda: fleet_stored(pipe.influx, rejected_too, True), everything, started, 900, 1.0, 0.2)
        elapsed = time.monotonic() - started
        cpu = budget.stop()
        stored = fleet_stored(pipe.influx, rejected_too) - warm_values
        aggregates = fleet_aggregates(pipe.influx, peer)
        # What a disturbed run shows first: windows recomputed from the store (read-backs).
        totals = pipe.totals() if peer != "telegraf" else {}
        work = {k: totals[k] for k in ("rejected", "repeated", "windows_corrected") if k in totals}
        return {"peer": peer, "format": fmt, "reports": reports, "readings": values, "stored": stored,
                "aggregates": aggregates, "elapsed_s": elapsed, "readings_per_s": values / elapsed,
                "event_s_per_wall_s": seconds / elapsed,
                "cpu_us": {k: v / values * 1e6 for k, v in cpu.items()}, "pipeline": work}  # fmt: skip
    finally:
        pipe.stop()


def rate_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The runs' median readings/s and their range."""
    rates = [r["readings_per_s"] for r in rows]
    return {"median_readings_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pipeline = [sum(v for k, v in r["cpu_us"].items() if k.startswith(("telegraf", "portpulse"))) for r in rows]
    every = [sum(r["cpu_us"].values()) for r in rows]
    stored = all(r["stored"] == r["readings"] for r in rows)
    return {**rate_summary(rows), "pipeline_cpu_us": statistics.median(pipeline),
            "all_cpu_us": statistics.median(every), "stored_equals_published": stored}  # fmt: skip


FLEET_LOADS = (  # (name, simulator format, peers)
    ("line protocol, batches of 100 reports", "line", ("telegraf", *PORTPULSE_PEERS)),
    ("JSON gateway batches of 100 reports", "json-batch", ("telegraf", *PORTPULSE_PEERS)),
    ("JSON single reports", "json", ("telegraf", *PORTPULSE_PEERS)),
)


def fleet_loads(env: dict[str, str], exe: Path, runs: int, sensors: int, seconds: float) -> dict[str, Any]:
    """The fleet loads, each peer in turn ``runs`` times; prints and returns the figures."""
    results: dict[str, Any] = {}
    for load, fmt, peers in FLEET_LOADS:
        rows: dict[str, list[dict[str, Any]]] = {peer: [] for peer in peers}
        for _ in range(runs):
            for peer in peers:
                rows[peer].append(run_fleet(env, exe, peer, fmt, sensors, seconds))
                last = rows[peer][-1]
                work = ", ".join(f"{k} {v:,.0f}" for k, v in last["pipeline"].items())
                print(f"  ({peer}, {fmt}: {last['readings_per_s']:,.0f} values/s{'; ' + work if work else ''})",
                      flush=True)  # fmt: skip
        results[load] = {peer: {"runs": r, **summary(r)} for peer, r in rows.items()}
        first = rows[peers[0]][0]
        print(f"fleet, {load}: {sensors:,} sensors x {seconds:g} s = {first['reports']:,} reports, "
              f"{first['readings']:,} metric values, {runs} run(s) each (medians, ranges)")  # fmt: skip
        for peer in peers:
            s = results[load][peer]
            pace = statistics.median(r["event_s_per_wall_s"] for r in rows[peer])
            print(f"  {PEER_NAMES[peer]:24} {s['median_readings_per_s']:>10,.0f} values/s "
                  f"({s['min']:,.0f}-{s['max']:,.0f}); "
                  f"CPU us/value: pipeline {s['pipeline_cpu_us']:.2f}, all processes {s['all_cpu_us']:.2f} "
                  f"({_by_process(rows[peer])}); event time {pace:.2f} s per wall s; "
                  f"aggregate lines stored in each run: {'/'.join(str(r['aggregates']) for r in rows[peer])}; "
                  f"stored = published: {s['stored_equals_published']}")  # fmt: skip
        if "telegraf" in peers:
            for peer in PORTPULSE_PEERS:
                _print_ratio(peer, results[load]["telegraf"], results[load][peer])
    return results


def _by_process(rows: list[dict[str, Any]]) -> str:
    names = rows[0]["cpu_us"]
    return ", ".join(f"{k} {statistics.median(r['cpu_us'][k] for r in rows):.2f}" for k in names)


def _print_ratio(peer: str, t: dict[str, Any], p: dict[str, Any]) -> None:
    print(f"  {PEER_NAMES[peer]} / Telegraf: wall {p['median_readings_per_s'] / t['median_readings_per_s']:.2f}x, "
          f"pipeline CPU {t['pipeline_cpu_us'] / p['pipeline_cpu_us']:.2f}x less, "
          f"all CPU {t['all_cpu_us'] / p['all_cpu_us']:.2f}x less")  # fmt: skip


def _print_ceiling(rows: list[dict[str, Any]], peers: dict[str, Any]) -> dict[str, Any]:
    rates = rate_summary(rows)
    top = rates["median_readings_per_s"]
    shares = ", ".join(f"{PEER_NAMES[p]} {peers[p]['median_readings_per_s'] / top:.0%}" for p in PEER_NAMES)
    target = 1.5 * peers["telegraf"]["median_readings_per_s"]
    print(f"  {CEILING} (the same load to mosquitto_sub -q 1, which only acknowledges): {top:,.0f} readings/s "
          f"({rates['min']:,.0f}-{rates['max']:,.0f}); CPU us/reading: {_by_process(rows)}")  # fmt: skip
    print(f"  share of the ceiling: {shares}; 1.5x Telegraf is {target:,.0f} readings/s, "
          f"{'within' if target <= top else 'above'} the ceiling")  # fmt: skip
    return {"runs": rows, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=100_000, help="single-line messages (0: skip)")
    parser.add_argument("--batches", type=int, default=5_000, help="messages of 100 lines (0: skip)")
    parser.add_argument("--fleet-sensors", type=int, default=12_000, help="sensors of the fleet loads (0: skip them)")
    parser.add_argument("--fleet-seconds", type=float, default=60.0, help="event time of the fleet loads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    exe = telegraf_exe()
    env = service_env()
    results: dict[str, Any] = {}
    if args.fleet_sensors:
        results["fleet"] = fleet_loads(env, exe, args.runs, args.fleet_sensors, args.fleet_seconds)
    for load, n, per_message in (("singles", args.messages, 1), ("batches of 100", args.batches, 100)):
        if n == 0:
            continue
        rows: dict[str, list[dict[str, Any]]] = {peer: [] for peer in PEER_NAMES}
        ceiling: list[dict[str, Any]] = []
        for _ in range(args.runs):
            for peer in PEER_NAMES:  # alternating: the machine's drift falls on every peer
                rows[peer].append(run_once(env, exe, peer, n, per_message))
            ceiling.append(run_ceiling(env, n, per_message))
        results[load] = {peer: {"runs": r, **summary(r)} for peer, r in rows.items()}
        print(f"{load}: {n * per_message:,} readings, {args.runs} alternating runs each (medians, ranges)")
        for peer, s in results[load].items():
            print(f"  {PEER_NAMES[peer]:24} {s['median_readings_per_s']:>10,.0f} readings/s "
                  f"({s['min']:,.0f}-{s['max']:,.0f}); CPU us/reading: pipeline {s['pipeline_cpu_us']:.1f}, "
                  f"all processes {s['all_cpu_us']:.1f}; "
                  f"stored = published: {s['stored_equals_published']}")  # fmt: skip
        for peer in PORTPULSE_PEERS:
            _print_ratio(peer, results[load]["telegraf"], results[load][peer])
        results[load][CEILING] = _print_ceiling(ceiling, results[load])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
