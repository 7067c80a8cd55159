"""MQTT 3.1.1 / 5 packet encoding and an incremental packet reader (pure, no I/O).

Only what a subscriber and a load generator need: CONNECT, SUBSCRIBE, PUBLISH, the
acknowledgements, PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH, PUBREL, PINGRESP and
DISCONNECT in. The reader takes whatever the socket delivered and returns every complete packet
in it, so a 64 KiB read of small PUBLISH packets costs one call instead of three syscalls each.

Every packet (big-endian; MQTT 3.1.1 section 2, MQTT 5 section 2)::

    | type << 4 | flags | remaining length: 1-4 bytes, 7 bits each, low first | rest ... |

    PUBLISH rest:  u16 topic length, topic, [u16 packet id if QoS > 0],
                   [v5: varint properties length, properties], payload
    PUBACK/PUBREC/PUBREL/PUBCOMP rest: u16 packet id [v5: reason code, properties]
    SUBACK rest:   u16 packet id, [v5: properties], one reason code per filter
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "AUTH_REFUSALS",
    "CONNACK",
    "DISCONNECT",
    "DISCONNECT_PACKET",
    "PINGREQ",
    "PINGRESP",
    "PUBACK_TYPE",
    "PUBCOMP_TYPE",
    "PUBLISH",
    "PUBREC_TYPE",
    "PUBREL",
    "SUBACK",
    "ConnAck",
    "MalformedPacketError",
    "PacketReader",
    "Publish",
    "Received",
    "SubAck",
    "connack_reason",
    "encode_ack",
    "encode_connect",
    "encode_publish",
    "encode_subscribe",
    "parse_connack",
    "parse_properties",
    "parse_suback",
    "remaining_length",
]

# Packet types (high nibble of the first byte).
CONNACK, PUBLISH, PUBREL, SUBACK, PINGRESP, DISCONNECT = 2, 3, 6, 9, 13, 14
PINGREQ = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # v3.1.1, and v5's "normal disconnection" short form

_PROP_SESSION_EXPIRY = 0x11
_PROP_RECEIVE_MAXIMUM = 0x21
_PROP_MAXIMUM_QOS = 0x24
_PROP_SHARED_SUBSCRIPTIONS = 0x2A
# MQTT 5 property identifiers by value type (section 2.2.2.2), to step over the ones not read.
_PROPS_BYTE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_PROPS_U16 = frozenset({0x13, 0x21, 0x22, 0x23})
_PROPS_U32 = frozenset({0x02, 0x11, 0x27})
_PROPS_VARINT = frozenset({0x0B})
_PROPS_STRING = frozenset({0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F})  # strings and binary data
_PROP_USER = 0x26  # a string pair
_ID = struct.Struct("!H")
_ACK = struct.Struct("!BBH")  # type byte, remaining length 2, packet id

# Packet types acknowledging a received PUBLISH: PUBACK for QoS 1, PUBREC for QoS 2; PUBCOMP
# answers PUBREL.
PUBACK_TYPE, PUBREC_TYPE, PUBCOMP_TYPE = 0x40, 0x50, 0x70

_V3_CONNACK = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_V5_REASONS = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x8F: "topic filter invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported",
    0xA2: "wildcard subscriptions not supported",
}
AUTH_REFUSALS = frozenset({"bad user name or password", "not authorized", "bad authentication method"})


class MalformedPacketError(ValueError):
    """The byte stream is not MQTT (the connection must be closed)."""


def remaining_length(n: int) -> bytes:
    """MQTT variable byte integer (1-4 bytes) for ``n`` < 268,435,456."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    return _ID.pack(len(b)) + b


