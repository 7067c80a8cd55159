"""``make bench``: every benchmark against the real services, one Markdown report and a plot.

    .venv/bin/python -m benchmarks.report [--out benchmarks/results] [--quick]

Runs the stage benchmarks (sink, bridge, simulator, processor kernels and end to end), the
side-by-side run against Quix Streams, and the end-to-end pipeline benchmark; writes
``REPORT.md`` (figures, machine, versions; each benchmark's own tables verbatim) and
``pipeline.png`` (end-to-end throughput and publish -> queryable latency over time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    versions = {name: _version(name) for name in ("numpy", "aiokafka", "paho-mqtt", "influxdb-client", "quixstreams")}
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem_kb / 1024 / 1024:.1f} GiB; {platform.platform()}",
        f"- Python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- services (scripts/services, all on this machine): Apache Kafka 4.1.1 (KRaft), InfluxDB 1.8.10, "
        f"Mosquitto {_mosquitto_version()}",
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split()[-1] if first else "?"


def run(title: str, args: list[str], timeout_s: float) -> tuple[str, float]:
    """One benchmark module as a child process; its stdout (tables) and wall time."""
    print(f"[bench] {title} ...", flush=True)
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        text = (
            out.stdout if out.returncode == 0 else f"FAILED (exit {out.returncode})\n{out.stdout}\n{out.stderr[-3000:]}"
        )
    except subprocess.TimeoutExpired:
        text = f"TIMED OUT after {timeout_s:.0f}s"
    elapsed = time.monotonic() - t0
    print(f"[bench] {title}: {elapsed:.0f}s", flush=True)
    return "\n".join(line for line in text.splitlines() if not line.startswith("[services]")), elapsed


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for col, name in enumerate(("single", "batch100")):
        if name not in results:
            continue
        samples = results[name]["throughput"].get("processed_over_time", [])
        ax = axes[0][col]
        if len(samples) > 1:
            t = [s[0] for s in samples]
            rate = [0.0] + [(b[1] - a[1]) / max(b[0] - a[0], 1e-6) for a, b in itertools.pairwise(samples)]
            ax.plot(t, rate, color="#2b8a3e")
        ax.set_title(f"{name}: readings processed per second (saturation)")
        ax.set_xlabel("s since first publish")
        ax = axes[1][col]
        points = results[name]["latency"].get("latency_over_time", [])
        if points:
            ax.plot([p[0] for p in points], [1000 * p[1] for p in points], "o-", color="#1c7ed6", markersize=3)
        load = results[name]["latency"].get("load_readings_per_s", 0)
        ax.set_title(f"{name}: publish -> queryable in InfluxDB at {load:,.0f} readings/s")
        ax.set_xlabel("s since first probe")
        ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 5 minutes)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    pipeline_json = args.out / "pipeline.json"
    split_json = args.out / "pipeline-split.json"
    quix_json = args.out / "quix.json"
    sections = [
        ("InfluxDB sink: encoding and sustained writes (#5)",
         ["benchmarks.bench_sink", "--points", "300000" if q else "1000000", "--seconds", "8" if q else "20"], 600),
        ("MQTT -> Kafka bridge (#3)",
         ["benchmarks.bench_bridge", "--messages", "50000" if q else "200000", "--outage-seconds",
          "15" if q else "60"], 900),
        ("The bridge on every broker of the interop matrix (#17)",
         ["benchmarks.bench_interop", "--messages", "20000" if q else "100000"], 900),
        ("Fair share: one site flooding at 10x beside calm sites (#22)",
         ["benchmarks.bench_fair_share", "--seconds", "15" if q else "30"], 900),
        ("Simulators (#6)", ["benchmarks.bench_simulator", "--seconds", "10" if q else "30"], 300),
        ("Processor: kernels and Kafka -> sink interface (#4)",
         # A million readings per case: shorter runs are dominated by the consumer group join.
         ["benchmarks.bench_processor", "--readings", "500000" if q else "1000000", "--e2e-readings",
          "200000" if q else "1000000"], 900),
        ("Processor next to Quix Streams, same readings, each in its native format (#4, #8, #18)",
         ["benchmarks.bench_quix", "--readings", "150000" if q else "300000", "--json", str(quix_json)], 900),
        ("Event time per series: memory, correction latency, a backlog's cost (#16)",
         ["benchmarks.bench_corrections", "--series", "30000" if q else "100000", "--probes", "20" if q else "40",
          "--backlog-s", "600" if q else "3600"], 1500),
        ("PortPulse beside Telegraf 1.37.2, same loads, same services; the simulated fleets (#18)",
         ["benchmarks.bench_telegraf", "--runs", "1" if q else "3", "--messages", "30000" if q else "100000",
          "--batches", "1500" if q else "5000", "--fleet-sensors", "6000" if q else "12000", "--fleet-seconds",
          "30" if q else "60"], 3600),
        ("Sparkplug B: decoding beside JSON gateway batches and upb; a crane fleet end to end (#19)",
         ["benchmarks.bench_sparkplug", "--reports", "120" if q else "600"], 900),
        ("End to end: MQTT -> bridge -> Kafka -> processor -> InfluxDB (#7)",
         ["benchmarks.bench_pipeline", "--messages", "15000" if q else "40000", "--batch-messages",
          "1000" if q else "3000", "--latency-seconds", "10" if q else "20", "--json", str(pipeline_json)], 1500),
        ("End to end, bridge and processor as two processes (#7)",
         ["benchmarks.bench_pipeline", "--topology", "split", "--messages", "15000" if q else "40000",
          "--batch-messages", "1000" if q else "3000", "--latency-seconds", "10" if q else "20", "--json",
          str(split_json)], 1500),
    ]  # fmt: skip
    body = []
    for title, module_args, timeout_s in sections:
        text, elapsed = run(title, module_args, timeout_s)
        body += [f"## {title}", "", f"`python -m {' '.join(module_args)}` ({elapsed:.0f} s)", "", text.strip(), ""]
    summary = ["| figure | measured | target |", "|---|---:|---:|"]
    if quix_json.is_file():
        quix = json.loads(quix_json.read_text())
        summary.append(
            f"| processor vs Quix Streams (Quix reads the readings as JSON) | {quix['ratio']:.1f}x | >= 10x |"
        )
    pictured = False
    for path, deployment in ((pipeline_json, "portpulse run"), (split_json, "bridge + process")):
        if not path.is_file():
            continue
        pipe = json.loads(path.read_text())
        for name, label, target in (
            ("single", "single-reading messages", 20_000),
            ("batch100", "batches of 100", 200_000),
        ):
            t, lat = pipe[name]["throughput"], pipe[name]["latency"]
            summary.append(
                f"| end to end ({deployment}), {label}: readings/s | {t['readings_per_s']:,.0f} | >= {target:,} |"
            )
            sustained = pipe[name].get("saturation", {}).get("readings_per_s")
            summary.append(
                f"| end to end ({deployment}), {label}: saturation (the rate sustained 15 s) | "
                f"{f'{sustained:,.0f}' if sustained else 'none of the rates tried'} | - |"
            )
            summary.append(
                f"| end to end ({deployment}), {label}: p50 / p99 publish -> queryable at "
                f"{lat.get('load_readings_per_s', 0):,.0f}/s | {lat.get('p50_ms', float('nan')):.0f} / "
                f"{lat.get('p99_ms', float('nan')):.0f} ms | p99 < 1000 ms |"
            )
        if path == pipeline_json:
            pictured = plot(pipe, args.out / "pipeline.png")
    report = [
        "# PortPulse benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench`.",
        "",
        *machine(),
        "",
        "Everything (Kafka, InfluxDB, Mosquitto, the pipeline and the load generators) shares this machine.",
        "",
        *summary,
        "",
        *(["![end-to-end throughput and latency](pipeline.png)", ""] if pictured else []),
        *body,
    ]
    (args.out / "REPORT.md").write_text("\n".join(report) + "\n")
    print(f"[bench] wrote {args.out / 'REPORT.md'}" + (f" and {args.out / 'pipeline.png'}" if pictured else ""))


if __name__ == "__main__":
    main()
