"""Disk use per sensor per retention tier, measured: the simulated port through ``portpulse run``
into an InfluxDB 1.8 of its own, then the bytes of each retention policy on disk once InfluxDB
has fully compacted them.

    .venv/bin/python -m benchmarks.bench_disk [--sensors 90] [--interval 10] [--hours 6] [--json FILE]

``--sensors`` are split over the air, crane and cell fleets (7, 6 and 6 metrics per report), each
reporting every ``--interval`` seconds of event time for ``--hours``, ending three hours ago; the
stream is published as gateway batches as fast as the pipeline takes it (event time is what
the disk use depends on). The InfluxDB is the one ``scripts/services`` builds, started on its
own port and data directory with short cold durations, so that every shard is snapshotted and
fully compacted within seconds instead of hours: the figures are those of data at rest. Per
tier: bytes on disk, bytes per sensor per day, bytes per stored value, and the disk one sensor
takes at the tier's default retention (raw 30 days, 10 s aggregates 7 days, 1 min 1 year,
15 min: per year kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import Pipeline
from benchmarks.common import SERVICES_RUN, free_port, publish, service_env, stop_process
from portpulse.simulators.stream import StreamConfig, generate

DAY_S = 86_400.0
#: The tiers' default retention in days (-1: kept; the figure is then per year).
RETENTION_DAYS = {"raw": 30.0, "10s": 7.0, "1m": 365.0, "15m": -1.0}
DATABASE = "portpulse_disk"

CONF = """reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{base}/meta"
[data]
  dir = "{base}/data"
  wal-dir = "{base}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "1s"
  compact-full-write-cold-duration = "2s"
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  flux-enabled = true
  log-enabled = false
  max-body-size = 0
[continuous_queries]
  enabled = false
