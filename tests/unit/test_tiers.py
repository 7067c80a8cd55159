"""Retention tiers' pure parts: the plan, which tier a measurement goes to, and the InfluxQL to
create what is missing, against values worked out by hand."""

from __future__ import annotations

import asyncio

import numpy as np

from portpulse.contract.points import MemoryPointSink, PointColumns
from portpulse.contract.settings import InfluxSettings, RetentionSettings
from portpulse.sinks.tiers import (
    Tier,
    TieredStore,
    bucket_changes,
    go_duration_s,
    retention_statements,
    tier_bucket,
    tier_plan,
)

DAY = 86_400.0


def test_the_plan_puts_raw_in_the_bucket_and_each_window_in_its_policy() -> None:
    influx = InfluxSettings(bucket="port/raw")
    plan = tier_plan(influx, RetentionSettings(), ["10s", "1m", "15m", "5m_1m"])
    assert plan == {
        "raw": Tier("raw", "port/raw", 30 * DAY),
        "10s": Tier("10s", "port/10s", 7 * DAY),
        "1m": Tier("1m", "port/1m", 365 * DAY),
        "15m": Tier("15m", "port/15m", -1.0),
        "5m_1m": Tier("5m_1m", "port/5m_1m", -1.0),  # other_windows_s
    }
    assert tier_bucket(influx, RetentionSettings(), "1m") == "port/1m"
    assert tier_bucket(influx, RetentionSettings(), None) == "port/raw"
    # off: every tier in the one bucket
    assert {t.bucket for t in tier_plan(influx, RetentionSettings(tiers=False), ["1m"]).values()} == {"port/raw"}


def test_on_influxdb_2_each_window_has_a_bucket_of_its_own() -> None:
    influx = InfluxSettings(bucket="port")
    assert tier_plan(influx, RetentionSettings(), ["10s", "1m"]) == {
        "raw": Tier("raw", "port", 30 * DAY),
        "10s": Tier("10s", "port_10s", 7 * DAY),
        "1m": Tier("1m", "port_1m", 365 * DAY),
    }
    assert tier_bucket(influx, RetentionSettings(), "1m") == "port_1m"
    assert {t.bucket for t in tier_plan(influx, RetentionSettings(tiers=False), ["1m"]).values()} == {"port"}


def test_missing_buckets_are_created_and_different_ones_named() -> None:
    plan = tier_plan(InfluxSettings(bucket="port"), RetentionSettings(), ["1m", "15m"])
    creates, mismatches = bucket_changes({"port": -1.0, "port_15m": -1.0}, plan)
    assert creates == [Tier("1m", "port_1m", 365 * DAY)]
    assert mismatches == [
        "InfluxDB keeps port (raw tier) forever; retention.raw_s asks for 30 days. PortPulse does not change a "
        "bucket that exists: influx bucket update --name port --retention 2592000s, or set retention.raw_s to match"
    ]
    assert bucket_changes({"port": 30 * DAY, "port_1m": 365 * DAY, "port_15m": -1.0}, plan) == ([], [])
    forever = bucket_changes({"port": 30 * DAY, "port_1m": 365 * DAY, "port_15m": DAY}, plan)[1]
    assert forever == [
        "InfluxDB keeps port_15m (15m tier) 1 days; retention.windows_s.15m asks for forever. PortPulse does not "
        "change a bucket that exists: influx bucket update --name port_15m --retention 0s, or set "
        "retention.windows_s.15m to match"
    ]


def test_missing_policies_are_created_and_different_ones_named() -> None:
    plan = tier_plan(InfluxSettings(bucket="port/autogen"), RetentionSettings(), ["1m", "15m"])
    creates, mismatches = retention_statements("port", {"autogen": -1.0, "15m": -1.0}, plan)
    assert creates == ['CREATE RETENTION POLICY "1m" ON "port" DURATION 31536000s REPLICATION 1']
    assert mismatches == [
        "InfluxDB keeps port/autogen (raw tier) forever; retention.raw_s asks for 30 days. PortPulse does not "
        'change a retention policy that exists: ALTER RETENTION POLICY "autogen" ON "port" DURATION 2592000s, '
        "or set retention.raw_s to match"
    ]
    assert retention_statements("port", {"autogen": 30 * DAY, "1m": 365 * DAY, "15m": -1.0}, plan) == ([], [])
    assert go_duration_s("720h0m0s") == 30 * DAY and go_duration_s("0s") == -1.0 and go_duration_s("1h30m0s") == 5400


def test_the_store_sends_each_measurement_to_its_tier() -> None:
    plan = tier_plan(InfluxSettings(bucket="port/raw"), RetentionSettings(), ["1m", "5m_1m"])
    sinks = {bucket: MemoryPointSink() for bucket in {t.bucket for t in plan.values()}}
    store = TieredStore(plan, sinks)  # type: ignore[arg-type]  # the writers' interface, in memory

    def points(measurement: str) -> PointColumns:
        return PointColumns(measurement, {}, {"v": np.array([1.0])}, np.array([1], dtype=np.int64))

    async def write_all() -> None:
        for m in ("air", "air_rejected", "air_1m", "air_5m_1m"):
            await store.write(points(m))
        await store.write(PointColumns(np.array(["crane_1m", "air_1m"], dtype=object), {},
                                       {"v": np.array([1.0, 2.0])}, np.array([1, 2], dtype=np.int64)))  # fmt: skip

    asyncio.run(write_all())
    written = {b: [p.measurement if isinstance(p.measurement, str) else "mixed" for _, p in s.writes]
               for b, s in sinks.items()}  # fmt: skip
    assert written == {"port/raw": ["air", "air_rejected"], "port/1m": ["air_1m", "mixed"], "port/5m_1m": ["air_5m_1m"]}
