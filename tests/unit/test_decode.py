"""Pure decoders, the Kafka wire encoding and record grouping."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.arrays import distinct_codes
from portpulse.codecs.wire import WireError, decode_value, decode_values, encode_value
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE, Reading
from portpulse.contract.topics import parse_mqtt_topic
from portpulse.ingest.decode import (
    REASONS,
    DecodedBatch,
    DecodeLimits,
    Message,
    SeriesCodes,
    decode_messages,
    parse_timestamp_ns,
)
from portpulse.ingest.records import build_dead_letters, build_records
from tests.unit.compiled import compiled_half

NOW = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z
LIMITS = DecodeLimits(max_payload_bytes=4096)


def decode(topic: str, payload: bytes | str, limits: DecodeLimits = LIMITS) -> tuple[list[Reading], list[str]]:
    data = payload.encode() if isinstance(payload, str) else payload
    batch = decode_messages([Message(topic, data, NOW)], limits)
    reasons = [p.reason for p in batch.problems.get(0, [])]
    return batch.readings.rows(), reasons


@pytest.mark.parametrize(
    ("raw", "ns"),
    [
        (1_764_000_000, NOW),
        (1_764_000_000.5, NOW + 500_000_000),
        (1_764_000_000_123, NOW + 123_000_000),
        (1_764_000_000_123_456, NOW + 123_456_000),
        (NOW + 7, NOW + 7),
        ("2025-11-24T16:00:00Z", NOW),
        ("2025-11-24T16:00:00.123456789Z", NOW + 123_456_789),
        ("2025-11-24T18:00:00.5+02:00", NOW + 500_000_000),
    ],
)
def test_timestamps_in_every_unit(raw: object, ns: int) -> None:
    assert parse_timestamp_ns(raw) == ns


def test_json_reading() -> None:
    rows, reasons = decode(
        "sensors/air/quai-de-l-europe/no2-1", '{"ts": 1764000000000, "metrics": {"no2": 41.2, "pm25": 9}}'
    )
    assert reasons == []
    assert rows == [
        Reading("no2-1", "quai-de-l-europe", "air", "no2", NOW, 41.2),
        Reading("no2-1", "quai-de-l-europe", "air", "pm25", NOW, 9.0),
    ]


def test_json_reading_without_ts_gets_receive_time_and_flag() -> None:
    rows, _ = decode("sensors/crane/tdf/sts-04", '{"metrics": {"spreader_locked": true}}')
    assert rows == [Reading("sts-04", "tdf", "crane", "spreader_locked", NOW, 1.0, int(FLAG_TS_FROM_RECEIVE))]


def test_json_gateway_batch_keeps_good_readings_and_reports_bad_ones() -> None:
    payload = json.dumps(
        {
            "readings": [
                {"sensor_id": "c1", "ts": "2025-11-24T16:00:00Z", "metrics": {"rsrp": -95.5}},
                {"sensor_id": "c2,evil=1", "ts": 1764000000, "metrics": {"rsrp": -90}},
                {"sensor_id": "c3", "ts": 1764000000, "metrics": {"rsrp": "strong", "sinr": 12}},
            ]
        }
    )
    rows, reasons = decode("sensors/cell/port-2000", payload)
    assert rows == [
        Reading("c1", "port-2000", "cell", "rsrp", NOW, -95.5),
        Reading("c3", "port-2000", "cell", "sinr", NOW, 12.0),
    ]
    assert reasons == ["bad_sensor_id", "non_numeric_value"]


def test_line_protocol_with_tags_escapes_and_several_lines() -> None:
    payload = (
        "air,sensor_id=no2-7,site=bassin-vauban no2=40.5,pm10=22i 1764000000000000000\n"
        "# a comment\n"
        "air,sensor_id=no2-8 no2=41 1764000000\n"
        'air,sensor_id=no2-9 note="hello, world",no2=1.5e1\n'
    )
    rows, reasons = decode("sensors/air/quai/gw-1", payload)
    assert rows == [
        Reading("no2-7", "bassin-vauban", "air", "no2", NOW, 40.5),
        Reading("no2-7", "bassin-vauban", "air", "pm10", NOW, 22.0),
        Reading("no2-8", "quai", "air", "no2", NOW, 41.0),
        Reading("no2-9", "quai", "air", "no2", NOW, 15.0, int(FLAG_TS_FROM_RECEIVE)),
    ]
    assert reasons == ["non_numeric_value"]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/air/quai/s1", "{not json", "malformed_json"),
        ("sensors/air/quai/s1", "air no2", "malformed_line_protocol"),
        ("sensors/air/quai/s1", "air,sensor_id no2=1", "malformed_line_protocol"),
        ("sensors/air/quai/s1", '{"metrics": {"no2": NaN}}', "non_finite_value"),
        ("sensors/air/quai/s1", '{"metrics": {"no2": Infinity}}', "non_finite_value"),
        ("sensors/air/quai/s1", '{"metrics": {"no2": null}}', "non_numeric_value"),
        ("sensors/air/quai/s1", '{"metrics": {"no2": [1]}}', "non_numeric_value"),
        ("sensors/air/quai/s1", '{"metrics": {}}', "missing_metrics"),
        ("sensors/air/quai/s1", '{"ts": 1}', "missing_metrics"),
        ("sensors/air/quai/s1", '{"metrics": {"no 2": 1}}', "bad_metric_name"),
        ("sensors/air/quai/s1", '{"ts": "yesterday", "metrics": {"no2": 1}}', "bad_timestamp"),
        ("sensors/air/quai/s1", '{"ts": 4102444800, "metrics": {"no2": 1}}', "ts_too_far_future"),
        ("sensors/air/quai/s1", '{"ts": 946684800, "metrics": {"no2": 1}}', "ts_too_far_past"),
        ("sensors/air/quai/s1", "[1, 2]", "unsupported_shape"),
        ("sensors/air/quai/s1", "# a comment\n  #another", "missing_metrics"),  # comments only
        ("sensors/air/quai/s1", "[" * 1000 + "]" * 1000, "unsupported_shape"),  # valid JSON, not an object
        ("sensors/air/quai/s1", "[" * 2000 + "]" * 2000, "malformed_json"),  # too deep for either parser
        ("sensors/air/quai/s1", '{"a":' * 3000 + "1" + "}" * 3000, "payload_too_large"),
        ("sensors/air/quai/s1", b"\xff\xfe", "not_utf8"),
        ("sensors/Air/quai/s1", '{"metrics": {"no2": 1}}', "bad_topic"),
        ("sensors/air/qu ai/s1", '{"metrics": {"no2": 1}}', "bad_topic"),
        ("sensors/air/quai", '{"metrics": {"no2": 1}}', "bad_topic"),
        ("sensors/air/quai/s1", '{"readings": [{"sensor_id": "a\\nb", "metrics": {"no2": 1}}]}', "bad_sensor_id"),
        # Unhashable JSON where a name belongs (the validated-name cache must not choke on it).
        ("sensors/air/quai/s1", '{"readings": [{"sensor_id": [1], "metrics": {"no2": 1}}]}', "bad_sensor_id"),
        (
            "sensors/air/quai/s1",
            '{"readings": [{"sensor_id": "s", "site": {"a": 1}, "metrics": {"x": 1}}]}',
            "bad_sensor_id",
        ),
        ("sensors/air/quai/s1", "x" * 5000, "payload_too_large"),
        ("sensors/air/quai/s1", "", "missing_metrics"),
        # Unicode digits str.isdigit accepts and int() refuses, or float() reads (found by fuzzing).
        ("sensors/air/quai/s1", "air no2=1 ²", "bad_timestamp"),
        ("sensors/air/quai/s1", "air no2=²i", "non_numeric_value"),
        ("sensors/air/quai/s1", "air no2=٣", "non_numeric_value"),
    ],
)
def test_every_bad_input_has_a_reason(topic: str, payload: str | bytes, reason: str) -> None:
    rows, reasons = decode(topic, payload)
    assert rows == []
    assert reasons[:1] == [reason]
    assert reason in REASONS


def test_deep_json_is_a_clear_error_not_a_crash() -> None:
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    rows, reasons = decode("sensors/air/quai/s1", deep, DecodeLimits(max_payload_bytes=10**7))
    assert rows == [] and reasons == ["malformed_json"]
    # Beside what the typed decoders read (a gateway batch, a single report): the same error.
    for topic, shape in (("sensors/air/quai", '{"readings": [], '), ("sensors/air/quai/s1", '{"ts": 1, ')):
        rows, reasons = decode(topic, shape + deep[1:], DecodeLimits(max_payload_bytes=10**7))
        assert rows == [] and reasons == ["malformed_json"]


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=40), payload=st.binary(max_size=300))
def test_random_input_never_crashes_and_every_rejection_has_a_known_reason(topic: str, payload: bytes) -> None:
    batch = decode_messages([Message(topic, payload, NOW)], LIMITS)
    for problems in batch.problems.values():
        assert all(p.reason in REASONS for p in problems)
    assert len(batch.readings) == len(batch.message_index)


def test_wire_round_trip_and_corruption() -> None:
    value = encode_value(
        "quai",
        ["no2", "pm25"],
        np.array([0, 1, 0]),
        np.array([1, 2, 3], dtype=np.int64),
        np.array([1.5, 2.5, -3.0]),
        np.array([0, 1, 0], dtype=np.uint8),
    )
    rec = decode_value(value)
    assert rec.site == "quai" and rec.metrics == ("no2", "pm25")
    assert rec.metric_index.tolist() == [0, 1, 0] and rec.ts_ns.tolist() == [1, 2, 3]
    assert rec.value.tolist() == [1.5, 2.5, -3.0] and rec.flags.tolist() == [0, 1, 0]
    with pytest.raises(WireError):
        decode_value(value[:-1])
    with pytest.raises(WireError):
        decode_value(b"\x02" + value[1:])


def test_records_group_by_message_and_sensor_and_dead_letters_keep_the_payload() -> None:
    good = json.dumps(
        {
            "readings": [
                {"sensor_id": "a", "ts": 1764000000, "metrics": {"no2": 1, "pm25": 2}},
                {"sensor_id": "b", "ts": 1764000001, "metrics": {"no2": 3}},
                {"sensor_id": "a", "ts": 1764000002, "metrics": {"no2": 4}},
            ]
        }
    ).encode()
    bad = b'{"metrics": {"no2": "x"}}'
    messages = [Message("sensors/air/quai", good, NOW), Message("sensors/air/quai/s9", bad, NOW)]
    batch = decode_messages(messages, LIMITS)
    records = build_records(batch, "pp")
    # One record per sensor of the delivery, all its metrics in it, in arrival order.
    rows = records.records.as_tuples()
    assert [
        (topic, key, m, n) for (topic, key, _), m, n in zip(rows, records.message, records.readings, strict=True)
    ] == [
        ("pp.readings.air", b"a", 0, 3),
        ("pp.readings.air", b"b", 0, 1),
    ]
    a = decode_value(rows[0][2])
    assert a.metrics == ("no2", "pm25") and a.site == "quai"
    assert [a.metrics[i] for i in a.metric_index] == ["no2", "pm25", "no2"]
    assert a.value.tolist() == [1.0, 2.0, 4.0] and a.ts_ns.tolist() == [NOW, NOW, NOW + 2 * 10**9]
    b = decode_value(rows[1][2])
    assert b.metrics == ("no2",) and b.value.tolist() == [3.0] and b.ts_ns.tolist() == [NOW + 10**9]
    # A sensor spread over several messages of one delivery is one record, in message order.
    later = Message("sensors/air/quai", json.dumps({"readings": [{"sensor_id": "a", "ts": 1764000003,
                                                                  "metrics": {"no2": 5}}]}).encode(), NOW)  # fmt: skip
    merged = build_records(decode_messages([messages[0], later], LIMITS), "pp")
    first = decode_value(merged.records.as_tuples()[0][2])
    assert merged.readings.tolist() == [4, 1] and first.value.tolist() == [1.0, 2.0, 4.0, 5.0]
    assert first.ts_ns.tolist() == [NOW, NOW, NOW + 2 * 10**9, NOW + 3 * 10**9]
    # However many readings a sensor brings, no record outgrows MAX_READINGS_PER_RECORD.
    chatty = [{"sensor_id": "a", "ts": 1763990000 + k, "metrics": {"no2": k}} for k in range(10_000)]
    big = Message("sensors/air/quai", json.dumps({"readings": chatty}).encode(), NOW)
    split = build_records(decode_messages([big], DecodeLimits(max_payload_bytes=2**20)), "pp")
    assert split.readings.tolist() == [4096, 4096, 1808]
    assert decode_values([value for _, _, value in split.records.as_tuples()]).value.tolist() == list(range(10_000))
    letters = build_dead_letters(batch, messages)
    assert [(i, letter.payload, letter.reason, letter.source) for i, letter in letters] == [
        (1, bad, "non_numeric_value", "sensors/air/quai/s9")
    ]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["air", "crane"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["quai", "gate"]),
            st.integers(0, 69),  # metric names: more than one record's name table holds
            st.integers(0, 2**62),
            st.floats(allow_nan=False, width=64),
        ),
        max_size=60,
    ),
    st.sampled_from([0, 0, 0, 4500]),  # readings of one sensor beyond what a record holds
)
def test_records_hold_each_sensors_readings_in_arrival_order_one_record_per_name_table(
    rows: list[tuple[str, str, str, int, int, float]], chatty: int
) -> None:
    """Against the readings themselves: per (domain, sensor, site) the records, read back one
    value at a time, give exactly its readings in arrival order; one record per sensor unless
    it reports more metrics than a name table holds or more readings than a record holds."""
    from portpulse.contract.schema import ReadingColumns, str_array
    from portpulse.ingest.decode import DecodedBatch
    from portpulse.ingest.records import MAX_READINGS_PER_RECORD, METRICS_PER_RECORD

    rows = rows + [("air", "a", "quai", 1, k, float(k)) for k in range(chatty)]
    n = len(rows)
    readings = ReadingColumns(
        str_array([s for _, s, _, _, _, _ in rows]), str_array([w for _, _, w, _, _, _ in rows]),
        str_array([d for d, _, _, _, _, _ in rows]), str_array([f"m{m}" for _, _, _, m, _, _ in rows]),
        np.array([t for *_, t, _ in rows], dtype=np.int64), np.array([v for *_, v in rows]),
        np.arange(n, dtype=np.uint8),
    )  # fmt: skip
    out = build_records(DecodedBatch(readings, np.arange(n, dtype=np.int64) // 7), "pp")
    got: dict[tuple[str, str, str], list[tuple[str, int, float, int]]] = {}
    records: dict[tuple[str, str, str], int] = {}
    for (topic, key, value), count in zip(out.records.as_tuples(), out.readings.tolist(), strict=True):
        one = decode_value(value)
        assert len(one) == count <= MAX_READINGS_PER_RECORD and len(one.metrics) <= METRICS_PER_RECORD
        sensor = (topic.removeprefix("pp.readings."), (key or b"").decode(), one.site)
        records[sensor] = records.get(sensor, 0) + 1
        names = [one.metrics[i] for i in one.metric_index.tolist()]
        got.setdefault(sensor, []).extend(
            zip(names, one.ts_ns.tolist(), one.value.tolist(), one.flags.tolist(), strict=True)
        )
    want: dict[tuple[str, str, str], list[tuple[str, int, float, int]]] = {}
    for i, (d, s, w, m, t, v) in enumerate(rows):
        want.setdefault((d, s, w), []).append((f"m{m}", t, v, i % 256))
    # A name table holds one block of metric codes (first-seen order): within the sensor, the
    # readings of one block keep their order, and blocks follow one another.
    blocks = {
        name: code // METRICS_PER_RECORD for code, name in enumerate(dict.fromkeys(f"m{m}" for *_, m, _, _ in rows))
    }
    for sensor, readings_of in want.items():
        assert got[sensor] == sorted(readings_of, key=lambda x: blocks[x[0]]), sensor
        sensor_blocks = {blocks[name] for name, *_ in readings_of}
        assert records[sensor] == len(sensor_blocks) + sum(
            -(-len([x for x in readings_of if blocks[x[0]] == b]) // MAX_READINGS_PER_RECORD) - 1 for b in sensor_blocks
        )
    assert sorted(got) == sorted(want) and int(out.readings.sum()) == n


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.text(alphabet="abcdefgh-", min_size=1, max_size=12),
                st.lists(
                    st.tuples(
                        st.sampled_from(["no2", "pm25", "wind_speed"]),
                        st.integers(0, 2**62),
                        st.floats(allow_nan=False, width=64),
                    ),
                    max_size=5,
                ),
            ),
            st.binary(max_size=40),  # garbage values
        ),
        max_size=12,
    ),
    # Damage to one value: (which value, at which byte, set to what; or truncated there).
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 200), st.integers(0, 255) | st.none()), max_size=3),
    st.sampled_from(["compiled", "numpy"]),
)
def test_batch_decode_equals_one_value_at_a_time(items: list[Any], damage: list[Any], kind: str) -> None:
    from portpulse.codecs import wire
    from portpulse.codecs.wire import decode_values

    values: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            values.append(item)
            continue
        site, readings = item
        names = sorted({m for m, _, _ in readings})
        values.append(
            encode_value(
                site,
                names,
                [names.index(m) for m, _, _ in readings],
                [t for _, t, _ in readings],
                [v for _, _, v in readings],
                [1] * len(readings),
            )
        )
    for which, at, byte in damage:  # a site or name length too long, a metric index too high, a cut
        if which < len(values) and at < len(values[which]):
            damaged = bytearray(values[which])
            if byte is None:
                del damaged[at:]
            else:
                damaged[at] = byte
            values[which] = bytes(damaged)
    with compiled_half(wire, "_COMPILED_WIRE", kind):
        batch = decode_values(values)
    expected: list[tuple[int, str, str, int, int, int]] = []
    bad = []
    for i, value in enumerate(values):
        try:
            one = decode_value(value)
        except WireError:
            bad.append(i)
            continue
        # values compared bit for bit: a damaged byte can make a NaN, which equals nothing
        expected += [
            (i, one.site, one.metrics[m], t, v, f)
            for m, t, v, f in zip(
                one.metric_index.tolist(),
                one.ts_ns.tolist(),
                one.value.view(np.int64).tolist(),
                one.flags.tolist(),
                strict=True,
            )
        ]
    got = list(
        zip(
            batch.record.tolist(),
            batch.site.tolist(),
            batch.metric.tolist(),
            batch.ts_ns.tolist(),
            batch.value.view(np.int64).tolist(),
            batch.flags.tolist(),
            strict=True,
        )
    )
    assert got == expected
    assert batch.bad == bad


@pytest.mark.parametrize("kind", ["compiled", "numpy"])
def test_batch_decode_fast_paths_still_reject_values_with_a_known_header_and_a_wrong_length(kind: str) -> None:
    from portpulse.codecs import wire
    from portpulse.codecs.wire import decode_values

    names = ["no2", "pm25", "o3"]
    good = encode_value("quai", names, [0, 1, 2], [1, 2, 3], [1.0, 2.0, 3.0], [0, 0, 0])
    single = encode_value("quai", ["no2"], [0], [5], [9.0], [0])
    values = [good, good + b"x", good[:-1], single, single[:-1], good, single + single[-18:], good]
    with compiled_half(wire, "_COMPILED_WIRE", kind):
        batch = decode_values(values)
    assert batch.bad == [1, 2, 4, 6]
    assert batch.record.tolist() == [0, 0, 0, 3, 5, 5, 5, 7, 7, 7]
    assert batch.value.tolist() == [1.0, 2.0, 3.0, 9.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert batch.metric.tolist() == [*names, "no2", *names, *names]


@pytest.mark.parametrize("kind", ["compiled", "numpy"])
def test_batch_decode_drops_a_value_whose_row_names_a_metric_beyond_its_table(kind: str) -> None:
    from portpulse.codecs import wire
    from portpulse.codecs.wire import decode_values

    names = ["no2", "pm25"]
    good = encode_value("quai", names, [0, 1], [1, 2], [1.5, 2.5], [0, 3])
    wild = bytearray(encode_value("quai", names, [0, 1], [7, 8], [7.5, 8.5], [0, 0]))
    wild[-18 + 16] = 2  # the last row's metric index: one past the name table
    with compiled_half(wire, "_COMPILED_WIRE", kind):
        batch = decode_values([good, bytes(wild), good])
    assert batch.bad == [1]
    assert batch.record.tolist() == [0, 0, 2, 2]
    assert batch.metric.tolist() == names * 2
    assert batch.ts_ns.tolist() == [1, 2, 1, 2]
    assert batch.value.tolist() == [1.5, 2.5, 1.5, 2.5]
    assert batch.flags.tolist() == [0, 3, 0, 3]
    assert batch.name_code.tolist()[0] != batch.name_code.tolist()[1]


def test_plain_gateway_batches_take_the_whole_batch_path_with_the_same_result() -> None:
    """Once its names are known, a clean batch is decoded at once; one bad reading sends the whole
    message back through the per-reading path, which reports it and keeps the rest."""
    big = DecodeLimits()
    readings = [
        {"sensor_id": f"gw-{k}", "ts": 1_764_000_000_000 + k, "metrics": {"no2": k + 0.5, "pm25": k}} for k in range(50)
    ]
    readings[7]["site"] = "berth-9"
    good = json.dumps({"readings": readings}).encode()
    first = decode_messages([Message("sensors/air/quai", good, NOW)], big).readings  # learns the names
    second = decode_messages([Message("sensors/air/quai", good, NOW)], big).readings
    for column in ("sensor_id", "site", "domain", "metric", "ts_ns", "value", "flags"):
        assert getattr(second, column).tolist() == getattr(first, column).tolist(), column
    assert len(second) == 100 and second.site.tolist()[14:16] == ["berth-9", "berth-9"]
    assert second.ts_ns.tolist()[:2] == [1_764_000_000_000 * 10**6] * 2
    for bad_value, reason in ((float("inf"), "non_finite_value"), ("7", "non_numeric_value")):
        bad = json.loads(good)
        bad["readings"][3]["metrics"]["no2"] = bad_value
        payload = json.dumps(bad).encode()
        batch = decode_messages([Message("sensors/air/quai", payload, NOW)], big)
        assert len(batch.readings) == 99 and [p.reason for p in batch.problems[0]] == [reason]
    late = json.loads(good)
    late["readings"][0]["ts"] = 1  # 1970: far in the past
    batch = decode_messages([Message("sensors/air/quai", json.dumps(late).encode(), NOW)], big)
    assert len(batch.readings) == 98 and [p.reason for p in batch.problems[0]] == ["ts_too_far_past"]
    # Three keys per reading but a site instead of a sensor id (the topic names the sensor):
    # the site still comes from each reading, and seconds, ms and ns in one dispatch scale apart.
    sited = {"readings": [{"site": "berth-2", "ts": 1_764_000_000 + k, "metrics": {"no2": 1.5}} for k in range(3)]}
    plain = {"readings": [{"sensor_id": "gw-1", "ts": 1_764_000_000_000_000_123, "metrics": {"no2": 2.5}}]}
    for _ in range(2):  # the second time every name is known: the whole-batch path where it applies
        batch = decode_messages([Message("sensors/air/quai/s-7", json.dumps(sited).encode(), NOW),
                                 Message("sensors/air/quai", json.dumps(plain).encode(), NOW),
                                 Message("sensors/air/quai", good, NOW)], big)  # fmt: skip
        r = batch.readings
        assert not batch.problems and len(r) == 104
        assert r.sensor_id.tolist()[:4] == ["s-7", "s-7", "s-7", "gw-1"]
        assert r.site.tolist()[:5] == ["berth-2", "berth-2", "berth-2", "quai", "quai"]
        assert r.ts_ns.tolist()[:6] == [(1_764_000_000 + k) * 10**9 for k in range(3)] + [
            1_764_000_000_000_000_123,
            1_764_000_000_000 * 10**6,
            1_764_000_000_000 * 10**6,
        ]


_NAMES = st.sampled_from(["gw-1", "gw-2", "berth-9", "new-ü", "bad id", "", None, 5, ["gw-1"]])
_STAMPS = st.one_of(
    st.sampled_from([NOW // 10**9, NOW // 10**6, NOW // 10**3, NOW, NOW // 10**9 - 10**6, -NOW, 2**64, 0]),
    st.integers(NOW // 10**6 - 10**6, NOW // 10**6 + 10**6),
    st.floats(allow_nan=False),
    st.sampled_from([None, True, "2025-11-24T16:00:00Z", "soon"]),
)
_VALUES = st.one_of(
    st.floats(),  # NaN and +-inf as json.dumps writes them: literals JSON forbids
    st.integers(-(2**70), 2**70),
    st.sampled_from([True, None, "7", [1], 1e308, -0.0]),
)
_READING = st.fixed_dictionaries(
    {"metrics": st.dictionaries(st.sampled_from(["no2", "pm25", "bad-name"]), _VALUES, max_size=3) | st.none()},
    optional={"sensor_id": _NAMES, "site": _NAMES, "ts": _STAMPS, "unit": st.just("ug/m3")},
)


_FINITE = st.floats(allow_nan=False, allow_infinity=False) | st.integers()
_CLEAN_READING = st.fixed_dictionaries(
    {"metrics": st.dictionaries(st.sampled_from(["no2", "pm25"]), _FINITE, min_size=1)},
    optional={"unit": st.just("ug/m3")},
)


@st.composite
def _gateway_payloads(draw: st.DrawFn) -> str:
    """Mostly clean batches (one timestamp unit each), some with one wild reading or a repeated key."""
    unit = draw(st.sampled_from([10**9, 10**6, 10**3, 1]))
    clean: list[dict[str, Any]] = draw(st.lists(_CLEAN_READING, min_size=1, max_size=6))
    with_sensor, with_site = draw(st.booleans()), draw(st.booleans())  # per batch: mixed ones take the slow path
    for reading in clean:
        reading["ts"] = (NOW + draw(st.integers(-(10**15), 10**12))) // unit
        if with_sensor:
            reading["sensor_id"] = draw(st.sampled_from(["gw-1", "gw-2"]))
        if with_site:
            reading["site"] = "berth-9"
    readings = [json.dumps(r) for r in clean]
    if draw(st.integers(0, 3)) == 0:
        readings.insert(draw(st.integers(0, len(readings))), json.dumps(draw(_READING)))
    if draw(st.booleans()):  # a repeated key: the last one counts, for every parser
        key = draw(st.sampled_from(['"sensor_id": "gw-2"', f'"ts": {NOW // 10**6}', '"metrics": {"no2": 1}']))
        readings[0] = readings[0][:-1] + ", " + key + "}"
    extra = draw(st.sampled_from(["", "", '"gateway": "g-1", ', '"gateway": NaN, ']))
    return "{" + extra + '"readings": [' + ", ".join(readings) + "]}"


def _assert_same_as_the_general_path(message: Message, typed_path: str) -> None:
    """``message`` decodes to exactly the readings and problems with the typed path ``typed_path``
    (a function of ``portpulse.ingest.decode``) as without it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"portpulse.ingest.decode.{typed_path}", lambda *args: False)
        general = decode_messages([message], DecodeLimits())  # also learns the valid names
    fast = decode_messages([message], DecodeLimits())
    assert fast.readings.rows() == general.readings.rows()
    assert fast.message_index.tolist() == general.message_index.tolist()
    assert fast.problems == general.problems