def encode_connect(
    client_id: str,
    *,
    v5: bool,
    clean_start: bool,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
    session_expiry_s: int = 0,
    receive_maximum: int = 65535,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT; for v5 with Session Expiry Interval (s) and Receive Maximum (messages) properties.
    ``will``: (topic, payload) the broker publishes, retained at QoS 1, if the connection is lost."""
    flags = 0x02 if clean_start else 0
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20  # will, will QoS 1, will retain
        payload += (b"\x00" if v5 else b"") + _string(will[0]) + _ID.pack(len(will[1])) + will[1]
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            b = password.encode()
            payload += _ID.pack(len(b)) + b
    var = b"\x00\x04MQTT" + bytes([5 if v5 else 4, flags]) + _ID.pack(keepalive_s)
    if v5:
        props = bytes([_PROP_SESSION_EXPIRY]) + struct.pack("!I", session_expiry_s)
        props += bytes([_PROP_RECEIVE_MAXIMUM]) + _ID.pack(max(1, min(65535, receive_maximum)))
        var += remaining_length(len(props)) + props
    body = var + payload
    return b"\x10" + remaining_length(len(body)) + body


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]], *, v5: bool) -> bytes:
    """SUBSCRIBE for ``(filter, qos)`` pairs."""
    body = _ID.pack(packet_id) + (b"\x00" if v5 else b"")
    for topic_filter, qos in filters:
        body += _string(topic_filter) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def encode_publish(
    topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0, v5: bool = False, retain: bool = False
) -> bytes:
    """One PUBLISH packet (no properties)."""
    t = topic.encode()
    var = _ID.pack(len(t)) + t + (_ID.pack(packet_id) if qos else b"") + (b"\x00" if v5 else b"")
    return bytes([0x30 | (qos << 1) | retain]) + remaining_length(len(var) + len(payload)) + var + payload


def encode_ack(packet_type: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBCOMP (``*_TYPE``) in the 2-byte form both versions accept as success."""
    return _ACK.pack(packet_type, 2, packet_id)


def encode_acks(packet_type: int, packet_ids: list[int]) -> bytes:
    """:func:`encode_ack` of each packet id, one after the other, in one struct call."""
    fields = [packet_type << 8 | 2] * (2 * len(packet_ids))
    fields[1::2] = packet_ids
    return struct.pack(f"!{len(fields)}H", *fields)


class Publish(NamedTuple):
    """A received PUBLISH. ``packet_id`` is 0 for QoS 0. A named tuple: one is made per message
    received, and a frozen dataclass takes three times as long to make."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int


@dataclass(frozen=True, slots=True)
class ConnAck:
    """A CONNACK; the v5 properties a subscriber checks are None when the broker left them out
    (the spec's defaults then apply: the client's own expiry, QoS 2, shared subscriptions on)."""

    session_present: bool
    reason: str  # "" when accepted
    session_expiry_s: int | None = None
    maximum_qos: int | None = None
    shared_subscriptions: bool | None = None


@dataclass(frozen=True, slots=True)
class SubAck:
    """A SUBACK: per filter the granted QoS (None when refused) and the refusal ("" when granted)."""

    packet_id: int
    granted: list[int | None]
    refusals: list[str]


def connack_reason(code: int, *, v5: bool) -> str:
    """Readable CONNACK / SUBACK refusal; "" for success."""
    if code == 0:
        return ""
    table = _V5_REASONS if v5 else _V3_CONNACK
    return table.get(code, f"refused (code 0x{code:02x})")


def parse_properties(buf: bytes, pos: int, end: int) -> dict[int, int | bytes]:
    """MQTT 5 properties in ``buf[pos:end]``: identifier -> integer value, or the raw bytes of
    strings and binary data (a user property keeps its last pair)."""
    out: dict[int, int | bytes] = {}
    try:
        while pos < end:
            ident = buf[pos]
            pos += 1
            if ident in _PROPS_BYTE:
                out[ident], pos = buf[pos], pos + 1
            elif ident in _PROPS_U16:
                out[ident], pos = _ID.unpack_from(buf, pos)[0], pos + 2
            elif ident in _PROPS_U32:
                out[ident], pos = struct.unpack_from("!I", buf, pos)[0], pos + 4
            elif ident in _PROPS_VARINT:
                out[ident], pos = _varint(buf, pos)
            elif ident in _PROPS_STRING or ident == _PROP_USER:
                for _ in range(2 if ident == _PROP_USER else 1):
                    size = _ID.unpack_from(buf, pos)[0]
                    out[ident], pos = bytes(buf[pos + 2 : pos + 2 + size]), pos + 2 + size
            else:
                raise MalformedPacketError(f"unknown MQTT 5 property 0x{ident:02x}")
    except (IndexError, struct.error):
        raise MalformedPacketError("MQTT 5 properties run past the packet") from None
    if pos != end:
        raise MalformedPacketError("MQTT 5 properties run past their length")
    return out


def parse_connack(body: bytes, *, v5: bool) -> ConnAck:
    if len(body) < 2:
        raise MalformedPacketError("CONNACK shorter than 2 bytes")
    ack = ConnAck(bool(body[0] & 1), connack_reason(body[1], v5=v5))
    if not v5 or len(body) < 3:
        return ack
    length, pos = _varint(body, 2)
    props = parse_properties(body, pos, pos + length)
    expiry, max_qos = props.get(_PROP_SESSION_EXPIRY), props.get(_PROP_MAXIMUM_QOS)
    shared = props.get(_PROP_SHARED_SUBSCRIPTIONS)
    return ConnAck(
        ack.session_present,
        ack.reason,
        session_expiry_s=expiry if isinstance(expiry, int) else None,
        maximum_qos=max_qos if isinstance(max_qos, int) else None,
        shared_subscriptions=bool(shared) if isinstance(shared, int) else None,
    )


def parse_suback(body: bytes, *, v5: bool) -> SubAck:
    if len(body) < 3:
        raise MalformedPacketError("SUBACK too short")
    pos = 2
    if v5:
        props, pos = _varint(body, pos)
        pos += props
    codes = body[pos:]
    return SubAck(
        _ID.unpack_from(body)[0],
        [code if code < 0x80 else None for code in codes],
        [connack_reason(code, v5=True) if code >= 0x80 else "" for code in codes],
    )


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(value, position after it); raises IndexError when ``buf`` ends inside it."""
    value, shift = 0, 0
    for _ in range(4):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MalformedPacketError("variable byte integer longer than 4 bytes")


_Split = tuple[list[Publish], list[tuple[int, bytes]], int, int]
#: :data:`_Split` with the PUBLISH packets in a receiver's :class:`Received` shape
_SplitReceived = tuple[list[Any], list[tuple[int, bytes]], int, int]


def _split_python(buf: bytes, v5: bool) -> _Split:
    """The complete packets at the start of ``buf``: (PUBLISHes parsed, other packets as (type,
    body), where the first incomplete packet starts, the bytes it needs in total or 0 when its
    length is not known yet). Raises MalformedPacketError for bytes that are not MQTT."""
    publishes: list[Publish] = []
    control: list[tuple[int, bytes]] = []
    pos, end, need = 0, len(buf), 0
    unpack_id = _ID.unpack_from
    while pos < end:
        first = buf[pos]
        # Remaining length, inlined for the common 1- and 2-byte cases.
        if pos + 1 >= end:
            break
        b1 = buf[pos + 1]
        if b1 < 0x80:
            length, start = b1, pos + 2
        else:
            try:
                length, start = _varint(buf, pos + 1)
            except IndexError:
                break
        stop = start + length
        if stop > end:
            need = stop - pos
            break
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            if qos == 3 or length < 2:
                raise MalformedPacketError("PUBLISH with QoS 3 or no topic")
            try:
                topic_len = unpack_id(buf, start)[0]
                at = start + 2 + topic_len
                topic = buf[start + 2 : at].decode("utf-8", "replace")
                packet_id = 0
                if qos:
                    packet_id = unpack_id(buf, at)[0]
                    at += 2
                if v5:
                    props = buf[at]
                    if props < 0x80:
                        at += 1 + props
                    else:
                        props, at = _varint(buf, at)
                        at += props
            except (IndexError, struct.error):
                at = stop + 1
            if at > stop:
                raise MalformedPacketError("PUBLISH header longer than the packet")
            publishes.append(Publish(topic, buf[at:stop], qos, packet_id))
        elif kind == 0 or (kind == 15 and not v5):
            raise MalformedPacketError(f"unexpected packet type {kind}")
        else:
            control.append((kind, buf[start:stop]))
        pos = stop
    return publishes, control, pos, need


def _compiled_split() -> Callable[..., _SplitReceived] | None:
    try:
        from portpulse.codecs._mqttsplit import split
    except ImportError:  # installed where no C compiler was at hand: the Python loop does it
        return None
    return split


_COMPILED_SPLIT = _compiled_split()
#: the MQTT packet splitter this install runs: "compiled" or "python" (logged at start-up)
PACKET_SPLITTER = "python" if _COMPILED_SPLIT is None else "compiled"


def split_packets(buf: bytes, v5: bool) -> _Split:
    """:func:`_split_python`, compiled when the extension is built (one call per read rather than
    a Python step per packet)."""
    if _COMPILED_SPLIT is None:
        return _split_python(buf, v5)
    try:
        return _COMPILED_SPLIT(buf, v5, Publish)
    except ValueError as exc:
        raise MalformedPacketError(str(exc)) from None


class Received(NamedTuple):
    """The shape a receiver wants its PUBLISH packets in (see :meth:`PacketReader.feed_received`):
    ``outer(message(topic, payload, received_ns), packet_id, qos, generation)``, both tuple
    subclasses (named tuples) with those fields in that order."""

    outer: type[tuple[Any, ...]]
    message: type[tuple[Any, ...]]
    generation: int


def split_received(buf: bytes, v5: bool, shape: Received, received_ns: int) -> _SplitReceived:
    """:func:`split_packets` with the PUBLISH packets in the receiver's ``shape``, made in C when
    the extension is built: a receiver then spends no Python step per message on them."""
    if _COMPILED_SPLIT is None:
        return _split_received_python(buf, v5, shape, received_ns)
    try:
        return _COMPILED_SPLIT(buf, v5, shape.outer, shape.message, received_ns, shape.generation)
    except ValueError as exc:
        raise MalformedPacketError(str(exc)) from None


def _split_received_python(buf: bytes, v5: bool, shape: Received, received_ns: int) -> _SplitReceived:
    publishes, control, pos, need = _split_python(buf, v5)
    outer, message, generation = shape
    made = [
        tuple.__new__(
            outer, (tuple.__new__(message, (p.topic, p.payload, received_ns)), p.packet_id, p.qos, generation)
        )
        for p in publishes
    ]
    return made, control, pos, need


class PacketReader:
    """Incremental reader: ``feed`` bytes as they arrive, get back every complete packet.

    PUBLISH packets come back parsed (the hot path); other packets as ``(type, body)``.
    """

    def __init__(self, *, v5: bool) -> None:
        self._v5 = v5
        self._pending = bytearray()  # start of an incomplete packet
        self._need = 0  # bytes the incomplete packet needs in total, when its header is known

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held (bytes)."""
        return len(self._pending)

    def feed(self, data: bytes) -> tuple[list[Publish], list[tuple[int, bytes]]]:
        buf = self._complete(data)
        if buf is None:
            return [], []
        publishes, control, pos, self._need = split_packets(buf, self._v5)
        self._keep(buf, pos)
        return publishes, control

    def feed_received(
        self, data: bytes, shape: Received, received_ns: int
    ) -> tuple[list[Any], list[tuple[int, bytes]]]:
        """:meth:`feed`, with the PUBLISH packets in ``shape`` (see :class:`Received`), all
        received at ``received_ns``."""
        buf = self._complete(data)
        if buf is None:
            return [], []
        publishes, control, pos, self._need = split_received(buf, self._v5, shape, received_ns)
        self._keep(buf, pos)
        return publishes, control

    def _complete(self, data: bytes) -> bytes | None:
        """The bytes to split: ``data`` after what an incomplete packet left; None while a large
        packet, arriving over many reads, is still incomplete (collected without re-parsing, so
        no O(n^2) copy)."""
        if not self._pending:
            self._need = 0
            return bytes(data) if type(data) is not bytes else data
        self._pending += data
        if len(self._pending) < self._need:
            return None
        buf = bytes(self._pending)
        self._pending.clear()
        self._need = 0
        return buf

    def _keep(self, buf: bytes, pos: int) -> None:
        if pos < len(buf):
            self._pending += buf[pos:]
