"""The asyncio MQTT client's session logic, driven packet by packet through a fake transport.

What the broker interop matrix found, pinned down without a broker: messages that follow
CONNACK flow before SUBACK, SUBSCRIBE avoids the broker's packet ids and is sent again when
refused for its id, and what the broker did not grant is reported once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from prometheus_client import REGISTRY

from portpulse.codecs.mqttwire import (
    PUBACK_TYPE,
    PUBCOMP_TYPE,
    PUBREC_TYPE,
    encode_publish,
    remaining_length,
)
from portpulse.contract.errors import ConfigError
from portpulse.contract.settings import MqttSettings
from portpulse.ingest.mqtt import broker_shortfalls, subscribe_id_refused
from portpulse.ingest.mqtt_asyncio import AsyncioMqttSource, ReadCoalescer, _Connection


class FakeTransport(asyncio.Transport):
    """Collects what the client writes; the test plays the broker."""

    def __init__(self, sock: Any = None) -> None:
        super().__init__({"socket": sock} if sock is not None else None)
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def take(self) -> list[tuple[int, bytes]]:
        """The packets written since the last call, as (first byte, body)."""
        out, buf, pos = [], bytes(self.written), 0
        self.written.clear()
        while pos < len(buf):
            length, shift, at = 0, 0, pos + 1
            while True:
                byte = buf[at]
                length |= (byte & 0x7F) << shift
                at += 1
                shift += 7
                if byte < 0x80:
                    break
            out.append((buf[pos], buf[at : at + length]))
            pos = at + length
        return out


def connack(session_present: bool, v5: bool, props: bytes = b"") -> bytes:
    body = bytes([int(session_present), 0]) + ((remaining_length(len(props)) + props) if v5 else b"")
    return b"\x20" + remaining_length(len(body)) + body


def suback(packet_id: int, codes: bytes, v5: bool) -> bytes:
    body = packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"") + codes
    return b"\x90" + remaining_length(len(body)) + body


def subscribe_ids(packets: list[tuple[int, bytes]]) -> list[int]:
    return [int.from_bytes(body[:2], "big") for first, body in packets if first == 0x82]


def connection(source: AsyncioMqttSource, generation: int = 1) -> tuple[_Connection, FakeTransport]:
    conn = _Connection(source, generation)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_queued_session_flows_before_suback_and_subscribe_avoids_the_brokers_ids(protocol: str) -> None:
    v5 = protocol == "5"
    source = AsyncioMqttSource(MqttSettings(protocol=protocol, subscriptions=("s/#",), qos=1), max_in_flight=100)
    conn, transport = connection(source)
    queued = b"".join(encode_publish(f"s/{i}", b"x", qos=1, packet_id=i, v5=v5) for i in (1, 2))
    conn.data_received(connack(True, v5) + queued)

    assert conn.connack.done() and conn.connack.result().session_present
    [sub_id] = subscribe_ids(transport.take())
    assert sub_id not in {1, 2}, "SUBSCRIBE reused a packet id the broker holds"
    assert not source.subscribed
    # The queued messages are handed on and acknowledged without waiting for the SUBACK.
    batch = await source.get_batch(10, 0.01)
    assert [b.message.topic for b in batch] == ["s/1", "s/2"]
    assert all(source.ack(b) for b in batch)
    await asyncio.sleep(0)  # acks leave together once the caller yields
    assert transport.take() == [(PUBACK_TYPE, b"\x00\x01"), (PUBACK_TYPE, b"\x00\x02")]

    conn.data_received(suback(sub_id, b"\x01", v5))
    assert source.subscribed
    assert source.shortfalls.current == {}


async def test_a_delivery_is_acknowledged_at_once_in_order_and_only_on_its_own_connection() -> None:
    """What one read brings is handed on as it arrived, and a delivery's acks leave in its order;
    a QoS 0 message needs none and a message of an earlier connection gets none (the broker sends
    it again on this one)."""
    source = AsyncioMqttSource(MqttSettings(subscriptions=("s/#",), qos=1), max_in_flight=100)
    conn, transport = connection(source)
    sent = [("s/a", b"1", 1, 7), ("s/b", b"22", 1, 300), ("s/c", b"", 0, 0), ("s/d", b"4", 1, 65535)]
    conn.data_received(
        connack(True, True) + b"".join(encode_publish(t, p, qos=q, packet_id=i, v5=True) for t, p, q, i in sent)
    )
    transport.take()
    batch = await source.get_batch(10, 0.01)
    assert [(b.message.topic, b.message.payload, b.qos, b.mid, b.generation) for b in batch] == [
        (t, p, q, i, 1) for t, p, q, i in sent
    ]
    assert len({b.message.received_ns for b in batch}) == 1 and isinstance(batch[0].message.received_ns, int)
    assert source._broker_ids == {7, 300, 65535}
    qos1 = [b for b in batch if b.qos == 1]
    assert source.ack_all(qos1[::-1]) == 3
    await asyncio.sleep(0)
    assert transport.take() == [(PUBACK_TYPE, b"\xff\xff"), (PUBACK_TYPE, b"\x01\x2c"), (PUBACK_TYPE, b"\x00\x07")]
    assert source._broker_ids == set()
    earlier = qos1[0]._replace(generation=0)
    assert source.ack_all([earlier, qos1[1]]) == 1
    assert source.ack_all([batch[2]]) == 1  # QoS 0: acknowledged by taking it
    await asyncio.sleep(0)
    assert transport.take() == [(PUBACK_TYPE, b"\x01\x2c")]


async def test_a_subscribe_refused_for_its_packet_id_is_sent_again_with_another() -> None:
    source = AsyncioMqttSource(MqttSettings(subscriptions=("s/#",)), max_in_flight=100)
    conn, transport = connection(source)
    conn.data_received(connack(True, True))
    [first] = subscribe_ids(transport.take())
    # The broker's own message took the id meanwhile (mochi shares one id space per session).
    conn.data_received(encode_publish("s/a", b"x", qos=1, packet_id=first + 1, v5=True))
    conn.data_received(suback(first, b"\x91", True))  # packet identifier in use
    [second] = subscribe_ids(transport.take())
    assert second not in {first, first + 1}
    assert not source.subscribed and source.last_error == ""
    conn.data_received(suback(second, b"\x01", True))
    assert source.subscribed


async def test_a_refusal_that_is_not_about_the_id_is_reported_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    source = AsyncioMqttSource(MqttSettings(subscriptions=("s/#",)), max_in_flight=100)
    conn, transport = connection(source)
    conn.data_received(connack(False, True))
    [sub_id] = subscribe_ids(transport.take())
    with caplog.at_level(logging.ERROR, "portpulse.mqtt"):
        conn.data_received(suback(sub_id, b"\x87", True))  # not authorized
    assert subscribe_ids(transport.take()) == []
    assert source.last_error == "MQTT subscription refused: not authorized"
    assert "not authorized" in caplog.text
    # the broker's ACL forbids what the bridge is for: it stops with the cause
    with pytest.raises(
        ConfigError, match=r"denied this client .* the subscription to s/# \(not authorized: the broker's ACL\)"
    ):
        await source.get_batch(10, 0.01)


async def test_a_refusal_for_another_reason_is_reported_and_the_bridge_goes_on() -> None:
    source = AsyncioMqttSource(MqttSettings(subscriptions=("s/#",)), max_in_flight=100)
    conn, transport = connection(source)
    conn.data_received(connack(False, True))
    [sub_id] = subscribe_ids(transport.take())
    conn.data_received(suback(sub_id, b"\x9e", True))  # shared subscriptions not supported
    assert source.last_error.startswith("MQTT subscription refused:")
    assert await source.get_batch(10, 0.01) == []


async def test_qos2_is_released_only_after_the_ack_and_its_id_stays_taken_until_pubrel() -> None:
    source = AsyncioMqttSource(MqttSettings(subscriptions=("s/#",), qos=2), max_in_flight=100)
    conn, transport = connection(source)
    conn.data_received(connack(False, True) + encode_publish("s/a", b"x", qos=2, packet_id=1, v5=True))
    transport.take()
    [inbound] = await source.get_batch(10, 0.01)
    source.ack(inbound)
    await asyncio.sleep(0)
    assert transport.take() == [(PUBREC_TYPE, b"\x00\x01")]
    assert source._next_packet_id() != 1  # PUBREC sent, PUBREL not yet: the id is the broker's
    conn.data_received(b"\x62\x02\x00\x01")  # PUBREL
    assert transport.take() == [(PUBCOMP_TYPE, b"\x00\x01")]
    assert 1 not in source._broker_ids


async def test_what_the_broker_did_not_grant_is_said_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    settings = MqttSettings(subscriptions=("s/#",), qos=1, shared_group="g", session_expiry_s=3600)
    source = AsyncioMqttSource(settings, max_in_flight=100)
    before = REGISTRY.get_sample_value("portpulse_ingest_mqtt_broker_shortfalls_total", {"kind": "session_not_resumed"})
    with caplog.at_level(logging.WARNING, "portpulse.mqtt"):
        for generation in (1, 2, 3):
            conn, transport = connection(source, generation)
            # expiry 60 s, shared subscriptions unavailable; never a session present
            conn.data_received(connack(False, True, b"\x11\x00\x00\x00\x3c\x2a\x00"))
            [sub_id] = subscribe_ids(transport.take())
            conn.data_received(suback(sub_id, b"\x00", True))  # QoS 0 granted
    assert set(source.shortfalls.current) == {
        "session_not_resumed",
        "session_expiry_reduced",
        "shared_subscriptions_unavailable",
        "qos_downgraded",
    }
    assert "60 s" in source.shortfalls.current["session_expiry_reduced"]
    after = REGISTRY.get_sample_value("portpulse_ingest_mqtt_broker_shortfalls_total", {"kind": "session_not_resumed"})
    assert (after or 0) - (before or 0) == 2  # the first connection had no session to resume
    said = [r.getMessage() for r in caplog.records if "shortfall" in r.getMessage()]
    assert len([m for m in said if "session_not_resumed" in m]) == 1
    assert len([m for m in said if "qos_downgraded" in m]) == 1


def test_shortfalls_are_only_what_was_asked_and_refused() -> None:
    plain = MqttSettings(qos=1, session_expiry_s=600)
    assert broker_shortfalls(plain, resuming=True, session_present=True, session_expiry_s=600, granted=[1]) == []
    # No shared group asked: a broker without shared subscriptions is fine.
    assert broker_shortfalls(plain, resuming=False, shared_subscriptions=False) == []
    # Maximum QoS below the subscription's QoS is a downgrade even before the SUBACK.
    [downgrade] = broker_shortfalls(plain, resuming=False, maximum_qos=0)
    assert downgrade.kind == "qos_downgraded" and "lost" in downgrade.detail
    # A refused filter is an error of its own, not a downgrade.
    assert broker_shortfalls(plain, resuming=False, granted=[None, 1]) == []


def test_a_refusal_is_about_the_id_when_the_broker_says_so_or_holds_the_id() -> None:
    # MQTT 5 reason 0x91, as our codec and as paho spell it
    assert subscribe_id_refused(["", "packet identifier in use"], 7, set())
    assert subscribe_id_refused(["Packet identifier in use"], 7, set())
    # MQTT 3.1.1 can only say "failure": about the id if the broker now uses it for a message to us
    assert subscribe_id_refused(["unspecified error"], 7, {7})
    assert not subscribe_id_refused(["unspecified error"], 7, {8})
    assert not subscribe_id_refused(["", ""], 7, {7})  # granted
    assert not subscribe_id_refused(["not authorized"], 7, set())


class MarkedSocket:
    """Records the receive low-water marks set on it; ``closing`` makes setsockopt fail."""

    def __init__(self, closing: bool = False) -> None:
        self.marks: list[int] = []
        self.closing = closing

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        if self.closing:
            raise OSError("closed")
        self.marks.append(value)


class HandTimer:
    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class HandTimers:
    """``call_later`` whose callbacks the test fires by hand, in order."""

    def __init__(self) -> None:
        self.pending: list[HandTimer] = []

    def call_later(self, delay: float, callback: Any) -> HandTimer:
        assert delay == 0.002
        self.pending.append(HandTimer(callback))
        return self.pending[-1]

    def fire(self) -> None:
        timer = self.pending.pop(0)
        assert not timer.cancelled
        timer.callback()

    def live(self) -> int:
        return sum(not t.cancelled for t in self.pending)


def test_short_reads_raise_the_mark_until_a_tick_passes_without_a_read() -> None:
    sock, timers = MarkedSocket(), HandTimers()
    coalescer = ReadCoalescer(sock, 2048, 0.002, timers)  # type: ignore[arg-type]
    coalescer.read(4096)  # a full read: nothing to gather
    assert sock.marks == [] and not coalescer.coalescing
    coalescer.read(100)
    assert sock.marks == [2048] and coalescer.coalescing and timers.live() == 1
    coalescer.read(2600)
    coalescer.read(300)  # short again while coalescing: no second mark, no second tick
    assert sock.marks == [2048] and timers.live() == 1
    timers.fire()  # reads since the last tick: keep gathering
    assert sock.marks == [2048] and coalescer.coalescing and timers.live() == 1
    timers.fire()  # none: back to one byte, which wakes the reader for what waits
    assert sock.marks == [2048, 1] and not coalescer.coalescing and timers.live() == 0
    coalescer.read(60)
    assert sock.marks == [2048, 1, 2048] and timers.live() == 1
    coalescer.close()
    assert timers.live() == 0 and not coalescer.coalescing
    coalescer.read(60)  # after close: nothing is set on a socket that is gone
    assert sock.marks == [2048, 1, 2048] and timers.live() == 0


def test_without_a_socket_or_on_a_closing_one_every_arrival_wakes_the_reader() -> None:
    timers = HandTimers()
    ReadCoalescer(None, 2048, 0.002, timers).read(10)  # type: ignore[arg-type]
    closing = MarkedSocket(closing=True)
    coalescer = ReadCoalescer(closing, 2048, 0.002, timers)  # type: ignore[arg-type]
    coalescer.read(10)
    coalescer.read(10)
    assert timers.live() == 0 and not coalescer.coalescing and closing.marks == []


@pytest.mark.parametrize(("read_batch_bytes", "marks"), [(2048, [2048]), (0, [])])
async def test_a_connection_gathers_reads_as_configured_and_stops_its_tick_when_lost(
    read_batch_bytes: int, marks: list[int]
) -> None:
    source = AsyncioMqttSource(MqttSettings(read_batch_bytes=read_batch_bytes), max_in_flight=100)
    sock = MarkedSocket()
    conn = _Connection(source, 1)
    conn.connection_made(FakeTransport(sock))
    conn.data_received(connack(False, True))
    assert sock.marks == marks
    conn.connection_lost(None)
    # the tick, if any, is cancelled: a lost connection never touches its socket again
    await asyncio.sleep(0.01)
    assert sock.marks == marks