@settings(max_examples=400, deadline=None)
@given(payload=_gateway_payloads(), topic=st.sampled_from(["sensors/air/quai", "sensors/air/quai/s-7"]))
def test_the_whole_batch_path_only_changes_speed(payload: str, topic: str) -> None:
    """Whatever a gateway sends, the typed whole-batch decoder (msgspec) gives exactly the readings
    and the reasons of the per-reading path (orjson dicts) it stands in front of."""
    _assert_same_as_the_general_path(Message(topic, payload.encode(), NOW), "_plain_batch")


@st.composite
def _single_payloads(draw: st.DrawFn) -> str:
    """Mostly clean single reports (integer timestamps in some unit), some wild, some with a
    site of their own, a repeated key or a key the decoder ignores."""
    report: dict[str, Any] = draw(_CLEAN_READING)
    report["ts"] = (NOW + draw(st.integers(-(10**15), 10**12))) // draw(st.sampled_from([10**9, 10**6, 10**3, 1]))
    if draw(st.booleans()):
        report["site"] = draw(st.sampled_from(["berth-9", "berth-9", "bad id", 5]))
    if draw(st.integers(0, 3)) == 0:
        report = draw(_READING)
    text = json.dumps(report)
    if draw(st.booleans()):  # a repeated key: the last one counts, for every parser
        key = draw(st.sampled_from([f'"ts": {NOW // 10**6}', '"metrics": {"no2": 1}', '"site": "quai"', '"ts": null']))
        text = text[:-1] + (", " if len(text) > 2 else "") + key + "}"
    extra = draw(st.sampled_from(["", "", '"gateway": "g-1", ', '"gateway": NaN, ']))
    return "{" + extra + text[1:] if extra and len(text) > 2 else text


