"""The cost of securing every hop: ``portpulse run`` on the plaintext services and on the secured
ones (``scripts/services up secure``: MQTT mutual TLS, Kafka SASL_SSL with SCRAM-SHA-512, InfluxDB
over HTTPS with a user), the same load on each, alternating.

    .venv/bin/python -m benchmarks.bench_secured [--messages 3000] [--batch 100] [--rounds 2] [--json FILE]

The load: gateway batches of ``--batch`` NO2 readings (1 000 sensors, event time ending two
minutes ago) published at QoS 1 by one paho client, over TLS with a password on the secured
broker (the gateway's user may publish ``sensors/air/quai/#`` only) and in clear on the other.
Timed from the first publish until InfluxDB holds every reading; CPU seconds of ``portpulse run``
read from /proc. Both sides write raw points to ``portpulse/raw`` and windows 10s and 1m to their
retention policies.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.bench_pipeline import payloads
from benchmarks.common import cpu_seconds, free_port, service_env, stop_process
from tests.services import SecuredServices, secured_services


def publish(host: str, port: int, messages: list[tuple[str, bytes]], tls: SecuredServices | None) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.pki / "ca.pem"))
        client.username_pw_set("gateway-7", tls.credentials["mqtt:gateway-7"])
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()


def count(env: dict[str, str], sensor_prefix: str, secured: SecuredServices | None) -> int:
    """Raw NO2 points of this run's sensors, as InfluxDB counts them."""
    q = f'SELECT count(no2) FROM "raw"."air" WHERE sensor_id =~ /^{sensor_prefix}/'  # noqa: S608 (our own ids)
    params = {"db": "portpulse", "q": q}
    context = None
    if secured is not None:
        params |= {"u": "reader", "p": secured.credentials["influx:reader"]}
        context = ssl.create_default_context(cafile=str(secured.pki / "ca.pem"))
    url = f"{env['PORTPULSE_INFLUX__URL']}/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30, context=context) as r:  # noqa: S310 (loopback)
        series = json.loads(r.read())["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def run_once(base: dict[str, str], secured: SecuredServices | None, n: int, batch: int) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")}, **base,
        "PORTPULSE_MQTT__CLIENT_ID": f"{prefix}-bridge", "PORTPULSE_MQTT__SUBSCRIPTIONS": '["sensors/#"]',
        "PORTPULSE_KAFKA__TOPIC_PREFIX": prefix, "PORTPULSE_KAFKA__CONSUMER_GROUP": f"{prefix}-g",
        "PORTPULSE_INFLUX__BUCKET": "portpulse/raw", "PORTPULSE_OPS__LOG_LEVEL": "WARNING",
        "PORTPULSE_OPS__METRICS_PORT": str(free_port()), "PORTPULSE_ADMISSION__SITE_RATE_PER_S": "1e9",
        "PORTPULSE_SINK__FLUSH_INTERVAL_MS": "100",
    }  # fmt: skip
    log = open(Path(tempfile.gettempdir()) / f"{prefix}.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "portpulse", "run", "--windows", "10s,1m"], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        port = int(env["PORTPULSE_OPS__METRICS_PORT"])
        deadline = time.monotonic() + 120
        while not _ready(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"portpulse run not ready; see {log.name}")
            time.sleep(0.2)
        t0_ms = int(time.time() * 1000) - (n * batch // 1000 + 120) * 1000
        messages = [(topic.replace(prefix, "sensors", 1), body)
                    for topic, body in payloads(prefix, n, batch, t0_ms, ids=prefix)]  # fmt: skip
        host, mqtt_port = env["PORTPULSE_MQTT__HOST"], int(env["PORTPULSE_MQTT__PORT"])
        if secured is not None:
            mqtt_port = secured.mqtt_tls_port  # the gateway: TLS and a password
        cpu0, started = cpu_seconds(proc.pid), time.monotonic()
        publish(host, mqtt_port, messages, secured)
        deadline = time.monotonic() + 600
        while count(env, prefix, secured) < n * batch:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"not every reading stored; see {log.name}")
            time.sleep(0.2)
        elapsed, cpu = time.monotonic() - started, cpu_seconds(proc.pid) - cpu0
    finally:
        stop_process(proc)
        log.close()
    readings = n * batch
    return {"secured": secured is not None, "readings": readings, "seconds": elapsed,
            "readings_per_s": readings / elapsed, "cpu_us_per_reading": 1e6 * cpu / readings}  # fmt: skip


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    plain = service_env("mqtt", "kafka", "influx")
    secured = secured_services()
    results = []
    for _ in range(args.rounds):
        results.append(run_once(plain, None, args.messages, args.batch))
        results.append(run_once(secured.env, secured, args.messages, args.batch))
    for r in results:
        print(f"{'secured' if r['secured'] else 'plaintext':9}  {r['readings_per_s']:9,.0f} readings/s  "
              f"{r['cpu_us_per_reading']:5.2f} us CPU/reading (portpulse run)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
