"""The bridge on every broker of the interop matrix, beside a bare paho subscriber on the same broker.

    .venv/bin/python -m benchmarks.bench_interop [--messages 100000] [--brokers mosquitto,mochi,rumqttd,artemis]

Per broker (``scripts/services up mochi rumqttd artemis``; Mosquitto is the control): a session
of ``--messages`` single-reading QoS 1 messages is queued while ``portpulse bridge`` is stopped,
then the bridge starts. Two figures: the time from starting the ``portpulse bridge`` process until
every message is acknowledged by Kafka (what an operator waits for), and the rate from its first
received message on (its own counters, as in ``bench_bridge``). The peer drains the same kind
of queued session with a bare paho subscriber (auto-ack, nothing done with the messages).
A broker that keeps only part of the session (mochi: 8 192 messages per client by default) is
timed over what it delivered, and the table says how much that was. Publishing uses MQTT 3.1.1
(the fast raw publisher); the bridge and the peer subscribe with MQTT 5 (rumqttd: its v5
listener; its v4 and v5 listeners share one router).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

from benchmarks.bench_bridge import Run, bare_drain, create_session, kafka_stats, payloads
from benchmarks.common import SERVICES, publish, service_env

BROKERS = ("mosquitto", "mochi", "rumqttd", "artemis")
SERVICE_NAME = {"mosquitto": "mqtt", "mochi": "mochi", "rumqttd": "rumqttd", "artemis": "artemis"}


def endpoints(brokers: list[str]) -> dict[str, tuple[str, int, int]]:
    """host, MQTT 3.1.1 port, MQTT 5 port per broker (started if needed)."""
    names = [SERVICE_NAME[b] for b in brokers]
    subprocess.run([str(SERVICES), "up", *names], check=True)
    out = subprocess.run([str(SERVICES), "endpoint", *names], check=True, capture_output=True, text=True).stdout
    lines = [ln.split() for ln in out.splitlines()]
    return {b: (host, int(v311), int(v5)) for b, (host, v311, v5) in zip(brokers, lines, strict=True)}


def time_drain(run: Run, n: int, stall_s: float = 15.0) -> tuple[float, float, int]:
    """(time.monotonic() of the bridge's first received message, of the moment the last one it
    got was acknowledged by Kafka, messages received): done at ``n``, or after ``stall_s``
    without a new message (a broker that dropped part of the session)."""
    first = last_change = 0.0
    got = -1.0
    while True:
        t = run.totals()
        now = time.monotonic()
        received = t.get("mqtt_messages", 0.0)
        settled = t.get("in_flight", 1) == 0
        if received != got:
            got, last_change = received, now
            first = first or (now if received > 0 else 0.0)
        elif not settled:
            last_change = now  # still delivering to Kafka
        if settled and received >= n:
            return first, now, int(received)
        if settled and now - last_change > stall_s:
            return first, last_change, int(received)
        time.sleep(0.02)


def drain(base: dict[str, str], broker: str, where: tuple[str, int, int], n: int) -> dict[str, float]:
    host, v311, v5 = where
    env = {**base, "PORTPULSE_MQTT__HOST": host, "PORTPULSE_MQTT__PORT": str(v5)}
    run = Run(env, f"interop-{broker}", 1)
    run.port = v311  # the probes go through the raw MQTT 3.1.1 publisher
    try:
        run.start_bridge()
        run.wait_subscribed()
        run.stop_bridge()
        messages = payloads(run.prefix, n, 1, int(time.time() * 1000))
        publish(host, v311, messages, 1)
        started = time.monotonic()
        run.start_bridge()
        first, done, received = time_drain(run, n)
        stored, _ = asyncio.run(kafka_stats(env, [f"{run.prefix}.readings.air"], received + 1, 120))
    finally:
        run.stop_bridge()
    peer_id = f"{run.prefix}-peer"
    create_session(host, v5, peer_id, f"{run.prefix}/#", 1)
    publish(host, v311, messages, 1)
    peer = bare_drain(host, v5, peer_id, received, 1)
    return {
        "total": done - started,
        "rate": received / (done - first) if done > first else 0.0,
        "peer": peer,
        "stored": stored - 1,  # minus the probe
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--brokers", default=",".join(BROKERS))
    args = parser.parse_args()
    brokers = [b for b in args.brokers.split(",") if b]
    base = service_env("mqtt", "kafka")
    where = endpoints(brokers)
    print(f"\nA queued session of {args.messages:,} QoS 1 single-reading messages, per broker:\n")
    print("| broker | bridge start -> all in Kafka | bridge msg/s | bare paho msg/s | bridge / paho | in Kafka |")
    print("|---|---:|---:|---:|---:|---:|")
    for broker in brokers:
        try:
            r = drain(base, broker, where[broker], args.messages)
        except (TimeoutError, RuntimeError) as exc:
            print(f"| {broker} | failed: {exc} | | | | |", flush=True)
            continue
        print(
            f"| {broker} | {r['total']:.1f} s | {r['rate']:,.0f} | {r['peer']:,.0f} | "
            f"{r['rate'] / r['peer'] if r['peer'] else float('nan'):.2f} | {r['stored']:,.0f} of {args.messages:,} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