@settings(max_examples=400, deadline=None)
@given(
    payload=_single_payloads(),
    topic=st.sampled_from(["sensors/air/quai/s-7", "sensors/air/quai/new-ü", "sensors/air/quai"]),
)
def test_the_single_report_path_only_changes_speed(payload: str, topic: str) -> None:
    """Whatever a sensor sends as its own report, the typed decoder (msgspec) gives exactly the
    readings and the reasons of the per-reading path (orjson dicts) it stands in front of."""
    _assert_same_as_the_general_path(Message(topic, payload.encode(), NOW), "_plain_single")


def test_a_known_sensors_single_reports_are_decoded_whole() -> None:
    """The typed path takes a known sensor's clean report (its values, site and scaled time as
    the per-reading path gives them) and leaves a new name, a bad time or a NaN to that path."""
    from portpulse.ingest import decode

    topic = parse_mqtt_topic("sensors/air/quai/s-7", "sensors")
    assert not isinstance(topic, str)
    learn = f'{{"ts": {NOW}, "metrics": {{"no2": 1, "pm25": 2}}}}'.encode()  # s-7, quai, no2, pm25
    assert len(decode_messages([Message("sensors/air/quai/s-7", learn, NOW)], DecodeLimits()).readings) == 2
    out = decode._Out()
    ms = NOW // 10**6
    clean = f'{{"ts": {ms}, "metrics": {{"no2": 40, "pm25": 12.5}}, "site": "quai"}}'
    assert decode._plain_single(3, clean, topic, NOW, DecodeLimits(), out)
    r, message = out.columns()
    assert [(x.sensor_id, x.site, x.domain, x.metric, x.ts_ns, x.value, x.flags) for x in r.rows()] == [
        ("s-7", "quai", "air", "no2", ms * 10**6, 40.0, 0),
        ("s-7", "quai", "air", "pm25", ms * 10**6, 12.5, 0),
    ]
    assert message.tolist() == [3, 3]
    refused = [
        f'{{"ts": {ms}, "metrics": {{"no3": 1}}}}',  # a metric not validated yet
        '{"ts": 1, "metrics": {"no2": 1}}',  # 1970
        f'{{"ts": {ms}, "metrics": {{"no2": NaN}}}}',
        f'{{"ts": {ms}, "metrics": {{}}}}',
        f'{{"ts": {ms}, "metrics": {{"no2": 1}}, "site": "pier-new"}}',  # a site not validated yet
        '{"ts": null, "metrics": {"no2": 1}}',  # the receive time stands in, flagged: the general path
    ]
    for text in refused:
        assert not decode._plain_single(0, text, topic, NOW, DecodeLimits(), decode._Out()), text


