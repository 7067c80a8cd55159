"""Retention tiers against the real InfluxDB 1.8: ``portpulse run`` creates a retention policy per
tier with the configured durations, writes raw points and each window's aggregates to their own,
``portpulse query`` finds the tier by itself, and a policy that exists with another duration is
left alone with a warning naming both values.

(The end-to-end test checks every aggregate, corrections included, with the tiers on.)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.pipeline import Publisher
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration


def retention_policies(influx: InfluxEndpoint, database: str) -> dict[str, str]:
    from influxdb_client import InfluxDBClient

    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org) as client:
        raw = client.api_client.call_api(
            "/query", "GET", query_params=[("q", f'SHOW RETENTION POLICIES ON "{database}"')],
            _return_http_data_only=True, _preload_content=False,
        )  # fmt: skip
    series = json.loads(raw.data)["results"][0]["series"][0]
    return {row[0]: row[1] for row in series["values"]}


def minute_counts(influx: InfluxEndpoint, bucket: str) -> float:
    """The readings the 1-minute aggregates of ``bucket`` count, summed."""
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._field == "no2_count")'
        " |> group() |> sum()",
    )
    return float(rows[0]["_value"]) if rows else 0.0


def measurements(influx: InfluxEndpoint, bucket: str) -> set[str]:
    rows = query_rows(influx, f'from(bucket: "{bucket}") |> range(start: 0) |> keep(columns: ["_measurement"])')
    return {r["_measurement"] for r in rows}


async def test_each_tier_has_its_retention_policy_and_query_finds_it(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await check_tiers(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def check_tiers(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    if influx.major != "1":
        pytest.skip("retention tiers are InfluxDB 1.x retention policies")
    database = influx_bucket.split("/")[0]
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique) | {
        "PORTPULSE_INFLUX__BUCKET": f"{database}/raw", "PORTPULSE_RETENTION__TIERS": "true",
        "PORTPULSE_RETENTION__RAW_S": str(30 * 86_400),
    }  # fmt: skip
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")  # windows 1m
    now_ms = time.time_ns() // 1_000_000 - 180_000  # closed windows
    messages = [(f"{unique}/air/quai/aq-{i % 3}", json.dumps({"ts": now_ms + i * 1000, "metrics": {"no2": i}}).encode())
                for i in range(30)]  # fmt: skip
    await pipeline.start()
    try:
        with Publisher(mqtt, f"{unique}-gw") as publisher:
            await asyncio.to_thread(publisher.publish, messages, 1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and minute_counts(influx, f"{database}/1m") != 30.0:
            await asyncio.sleep(0.5)
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()

    policies = retention_policies(influx, database)
    assert (policies["raw"], policies["1m"]) == ("720h0m0s", "8760h0m0s")
    assert measurements(influx, f"{database}/raw") == {"air"}
    assert measurements(influx, f"{database}/1m") == {"air_1m"}
    assert minute_counts(influx, f"{database}/1m") == 30.0
    query = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "portpulse", "query", "--domain", "air", "--sensor", "aq-0", "--metric", "no2_count",
         "--table", "1m", "--start", "-1h", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr[-2000:]
    assert sum(row["value"] for row in json.loads(query.stdout)) == 10.0

    # The 1-minute tier asked for a day now: the policy is left as it is, and the log says so.
    again = PipelineProcess(env | {"PORTPULSE_RETENTION__WINDOWS_S": '{"1m": 86400}'}, tmp_path / "again.log")
    await again.start()
    assert await again.stop() == 0
    assert (
        f"InfluxDB keeps {database}/1m (1m tier) 365 days; retention.windows_s.1m asks for 1 days"
        in again.log.read_text()
    )
    assert retention_policies(influx, database)["1m"] == "8760h0m0s"


async def test_tiers_take_the_form_of_the_server_at_hand(
    influx: InfluxEndpoint, influx_bucket: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """InfluxDB 2.x: a bucket per window, created with its retention and left alone (with a
    warning naming both values) when it exists with another. InfluxDB 1.x: a bucket named the 2.x
    way is refused, naming the form it needs."""
    from portpulse.contract.errors import ConfigError
    from portpulse.contract.settings import InfluxSettings, RetentionSettings
    from portpulse.sinks.tiers import ensure_tiers, tier_plan

    if influx.major == "1":
        settings = InfluxSettings(url=influx.url, token=influx.token, org=influx.org, bucket=unique)
        with pytest.raises(
            ConfigError, match=f"set influx.bucket to database/retention_policy \\(e.g. {unique}/raw\\)"
        ):
            await ensure_tiers(settings, tier_plan(settings, RetentionSettings(), ["1m"]))
        return
    settings = InfluxSettings(url=influx.url, token=influx.token, org=influx.org, bucket=influx_bucket)
    retention = RetentionSettings(raw_s=-1)  # the test's bucket keeps everything
    await ensure_tiers(settings, tier_plan(settings, retention, ["1m", "15m"]))
    assert bucket_retentions(influx, unique) == {unique: 0, f"{unique}_1m": 365 * 86_400, f"{unique}_15m": 0}
    shorter = RetentionSettings(raw_s=-1, windows_s={"1m": 86_400.0, "15m": -1.0})
    await ensure_tiers(settings, tier_plan(settings, shorter, ["1m", "15m"]))
    assert bucket_retentions(influx, unique)[f"{unique}_1m"] == 365 * 86_400
    assert f"InfluxDB keeps {unique}_1m (1m tier) 365 days; retention.windows_s.1m asks for 1 days" in caplog.text


def bucket_retentions(influx: InfluxEndpoint, prefix: str) -> dict[str, int]:
    """InfluxDB 2.x: each bucket named ``prefix`` or ``{prefix}_*`` -> its expiry (s; 0 forever)."""
    from influxdb_client import InfluxDBClient

    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org) as client:
        return {
            b.name: next((r.every_seconds for r in b.retention_rules or [] if r.type == "expire"), 0)
            for b in client.buckets_api().find_buckets_iter()
            if b.name == prefix or b.name.startswith(f"{prefix}_")
        }
