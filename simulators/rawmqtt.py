"""A minimal MQTT 3.1.1 publisher for load generation: QoS 0 or pipelined QoS 1.

paho spends two ``send`` calls and ~50 µs of Python per message and waits for acks one by one; a
load generator needs more. Here PUBLISH packets (:mod:`portpulse.mqttwire`) are buffered and
written with one ``sendall`` per 64 KiB; at QoS 1 up to ``window`` messages may be unacknowledged
and PUBACKs are read in bulk.
"""

from __future__ import annotations

import select
import socket
import time
import uuid

from portpulse.codecs.mqttwire import (
    CONNACK,
    DISCONNECT_PACKET,
    PINGREQ,
    PacketReader,
    encode_connect,
    encode_publish,
    parse_connack,
)

__all__ = ["RawPublisher", "encode_publish", "publish_messages"]

_PUBACK = 4


class RawPublisher:
    """Publish over one TCP connection; ``flush`` writes buffered packets, ``settle`` waits for acks."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        qos: int = 0,
        window: int = 20_000,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError("RawPublisher speaks QoS 0 and 1")
        self._sock = socket.create_connection((host, port), timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._keepalive_s = keepalive_s
        self._qos = qos
        self._window = min(window, 30_000)  # packet ids wrap at 65,535
        self._reader = PacketReader(v5=False)
        self._sock.sendall(
            encode_connect(
                client_id, v5=False, clean_start=True, keepalive_s=keepalive_s, username=username, password=password
            )
        )
        kind, body = self._next_control(CONNACK, 30.0)
        reason = parse_connack(body, v5=False).reason if kind == CONNACK else "no CONNACK"
        if reason:
            self._sock.close()
            raise ConnectionError(f"MQTT broker refused the connection ({reason})")
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._last_sent = time.monotonic()
        self._next_id = 0
        self._unacked: set[int] = set()
        self.acked = 0

    def _read(self, timeout_s: float) -> list[tuple[int, bytes]]:
        ready, _, _ = select.select([self._sock], [], [], timeout_s)
        if not ready:
            return []
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionError("MQTT broker closed the connection")
        return self._reader.feed(data)[1]

    def _next_control(self, kind: int, timeout_s: float) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for got in self._read(0.1):
                if got[0] == kind:
                    return got
        return 0, b""

    def _take_acks(self, timeout_s: float) -> None:
        for kind, body in self._read(timeout_s):
            if kind == _PUBACK:
                packet_id = int.from_bytes(body[:2], "big")
                if packet_id in self._unacked:
                    self._unacked.discard(packet_id)
                    self.acked += 1

    @property
    def unacked(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker."""
        return len(self._unacked)

    def publish(self, topic: str, payload: bytes) -> None:
        if self._qos:
            while len(self._unacked) >= self._window:
                self.flush()
                self._take_acks(1.0)
            self._next_id = self._next_id % 65535 + 1
            self._unacked.add(self._next_id)
            packet = encode_publish(topic, payload, qos=1, packet_id=self._next_id)
        else:
            packet = encode_publish(topic, payload)
        self._buffer.append(packet)
        self._buffered += len(packet)
        if self._buffered >= 64 * 1024:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._sock.sendall(b"".join(self._buffer))
            self._buffer.clear()
            self._buffered = 0
            self._last_sent = time.monotonic()
        elif time.monotonic() - self._last_sent > self._keepalive_s / 2:
            self._sock.sendall(PINGREQ)  # the PINGRESP is read (and ignored) with the acks
            self._last_sent = time.monotonic()
        if self._qos:
            self._take_acks(0)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Flush and wait until the broker acknowledged every QoS 1 message (TimeoutError if not)."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        while self._unacked and time.monotonic() < deadline:
            self._take_acks(0.1)
        if self._unacked:
            raise TimeoutError(f"{len(self._unacked)} QoS1 messages not acknowledged by the broker")

    def close(self) -> None:
        try:
            self.flush()
            self._sock.sendall(DISCONNECT_PACKET)
        finally:
            self._sock.close()


def publish_messages(
    host: str, port: int, messages: list[tuple[str, bytes]], qos: int, rate: float | None = None
) -> float:
    """Publish ``messages`` (topic, payload) pipelined, at most ``rate`` messages/s, and wait for
    the broker's acks (QoS 1); returns the seconds taken."""
    client = RawPublisher(host, port, f"pub-{uuid.uuid4().hex[:8]}", qos=qos)
    t0 = time.monotonic()
    try:
        for i, (topic, payload) in enumerate(messages):
            client.publish(topic, payload)
            if rate and i % 100 == 0:
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0:
                    client.flush()
                    time.sleep(ahead)
        client.settle(300)
        return time.monotonic() - t0
    finally:
        client.close()