_CLEAN_REPORTS = st.builds(
    lambda ms, metrics, site: json.dumps({"ts": NOW // 10**6 + ms, "metrics": metrics, **site}),
    st.integers(-(10**4), 10**4),
    st.dictionaries(st.sampled_from(["no2", "pm25"]), _FINITE, min_size=1),
    st.sampled_from([{}, {}, {"site": "berth-9"}]),
)


_SENSOR_TOPICS = st.sampled_from(["sensors/air/quai/s-7", "sensors/crane/berth-9/c-1", "sensors/air/quai/s-8"])


@settings(max_examples=300, deadline=None)
@given(
    reports=st.lists(st.tuples(_CLEAN_REPORTS, _SENSOR_TOPICS, st.sampled_from([0, 0, 10**9])), min_size=2,
                     max_size=6)  # a fleet's delivery
    | st.lists(
        st.tuples(
            st.one_of(_CLEAN_REPORTS, _single_payloads(),
                      st.sampled_from(['{"readings": [{"ts": 1, "metrics": {"no2": 1}}]}', "air no2=1",
                                       '{"ts": 1764000000000, "metrics": {"no2": 1}, "x": "\\u00e9\\ud800"}'])),
            _SENSOR_TOPICS | st.sampled_from(["sensors/air/quai", "sensors/air/quai/new-ü", "bad/topic"]),
            st.sampled_from([0, 0, 0, 10**9, -(10**18), 10**16]),  # received: now, later, long before, long after
        ),
        min_size=2,
        max_size=6,
    ),
    not_utf8=st.integers(0, 5),
)  # fmt: skip
def test_a_delivery_of_json_reports_decoded_at_once_gives_what_one_by_one_gives(
    reports: list[tuple[str, str, int]], not_utf8: int
) -> None:
    """Sensors' own JSON reports, a delivery at a time: the same readings, message indices and
    reasons as each message decoded on its own (which also learns the names first)."""
    messages = [Message(topic, text.encode(), NOW + shift) for text, topic, shift in reports]
    if not_utf8 == 0:  # bytes that are no UTF-8 inside a string the report's decoder would skip
        topic, payload, received = messages[-1]
        messages[-1] = Message(topic, payload[:-1] + b', "x": "\xff"}', received)
    _assert_same_at_once_as_one_by_one(messages, "_plain_reports")


def test_json_reports_of_a_delivery_are_decoded_at_once() -> None:
    """The delivery-wide path is taken for what a fleet's sensors send (else the test above
    proves little), and leaves a delivery with anything else in it to the per-message path."""
    from portpulse.ingest import decode as module

    ms = NOW // 10**6
    sent = [
        ("sensors/air/quai/s-7", {"ts": ms, "metrics": {"no2": 40, "pm25": 12.5}}),
        ("sensors/crane/berth-9/c-1", {"ts": ms + 1, "metrics": {"hoist_load": 7}}),
        ("sensors/air/quai/s-8", {"ts": ms + 2, "metrics": {"pm25": 3.25}, "site": "berth-9"}),
    ]
    messages = [Message(topic, json.dumps(report).encode(), NOW) for topic, report in sent]
    decode_messages(messages[:1], DecodeLimits())  # learns the names
    decode_messages(messages[1:], DecodeLimits())
    out = module._Out()
    assert module._plain_reports(messages, DecodeLimits(), out) is not None
    readings, index = out.columns()
    assert [(r.sensor_id, r.site, r.domain, r.metric, r.ts_ns, r.value) for r in readings.rows()] == [
        ("s-7", "quai", "air", "no2", ms * 10**6, 40.0),
        ("s-7", "quai", "air", "pm25", ms * 10**6, 12.5),
        ("c-1", "berth-9", "crane", "hoist_load", (ms + 1) * 10**6, 7.0),
        ("s-8", "berth-9", "air", "pm25", (ms + 2) * 10**6, 3.25),
    ]
    assert index.tolist() == [0, 0, 1, 2]
    _assert_codes_name_the_readings(decode_messages(messages, DecodeLimits()))
    others = [
        Message("sensors/air/quai", b'{"readings": [{"sensor_id": "s-7", "ts": 1, "metrics": {"no2": 1}}]}', NOW),
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{"no3": 1}}}}'.encode(), NOW),  # a new metric
        Message("sensors/air/quai/s-7", f'{{"ts": {ms // 1000}, "metrics": {{"no2": 1}}}}'.encode(), NOW),  # in s
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{"no2": 1}}}}'.encode(), NOW - 10**18),
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{"no2": 1}}}}'.encode(), NOW + 10**16),
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{"no2": 1}}, "x": "'.encode() + b'\xff"}', NOW),
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{"no2": 1}}, "site": "new"}}'.encode(), NOW),
        Message("sensors/air/quai/s-7", f'{{"ts": {ms}, "metrics": {{}}}}'.encode(), NOW),
        Message("sensors/air/quai/s-7", b"air no2=1", NOW),
        Message("sensors/air", f'{{"ts": {ms}, "metrics": {{"no2": 1}}}}'.encode(), NOW),
    ]
    for other in others:
        assert module._plain_reports([*messages, other], DecodeLimits(), module._Out()) is None, other


