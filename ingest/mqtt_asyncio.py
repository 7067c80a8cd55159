"""The default MQTT subscriber: MQTT 3.1.1 / 5 on asyncio, one thread, acks written in batches.

Why not paho here: paho reads each packet with three ``recv`` calls in its own thread and hands
every message and every ack across threads (a socket-pair wake-up per ack); that caps a bridge
near 2,000 QoS 1 messages/s on two shared cores. Here one ``data_received`` parses every packet of
a 64 KiB read (:class:`portpulse.mqttwire.PacketReader`), and the acks of a delivered batch leave
in one ``write``. paho remains available (``mqtt.client = "paho"``) for what this client does not
speak, such as MQTT over WebSockets.

Same contract as the paho adapter: persistent session (clean start off, session expiry), acks
only for messages of the current connection (after a reconnect the broker redelivers the rest),
reconnect with exponential backoff and resubscribe, credentials refused → one attempt and a clear
error, bounded buffering (reading pauses, TCP pushes back, the broker keeps the messages).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from types import TracebackType
from typing import Any

from portpulse.codecs.mqttwire import (
    AUTH_REFUSALS,
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    PINGREQ,
    PUBACK_TYPE,
    PUBCOMP_TYPE,
    PUBREC_TYPE,
    PUBREL,
    SUBACK,
    MalformedPacketError,
    PacketReader,
    encode_ack,
    encode_connect,
    encode_subscribe,
    parse_connack,
    parse_suback,
)
from portpulse.contract.errors import ServiceUnavailableError
from portpulse.contract.settings import MqttSettings
from portpulse.ingest.decode import Message
from portpulse.ingest.metrics import INGEST_METRICS
from portpulse.ingest.mqtt import Inbound, credentials_refused

__all__ = ["AsyncioMqttSource"]

log = logging.getLogger("portpulse.mqtt")


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection: parses packets, queues messages, answers the protocol's own acks."""

    def __init__(self, owner: AsyncioMqttSource, generation: int) -> None:
        self._owner = owner
        self._generation = generation
        self._reader = PacketReader(v5=owner.v5)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.control: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.last_received = time.monotonic()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        try:
            publishes, control = self._reader.feed(data)
        except MalformedPacketError as exc:
            self.close(f"malformed packet from the broker: {exc}")
            return
        if publishes:
            now_ns = time.time_ns()  # one receive time for everything that arrived together
            generation = self._generation
            self._owner.deliver(
                [Inbound(Message(p.topic, p.payload, now_ns), p.packet_id, p.qos, generation) for p in publishes]
            )
        for kind, body in control:
            if kind == PUBREL:  # QoS 2, second half: the message is ours already
                self.write(encode_ack(PUBCOMP_TYPE, int.from_bytes(body[:2], "big")))
            elif kind == DISCONNECT:
                reason = body[0] if body else 0
                self.close(f"broker sent DISCONNECT (reason 0x{reason:02x})")
            else:
                self.control.put_nowait((kind, body))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def close(self, reason: str, graceful: bool = False) -> None:
        """End the connection; ``graceful`` lets written bytes (acks, DISCONNECT) go out first,
        otherwise they are dropped (a silent broker would never take them)."""
        if not self.lost.done():
            self.lost.set_result(reason)
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(f"connection lost ({exc})" if exc else "connection closed by the broker")


