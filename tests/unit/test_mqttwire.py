"""MQTT packet codec: encoding against the spec's bytes, the reader against the encoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.codecs.mqttwire import (
    CONNACK,
    PUBACK_TYPE,
    PUBREC_TYPE,
    SUBACK,
    ConnAck,
    MalformedPacketError,
    PacketReader,
    Publish,
    SubAck,
    encode_ack,
    encode_acks,
    encode_connect,
    encode_publish,
    encode_subscribe,
    parse_connack,
    parse_properties,
    parse_suback,
    remaining_length,
)


def test_remaining_length_is_the_spec_varint() -> None:
    assert remaining_length(0) == b"\x00"
    assert remaining_length(127) == b"\x7f"
    assert remaining_length(128) == b"\x80\x01"
    assert remaining_length(16_383) == b"\xff\x7f"
    assert remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


def test_connect_v311_bytes() -> None:
    packet = encode_connect("c1", v5=False, clean_start=False, keepalive_s=30, username="u", password="p")
    # type, length, "MQTT", level 4, flags user+password (no clean session), keepalive 30, id, user, password
    assert packet == b"\x10\x14\x00\x04MQTT\x04\xc0\x00\x1e\x00\x02c1\x00\x01u\x00\x01p"


def test_connect_v5_carries_session_expiry_and_receive_maximum() -> None:
    packet = encode_connect("c", v5=True, clean_start=False, keepalive_s=10, session_expiry_s=600, receive_maximum=99)
    props = b"\x08\x11\x00\x00\x02\x58\x21\x00\x63"  # length 8, expiry 600 s, receive maximum 99
    header = b"\x00\x04MQTT\x05\x00\x00\x0a"  # level 5, no flags, keepalive 10
    assert packet == b"\x10" + remaining_length(len(header) + len(props) + 3) + header + props + b"\x00\x01c"


def test_subscribe_and_acks() -> None:
    assert encode_subscribe(7, [("a/#", 1)], v5=False) == b"\x82\x08\x00\x07\x00\x03a/#\x01"
    assert encode_subscribe(7, [("a/#", 1)], v5=True) == b"\x82\x09\x00\x07\x00\x00\x03a/#\x01"
    assert encode_ack(PUBACK_TYPE, 258) == b"\x40\x02\x01\x02"
    ids = [1, 258, 65535, 7]
    assert encode_acks(PUBACK_TYPE, ids) == b"".join(encode_ack(PUBACK_TYPE, i) for i in ids)
    assert encode_acks(PUBREC_TYPE, [3]) == b"\x50\x02\x00\x03" and encode_acks(PUBACK_TYPE, []) == b""


def test_connack_and_suback_reasons() -> None:
    assert parse_connack(b"\x01\x00", v5=False).session_present
    assert parse_connack(b"\x00\x04", v5=False).reason == "bad user name or password"
    assert parse_connack(b"\x00\x87\x00", v5=True).reason == "not authorized"
    assert parse_suback(b"\x00\x01\x01\x80", v5=False) == SubAck(1, [1, None], ["", "unspecified error"])
    assert parse_suback(b"\x00\x02\x00\x02\x9e", v5=True) == SubAck(
        2, [2, None], ["", "shared subscriptions not supported"]
    )
    assert parse_suback(b"\x00\x03\x00\x00\x91", v5=True).refusals == ["", "packet identifier in use"]


def test_connack_v5_properties_a_subscriber_checks() -> None:
    # session present, accepted; properties: expiry 60 s, a reason string, a user property,
    # receive maximum 10, maximum QoS 1, shared subscriptions unavailable
    props = (
        b"\x11\x00\x00\x00\x3c"
        + b"\x1f\x00\x02ok"
        + b"\x26\x00\x01k\x00\x01v"
        + b"\x21\x00\x0a"
        + b"\x24\x01"
        + b"\x2a\x00"
    )
    ack = parse_connack(b"\x01\x00" + remaining_length(len(props)) + props, v5=True)
    assert ack == ConnAck(True, "", session_expiry_s=60, maximum_qos=1, shared_subscriptions=False)
    # No properties: the spec's defaults apply, none is reported.
    assert parse_connack(b"\x00\x00\x00", v5=True) == ConnAck(False, "")
    with pytest.raises(MalformedPacketError, match="past"):
        parse_connack(b"\x00\x00\x05\x11\x00\x00", v5=True)
    with pytest.raises(MalformedPacketError, match="unknown MQTT 5 property"):
        parse_properties(b"\x7f\x00", 0, 2)


publishes = st.lists(
    st.builds(
        lambda topic, payload, qos, pid: Publish(topic, payload, qos, pid if qos else 0),
        st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
        st.binary(max_size=400),
        st.integers(0, 2),
        st.integers(1, 65535),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(publishes, st.booleans(), st.lists(st.integers(1, 500), max_size=10), st.data())
def test_reader_returns_every_packet_whatever_the_read_boundaries(
    messages: list[Publish], v5: bool, cuts: list[int], data: st.DataObject
) -> None:
    ping = b"\xd0\x00"  # PINGRESP between the publishes
    stream = b"".join(
        encode_publish(m.topic, m.payload, qos=m.qos, packet_id=m.packet_id, v5=v5) + ping for m in messages
    )
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    reader = PacketReader(v5=v5)
    got: list[Publish] = []
    control: list[tuple[int, bytes]] = []
    for piece in pieces:
        p, c = reader.feed(piece)
        got += p
        control += c
    assert got == messages
    assert control == [(13, b"")] * len(messages)
    assert reader.buffered == 0


def test_reader_skips_v5_publish_properties_and_keeps_control_packets() -> None:
    # PUBLISH QoS 1, topic "t", id 5, properties: payload format indicator = 1 (2 bytes), payload "x"
    packet = b"\x32\x09\x00\x01t\x00\x05\x02\x01\x01x"
    connack = b"\x20\x03\x00\x00\x00"
    suback = b"\x90\x04\x00\x01\x00\x01"
    publishes_, control = PacketReader(v5=True).feed(connack + suback + packet)
    assert publishes_ == [Publish("t", b"x", 1, 5)]
    assert control == [(CONNACK, b"\x00\x00\x00"), (SUBACK, b"\x00\x01\x00\x01")]


def test_reader_collects_a_large_packet_across_many_reads() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    packet = encode_publish("big/one", payload, qos=1, packet_id=9)
    reader = PacketReader(v5=False)
    got: list[Publish] = []
    for at in range(0, len(packet), 1000):
        got += reader.feed(packet[at : at + 1000])[0]
        assert reader.buffered == (at + 1000 if at + 1000 < len(packet) else 0)
    assert got == [Publish("big/one", payload, 1, 9)]


@pytest.mark.parametrize(
    "stream",
    [
        b"\x36\x03\x00\x01t",  # QoS 3
        b"\x30\x01\x00",  # no room for a topic length
        b"\x32\x04\x00\x09ab",  # topic longer than the packet
        b"\x00\x00",  # reserved packet type 0
        b"\x30\xff\xff\xff\xff\x01",  # 5-byte remaining length
    ],
)
def test_reader_rejects_what_is_not_mqtt(stream: bytes) -> None:
    with pytest.raises(MalformedPacketError):
        PacketReader(v5=False).feed(stream)


class _Message(NamedTuple):
    topic: str
    payload: bytes
    received_ns: int


class _Inbound(NamedTuple):
    message: _Message
    mid: int
    qos: int
    generation: int


def test_the_compiled_packet_splitter_is_built() -> None:
    """``make install`` builds it (setup.py); its PUBLISHes are :class:`Publish` like the Python
    loop's."""
    from portpulse.codecs import mqttwire

    assert mqttwire.PACKET_SPLITTER == "compiled"
    stream = encode_publish("a/b", b"x", qos=1, packet_id=7, v5=True) + b"\xd0\x00"
    publishes_, control, pos, need = mqttwire.split_packets(stream + b"\x30\x09\x00", True)
    assert publishes_ == [Publish("a/b", b"x", 1, 7)] and type(publishes_[0]) is Publish
    assert publishes_[0].topic == "a/b" and publishes_[0].packet_id == 7
    assert control == [(13, b"")] and (pos, need) == (len(stream), 11)

    shape = mqttwire.Received(_Inbound, _Message, 4)
    received, control, pos, need = mqttwire.split_received(stream + b"\x30\x09\x00", True, shape, 123)
    assert received == [_Inbound(_Message("a/b", b"x", 123), 7, 1, 4)]
    assert type(received[0]) is _Inbound and type(received[0].message) is _Message
    assert control == [(13, b"")] and (pos, need) == (len(stream), 11)


