"""The pure parts of ``portpulse reprocess``: the range, what is read and cleared, the refusal of a
range Kafka no longer holds, the progress line, and the windows across an end left as stored."""

from __future__ import annotations

import numpy as np
import pytest

from portpulse.contract.points import MemoryPointSink, PointColumns
from portpulse.processors.reprocess import (
    ReprocessPlan,
    ReprocessProgress,
    _InRange,
    lost_range,
    plan_reprocess,
    progress_line,
)
from portpulse.processors.window import parse_windows

S = 10**9
MIN = 60 * S
T0 = 1_764_000_000 * S  # 2025-11-24T16:00:00Z, a whole quarter hour


def test_the_range_widens_to_whole_windows_of_the_largest_size() -> None:
    plan = plan_reprocess(T0 + 7 * MIN, T0 + 31 * MIN, ["air"], parse_windows("10s,1m,15m"), T0 + 60 * MIN)
    assert (plan.start_ns, plan.stop_ns) == (T0, T0 + 45 * MIN)
    exact = plan_reprocess(T0, T0 + 15 * MIN, ["air"], parse_windows("1m,15m"), T0 + 15 * MIN)
    assert (exact.start_ns, exact.stop_ns) == (T0, T0 + 15 * MIN)


def test_an_empty_range_or_one_the_live_processor_may_still_hold_is_refused() -> None:
    windows = parse_windows("1m,15m")
    with pytest.raises(ValueError, match="must be after --from"):
        plan_reprocess(T0, T0, ["air"], windows, T0 + 60 * MIN)
    with pytest.raises(ValueError, match="may still be open in the live processor"):
        plan_reprocess(T0, T0 + 14 * MIN, ["air"], windows, T0 + 10 * MIN)


def test_kafka_is_read_from_the_furthest_future_reading_to_the_latest_past_one() -> None:
    plan = ReprocessPlan(T0, T0 + MIN, ("air",), parse_windows("1m"))
    assert plan.scan_ms(300.0, 7 * 86_400.0) == ((T0 - 300 * S) // 10**6, (T0 + MIN + 7 * 86_400 * S) // 10**6)


def test_cleared_are_raw_points_rejections_and_the_windows_inside_the_range() -> None:
    plan = ReprocessPlan(T0, T0 + 15 * MIN, ("air", "crane"), parse_windows("1m,15m,5m/1m"))
    assert plan.deletions() == [
        ("air", T0, T0 + 15 * MIN), ("air_rejected", T0, T0 + 15 * MIN),
        ("air_1m", T0, T0 + 14 * MIN + 1), ("air_15m", T0, T0 + 1), ("air_5m_1m", T0, T0 + 10 * MIN + 1),
        ("crane", T0, T0 + 15 * MIN), ("crane_rejected", T0, T0 + 15 * MIN),
        ("crane_1m", T0, T0 + 14 * MIN + 1), ("crane_15m", T0, T0 + 1), ("crane_5m_1m", T0, T0 + 10 * MIN + 1),
    ]  # fmt: skip


async def test_hopping_windows_across_an_end_of_the_range_are_not_written() -> None:
    plan = ReprocessPlan(T0, T0 + 15 * MIN, ("air",), parse_windows("5m/1m"))
    store = MemoryPointSink()
    starts = np.array([T0 - 4 * MIN, T0, T0 + 10 * MIN, T0 + 11 * MIN], dtype=np.int64)
    tags = {"sensor_id": np.array(["a"] * 4, dtype=object), "site": np.array(["q"] * 4, dtype=object)}
    await _InRange(store, plan).write(
        PointColumns("air_5m_1m", tags, {"no2_mean": np.arange(4.0)}, starts), "processor:5m_1m"
    )
    raw = PointColumns("air", tags, {"no2": np.arange(4.0)}, starts)
    await _InRange(store, plan).write(raw, "processor:raw")  # raw points are filtered before the engine
    assert sorted((m, ts) for m, _, _, ts in store.stored()) == sorted(
        [("air_5m_1m", T0), ("air_5m_1m", T0 + 10 * MIN)] + [("air", int(ts)) for ts in starts]
    )


def test_a_partition_whose_held_records_start_after_the_scan_start_is_refused() -> None:
    assert lost_range("p.readings.air", 0, 0, 10, 0, 5) is None  # nothing deleted yet
    assert lost_range("p.readings.air", 0, 7, 10, 9, 5) is None  # deleted records are older than the scan
    assert lost_range("p.readings.air", 0, 7, 10, None, None) is None  # everything held is older
    refused = lost_range("p.readings.air", 1, 7, 10, 7, T0 // 10**6)
    assert refused == (
        "p.readings.air[1] no longer holds the start of the range: its first offset is 7, written "
        "2025-11-24T16:00:00Z; the records before it were deleted"
    )
    emptied = lost_range("p.readings.air", 2, 10, 10, None, None)
    assert emptied == "p.readings.air[2] holds no records any more: its first offset, 10, is its end"


def test_the_progress_line_has_the_share_rate_and_eta() -> None:
    line = progress_line(ReprocessProgress(done=120_000, total=480_000, readings=1_100_000, elapsed_s=10.0), width=10)
    assert line == "[##--------]  25%  120 000 / 480 000 records  110 000 readings/s  ETA 30 s"
    assert progress_line(ReprocessProgress(5, 5, 40, 2.0), width=4) == "[####] 100%  5 / 5 records  20 readings/s"
    assert progress_line(ReprocessProgress(0, 0, 0, 0.0), width=2) == "[##] 100%  0 / 0 records  0 readings/s"
