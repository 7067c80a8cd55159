"""PortPulse's processor next to Quix Streams on the same Kafka topic and data.

    .venv/bin/python -m benchmarks.bench_quix [--readings 300000] [--sensors 10000]

The data: ``--readings`` single-reading records (the bridge's case for single-reading MQTT
messages: key = sensor id, one NO2 reading per record, one reading per second per sensor), in
two 4-partition topics holding the same readings: PortPulse's compact wire encoding for
PortPulse, and JSON (``{"sensor_id", "site", "metric", "ts_ms", "value"}``) for Quix Streams,
which reads it through its own ``json`` deserializer, as its users would. Each side runs in its
own process with its own consumer group and computes the 1-minute tumbling count/mean/min/max
per sensor; PortPulse also cleans (range, duplicates, Hampel, rate of change) on the way, Quix
does not. The figure is readings per second of wall time from the consumer's start until the
last reading is processed; the ratio is PortPulse / Quix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_processor import consume_all, produce

ROOT = Path(__file__).resolve().parents[1]


def portpulse_side(bootstrap: str, prefix: str, n: int) -> dict[str, float]:
    return asyncio.run(consume_all(bootstrap, prefix, n))


def quix_side(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    """Quix Streams 3.x: same topic, same aggregation, its idiomatic API (its own process)."""
    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Max, Mean, Min

    state = {"readings": 0, "windows": 0, "started": 0.0, "finished": 0.0}
    with tempfile.TemporaryDirectory() as state_dir:
        app = Application(
            broker_address=bootstrap, consumer_group=f"quix-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
            state_dir=state_dir, use_changelog_topics=False, loglevel="WARNING",
        )  # fmt: skip
        source = app.topic(
            topic,
            value_deserializer="json",
            timestamp_extractor=lambda value, _headers, _ts, _type: value["ts_ms"],
        )
        sdf = app.dataframe(source)

        def count_in(_value: Any) -> None:
            state["readings"] += 1
            if state["readings"] >= n:
                state["finished"] = time.monotonic()
                app.stop()

        def count_window(_value: Any) -> None:
            state["windows"] += 1

        sdf.update(count_in)
        windows = sdf.tumbling_window(duration_ms=60_000).agg(
            count=Count(), mean=Mean("value"), min=Min("value"), max=Max("value")
        )
        windows.final().update(count_window)
        state["started"] = time.monotonic()
        app.run()
    elapsed = (state["finished"] or time.monotonic()) - state["started"]
    return {"readings": state["readings"], "elapsed_s": elapsed, "readings_per_s": state["readings"] / elapsed,
            "windows": state["windows"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=300_000)
    parser.add_argument("--sensors", type=int, default=1_000)
    parser.add_argument("--side", choices=("portpulse", "quix"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    bootstrap = os.environ.get("PORTPULSE_KAFKA__BOOTSTRAP_SERVERS", "")
    if args.side:  # one side, in its own process; prints its figures as JSON
        if args.side == "portpulse":
            result = portpulse_side(bootstrap, args.prefix, args.readings)
        else:
            result = quix_side(bootstrap, f"{args.prefix}.json.air", args.readings)
        print(json.dumps(result))
        return
    if not bootstrap:
        subprocess.run([str(ROOT / "scripts" / "services"), "up", "kafka"], check=True)
        bootstrap = "127.0.0.1:19092"
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    asyncio.run(produce(bootstrap, f"{prefix}.readings.air", args.readings, 1, args.sensors,
                        json_topic=f"{prefix}.json.air"))  # fmt: skip
    results = {}
    for name in ("portpulse", "quix"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_quix", "--side", name, "--prefix", prefix,
             "--readings", str(args.readings)],
            env={**os.environ, "PORTPULSE_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "PYTHONWARNINGS": "ignore"},
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, quix = results["portpulse"], results["quix"]
    ratio = ours["readings_per_s"] / quix["readings_per_s"]
    print("\n| same readings (ours: wire format; Quix: JSON), 1-minute tumbling count/mean/min/max per sensor "
          "| readings | windows | readings/s |")  # fmt: skip
    print("|---|---:|---:|---:|")
    print(f"| PortPulse processor (+ cleaning) | {ours['readings']:,} | {ours['windows']:,} | "
          f"{ours['readings_per_s']:,.0f} |")  # fmt: skip
    print(f"| Quix Streams {_quix_version()} | {quix['readings']:,} | {quix['windows']:,} | "
          f"{quix['readings_per_s']:,.0f} |")  # fmt: skip
    print(f"\nratio PortPulse / Quix Streams: {ratio:.1f}x (target >= 10x)")
    if args.json:
        args.json.write_text(json.dumps({**results, "ratio": ratio}, indent=2))


def _quix_version() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import quixstreams; print(quixstreams.__version__)"],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    return out.stdout.strip()


if __name__ == "__main__":
    main()
