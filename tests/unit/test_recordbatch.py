"""The columnar Kafka record-set parser and writer against aiokafka's own batch builder and reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.arrays import KeyIndex, distinct_codes
from portpulse.codecs.recordbatch import (
    CorruptRecordSetError,
    OutgoingRecords,
    RecordColumns,
    concat_columns,
    decode_headers,
    encode_headers,
    frame_batch,
    gather_segments,
    intern_slices,
    key_hashes,
    parse_record_set,
)
from portpulse.kafka import fetched_columns
from portpulse.kafka.hooks import decompress
from tests.unit.compiled import compiled_half

Rec = tuple[bytes | None, bytes | None]


def batch(records: list[Rec], base_offset: int, codec: int = 0, ts_step_ms: int = 1) -> bytes:
    """A v2 record batch as a producer writes it (aiokafka's builder), at ``base_offset``."""
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 24)
    for i, (key, value) in enumerate(records):
        builder.append(i, timestamp=1_764_000_000_000 + i * ts_step_ms, key=key, value=value,
                       headers=[("pp-v", b"1")] if i % 2 else [])  # fmt: skip
    buf = builder.build()
    buf[0:8] = struct.pack(">q", base_offset)
    # The base offset is outside the CRC (which starts at the attributes), so it stays valid.
    return bytes(buf)


def reference(raw: bytes, fetch_offset: int) -> list[tuple[int, bytes | None, bytes | None]]:
    records = MemoryRecords(raw)
    out = []
    while records.has_next():
        b = records.next_batch()
        if b is None:
            break
        out += [(r.offset, r.key, r.value) for r in b if r.offset >= fetch_offset]
    return out


def as_tuples(cols: RecordColumns) -> list[tuple[int, bytes | None, bytes | None]]:
    return [(int(cols.offset[i]), cols.key(i), cols.value(i)) for i in range(len(cols))]


def parse(raw: bytes, fetch_offset: int = 0) -> RecordColumns:
    return parse_record_set(raw, fetch_offset, decompress, calc_crc32c)


payload = st.one_of(st.none(), st.binary(max_size=40), st.binary(min_size=60, max_size=9000))


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.tuples(payload, payload), min_size=1, max_size=30), min_size=1, max_size=4),
    codec=st.sampled_from([0, 1, 3, 4]),  # none, gzip, lz4, zstd
    ts_step_ms=st.sampled_from([0, 1, 100_000]),  # 1-, 2- and 4-byte timestamp deltas
    skip=st.integers(0, 40),
)
def test_parse_equals_aiokafkas_reader(batches: list[list[Rec]], codec: int, ts_step_ms: int, skip: int) -> None:
    raw, offset = b"", 100
    for records in batches:
        raw += batch(records, offset, codec, ts_step_ms)
        offset += len(records)
    fetch_offset = 100 + skip  # may start inside a batch: the records before it are skipped
    cols = parse(raw, fetch_offset)
    assert as_tuples(cols) == reference(raw, fetch_offset)
    assert cols.next_offset == max(offset, fetch_offset)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.tuples(payload, payload), min_size=1, max_size=12), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
)
def test_the_compiled_record_parser_reads_and_refuses_what_numpy_does(
    batches: list[list[Rec]], flips: list[tuple[int, int]]
) -> None:
    """Record columns of uncompressed batches, whole or with bytes of their record sections
    overwritten (no CRC check): both parsers give the same columns, or both refuse."""
    from portpulse.codecs import recordbatch

    raw, offset = bytearray(), 7
    for records in batches:
        raw += batch(records, offset)
        offset += len(records)
    if flips:
        sections = [i for i in range(len(raw)) if i >= 61]  # past the first batch header
        for at, value in flips:
            raw[sections[at % len(sections)]] = value
    outcome: dict[str, list[tuple[int, bytes | None, bytes | None]] | None] = {}
    assert recordbatch._COMPILED_PARSE is not None, "portpulse/codecs/_records.c is not compiled (setup.py)"
    for kind in ("compiled", "numpy"):
        with compiled_half(recordbatch, "_COMPILED_PARSE", kind):
            try:
                outcome[kind] = as_tuples(parse_record_set(bytes(raw), 0, decompress))
            except CorruptRecordSetError:
                outcome[kind] = None
    assert outcome["compiled"] == outcome["numpy"]
    if not flips:
        assert outcome["compiled"] == reference(bytes(raw), 0)