_LP_SENSORS = st.sampled_from(["gw-1", "gw-2", "s-7", "new-sensor", "bad id", "ü"])
_LP_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["1i", "2u", "t", "false", "1_000", "+3.5", "0x10", '"text"', "1e400", "nan", "-0.0", "1.5e308"]),
)


_LP_FIELD_NAMES = st.lists(st.sampled_from(["no2", "pm25", "o3", "no2", "bad-name", ""]), min_size=1, max_size=3)


@st.composite
def _lp_line(draw: st.DrawFn, names: list[str] | None = None) -> str:
    """A line of line protocol; with ``names``, its fields are those (a gateway's uniform reports)."""
    measurement = draw(st.sampled_from(["air", "air2", "a=b"]))
    tags = draw(st.lists(st.sampled_from([f"sensor_id={draw(_LP_SENSORS)}", "site=berth-9", "site=quai", "x=1",
                                          "sensor_id=gw-2", "bad", "k="]), max_size=3))  # fmt: skip
    fields = [(name, draw(_LP_VALUES)) for name in (names if names is not None else draw(_LP_FIELD_NAMES))]
    unit = draw(st.sampled_from([10**9, 10**6, 10**3, 1]))
    ts = (NOW + draw(st.integers(-(10**15), 10**12))) // unit
    stamp = draw(st.sampled_from([str(ts), str(ts), f"-{ts}", "", "12x"]))
    head = ",".join([measurement, *tags])
    line = f"{head} {','.join(f'{k}={v}' for k, v in fields)}" + (f" {stamp}" if stamp else "")
    return draw(st.sampled_from([line, line, line, " " + line, line + " ", line.replace(" ", "  ", 1)]))


_LP_MESSAGES = st.one_of(
    st.lists(_lp_line(), min_size=1, max_size=5),
    _LP_FIELD_NAMES.flatmap(lambda names: st.lists(_lp_line(names), min_size=1, max_size=5)),
)