"""


class OwnInflux:
    """``influxd`` (the build ``scripts/services`` made) on its own port and data directory."""

    def __init__(self) -> None:
        found = sorted(SERVICES_RUN.parent.glob("influxdb-*/influxd"))
        if not found:
            raise SystemExit("no influxd under ~/.cache/portpulse: run scripts/services up influx first")
        self.base = Path(tempfile.mkdtemp(prefix="portpulse-disk-"))
        self.port = free_port()
        conf = self.base / "influxdb.conf"
        conf.write_text(CONF.format(base=self.base, port=self.port, rpc=free_port()))
        self.log = open(self.base / "influxd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(found[-1]), "run", "-config", str(conf)], stdout=self.log, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while not self._pings():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"influxd did not start; see {self.base / 'influxd.log'}")
            time.sleep(0.2)

    def _pings(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:  # noqa: S310 (loopback)
                return int(r.status) == 204
        except OSError:
            return False

    def policy_bytes(self) -> dict[str, int]:
        """Bytes on disk per retention policy of the database (TSM files and field indexes), and
        ``_series``: the database's series file."""
        out = {}
        for rp in sorted((self.base / "data" / DATABASE).glob("*")):
            out[rp.name] = sum(f.stat().st_size for f in rp.rglob("*") if f.is_file())
        return out

    def at_rest(self, quiet_s: float = 10.0, timeout_s: float = 300.0) -> None:
        """Until the WAL is empty and no shard file has changed for ``quiet_s`` (bounded)."""
        deadline = time.monotonic() + timeout_s
        last: tuple[Any, ...] = ()
        since = time.monotonic()
        while time.monotonic() < deadline:
            wal = sum(f.stat().st_size for f in (self.base / "wal").rglob("*.wal") if f.is_file())
            files = tuple(sorted((str(f), f.stat().st_size) for f in (self.base / "data").rglob("*") if f.is_file()))
            if files != last or wal > 0:
                last, since = files, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(1.0)
        raise SystemExit("InfluxDB did not come to rest (WAL not snapshotted, or compactions still running)")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=90)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between a sensor's reports")
    ap.add_argument("--hours", type=float, default=6.0, help="hours of event time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = service_env("mqtt", "kafka", "influx")
    influx = OwnInflux()
    try:
        result = measure(env | {"PORTPULSE_INFLUX__URL": influx.url}, influx, args.sensors, args.interval, args.hours)
    finally:
        influx.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def measure(env: dict[str, str], influx: OwnInflux, sensors: int, interval_s: float, hours: float) -> dict[str, Any]:
    span_s = hours * 3600
    start_ns = (time.time_ns() - int((span_s + 3 * 3600) * 1e9)) // 10**9 * 10**9
    settings = {
        "PORTPULSE_INFLUX__BUCKET": f"{DATABASE}/raw", "PORTPULSE_RETENTION__TIERS": "true",
        "PORTPULSE_RETENTION__RAW_S": str(30 * DAY_S),
    }  # fmt: skip
    run = Pipeline(env, "disk", "run", settings, ["--windows", "10s,1m,15m", "--lateness", "10", "--idle-timeout", "5"])
    try:
        config = StreamConfig(sensors=sensors, rate=sensors / interval_s, duration_s=span_s, start_ns=start_ns,
                              fmt="json-batch", batch_size=100, topic_prefix=run.prefix)  # fmt: skip
        blocks = list(generate(config))
        messages = [(m.topic, m.payload) for b in blocks for m in b.messages]
        values = sum(len(r["metrics"]) for _, p in messages for r in json.loads(p)["readings"])
        host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
        publish(host, port, messages, qos=1)

        def drained() -> bool:
            t = run.totals()
            return t.get("processed", 0) >= values and t.get("sink_queue", 1) == 0 and t.get("in_flight", 1) == 0

        run.wait(drained, 900, "drained")
        # the last windows close once their series are idle: until no point has been written for 10 s
        written = [run.totals().get("influx_points", 0.0), time.monotonic()]

        def settled() -> bool:
            now = run.totals().get("influx_points", 0.0)
            if now != written[0]:
                written[:] = [now, time.monotonic()]
            return time.monotonic() - written[1] >= 10 and run.totals().get("sink_queue", 1) == 0

        run.wait(settled, 300, "settled")
        points = int(written[0])
    finally:
        run.stop()
    influx.at_rest()
    on_disk = influx.policy_bytes()
    cli_env = {**os.environ, **env, **settings, "PORTPULSE_KAFKA__TOPIC_PREFIX": run.prefix,
               "PORTPULSE_OPS__LOG_LEVEL": "WARNING"}  # fmt: skip
    span = ["--from", str(start_ns // 10**9), "--to", str(-(-(start_ns + int(span_s * 1e9)) // 10**9))]
    reprocessed = reprocess_twice(influx, cli_env, [*span, "--windows", "10s,1m,15m"])
    days = span_s / DAY_S
    tiers: dict[str, dict[str, Any]] = {}
    index = on_disk.pop("_series", 0)  # the database's series file: preallocated, shared by the tiers
    for tier, size in on_disk.items():
        per_day = size / sensors / days
        keep = RETENTION_DAYS.get(tier, -1.0)
        tiers[tier] = {
            "bytes": size, "bytes_per_sensor_per_day": per_day,
            "bytes_per_sensor_at_retention": per_day * (keep if keep > 0 else 365.0),
            "retention": f"{keep:g} days" if keep > 0 else "kept (per year)",
        }  # fmt: skip
    raw = on_disk.get("raw", 0)
    return {
        "sensors": sensors, "interval_s": interval_s, "event_hours": hours, "metric_values": values,
        "points_written": points, "raw_bytes_per_value": raw / values if values else float("nan"), "tiers": tiers,
        "series_file_bytes": index, "influxdb": "1.8.10, fully compacted (cold shards)",
        "reprocess": reprocessed,
    }  # fmt: skip


def stored_counts(influx: OwnInflux) -> dict[str, int]:
    """Values stored per retention policy (every field of every measurement counted)."""
    out = {}
    for rp in ("raw", "10s", "1m", "15m"):
        q = f'SELECT count(*) FROM "{DATABASE}"."{rp}"./.*/'  # noqa: S608 (our own names)
        url = f"{influx.url}/query?" + urllib.parse.urlencode({"db": DATABASE, "q": q})
        with urllib.request.urlopen(url, timeout=300) as r:  # noqa: S310 (loopback)
            series = json.loads(r.read())["results"][0].get("series", [])
        out[rp] = sum(int(v) for s in series for v in s["values"][0][1:] if v is not None)
    return out


def reprocess_twice(influx: OwnInflux, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    """``portpulse reprocess`` over the whole range: interrupted (SIGINT) after 3 s, then run to
    the end, timed; what is stored afterwards compared with before."""
    before = stored_counts(influx)
    command = [sys.executable, "-m", "portpulse", "reprocess", *args]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # a benchmark step, not a test: somewhere in the middle of the run
    first.send_signal(signal.SIGINT)
    _, said = first.communicate(timeout=300)
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"reprocess failed ({done.returncode}): {done.stderr[-2000:]}")
    readings = int(re.search(r"(\d+) readings in the range", done.stdout).group(1))  # type: ignore[union-attr]
    after = stored_counts(influx)
    return {
        "interrupted_exit": first.returncode, "interrupted_said": said.strip().splitlines()[-1:],
        "seconds": took, "readings": readings, "readings_per_s": readings / took, "summary": done.stdout.strip(),
        "stored_before": before, "stored_after": after, "same": before == after,
    }  # fmt: skip


if __name__ == "__main__":
    main()
