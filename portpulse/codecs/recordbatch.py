"""Kafka record sets as columns (pure): a fetch response's bytes -> offsets, keys and values as
positions in one byte buffer, with no Python object per record.

aiokafka builds a ``ConsumerRecord`` (plus a C record, a headers tuple and two ``bytes``) for every
record: with one reading per record that is half of a processor's time. Here the record
boundaries come from one tight loop over the length varints and every other field from
vectorised varint reads. Only message format v2 (Kafka >= 0.11, the only one Kafka 4 writes) is
parsed here; older batches go through aiokafka's own reader. Layout (big-endian), from the Kafka
protocol guide::

    batch:  i64 baseOffset, i32 batchLength, i32 leaderEpoch, i8 magic, u32 crc32c,
            i16 attributes, i32 lastOffsetDelta, i64 baseTs, i64 maxTs, i64 producerId,
            i16 producerEpoch, i32 baseSequence, i32 count, then the records (compressed as a whole)
    record: varint length, i8 attributes, varlong tsDelta, varint offsetDelta,
            varint keyLen, key, varint valueLen, value, varint headerCount, headers
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from portpulse.arrays import distinct_codes

__all__ = [
    "BATCH_HEADER_BYTES",
    "RECORD_ENCODER",
    "CorruptRecordSetError",
    "OutgoingRecords",
    "RecordColumns",
    "concat_columns",
    "decode_headers",
    "encode_headers",
    "encode_records",
    "frame_batch",
    "gather_segments",
    "intern_slices",
    "key_hashes",
    "parse_record_set",
    "zero_padded",
]

_BATCH_HEAD = struct.Struct(">qiibIhiqqqhii")
_HEAD_SIZE = _BATCH_HEAD.size  # 61
BATCH_HEADER_BYTES = _HEAD_SIZE  #: a v2 record batch's frame before its records
_CRC_FROM = 21  # crc32c covers attributes .. end
_CONTROL = 0x20
_CODEC_MASK = 0x07
_VARINT_WIDTH = 10
_I64 = npt.NDArray[np.int64]


#: Zero bytes kept after the data of parsed record sets, so readers that run past the end
#: (:func:`intern_slices`, ``portpulse.codecs.wire.decode_columns``) need no copy to pad it.
TAIL_PADDING = 32


def zero_padded(data: npt.NDArray[np.uint8], pad: int) -> npt.NDArray[np.uint8]:
    """``data`` followed by ``pad`` zero bytes: a view when the buffer behind ``data`` already has
    them (record sets parsed or joined here do, up to :data:`TAIL_PADDING`), else a copy."""
    base = data.base
    if isinstance(base, np.ndarray) and base.dtype == np.uint8 and base.ndim == 1 and data.flags.c_contiguous:
        at = data.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        end = at + len(data)
        if at >= 0 and end + pad <= len(base) and not base[end : end + pad].any():
            out: npt.NDArray[np.uint8] = base[at : end + pad]
            return out
    return np.concatenate([data, np.zeros(pad, np.uint8)])


class CorruptRecordSetError(ValueError):
    """A record batch whose CRC or record framing is wrong (aiokafka raises the same for its path)."""


@dataclass(frozen=True, slots=True)
class RecordColumns:
    """Records as columns ``(n,)`` over ``data`` (uint8): ``offset``; ``key_start``/``key_len`` and
    ``value_start``/``value_len`` index ``data`` (a length of -1 is a null key or value).
    ``next_offset`` is where the next fetch of this partition starts."""

    data: npt.NDArray[np.uint8]
    offset: _I64
    key_start: _I64
    key_len: _I64
    value_start: _I64
    value_len: _I64
    next_offset: int

    def __len__(self) -> int:
        return len(self.offset)

    @staticmethod
    def of(records: Sequence[tuple[int, bytes | None, bytes | None]], next_offset: int = -1) -> RecordColumns:
        """Columns of ``(offset, key, value)`` tuples (tests; records from aiokafka's own reader)."""
        parts: list[bytes] = []
        pos = 0
        cols: list[list[int]] = [[], [], [], [], []]
        for offset, key, value in records:
            cols[0].append(offset)
            for piece, (start, length) in ((key, (cols[1], cols[2])), (value, (cols[3], cols[4]))):
                start.append(pos)
                length.append(-1 if piece is None else len(piece))
                if piece:
                    parts.append(piece)
                    pos += len(piece)
        arrays = [np.array(c, dtype=np.int64) for c in cols]
        if next_offset < 0:
            next_offset = int(arrays[0].max()) + 1 if len(records) else 0
        return _columns(np.frombuffer(b"".join(parts), dtype=np.uint8), arrays, next_offset)

    def key(self, i: int) -> bytes | None:
        return self._slice(int(self.key_start[i]), int(self.key_len[i]))

    def value(self, i: int) -> bytes | None:
        return self._slice(int(self.value_start[i]), int(self.value_len[i]))

    def _slice(self, start: int, length: int) -> bytes | None:
        return None if length < 0 else self.data[start : start + length].tobytes()


def concat_columns(parts: Sequence[RecordColumns]) -> RecordColumns:
    """One :class:`RecordColumns` over one buffer (``next_offset`` of the last part)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return RecordColumns.of([])
    shifts = np.cumsum([0] + [len(p.data) for p in parts[:-1]])

    def joined(field: str) -> _I64:
        moved = field.endswith("start")  # positions in the joined buffer
        return np.concatenate([getattr(p, field) + (s if moved else 0) for p, s in zip(parts, shifts, strict=True)])

    size = sum(len(p.data) for p in parts)
    data = np.concatenate([*(p.data for p in parts), np.zeros(TAIL_PADDING, np.uint8)])[:size]
    return _columns(data, [joined(f) for f in _FIELDS], parts[-1].next_offset)


def parse_record_set(
    raw: bytes,
    fetch_offset: int,
    decompress: Callable[[int, bytes], bytes],
    check_crc: Callable[[memoryview], int] | None = None,
    legacy: Callable[[bytes], list[tuple[int, bytes | None, bytes | None]]] | None = None,
) -> RecordColumns:
    """The records at or after ``fetch_offset`` in a fetch response's record set ``raw``.

    ``decompress(codec, payload)`` undoes Kafka compression (codec 1 gzip .. 4 zstd);
    ``check_crc(view) -> crc32c`` validates each batch when given; ``legacy(batch bytes)`` reads a
    pre-v2 batch as ``(offset, key, value)``. Control batches are skipped; a truncated last batch
    (the broker cuts fetches at a size, not a batch) is left for the next fetch.
    """
    bodies: list[bytes | memoryview] = []
    base: list[int] = []
    counts: list[int] = []
    extra: list[tuple[int, bytes | None, bytes | None]] = []
    next_offset = fetch_offset
    pos, end = 0, len(raw)
    view = memoryview(raw)  # batches and bodies are views: the one copy is the join of the bodies
    while end - pos >= _HEAD_SIZE:
        head = _BATCH_HEAD.unpack_from(raw, pos)
        if head[1] < _HEAD_SIZE - 12:  # shorter than its own header: the parse would step back
            raise CorruptRecordSetError(f"batch length {head[1]} at byte {pos}")
        batch_end = pos + 12 + head[1]
        if batch_end > end:
            break
        base_offset, magic, crc, attributes, last_delta, count = head[0], head[3], head[4], head[5], head[6], head[12]
        batch = view[pos:batch_end]
        pos = batch_end
        if magic < 2:
            if legacy is None:
                raise CorruptRecordSetError(f"message format v{magic} at offset {base_offset} needs a legacy reader")
            extra += [r for r in legacy(bytes(batch)) if r[0] >= fetch_offset]
            next_offset = max(next_offset, extra[-1][0] + 1 if extra else next_offset)
            continue
        if check_crc is not None and check_crc(batch[_CRC_FROM:]) != crc:
            raise CorruptRecordSetError(f"invalid CRC in the batch at offset {base_offset}")
        next_offset = max(next_offset, base_offset + last_delta + 1)
        if attributes & _CONTROL or count <= 0:
            continue
        body: bytes | memoryview = batch[_HEAD_SIZE:]
        codec = attributes & _CODEC_MASK
        if codec:
            try:
                body = decompress(codec, bytes(body))
            except Exception as exc:  # an unknown codec, a body that does not decompress: the batch is corrupt
                raise CorruptRecordSetError(f"the batch at offset {base_offset} does not decompress: {exc}") from exc
        bodies.append(body)
        base.append(base_offset)
        counts.append(count)
    cols = _parse_bodies(bodies, base, counts)
    if extra:
        cols = concat_columns([cols, RecordColumns.of(extra)])
    keep = cols.offset >= fetch_offset  # a fetch may start inside a batch: skip what was consumed
    fields = [getattr(cols, f) for f in _FIELDS]
    return _columns(cols.data, fields if keep.all() else [f[keep] for f in fields], next_offset)


_FIELDS = ("offset", "key_start", "key_len", "value_start", "value_len")


def _columns(data: npt.NDArray[np.uint8], fields: Sequence[_I64], next_offset: int) -> RecordColumns:
    """:class:`RecordColumns` from ``data`` and the arrays of ``_FIELDS`` in that order."""
    offset, key_start, key_len, value_start, value_len = fields
    return RecordColumns(data, offset, key_start, key_len, value_start, value_len, next_offset)


def _parse_bodies(bodies: list[bytes | memoryview], base: list[int], counts: list[int]) -> RecordColumns:
    """The records of the record sections ``bodies`` (with each batch's base offset and record
    count) as columns: in one C pass where it is built, else :func:`_parse_bodies_numpy`."""
    if _COMPILED_PARSE is None:
        return _parse_bodies_numpy(bodies, base, counts)
    # Padding behind the records (zero_padded then needs no copy), joined in the one copy.
    joined = b"".join([*bodies, bytes(max(_VARINT_WIDTH, TAIL_PADDING))])
    ends = np.cumsum(np.fromiter(map(len, bodies), dtype=np.int64, count=len(bodies)))
    try:
        columns = _COMPILED_PARSE(joined, ends, np.array(counts, dtype=np.int64), np.array(base, dtype=np.int64))
    except ValueError as exc:
        raise CorruptRecordSetError(str(exc)) from None
    data = np.frombuffer(joined, dtype=np.uint8)[: int(ends[-1]) if len(ends) else 0]
    offset, key_start, key_len, value_start, value_len = (np.frombuffer(c, dtype=np.int64) for c in columns)
    return RecordColumns(data, offset, key_start, key_len, value_start, value_len, next_offset=-1)


def _parse_bodies_numpy(bodies: list[bytes | memoryview], base: list[int], counts: list[int]) -> RecordColumns:
    """:func:`_parse_bodies` by a Python hop per record and vectorised varint reads."""
    data_bytes = b"".join(bodies)
    heads: list[int] = []
    shift = 0
    for body, count in zip(bodies, counts, strict=True):
        _record_heads(body, count, shift, heads)
        shift += len(body)
    # Padding lets the vectorised varint reads run past the end without bounds checks.
    data = np.frombuffer(data_bytes + bytes(max(_VARINT_WIDTH, TAIL_PADDING)), dtype=np.uint8)
    head = np.array(heads, dtype=np.int64)
    length, size = _varints(data, head)
    start = head + size
    stop = start + length
    # Each record must end where the next one's length begins (or at its batch's end).
    batch_end = np.cumsum([len(body) for body in bodies], dtype=np.int64)
    next_head = np.append(head[1:], 0)
    next_head[np.cumsum(counts) - 1] = batch_end
    if (length < 0).any() or (stop != next_head).any():
        raise CorruptRecordSetError("record lengths do not add up to the batch")
    p = start + 1  # record attributes: one byte, unused
    p += _varints(data, p, values=False)[1]  # timestamp delta: unused
    offset_delta, size = _varints(data, p)
    p += size
    key_len, size = _varints(data, p)
    key_start = p + size
    p = key_start + np.maximum(key_len, 0)
    if (p > stop).any() or (key_len < -1).any():  # before reading on: a wild length points anywhere
        raise CorruptRecordSetError("a record's key or value runs past the record")
    value_len, size = _varints(data, p)
    value_start = p + size
    p = value_start + np.maximum(value_len, 0)
    if (p > stop).any() or (key_len < -1).any() or (value_len < -1).any():
        raise CorruptRecordSetError("a record's key or value runs past the record")
    offset = np.repeat(np.array(base, dtype=np.int64), counts) + offset_delta
    return RecordColumns(data[: len(data_bytes)], offset, key_start, key_len, value_start, value_len, next_offset=-1)


def _record_heads(body: bytes | memoryview, count: int, shift: int, heads: list[int]) -> None:
    """Append where each of ``count`` records in ``body`` begins (at its length varint, plus
    ``shift``). The one sequential step of a parse, so it only hops: a negative or overlong length
    is caught by the caller's vectorised check."""
    pos = 0
    append = heads.append
    try:
        for _ in range(count):
            append(shift + pos)
            b = body[pos]
            if b < 0x80:  # lengths below 64 (zigzag): one byte
                pos += 1 + (b >> 1)
            else:
                c = body[pos + 1]
                if c < 0x80:  # below 8192: two bytes, the usual record
                    pos += 2 + (((b & 0x7F) | (c << 7)) >> 1)
                else:
                    length, pos = _varint(body, pos)
                    pos += max(length, 0)
    except IndexError:
        raise CorruptRecordSetError("record batch shorter than its record count") from None


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """One zigzag varint at ``pos``: (value, position after it)."""
    value = shift = 0
    for _ in range(_VARINT_WIDTH):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
    raise CorruptRecordSetError("varint longer than 10 bytes")


def _varints(data: npt.NDArray[np.uint8], pos: _I64, values: bool = True) -> tuple[_I64, _I64]:
    """Zigzag varints at every position ``pos`` (n,): (values, or zeros when not ``values``;
    sizes in bytes). One vectorised step per byte of the longest, on the rows still going."""
    b = data[pos]
    size = np.ones(len(pos), dtype=np.int64)
    value = (b & 0x7F).astype(np.int64) if values else np.zeros(len(pos), dtype=np.int64)
    going = np.flatnonzero(b >= 0x80)
    for k in range(1, _VARINT_WIDTH):
        if not len(going):
            break
        b = data[pos[going] + k]
        if values:
            value[going] |= (b & 0x7F).astype(np.int64) << (7 * k)
        size[going] += 1
        going = going[b >= 0x80]
    if len(going):
        raise CorruptRecordSetError("varint longer than 10 bytes")
    return (value >> 1) ^ -(value & 1), size


# ---------------------------------------------------------------- distinct byte strings

_MAX_VECTOR_WIDTH = 64
_MIX = np.uint64(0x9E3779B97F4A7C15)
#: ``_TAIL[k]`` keeps the first ``k`` bytes of a little-endian 8-byte word (k = 0..8).
_TAIL = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


def intern_slices(data: npt.NDArray[np.uint8], start: _I64, length: _I64) -> tuple[_I64, list[bytes]]:
    """Codes ``(n,)`` and the distinct byte strings ``data[start:start+length]`` they index (in
    order of first appearance). A length of -1 (a null) reads as the empty string. One hash table
    pass in C (``_records.c``) where it is built, else :func:`_intern_slices_numpy`."""
    if _COMPILED_INTERN is not None:
        codes, distinct = _COMPILED_INTERN(data, _int64s(start), _int64s(length))
        return np.frombuffer(codes, dtype=np.int64), distinct
    return _intern_slices_numpy(data, start, length)


def _intern_slices_numpy(data: npt.NDArray[np.uint8], start: _I64, length: _I64) -> tuple[_I64, list[bytes]]:
    """:func:`intern_slices` by numpy: slices up to 64 bytes are read as 8-byte words, hashed, and
    the codes verified word for word; longer ones (and the astronomically rare collision) take a
    dict.

    ``words_at[x]`` is the little-endian u64 starting at byte ``x`` (a stride-1 view over ``data``
    plus 8 zero bytes); slice ``i`` is read as its words ``k = 0, 1, ...``::

        data:    ... | start[i] ........................ start[i] + length[i] | ...
        word k:        [8k, 8k + 8) of the slice, bytes past its end masked to zero
                       (_TAIL[min(length[i] - 8k, 8)])
    """
    n = len(start)
    length = np.maximum(length, 0)  # a null is the empty string, not a value of its own
    width = int(length.max()) if n else 0
    if n and width <= _MAX_VECTOR_WIDTH:
        padded = zero_padded(data, 8)
        # Every byte offset as the start of a little-endian word: unaligned gathers, no matrix.
        words_at = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
        last = len(padded) - 8
        words = np.empty((n, max(-(-width // 8), 1)), dtype=np.uint64)
        h = length.astype(np.uint64) * _MIX
        for k in range(words.shape[1]):
            words[:, k] = words_at[np.minimum(start + 8 * k, last)] & _TAIL[np.clip(length - 8 * k, 0, 8)]
            h = (h ^ words[:, k]) * _MIX
            h ^= h >> np.uint64(29)
        first, inverse = _few_distinct(h)
        if first is None or inverse is None:
            # The top hash bits as the key: a clash there only merges codes, which the word check catches.
            first, inverse = distinct_codes((h >> np.uint64(max(n - 1, 1).bit_length() + 1)).view(np.int64))
        rep = first[inverse]
        if (length == length[rep]).all() and (words == words[rep]).all():
            bounds = zip(start[first].tolist(), length[first].tolist(), strict=True)
            return inverse, [data[s : s + max(ln, 0)].tobytes() for s, ln in bounds]
    raw = data.tobytes()
    codes: dict[bytes, int] = {}
    slices = (raw[s : s + ln] if ln >= 0 else b"" for s, ln in zip(start.tolist(), length.tolist(), strict=True))
    out = np.fromiter((codes.setdefault(x, len(codes)) for x in slices), dtype=np.int64, count=n)
    return out, list(codes)


def _few_distinct(h: npt.NDArray[np.uint64], most: int = 8) -> tuple[_I64, _I64] | tuple[None, None]:
    """:func:`distinct_codes` of ``h`` by one comparison pass per distinct value, when there are at
    most ``most`` of them (a fetch's value headers: usually one or two); else (None, None)."""
    codes = np.empty(len(h), dtype=np.int64)
    rest = np.arange(len(h))
    firsts: list[int] = []
    while len(rest) and len(firsts) < most:
        same = h[rest] == h[rest[0]]
        codes[rest[same]] = len(firsts)
        firsts.append(int(rest[0]))
        rest = rest[~same]
    if len(rest):
        return None, None
    return np.array(firsts, dtype=np.int64), codes


# ---------------------------------------------------------------- writing record batches


def gather_segments(src: npt.NDArray[np.uint8], start: _I64, length: _I64) -> npt.NDArray[np.uint8]:
    """The concatenation of ``src[start[k] : start[k] + length[k]]`` for every segment ``k`` (n,),
    in order, with no Python step per segment: one index per output byte from a running sum
    whose step is 1 inside a segment and jumps to the next segment's start at its first byte."""
    keep = length > 0
    if not keep.all():
        start, length = start[keep], length[keep]
    if not len(start):
        return np.empty(0, dtype=np.uint8)
    ends = np.cumsum(length)
    index_type = np.int32 if len(src) < 2**31 - 1 else np.int64
    step = np.ones(int(ends[-1]), dtype=index_type)
    step[0] = start[0]
    step[ends[:-1]] = start[1:] - (start[:-1] + length[:-1]) + 1
    out: npt.NDArray[np.uint8] = src[np.cumsum(step, dtype=index_type)]
    return out


def _zigzag_varints(values: _I64) -> tuple[npt.NDArray[np.uint8], _I64]:
    """Kafka's zigzag varints of ``values`` (n,) as a byte matrix (n, width) and sizes (n,)."""
    z = ((values << 1) ^ (values >> 63)).astype(np.uint64)
    size = np.ones(len(values), dtype=np.int64)
    top = int(z.max()) if len(z) else 0
    width = max(1, -(-top.bit_length() // 7))
    out = np.zeros((len(values), width), dtype=np.uint8)
    for k in range(width):
        part = (z >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (z >> np.uint64(7 * (k + 1))) > 0
        out[:, k] = part | (more.astype(np.uint64) << np.uint64(7))
        size += more
    return out, size


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> bytes:
    """A record's header count and headers, as they follow its value."""
    parts = [_varint_bytes(len(headers))]
    for name, value in headers:
        name_b = name.encode()
        parts += [_varint_bytes(len(name_b)), name_b, _varint_bytes(len(value)), value]
    return b"".join(parts)


def decode_headers(block: bytes) -> list[tuple[str, bytes]]:
    """The headers :func:`encode_headers` encoded into ``block``."""
    count, pos = _varint(block, 0)
    out = []
    for _ in range(count):
        size, pos = _varint(block, pos)
        name, pos = block[pos : pos + size].decode(), pos + size
        size, pos = _varint(block, pos)
        out.append((name, block[pos : pos + size]))
        pos += size
    return out


def _varint_bytes(value: int) -> bytes:
    matrix, size = _zigzag_varints(np.array([value], dtype=np.int64))
    return matrix[0, : int(size[0])].tobytes()


def encode_records(
    src: npt.NDArray[np.uint8],
    key_start: _I64,
    key_len: _I64,
    value_parts: Sequence[tuple[_I64, _I64]],
    headers: bytes,
) -> bytes:
    """The records section of one v2 batch (uncompressed): record ``i`` (n,) has offset delta
    ``i``, timestamp delta 0, key ``src[key_start:key_start+key_len]`` (``key_len`` -1: null), the
    value the concatenation of its ``value_parts`` (``(start, length)`` columns into ``src``) and
    the header block ``headers`` (:func:`encode_headers`), shared by all.

    Written by the compiled encoder when it is built (one pass, about 10x less CPU), else by
    :func:`_encode_records_numpy`; both give the same bytes."""
    if _COMPILED_ENCODE is None:
        return _encode_records_numpy(src, key_start, key_len, value_parts, headers).tobytes()
    return _COMPILED_ENCODE(
        np.ascontiguousarray(src, dtype=np.uint8),
        _int64s(key_start),
        _int64s(key_len),
        tuple(_int64s(start) for start, _ in value_parts),
        tuple(_int64s(length) for _, length in value_parts),
        headers,
    )


def _int64s(column: _I64) -> _I64:
    """``column`` as the C-contiguous int64 buffer the compiled encoder reads (no copy when it is one)."""
    return np.ascontiguousarray(column, dtype=np.int64)


def _compiled() -> tuple[
    Callable[..., bytes] | None,
    Callable[[list[bytes]], bytearray] | None,
    Callable[..., tuple[bytearray, list[bytes]]] | None,
    Callable[..., tuple[bytearray, ...]] | None,
]:
    try:
        from portpulse.codecs._records import encode, intern, key_hashes, parse
    except ImportError:  # installed where no C compiler was at hand: numpy reads and writes the records
        return None, None, None, None
    return encode, key_hashes, intern, parse


_COMPILED_ENCODE, _COMPILED_KEY_HASHES, _COMPILED_INTERN, _COMPILED_PARSE = _compiled()


def key_hashes(keys: list[bytes]) -> _I64 | None:
    """Kafka's murmur2 of each key ``(n,)`` with the sign bit cleared: what the default
    partitioner takes modulo the partition count, so a key's records share its partition with
    every other client's. None where the compiled half is not built: the caller then hashes
    with its Kafka client's murmur2."""
    if _COMPILED_KEY_HASHES is None:
        return None
    return np.frombuffer(_COMPILED_KEY_HASHES(keys), dtype=np.int64)


#: the Kafka record encoder this install runs: "compiled" or "numpy" (logged at start-up)
RECORD_ENCODER = "numpy" if _COMPILED_ENCODE is None else "compiled"


def _encode_records_numpy(
    src: npt.NDArray[np.uint8],
    key_start: _I64,
    key_len: _I64,
    value_parts: Sequence[tuple[_I64, _I64]],
    headers: bytes,
) -> npt.NDArray[np.uint8]:
    """:func:`encode_records` with numpy, as a byte array. Every record is first gathered from
    ``src`` as segments, then the holes are filled in::

        | len | attr | tsDelta | offsetDelta | keyLen | key | valueLen | value parts ... | headers |
        '----- segment 0: hole of prefix_len bytes -----'  seg 1  seg 2: hole   seg 3 ..  last: hole
    """
    n = len(key_start)
    value_len = sum((length for _, length in value_parts), np.zeros(n, dtype=np.int64))
    offset_var, offset_size = _zigzag_varints(np.arange(n, dtype=np.int64))
    key_var, key_size = _zigzag_varints(key_len)
    value_var, value_size = _zigzag_varints(value_len)
    body = 2 + offset_size + key_size + np.maximum(key_len, 0) + value_size + value_len + len(headers)
    length_var, length_size = _zigzag_varints(body)
    prefix_len = length_size + 2 + offset_size + key_size  # length, attributes, ts delta, offset, key length
    # Keys and values are gathered from ``src`` with holes (read from its start) for the varints
    # and the headers, written afterwards: ``src`` is the whole send's buffer, too big to copy
    # per batch to append them.
    hole = max(length_var.shape[1] + 2 + offset_var.shape[1] + key_var.shape[1], value_var.shape[1], len(headers))
    if len(src) < hole:
        src = np.concatenate([src, np.zeros(hole, dtype=np.uint8)])
    segments = 4 + len(value_parts)
    seg_start = np.zeros((n, segments), dtype=np.int64)
    seg_len = np.empty((n, segments), dtype=np.int64)
    seg_len[:, 0] = prefix_len
    seg_start[:, 1], seg_len[:, 1] = key_start, key_len
    seg_len[:, 2] = value_size
    for k, (start, length) in enumerate(value_parts):
        seg_start[:, 3 + k], seg_len[:, 3 + k] = start, length
    seg_len[:, -1] = len(headers)
    out = gather_segments(src, seg_start.ravel(), seg_len.ravel())
    at = np.cumsum(length_size + body) - (length_size + body)  # where each record starts
    record_end = at + length_size + body
    _fill(out, at, length_var, length_size)
    at = at + length_size
    out[at] = 0  # attributes
    out[at + 1] = 0  # timestamp delta
    at += 2
    _fill(out, at, offset_var, offset_size)
    at += offset_size
    _fill(out, at, key_var, key_size)
    _fill(out, at + key_size + np.maximum(key_len, 0), value_var, value_size)
    if len(headers) == 1:  # the usual header block: a zero count
        out[record_end - 1] = headers[0]
    elif headers:
        out[(record_end - len(headers))[:, None] + np.arange(len(headers))] = np.frombuffer(headers, dtype=np.uint8)
    return out


def _fill(out: npt.NDArray[np.uint8], at: _I64, rows: npt.NDArray[np.uint8], length: _I64) -> None:
    """Write the first ``length[i]`` bytes of ``rows[i]`` at ``out[at[i]:]`` for every ``i``."""
    for k in range(rows.shape[1]):
        going = length > k
        if going.all():
            out[at + k] = rows[:, k]
        else:
            out[at[going] + k] = rows[going, k]


@dataclass(frozen=True, slots=True)
class OutgoingRecords:
    """Records to produce, as columns ``(n,)`` over one byte buffer ``data`` (uint8).

    ``topic`` indexes ``topics``; ``key`` indexes ``keys`` (-1: a null key), whose bytes are also
    at ``data[key_start[k]:][:len(keys[k])]`` (``key_len``, set from ``keys``); a record's value is
    the concatenation of its ``value_parts`` (``(start, length)`` columns over ``data``); every
    record carries the header block ``headers`` (:func:`encode_headers`).
    """

    data: npt.NDArray[np.uint8]
    topics: list[str]
    topic: _I64
    keys: list[bytes]
    key: _I64
    key_start: _I64
    value_parts: tuple[tuple[_I64, _I64], ...]
    headers: bytes
    key_len: _I64 = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_len", np.fromiter(map(len, self.keys), dtype=np.int64, count=len(self.keys)))

    @classmethod
    def empty(cls, headers: bytes = b"") -> OutgoingRecords:
        """No records."""
        none = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, np.uint8), [], none, [], none, none, ((none, none),), headers)

    def __len__(self) -> int:
        return len(self.topic)

    def _key_columns(self, rows: _I64) -> tuple[_I64, _I64]:
        start = np.append(self.key_start, 0)  # index -1 (a null key) reads the appended entry
        length = np.append(self.key_len, -1)
        return start[self.key[rows]], length[self.key[rows]]

    def size_estimate(self, rows: _I64) -> _I64:
        """Upper bound of each row's encoded size in bytes (n,)."""
        _, key_len = self._key_columns(rows)
        value_len = sum((length[rows] for _, length in self.value_parts), np.zeros(len(rows), dtype=np.int64))
        return np.maximum(key_len, 0) + value_len + len(self.headers) + 3 * _VARINT_WIDTH

    def as_tuples(self) -> list[tuple[str, bytes | None, bytes]]:
        """Every record as ``(topic, key, value)`` (tests, debugging)."""
        raw = self.data.tobytes()
        out = []
        for i in range(len(self)):
            key = int(self.key[i])
            value = b"".join(raw[int(s[i]) : int(s[i]) + int(n[i])] for s, n in self.value_parts)
            out.append((self.topics[int(self.topic[i])], self.keys[key] if key >= 0 else None, value))
        return out

    def encode(self, rows: _I64) -> bytes:
        """The records section of one batch holding ``rows``, in that order."""
        key_start, key_len = self._key_columns(rows)
        parts = [(start[rows], length[rows]) for start, length in self.value_parts]
        return encode_records(self.data, key_start, key_len, parts, self.headers)


#: aiokafka's "no leader epoch" for produced batches; the broker stamps the real one.
_NO_LEADER_EPOCH = -1


def frame_batch(
    records: bytes,
    count: int,
    timestamp_ms: int,
    attributes: int,
    producer: tuple[int, int, int],
    crc32c: Callable[[bytes], int],
) -> bytes:
    """A v2 record batch around ``records`` (as :func:`encode_records` made them, compressed when
    ``attributes`` names a codec): ``count`` records all stamped ``timestamp_ms``, with
    ``producer`` = (producer id, epoch, base sequence) for the idempotent producer."""
    producer_id, epoch, base_sequence = producer
    head = bytearray(_BATCH_HEAD.pack(0, _HEAD_SIZE - 12 + len(records), _NO_LEADER_EPOCH, 2, 0, attributes,
                                      count - 1, timestamp_ms, timestamp_ms, producer_id, epoch, base_sequence,
                                      count))  # fmt: skip
    out = head + records
    struct.pack_into(">I", out, 17, crc32c(bytes(out[_CRC_FROM:])))
    return bytes(out)
