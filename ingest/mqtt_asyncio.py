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

The connection counts as up at CONNACK, not SUBACK: a resumed session's queued messages follow
CONNACK at once, and some brokers (rumqttd) send the SUBACK only after the client acknowledged
the messages their in-flight window holds, which the bridge does only once it runs. SUBSCRIBE
takes a packet identifier the broker is not using for a message to us (some brokers, mochi
among them, share one identifier space per session) and is sent again if refused for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from itertools import repeat
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
    ConnAck,
    MalformedPacketError,
    PacketReader,
    Received,
    encode_ack,
    encode_acks,
    encode_connect,
    encode_publish,
    encode_subscribe,
    parse_connack,
    parse_suback,
)
from portpulse.contract.errors import ConfigError, ServiceUnavailableError
from portpulse.contract.settings import MqttSettings
from portpulse.ingest.decode import Message
from portpulse.ingest.metrics import INGEST_METRICS
from portpulse.ingest.mqtt import (
    GENERATION_OF,
    MAX_SUBSCRIBE_ATTEMPTS,
    MID_OF,
    QOS_OF,
    BrokerShortfalls,
    Inbound,
    MqttSource,
    Presence,
    credentials_refused,
    mqtt_ssl_context,
    subscribe_id_refused,
    subscription_denied,
    subscription_filters,
    tls_refused,
)

__all__ = ["AsyncioMqttSource"]

log = logging.getLogger("portpulse.mqtt")