def test_a_truncated_last_batch_is_left_for_the_next_fetch() -> None:
    first = batch([(b"a", b"1"), (b"b", b"2")], 0)
    second = batch([(b"c", b"3")], 2)
    cols = parse(first + second[:-5])
    assert as_tuples(cols) == [(0, b"a", b"1"), (1, b"b", b"2")]
    assert cols.next_offset == 2


def test_a_corrupt_batch_is_refused_not_misread() -> None:
    good = bytearray(batch([(b"key", b"value" * 10)], 0))
    good[-3] ^= 0xFF  # inside the value: the CRC no longer matches
    with pytest.raises(CorruptRecordSetError, match="CRC"):
        parse(bytes(good))
    # Without the CRC check, broken framing is still caught: a record longer than its batch.
    framed = bytearray(batch([(b"k", b"v"), (b"k", b"v")], 0))
    framed[61] = 0x7E  # first record's length varint: 63 bytes, past the second record
    with pytest.raises(CorruptRecordSetError):
        parse_record_set(bytes(framed), 0, decompress)
    # A record count short of the records the batch holds: the records do not end at its end.
    counted = bytearray(batch([(b"k", b"v"), (b"k", b"v")], 0))
    counted[57:61] = struct.pack(">i", 1)
    with pytest.raises(CorruptRecordSetError, match="do not add up"):
        parse_record_set(bytes(counted), 0, decompress)
    # A negative batch length would send the parse backwards.
    backwards = bytearray(batch([(b"k", b"v")], 0))
    backwards[8:12] = struct.pack(">i", -300)
    with pytest.raises(CorruptRecordSetError, match="batch length"):
        parse_record_set(bytes(backwards), 0, decompress)
    # Compression bits of a codec that does not exist, or a body that does not decompress.
    for codec, body in ((5, b""), (3, b"not lz4 at all"), (1, b"not gzip")):
        packed = bytearray(batch([(b"k", b"v")], 0))
        packed[22] = (packed[22] & ~0x07) | codec  # the attributes' low byte
        packed[61:] = body
        packed[8:12] = struct.pack(">i", len(packed) - 12)
        with pytest.raises(CorruptRecordSetError, match="does not decompress"):
            parse_record_set(bytes(packed), 0, decompress)


def test_columns_of_records_and_concat_keep_every_slice() -> None:
    a = RecordColumns.of([(5, b"k1", b"v1"), (6, None, b"")])
    b = RecordColumns.of([(9, b"k2", None)], next_offset=12)
    both = concat_columns([a, b])
    assert as_tuples(both) == [(5, b"k1", b"v1"), (6, None, b""), (9, b"k2", None)]
    assert both.next_offset == 12
    assert as_tuples(fetched_columns([a, b])) == as_tuples(both)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([b"", b"aq-1", b"aq-10", b"x" * 8, b"x" * 9]), st.binary(max_size=70)),
                max_size=60))  # fmt: skip
def test_intern_slices_equals_a_dict(slices: list[bytes]) -> None:
    from portpulse.codecs.recordbatch import _intern_slices_numpy

    data = np.frombuffer(b"".join(slices), dtype=np.uint8)
    length = np.array([len(x) for x in slices], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if slices else length
    expected: dict[bytes, int] = {}
    want = [expected.setdefault(x, len(expected)) for x in slices]
    for intern in (intern_slices, _intern_slices_numpy):  # compiled (when built) and numpy
        codes, distinct = intern(data, start, length)
        assert codes.tolist() == want
        assert distinct == list(expected)


def test_intern_slices_of_a_fleet_equal_a_dict() -> None:
    """Thousands of distinct keys among many more rows: the compiled table grows several times
    as new keys come, and every row keeps its key's code."""
    rng = np.random.default_rng(7)
    keys = [f"sensor-{k}".encode() * (1 + k % 3) for k in range(5000)]
    slices = [keys[k] for k in rng.integers(0, len(keys), 30_000)]
    data = np.frombuffer(b"".join(slices), dtype=np.uint8)
    length = np.array([len(x) for x in slices], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    expected: dict[bytes, int] = {}
    want = [expected.setdefault(x, len(expected)) for x in slices]
    codes, distinct = intern_slices(data, start, length)
    assert codes.tolist() == want and distinct == list(expected) and len(distinct) > 4000


def test_intern_slices_reads_nulls_as_empty_and_refuses_slices_outside_the_buffer() -> None:
    from portpulse.codecs.recordbatch import _COMPILED_INTERN, _intern_slices_numpy

    data = np.frombuffer(b"abab", dtype=np.uint8)
    for intern in (intern_slices, _intern_slices_numpy):
        codes, distinct = intern(data, np.array([0, 2, 0, 3]), np.array([2, 2, -1, 0]))
        assert codes.tolist() == [0, 0, 1, 1]
        assert distinct == [b"ab", b""]
    assert _COMPILED_INTERN is not None, "portpulse/codecs/_records.c is not compiled (setup.py)"
    for start, length in ((3, 2), (-1, 2), (0, -2)):
        with pytest.raises(ValueError, match="outside the buffer"):
            _COMPILED_INTERN(data, np.array([start]), np.array([length]))


@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200)  # spread: the hash table (or numpy's sort)
    | st.lists(st.integers(-5, 40), max_size=200),  # a narrow range: the table by value
    st.sampled_from(["compiled", "numpy"]),
)
def test_distinct_codes_equals_np_unique_in_first_appearance_order(values: list[int], kind: str) -> None:
    from portpulse import arrays

    key = np.array(values, dtype=np.int64)
    with compiled_half(arrays, "_COMPILED_DISTINCT_CODES", kind):
        first, codes = distinct_codes(key)
    order: dict[int, int] = {}
    assert codes.tolist() == [order.setdefault(v, len(order)) for v in values]
    assert key[first].tolist() == list(order)


