"""Sink benchmarks: line-protocol encoding per core, and sustained writes into the real InfluxDB.

    .venv/bin/python -m benchmarks.bench_sink [--points 2000000] [--seconds 30]

Uses the InfluxDB from PORTPULSE_INFLUX__* or the local one from scripts/services. Prints a table
and the ratio to the targets (encode >= 2 M points/s per core, write >= 300 k points/s), and, side
by side, influxdb-client's own Point serialisation as the peer figure for encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import urllib.parse
import urllib.request
import uuid

import numpy as np

from portpulse.contract.deadletter import MemoryDeadLetters
from portpulse.contract.settings import InfluxSettings, SinkSettings
from portpulse.sinks import Categorical, InfluxWriter, PointColumns, encode_lines

ENCODE_TARGET, WRITE_TARGET = 2_000_000, 300_000


def fleet(n: int, sensors: int = 10_000, seed: int = 1, t0: int = 1_764_000_000_000_000_000) -> PointColumns:
    """n air readings from ``sensors`` sensors at 20 sites, 2 decimals, 1 ms apart."""
    rng = np.random.default_rng(seed)
    names = np.array([f"no2-{i:05d}" for i in range(sensors)], dtype=object)
    sites = np.array([f"quai-{i % 20:02d}" for i in range(sensors)], dtype=object)
    idx = rng.integers(0, sensors, n)
    return PointColumns(
        "air",
        {"sensor_id": Categorical(idx, names), "site": Categorical(idx, sites)},
        {"no2": rng.normal(45, 12, n).round(2)},
        t0 + np.arange(n, dtype=np.int64) * 1_000_000,
    )


def bench_encode(n: int) -> tuple[float, float, float]:
    points = fleet(n)
    plain_tags = {k: v.categories[v.codes] for k, v in points.tags.items() if isinstance(v, Categorical)}
    plain = PointColumns("air", plain_tags, points.fields, points.ts_ns)
    encode_lines(fleet(10_000))  # warm up
    best_cat = best_plain = 0.0
    for _ in range(3):
        t = time.process_time()
        encode_lines(points)
        best_cat = max(best_cat, n / (time.process_time() - t))
        t = time.process_time()
        encode_lines(plain)
        best_plain = max(best_plain, n / (time.process_time() - t))
    # Peer: influxdb-client's Point.to_line_protocol() on the same rows (a sample; it is slow).
    from influxdb_client import Point

    sample = min(n, 100_000)
    sids = plain_tags["sensor_id"].tolist()
    sites = plain_tags["site"].tolist()
    vals = points.fields["no2"]
    t = time.process_time()
    for i in range(sample):
        Point("air").tag("sensor_id", sids[i]).tag("site", sites[i]).field("no2", float(vals[i])).time(
            int(points.ts_ns[i])
        ).to_line_protocol()
    peer = sample / (time.process_time() - t)
    return best_cat, best_plain, peer


def influx_settings(bucket: str) -> InfluxSettings:
    from pydantic import SecretStr

    url = os.environ.get("PORTPULSE_INFLUX__URL", "http://127.0.0.1:18086")
    return InfluxSettings(
        url=url,
        token=SecretStr(os.environ.get("PORTPULSE_INFLUX__TOKEN", "portpulse:portpulse")),
        org=os.environ.get("PORTPULSE_INFLUX__ORG", "portpulse"),
        bucket=bucket,
    )


def create_database(url: str, name: str) -> None:
    data = urllib.parse.urlencode({"q": f'CREATE DATABASE "{name}"'}).encode()
    urllib.request.urlopen(f"{url}/query", data=data, timeout=10).read()  # noqa: S310 (loopback)


async def bench_write(seconds: float, call_points: int, sink: SinkSettings) -> dict[str, float]:
    db = f"bench_{uuid.uuid4().hex[:8]}"
    settings = influx_settings(f"{db}/autogen")
    create_database(settings.url, db)
    dlq = MemoryDeadLetters()
    written = 0
    latencies: list[float] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    async with InfluxWriter(settings, sink, dlq) as writer:
        call = 0
        while time.monotonic() - t0 < seconds:
            points = fleet(call_points, seed=call, t0=1_764_000_000_000_000_000 + call * call_points * 1_000_000)
            started = time.monotonic()
            await writer.write(points)
            latencies.append(time.monotonic() - started)
            written += call_points
            call += 1
        await writer.flush()
    elapsed = time.monotonic() - t0
    return {
        "points": written,
        "seconds": elapsed,
        "rate": written / elapsed,
        "cpu_s": time.process_time() - cpu0,
        "dlq": len(dlq.letters),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "p99_call_ms": float(np.percentile(latencies, 99) * 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=1_000_000, help="rows for the encoding benchmark")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the sustained write")
    parser.add_argument("--batch", type=int, default=50_000, help="lines per InfluxDB request")
    args = parser.parse_args()

    cat, plain, peer = bench_encode(args.points)
    print("\n## Line-protocol encoding (one core, CPU time)\n")
    print("| input | points/s | vs target 2 M/s | vs influxdb-client Point |")
    print("|---|---:|---:|---:|")
    print(f"| categorical tags | {cat:,.0f} | {cat / ENCODE_TARGET:.2f} | {cat / peer:.1f}x |")
    print(f"| plain str tags | {plain:,.0f} | {plain / ENCODE_TARGET:.2f} | {plain / peer:.1f}x |")
    print(f"| influxdb-client Point.to_line_protocol | {peer:,.0f} | {peer / ENCODE_TARGET:.2f} | 1.0x |")

    print(f"\n## Sustained write into InfluxDB at {influx_settings('x').url} ({args.seconds:.0f} s)\n")
    print(
        "| gzip | batch lines | senders | points | points/s | vs target 300 k/s | client CPU s "
        "| p99 write() ms | max RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gzip in (False, True):
        sink = SinkSettings(batch_lines=args.batch, concurrency=2, max_pending_batches=4, gzip=gzip)
        r = asyncio.run(bench_write(args.seconds, 50_000, sink))
        print(
            f"| {gzip} | {args.batch} | 2 | {r['points']:,.0f} | {r['rate']:,.0f} | {r['rate'] / WRITE_TARGET:.2f} "
            f"| {r['cpu_s']:.1f} | {r['p99_call_ms']:.0f} | {r['rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
