"""Pure parts of the sink: Flux building (no injection) and the retry policy."""

from __future__ import annotations

import pytest

from portpulse.errors import ConfigError
from sinks.query import QueryRow, QuerySpec, build_flux, flux_string, format_rows
from sinks.retry import Outcome, backoff_s, classify


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
