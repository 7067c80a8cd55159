"""``portpulse dlq`` against the real services: a site over its budget of new sensors and a
malformed message land in the DLQ; ``summary`` and ``show`` say so; the budget is raised and
``replay`` (after a dry run that changes nothing) stores the refused readings once, however
often it runs, with every window equal to an independent computation; replayed letters leave
the listings; what still fails goes back to the DLQ with its reason.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.pipeline import Publisher, within_one_hour
from tests.integration.test_cardinality import dead_letters
from tests.integration.test_end_to_end import assert_aggregates_match, stored_aggregates
from tests.integration.test_faults import PipelineProcess, pipeline_env
from tests.integration.test_sink_influx import query_rows
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

MINUTE = 60 * 10**9
Window = tuple[str, str, str, int]


def dlq_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "portpulse", "dlq", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def stored_raw(influx: InfluxEndpoint, bucket: str) -> list[tuple[str, str, float]]:
    rows = query_rows(
        influx,
        f'from(bucket: "{bucket}") |> range(start: 0) |> filter(fn: (r) => r._measurement == "air")'
        ' |> keep(columns: ["sensor_id", "_time", "_value"])',
    )
    return sorted((r["sensor_id"], r["_time"], float(r["_value"])) for r in rows)


async def test_dead_letters_are_summarised_shown_and_replayed_once_the_cause_is_fixed(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await summarise_show_replay(mqtt, kafka, influx, influx_bucket, unique, tmp_path)


async def summarise_show_replay(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    await within_one_hour(120)  # the site's two new series and the refusals after them in one hour
    env = pipeline_env(mqtt, kafka, influx, influx_bucket, unique) | {"PORTPULSE_ADMISSION__SITE_NEW_PER_HOUR": "2"}
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    base = (time.time_ns() - 5 * MINUTE) // MINUTE * MINUTE  # a closed minute, two windows
    readings = {s: [(base + k * 25 * 10**9, 10.0 * i + k) for k in range(3)] for i, s in enumerate("abcd")}

    def single(sensor: str, k: int) -> tuple[str, bytes]:
        ts, value = readings[sensor][k]
        return f"{unique}/air/quai/{sensor}", json.dumps({"ts": ts // 10**6, "metrics": {"no2": value}}).encode()

    # a gateway batch with a reading of a (admitted) and of c (over the budget): dead-lettered whole
    batch = json.dumps({"readings": [{"sensor_id": s, "ts": readings[s][2][0] // 10**6,
                                      "metrics": {"no2": readings[s][2][1]}} for s in "ac"]}).encode()  # fmt: skip
    expected: dict[Window, list[tuple[int, float]]] = {}
    for sensor, values in readings.items():
        for ts, value in values:
            expected.setdefault(("air", sensor, "no2", ts // MINUTE * MINUTE), []).append((ts, value))
    admitted_first = {k: v for k, v in expected.items() if k[1] in "ab"}

    await pipeline.start()
    try:
        with Publisher(mqtt, f"{unique}-gw") as publisher:
            # a and b first: the site's two new series this hour
            publisher.publish([single("a", 0), single("a", 1)] + [single("b", k) for k in range(3)], 1)
            await poll(lambda: len(stored_raw(influx, influx_bucket)) == 5, "a and b stored")
            publisher.publish(
                [single(s, k) for s in "cd" for k in range(3)] + [(f"{unique}/air/quai", batch)]
                + [(f"{unique}/air/quai/a", b'{"ts": 1, "metrics": ')], 1,
            )  # fmt: skip
        letters = await dead_letters(kafka, f"{unique}.dlq", expect=8)
        assert sorted(letter["reason"] for letter in letters) == [b"cardinality_limit"] * 7 + [b"malformed_json"]
        await poll(lambda: sorted(stored_aggregates(influx, influx_bucket)) == sorted(admitted_first), "a, b windows")

        summary = json.loads(dlq_cli(env, "summary", "--format", "json"))
        assert {(r["reason"], r["site"], r["letters"]) for r in summary} == {
            ("cardinality_limit", "quai", 7), ("malformed_json", "quai", 1)
        }  # fmt: skip
        shown = json.loads(dlq_cli(env, "show", "--sensor", "c", "--full", "--format", "json"))
        assert sorted(r["payload"] for r in shown) == sorted([single("c", k)[1].decode() for k in range(3)]
                                                             + [batch.decode()])  # fmt: skip
        assert all("site quai has had 2 new series this hour" in r["detail"] for r in shown)

        # the cause fixed: the budget raised. A dry run says what would happen and changes nothing.
        raised = env | {"PORTPULSE_ADMISSION__SITE_NEW_PER_HOUR": "10"}
        dry = dlq_cli(raised, "replay", "--reason", "cardinality_limit", "--dry-run")
        assert "7 letters selected; 7 would send back through the bridge: 8 readings would reach" in dry
        before = stored_raw(influx, influx_bucket)
        assert len(await dead_letters(kafka, f"{unique}.dlq", expect=9, timeout_s=5)) == 8

        done = dlq_cli(raised, "replay", "--reason", "cardinality_limit")
        assert "7 letters selected; 7 sent back through the bridge: 8 readings produced to" in done
        # replayed letters leave the listings and later replays, unless --all asks for them
        assert dlq_cli(raised, "replay", "--reason", "cardinality_limit").startswith("0 letters selected")
        outstanding = json.loads(dlq_cli(env, "summary", "--format", "json"))
        assert [(r["reason"], r["letters"]) for r in outstanding] == [("malformed_json", 1)]
        twice = dlq_cli(raised, "replay", "--reason", "cardinality_limit", "--all")  # replayed twice: stored once
        assert "7 letters selected; 7 sent back through the bridge: 8 readings produced to" in twice
        await poll(lambda: sorted(stored_aggregates(influx, influx_bucket)) == sorted(expected),
                   lambda: f"every window: {sorted(stored_aggregates(influx, influx_bucket))} != {sorted(expected)}; "
                   f"raw {stored_raw(influx, influx_bucket)}")  # fmt: skip
        again = dlq_cli(raised, "replay", "--reason", "malformed_json")
        assert "still failing (dead-lettered again): malformed_json x1" in again
        after = await dead_letters(kafka, f"{unique}.dlq", expect=9)
        assert sorted(letter["reason"] for letter in after) == [b"cardinality_limit"] * 7 + [b"malformed_json"] * 2
        assert [(r["reason"], r["letters"]) for r in json.loads(dlq_cli(env, "summary", "--format", "json"))] == [
            ("malformed_json", 1)  # the new letter of the message that failed again
        ]
        await poll(lambda: len(stored_raw(influx, influx_bucket)) == 12, "12 readings")
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()

    raw = stored_raw(influx, influx_bucket)
    assert len(raw) == 12 and len(before) == 6  # a2 was admitted from the batch; its c reading was not
    assert sorted((s, v) for s, _, v in raw) == sorted((s, v) for s, vs in readings.items() for _, v in vs)
    assert_aggregates_match(stored_aggregates(influx, influx_bucket), expected)


async def poll(condition: Callable[[], bool], what: str | Callable[[], str], timeout_s: float = 120) -> None:
    """Until ``condition()`` (run in a thread: it queries InfluxDB) holds, bounded; ``what`` (or
    what it returns) names it in the failure."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.5)