class AsyncioMqttSource:
    """Subscribe with a persistent session and hand messages to asyncio; ``async with`` to run."""

    def __init__(self, settings: MqttSettings, max_in_flight: int, connect_timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._max_buffered = max_in_flight
        self._connect_timeout_s = connect_timeout_s
        self.v5 = settings.protocol == "5"
        self._queue: collections.deque[Inbound] = collections.deque()
        self._wakeup = asyncio.Event()
        self._connection: _Connection | None = None
        self._acks: list[bytes] = []
        self._ack_flush_scheduled = False
        self._generation = 0
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.reconnects = 0
        self.last_error = ""
        self.auth_failed = False

    # ------------------------------------------------------------ public surface

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def generation(self) -> int:
        return self._generation

    async def __aenter__(self) -> AsyncioMqttSource:
        s = self._settings
        self._task = asyncio.create_task(self._run(), name="mqtt-connection")
        deadline = time.monotonic() + self._connect_timeout_s
        while not self._connected.is_set():
            if self.auth_failed or self._task.done() or time.monotonic() > deadline:
                await self._shutdown()
                if self.auth_failed:
                    # Retrying cannot fix credentials: one attempt, then a clear error (exit code 2).
                    raise credentials_refused(s, self.last_error)
                raise ServiceUnavailableError("mqtt", self.last_error or f"no connection to {s.host}:{s.port}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.05)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; waits at most ``wait_s`` for the first one."""
        if not self._queue:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
        q = self._queue
        n = min(max_messages, len(q))
        out = [q.popleft() for _ in range(n)]
        if self._connection is not None and self._connection.paused and len(q) < self._max_buffered // 2:
            self._connection.resume()
        return out

    def ack(self, inbound: Inbound) -> bool:
        """Acknowledge a QoS 1/2 message if it belongs to the current connection; False if skipped.

        Acks are collected and written together once the caller yields to the event loop.
        """
        if inbound.qos == 0:
            return True
        if inbound.generation != self._generation or self._connection is None:
            return False  # the broker redelivers it on the new connection
        self._acks.append(encode_ack(PUBACK_TYPE if inbound.qos == 1 else PUBREC_TYPE, inbound.mid))
        if not self._ack_flush_scheduled:
            self._ack_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)
        return True

    # ------------------------------------------------------------ internals

    def deliver(self, messages: list[Inbound]) -> None:
        """Called by the connection for each read's messages."""
        self._queue.extend(messages)
        self._wakeup.set()
        if len(self._queue) >= self._max_buffered and self._connection is not None:
            self._connection.pause()  # TCP pushes back; the broker keeps the rest in the session

    def _flush_acks(self) -> None:
        self._ack_flush_scheduled = False
        if self._acks and self._connection is not None:
            self._connection.write(b"".join(self._acks))
        self._acks.clear()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._connection is not None:
            self._flush_acks()
            self._connection.write(DISCONNECT_PACKET)
            if self._connection.transport is not None:
                self._connection.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._connected.clear()
        INGEST_METRICS.mqtt_connected.set(0)

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self._settings
        if not s.tls:
            return None
        context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file:
            context.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        return context

    async def _run(self) -> None:
        """Connect, subscribe, keep alive; on loss reconnect with backoff until shut down."""
        s = self._settings
        delay = s.reconnect_min_s
        while not self._stopping:
            reason = await self._session()
            if self._stopping or self.auth_failed:
                return
            if self._connected.is_set():
                delay = s.reconnect_min_s  # the last attempt got through: start the backoff again
            self._connected.clear()
            INGEST_METRICS.mqtt_connected.set(0)
            self.last_error = f"MQTT {reason}"
            log.warning("%s; reconnecting in %.1f s", self.last_error, delay)
            await asyncio.sleep(delay)
            delay = min(s.reconnect_max_s, delay * 2)

    async def _session(self) -> str:
        """One connection from CONNECT to its loss; returns why it ended."""
        s = self._settings
        loop = asyncio.get_running_loop()
        generation = self._generation + 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, generation),
                    s.host,
                    s.port,
                    ssl=self._ssl_context(),
                    server_hostname=s.host if s.tls else None,
                ),
                self._connect_timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return f"connect to {s.host}:{s.port} failed: {exc or type(exc).__name__}"
        try:
            return await self._converse(conn, generation)
        finally:
            conn.close("shut down", graceful=self._stopping)
            self._connection = None

    async def _converse(self, conn: _Connection, generation: int) -> str:
        s = self._settings
        conn.write(
            encode_connect(
                s.client_id,
                v5=self.v5,
                clean_start=False,
                keepalive_s=s.keepalive_s,
                username=s.username,
                password=s.password.get_secret_value() if s.password else None,
                session_expiry_s=s.session_expiry_s,
                receive_maximum=self._max_buffered,
            )
        )
        kind, body = await self._expect(conn, CONNACK)
        if kind != CONNACK:
            return "no CONNACK from the broker"
        ack = parse_connack(body, v5=self.v5)
        if ack.reason:
            self.last_error = f"MQTT connect refused: {ack.reason}"
            self.auth_failed = ack.reason in AUTH_REFUSALS
            log.error("%s", self.last_error)
            return f"connect refused: {ack.reason}"
        # Messages of an old connection can no longer be acked; new ones carry this generation.
        # (Set before SUBSCRIBE: a persistent session's queued messages follow CONNACK at once.)
        self._generation = generation
        self._connection = conn
        filters = [(f"$share/{s.shared_group}/{f}" if s.shared_group else f, s.qos) for f in s.subscriptions]
        conn.write(encode_subscribe(1, filters, v5=self.v5))
        kind, body = await self._expect(conn, SUBACK)
        if kind != SUBACK:
            return "no SUBACK from the broker"
        refused = [r for r in parse_suback(body, v5=self.v5)[1] if r]
        if refused:
            self.last_error = f"MQTT subscription refused: {', '.join(refused)}"
            log.error("%s", self.last_error)
        if generation > 1:
            self.reconnects += 1
            INGEST_METRICS.reconnects.inc()
            log.warning(
                "reconnected to MQTT %s:%d (session present: %s); resubscribed", s.host, s.port, ack.session_present
            )
        self._connected.set()
        INGEST_METRICS.mqtt_connected.set(1)
        return await self._keep_alive(conn)

    async def _expect(self, conn: _Connection, kind: int) -> tuple[int, bytes]:
        """The next control packet of type ``kind``; (0, b"") on timeout or loss."""
        deadline = time.monotonic() + self._connect_timeout_s
        while (left := deadline - time.monotonic()) > 0 and not conn.lost.done():
            get = asyncio.ensure_future(conn.control.get())
            waiters: set[asyncio.Future[Any]] = {get, conn.lost}
            done, _ = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                break
            got = get.result()
            if got[0] == kind:
                return got
        return 0, b""

    async def _keep_alive(self, conn: _Connection) -> str:
        """PINGREQ every half keepalive; a broker silent for 1.5 keepalives is gone (e.g. SIGSTOP)."""
        keepalive = self._settings.keepalive_s
        while True:
            done, _ = await asyncio.wait({conn.lost}, timeout=keepalive / 2)
            if done:
                return conn.lost.result()
            if conn.paused:
                # Reading is paused on purpose: the broker's answers wait in the socket.
                conn.last_received = time.monotonic()
            elif time.monotonic() - conn.last_received > keepalive * 1.5:
                conn.close(f"broker silent for {keepalive * 1.5:.0f} s")
                return f"broker {self._settings.host}:{self._settings.port} stopped answering"
            conn.write(PINGREQ)
            while not conn.control.empty():
                conn.control.get_nowait()  # PINGRESP and friends: nothing more to do
