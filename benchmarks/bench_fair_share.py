"""Fair share: one site floods at 10x its usual rate while three others report as usual.

    .venv/bin/python -m benchmarks.bench_fair_share [--seconds 30]

``portpulse run`` against the real services, three runs of ``--seconds`` each: the usual load
only; the usual load with the flood and no per-site ceiling; the same with the ceiling
(``admission.site_rate_per_s`` at twice the flooding site's usual rate). Every site sends
gateway batches of 100 readings with live event time. The calm sites' share is measured by
probes (a single reading every 0.25 s from a calm site, publish -> queryable in InfluxDB) and by
the time from the end of publishing until every calm reading is stored.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from benchmarks.bench_pipeline import Pipeline, payloads, warm_up
from benchmarks.common import publish, service_env

CALM_SITES = ("calm-0", "calm-1", "calm-2")
CALM_SENSORS, CALM_RATE = 200, 2_000.0  # per calm site: readings/s
FLOOD_SENSORS, FLOOD_USUAL = 500, 15_000.0  # the busy site's usual readings/s; it floods at 10x
BATCH = 100


def run_once(env: dict[str, str], seconds: float, flood: bool, ceiling: float) -> dict[str, Any]:
    name = f"fair share flood={flood} ceiling={ceiling:g}"
    settings = {"PORTPULSE_ADMISSION__SITE_RATE_PER_S": f"{ceiling:g}", "PORTPULSE_ADMISSION__SITE_BURST_S": "2"}
    run = Pipeline(env, name, "run", settings)
    host, port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
    try:
        # Every series exists before the clock starts, as in a running port; stamped two minutes
        # back, so their windows are closed long before the load and it corrects none of them.
        then_ms = int(time.time() * 1000) - 120_000
        warm_up(run, host, port, then_ms)
        roster = [m for site in CALM_SITES for m in payloads(run.prefix, CALM_SENSORS // BATCH, BATCH, then_ms,
                                                             sensors=CALM_SENSORS, site=site, ids=site)]  # fmt: skip
        roster += payloads(run.prefix, FLOOD_SENSORS // BATCH, BATCH, then_ms, sensors=FLOOD_SENSORS,
                           site="busy", ids="busy")  # fmt: skip
        publish(host, port, roster, 1)
        stored = 1 + len(roster) * BATCH
        run.wait(lambda: run.influx.count("air", "no2") >= stored, 300, "roster stored")
        start_ms = int(time.time() * 1000) + 8_000  # time to build the load
        calm_n = int(CALM_RATE * seconds / BATCH)
        calm = [payloads(run.prefix, calm_n, BATCH, start_ms, CALM_SENSORS, round(1000 * CALM_SENSORS / CALM_RATE),
                         site, site) for site in CALM_SITES]  # fmt: skip
        busy_rate = FLOOD_USUAL * (10 if flood else 1)
        busy = payloads(run.prefix, int(busy_rate * seconds / BATCH), BATCH, start_ms, FLOOD_SENSORS,
                        max(1, round(1000 * FLOOD_SENSORS / busy_rate)), "busy", "busy")  # fmt: skip
        time.sleep(max(0.0, start_ms / 1000 - time.time()))
        took: dict[str, float] = {}

        def load(name: str, messages: list[tuple[str, bytes]], rate: float) -> None:
            took[name] = publish(host, port, messages, 1, rate)

        loaders = [threading.Thread(target=load, args=(site, msgs, CALM_RATE / BATCH))
                   for site, msgs in zip(CALM_SITES, calm, strict=True)]  # fmt: skip
        loaders.append(threading.Thread(target=load, args=("busy", busy, busy_rate / BATCH)))
        started = time.monotonic()
        for loader in loaders:
            loader.start()
        sent, seen = probe(run, host, port, seconds)
        for loader in loaders:
            loader.join(600)
        published_at = time.monotonic()
        calm_readings = len(CALM_SITES) * calm_n * BATCH + len(CALM_SITES) * CALM_SENSORS

        def calm_stored() -> int:
            q = 'SELECT count("no2") FROM "air" WHERE site =~ /^calm-/'
            series = run.influx.query(q)["results"][0].get("series")
            return int(series[0]["values"][0][1]) if series else 0

        run.wait(lambda: calm_stored() >= calm_readings, 600, "calm readings stored")
        drain_s = time.monotonic() - published_at
        calm_s = time.monotonic() - started

        def busy_accounted() -> tuple[int, int]:
            """(busy readings stored, busy messages dead-lettered) beyond the roster."""
            q = 'SELECT count("no2") FROM "air" WHERE site = \'busy\''
            series = run.influx.query(q)["results"][0].get("series")
            stored = int(series[0]["values"][0][1]) - FLOOD_SENSORS if series else 0
            return stored, int(run.totals().get("dlq", 0))

        # nothing silently dropped: every busy reading is stored or its message dead-lettered
        run.wait(lambda: sum(busy_accounted()[i] * (1, BATCH)[i] for i in (0, 1)) >= len(busy) * BATCH, 600,
                 "busy readings stored or dead-lettered")  # fmt: skip
        busy_stored, busy_dead = busy_accounted()
        lat = sorted(seen[s] - sent[s] for s in seen)
        return {
            "name": name, "probes": len(sent), "seen": len(lat),
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "calm_drain_s": drain_s, "busy_published": len(busy) * BATCH,
            "busy_rate": len(busy) * BATCH / took["busy"], "calm_rate": calm_readings / calm_s,
            "busy_stored": busy_stored, "busy_dead": busy_dead,
        }  # fmt: skip
    finally:
        run.stop()


def probe(run: Pipeline, host: str, port: int, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Single readings from a calm site every 0.25 s; when each became queryable (monotonic s)."""
    import json

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{run.prefix}-probe", protocol=paho.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        t_end = time.monotonic() + seconds
        deadline = t_end + 120
        while time.monotonic() < deadline and (time.monotonic() < t_end or len(seen) < len(sent)):
            if time.monotonic() < t_end and (not sent or time.monotonic() - max(sent.values()) >= 0.25):
                sid = f"probe-{len(sent):05d}"
                body = json.dumps({"ts": int(time.time() * 1000), "metrics": {"no2": 40.0}}).encode()
                client.publish(f"{run.prefix}/air/calm-0/{sid}", body, qos=1).wait_for_publish(30)
                sent[sid] = time.monotonic()
            res = run.influx.query('SELECT last("no2") FROM "air" WHERE sensor_id =~ /^probe-/ GROUP BY sensor_id')
            now = time.monotonic()
            for series in res["results"][0].get("series", []):
                sid = series["tags"]["sensor_id"]
                if sid in sent and sid not in seen:
                    seen[sid] = now
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    env = service_env("mqtt", "kafka", "influx")
    ceiling = 2 * FLOOD_USUAL
    results = [
        run_once(env, args.seconds, flood=False, ceiling=ceiling),
        run_once(env, args.seconds, flood=True, ceiling=1e9),
        run_once(env, args.seconds, flood=True, ceiling=ceiling),
    ]
    print(
        f"\n3 calm sites at {CALM_RATE:,.0f} readings/s each; the busy site at {FLOOD_USUAL:,.0f} usual, "
        f"{10 * FLOOD_USUAL:,.0f} flooding; ceiling {ceiling:,.0f} readings/s per site; {args.seconds:.0f} s runs"
    )
    print(
        "\n| run | calm probe p50 / p99 | calm readings stored per s (published to stored) | calm stored "
        "after the last publish | busy site published (rate reached) | busy stored + dead-lettered "
        "messages (rate_limit) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in zip(("usual load", "flood, no ceiling", "flood, ceiling"), results, strict=True):
        print(f"| {label} | {r['p50_ms']:,.0f} / {r['p99_ms']:,.0f} ms ({r['seen']}/{r['probes']}) | "
              f"{r['calm_rate']:,.0f} | {r['calm_drain_s']:.1f} s | {r['busy_published']:,} "
              f"({r['busy_rate']:,.0f}/s) | {r['busy_stored']:,} + {r['busy_dead']:,} x {BATCH} |")  # fmt: skip


if __name__ == "__main__":
    main()