@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 2**62) | st.integers(0, 300), max_size=60),  # keys to add (held ones dropped)
            st.lists(st.booleans(), max_size=400),  # which rows to keep next (missing: kept)
        ),
        max_size=8,
    ),
    st.lists(st.integers(0, 2**62) | st.integers(0, 300), max_size=80),
    st.sampled_from(["compiled", "numpy"]),
)
def test_a_key_index_finds_the_row_of_every_key_it_holds_through_adds_and_drops(
    steps: list[tuple[list[int], list[bool]]], queries: list[int], kind: str
) -> None:
    """Against a plain list: rows in the order keys were added, renumbered by a drop, -1 for a
    key not held (the compiled table grows past a quarter full many times over)."""
    from portpulse import arrays

    with compiled_half(arrays, "_COMPILED_KEY_SLOTS", kind):
        index, held = KeyIndex(), []
        for added, kept in steps:
            new = [k for k in dict.fromkeys(added) if k not in held]
            index.add(np.array(new, dtype=np.int64))
            held += new
            probe = held + queries
            assert index.find(np.array(probe, dtype=np.int64)).tolist() == [
                held.index(k) if k in held else -1 for k in probe
            ]
            mask = (kept + [True] * len(held))[: len(held)]
            index.keep(np.array(mask, dtype=bool))
            held = [k for k, keep in zip(held, mask, strict=True) if keep]
            assert len(index) == len(held) and index.keys.tolist() == held
        probe = held + queries
        assert index.find(np.array(probe, dtype=np.int64)).tolist() == [
            held.index(k) if k in held else -1 for k in probe
        ]


def test_the_compiled_key_table_refuses_what_would_break_it_and_changes_nothing() -> None:
    """A size not a power of two, more than half full, a key held already (its batch's earlier
    keys taken out again)."""
    from portpulse._arrays import key_slots_find, key_slots_put

    slot_key, slot_row = np.zeros(16, dtype=np.int64), np.full(16, -1, dtype=np.int64)
    key_slots_put(slot_key, slot_row, np.array([3, 11, 19]), 0)
    before = slot_key.copy(), slot_row.copy()
    for table, keys, match in (
        ((np.zeros(6, np.int64), np.full(6, -1, np.int64)), [1], "power of two"),
        ((slot_key, slot_row), [1, 2, 4, 5, 6, 7], "holding 3"),
        ((slot_key, slot_row), [27, 11], "in the table already"),
        ((slot_key, slot_row), [27, 27], "in the table already"),
    ):
        with pytest.raises(ValueError, match=match):
            key_slots_put(*table, np.array(keys, dtype=np.int64), 3)
        held = slot_row >= 0
        assert slot_row.tolist() == before[1].tolist() and slot_key[held].tolist() == before[0][held].tolist()
    found = np.frombuffer(key_slots_find(slot_key, slot_row, np.array([19, 3, 27, 11])), dtype=np.int64)
    assert found.tolist() == [2, 0, -1, 1]


# ---------------------------------------------------------------- writing


