"""The MQTT source contract, and the paho-mqtt adapter (``mqtt.client = "paho"``).

The default source is :mod:`ingest.mqtt_asyncio` (several times faster); this adapter is for what
only paho speaks, such as MQTT over WebSockets, and as a reference implementation.

paho runs its network loop in its own thread. Each message is put on a bounded queue; when the
queue is full the paho thread blocks, TCP pushes back, and the broker keeps the messages in the
bridge's persistent session. Acks (``ack``) are sent only for messages of the current connection:
after a reconnect the broker redelivers what was not acknowledged, so an ack meant for an old
packet id can never acknowledge a different, newer message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Container, Sequence
from operator import itemgetter
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from portpulse.contract.errors import ConfigError, ServiceUnavailableError
from portpulse.contract.settings import MqttSettings
from portpulse.ingest.decode import Message
from portpulse.ingest.metrics import INGEST_METRICS

__all__ = [
    "MAX_SUBSCRIBE_ATTEMPTS",
    "BrokerShortfalls",
    "Inbound",
    "MqttSource",
    "PahoMqttSource",
    "Presence",
    "Shortfall",
    "broker_shortfalls",
    "credentials_refused",
    "subscribe_id_refused",
    "subscription_filters",
]

log = logging.getLogger("portpulse.mqtt")


class Presence(NamedTuple):
    """How a client announces itself on ``topic`` (retained, QoS 1): ``payloads()`` is called for
    each connection and gives (offline, online): offline is the MQTT will and what a clean
    shutdown publishes, online is published once subscribed (a Sparkplug host's STATE)."""

    topic: str
    payloads: Callable[[], tuple[bytes, bytes]]


class Inbound(NamedTuple):
    """A received message plus what is needed to acknowledge it (a named tuple, like Message)."""

    message: Message
    mid: int
    qos: int
    generation: int


#: an Inbound's fields, for passes over a list of them in C (``map``)
MESSAGE_OF, MID_OF, QOS_OF, GENERATION_OF = (
    itemgetter(Inbound._fields.index(f)) for f in ("message", "mid", "qos", "generation")
)


def credentials_refused(settings: MqttSettings, last_error: str) -> ConfigError:
    """The error for a broker refusing our credentials (never includes the password)."""
    who = f"user {settings.username!r}" if settings.username else "anonymous clients"
    return ConfigError(
        f"MQTT broker {settings.host}:{settings.port} refused {who} ({last_error.split(': ', 1)[-1]}); "
        "check mqtt.username and mqtt.password"
    )


def mqtt_ssl_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The client's TLS context (``mqtt.ca_file``, else the system's CAs; ``mqtt.cert_file`` and
    ``key_file`` for mutual TLS), read from the files now; None without ``mqtt.tls``."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file) if settings.key_file else None)
    return context


def tls_preflight(settings: MqttSettings, context: ssl.SSLContext, timeout_s: float = 5.0) -> ConfigError | None:
    """One TLS handshake with the broker, and a moment for its verdict on our certificate (in
    TLS 1.3 it comes after the handshake), for a client that reports neither itself (paho);
    the refusal, or None (the broker is away, or content: the client's own attempts say more)."""
    try:
        with (
            socket.create_connection((settings.host, settings.port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=settings.host) as tls,
        ):
            tls.settimeout(0.5)
            with contextlib.suppress(TimeoutError):  # the broker waits for a CONNECT: it took our certificate
                tls.recv(1)
    except ssl.SSLError as exc:
        return tls_refused(settings, exc)
    except OSError:
        return None
    return None


def subscription_denied(settings: MqttSettings, refusals: Sequence[str]) -> ConfigError | None:
    """The error for a SUBACK that says the broker's ACL forbids our subscription (MQTT 5 reason
    0x87): the bridge cannot read what it is for, so it stops. Other refusals are reported only."""
    if "not authorized" not in refusals:
        return None
    who = f"user {settings.username!r}" if settings.username else "this client (its certificate or anonymous)"
    return ConfigError(
        f"MQTT broker {settings.host}:{settings.port} denied {who} the subscription to "
        f"{', '.join(settings.subscriptions)} (not authorized: the broker's ACL); check the ACL and mqtt.subscriptions"
    )


def tls_refused(settings: MqttSettings, exc: ssl.SSLError) -> ConfigError:
    """The error for a TLS handshake that cannot succeed by retrying: we do not trust the broker's
    certificate, or the broker refused ours (an alert such as ``certificate expired``)."""
    where = f"MQTT broker {settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigError(
            f"{where}: its TLS certificate is not trusted ({exc.verify_message}); check mqtt.ca_file "
            f"({settings.ca_file or 'the system CAs'}) and that the host name is in the certificate"
        )
    alert = re.search(r"alert ([a-z ]+)", str(exc))
    if alert:
        mine = (
            f"mqtt.cert_file {settings.cert_file}" if settings.cert_file else "no client certificate (mqtt.cert_file)"
        )
        return ConfigError(f"{where} refused our TLS client certificate ({alert.group(1).strip()}); we sent {mine}")
    return ConfigError(f"{where}: TLS failed ({exc.reason or exc}); check mqtt.tls, mqtt.port and mqtt.ca_file")