@pytest.mark.parametrize("tokenizer", ["compiled", "python"])
@settings(max_examples=800, deadline=None)
@given(lines=_LP_MESSAGES, sep=st.sampled_from(["\n", "\n", "\r\n", "\n\n"]),
       topic=st.sampled_from(["sensors/air/quai", "sensors/air/quai/s-7"]))  # fmt: skip
def test_the_whole_message_line_protocol_path_only_changes_speed(
    tokenizer: str, lines: list[str], sep: str, topic: str
) -> None:
    """Whatever a gateway sends as line protocol, the whole-message path gives exactly the
    readings and the reasons of the per-line path it stands in front of, with either tokenizer."""
    message = [Message(topic, sep.join(lines).encode(), NOW)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("portpulse.ingest.decode._plain_lines", lambda *args: False)
        general = decode_messages(message, DecodeLimits())  # also learns the valid names
    with pytest.MonkeyPatch.context() as patch:
        if tokenizer == "python":
            patch.setattr("portpulse.ingest.decode._compiled_tokenize", None)
            patch.setattr("portpulse.ingest.decode._compiled_tokenize_line", None)
        fast = decode_messages(message, DecodeLimits())
    assert fast.readings.rows() == general.readings.rows()
    assert fast.message_index.tolist() == general.message_index.tolist()
    assert fast.problems == general.problems


def test_plain_line_protocol_takes_the_whole_message_path() -> None:
    """The fast path is taken for what fleets send (else the test above proves little)."""
    from portpulse.contract.topics import MqttTopic, parse_mqtt_topic
    from portpulse.ingest import decode as module

    body = "\n".join(f"air,sensor_id=gw-{k % 2 + 1},site=quai no2={k}.5,pm25=1 {NOW + k}" for k in range(10))
    decode_messages([Message("sensors/air/quai", body.encode(), NOW)], DecodeLimits())  # learns the names
    topic = parse_mqtt_topic("sensors/air/quai")
    assert isinstance(topic, MqttTopic)
    out = module._Out()
    assert module._plain_lines(0, body, topic, NOW, DecodeLimits(), out)
    readings, messages = out.columns()
    assert len(readings) == 20 and readings.value[:4].tolist() == [0.5, 1.0, 1.5, 1.0]
    assert readings.ts_ns[:3].tolist() == [NOW, NOW, NOW + 1] and messages.tolist() == [0] * 20
    assert readings.sensor_id[:3].tolist() == ["gw-1", "gw-1", "gw-2"] and readings.metric[:2].tolist() == [
        "no2",
        "pm25",
    ]
    for line, metrics, values, ts in (
        (f"air,sensor_id=gw-2 no2=7.25 {NOW // 10**6}\n", ["no2"], [7.25], NOW // 10**6 * 10**6),
        (f"air,sensor_id=gw-1 pm25=1,no2=-3e2 {NOW}", ["pm25", "no2"], [1.0, -300.0], NOW),
    ):
        one = module._Out()
        assert module._plain_lines(0, line, topic, NOW, DecodeLimits(), one)  # a sensor's own report
        assert one.metric == metrics and one.value == values and one.sensor == [line[14:18]] * len(values)
        assert one.ts == [ts] * len(values) and one.scaled == []


def test_the_compiled_line_protocol_tokenizer_is_built() -> None:
    """``make install`` builds it (setup.py): an install that silently fell back to the Python
    tokenizer would decode line protocol at half the speed."""
    from portpulse.ingest import decode as module

    assert module.LINE_TOKENIZER == "compiled"
    assert module._compiled_tokenize is not None
    module._COMPILED_HEADS.forget()
    found = module._compiled_tokenize(
        ["a,s=1 x=1.5,y=-2e3 17\na,s=2 x=.25,y=4 18\n", "\nb z=3,x=-0.5 19\na,s=1 z=0,x=0 20"]
    )
    assert found is not None
    heads, known, added, names, codes, widths, lines, values, stamps = found
    assert np.frombuffer(heads, dtype=np.int64).tolist() == [0, 1, 2, 0] and known == 0
    assert added == ["a,s=1", "a,s=2", "b"] and names == ["x", "y", "z"]
    again = module._compiled_tokenize(["b z=1 1\na,s=3 z=2 2"])  # known heads keep their codes
    assert again is not None and np.frombuffer(again[0], dtype=np.int64).tolist() == [2, 3]
    assert again[1:3] == (3, ["a,s=3"])
    module._COMPILED_HEADS.forget()
    assert np.frombuffer(codes, dtype=np.int64).tolist() == [0, 1, 0, 1, 2, 0, 2, 0]
    assert np.frombuffer(widths, dtype=np.int64).tolist() == [2, 2]
    assert np.frombuffer(lines, dtype=np.int64).tolist() == [2, 2]
    assert np.frombuffer(values).tolist() == [1.5, -2000.0, 0.25, 4.0, 3.0, -0.5, 0.0, 0.0]
    assert np.frombuffer(stamps, dtype=np.int64).tolist() == [17, 18, 19, 20]


_DECIMALS = st.from_regex(r"[+-]?([0-9]{0,24}(\.[0-9]{0,24})?|\.[0-9]{1,24})([eE][+-]?[0-9]{1,4})?", fullmatch=True)


@settings(max_examples=3000, deadline=None)
@given(text=st.one_of(_DECIMALS, st.floats(allow_nan=False, allow_infinity=False).map(repr)))
def test_compiled_values_are_the_floats_python_reads(text: str) -> None:
    """Bit for bit what ``float`` gives (its fast path and its fallback alike), or refused when
    ``float`` refuses or the value is not finite."""
    from portpulse.ingest import decode as module

    assert module._compiled_tokenize is not None
    found = module._compiled_tokenize([f"m x={text} 1\nm x=0 2"])
    try:
        want: float | None = float(text)
    except ValueError:
        want = None
    if want is None or not np.isfinite(want):
        assert found is None
    else:
        assert found is not None
        assert found[7][:8] == np.float64(want).tobytes()


@st.composite
def _plain_lp_line(draw: st.DrawFn) -> str:
    """A line the compiled tokenizer may take: plain floats, fields from a small set in any order."""
    names = draw(st.lists(st.sampled_from(["no2", "so2", "co2", "pm25"]), min_size=1, max_size=3, unique=True))
    values = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), st.integers(-999, 999).map(str))
    fields = ",".join(f"{name}={draw(values)}" for name in names)
    return f"air,sensor_id=gw-{draw(st.integers(1, 3))} {fields} {draw(st.integers(0, 2**63 + 9))}"


@settings(max_examples=800, deadline=None)
@given(messages=st.lists(st.one_of(_LP_MESSAGES, st.lists(_plain_lp_line(), min_size=1, max_size=4)),
                         min_size=1, max_size=3),
       sep=st.sampled_from(["\n", "\n", "\r\n", "\n\n"]))  # fmt: skip
def test_the_compiled_tokenizer_cuts_what_it_takes_as_the_python_one_does(messages: list[list[str]], sep: str) -> None:
    """What the compiled tokenizer takes (texts of uniform lines of plain floats), the Python
    tokenizer cuts into the same parts; it leaves the rest to it."""
    from portpulse.ingest import decode as module

    texts = [sep.join(lines) for lines in messages]
    python = module._tokenize_texts_python(texts)
    assert module._compiled_tokenize_line is not None
    line = module._compiled_tokenize_line(texts[0])
    if line is not None:  # a sensor's own report
        one = module._tokenize_python(texts[0])
        assert one is not None and len(one.heads) == 1
        assert line == (one.heads[0], one.names, one.values.tolist(), int(one.stamps[0]))
    assert module._compiled_tokenize is not None
    if module._compiled_tokenize(texts) is None:
        return
    compiled = module._tokenize(texts)
    assert compiled is not None

    def tags(tokens: Any) -> list[tuple[bool, str | None, str | None]]:
        heads = tokens.heads
        named = [[heads.names[c] if c >= 0 else None for c in heads.tag[t][tokens.head].tolist()] for t in heads.tag]
        return list(zip(heads.valid[tokens.head].tolist(), *named, strict=True))

    payloads = [text.encode() for text in texts]  # as received: read as they are, in either tokenizer
    from_payloads = module._tokenize(payloads)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_compiled_tokenize", None)
        python_from_payloads = module._tokenize(payloads)
    for other in (python, from_payloads, python_from_payloads):
        assert other is not None
        assert tags(compiled) == tags(other)  # each line's head says the same in both tables
        assert compiled.names == other.names
        for name in ("codes", "counts", "lines", "stamps"):
            assert getattr(compiled, name).tolist() == getattr(other, name).tolist(), name
        assert compiled.values.tobytes() == other.values.tobytes()