def outgoing(records: list[tuple[int, bytes | None, list[bytes]]], topics: list[str]) -> OutgoingRecords:
    """OutgoingRecords of ``(topic index, key, value parts)`` over one buffer (keys first)."""
    keys = list(dict.fromkeys(k for _, k, _ in records if k is not None))
    blob = b"".join(keys)
    key_start = np.cumsum([0] + [len(k) for k in keys[:-1]], dtype=np.int64) if keys else np.zeros(0, np.int64)
    parts = max((len(p) for _, _, p in records), default=1)
    starts, lengths = np.zeros((parts, len(records)), np.int64), np.zeros((parts, len(records)), np.int64)
    for i, (_, _, value_parts) in enumerate(records):
        for j, part in enumerate(value_parts):
            starts[j, i], lengths[j, i] = len(blob), len(part)
            blob += part
    return OutgoingRecords(
        np.frombuffer(blob, np.uint8), topics, np.array([t for t, _, _ in records], dtype=np.int64), keys,
        np.array([keys.index(k) if k is not None else -1 for _, k, _ in records], dtype=np.int64), key_start,
        tuple(zip(starts, lengths, strict=True)), encode_headers([("pp-v", b"1"), ("h", b"")]),
    )  # fmt: skip


value_parts = st.lists(st.one_of(st.binary(max_size=30), st.binary(min_size=100, max_size=9000)), min_size=1,
                       max_size=3)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.one_of(st.none(), st.binary(min_size=1, max_size=200)), value_parts),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([0, 3, 4]),
    st.integers(0, 2**40),
)
def test_written_batches_read_back_with_aiokafkas_reader_and_ours(
    records: list[tuple[int, bytes | None, list[bytes]]], codec: int, producer_id: int
) -> None:
    """encode_records + frame_batch: every key, value (its parts joined), header, offset delta,
    timestamp and the idempotent producer's fields as aiokafka reads them; our parser agrees."""
    from portpulse.kafka.hooks import compress

    out = outgoing(records, ["a", "b"])
    rows = np.flatnonzero(out.topic == 0)
    if not len(rows):
        rows = np.arange(len(out))
    body = out.encode(rows)
    raw = frame_batch(compress(codec, body) if codec else body, len(rows), 1_764_000_000_123, codec,
                      (producer_id, 3, 17), calc_crc32c)  # fmt: skip
    read = MemoryRecords(raw).next_batch()
    assert read.validate_crc()
    assert (read.producer_id, read.producer_epoch, read.base_sequence) == (producer_id, 3, 17)
    got = list(read)
    want = [records[i] for i in rows.tolist()]
    assert [(r.offset, r.timestamp, r.key, r.value) for r in got] == [
        (i, 1_764_000_000_123, key, b"".join(parts)) for i, (_, key, parts) in enumerate(want)
    ]
    assert all([(h[0], h[1]) for h in r.headers] == [("pp-v", b"1"), ("h", b"")] for r in got)
    assert as_tuples(parse(raw)) == [(i, key, b"".join(parts)) for i, (_, key, parts) in enumerate(want)]
    assert out.as_tuples() == [(["a", "b"][t], key, b"".join(parts)) for t, key, parts in records]
    assert (out.size_estimate(rows) >= np.diff(np.append(_record_starts(body, len(rows)), len(body)))).all()


def _record_starts(body: bytes, count: int) -> np.ndarray:
    from portpulse.codecs.recordbatch import _record_heads

    heads: list[int] = []
    _record_heads(body, count, 0, heads)
    return np.array(heads)


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=150)), st.lists(st.binary(max_size=90), max_size=3)),
             max_size=200),
    st.sampled_from([b"\x00", b"", encode_headers([("pp-v", b"1"), ("x" * 70, b"y" * 3)])]),
)  # fmt: skip
def test_the_compiled_record_encoder_writes_the_bytes_of_the_numpy_one(
    records: list[tuple[bytes | None, list[bytes]]], headers: bytes
) -> None:
    """Keys, values and bodies long enough for two-byte varints, null keys, empty and missing
    value parts, 200 records (offset deltas past 127): the same bytes from both encoders."""
    from portpulse.codecs.recordbatch import _COMPILED_ENCODE, _encode_records_numpy, encode_records

    assert _COMPILED_ENCODE is not None, "the record encoder is not compiled (setup.py)"
    width = max((len(parts) for _, parts in records), default=0)
    blob, key_start, key_len = bytearray(b"pad"), [], []
    value_parts: list[tuple[list[int], list[int]]] = [([], []) for _ in range(width)]
    for key, parts in records:
        key_start.append(len(blob))
        key_len.append(-1 if key is None else len(key))
        blob += key or b""
        for k in range(width):
            piece = parts[k] if k < len(parts) else b""
            value_parts[k][0].append(len(blob))
            value_parts[k][1].append(len(piece))
            blob += piece
    src = np.frombuffer(bytes(blob), dtype=np.uint8)
    columns = (np.array(key_start, dtype=np.int64), np.array(key_len, dtype=np.int64))
    parts_arrays = [(np.array(s, dtype=np.int64), np.array(n, dtype=np.int64)) for s, n in value_parts]
    got = encode_records(src, *columns, parts_arrays, headers)
    assert got == _encode_records_numpy(src, *columns, parts_arrays, headers).tobytes()
    assert len(got) >= sum(len(key or b"") + sum(map(len, parts)) + len(headers) + 4 for key, parts in records)


