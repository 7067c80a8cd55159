"""Pure parts of the sink: Flux building (no injection) and the retry policy."""

from __future__ import annotations

import pytest

from portpulse.contract.errors import ConfigError
from portpulse.sinks.query import QueryRow, QuerySpec, build_flux, flux_string, format_rows
from portpulse.sinks.retry import Outcome, backoff_s, classify


def test_flux_string_escapes_everything_that_could_end_or_interpolate() -> None:
    assert flux_string('a"b') == '"a\\"b"'
    assert flux_string("a\\b") == '"a\\\\b"'
    assert flux_string("${x}") == '"\\${x}"'


def test_hostile_sensor_id_stays_inside_its_string_literal() -> None:
    hostile = '") |> drop(columns: ["_value"]) |> yield(name: "x'
    flux = build_flux(QuerySpec(bucket="b/rp", measurement="air", field="no2", sensor_id=hostile))
    pipeline = [line.strip().split("(")[0] for line in flux.splitlines()[1:]]
    assert pipeline == ["|> range", "|> filter", "|> filter", "|> sort", "|> keep"]
    assert f"r.sensor_id == {flux_string(hostile)})" in flux
    assert '\\") |> drop(columns: [\\"_value\\"])' in flux


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "-1h) |> drop()"}, "start"),
        ({"stop": "yesterday"}, "stop"),
        ({"every": "-1m"}, "window"),
        ({"every": "1m", "fn": "exec"}, "function"),
    ],
)
def test_query_spec_rejects_bad_arguments(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuerySpec(bucket="b", measurement="air", field="no2", **kwargs)


def test_aggregate_query_shape() -> None:
    flux = build_flux(
        QuerySpec(
            bucket="portpulse/autogen",
            measurement="air",
            field="no2",
            site="quai",
            start="2026-01-01T00:00:00Z",
            every="1m",
            fn="max",
        )
    )
    assert 'r.site == "quai"' in flux
    assert 'aggregateWindow(every: 1m, fn: max, createEmpty: false, timeSrc: "_start")' in flux
    assert "range(start: 2026-01-01T00:00:00Z, stop: now())" in flux


def test_format_rows() -> None:
    rows = [QueryRow("2026-01-01T00:00:00Z", 1.5), QueryRow("2026-01-01T00:01:00Z", 2.0)]
    assert format_rows(rows, "csv") == "time,value\n2026-01-01T00:00:00Z,1.5\n2026-01-01T00:01:00Z,2.0"
    assert (
        format_rows(rows, "json")
        == '[{"time": "2026-01-01T00:00:00Z", "value": 1.5}, {"time": "2026-01-01T00:01:00Z", "value": 2.0}]'
    )
    assert format_rows(rows, "table").splitlines()[-1] == "(2 rows)"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (204, Outcome.STORED),
        (400, Outcome.SPLIT),
        (422, Outcome.SPLIT),
        (413, Outcome.SPLIT),
        (401, Outcome.FIX_CONFIG),
        (404, Outcome.FIX_CONFIG),
        (0, Outcome.RETRY),
        (429, Outcome.RETRY),
        (503, Outcome.RETRY),
        (500, Outcome.RETRY),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_backoff_grows_caps_and_honours_retry_after() -> None:
    assert backoff_s(0, 0.2, 10, 0.0) == pytest.approx(0.1)
    assert backoff_s(0, 0.2, 10, 0.999) == pytest.approx(0.2, rel=1e-2)
    assert backoff_s(3, 0.2, 10, 0.0) == pytest.approx(0.8)
    assert backoff_s(50, 0.2, 10, 1.0) == pytest.approx(10.0)
    assert backoff_s(0, 0.2, 10, 0.0, retry_after_s=7) == 7
    assert backoff_s(0, 0.2, 10, 0.0, retry_after_s=10_000) == 100  # a bad header cannot stall the writer


def test_readback_query_keeps_hostile_ids_inside_literals_and_parses_what_influx_returns() -> None:
    from portpulse.contract.points import SeriesRange
    from portpulse.sinks.query import parse_readback, readback_flux

    hostile = 'x") or r._measurement =~ /.*/ or (r.a == ("'
    query = SeriesRange("air", ("s-1", hostile), ("no2",), 1_000_000_000, 3_000_000_000)
    flux = readback_flux("db/rp", query)
    assert f"r.sensor_id == {flux_string(hostile)}" in flux and "contains(" not in flux
    assert flux.count("|>") == 4  # range, filter, map, group: nothing injected
    rows = [
        ["", "result", "table", "_time", "_measurement", "_field", "sensor_id", "_value"],
        ["", "_result", "0", "1970-01-01T00:00:01Z", "air", "no2", "s-1", "40.5"],
        ["", "_result", "0", "1970-01-01T00:00:02.5Z", "air_rejected", "no2_reason", "s-1", "spike"],
        ["", "_result", "0", "1970-01-01T00:00:02.5Z", "air_rejected", "no2", "s-1", "400"],
        ["", "_result", "0", "1970-01-01T00:00:03Z", "air", "no2", "s-1", "41"],  # the stop is exclusive
    ]
    got = parse_readback(query, rows)
    assert got.ts_ns.tolist() == [1_000_000_000, 2_500_000_000]
    assert got.value.tolist() == [40.5, 400.0] and got.reason.tolist() == ["", "spike"]
    assert got.accepted.tolist() == [True, False]


async def test_readback_retries_while_influx_does_not_answer_and_stops_on_a_refusal() -> None:
    from pydantic import SecretStr

    from portpulse.contract.deadletter import MemoryDeadLetters
    from portpulse.contract.errors import PortPulseError
    from portpulse.contract.points import SeriesRange
    from portpulse.contract.settings import InfluxSettings, SinkSettings
    from portpulse.sinks.writer import InfluxWriter

    class Api:
        def __init__(self, failures: list[Exception]) -> None:
            self.failures = failures

        async def query_raw(self, flux: str, dialect: object) -> str:
            if self.failures:
                raise self.failures.pop(0)
            return "_time,_measurement,_field,sensor_id,_value\n1970-01-01T00:00:01Z,air,no2,s-1,40.5\n"

    class Reader:
        def __init__(self, failures: list[Exception]) -> None:
            self.api = Api(failures)

        def query_api(self) -> Api:
            return self.api

        async def close(self) -> None:
            return None

    class RefusedError(Exception):
        status = 401

    settings = InfluxSettings(url="http://127.0.0.1:1", token=SecretStr("u:p"), org="o", bucket="b/rp")
    writer = InfluxWriter(settings, SinkSettings(retry_initial_s=0.001, retry_max_s=0.002), MemoryDeadLetters())
    query = SeriesRange("air", ("s-1",), ("no2",), 0, 2_000_000_000)
    writer._reader = Reader([OSError("refused"), TimeoutError(), OSError("refused")])
    got = await writer.read(query)
    assert got.value.tolist() == [40.5] and writer.healthy
    writer._reader = Reader([RefusedError()])
    with pytest.raises(PortPulseError, match="HTTP 401"):
        await writer.read(query)


def test_influxql_delete_names_one_point_and_escapes_what_could_end_a_literal() -> None:
    from portpulse.sinks.query import influxql_delete

    assert influxql_delete("air", "s-1", 5) == 'DELETE FROM "air" WHERE "sensor_id" = \'s-1\' AND time = 5'
    hostile = influxql_delete('a"ir', "x' OR time > 0 --\\", 7)
    assert hostile == 'DELETE FROM "a\\"ir" WHERE "sensor_id" = \'x\\\' OR time > 0 --\\\\\' AND time = 7'


def test_flux_times_are_read_to_the_nanosecond() -> None:
    from datetime import UTC, datetime

    from portpulse.sinks.query import flux_time_ns

    cases = {
        "2026-11-30T20:30:41.123456789Z": 123_456_789,
        "2026-11-30T20:30:41Z": 0,
        "2026-11-30T20:30:41.5Z": 500_000_000,
        "1970-01-01T00:00:00.000000001Z": 1,
    }
    for text, fraction_ns in cases.items():
        whole = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        assert flux_time_ns(text) == int(whole.timestamp()) * 10**9 + fraction_ns
        assert flux_time_ns(text) == flux_time_ns(text)  # the cached seconds give the same answer