#: SUBSCRIBEs sent per connection when the broker refuses their packet id.
MAX_SUBSCRIBE_ATTEMPTS = 5


def subscription_filters(settings: MqttSettings) -> list[str]:
    """The topic filters to subscribe: ``$share/{group}/{filter}`` with ``mqtt.shared_group``
    (several bridges split one stream), else the configured filters."""
    group = settings.shared_group
    return [f"$share/{group}/{f}" if group else f for f in settings.subscriptions]


def subscribe_id_refused(refusals: Sequence[str], packet_id: int, broker_ids: Container[int]) -> bool:
    """Whether a SUBACK refusal is about the SUBSCRIBE's packet id, so sending it again with
    another id can succeed: the broker said so (MQTT 5 reason 0x91), or the id now belongs to one
    of the broker's own messages (brokers that share one id space per session; MQTT 3.1.1 has no
    reason to say it with)."""
    refused = [r for r in refusals if r]
    return any(r.lower() == "packet identifier in use" for r in refused) or (bool(refused) and packet_id in broker_ids)


class Shortfall(NamedTuple):
    """Something the configuration asked for and the broker did not grant, said once per kind."""

    kind: str  # session_not_resumed, session_expiry_reduced, qos_downgraded, shared_subscriptions_unavailable
    detail: str


def broker_shortfalls(
    settings: MqttSettings,
    *,
    resuming: bool,
    session_present: bool | None = None,
    session_expiry_s: int | None = None,
    maximum_qos: int | None = None,
    shared_subscriptions: bool | None = None,
    granted: Sequence[int | None] = (),
) -> list[Shortfall]:
    """What a CONNACK (``session_present``, the v5 properties) or a SUBACK (``granted`` QoS per
    filter, None where refused) says the broker will not do of what ``settings`` asked.

    ``resuming``: the bridge connected before with a persistent session and expects it back.
    """
    s = settings
    out: list[Shortfall] = []
    if resuming and session_present is False:
        out.append(
            Shortfall(
                "session_not_resumed",
                "the broker did not keep the bridge's session across the reconnect "
                "(session present = 0): messages published while the bridge was away are lost",
            )
        )
    if session_expiry_s is not None and session_expiry_s < s.session_expiry_s:
        out.append(
            Shortfall(
                "session_expiry_reduced",
                f"the broker keeps the session {session_expiry_s} s after a disconnect, "
                f"not the {s.session_expiry_s} s asked (mqtt.session_expiry_s)",
            )
        )
    if s.shared_group and shared_subscriptions is False:
        out.append(
            Shortfall(
                "shared_subscriptions_unavailable",
                f"the broker does not offer shared subscriptions: mqtt.shared_group {s.shared_group!r} cannot work",
            )
        )
    lowest = min([q for q in granted if q is not None] + ([maximum_qos] if maximum_qos is not None else []), default=2)
    if lowest < s.qos:
        out.append(
            Shortfall(
                "qos_downgraded",
                f"the broker grants QoS {lowest}, not the {s.qos} asked (mqtt.qos): "
                + ("messages may be lost" if lowest == 0 else "messages may arrive twice"),
            )
        )
    return out


