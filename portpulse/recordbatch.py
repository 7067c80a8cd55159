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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from portpulse.sorting import distinct_codes

__all__ = ["CorruptRecordSetError", "RecordColumns", "concat_columns", "intern_slices", "parse_record_set"]

_BATCH_HEAD = struct.Struct(">qiibIhiqqqhii")
_HEAD_SIZE = _BATCH_HEAD.size  # 61
_CRC_FROM = 21  # crc32c covers attributes .. end
_CONTROL = 0x20
_CODEC_MASK = 0x07
_VARINT_WIDTH = 10
_I64 = npt.NDArray[np.int64]


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
            for field, (start, length) in ((key, (cols[1], cols[2])), (value, (cols[3], cols[4]))):
                start.append(pos)
                length.append(-1 if field is None else len(field))
                if field:
                    parts.append(field)
                    pos += len(field)
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

    return _columns(np.concatenate([p.data for p in parts]), [joined(f) for f in _FIELDS], parts[-1].next_offset)


def parse_record_set(
    raw: bytes,
    fetch_offset: int,
    decompress: Callable[[int, bytes], bytes],
    check_crc: Callable[[bytes], int] | None = None,
    legacy: Callable[[bytes], list[tuple[int, bytes | None, bytes | None]]] | None = None,
) -> RecordColumns:
    """The records at or after ``fetch_offset`` in a fetch response's record set ``raw``.

    ``decompress(codec, payload)`` undoes Kafka compression (codec 1 gzip .. 4 zstd);
    ``check_crc(bytes) -> crc32c`` validates each batch when given; ``legacy(batch bytes)`` reads a
    pre-v2 batch as ``(offset, key, value)``. Control batches are skipped; a truncated last batch
    (the broker cuts fetches at a size, not a batch) is left for the next fetch.
    """
    bodies: list[bytes] = []
    base: list[int] = []
    counts: list[int] = []
    extra: list[tuple[int, bytes | None, bytes | None]] = []
    next_offset = fetch_offset
    pos, end = 0, len(raw)
    while end - pos >= _HEAD_SIZE:
        head = _BATCH_HEAD.unpack_from(raw, pos)
        batch_end = pos + 12 + head[1]
        if batch_end > end:
            break
        base_offset, magic, crc, attributes, last_delta, count = head[0], head[3], head[4], head[5], head[6], head[12]
        batch = raw[pos:batch_end]
        pos = batch_end
        if magic < 2:
            if legacy is None:
                raise CorruptRecordSetError(f"message format v{magic} at offset {base_offset} needs a legacy reader")
            extra += [r for r in legacy(batch) if r[0] >= fetch_offset]
            next_offset = max(next_offset, extra[-1][0] + 1 if extra else next_offset)
            continue
        if check_crc is not None and check_crc(batch[_CRC_FROM:]) != crc:
            raise CorruptRecordSetError(f"invalid CRC in the batch at offset {base_offset}")
        next_offset = max(next_offset, base_offset + last_delta + 1)
        if attributes & _CONTROL or count <= 0:
            continue
        body = batch[_HEAD_SIZE:]
        codec = attributes & _CODEC_MASK
        bodies.append(decompress(codec, body) if codec else body)
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


def _parse_bodies(bodies: list[bytes], base: list[int], counts: list[int]) -> RecordColumns:
    data_bytes = b"".join(bodies)
    heads: list[int] = []
    shift = 0
    for body, count in zip(bodies, counts, strict=True):
        _record_heads(body, count, shift, heads)
        shift += len(body)
    # Padding lets the vectorised varint reads run past the end without bounds checks.
    data = np.frombuffer(data_bytes + bytes(_VARINT_WIDTH), dtype=np.uint8)
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
    value_len, size = _varints(data, p)
    value_start = p + size
    p = value_start + np.maximum(value_len, 0)
    if (p > stop).any() or (key_len < -1).any() or (value_len < -1).any():
        raise CorruptRecordSetError("a record's key or value runs past the record")
    offset = np.repeat(np.array(base, dtype=np.int64), counts) + offset_delta
    return RecordColumns(data[: len(data_bytes)], offset, key_start, key_len, value_start, value_len, next_offset=-1)


def _record_heads(body: bytes, count: int, shift: int, heads: list[int]) -> None:
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


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
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
    order of first appearance). Slices up to 64 bytes are read as 8-byte words, hashed, and the
    codes verified word for word; longer ones (and the astronomically rare collision) take a dict.
    A length of -1 (a null) reads as the empty string."""
    n = len(start)
    width = int(length.max()) if n else 0
    if n and width <= _MAX_VECTOR_WIDTH:
        padded = np.concatenate([data, np.zeros(8, np.uint8)])
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
