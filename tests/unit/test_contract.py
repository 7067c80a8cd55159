"""The shared contract: settings, catalogue, topics, schema and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from portpulse import (
    ConfigError,
    DecodeError,
    PortPulseError,
    Reading,
    ReadingColumns,
    ServiceUnavailableError,
    __version__,
    dlq_topic,
    late_topic,
    load_catalogue,
    load_settings,
    parse_mqtt_topic,
    readings_topic,
)
from portpulse.app.cli import main
from portpulse.contract.schema import Coded, str_array
from portpulse.contract.topics import MqttTopic, parse_mqtt_topics


def test_settings_env_nested_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "portpulse.toml"
    toml.write_text('[kafka]\nbootstrap_servers = "file:9092"\npartitions = 6\n[influx]\nbucket = "from/file"\n')
    monkeypatch.setenv("PORTPULSE_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("PORTPULSE_INFLUX__TOKEN", "user:s3cret")
    settings = load_settings(toml)
    assert settings.kafka.bootstrap_servers == "env:9092"  # environment wins over the file
    assert settings.kafka.partitions == 6  # the file wins over defaults
    assert settings.influx.bucket == "from/file"
    assert settings.influx.token.get_secret_value() == "user:s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.model_dump_json()


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.kafka.partitions = 3  # type: ignore[misc]


def test_settings_errors_are_clear_and_hide_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTPULSE_MQTT__PORT", "99999")
    monkeypatch.setenv("PORTPULSE_INFLUX__URL", "ftp://hunter2@host")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "mqtt.port" in message and "influx.url" in message
    assert "hunter2" not in message


def test_paho_with_qos2_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTPULSE_MQTT__CLIENT", "paho")
    monkeypatch.setenv("PORTPULSE_MQTT__QOS", "2")
    with pytest.raises(ConfigError, match=r"mqtt: .*qos = 2 needs mqtt.client = 'asyncio'.*PUBREC.*before Kafka"):
        load_settings()
    monkeypatch.setenv("PORTPULSE_MQTT__QOS", "1")
    assert load_settings().mqtt.client == "paho"
    assert load_settings(mqtt={"client": "asyncio", "qos": 2}).mqtt.qos == 2


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_catalogue_covers_the_three_domains() -> None:
    catalogue = load_catalogue()
    assert catalogue.domains() == ["air", "cell", "crane"]
    assert {"no2", "pm25", "pm10", "o3", "so2", "temperature", "humidity"} <= set(catalogue.metrics("air"))
    assert {"hoist_load", "wind_speed", "spreader_locked"} <= set(catalogue.metrics("crane"))
    assert {"rsrp", "sinr", "connected_ues"} <= set(catalogue.metrics("cell"))
    no2 = catalogue.get("air", "no2")
    assert no2 is not None and no2.unit == "µg/m³" and no2.min == 0.0
    assert no2.to_canonical(10.0, "ppb") == pytest.approx(18.8)
    assert catalogue.get("air", "unknown-metric") is None


def test_catalogue_rejects_bad_data(tmp_path: Path) -> None:
    bad = tmp_path / "cat.toml"
    bad.write_text("[air.no2]\nunit = 'x'\nmin = 5.0\nmax = 1.0\nmax_rate_per_s = 1.0\n")
    with pytest.raises(ConfigError, match=r"\[air.no2\].*min < max"):
        load_catalogue(bad)
    bad.write_text("[air.no2]\nunit = 'x'\n")
    with pytest.raises(ConfigError, match="missing"):
        load_catalogue(bad)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("sensors/air/quai-de-l-europe/no2-17", MqttTopic("air", "quai-de-l-europe", "no2-17")),
        ("sensors/crane/terminal-de-france/sts-04", MqttTopic("crane", "terminal-de-france", "sts-04")),
        ("sensors/new_domain/site/gw", MqttTopic("new_domain", "site", "gw")),
        ("sensors/cell/port-2000", MqttTopic("cell", "port-2000", "")),
    ],
)
def test_parse_mqtt_topic_accepts(topic: str, expected: MqttTopic) -> None:
    assert parse_mqtt_topic(topic) == expected


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/air/site/s1", "prefix"),
        ("sensors/air", "topic must be"),
        ("sensors/Air/site/s1", "domain"),
        ("sensors/air/si te/s1", "site"),
        ("sensors/air/site/s1,evil=1", "sensor_id"),
        ("sensors/air/site/s1/extra", "topic must be"),
    ],
)
def test_parse_mqtt_topic_rejects_with_reason(topic: str, reason: str) -> None:
    result = parse_mqtt_topic(topic)
    assert isinstance(result, str) and reason in result


def test_a_delivery_of_topics_is_parsed_like_each_one_under_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from portpulse.contract import topics

    monkeypatch.setattr(topics, "_PARSED", {})
    monkeypatch.setattr(topics, "_PARSED_MAX", 3)
    delivery = [
        "sensors/air/quai/s1",
        "sensors/Air/quai/s1",
        "gw/air/quai/s1",
        "sensors/air/quai/s1",
        "sensors/air/q/s2",
    ]
    for prefix in ("sensors", "gw", "sensors"):  # the second round reads what the first learned
        assert parse_mqtt_topics(delivery, prefix) == [parse_mqtt_topic(t, prefix) for t in delivery]
    assert parse_mqtt_topics(["sensors/cell/port"]) == [MqttTopic("cell", "port", "")]
    assert len(topics._PARSED["sensors"]) <= 3 + 1  # bounded: started over past _PARSED_MAX


def test_kafka_topic_names() -> None:
    assert readings_topic("air") == "portpulse.readings.air"
    assert readings_topic("cell", prefix="p") == "p.readings.cell"
    assert dlq_topic() == "portpulse.dlq" and late_topic() == "portpulse.late"


def test_reading_columns_round_trip_and_length_check() -> None:
    rows = [Reading("s1", "site", "air", "no2", 1_000, 41.5), Reading("s2", "site", "air", "pm25", 2_000, 9.0, 1)]
    cols = ReadingColumns.from_readings(rows)
    assert len(cols) == 2 and cols.ts_ns.dtype == np.int64 and cols.flags.dtype == np.uint8
    assert cols.rows() == rows
    assert ReadingColumns.concat([cols, ReadingColumns.empty(), cols]).rows() == rows + rows
    assert cols.take(np.array([False, True])).rows() == rows[1:]
    with pytest.raises(ValueError, match="length"):
        ReadingColumns(cols.sensor_id, cols.site, cols.domain, cols.metric, cols.ts_ns[:1], cols.value, cols.flags)


def test_coded_string_columns_read_as_the_strings_they_stand_for() -> None:
    """A column given as codes into names reads as ``names[codes]``; taking rows keeps it coded
    and takes the same rows; a coded column of the wrong length is refused like any other."""
    rows = [
        Reading(s, "quai", "air", m, t, float(t), 0)
        for t, (s, m) in enumerate([("a", "no2"), ("b", "no2"), ("a", "o3")])
    ]
    plain = ReadingColumns.from_readings(rows)
    sensors, metrics = (
        Coded(np.array([0, 1, 0]), str_array(["a", "b"])),
        Coded(np.array([1, 1, 0]), str_array(["o3", "no2"])),
    )
    coded = ReadingColumns(sensors, plain.site, plain.domain, metrics, plain.ts_ns, plain.value, plain.flags)
    assert coded.rows() == rows and coded.sensor_id.tolist() == ["a", "b", "a"]
    taken = ReadingColumns(sensors, plain.site, plain.domain, metrics, plain.ts_ns, plain.value, plain.flags).take(
        np.array([2, 1])
    )
    assert isinstance(taken._strings[0], Coded) and taken.rows() == [rows[2], rows[1]]
    assert ReadingColumns.concat([taken, plain]).rows() == [rows[2], rows[1], *rows]
    with pytest.raises(ValueError, match="column metric has length 2"):
        ReadingColumns(
            plain.sensor_id,
            plain.site,
            plain.domain,
            Coded(np.array([0, 0]), str_array(["no2"])),
            plain.ts_ns,
            plain.value,
            plain.flags,
        )


def test_errors_carry_retriable_and_data() -> None:
    assert ServiceUnavailableError("kafka", "down").retriable is True
    assert ConfigError("x").retriable is False
    err = DecodeError("malformed_json", "line 1")
    assert isinstance(err, PortPulseError) and err.reason == "malformed_json"
    assert PortPulseError("x", retriable=True).retriable is True


def test_cli_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "portpulse", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"portpulse {__version__}"
    out = subprocess.run([sys.executable, "-m", "portpulse", "--help"], capture_output=True, text=True, check=True)
    assert "PORTPULSE_" in out.stdout and "catalogue" in out.stdout


def test_cli_config_masks_secrets_and_reports_bad_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PORTPULSE_INFLUX__TOKEN", "tok-123")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "tok-123" not in out and "**********" in out
    monkeypatch.setenv("PORTPULSE_KAFKA__PARTITIONS", "zero")
    assert main(["config"]) == 2
    assert "kafka.partitions" in capsys.readouterr().err


def test_cli_accepts_negative_durations_after_start_stop_since_and_until() -> None:
    from portpulse.app.cli import _join_negative_values

    assert _join_negative_values(["query", "--start", "-1h", "--stop", "-5m", "--every", "1m"]) == [
        "query", "--start=-1h", "--stop=-5m", "--every", "1m",
    ]  # fmt: skip
    assert _join_negative_values(["dlq", "summary", "--since", "-7d", "--until", "-1h"]) == [
        "dlq", "summary", "--since=-7d", "--until=-1h",
    ]  # fmt: skip


def test_cli_catalogue_reads_the_configured_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    custom = tmp_path / "catalogue.toml"
    custom.write_text(
        '[water.level]\nunit = "m"\nmin = -5.0\nmax = 12.0\nmax_rate_per_s = 0.5\ndescription = "quay water level"\n'
    )
    monkeypatch.setenv("PORTPULSE_PROCESSOR__CATALOGUE", str(custom))
    monkeypatch.setenv("PORTPULSE_PROCESSOR__SPIKE_K_SIGMA", "6")
    assert main(["catalogue"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["water", "level", "m", "-5", "12", "0.5", "quay", "water", "level"]]
    monkeypatch.setenv("PORTPULSE_PROCESSOR__SPIKE_K_SIGMA", "0")
    assert main(["catalogue"]) == 2  # k must be > 0: a configuration error


def test_topics_are_created_with_retention_by_kind_and_short_readings_retention_is_named() -> None:
    from portpulse.contract.settings import KafkaSettings
    from portpulse.contract.topics import pipeline_topics, retention_shortfall, topic_configs

    kafka = KafkaSettings(topic_prefix="pp", readings_retention_s=8 * 86_400, dlq_retention_s=-1)
    assert pipeline_topics("pp", ["air", "crane"]) == {"pp.readings.air", "pp.readings.crane", "pp.dlq", "pp.late",
                                                        "pp.sensors"}  # fmt: skip
    assert topic_configs("pp.readings.air", kafka) == {"cleanup.policy": "delete", "retention.ms": "691200000"}
    assert topic_configs("pp.late", kafka) == {"cleanup.policy": "delete", "retention.ms": str(30 * 86_400_000)}
    assert topic_configs("pp.dlq", kafka) == {"cleanup.policy": "delete", "retention.ms": "-1"}
    assert topic_configs("pp.sensors", kafka) == {"cleanup.policy": "compact"}
    assert topic_configs("other.readings.air", kafka) == {}
    week = 7 * 86_400
    # a readings topic must keep the correction horizon; forever is fine
    assert retention_shortfall("pp.readings.air", week * 1000, kafka, horizon_s=week) is None
    assert retention_shortfall("pp.readings.air", -1, kafka, horizon_s=week) is None
    short = retention_shortfall("pp.readings.air", 86_400_000, kafka, horizon_s=week)
    assert short is not None and "keeps records 1 days (retention.ms=86400000)" in short
    assert "correction horizon of 7 days (ingest.max_past_s)" in short and "retention.ms=691200000" in short
    # the late topic: the configured 30 days, a warning when shorter
    assert retention_shortfall("pp.late", week * 1000, kafka, horizon_s=week) == (
        "Kafka topic pp.late keeps records 7 days (retention.ms=604800000); the settings ask for "
        "retention.ms=2592000000"
    )
    assert retention_shortfall("pp.dlq", 1000, kafka, horizon_s=week) == (  # asked: forever
        "Kafka topic pp.dlq keeps records 1.15741e-05 days (retention.ms=1000); the settings ask for retention.ms=-1"
    )
    assert retention_shortfall("pp.sensors", 1000, kafka, horizon_s=week) is None  # compacted: no retention asked