class BrokerShortfalls:
    """Shortfalls of the current connection, from its CONNACK and SUBACK: each kind logged
    once per source and counted every time."""

    def __init__(self, settings: MqttSettings) -> None:
        self._settings = settings
        self._resuming = False  # a persistent session was opened before: expect it back
        self.current: dict[str, str] = {}
        self._said: set[str] = set()

    def connected(
        self,
        *,
        session_present: bool,
        session_expiry_s: int | None = None,
        maximum_qos: int | None = None,
        shared_subscriptions: bool | None = None,
    ) -> None:
        """A CONNACK accepted the connection (v5 properties None where absent)."""
        s = self._settings
        found = broker_shortfalls(
            s,
            resuming=self._resuming,
            session_present=session_present,
            session_expiry_s=session_expiry_s,
            maximum_qos=maximum_qos,
            shared_subscriptions=shared_subscriptions,
        )
        self._note(found, replace=_CONNACK_SHORTFALLS)
        self._resuming = s.protocol == "3.1.1" or s.session_expiry_s > 0

    def subscribed(self, granted: Sequence[int | None]) -> None:
        """A SUBACK answered the subscription (granted QoS per filter, None where refused)."""
        self._note(broker_shortfalls(self._settings, resuming=False, granted=granted), replace=_SUBACK_SHORTFALLS)

    def _note(self, shortfalls: Sequence[Shortfall], *, replace: Sequence[str]) -> None:
        for kind in replace:
            self.current.pop(kind, None)
        for kind, detail in shortfalls:
            self.current[kind] = detail
            INGEST_METRICS.broker_shortfalls.labels(kind).inc()
            if kind not in self._said:
                self._said.add(kind)
                log.warning("MQTT broker shortfall (%s): %s", kind, detail)

    def summary(self) -> str:
        return "; ".join(self.current.values())


_CONNACK_SHORTFALLS = ("session_not_resumed", "session_expiry_reduced", "shared_subscriptions_unavailable")
_SUBACK_SHORTFALLS = ("qos_downgraded",)


class MqttSource(Protocol):
    """What the bridge needs from an MQTT subscription (entered with ``async with``).

    Entering returns once the broker accepted the connection, before SUBACK: a broker may hold
    the SUBACK behind a resumed session's queued messages, which only the running bridge acks.
    """

    reconnects: int
    last_error: str

    @property
    def connected(self) -> bool: ...

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; waits at most ``wait_s`` for the first one."""
        ...

    def ack(self, inbound: Inbound) -> bool:
        """Acknowledge a QoS 1/2 message if it belongs to the current connection; False if skipped."""
        ...

    def ack_all(self, inbound: list[Inbound]) -> int:
        """:meth:`ack` each message, in order; returns how many were acknowledged."""
        return sum(map(self.ack, inbound))

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0 (commands: a lost one is asked again); False when not connected."""
        ...


