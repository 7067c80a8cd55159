"""End-to-end benchmark: MQTT publish -> bridge -> Kafka -> processor -> InfluxDB, all on this machine.

    .venv/bin/python -m benchmarks.bench_pipeline [--messages 150000] [--batch-messages 10000]
                                                  [--latency-sensors 1000] [--latency-load 0.8]
                                                  [--topology run|split] [--json FILE]

``--topology run`` (default): ``portpulse run`` as its own process (bridge + processor + sink on
one event loop). ``--topology split``: ``portpulse bridge`` and ``portpulse process`` as two
processes on the same machine (the scaling-out deployment of the README), counters summed over
both. For single-reading messages and for gateway batches of 100 readings it measures:

* throughput: N messages published at QoS 1 as fast as the broker takes them; readings/s from
  the first publish until the pipeline has processed all of them and its sink queue is empty
  (then the raw point count in InfluxDB is checked: every reading stored exactly once);
* saturation: the highest rate the pipeline *sustains* (15 s of live load from the latency
  run's sensors, 1000 when that is 0; at most 1 s of it not yet queryable in InfluxDB when the
  publisher is done), searched down from the throughput (a burst drained) in steps of 15 %;
* latency: at ``--latency-load`` (0.8) of the saturation rate (from ``--latency-sensors`` sensors, 1000 as
  in the throughput run; every sensor reports once before the clock starts, stamped an hour back, since a running
  port's series exist in InfluxDB already), probe readings with unique sensor ids are published every 0.25 s and
  InfluxDB is polled (InfluxQL, every 20 ms) until each is queryable; p50/p99 of publish ->
  queryable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import CpuBudget, delete_topics, free_port, publish, service_env, stop_process


class Influx:
    """InfluxDB 1.8's InfluxQL endpoint for a throwaway database."""

    def __init__(self, env: dict[str, str], db: str) -> None:
        self.url = env["PORTPULSE_INFLUX__URL"]
        user, _, password = env.get("PORTPULSE_INFLUX__TOKEN", "").partition(":")
        self.auth = {"u": user, "p": password} if user else {}
        self.db = db

    def query(self, q: str) -> dict[str, Any]:
        params = urllib.parse.urlencode({"db": self.db, "q": q, **self.auth})
        req = urllib.request.Request(f"{self.url}/query?{params}", method="POST")  # noqa: S310 (loopback http)
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (loopback)
            result: dict[str, Any] = json.loads(r.read())
        return result

    def drop_leftovers(self) -> list[str]:
        """Drop the databases earlier benchmark runs left behind (a run stopped before its own
        drop): InfluxDB would load and compact them during the next runs. Returns their names."""
        found = self.query("SHOW DATABASES")["results"][0].get("series") or [{"values": []}]
        stale = [name for (name,) in found[0]["values"] if re.fullmatch(r"bench[0-9a-f]{8}", name) and name != self.db]
        for name in stale:
            self.query(f'DROP DATABASE "{name}"')
        return stale

    def count(self, measurement: str, field: str) -> int:
        q = f'SELECT count("{field}") FROM "{measurement}"'  # noqa: S608 (our own names)
        series = self.query(q)["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0


PROCESSOR_ARGS = ["--windows", "10s,1m", "--lateness", "2", "--idle-timeout", "5"]
#: How PortPulse is deployed on the machine: one ``portpulse run``, or ``portpulse bridge`` and
#: ``portpulse process`` as two processes (each its own core's worth of Python).
TOPOLOGIES = {
    "run": [["run", *PROCESSOR_ARGS]],
    "split": [["bridge"], ["process", *PROCESSOR_ARGS]],
}


class Pipeline:
    """PortPulse in its own process(es) with this run's prefixes, database and ops ports."""

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        topology: str = "run",
        settings: dict[str, str] | None = None,
        processor_args: list[str] | None = None,
    ) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.name = name
        self.env = env
        self.influx = Influx(env, self.prefix)
        self.influx.query(f'CREATE DATABASE "{self.prefix}"')
        base_env = {
            **os.environ, **env,
            "PORTPULSE_MQTT__CLIENT_ID": f"{self.prefix}-bridge",
            "PORTPULSE_MQTT__TOPIC_PREFIX": self.prefix,
            "PORTPULSE_MQTT__SUBSCRIPTIONS": json.dumps([f"{self.prefix}/#"]),
            "PORTPULSE_KAFKA__TOPIC_PREFIX": self.prefix,
            "PORTPULSE_KAFKA__CONSUMER_GROUP": f"{self.prefix}-g",
            "PORTPULSE_INFLUX__BUCKET": f"{self.prefix}/autogen",
            "PORTPULSE_RETENTION__TIERS": "false",  # InfluxQL counts read the default policy
            "PORTPULSE_RETENTION__RAW_S": "-1",
            "PORTPULSE_OPS__LOG_LEVEL": "WARNING",
            "PORTPULSE_SINK__FLUSH_INTERVAL_MS": "100",
            # The whole load comes from one site: its rate ceiling is raised out of the way (the
            # token bucket still runs, so its cost is in the figures), and so are the new-series
            # budgets (0: none), which a fleet of 1 000 sensors plus a warm-up one would exceed
            # (bench_bridge measures the gate).
            "PORTPULSE_ADMISSION__SITE_RATE_PER_S": "1e9",
            **{f"PORTPULSE_ADMISSION__{k}": "0" for k in
               ("SITE_NEW_PER_HOUR", "SITE_NEW_PER_DAY", "DOMAIN_NEW_PER_HOUR", "DOMAIN_NEW_PER_DAY")},
            **(settings or {}),
        }  # fmt: skip
        self.log = open(Path(tempfile.gettempdir()) / f"{self.prefix}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.ops: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        # ``processor_args`` replace the processor's arguments (``run`` or ``process``), not the bridge's.
        commands = [[args[0], *(processor_args if processor_args is not None and args[0] != "bridge" else args[1:])]
                    for args in TOPOLOGIES[topology]]  # fmt: skip
        for args in commands:
            port = free_port()
            self.ops.append(port)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "portpulse", *args],
                    env={**base_env, "PORTPULSE_OPS__METRICS_PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                    stderr=self.log,
                )
            )
        self.wait(lambda: all(self.http(port, "/readyz")[0] == 200 for port in self.ops), 120, "ready")

    @staticmethod
    def http(port: int, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except OSError:
            return 0, b""

    def totals(self) -> dict[str, float]:
        """Counters summed over the processes (each counts only its own stage), read now; {} if one
        is silent. (``/api/state``'s totals are sampled once a second: too coarse to time runs.)"""
        out: dict[str, float] = {}
        for port in self.ops:
            status, body = self.http(port, "/api/totals")
            if status != 200:
                return {}
            for key, value in json.loads(body).items():
                out[key] = out.get(key, 0.0) + value
        return out

    def wait(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SystemExit(f"{proc.args!r} exited ({proc.returncode}); see {self.log.name}")
            if condition():
                return
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: not {what} within {timeout_s:.0f}s; see {self.log.name}")

    def rss_mb(self) -> float:
        """Resident memory of all the processes together (MB)."""
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def stop(self) -> None:
        for proc in self.procs:  # one SIGTERM each: a second one stops PortPulse without draining
            stop_process(proc)
        self.log.close()
        self.influx.query(f'DROP DATABASE "{self.prefix}"')
        delete_topics(self.env, self.prefix)


def payloads(
    prefix: str,
    n: int,
    batch: int,
    t0_ms: int,
    sensors: int = 1000,
    step_ms: int = 1000,
    site: str = "quai",
    ids: str = "no2",
) -> list[tuple[str, bytes]]:
    """``n`` messages of ``batch`` plausible NO2 readings of ``site``: ``sensors`` sensors (ids
    ``{ids}-0000`` ...) reporting once per ``step_ms`` of event time, values moving at most
    2 ug/m3 per second (so cleaning keeps them all), as single JSON readings or gateway batches."""
    drift = 0.5 * min(1.0, step_ms / 1000)
    readings = [
        (f"{ids}-{i % sensors:04d}", t0_ms + (i // sensors) * step_ms, 40.0 + ((i // sensors) % 5) * drift)
        for i in range(n * batch)
    ]
    if batch == 1:
        return [
            (f"{prefix}/air/{site}/{sid}", b'{"ts":%d,"metrics":{"no2":%r}}' % (ts, value))
            for sid, ts, value in readings
        ]
    out = []
    for m in range(n):
        chunk = readings[m * batch : (m + 1) * batch]
        body = {"readings": [{"sensor_id": sid, "ts": ts, "metrics": {"no2": v}} for sid, ts, v in chunk]}
        out.append((f"{prefix}/air/{site}", json.dumps(body).encode()))
    return out


def throughput(env: dict[str, str], n: int, batch: int, topology: str) -> dict[str, Any]:
    run = Pipeline(env, f"throughput batch={batch}", topology)
    try:
        readings = n * batch
        t0_ms = int(time.time() * 1000) - (n * batch // 1000 + 120) * 1000  # event time ends about now
        messages = payloads(run.prefix, n, batch, t0_ms)
        host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
        warm_up(run, host, port, t0_ms)
        samples: list[tuple[float, float]] = []  # (seconds since start, readings processed)
        sampling = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:  # throughput over time, while publishing and until drained
            while not sampling.is_set():
                samples.append((time.monotonic() - t0, run.totals().get("processed", 0.0)))
                sampling.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        budget = CpuBudget(
            {f"portpulse {args[0]}": proc.pid for args, proc in zip(TOPOLOGIES[topology], run.procs, strict=True)}
            | {"benchmark (publisher)": os.getpid()}
        )
        budget.start()
        sampler.start()
        publish_s = publish(host, port, messages, qos=1)
        peak_rss = 0.0

        def drained() -> bool:
            nonlocal peak_rss
            peak_rss = max(peak_rss, run.rss_mb())
            return caught_up(run, readings + 1)

        try:
            run.wait(drained, 600, "drained")
        except SystemExit:
            print(f"totals at timeout: {run.totals()}", file=sys.stderr)
            raise
        finally:
            sampling.set()
            sampler.join(10)
        elapsed = time.monotonic() - t0
        cpu = budget.stop()
        totals = run.totals()
        stored = 0
        for _ in range(100):  # the last batch may still be in its HTTP request
            stored = run.influx.count("air", "no2") - 1  # the warm-up reading
            if stored >= readings:
                break
            time.sleep(0.2)
        return {
            "messages": n, "readings": readings, "publish_s": publish_s, "elapsed_s": elapsed,
            "readings_per_s": readings / elapsed, "messages_per_s": n / elapsed, "stored": stored,
            "peak_rss_mb": peak_rss, "processed_over_time": samples,
            "late": totals.get("late", 0.0), "rejected": totals.get("rejected", 0.0), "cpu_s": cpu,
        }  # fmt: skip
    finally:
        run.stop()


def warm_up(run: Pipeline, host: str, port: int, ts_ms: int) -> None:
    """Topics created, partitions assigned, first write done: what a running pipeline has.
    ``ts_ms`` no later than the load's first event time, or the load would be late behind it."""
    body = json.dumps({"ts": ts_ms, "metrics": {"no2": 40.0}}).encode()
    publish(host, port, [(f"{run.prefix}/air/quai/warm-up", body)], qos=1)
    run.wait(lambda: run.influx.count("air", "no2") >= 1, 120, "warmed up")


#: How long before the load the roster's readings are stamped (ms).
ROSTER_AHEAD_MS = 3_600_000


def roster(run: Pipeline, host: str, port: int, sensors: int, batch: int) -> float:
    """Warm ``run`` up, then every sensor once before the clock starts: a running port's series
    exist in InfluxDB already, and creating tens of thousands of new series (about 10 k/s here)
    would otherwise be what is measured. Returns the roster's time (s), reported apart.

    The roster is stamped an hour back: a running port's sensors report without pause, whereas
    here they pause between the roster and the load for longer than the idle timeout, and a load
    resuming inside the windows that pause closed would measure sensors coming back after an
    outage (a window opened again once per series), not the steady state."""
    warm_up(run, host, port, int(time.time() * 1000) - ROSTER_AHEAD_MS)
    started = time.monotonic()
    messages = payloads(run.prefix, -(-sensors // batch), batch, int(time.time() * 1000) - ROSTER_AHEAD_MS,
                        sensors=sensors)  # fmt: skip
    publish(host, port, messages, 1)
    stored = len(messages) * batch + 1  # and the warm-up reading
    run.wait(lambda: run.influx.count("air", "no2") >= stored, 600, f"{stored} roster readings stored")
    return time.monotonic() - started


def live_payloads(prefix: str, n: int, batch: int, sensors: int, rate_msgs: float) -> list[tuple[str, bytes]]:
    """:func:`payloads` to publish at ``rate_msgs`` messages/s (each of ``sensors`` sensors
    reporting at the pace that gives), whose event time starts when they are returned, like live
    gateways: stamped from a moment far enough ahead to build them, then waited for. (Stamped
    "now" and published seconds later, a load runs behind the wall clock and the processor sends
    much of it to the late topic.)"""
    step_ms = max(1, round(1000 * sensors / (rate_msgs * batch)))
    sample_s = time.monotonic()
    payloads(prefix, max(1, n // 50), batch, 0, sensors=sensors, step_ms=step_ms)
    start_ms = int(time.time() * 1000) + int(1000 * (1.0 + 1.5 * 50 * (time.monotonic() - sample_s)))
    load = payloads(prefix, n, batch, start_ms, sensors=sensors, step_ms=step_ms)
    time.sleep(max(0.0, start_ms / 1000 - time.time()))
    return load


def caught_up(run: Pipeline, processed: float) -> bool:
    """``run`` has processed ``processed`` readings in all and written everything it holds."""
    t = run.totals()
    return t.get("processed", 0) >= processed and t.get("sink_queue", 1) == 0 and t.get("in_flight", 1) == 0


#: How long a rate must be kept up to count as sustained (s).
SATURATION_S = 15.0


def sustained_rate(
    env: dict[str, str], burst_msgs: float, batch: int, topology: str, sensors: int, tries: int = 6
) -> dict[str, Any]:
    """The saturation rate: the highest message rate the pipeline keeps up with for
    :data:`SATURATION_S` of live load (event time keeping pace with the wall clock, ``sensors``
    sensors whose series exist), searched downwards from the burst-drain rate ``burst_msgs`` in steps of 15 %. Keeping
    up: when the publisher has sent the load, at most one second of it is not queryable in
    InfluxDB yet."""
    run = Pipeline(env, f"saturation batch={batch}", topology)
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    try:
        roster(run, host, port, sensors, batch)
        steps: list[dict[str, float]] = []
        rate = burst_msgs
        for _ in range(tries):
            n = max(1, int(rate * SATURATION_S))
            load = live_payloads(run.prefix, n, batch, sensors, rate)
            before, stored_before = run.totals().get("processed", 0.0), run.influx.count("air", "no2")
            publish_s = publish(host, port, load, 1, rate)
            # Behind: readings not queryable yet (a processor keeping up in front of a sink that
            # does not is not keeping up).
            behind = n * batch - (run.influx.count("air", "no2") - stored_before)
            steps.append({"rate_msgs_per_s": rate, "published_msgs_per_s": n / publish_s,
                          "behind_readings": behind, "behind_s": behind / (rate * batch)})  # fmt: skip
            run.wait(lambda: caught_up(run, before + n * batch), 600, "caught up")  # noqa: B023
            if behind <= rate * batch:
                # A publisher slower than asked gave the pipeline more time: what it kept up with
                # is the rate actually published.
                kept_up = min(rate, n / publish_s)
                return {"rate_msgs_per_s": kept_up, "readings_per_s": kept_up * batch, "steps": steps}
            rate *= 0.85
        return {"rate_msgs_per_s": None, "readings_per_s": None, "steps": steps}
    finally:
        run.stop()


def latency(
    env: dict[str, str], rate_msgs: float, batch: int, seconds: float, topology: str, sensors: int = 0
) -> dict[str, Any]:
    """Background load at ``rate_msgs`` messages/s from ``sensors`` sensors (0: one per reading
    per second) plus probes; publish -> queryable in InfluxDB."""
    run = Pipeline(env, f"latency batch={batch}", topology)
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    try:
        n = int(rate_msgs * seconds)
        # Live event time, like real gateways: the load's timestamps keep pace with the wall clock
        # and the probes' (stamped "now"), so nothing is late and windows close as they would.
        sensors = sensors or max(1, int(rate_msgs * batch))
        roster_s = roster(run, host, port, sensors, batch)
        load = live_payloads(run.prefix, n, batch, sensors, rate_msgs)
        late_before = run.totals().get("late", 0.0)
        loader = threading.Thread(target=publish, args=(host, port, load, 1, rate_msgs), daemon=True)
        sent: dict[str, float] = {}
        seen: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set() or len(seen) < len(sent):
                pending = [p for p in sent if p not in seen]
                if pending:
                    res = run.influx.query(
                        'SELECT last("no2") FROM "air" WHERE sensor_id =~ /^probe-/ GROUP BY sensor_id'
                    )["results"][0]
                    now = time.monotonic()
                    for s in res.get("series", []):
                        sid = s["tags"]["sensor_id"]
                        if sid in sent and sid not in seen:
                            seen[sid] = now
                if stop.is_set() and time.monotonic() > stop_at + 60:
                    return
                time.sleep(0.02)

        stop_at = float("inf")
        poller = threading.Thread(target=poll, daemon=True)
        loader.start()
        poller.start()
        probe = 0
        t_end = time.monotonic() + seconds
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{run.prefix}-probe", protocol=paho.MQTTv5)
        client.connect(host, port)
        client.loop_start()
        while time.monotonic() < t_end:
            sid = f"probe-{probe:05d}"
            body = json.dumps({"ts": int(time.time() * 1000), "metrics": {"no2": 40.0}}).encode()
            sent[sid] = time.monotonic()
            client.publish(f"{run.prefix}/air/quai/{sid}", body, qos=1).wait_for_publish(30)
            probe += 1
            time.sleep(0.25)
        client.disconnect()
        client.loop_stop()
        stop_at = time.monotonic()
        stop.set()
        loader.join(120)
        poller.join(120)
        # A probe never seen (within a minute of the last one sent) counts as infinitely late.
        lat = sorted(seen[s] - sent[s] for s in seen) + [math.inf] * (len(sent) - len(seen))
        first = min(sent.values(), default=0.0)
        over_time = sorted((sent[s] - first, seen[s] - sent[s]) for s in seen)
        if not seen:
            return {"probes": len(sent), "seen": 0}
        return {
            "probes": len(sent), "seen": len(seen), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "max_ms": 1000 * lat[-1],
            "load_msgs_per_s": rate_msgs, "load_readings_per_s": rate_msgs * batch, "latency_over_time": over_time,
            "sensors": sensors, "roster_s": roster_s, "late": run.totals().get("late", 0.0) - late_before,
        }  # fmt: skip
    finally:
        run.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=150_000, help="single-reading messages")
    parser.add_argument("--batch-messages", type=int, default=10_000, help="gateway batches of 100 readings")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument(
        "--latency-sensors",
        type=int,
        default=1000,
        help="sensors behind the latency run's load, as in the throughput run (0: one per reading per second)",
    )
    parser.add_argument(
        "--latency-load", type=float, default=0.8, help="the latency run's load, a fraction of the throughput"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--topology", choices=sorted(TOPOLOGIES), default="run",
        help="run: one `portpulse run`; split: `portpulse bridge` + `portpulse process`",
    )  # fmt: skip
    args = parser.parse_args()
    env = service_env()
    results: dict[str, Any] = {}
    for name, n, batch, target in (
        ("single", args.messages, 1, 20_000), ("batch100", args.batch_messages, 100, 200_000)
    ):  # fmt: skip
        t = throughput(env, n, batch, args.topology)
        print(
            f"{name:9} throughput: {t['readings_per_s']:>9,.0f} readings/s ({t['messages_per_s']:,.0f} msg/s), "
            f"target {target:,}: {t['readings_per_s'] / target:.2f}x; stored {t['stored']:,}/{t['readings']:,}; "
            f"peak RSS {t['peak_rss_mb']:.0f} MB; late {t['late']:.0f}, rejected {t['rejected']:.0f}",
            flush=True,
        )
        cpu, seconds = t["cpu_s"], t["elapsed_s"]
        print(
            f"{'':9} CPU per reading: "
            + ", ".join(f"{who} {1e6 * used / t['readings']:.2f} us" for who, used in cpu.items())
            + f"; all together {sum(cpu.values()) / seconds:.2f} of {os.cpu_count()} cores busy",
            flush=True,
        )
        sensors = args.latency_sensors or 1000
        sat = sustained_rate(env, t["messages_per_s"], batch, args.topology, sensors)
        steps = "; ".join(
            f"{st['rate_msgs_per_s'] * batch:,.0f}/s asked, {st['published_msgs_per_s'] * batch:,.0f}/s published: "
            f"{st['behind_s']:.1f} s behind"
            for st in sat["steps"]
        )
        print(f"{name:9} saturation (sustained {SATURATION_S:.0f} s, at most 1 s behind): "
              f"{sat['readings_per_s'] or 0:,.0f} readings/s ({steps})", flush=True)  # fmt: skip
        base = sat["rate_msgs_per_s"] or min(st["rate_msgs_per_s"] for st in sat["steps"])
        rate = max(1.0, args.latency_load * base)
        lat = latency(env, rate, batch, args.latency_seconds, args.topology, args.latency_sensors)
        print(
            f"{name:9} latency at {lat.get('load_readings_per_s', 0):,.0f} readings/s: "
            f"p50 {lat.get('p50_ms', float('nan')):.0f} ms, p99 {lat.get('p99_ms', float('nan')):.0f} ms, "
            f"max {lat.get('max_ms', float('nan')):.0f} ms ({lat['seen']}/{lat['probes']} probes; "
            f"{lat.get('sensors', 0):,} sensors; their series created first in "
            f"{lat.get('roster_s', float('nan')):.1f} s; late {lat.get('late', float('nan')):,.0f})",
            flush=True,
        )
        results[name] = {
            "throughput": t, "saturation": sat, "latency": lat, "target_readings_per_s": target,
            "topology": args.topology,
        }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