def test_payloads_that_are_not_plain_ascii_are_left_to_the_per_message_path() -> None:
    from portpulse.ingest import decode as module

    good = f"air,sensor_id=s-1 no2=7.25 {NOW}".encode()
    for bad in ("air,sensor_id=s-é no2=1 1".encode(), b"air,sensor_id=s-\xff no2=1 1", b"air no2=1\x00 1"):
        assert module._tokenize([good, good]) is not None
        assert module._tokenize([good, bad]) is None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "_compiled_tokenize", None)
            assert module._tokenize([good, bad]) is None


def test_the_compiled_tokenizer_takes_what_fleets_send_and_leaves_the_rest() -> None:
    from portpulse.ingest import decode as module

    assert module._compiled_tokenize is not None
    fleet = "".join(f"air,sensor_id=air-{k},site=quai no2={k}.25,pm25=3,o3=-1e-2 {NOW + k}\n" for k in range(50))
    cranes = "".join(f"crane,sensor_id=c-{k} hoist_load={k},wind=3.5 {NOW + k}\n" for k in range(5))
    found = module._compiled_tokenize([fleet, cranes, fleet])  # each text uniform, not the delivery
    assert found is not None and found[3] == ["no2", "pm25", "o3", "hoist_load", "wind"]
    assert module._compiled_tokenize_line is not None
    assert module._compiled_tokenize_line(f"air,sensor_id=s-1 no2=7.25 {NOW}\n") == (
        "air,sensor_id=s-1",
        ["no2"],
        [7.25],
        NOW,
    )
    assert module._compiled_tokenize_line(fleet) is None  # more than one line
    for other in (
        "a x=1,y=2 1\na y=2,x=1 2",  # fields in another order: the Python tokenizer
        "a x=1 1\na x=1,y=2 2",  # another number of fields
        "a x=1,y=2 1\na x=1,x=2 2",  # a field twice
        "a x=1,x=2 1",
        "a x=1,xy=2 1\na x=1,x=2 2",
        "a x=1 1\na xy=1 2",  # a longer name
        "a xy=1 1\na x=1 2",
        "a x=1_0 1\na x=2 2",  # an underscore float() reads
        "a x=1i 1\na x=2 2",  # an integer field
        "a x=nan 1\na x=2 2",
        "a x=1e309 1\na x=2 2",  # not finite
        'a x="s" 1\na x=2 2',
        "a\\,b x=1 1\na x=2 2",
        "a x=1 1\r\na x=2 2",
        "a x=1 1 \na x=2 2",  # a trailing space
        "a x=1\na x=2 2",  # no timestamp
        "a x=1 9223372036854775808\na x=2 2",  # 2**63
        "a x=1 -5\na x=2 2",
        "a x=1, 5\na x=2 2",
        "a x==1 5\na x=2 2",
        "a =1 5\na =2 2",
        " x=1 5\n x=2 2",
        "a x=1 5\na\tx=2 2",
        "a x=é 5\na x=2 2",
    ):
        assert module._compiled_tokenize([fleet, other]) is None, other
    assert module._compiled_tokenize([fleet, ""]) is None  # a message without a line
    assert module._compiled_tokenize([fleet, "\n\n"]) is None
    assert module._compiled_tokenize([]) is None


@settings(max_examples=400, deadline=None)
@given(
    reports=st.lists(
        st.tuples(
            st.one_of(_lp_line(["no2"]), _lp_line(["no2", "pm25"]), _lp_line(), _plain_lp_line(),
                      st.lists(st.one_of(_plain_lp_line(), _lp_line(["no2", "pm25"])), min_size=2, max_size=4).map(
                          "\n".join),  # a gateway's batch
                      st.sampled_from(['{"metrics": {"no2": 1.5}}', "", "air no2=1 1\nair no2=2 2\n"])),
            st.sampled_from(["sensors/air/quai", "sensors/air/quai/s-7", "sensors/crane/berth-9/c-1", "bad/topic"]),
            st.sampled_from([0, 0, 10**9, -(10**18), 10**16]),  # received: now, later, long before, long after
        ),
        min_size=2,
        max_size=6,
    )
)  # fmt: skip
def test_a_delivery_of_line_protocol_decoded_at_once_gives_what_one_by_one_gives(
    reports: list[tuple[str, str, int]],
) -> None:
    """Sensors' own reports and gateways' batches, a delivery at a time: the same readings,
    message indices and reasons as each message decoded on its own (which also learns the names
    first)."""
    messages = [Message(topic, line.encode(), NOW + shift) for line, topic, shift in reports]
    _assert_same_at_once_as_one_by_one(messages, "_plain_delivery")


