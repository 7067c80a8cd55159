"""Hostile input through every pure stage core: MQTT payload -> decoder -> Kafka record -> batch
wire decode -> line protocol. Nothing crashes, nothing is dropped silently, every rejection has
a known reason, and what is accepted cannot inject into Kafka keys or InfluxDB lines."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.codecs.wire import decode_values
from portpulse.contract.points import PointColumns
from portpulse.contract.topics import ID_RE
from portpulse.ingest.decode import REASONS, DecodeLimits, Message, decode_messages
from portpulse.ingest.records import build_records
from portpulse.sinks.lineprotocol import encode_lines
from tests.unit.test_lineprotocol import parse_line

NOW = 1_764_000_000_000_000_000
LIMITS = DecodeLimits(max_payload_bytes=2048)

# Ids an attacker or a broken gateway might send: injection characters, unicode, control bytes.
hostile_id = st.one_of(
    st.sampled_from(["aq-1", "a b", "a,b=c", 'x"y', "a\nb", "a\\", "../..", "+", "#", "$SYS", "é", "\x00", "a" * 200]),
    st.text(min_size=0, max_size=20),
)
huge_number = st.sampled_from([1e308, -1e308, 10**400, -(10**30), 2**63, float("inf"), float("nan"), 0.0, 41.5])
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**25), 10**25), huge_number)
any_value = st.one_of(number, st.text(max_size=6), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
timestamp = st.one_of(
    st.integers(-(10**20), 10**20), st.sampled_from([NOW, NOW // 10**6, NOW // 10**9, "2025-11-24T16:00:00Z"]),
    st.text(max_size=12), st.none(),
)  # fmt: skip
metrics = st.dictionaries(hostile_id, any_value, max_size=4)


def nested(depth: int) -> str:
    return '{"ts": 1, "metrics": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


json_reading = st.builds(lambda ts, m: json.dumps({"ts": ts, "metrics": m}, allow_nan=True), timestamp, metrics)
json_batch = st.builds(
    lambda rs: json.dumps({"readings": rs}, allow_nan=True),
    st.lists(st.fixed_dictionaries({"sensor_id": hostile_id, "ts": timestamp, "metrics": metrics}), max_size=4),
)
line = st.builds(
    lambda m, tags, fields, ts: f"{m}{tags} {fields} {ts}",
    hostile_id,
    st.lists(st.tuples(hostile_id, hostile_id), max_size=3).map(lambda kv: "".join(f",{k}={v}" for k, v in kv)),
    st.lists(st.tuples(hostile_id, number), min_size=1, max_size=3).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
    st.one_of(st.integers(0, 2 * NOW), st.text(max_size=5)),
)  # fmt: skip
payload = st.one_of(
    json_reading.map(str.encode), json_batch.map(str.encode),
    st.lists(line, min_size=1, max_size=4).map(lambda ls: "\n".join(ls).encode()),
    st.binary(max_size=200), st.integers(0, 5000).map(nested).map(str.encode),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"metrics": null}', b"\xff\xfe", b"x" * 2048, b"x" * 2049]),
)  # fmt: skip
topic = st.one_of(
    st.builds(lambda d, s, i: f"sensors/{d}/{s}/{i}", st.sampled_from(["air", "crane", "cell", "x y"]), hostile_id,
              hostile_id),
    st.builds(lambda d, s: f"sensors/{d}/{s}", st.sampled_from(["air", "cell"]), hostile_id),
    st.text(max_size=30),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(topic, payload), min_size=1, max_size=6))
def test_hostile_messages_never_crash_or_vanish_and_accepted_data_cannot_inject(
    messages: list[tuple[str, bytes]],
) -> None:
    batch = decode_messages([Message(t, p, NOW) for t, p in messages], LIMITS)
    r = batch.readings
    per_message = np.bincount(batch.message_index, minlength=len(messages))
    for i, (_topic, data) in enumerate(messages):
        problems = batch.problems.get(i, [])
        assert per_message[i] > 0 or problems, f"message {i} vanished: {data[:80]!r}"
        assert all(p.reason in REASONS and p.detail for p in problems)
        if len(data) > LIMITS.max_payload_bytes:
            assert [p.reason for p in problems] == ["payload_too_large"] and per_message[i] == 0
    for sensor, site, metric, ts, value in zip(
        r.sensor_id.tolist(), r.site.tolist(), r.metric.tolist(), r.ts_ns.tolist(), r.value.tolist(), strict=True
    ):
        assert ID_RE.fullmatch(sensor) and ID_RE.fullmatch(site) and ID_RE.fullmatch(metric), (sensor, site, metric)
        assert math.isfinite(value)
        assert NOW - LIMITS.max_past_ns <= ts <= NOW + LIMITS.max_future_ns

    # Accepted readings -> Kafka records -> batch wire decode: the same readings, nothing more.
    rows = build_records(batch, "portpulse").records.as_tuples()
    wire = decode_values([value for _, _, value in rows])
    assert wire.bad == [] and len(wire) == len(r)
    keys = [(rows[i][1] or b"").decode() for i in wire.record.tolist()]
    got = sorted(zip(keys, wire.site.tolist(), wire.metric.tolist(), wire.ts_ns.tolist(), wire.value.tolist(),
                     strict=True))  # fmt: skip
    want = sorted(zip(r.sensor_id.tolist(), r.site.tolist(), r.metric.tolist(), r.ts_ns.tolist(), r.value.tolist(),
                      strict=True))  # fmt: skip
    assert got == want

    # ... -> line protocol: one line per reading, exactly the two tags, nothing injected.
    if len(r):
        points = PointColumns(r.domain, {"sensor_id": r.sensor_id, "site": r.site}, {}, r.ts_ns)
        lines = _encode_per_metric(points, r.metric, r.value)
        assert len(lines) == len(r)
        for text in lines:
            _m, tags, fields, _ts = parse_line(text)
            assert set(tags) == {"sensor_id", "site"} and len(fields) == 1


def _encode_per_metric(points: PointColumns, metric: Any, value: Any) -> list[str]:
    out: list[str] = []
    for name in sorted(set(metric.tolist())):
        rows = np.flatnonzero(metric == name)
        part = PointColumns(
            points.measurement[rows],
            {k: v[rows] for k, v in points.tags.items()},  # type: ignore[index]
            {name: value[rows]},
            points.ts_ns[rows],
        )
        encoded = encode_lines(part)
        assert encoded.rejected == {}
        out += encoded.body.decode().split("\n")[:-1]
    return out