class PahoMqttSource(MqttSource):
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
        self._offline = b""
        self._queue: queue.Queue[Inbound] = queue.Queue(maxsize=max_in_flight)
        self._connect_timeout_s = connect_timeout_s
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._subscribe_attempts = 0
        self._broker_ids: set[int] = set()  # packet ids of the broker's messages not yet acked
        self.shortfalls = BrokerShortfalls(settings)
        self._stopping = False
        self._waiting = False
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reconnects = 0
        self.last_error = ""
        self.auth_failed = False
        self.denied: ConfigError | None = None  # raised by get_batch: the ACL forbids the subscription
        self._tls: ssl.SSLContext | None = None
        self._client = self._make_client()

    # ------------------------------------------------------------ paho setup

    def _make_client(self) -> paho.Client:
        s = self._settings
        v5 = s.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if (context := mqtt_ssl_context(s)) is not None:
            # paho keeps this context for every reconnect: rotated files need a restart
            client.tls_set_context(context)
            self._tls = context
        client.reconnect_delay_set(
            min_delay=max(1, round(s.reconnect_min_s)), max_delay=max(1, round(s.reconnect_max_s))
        )
        client.max_inflight_messages_set(65535)
        if self._presence is not None:
            # paho keeps one will for every reconnect: its timestamp is the first connection's
            self._offline, self._online = self._presence.payloads()
            client.will_set(self._presence.topic, self._offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties | None:
        if self._settings.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.session_expiry_s
        props.ReceiveMaximum = min(65535, max(1, self._queue.maxsize))
        return props

    # ------------------------------------------------------------ callbacks (paho thread)

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"MQTT connect refused: {reason}"
            if str(reason) in {"Not authorized", "Bad user name or password"}:
                self.auth_failed = True
            log.error("%s", self.last_error)
            return
        self._subscribed.clear()
        self._broker_ids.clear()
        INGEST_METRICS.mqtt_subscribed.set(0)
        shared = getattr(props, "SharedSubscriptionAvailable", None)  # paho sets only what the broker sent
        self.shortfalls.connected(
            session_present=bool(flags.session_present),
            session_expiry_s=getattr(props, "SessionExpiryInterval", None),
            maximum_qos=getattr(props, "MaximumQoS", None),
            shared_subscriptions=None if shared is None else bool(shared),
        )
        self._generation += 1
        if self._generation > 1:
            self.reconnects += 1
            INGEST_METRICS.reconnects.inc()
            log.warning(
                "reconnected to MQTT %s:%d (session present: %s); resubscribing",
                self._settings.host,
                self._settings.port,
                flags.session_present,
            )
        self._subscribe_attempts = 0
        self._subscribe(client)
        if self._presence is not None:
            client.publish(self._presence.topic, self._online, qos=1, retain=True)
        self._connected.set()
        INGEST_METRICS.mqtt_connected.set(1)

    def _subscribe(self, client: paho.Client) -> None:
        # paho takes the packet id from its own counter (never a fixed value).
        self._subscribe_attempts += 1
        client.subscribe([(f, self._settings.qos) for f in subscription_filters(self._settings)])

    def _on_subscribe(self, client: paho.Client, _u: Any, mid: int, reason_codes: Any, _props: Any) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if subscribe_id_refused(failed, mid, self._broker_ids) and self._subscribe_attempts < MAX_SUBSCRIBE_ATTEMPTS:
            log.info("MQTT broker refused SUBSCRIBE id %d (%s); subscribing again", mid, failed[0])
            self._subscribe(client)
            return
        if failed:
            self.last_error = f"MQTT subscription refused: {', '.join(failed)}"
            log.error("%s", self.last_error)
            self.denied = subscription_denied(self._settings, [f.lower() for f in failed])
        self.shortfalls.subscribed([None if rc.is_failure else rc.value for rc in reason_codes])
        self._subscribed.set()
        INGEST_METRICS.mqtt_subscribed.set(1)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        INGEST_METRICS.mqtt_connected.set(0)
        INGEST_METRICS.mqtt_subscribed.set(0)
        if not self._stopping:
            self.last_error = f"MQTT disconnected: {reason}"
            log.warning("%s; paho reconnects with backoff", self.last_error)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        inbound = Inbound(Message(msg.topic, bytes(msg.payload), time.time_ns()), msg.mid, msg.qos, self._generation)
        if msg.qos:
            self._broker_ids.add(msg.mid)
        while not self._stopping:
            try:
                self._queue.put(inbound, timeout=0.5)  # blocks paho when full: backpressure to the broker
                break
            except queue.Full:
                continue
        if self._waiting and self._loop is not None and self._wakeup is not None:
            self._waiting = False
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # ------------------------------------------------------------ asyncio side

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    @property
    def generation(self) -> int:
        return self._generation

    async def __aenter__(self) -> PahoMqttSource:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        s = self._settings
        kwargs: dict[str, Any] = {"keepalive": s.keepalive_s}
        if s.protocol == "5":
            kwargs["clean_start"] = False
            kwargs["properties"] = self._connect_properties()
        if self._tls is not None and (refused := await asyncio.to_thread(tls_preflight, s, self._tls)) is not None:
            raise refused  # paho would only report "Unspecified error" and retry
        try:
            self._client.connect_async(s.host, s.port, **kwargs)
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError("mqtt", f"{s.host}:{s.port}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + self._connect_timeout_s
        # Up at CONNACK, not SUBACK (see MqttSource): messages before the SUBACK are processed.
        while not self._connected.is_set():
            if self.auth_failed:
                # Retrying cannot fix credentials: one attempt, then a clear error (exit code 2).
                await self._shutdown()
                raise credentials_refused(s, self.last_error)
            if time.monotonic() > deadline:
                await self._shutdown()
                raise ServiceUnavailableError("mqtt", self.last_error or f"no connection to {s.host}:{s.port}")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0; False when not connected."""
        return self._connected.is_set() and self._client.publish(topic, payload, qos=0).rc == paho.MQTT_ERR_SUCCESS

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._presence is not None and self._connected.is_set():
            # a clean DISCONNECT discards the will: say offline ourselves
            self._client.publish(self._presence.topic, self._offline, qos=1, retain=True).wait_for_publish(2.0)
        self._client.disconnect()
        self._client.loop_stop()  # joins paho's thread; it wakes within 0.5 s even if blocked on a full queue

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; waits at most ``wait_s`` for the first one."""
        if self.denied is not None:
            raise self.denied
        out: list[Inbound] = []
        try:
            while len(out) < max_messages:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if out or self._wakeup is None:
            return out
        self._wakeup.clear()
        self._waiting = True
        try:
            if self._queue.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
        finally:  # cancelled too (the bridge stops waiting when a delivery completes)
            self._waiting = False
        try:
            while len(out) < max_messages:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return out

    def ack(self, inbound: Inbound) -> bool:
        """Acknowledge a QoS 1/2 message if it belongs to the current connection; False if skipped."""
        if inbound.qos == 0:
            return True
        if inbound.generation != self._generation or not self._connected.is_set():
            return False  # the broker redelivers it on the new connection
        self._broker_ids.discard(inbound.mid)
        self._client.ack(inbound.mid, inbound.qos)
        return True
