"""compose.yaml cannot run here (no Docker engine); check that it parses and agrees with the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.services import INFLUX_IMAGE, KAFKA_IMAGE, MOSQUITTO_IMAGE

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_three_services_with_the_test_images() -> None:
    services = _compose()["services"]
    assert {name: s["image"] for name, s in services.items() if name in {"mosquitto", "kafka", "influxdb"}} == {
        "mosquitto": MOSQUITTO_IMAGE,
        "kafka": KAFKA_IMAGE,
        "influxdb": INFLUX_IMAGE,
    }


def test_compose_services_are_well_formed_and_loopback_only() -> None:
    data = _compose()
    declared_volumes = set(data.get("volumes", {}))
    for name, service in data["services"].items():
        assert set(service) <= {
            "image",
            "build",
            "command",
            "ports",
            "environment",
            "volumes",
            "healthcheck",
            "depends_on",
            "restart",
            "profiles",
            "entrypoint",
        }, name
        assert "image" in service or "build" in service, name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in declared_volumes, f"{name}: undeclared volume {source}"
        assert isinstance(service.get("healthcheck", {}).get("test"), list), f"{name} has no healthcheck"


def test_compose_influx_matches_documented_settings() -> None:
    env = _compose()["services"]["influxdb"]["environment"]
    assert env["DOCKER_INFLUXDB_INIT_ORG"] == "portpulse"
    assert env["DOCKER_INFLUXDB_INIT_BUCKET"] == "portpulse"
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"


def test_the_secure_profile_secures_every_hop_of_its_pipeline() -> None:
    services = _compose()["services"]
    secure = {name for name, s in services.items() if s.get("profiles") == ["secure"]}
    assert secure == {"certs", "mosquitto-secure", "kafka-secure", "influxdb-secure", "pipeline-secure"}
    env = services["pipeline-secure"]["environment"]
    assert env["PORTPULSE_MQTT__TLS"] == "true" and env["PORTPULSE_MQTT__PORT"] == "8884"  # mutual TLS
    assert env["PORTPULSE_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["PORTPULSE_INFLUX__URL"].startswith("https://")
    assert (
        env["PORTPULSE_OPS__TLS_CERT_FILE"] and "PORTPULSE_OPS__AUTH_TOKEN" in services["pipeline-secure"]["command"][0]
    )
    for name in secure - {"certs"}:
        assert services[name]["depends_on"]["certs" if name != "pipeline-secure" else "mosquitto-secure"], name
    kafka = services["kafka-secure"]["environment"]
    assert "SECURE:SASL_SSL" in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    mosquitto = (COMPOSE.parent / "deploy" / "secure" / "mosquitto.conf").read_text()
    assert "require_certificate true" in mosquitto and "use_identity_as_username true" in mosquitto
    assert mosquitto.count("acl_file") == 2 and "allow_anonymous true" not in mosquitto