class ReadCoalescer:
    """Lets the kernel gather a stream of small packets into fewer, larger reads.

    Once a read brings less than ``batch_bytes``, the socket wakes its reader only when
    ``batch_bytes`` wait (``SO_RCVLOWAT``). A tick every ``wait_s`` lowers that mark back to one
    byte when nothing was read since the previous tick, which wakes the reader at once for what
    is left: a message waits at most about 2 x ``wait_s`` longer. A wake-up has a fixed cost
    (epoll, a turn of the event loop, a ``recv``), and a stream of single-reading messages woke
    the bridge every 9 or so: at 25 k such messages/s, a 2 KiB mark took its CPU per message
    from 17 to 9 µs.
    """

    def __init__(self, sock: Any, batch_bytes: int, wait_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock  # None (or batch_bytes 0): every arrival wakes the reader, as without this
        self._batch_bytes = batch_bytes
        self._wait_s = wait_s
        self._loop = loop
        self._tick_handle: asyncio.TimerHandle | None = None
        self._reads = 0  # since the last tick

    @property
    def coalescing(self) -> bool:
        return self._tick_handle is not None

    def read(self, nbytes: int) -> None:
        """Count a read of ``nbytes``; a short one starts coalescing."""
        self._reads += 1
        short = nbytes < self._batch_bytes and self._tick_handle is None and self._sock is not None
        if short and self._set_mark(self._batch_bytes):
            self._reads = 0
            self._tick_handle = self._loop.call_later(self._wait_s, self._tick)

    def close(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self._sock = None

    def _tick(self) -> None:
        if self._reads:
            self._reads = 0
            self._tick_handle = self._loop.call_later(self._wait_s, self._tick)
        else:
            self._tick_handle = None
            self._set_mark(1)

    def _set_mark(self, nbytes: int) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:  # the socket is closing: its reader is done anyway
            self._sock = None
            return False
        return True


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection: parses packets, queues messages, answers the protocol's own acks."""

    def __init__(self, owner: AsyncioMqttSource, generation: int) -> None:
        self._owner = owner
        self.generation = generation
        self._reader = PacketReader(v5=owner.v5)
        self._received = Received(Inbound, Message, generation)  # what its PUBLISH packets become
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.lost_exc: Exception | None = None  # what ended the connection, if an error did
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.last_received = time.monotonic()
        self.paused = False
        self._coalescer: ReadCoalescer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        s = self._owner.settings
        if s.read_batch_bytes:
            sock = transport.get_extra_info("socket")
            self._coalescer = ReadCoalescer(sock, s.read_batch_bytes, s.read_wait_ms / 1000, asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        if self._coalescer is not None:
            self._coalescer.read(len(data))
        try:
            # one receive time for everything that arrived together
            publishes, control = self._reader.feed_received(data, self._received, time.time_ns())
        except MalformedPacketError as exc:
            self.close(f"malformed packet from the broker: {exc}")
            return
        subscribe = False
        if control and control[0][0] == CONNACK and not self.connack.done():
            # CONNACK opens the stream: take it before the messages that arrived behind it, and
            # subscribe after them, with a packet id none of them holds.
            try:
                ack = self._owner.accepted(self, control[0][1])
            except MalformedPacketError as exc:
                self.close(f"malformed CONNACK from the broker: {exc}")
                return
            self.connack.set_result(ack)
            subscribe = not ack.reason
            control = control[1:]
        if publishes:
            self._owner.deliver(publishes)
        if subscribe:
            self._owner.subscribe(self)
        for kind, body in control:
            if kind == PUBREL:  # QoS 2, second half: the message is ours already
                packet_id = int.from_bytes(body[:2], "big")
                self._owner.released(packet_id)
                self.write(encode_ack(PUBCOMP_TYPE, packet_id))
            elif kind == SUBACK:
                self._owner.subscription_answered(self, body)
            elif kind == DISCONNECT:
                reason = body[0] if body else 0
                self.close(f"broker sent DISCONNECT (reason 0x{reason:02x})")

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
        if self._coalescer is not None:
            self._coalescer.close()
        if not self.lost.done():
            self.lost_exc = exc
            self.lost.set_result(f"connection lost ({exc})" if exc else "connection closed by the broker")


class AsyncioMqttSource(MqttSource):
    """Subscribe with a persistent session and hand messages to asyncio; ``async with`` to run."""

    def __init__(
        self,
        settings: MqttSettings,
        max_in_flight: int,
        connect_timeout_s: float = 30.0,
        presence: Presence | None = None,
    ) -> None:
        self._settings = settings
        self._presence = presence
        self._presence_payloads = (b"", b"")  # (offline, online) of the current connection
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
        self._subscribed = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Packet ids of the broker's QoS 1/2 messages not yet acknowledged (PUBREL for QoS 2):
        # a SUBSCRIBE must not reuse one of them.
        self._broker_ids: set[int] = set()
        self._packet_id = 0  # the last id this client took for a SUBSCRIBE
        self._subscribe_id = 0  # the SUBSCRIBE waiting for its SUBACK, 0 when none
        self._subscribe_sent = 0.0  # time.monotonic() when it left
        self._subscribe_attempts = 0
        self.reconnects = 0
        self.last_error = ""
        self.refused: ConfigError | None = None  # the broker can never accept us as configured
        self.denied: ConfigError | None = None  # the broker's ACL forbids the subscription
        self._ever_connected = False
        self.shortfalls = BrokerShortfalls(settings)

    # ------------------------------------------------------------ public surface

    @property
    def settings(self) -> MqttSettings:
        return self._settings

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    @property
    def generation(self) -> int:
        return self._generation

    async def __aenter__(self) -> AsyncioMqttSource:
        s = self._settings
        self._task = asyncio.create_task(self._run(), name="mqtt-connection")
        deadline = time.monotonic() + self._connect_timeout_s
        while not self._connected.is_set():
            if self.refused or self._task.done() or time.monotonic() > deadline:
                await self._shutdown()
                if self.refused:
                    # Retrying cannot fix credentials or certificates: one attempt, then a clear error (exit code 2).
                    raise self.refused
                raise ServiceUnavailableError("mqtt", self.last_error or f"no connection to {s.host}:{s.port}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.05)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; waits at most ``wait_s`` for the first one. Raises
        :class:`ConfigError` once the broker's ACL has denied the subscription."""
        if self.denied is not None:
            raise self.denied
        if not self._queue:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
        q = self._queue
        if len(q) <= max_messages:
            out = list(q)
            q.clear()
        else:
            out = list(map(collections.deque.popleft, repeat(q, max_messages)))
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
        if inbound.qos == 1:
            self._broker_ids.discard(inbound.mid)  # a QoS 2 id stays in use until PUBREL
        self._acks.append(encode_ack(PUBACK_TYPE if inbound.qos == 1 else PUBREC_TYPE, inbound.mid))
        self._schedule_ack_flush()
        return True

    def ack_all(self, inbound: list[Inbound]) -> int:
        """:meth:`ack` each message, in order; returns how many were acknowledged. QoS 1
        messages of the current connection (the usual delivery) are acknowledged in one pass."""
        n = len(inbound)
        if (
            self._connection is None
            or list(map(QOS_OF, inbound)).count(1) != n
            or list(map(GENERATION_OF, inbound)).count(self._generation) != n
        ):
            return sum(map(self.ack, inbound))
        ids = list(map(MID_OF, inbound))
        self._broker_ids.difference_update(ids)
        self._acks.append(encode_acks(PUBACK_TYPE, ids))
        self._schedule_ack_flush()
        return n

    def _schedule_ack_flush(self) -> None:
        if not self._ack_flush_scheduled:
            self._ack_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    # ------------------------------------------------------------ internals

    def deliver(self, messages: list[Inbound]) -> None:
        """Called by the connection for each read's messages."""
        self._queue.extend(messages)
        self._broker_ids.update(map(MID_OF, messages))
        self._broker_ids.discard(0)  # a QoS 0 message's: no packet id
        self._wakeup.set()
        if len(self._queue) >= self._max_buffered and self._connection is not None:
            self._connection.pause()  # TCP pushes back; the broker keeps the rest in the session

    def released(self, packet_id: int) -> None:
        """The broker released a QoS 2 message (PUBREL): its packet id is free again."""
        self._broker_ids.discard(packet_id)

    def accepted(self, conn: _Connection, body: bytes) -> ConnAck:
        """CONNACK arrived on ``conn``: when accepted, make it the current connection (before
        any message behind the CONNACK is handed on)."""
        ack = parse_connack(body, v5=self.v5)
        if ack.reason:
            return ack
        # Messages of an old connection can no longer be acked; new ones carry this generation.
        self._generation = conn.generation
        self._connection = conn
        self._broker_ids.clear()
        self._subscribed = False
        INGEST_METRICS.mqtt_subscribed.set(0)
        self.shortfalls.connected(
            session_present=ack.session_present,
            session_expiry_s=ack.session_expiry_s,
            maximum_qos=ack.maximum_qos,
            shared_subscriptions=ack.shared_subscriptions,
        )
        self._subscribe_attempts = 0
        return ack

    def _next_packet_id(self) -> int:
        """The next packet id (1..65535, cycling) that no message from the broker holds."""
        for _ in range(65536):
            self._packet_id = self._packet_id % 65535 + 1
            if self._packet_id not in self._broker_ids:
                return self._packet_id
        raise RuntimeError("every MQTT packet identifier is in use")  # receive maximum forbids this

    def subscribe(self, conn: _Connection) -> None:
        """Send SUBSCRIBE for the configured filters with a free packet id."""
        filters = [(f, self._settings.qos) for f in subscription_filters(self._settings)]
        self._subscribe_id = self._next_packet_id()
        self._subscribe_sent = time.monotonic()
        self._subscribe_attempts += 1
        conn.write(encode_subscribe(self._subscribe_id, filters, v5=self.v5))
        if self._presence is not None and self._subscribe_attempts == 1:
            online = encode_publish(self._presence.topic, self._presence_payloads[1], qos=1,
                                    packet_id=self._next_packet_id(), v5=self.v5, retain=True)  # fmt: skip
            conn.write(online)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0; False when not connected."""
        if self._connection is None or not self._connected.is_set():
            return False
        self._connection.write(encode_publish(topic, payload, v5=self.v5))
        return True

    def subscription_answered(self, conn: _Connection, body: bytes) -> None:
        """SUBACK: note refusals and downgrades; a refusal for the packet id is sent again."""
        try:
            suback = parse_suback(body, v5=self.v5)
        except MalformedPacketError as exc:
            conn.close(f"malformed SUBACK from the broker: {exc}")
            return
        if conn is not self._connection or suback.packet_id != self._subscribe_id:
            return  # an answer to a SUBSCRIBE of an earlier attempt
        self._subscribe_id = 0
        refused = [r for r in suback.refusals if r]
        id_refused = subscribe_id_refused(refused, suback.packet_id, self._broker_ids)
        if id_refused and self._subscribe_attempts < MAX_SUBSCRIBE_ATTEMPTS:
            log.info("MQTT broker refused SUBSCRIBE id %d (%s); subscribing again", suback.packet_id, refused[0])
            self.subscribe(conn)
            return
        if refused:
            self.last_error = f"MQTT subscription refused: {', '.join(refused)}"
            log.error("%s", self.last_error)
            self.denied = subscription_denied(self._settings, refused)
        self.shortfalls.subscribed(suback.granted)
        self._subscribed = True
        INGEST_METRICS.mqtt_subscribed.set(1)

    def _flush_acks(self) -> None:
        self._ack_flush_scheduled = False
        if self._acks and self._connection is not None:
            self._connection.write(b"".join(self._acks))
        self._acks.clear()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._connection is not None:
            self._flush_acks()
            if self._presence is not None:  # a clean DISCONNECT discards the will: say offline ourselves
                offline = self._presence_payloads[0]
                packet_id = self._next_packet_id()
                self._connection.write(
                    encode_publish(self._presence.topic, offline, qos=1, packet_id=packet_id, v5=self.v5, retain=True)
                )
            self._connection.write(DISCONNECT_PACKET)
            if self._connection.transport is not None:
                self._connection.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._connected.clear()
        self._subscribed = False
        INGEST_METRICS.mqtt_connected.set(0)
        INGEST_METRICS.mqtt_subscribed.set(0)

    async def _run(self) -> None:
        """Connect, subscribe, keep alive; on loss reconnect with backoff until shut down."""
        s = self._settings
        delay = s.reconnect_min_s
        while not self._stopping:
            reason = await self._session()
            if self._stopping or (self.refused and not self._ever_connected):
                return  # at start-up: __aenter__ raises the refusal
            if self.refused:
                # Once running (certificates rotated, a password changed), keep trying: the next
                # files or the broker's fix may be one reconnect away; each attempt logs the cause.
                log.error("%s", self.refused)
                self.refused = None
            if self._connected.is_set():
                delay = s.reconnect_min_s  # the last attempt got through: start the backoff again
            self._connected.clear()
            self._subscribed = False
            INGEST_METRICS.mqtt_connected.set(0)
            INGEST_METRICS.mqtt_subscribed.set(0)
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
            # Read on every connection: certificate files replaced on disk are used from the next one.
            context = mqtt_ssl_context(s)
        except (OSError, ssl.SSLError) as exc:
            self.refused = ConfigError(
                f"MQTT TLS files (mqtt.ca_file, mqtt.cert_file, mqtt.key_file) cannot be used: {exc}"
            )
            return f"TLS set-up failed: {exc}"
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, generation),
                    s.host,
                    s.port,
                    ssl=context,
                    server_hostname=s.host if s.tls else None,
                ),
                self._connect_timeout_s,
            )
        except ssl.SSLError as exc:
            # Retrying cannot make a certificate trusted: the start-up fails with the cause.
            self.refused = tls_refused(s, exc)
            return f"connect to {s.host}:{s.port} failed: {exc}"
        except (OSError, TimeoutError) as exc:
            return f"connect to {s.host}:{s.port} failed: {exc or type(exc).__name__}"
        try:
            return await self._converse(conn, generation)
        finally:
            conn.close("shut down", graceful=self._stopping)
            self._connection = None

    async def _converse(self, conn: _Connection, generation: int) -> str:
        s = self._settings
        if self._presence is not None:
            self._presence_payloads = self._presence.payloads()
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
                will=(self._presence.topic, self._presence_payloads[0]) if self._presence is not None else None,
            )
        )
        waiters: set[asyncio.Future[Any]] = {conn.connack, conn.lost}
        await asyncio.wait(waiters, timeout=self._connect_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not conn.connack.done():
            if isinstance(conn.lost_exc, ssl.SSLError):  # TLS 1.3: the broker judges our certificate now
                self.refused = tls_refused(s, conn.lost_exc)
                return f"TLS refused: {conn.lost_exc}"
            return "no CONNACK from the broker"
        ack = conn.connack.result()
        if ack.reason:
            self.last_error = f"MQTT connect refused: {ack.reason}"
            if ack.reason in AUTH_REFUSALS:
                self.refused = credentials_refused(s, self.last_error)
            log.error("%s", self.last_error)
            return f"connect refused: {ack.reason}"
        if generation > 1:
            self.reconnects += 1
            INGEST_METRICS.reconnects.inc()
            log.warning(
                "reconnected to MQTT %s:%d (session present: %s); resubscribing", s.host, s.port, ack.session_present
            )
        self._connected.set()
        self._ever_connected = True
        INGEST_METRICS.mqtt_connected.set(1)
        return await self._keep_alive(conn)

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
            self._warn_if_unsubscribed()

    def _warn_if_unsubscribed(self) -> None:
        """A SUBSCRIBE unanswered for the connect timeout is said once: messages of a resumed
        session may still flow, so the connection is kept."""
        if self._subscribe_id and time.monotonic() - self._subscribe_sent > self._connect_timeout_s:
            self.last_error = f"MQTT no SUBACK from the broker after {self._connect_timeout_s:.0f} s"
            log.warning("%s; still waiting (messages received meanwhile are processed)", self.last_error)
            self._subscribe_sent = float("inf")
