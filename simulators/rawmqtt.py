"""A minimal MQTT 3.1.1 QoS 0 publisher for load generation (CONNECT, PUBLISH, PINGREQ, DISCONNECT).

paho spends two ``send`` calls and ~50 µs of Python per message; a load generator needs more.
Here PUBLISH packets are encoded into a buffer and written with one ``sendall`` per batch. Only
QoS 0 (nothing to acknowledge); QoS 1 goes through paho.
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["RawQos0Publisher", "encode_publish"]


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_publish(topic: str, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH packet."""
    t = topic.encode()
    body_len = 2 + len(t) + len(payload)
    return b"\x30" + _remaining_length(body_len) + struct.pack("!H", len(t)) + t + payload


class RawQos0Publisher:
    """Publish QoS 0 messages over one TCP connection; ``flush`` writes the buffered packets."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self._sock = socket.create_connection((host, port), timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._keepalive_s = keepalive_s
        flags = 0x02  # clean session
        payload = struct.pack("!H", len(client_id)) + client_id.encode()
        if username is not None:
            flags |= 0x80
            payload += struct.pack("!H", len(username)) + username.encode()
            if password is not None:
                flags |= 0x40
                payload += struct.pack("!H", len(password)) + password.encode()
        var = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", keepalive_s)
        self._sock.sendall(b"\x10" + _remaining_length(len(var) + len(payload)) + var + payload)
        ack = self._recv_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            self._sock.close()
            raise ConnectionError(f"MQTT broker refused the connection (CONNACK return code {ack[3]})")
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._last_sent = time.monotonic()

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("MQTT broker closed the connection")
            data += chunk
        return data

    def publish(self, topic: str, payload: bytes) -> None:
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
            self._sock.sendall(b"\xc0\x00")  # PINGREQ; the PINGRESP is never read, the kernel buffers it
            self._last_sent = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
            self._sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self._sock.close()
