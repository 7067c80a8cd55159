"""Sparkplug B without network: the vectorised metric parser against upb (the reference), the host
application's decoding of every scalar datatype and its lifecycle (births, seq, rebirth requests,
deaths, restart), the mapping file, the MQTT will and retain bits, and the simulator's edge node
read back through the host."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portpulse.codecs.mqttwire import encode_connect, encode_publish
from portpulse.codecs.sparkplug import Metric, Payload, parse_metrics, parse_payloads
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.errors import ConfigError
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE
from portpulse.contract.settings import Settings
from portpulse.ingest.decode import DecodedBatch, DecodeLimits, Message, decode_messages
from portpulse.ingest.sparkplug import (
    SparkplugHost,
    SparkplugMapping,
    load_mapping,
    parse_sparkplug_topic,
    rebirth_request,
    state_payload,
)
from portpulse.simulators.sparkplug import CRANE_METRICS, EdgeNode

NOW_NS = 1_764_000_000 * 10**9
NOW_MS = NOW_NS // 10**6
CATALOGUE = load_catalogue(Settings().processor.catalogue)
SHIPPED = Path(__file__).parents[2] / "portpulse" / "contract" / "sparkplug.toml"
GROUP, NODE = "terminal-a", "gw-1"

# ---------------------------------------------------------------- the parser against upb


metric_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=20),
        "alias": st.integers(0, 2**64 - 1),
        "timestamp": st.integers(0, 2**64 - 1),
        "datatype": st.integers(0, 2**32 - 1),
        "is_historical": st.booleans(),
        "is_null": st.booleans(),
        "is_transient": st.booleans(),
        "metadata": st.binary(max_size=10),
    },
)
metric_values = st.one_of(
    st.none(),
    st.tuples(st.just("int_value"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("long_value"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("float_value"), st.floats(width=32, allow_nan=False)),
    st.tuples(st.just("double_value"), st.floats(allow_nan=False)),
    st.tuples(st.just("boolean_value"), st.booleans()),
    st.tuples(st.just("string_value"), st.text(max_size=12)),
    st.tuples(st.just("bytes_value"), st.binary(max_size=12)),
    st.tuples(st.just("dataset_value"), st.binary(max_size=12)),
)
FIELD_NUMBERS = {"int_value": 10, "long_value": 11, "float_value": 12, "double_value": 13, "boolean_value": 14,
                 "string_value": 15, "bytes_value": 16, "dataset_value": 17}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(metric_fields, metric_values), max_size=30))
def test_parse_metrics_reads_what_upb_reads(metrics: list[tuple[dict[str, Any], Any]]) -> None:
    payload = Payload(timestamp=NOW_MS, seq=7)
    for fields, value in metrics:
        m = payload.metrics.add(**fields)
        if value is not None:
            setattr(m, value[0], value[1])
    data = payload.SerializeToString()
    reference = Payload.FromString(data)
    top = parse_payloads([b"", data])  # an empty payload first: offsets are per payload
    assert top.malformed.tolist() == [False, False] and top.first_metric.tolist() == [0, 0, len(metrics)]
    assert (int(top.timestamp[1]), int(top.seq[1]), top.has_seq.tolist()) == (NOW_MS, 7, [False, True])
    c = parse_metrics([top.buffer[a:b] for a, b in zip(top.metric_start, top.metric_stop, strict=True)])
    assert len(c) == len(metrics)
    assert not c.malformed.any()
    for k, m in enumerate(reference.metrics):
        for name in ("alias", "timestamp", "datatype"):
            assert bool(getattr(c, f"has_{name}")[k]) == m.HasField(name)
            assert int(getattr(c, name)[k]) == getattr(m, name)
        assert (bool(c.is_historical[k]), bool(c.is_null[k])) == (m.is_historical, m.is_null)
        assert c.name(k) == (m.name if m.HasField("name") else None)
        kind = m.WhichOneof("value")
        assert int(c.value_field[k]) == FIELD_NUMBERS.get(kind, 0)
        if kind in ("int_value", "long_value", "boolean_value"):
            assert int(c.int_value[k]) == int(getattr(m, kind))
        elif kind in ("float_value", "double_value"):
            assert float(c.float_value[k]) == getattr(m, kind)
        elif kind == "string_value":
            assert c.text(k) == m.string_value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
@example([b"e\x00\x01", b"\x80", b"\x7f"])  # a float_value read across blobs: a float32 signalling NaN
def test_parse_metrics_flags_what_is_not_a_metric_and_never_raises(blobs: list[bytes]) -> None:
    c = parse_metrics(blobs)
    assert len(c) == len(blobs)
    for k, blob in enumerate(blobs):
        try:
            Metric.FromString(blob)
            upb_accepts = True
        except Exception:
            upb_accepts = False
        if not upb_accepts:
            assert c.malformed[k], blob


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_parse_payloads_flags_what_is_not_a_payload_and_never_raises(payloads: list[bytes]) -> None:
    top = parse_payloads(payloads)
    for k, payload in enumerate(payloads):
        try:
            reference = Payload.FromString(payload)
        except Exception:
            # Rejected as a whole, or a metric in it is not a metric (the bridge then rejects the
            # whole message too): the top level leaves the metrics' insides to parse_metrics.
            spans = range(top.first_metric[k], top.first_metric[k + 1])
            metrics = [top.buffer[top.metric_start[j] : top.metric_stop[j]] for j in spans]
            assert top.malformed[k] or parse_metrics(metrics).malformed.any(), payload
            continue
        if not top.malformed[k]:  # where both accept it, both read the same
            assert top.first_metric[k + 1] - top.first_metric[k] == len(reference.metrics)
            assert (bool(top.has_seq[k]), int(top.seq[k])) == (reference.HasField("seq"), reference.seq)


def test_a_truncated_metric_is_malformed_and_its_neighbours_are_not() -> None:
    whole = Payload()
    whole.metrics.add(alias=1, timestamp=NOW_MS, double_value=2.5)
    blob = whole.metrics[0].SerializeToString()
    c = parse_metrics([blob, blob[:-3], blob])
    assert c.malformed.tolist() == [False, True, False]
    assert c.float_value[[0, 2]].tolist() == [2.5, 2.5]


# ---------------------------------------------------------------- the host


def host(interval_s: float = 30.0, mapping: SparkplugMapping | None = None) -> SparkplugHost:
    return SparkplugHost(mapping or load_mapping(SHIPPED, CATALOGUE), max_future_ns=300 * 10**9,
                         max_past_ns=7 * 86_400 * 10**9, rebirth_interval_s=interval_s)  # fmt: skip


def nbirth(bd_seq: int = 0, seq: int = 0) -> Message:
    p = Payload(timestamp=NOW_MS, seq=seq)
    p.metrics.add(name="bdSeq", datatype=8, long_value=bd_seq)
    p.metrics.add(name="Node Control/Rebirth", alias=0, datatype=11, boolean_value=False)
    return Message(f"spBv1.0/{GROUP}/NBIRTH/{NODE}", p.SerializeToString(), NOW_NS)


def dbirth(device: str, metrics: list[tuple[str, int, int, Any]], seq: int) -> Message:
    """``metrics``: (name, alias, datatype, (value field, value) or None)."""
    p = Payload(timestamp=NOW_MS, seq=seq)
    for name, alias, datatype, value in metrics:
        m = p.metrics.add(name=name, alias=alias, datatype=datatype, timestamp=NOW_MS - 1000)
        if value is not None:
            setattr(m, *value)
    return Message(f"spBv1.0/{GROUP}/DBIRTH/{NODE}/{device}", p.SerializeToString(), NOW_NS)


def ddata(device: str, metrics: list[dict[str, Any]], seq: int, payload_ts: int | None = NOW_MS) -> Message:
    p = Payload(seq=seq) if payload_ts is None else Payload(timestamp=payload_ts, seq=seq)
    for fields in metrics:
        p.metrics.add(**fields)
    return Message(f"spBv1.0/{GROUP}/DDATA/{NODE}/{device}", p.SerializeToString(), NOW_NS)


def ndeath(bd_seq: int) -> Message:
    p = Payload()
    p.metrics.add(name="bdSeq", datatype=8, long_value=bd_seq)
    return Message(f"spBv1.0/{GROUP}/NDEATH/{NODE}", p.SerializeToString(), NOW_NS)


def decode(h: SparkplugHost, *messages: Message) -> DecodedBatch:
    return decode_messages(list(messages), DecodeLimits(), sparkplug=h)


def readings(batch: DecodedBatch) -> list[tuple[str, str, str, int, float]]:
    r = batch.readings
    return list(zip(r.site.tolist(), r.sensor_id.tolist(), r.metric.tolist(), r.ts_ns.tolist(), r.value.tolist(),
                    strict=True))  # fmt: skip


def reasons(batch: DecodedBatch) -> dict[int, list[str]]:
    return {i: [p.reason for p in found] for i, found in batch.problems.items()}


CRANE = [("Hoist/Load", 1, 9, ("float_value", 12500.0)), ("Trolley/Position", 2, 10, ("double_value", 3.5)),
         ("Spreader/Locked", 3, 11, ("boolean_value", True))]  # fmt: skip


def born(h: SparkplugHost, device: str = "sts-1") -> None:
    batch = decode(h, nbirth(), dbirth(device, CRANE, seq=1))
    assert batch.problems == {}


def test_births_store_their_values_in_the_catalogue_units() -> None:
    h = host()
    batch = decode(h, nbirth(), dbirth("sts-1", CRANE, seq=1))
    assert readings(batch) == [(GROUP, "sts-1", "hoist_load", (NOW_MS - 1000) * 10**6, 12.5),
                               (GROUP, "sts-1", "trolley_position", (NOW_MS - 1000) * 10**6, 3.5),
                               (GROUP, "sts-1", "spreader_locked", (NOW_MS - 1000) * 10**6, 1.0)]  # fmt: skip
    assert batch.readings.domain.tolist() == ["crane"] * 3
    assert [key for key, _ in h.birth_records] == [f"{GROUP}/{NODE}".encode(), f"{GROUP}/{NODE}/sts-1".encode()]


# every scalar datatype: (datatype, value field, encoded value, expected float)
SCALARS = [
    (1, "int_value", 0xFFFFFFFF, -1.0),  # Int8 -1 sign-extended to 32 bits (Tahu)
    (1, "int_value", 0xFF, -1.0),  # Int8 -1 in its own width (pysparkplug)
    (1, "int_value", 100, 100.0),
    (2, "int_value", 65531, -5.0),
    (2, "int_value", 0xFFFFFFFB, -5.0),
    (3, "int_value", 0x80000000, -(2.0**31)),
    (4, "long_value", 2**64 - 7, -7.0),
    (5, "int_value", 255, 255.0),
    (6, "int_value", 65535, 65535.0),
    (7, "int_value", 2**32 - 1, 2.0**32 - 1),
    (8, "long_value", 2**63 + 2**11, 2.0**63 + 2**11),
    (9, "float_value", 0.25, 0.25),
    (10, "double_value", -1e300, -1e300),
    (11, "boolean_value", False, 0.0),
    (12, "string_value", " 42.5 ", 42.5),
    (13, "long_value", NOW_MS, float(NOW_MS)),
    (14, "string_value", "-3", -3.0),
]


@pytest.mark.parametrize(("datatype", "field", "raw", "expected"), SCALARS)
def test_every_scalar_datatype_decodes_to_its_value(datatype: int, field: str, raw: Any, expected: float) -> None:
    mapping = SparkplugMapping(domain="crane", metrics={"X": ("motor_temperature", 1.0)})
    h = host(mapping=mapping)
    decode(h, nbirth(), dbirth("sts-1", [("X", 5, datatype, None)], seq=1))
    batch = decode(h, ddata("sts-1", [{"alias": 5, "timestamp": NOW_MS, field: raw}], seq=2))
    assert batch.problems == {}
    assert readings(batch) == [(GROUP, "sts-1", "motor_temperature", NOW_NS, expected)]


def test_what_cannot_be_a_reading_is_dead_lettered_and_the_rest_of_the_message_stored() -> None:
    mapping = SparkplugMapping(domain="crane", metrics={n: ("motor_temperature", 1.0) for n in "ABCDEFG"})
    h = host(mapping=mapping)
    born_as = [("A", 1, 10), ("B", 2, 12), ("C", 3, 16), ("D", 4, 10), ("E", 5, 10), ("F", 6, 10), ("G", 7, 9)]
    decode(h, nbirth(), dbirth("sts-1", [(name, alias, datatype, None) for name, alias, datatype in born_as], seq=1))
    h.counts["null"] = 0  # the birth announced them without values
    batch = decode(h, ddata("sts-1", [
        {"alias": 1, "double_value": 1.5},  # stored
        {"alias": 2, "string_value": "open"},  # String that is no number
        {"alias": 3, "dataset_value": b"\x08\x01"},  # DataSet
        {"alias": 4, "float_value": 2.0},  # a Double born, a Float sent
        {"alias": 5, "double_value": float("inf")},
        {"alias": 6, "is_null": True},  # null: nothing to store, not an error
        {"alias": 7, "float_value": float("nan")},  # NaN: not finite either
        {"alias": 99, "double_value": 1.0},  # never born
    ], seq=2))  # fmt: skip
    assert [(m, v) for _, _, m, _, v in readings(batch)] == [("motor_temperature", 1.5)]
    assert sorted(reasons(batch)[0]) == sorted(["sparkplug_unknown_alias", "sparkplug_unsupported_type",
                                                "sparkplug_datatype_mismatch", "non_finite_value",
                                                "non_numeric_value"])  # fmt: skip
    assert "2 metrics are not finite (1 NaN, 1 infinite)" in [p.detail for p in batch.problems[0]]
    assert h.counts["null"] == 1
    assert h.commands == [rebirth_request(GROUP, NODE, NOW_MS)]  # the unknown alias


def test_event_time_is_the_metrics_else_the_payloads_else_the_receive_time() -> None:
    h = host()
    born(h)
    batch = decode(
        h,
        ddata("sts-1", [{"alias": 2, "timestamp": NOW_MS - 5000, "double_value": 1.0},
                        {"alias": 2, "double_value": 2.0}], seq=2, payload_ts=NOW_MS - 2000),
        ddata("sts-1", [{"alias": 2, "double_value": 3.0}], seq=3, payload_ts=None),
    )  # fmt: skip
    assert [(ts, v) for *_, ts, v in readings(batch)] == [
        ((NOW_MS - 5000) * 10**6, 1.0), ((NOW_MS - 2000) * 10**6, 2.0), (NOW_NS, 3.0)]  # fmt: skip
    assert batch.readings.flags.tolist() == [0, 0, int(FLAG_TS_FROM_RECEIVE)]


def test_history_is_stored_like_any_late_reading_and_far_futures_are_refused() -> None:
    h = host()
    born(h)
    batch = decode(h, ddata("sts-1", [
        {"alias": 2, "timestamp": NOW_MS - 3_600_000, "double_value": 1.0, "is_historical": True},
        {"alias": 2, "timestamp": NOW_MS + 3_600_000, "double_value": 2.0},
    ], seq=2))  # fmt: skip
    assert [(ts, v) for *_, ts, v in readings(batch)] == [((NOW_MS - 3_600_000) * 10**6, 1.0)]
    assert reasons(batch) == {0: ["ts_too_far_future"]} and h.counts["historical"] == 1


def test_data_may_name_its_metrics_instead_of_using_aliases() -> None:
    h = host()
    born(h)
    batch = decode(h, ddata("sts-1", [{"name": "Hoist/Load", "datatype": 9, "float_value": 30000.0}], seq=2))
    assert [(m, v) for _, _, m, _, v in readings(batch)] == [("hoist_load", 30.0)] and batch.problems == {}


def test_a_seq_gap_keeps_the_values_and_asks_for_one_rebirth_per_interval() -> None:
    h = host(interval_s=30.0)
    born(h)  # NBIRTH seq 0, DBIRTH seq 1
    point = [{"alias": 2, "double_value": 1.0}]
    batch = decode(h, ddata("sts-1", point, seq=2), ddata("sts-1", point, seq=5), ddata("sts-1", point, seq=9))
    assert len(batch.readings) == 3
    assert reasons(batch) == {1: ["sparkplug_seq_gap"], 2: ["sparkplug_seq_gap"]}
    assert "2 messages of the node missing" in batch.problems[1][0].detail
    assert h.commands == [rebirth_request(GROUP, NODE, NOW_MS)]  # once within the interval
    # A redelivered message (a reconnect) is a repeat, not a gap; seq wraps after 255.
    h.commands.clear()
    again = decode(h, ddata("sts-1", point, seq=8), ddata("sts-1", point, seq=9), ddata("sts-1", point, seq=10))
    assert again.problems == {} and h.commands == []


def test_data_before_birth_is_dead_lettered_and_asks_for_a_rebirth() -> None:
    h = host()
    batch = decode(h, ddata("sts-1", [{"alias": 2, "double_value": 1.0}], seq=4))
    assert reasons(batch) == {0: ["sparkplug_data_before_birth"]} and len(batch.readings) == 0
    topic, payload = h.commands[0]
    assert topic == f"spBv1.0/{GROUP}/NCMD/{NODE}"
    command = Payload.FromString(payload).metrics[0]
    assert (command.name, command.datatype, command.boolean_value) == ("Node Control/Rebirth", 11, True)


def test_a_death_takes_the_node_and_its_devices_offline_unless_it_is_an_earlier_sessions_will() -> None:
    h = host()
    decode(h, nbirth(bd_seq=4), dbirth("sts-1", CRANE, seq=1))
    stale = decode(h, ndeath(bd_seq=3))
    assert reasons(stale) == {0: ["sparkplug_stale_death"]} and h.nodes[(GROUP, NODE)].online
    h.birth_records.clear()
    assert decode(h, ndeath(bd_seq=4)).problems == {}
    node = h.nodes[(GROUP, NODE)]
    assert (node.online, node.devices_online, node.devices) == (False, set(), {})
    assert h.birth_records == [(f"{GROUP}/{NODE}".encode(), None), (f"{GROUP}/{NODE}/sts-1".encode(), None)]
    assert [(n.edge_node, site, sensor) for n, site, sensor in h.stale_sensors()] == [(NODE, GROUP, "sts-1")]
    assert h.status(NOW_NS / 1e9)[0]["online"] is False


def test_a_restarted_host_decodes_with_the_births_it_kept_and_asks_nothing() -> None:
    first = host()
    born(first)
    kept = dict(first.birth_records)
    second = host()
    assert second.restore(kept) == 2
    batch = decode(second, ddata("sts-1", [{"alias": 1, "float_value": 5000.0}], seq=40))
    assert batch.problems == {} and second.commands == []
    assert [(m, v) for _, _, m, _, v in readings(batch)] == [("hoist_load", 5.0)]


def test_metrics_the_mapping_lacks_are_said_once_at_birth_and_control_metrics_never() -> None:
    h = host()
    decode(h, nbirth())
    batch = decode(h, dbirth("sts-1", [*CRANE, ("Vendor/Firmware", 9, 12, ("string_value", "v2"))], seq=1))
    assert reasons(batch) == {0: ["sparkplug_unmapped_metric"]} and "'Vendor/Firmware'" in batch.problems[0][0].detail
    later = decode(h, ddata("sts-1", [{"alias": 9, "string_value": "v3"}, {"alias": 2, "double_value": 1.0}], seq=2))
    assert later.problems == {} and len(later.readings) == 1 and h.counts["unmapped"] == 2


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [("spBv1.0/g/DDATA/n", "needs device id"), ("spBv1.0/g/NDATA/n/d", "takes no device id"),
     ("spBv1.0/g/XDATA/n", "unknown Sparkplug message type"), ("spBv1.0/g//n", "expected spBv1.0/")],
)  # fmt: skip
def test_topics_outside_the_namespace_are_refused_with_the_reason(topic: str, fragment: str) -> None:
    where = parse_sparkplug_topic(topic)
    assert isinstance(where, str) and fragment in where
    batch = decode(host(), Message(topic, b"", NOW_NS))
    assert reasons(batch) == {0: ["bad_topic"]}


def test_a_payload_that_is_not_protobuf_is_dead_lettered() -> None:
    h = host()
    born(h)
    batch = decode(h, Message(f"spBv1.0/{GROUP}/DDATA/{NODE}/sts-1", b"\xff\xff\xff", NOW_NS))
    assert reasons(batch) == {0: ["sparkplug_bad_protobuf"]}


def test_commands_and_other_hosts_state_are_not_telemetry() -> None:
    h = host()
    batch = decode(h, Message(f"spBv1.0/{GROUP}/NCMD/{NODE}", rebirth_request(GROUP, NODE, NOW_MS)[1], NOW_NS),
                   Message("spBv1.0/STATE/scada", state_payload(True, NOW_MS), NOW_NS))  # fmt: skip
    assert batch.problems == {} and len(batch.readings) == 0 and h.counts["commands_ignored"] == 2


def test_state_payloads_are_the_json_spec_3_asks_for() -> None:
    assert json.loads(state_payload(True, 1234)) == {"online": True, "timestamp": 1234}
    assert json.loads(state_payload(False, 1234)) == {"online": False, "timestamp": 1234}


# ---------------------------------------------------------------- the mapping file


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('domain = "ships"', "is not in the catalogue"),
        ('domain = "crane"\n[metrics]\n"A" = "draught"', "lacks"),
        ('domain = "crane"\n[metrics]\n"A" = { metric = "hoist_load", unit = "lb" }', "converts only kg"),
        ('domain = "crane"\nsensor = "{plc}"', "only {group}"),
        ("domain = ", "sparkplug mapping"),
    ],
)
def test_a_mapping_file_that_cannot_work_is_refused_at_start(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        load_mapping(path, CATALOGUE)


def test_the_shipped_mapping_names_the_simulators_metrics_with_their_unit_factors() -> None:
    mapping = load_mapping(SHIPPED, CATALOGUE)
    assert {name: mapping.metrics[name][0] for name, *_ in CRANE_METRICS.values()} == {
        name: metric for metric, (name, *_) in CRANE_METRICS.items()}  # fmt: skip
    assert mapping.metrics["Hoist/Load"] == ("hoist_load", 0.001)
    metric, factor = mapping.metrics["Environment/Wind Speed"]
    assert metric == "wind_speed" and factor == pytest.approx(1 / 3.6)
    assert mapping.ids("g", "n", None) == ("g", "n") and mapping.ids("g", "n", "d") == ("g", "d")


# ---------------------------------------------------------------- the MQTT will and retain bits


def test_connect_carries_the_will_retained_at_qos_1() -> None:
    plain = encode_connect("c", v5=False, clean_start=False, keepalive_s=30)
    packet = encode_connect("c", v5=False, clean_start=False, keepalive_s=30, will=("spBv1.0/STATE/h", b"{}"))
    flags = packet[9]
    assert plain[9] & 0x3C == 0 and flags & 0x3C == 0x04 | 0x08 | 0x20  # will, QoS 1, retain
    assert packet.endswith(struct.pack("!H", 15) + b"spBv1.0/STATE/h" + struct.pack("!H", 2) + b"{}")
    v5 = encode_connect("c", v5=True, clean_start=False, keepalive_s=30, will=("t", b"x"))
    assert v5.endswith(b"\x00" + struct.pack("!H", 1) + b"t" + struct.pack("!H", 1) + b"x")  # empty will properties


def test_publish_sets_the_retain_bit_only_when_asked() -> None:
    assert encode_publish("t", b"x", qos=1, packet_id=3, retain=True)[0] == 0x33
    assert encode_publish("t", b"x")[0] == 0x30


# ---------------------------------------------------------------- the simulator's edge node


def test_the_simulated_edge_node_reads_back_through_the_host() -> None:
    node = EdgeNode(GROUP, NODE, ["sts-1", "sts-2"])
    values = {"hoist_load": 31.5, "trolley_position": 12.25, "wind_speed": 10.0, "motor_temperature": 61.0,
              "spreader_locked": 1.0, "move_counter": 120_000.0}  # fmt: skip
    latest = {"sts-1": (NOW_MS - 1000, values), "sts-2": (NOW_MS - 1000, values)}
    h = host()
    births = decode(h, *(Message(t, p, NOW_NS) for t, p in node.births(NOW_MS, latest)))
    assert births.problems == {} and len(births.readings) == 12
    topic, payload = node.data("sts-2", [(NOW_MS, values), (NOW_MS + 1000, values)], historical=True)
    data = decode(h, Message(topic, payload, NOW_NS))
    assert data.problems == {} and h.counts["historical"] == 12
    got = {(m, ts): v for _, sensor, m, ts, v in readings(data) if sensor == "sts-2"}
    assert len(got) == 12
    for metric, value in values.items():
        assert got[(metric, NOW_NS)] == pytest.approx(value, rel=1e-6)  # Float metrics travel as float32
    node.skip_seq()
    gap = decode(h, Message(*node.data("sts-1", [(NOW_MS + 2000, values)]), NOW_NS))
    assert reasons(gap) == {0: ["sparkplug_seq_gap"]}
    death = Payload.FromString(node.death())
    assert [(m.name, m.long_value) for m in death.metrics] == [("bdSeq", 0)]


def test_a_replay_decodes_with_the_births_held_now_and_changes_nothing() -> None:
    live = host()
    early = ddata("sts-1", [{"alias": 2, "timestamp": NOW_MS - 9000, "double_value": 7.0}], seq=9)
    assert reasons(decode(live, early)) == {0: ["sparkplug_data_before_birth"]}  # dead-lettered, then born:
    born(live)
    replay = host()
    replay.live = False
    replay.restore(dict(live.birth_records))
    before = replay.nodes[(GROUP, NODE)].seq
    batch = decode(replay, early, early, dbirth("sts-1", CRANE[:1], seq=77), ndeath(bd_seq=0))
    assert batch.problems == {} and replay.commands == [] and replay.birth_records == []
    assert [(m, v) for _, _, m, _, v in readings(batch)] == [("trolley_position", 7.0)] * 2 + [("hoist_load", 12.5)]
    node = replay.nodes[(GROUP, NODE)]
    assert node.online and node.seq == before and set(node.devices) == {"sts-1"}


def test_a_float_value_that_is_a_signalling_nan_reads_as_nan() -> None:
    c = parse_metrics([b"e" + bytes.fromhex("0001807f")])  # field 12 (float_value), 0x7f800100
    assert not c.malformed[0] and math.isnan(float(c.float_value[0]))