def _assert_same_at_once_as_one_by_one(messages: list[Message], delivery_path: str) -> None:
    """``messages`` decode to the same readings, message indices and reasons with the
    delivery-wide path ``delivery_path`` (a function of ``portpulse.ingest.decode``) as one by
    one without it (which also learns the names first), and the codes it gives name them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"portpulse.ingest.decode.{delivery_path}", lambda *args: None)
        one_by_one = decode_messages(messages, DecodeLimits())
    at_once = decode_messages(messages, DecodeLimits())
    assert one_by_one.codes is None
    _assert_codes_name_the_readings(at_once)
    assert at_once.readings.rows() == one_by_one.readings.rows()
    assert at_once.message_index.tolist() == one_by_one.message_index.tolist()
    assert at_once.problems == one_by_one.problems


_FRESH = iter(range(10**9))


def _assert_codes_name_the_readings(batch: DecodedBatch) -> None:
    """The names a plain delivery factorised as it decoded are the readings' own, first-seen
    order included (what SeriesCodes.of computes from the columns)."""
    if batch.codes is None:
        return
    codes, again = batch.codes, SeriesCodes.of(batch.readings)
    for column in ("domain", "sensor", "site"):
        assert getattr(codes, column).tolist() == getattr(again, column).tolist(), column
        assert getattr(codes, column + "s") == getattr(again, column + "s"), column
    assert codes.metric is not None and codes.metrics is not None
    assert [codes.metrics[c] for c in codes.metric.tolist()] == batch.readings.metric.tolist()
    assert len(set(codes.metrics)) == len(codes.metrics)
    assert codes.distinct is not None  # the distinct series among lines are those among readings
    first, code = distinct_codes(again.series())
    assert codes.distinct[0].tolist() == first.tolist() and codes.distinct[1].tolist() == code.tolist()


@settings(max_examples=200, deadline=None)
@given(
    sensors=st.lists(st.sampled_from(["new", "new", "new", "bad id", "é", "s" * 127, "-s"]), min_size=1, max_size=4),
    metrics=st.lists(st.sampled_from(["m", "m2", "m3", "bad-metric", "n" * 65]), min_size=1, max_size=3, unique=True),
    site_tag=st.booleans(),
    one_line=st.booleans(),
)
def test_new_names_take_the_delivery_path_and_give_what_the_per_line_path_gives(
    sensors: list[str], metrics: list[str], site_tag: bool, one_line: bool
) -> None:
    """Sensors, sites and metrics never seen before are checked (and learned) by the delivery
    path itself: valid ones are decoded at once, a bad one sends the delivery to the per-line
    path, and either way the readings and reasons are the per-line path's."""
    from portpulse.ingest import decode as module

    fresh = next(_FRESH)
    names = {"new": f"s-{fresh}", "m": f"m{fresh}", "m2": f"m{fresh}_2", "m3": f"m{fresh}_3"}
    site = f"site-{fresh}"
    fields = ",".join(f"{names.get(m, m)}={k}.5" for k, m in enumerate(metrics))
    lines = [f"air,sensor_id={names.get(s, s)}-{k}{f',site={site}' if site_tag else ''} {fields} {NOW + k}"
             for k, s in enumerate(sensors)]  # fmt: skip
    payloads = lines if one_line else ["\n".join(lines), lines[0]]
    messages = [Message(f"sensors/air/{site}x", p.encode(), NOW) for p in payloads]
    out = module._Out()
    taken = module._plain_delivery(messages, DecodeLimits(), out) is not None
    valid = all(s == "new" for s in sensors) and all(m in names for m in metrics)
    assert taken == valid
    at_once = decode_messages(messages, DecodeLimits())
    _assert_codes_name_the_readings(at_once)
    assert (at_once.codes is not None) == ((valid and not one_line) or (valid and len(messages) > 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("portpulse.ingest.decode._plain_delivery", lambda *args: None)
        patch.setattr("portpulse.ingest.decode._plain_lines", lambda *args: False)
        per_line = decode_messages(messages, DecodeLimits())
    assert at_once.readings.rows() == per_line.readings.rows()
    assert at_once.problems == per_line.problems
    if valid:
        assert len(at_once.readings) == len(metrics) * (len(sensors) if one_line else len(sensors) + 1)


def test_line_protocol_reports_and_batches_of_a_delivery_are_decoded_at_once() -> None:
    """The delivery-wide path is taken for what sensors send (else the test above proves little)."""
    from portpulse.ingest import decode as module

    lines = [f"air,sensor_id=s-{k},site=quai no2={k}.5 {NOW + k}" for k in range(3)] + [f"crane hoist_load=7 {NOW}"]
    topics = ["sensors/air/quai"] * 3 + ["sensors/crane/berth-9/c-1"]
    messages = [Message(t, line.encode(), NOW) for t, line in zip(topics, lines, strict=True)]
    decode_messages(messages, DecodeLimits())  # learns the names
    out = module._Out()
    assert module._plain_delivery(messages, DecodeLimits(), out)
    readings, index = out.columns()
    assert readings.sensor_id.tolist() == ["s-0", "s-1", "s-2", "c-1"] and index.tolist() == [0, 1, 2, 3]
    assert readings.domain.tolist() == ["air"] * 3 + ["crane"] and readings.site.tolist()[-1] == "berth-9"
    assert readings.value.tolist() == [0.5, 1.5, 2.5, 7.0] and readings.ts_ns.tolist() == [NOW, NOW + 1, NOW + 2, NOW]
    for other in ([*lines[:3], "crane hoist_load=7"], [*lines[:3], ""], [lines[0], '{"metrics": {"no2": 1}}']):
        assert not module._plain_delivery([Message(topics[0], o.encode(), NOW) for o in other], DecodeLimits(), out)
    gateways = ["\n".join(lines[:3]) + "\n", lines[3], "\n".join(lines[1:3])]  # batches of lines, one report
    out = module._Out()
    assert module._plain_delivery(
        [Message(t, g.encode(), NOW) for t, g in zip(topics[2:] + topics[:1], gateways, strict=True)],
        DecodeLimits(),
        out,
    )
    readings, index = out.columns()
    assert readings.sensor_id.tolist() == ["s-0", "s-1", "s-2", "c-1", "s-1", "s-2"] and index.tolist() == [
        0,
        0,
        0,
        1,
        2,
        2,
    ]
    assert readings.domain.tolist() == ["air"] * 3 + ["crane"] + ["air"] * 2
    assert readings.metric.tolist() == ["no2"] * 3 + ["hoist_load"] + ["no2"] * 2


def test_compiled_wire_reader_refuses_readings_outside_its_buffer_and_unknown_headers() -> None:
    from portpulse.codecs import wire

    if wire._COMPILED_WIRE is None:
        pytest.skip("the compiled half is not built")
    _, readings = wire._COMPILED_WIRE
    data = np.frombuffer(encode_value("quai", ["no2"], [0, 0], [1, 2], [1.0, 2.0], [0, 0]), dtype=np.uint8)
    one = np.array([1], dtype=np.int64)
    body = np.array([len(data) - 36], dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    columns = readings(data, body, np.array([2], dtype=np.int64), zero, one, zero, 1)
    assert np.frombuffer(columns[3], dtype=np.int64).tolist() == [1, 2]
    assert np.frombuffer(columns[4], dtype=np.float64).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="outside the buffer"):
        readings(data, body, np.array([3], dtype=np.int64), zero, one, zero, 1)
    with pytest.raises(ValueError, match="outside the widths"):
        readings(data, body, np.array([2], dtype=np.int64), one, one, zero, 1)


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_a_fleets_heads_are_read_right_when_the_table_of_heads_starts_over(kind: str) -> None:
    """The tokenizers intern each line's head (measurement and tags) in a bounded table, and the
    decoder reads sensor and site by head code. Past its limit the table starts over; the compiled
    table also starts over when it was used without the decoder's table. Every delivery still
    names each reading's sensor and site right (untagged lines: their topic's), as the text says."""
    from portpulse.ingest import decode as module

    def delivery(first: int) -> list[Message]:
        tagged = "\n".join(
            f"air,sensor_id=h-{k},site=dock-{k % 3} no2={k}.5,o3=1 {NOW + k}" for k in range(first, first + 4)
        )
        untagged = f"air no2=9,o3=2 {NOW}\nair,site=quai no2=8,o3=3 {NOW}"  # the topic names the sensor
        return [
            Message("sensors/air/quai", tagged.encode(), NOW),
            Message("sensors/air/quai/t-9", untagged.encode(), NOW),
        ]

    def expected(first: int) -> list[tuple[str, str, str, float]]:
        rows = [
            (f"h-{k}", f"dock-{k % 3}", m, v)
            for k in range(first, first + 4)
            for m, v in (("no2", k + 0.5), ("o3", 1.0))
        ]
        return [
            *rows,
            ("t-9", "quai", "no2", 9.0),
            ("t-9", "quai", "o3", 2.0),
            ("t-9", "quai", "no2", 8.0),
            ("t-9", "quai", "o3", 3.0),
        ]

    heads = module._COMPILED_HEADS if kind == "compiled" else module._PYTHON_HEADS
    with compiled_half(module, "_compiled_tokenize", kind), pytest.MonkeyPatch.context() as patch:
        patch.setattr(heads, "_limit", 10)  # heads or names
        heads.forget()
        decode_messages(delivery(0), DecodeLimits())  # learns the names: 6 heads, 9 names
        if kind == "compiled":
            assert module._compiled_tokenize is not None
            module._compiled_tokenize(["air,sensor_id=behind-its-back no2=1 1"])
        started_over = 0
        for first in (0, 2, 10, 20, 0, 30, 40):  # new heads each time but one
            size = heads.size
            decoded = decode_messages(delivery(first), DecodeLimits())
            assert decoded.codes is not None and not decoded.problems  # the delivery-wide path
            r = decoded.readings
            got = list(zip(r.sensor_id.tolist(), r.site.tolist(), r.metric.tolist(), r.value.tolist(), strict=True))
            assert got == expected(first), first
            assert [decoded.codes.sensors[c] for c in decoded.codes.sensor] == r.sensor_id.tolist()
            started_over += heads.size < size
            assert heads.size <= 10 + 6
        assert started_over >= 3
    heads.forget()