_STREAMS = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda packets, cut, flip: bytes(
            b ^ (flip[1] if k == flip[0] else 0) for k, b in enumerate(b"".join(packets)[: cut or None])
        ),
        st.lists(
            st.builds(
                lambda topic, payload, qos, v5: encode_publish(topic, payload, qos=qos, packet_id=3, v5=v5),
                st.text(max_size=8),
                st.binary(max_size=20),
                st.integers(0, 2),
                st.booleans(),
            )
            | st.sampled_from(
                # PINGRESP, CONNACK, SUBACK; PUBLISHes: no room for a topic length, no room for a
                # packet id, properties longer than the packet, a four-byte properties length
                [
                    b"\xd0\x00",
                    b"\x20\x03\x00\x00\x00",
                    b"\x90\x03\x00\x01\x00",
                    b"\x30\x01\x00",
                    b"\x32\x02\x00\x00",
                    b"\x30\x04\x00\x00\x05x",
                    b"\x30\x07\x00\x00\x80\x80\x80\x80\x01",
                ]
            ),
            max_size=5,
        ),
        st.integers(0, 200),
        st.tuples(st.integers(0, 120), st.integers(0, 255)),
    ),
)


@settings(max_examples=3000, deadline=None)
@given(stream=_STREAMS, v5=st.booleans())
def test_the_compiled_packet_splitter_does_what_the_python_loop_does(stream: bytes, v5: bool) -> None:
    """Whatever bytes arrive (valid, cut short, one byte flipped, random): the same packets, the
    same incomplete rest, or the same error."""
    from portpulse.codecs import mqttwire

    def outcome(split: Callable[[bytes, bool], object]) -> object:
        try:
            return split(stream, v5)
        except MalformedPacketError as exc:
            return str(exc)

    assert outcome(mqttwire.split_packets) == outcome(mqttwire._split_python)

    shape = mqttwire.Received(_Inbound, _Message, 2)
    compiled = outcome(lambda b, v: mqttwire.split_received(b, v, shape, 10**18))
    assert compiled == outcome(lambda b, v: mqttwire._split_received_python(b, v, shape, 10**18))
    if isinstance(compiled, tuple):
        assert all(type(i) is _Inbound and type(i.message) is _Message for i in compiled[0])