def test_the_compiled_record_encoder_refuses_slices_outside_its_buffer_and_ragged_columns() -> None:
    from portpulse.codecs.recordbatch import _COMPILED_ENCODE

    assert _COMPILED_ENCODE is not None
    src = np.frombuffer(b"keyvalue", dtype=np.uint8)
    one, three, five = (np.array([v], dtype=np.int64) for v in (1, 3, 5))
    assert _COMPILED_ENCODE(src, one - 1, three, (three,), (five,), b"\x00") == b"\x1c\x00\x00\x00\x06key\x0avalue\x00"
    with pytest.raises(ValueError, match="key slice outside"):
        _COMPILED_ENCODE(src, five + 1, three, (three,), (five,), b"\x00")
    with pytest.raises(ValueError, match="value part 0 outside"):
        _COMPILED_ENCODE(src, one - 1, three, (five,), (five,), b"\x00")
    with pytest.raises(ValueError, match="value part 0 outside"):
        _COMPILED_ENCODE(src, one - 1, three, (three,), (-one,), b"\x00")
    with pytest.raises(ValueError, match="2 items, expected 1"):
        _COMPILED_ENCODE(src, one - 1, three, (np.array([3, 3]),), (five,), b"\x00")
    with pytest.raises(ValueError, match="int64 items"):
        _COMPILED_ENCODE(src, one - 1, three.astype(np.int32), (three,), (five,), b"\x00")


# Kafka's own murmur2 cases (clients' UtilsTest.testMurmur2), as Java's signed ints.
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=70), max_size=40))
def test_key_hashes_are_kafkas_murmur2_with_the_sign_bit_cleared(keys: list[bytes]) -> None:
    from aiokafka.partitioner import murmur2

    known = list(KAFKA_MURMUR2)
    got = key_hashes(known + keys)
    assert got is not None, "portpulse/codecs/_records.c is not compiled (setup.py)"
    assert got.tolist()[: len(known)] == [v & 0x7FFFFFFF for v in KAFKA_MURMUR2.values()]
    assert got.tolist()[len(known) :] == [murmur2(k) & 0x7FFFFFFF for k in keys]
    with pytest.raises(TypeError):
        key_hashes([b"s-1", "s-2"])  # type: ignore[list-item]


@given(st.lists(st.binary(max_size=40), max_size=50), st.data())
def test_gather_segments_equals_joining_the_slices(pieces: list[bytes], data: st.DataObject) -> None:
    src = np.frombuffer(b"".join(pieces) + b"xyz", np.uint8)
    starts = [data.draw(st.integers(0, len(src))) for _ in pieces]
    lengths = [data.draw(st.integers(0, len(src) - s)) for s in starts]
    got = gather_segments(src, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64))
    assert got.tobytes() == b"".join(src[s : s + n].tobytes() for s, n in zip(starts, lengths, strict=True))


def test_zero_padded_reuses_the_padding_of_parsed_record_sets_and_copies_otherwise() -> None:
    from portpulse.codecs.recordbatch import zero_padded

    raw = batch([(b"k", b"value-1"), (None, b"v2")], 0) + batch([(b"k2", b"x" * 300)], 2)
    for cols in (parse(raw), concat_columns([parse(raw), parse(raw)])):
        out = zero_padded(cols.data, 18)
        assert np.shares_memory(out, cols.data)  # no copy
        assert out[: len(cols.data)].tobytes() == cols.data.tobytes() and not out[len(cols.data) :].any()
        assert len(out) == len(cols.data) + 18
    plain = np.frombuffer(b"abc", np.uint8)
    out = zero_padded(plain, 8)
    assert out.tobytes() == b"abc" + bytes(8) and not np.shares_memory(out, plain)
    tail = np.frombuffer(b"abcdef", np.uint8)[:3]  # the bytes after it are not zeros: copied
    assert zero_padded(tail, 2).tobytes() == b"abc\x00\x00"


@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=300)), max_size=5))
def test_headers_decode_to_what_was_encoded(headers: list[tuple[str, bytes]]) -> None:
    assert decode_headers(encode_headers(headers)) == headers
