"""Event time per series: what it costs in memory, how fast corrections land, what a backlog costs.

    .venv/bin/python -m benchmarks.bench_corrections [--series 100000] [--probes 40]
                                                     [--backlog-sensors 1000] [--backlog-s 3600] [--json FILE]

* Memory (the engine alone, no network; traced allocations, numpy's included): 100 000 series
  (air sensors' seven metrics) reporting once a second with 10 s, 1 min and 15 min windows: the
  state per series, and per reading kept in an open window; then sensors that come and go (five
  generations of 100 000 new series, each quiet after a minute): memory after each generation.
* Correction latency (``portpulse run`` against the real Mosquitto, Kafka and InfluxDB): 1 000
  sensors report live once a second; every 0.5 s a probe reading 90 s old (its 1-minute window
  emitted long ago, and far behind its series' in-memory history) is published for one of
  them, and InfluxDB is polled (InfluxQL, every 20 ms) until that window's count includes it;
  p50/p99 of publish -> corrected aggregate queryable.
* Backlog: ``--backlog-sensors`` gateways' sensors silent for ``--backlog-s`` seconds deliver
  their buffer (one reading per second each, in batches of 100) to the running pipeline: wall
  time until every reading is stored, readings/s, and ``portpulse run``'s CPU per reading.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import threading
import time
import tracemalloc
from typing import Any

import numpy as np

from benchmarks.bench_pipeline import Pipeline
from benchmarks.common import CpuBudget, publish, service_env
from portpulse.contract.catalogue import load_catalogue
from portpulse.processors.engine import EngineSettings, ProcessorEngine, Readings
from portpulse.processors.window import parse_windows

S = 10**9
AIR = ("no2", "pm25", "pm10", "o3", "so2", "temperature", "humidity")


def _readings(sensors: list[str], ts_ns: int, offset: int) -> Readings:
    n = len(sensors) * len(AIR)
    sensor = np.repeat(np.array(sensors, dtype=object), len(AIR))
    metric = np.tile(np.array(AIR, dtype=object), len(sensors))
    return Readings(
        np.full(n, "air", dtype=object), sensor, np.full(n, "quai", dtype=object), metric,
        np.full(n, ts_ns, dtype=np.int64), 20.0 + (np.arange(n) % 7).astype(np.float64) * 0.5,
        np.arange(n, dtype=np.int64) % 4, offset + np.arange(n, dtype=np.int64),
    )  # fmt: skip


def memory(series: int) -> dict[str, Any]:
    """Traced bytes of an engine holding ``series`` series; per series and per open-window reading."""
    sensors = [f"aq-{i:06d}" for i in range(series // len(AIR))]
    t0 = (time.time_ns() - 3600 * S) // (900 * S) * (900 * S)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    engine = ProcessorEngine(EngineSettings(parse_windows("10s,1m,15m"), 2 * S, 30.0), load_catalogue())
    samples = []
    offset = 0
    for second in range(40):
        r = _readings(sensors, t0 + second * S, offset)
        offset += len(r)
        engine.ingest(r, float(second), frozenset({0, 1, 2, 3}))
        if second in (19, 39):
            gc.collect()
            samples.append((tracemalloc.get_traced_memory()[0] - base, engine.open_rows))
    (mem_a, rows_a), (mem_b, rows_b) = samples
    per_row = (mem_b - mem_a) / max(rows_b - rows_a, 1)  # history is full by then: rows are what grows
    state = mem_b - rows_b * per_row
    churn = []
    settings = EngineSettings(parse_windows("10s,1m,15m"), 2 * S, 5.0, series_ttl_s=60.0)
    engine = ProcessorEngine(settings, load_catalogue())
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for generation in range(5):  # 100 000 new series each, reporting for 20 s, then never again
        names = [f"g{generation}-{i:06d}" for i in range(series // len(AIR))]
        start = t0 + generation * 3600 * S
        for second in range(20):
            engine.ingest(_readings(names, start + second * S, offset), generation * 1000.0 + second,
                          frozenset({0, 1, 2, 3}))  # fmt: skip
            offset += len(names) * len(AIR)
        engine.ingest(_readings([], start, offset), generation * 1000.0 + 990.0, frozenset({0, 1, 2, 3}))
        gc.collect()
        churn.append(round((tracemalloc.get_traced_memory()[0] - base) / 2**20, 1))
    tracemalloc.stop()
    return {
        "series": len(sensors) * len(AIR),
        "state_bytes_per_series": round(state / (len(sensors) * len(AIR))),
        "bytes_per_open_window_reading": round(per_row, 1),
        "open_window_readings": rows_b,
        "total_mb": round(mem_b / 2**20, 1),
        "churn_mb_after_each_generation": churn,
    }


def _live(pipeline: Pipeline, env: dict[str, str], sensors: int, stop: threading.Event) -> None:
    """One reading per sensor per second, stamped now, until ``stop``."""
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    while not stop.is_set():
        began = time.monotonic()
        now_ms = time.time_ns() // 10**6
        body = [{"sensor_id": f"aq-{i:04d}", "ts": now_ms, "metrics": {"no2": 40.0 + (i % 7) * 0.5}}
                for i in range(sensors)]  # fmt: skip
        messages = [(f"{pipeline.prefix}/air/quai", json.dumps({"readings": body[i : i + 100]}).encode())
                    for i in range(0, sensors, 100)]  # fmt: skip
        publish(host, port, messages, 1)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))


def corrections(env: dict[str, str], probes: int, sensors: int = 1000) -> dict[str, Any]:
    pipeline = Pipeline(env, "corrections")
    stop = threading.Event()
    live = threading.Thread(target=_live, args=(pipeline, env, sensors, stop))
    live.start()
    latencies = []
    try:
        time.sleep(100)  # windows emitted, histories full, InfluxDB's series exist
        host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
        for k in range(probes):
            sensor = f"aq-{(k * 37) % sensors:04d}"
            ts_ms = (time.time_ns() // 10**6 - 90_000) // 1000 * 1000 + 500  # between two of its readings
            window_ms = ts_ms // 60_000 * 60_000
            where = f"\"sensor_id\" = '{sensor}' AND time = {window_ms}ms"
            q = f'SELECT "no2_count" FROM "air_1m" WHERE {where}'  # noqa: S608 (our own names)

            def count(q: str = q) -> float:
                series = pipeline.influx.query(q)["results"][0].get("series")
                return float(series[0]["values"][0][1]) if series else 0.0

            before = count()
            payload = json.dumps({"ts": ts_ms, "metrics": {"no2": 40.25}}).encode()
            sent = time.monotonic()
            publish(host, port, [(f"{pipeline.prefix}/air/quai/{sensor}", payload)], 1)
            while time.monotonic() - sent < 30 and count() <= before:
                time.sleep(0.02)
            latencies.append(time.monotonic() - sent)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - sent)))
        totals = pipeline.totals()
    finally:
        stop.set()
        live.join(60)
        pipeline.stop()
    latencies.sort()
    return {
        "probes": len(latencies),
        "p50_ms": round(1000 * statistics.median(latencies)),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]),
        "max_ms": round(1000 * latencies[-1]),
        "timed_out": sum(1 for x in latencies if x >= 30),
        "windows_corrected": totals.get("windows_corrected", 0.0),
    }


def backlog(env: dict[str, str], sensors: int, seconds: int) -> dict[str, Any]:
    """``sensors`` sensors' buffered hour delivered at once into a running ``portpulse run``."""
    pipeline = Pipeline(env, "backlog")
    try:
        t0_ms = (time.time_ns() // 10**6 - (seconds + 60) * 1000) // 1000 * 1000
        warm = [{"sensor_id": f"gw-{i:04d}", "ts": t0_ms - 1000, "metrics": {"no2": 40.0}} for i in range(sensors)]
        host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
        publish(host, port, [(f"{pipeline.prefix}/air/quai", json.dumps({"readings": warm[i : i + 100]}).encode())
                             for i in range(0, sensors, 100)], 1)  # fmt: skip
        pipeline.wait(lambda: pipeline.influx.count("air", "no2") >= sensors, 120, "warm")
        messages = []
        for second in range(seconds):  # what the gateways buffered: each second, every sensor
            body = [{"sensor_id": f"gw-{i:04d}", "ts": t0_ms + second * 1000,
                     "metrics": {"no2": 40.0 + ((second + i) % 11) * 0.25}} for i in range(sensors)]  # fmt: skip
            messages += [(f"{pipeline.prefix}/air/quai", json.dumps({"readings": body[i : i + 100]}).encode())
                         for i in range(0, sensors, 100)]  # fmt: skip
        readings = sensors * seconds
        budget = CpuBudget({"portpulse run": pipeline.procs[0].pid})
        budget.start()
        began = time.monotonic()
        publish(host, port, messages, 1)
        pipeline.wait(lambda: pipeline.totals().get("processed", 0.0) >= readings + sensors, 1800, "drained")
        pipeline.wait(lambda: pipeline.influx.count("air", "no2") >= readings + sensors, 600, "stored")
        elapsed = time.monotonic() - began
        used = budget.stop()
        totals = pipeline.totals()
    finally:
        pipeline.stop()
    return {
        "readings": readings,
        "seconds": round(elapsed, 1),
        "readings_per_s": round(readings / elapsed),
        "portpulse_run_cpu_us_per_reading": round(1e6 * used["portpulse run"] / readings, 2),
        "influx_cpu_us_per_reading": round(1e6 * used.get("influx", 0.0) / readings, 2),
        "windows_corrected": totals.get("windows_corrected", 0.0),
        "late": totals.get("late", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--backlog-sensors", type=int, default=1000)
    parser.add_argument("--backlog-s", type=int, default=3600)
    parser.add_argument("--only", choices=("memory", "corrections", "backlog"), action="append",
                        help="run only these parts (repeatable; default all)")  # fmt: skip
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    parts = args.only or ["memory", "corrections", "backlog"]
    results: dict[str, Any] = {}
    if "memory" in parts:
        results["memory"] = memory(args.series)
        print(json.dumps(results["memory"]), flush=True)
    env = service_env() if {"corrections", "backlog"} & set(parts) else {}
    if "corrections" in parts:
        results["corrections"] = corrections(env, args.probes)
        print(json.dumps(results["corrections"]), flush=True)
    if "backlog" in parts:
        results["backlog"] = backlog(env, args.backlog_sensors, args.backlog_s)
        print(json.dumps(results["backlog"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
