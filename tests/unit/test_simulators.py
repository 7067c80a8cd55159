"""Simulators: determinism, physics sanity, fault bookkeeping, stream files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from portpulse.simulators.fleet import WIND_STOP_MS, make_fleet, reports
from portpulse.simulators.publish import read_stream, write_stream
from portpulse.simulators.rawmqtt import encode_publish
from portpulse.simulators.stream import FAULT_KINDS, OutMessage, StreamConfig, generate, parse_faults

HOUR_NS = 3_600 * 10**9
DAY0 = 1_764_028_800 * 10**9  # 2025-11-25T00:00:00Z


def _stream_bytes(config: StreamConfig) -> tuple[bytes, str]:
    out, manifest = io.BytesIO(), io.StringIO()
    write_stream(generate(config), out, manifest)
    return out.getvalue(), manifest.getvalue()


def test_same_seed_gives_a_byte_identical_stream_and_manifest() -> None:
    config = StreamConfig(sensors=120, rate=400, duration_s=3, seed=7, faults=parse_faults("all=0.02"))
    first, second = _stream_bytes(config), _stream_bytes(config)
    assert first == second
    assert len(first[0]) > 10_000 and first[1].count("\n") > 20
    other = _stream_bytes(StreamConfig(sensors=120, rate=400, duration_s=3, seed=8, faults=parse_faults("all=0.02")))
    assert other[0] != first[0]


def test_faults_do_not_change_the_clean_part_of_the_stream() -> None:
    clean = [m for b in generate(StreamConfig(sensors=30, rate=60, duration_s=2)) for m in b.messages]
    spiky = [
        m
        for b in generate(StreamConfig(sensors=30, rate=60, duration_s=2, faults={"malformed": 0.2}))
        for m in b.messages
    ]
    same = sum(a.payload == b.payload for a, b in zip(clean, spiky, strict=True))
    assert len(clean) == len(spiky) == 120
    assert 60 < same < 120  # only the malformed ones differ


def test_rush_hour_no2_is_higher_than_at_night() -> None:
    fleet = make_fleet(("air",), 200, seed=3, epoch_ns=DAY0)
    rng = np.random.default_rng(0)
    sensors = np.arange(200)

    def mean_no2(hour_utc: float) -> float:
        values = []
        for day in range(5):
            ts = np.full(200, DAY0 + day * 24 * HOUR_NS + int(hour_utc * HOUR_NS), dtype=np.int64)
            values.append(reports(fleet, sensors, ts, rng).values["no2"])
        return float(np.mean(values))

    rush, night = mean_no2(7.0), mean_no2(2.0)  # 8h and 3h local
    assert rush > 1.5 * night


def test_crane_carries_no_load_unless_the_spreader_is_locked_and_stops_in_gusts() -> None:
    fleet = make_fleet(("crane",), 40, seed=5, epoch_ns=DAY0)
    ts = DAY0 + np.arange(40 * 500, dtype=np.int64) * 3 * 10**9
    r = reports(fleet, np.arange(len(ts)) % 40, ts, np.random.default_rng(1))
    locked, load = r.values["spreader_locked"], r.values["hoist_load"]
    assert set(np.unique(locked)) == {0.0, 1.0}
    assert np.all(load[locked == 0.0] == 0.0)
    assert np.all(load[locked == 1.0] > 5.0)
    gusty = r.values["wind_speed"] > WIND_STOP_MS
    assert gusty.any() and np.all(locked[gusty] == 0.0) and np.all(r.values["hoist_load"][gusty] == 0.0)


def test_cell_throughput_falls_with_connected_ues() -> None:
    fleet = make_fleet(("cell",), 60, seed=2, epoch_ns=DAY0)
    ts = DAY0 + np.arange(60 * 200, dtype=np.int64) * 7 * 60 * 10**9  # across many days and hours
    r = reports(fleet, np.arange(len(ts)) % 60, ts, np.random.default_rng(2))
    ues, dl = r.values["connected_ues"], r.values["dl_throughput"]
    # Spearman: the relation is monotone, not linear.
    rank_ues, rank_dl = np.argsort(np.argsort(ues)).astype(float), np.argsort(np.argsort(dl)).astype(float)
    assert np.corrcoef(rank_ues, rank_dl)[0, 1] < -0.9
    assert dl[ues > np.percentile(ues, 90)].mean() < dl[ues < np.percentile(ues, 10)].mean() / 2
    # A cruise call crowds the cruise terminal's cells.
    cruise = fleet.site[np.arange(len(ts)) % 60] == "terminal-croisiere-pointe-de-floride"
    assert ues[cruise].max() > 2 * ues[~cruise].max()


def test_manifest_accounts_for_every_message_level_fault() -> None:
    config = StreamConfig(sensors=50, rate=500, duration_s=4, seed=11, faults=parse_faults("all=0.03"))
    messages, faults = [], []
    for block in generate(config):
        messages += block.messages
        faults += block.faults
    kinds = {k: [f for f in faults if f.kind == k] for k in FAULT_KINDS}
    assert all(kinds[k] for k in FAULT_KINDS), {k: len(v) for k, v in kinds.items()}
    by_seq: dict[int, list[OutMessage]] = {}
    for m in messages:
        by_seq.setdefault(m.seq, []).append(m)
    # Duplicates: the same message twice, and nothing else twice.
    assert sorted(s for s, ms in by_seq.items() if len(ms) == 2) == sorted({f.seq for f in kinds["duplicate"]})

    # Malformed and oversized payloads are exactly the recorded ones.
    def broken(m: object) -> bool:
        try:
            json.loads(m.payload)  # type: ignore[attr-defined]
            return False
        except ValueError:
            return True

    assert sorted({m.seq for m in messages if broken(m)}) == sorted({f.seq for f in kinds["malformed"]})
    assert sorted({m.seq for m in messages if len(m.payload) > 256 * 1024}) == sorted(
        {f.seq for f in kinds["oversized"]}
    )
    # Dropped reports never became messages; every report is either a message or a dropout.
    assert len(by_seq) + len(kinds["dropout"]) == 2000
    # Out-of-order: the recorded message is sent right after its successor.
    order = [m.seq for m in messages]
    for f in kinds["out_of_order"]:
        i = order.index(f.seq)
        assert i > 0 and order[i - 1] == f.seq + 1
    # Value faults name the metric; spikes and out-of-range values are visible in the payload.
    for f in kinds["out_of_range"]:
        m = by_seq[f.seq][0]
        if f.seq not in {x.seq for x in kinds["malformed"]}:
            assert json.loads(m.payload)["metrics"][f.metric] == -999.0


def test_stream_file_round_trip(tmp_path: Path) -> None:
    config = StreamConfig(sensors=20, rate=100, duration_s=2, fmt="line", batch_size=10)
    path = tmp_path / "s.bin"
    with open(path, "wb") as f:
        report = write_stream(generate(config), f)
    replayed = [m for b in read_stream(path, speed=2.0) for m in b.messages]
    original = [m for b in generate(config) for m in b.messages]
    assert report.messages == len(original) == len(replayed) > 0
    assert [(m.seq, m.topic, m.payload) for m in replayed] == [(m.seq, m.topic, m.payload) for m in original]
    assert replayed[-1].due_s == original[-1].due_s / 2


def test_raw_publish_packet_encoding() -> None:
    assert encode_publish("a/b", b"hi") == b"\x30\x07\x00\x03a/bhi"
    big = encode_publish("t", b"x" * 200)
    assert big[:3] == b"\x30\xcb\x01"  # remaining length 2 + 1 + 200 = 203 as a varint
