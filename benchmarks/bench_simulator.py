"""Simulator benchmark: publish at a target rate into the real Mosquitto and check what arrived.

    .venv/bin/python -m benchmarks.bench_simulator [--rate 20000] [--seconds 30] [--faults all=0.001]

A subscriber in its own process (raw MQTT, QoS 0) counts every message, malformed payload and
oversized payload, and compares them with the simulator's fault manifest. Prints the achieved
rate and its deviation from the target (the issue asks for within 5 %).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from portpulse.simulators.publish import MqttTarget, publish
from portpulse.simulators.stream import StreamConfig, generate, parse_faults

ROOT = Path(__file__).resolve().parents[1]


def _varint(sock_buf: bytearray, pos: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    while pos < len(sock_buf):
        byte = sock_buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def subscriber(
    host: str,
    port: int,
    topic: str,
    ready: EventType,
    stop: EventType,
    results: multiprocessing.Queue[tuple[int, int, int, float]],
) -> None:
    """Raw MQTT 3.1.1 subscriber: counts messages, malformed and oversized payloads."""
    sock = socket.create_connection((host, port))
    client_id = f"bench-sub-{os.getpid()}".encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"
    body = var + struct.pack("!H", len(client_id)) + client_id
    sock.sendall(bytes([0x10, len(body)]) + body)
    sock.recv(4)
    t = topic.encode()
    sub = struct.pack("!H", 1) + struct.pack("!H", len(t)) + t + b"\x00"
    sock.sendall(bytes([0x82, len(sub)]) + sub)
    buf = bytearray()
    count = malformed = oversized = 0
    first = last = 0.0
    sock.settimeout(0.5)
    subscribed = False
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            chunk = b""
            if stop.is_set():
                break
        if chunk:
            buf += chunk
        pos = 0
        while True:
            if pos + 2 > len(buf):
                break
            header = buf[pos]
            got = _varint(buf, pos + 1)
            if got is None:
                break
            length, start = got
            if start + length > len(buf):
                break
            packet = bytes(buf[start : start + length])
            pos = start + length
            if header >> 4 == 9:  # SUBACK
                subscribed = True
                ready.set()
            elif header >> 4 == 3:
                topic_len = struct.unpack_from("!H", packet)[0]
                payload = packet[2 + topic_len :]
                count += 1
                now = time.monotonic()
                first = first or now
                last = now
                if len(payload) > 256 * 1024:
                    oversized += 1
                else:
                    try:
                        json.loads(payload)
                    except ValueError:
                        malformed += 1
        del buf[:pos]
        if not subscribed:
            continue
    sock.close()
    results.put((count, malformed, oversized, last - first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--sensors", type=int, default=3_000)
    parser.add_argument("--faults", default="all=0.001")
    args = parser.parse_args()
    if os.environ.get("PORTPULSE_MQTT__HOST"):
        host, port = os.environ["PORTPULSE_MQTT__HOST"], int(os.environ.get("PORTPULSE_MQTT__PORT", "1883"))
    else:
        subprocess.run([str(ROOT / "scripts" / "services"), "up", "mqtt"], check=True)
        host, port = "127.0.0.1", 11883
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    results: multiprocessing.Queue[tuple[int, int, int, float]] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=subscriber, args=(host, port, f"{prefix}/#", ready, stop, results))
    proc.start()
    if not ready.wait(30):
        raise TimeoutError("subscriber did not subscribe")
    config = StreamConfig(
        sensors=args.sensors,
        rate=args.rate,
        duration_s=args.seconds,
        seed=1,
        topic_prefix=prefix,
        start_ns=time.time_ns(),
        faults=parse_faults(args.faults),
    )
    manifest_path = Path(f"/tmp/{prefix}-manifest.jsonl")  # noqa: S108 (benchmark scratch file)
    with open(manifest_path, "w") as manifest:
        report = publish(generate(config), MqttTarget(host, port, 0, f"{prefix}-sim"), manifest, sys.stderr, args.rate)
    time.sleep(2)  # let the subscriber drain its socket; it stops after 0.5 s of silence once told
    stop.set()
    count, malformed, oversized, _span = results.get(timeout=60)
    proc.join(30)
    faults = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    m_kinds: dict[str, int] = {}
    for f in faults:
        m_kinds[f["kind"]] = m_kinds.get(f["kind"], 0) + 1
    deviation = (report.reports_per_s - args.rate) / args.rate
    print(
        "\n| target reports/s | achieved | deviation | messages sent | received | malformed sent/received "
        "| oversized sent/received | duplicates in manifest |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.rate:,.0f} | {report.reports_per_s:,.0f} | {deviation:+.1%} | {report.messages:,} | {count:,} | "
        f"{m_kinds.get('malformed', 0)}/{malformed} | {m_kinds.get('oversized', 0)}/{oversized} | "
        f"{m_kinds.get('duplicate', 0)} |"
    )
    print(f"manifest: {manifest_path} ({len(faults)} faults: {m_kinds})")


if __name__ == "__main__":
    main()
