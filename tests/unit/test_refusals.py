"""What retrying cannot fix, said once with the hop, the user and the cause (never a password):
TLS and credential refusals of MQTT, Kafka and InfluxDB, and TLS file settings checked at load."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aiokafka import errors
from pydantic import SecretStr, ValidationError

from portpulse.contract.settings import InfluxSettings, KafkaSettings, MqttSettings
from portpulse.ingest.mqtt import tls_refused
from portpulse.kafka.client import kafka_refused
from portpulse.sinks.tiers import _refused as influx_refused


def verify_failed(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_message = message
    return exc


def test_mqtt_tls_refusals_name_the_broker_and_the_setting(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    mqtt = MqttSettings(host="broker.port", port=8883, tls=True, ca_file=ca)
    assert str(tls_refused(mqtt, verify_failed("self-signed certificate in certificate chain"))) == (
        f"MQTT broker broker.port:8883: its TLS certificate is not trusted (self-signed certificate in certificate "
        f"chain); check mqtt.ca_file ({ca}) and that the host name is in the certificate"
    )
    expired = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired (_ssl.c:2580)")
    assert str(tls_refused(mqtt, expired)) == (
        "MQTT broker broker.port:8883 refused our TLS client certificate (certificate expired); "
        "we sent no client certificate (mqtt.cert_file)"
    )
    required = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    assert "refused our TLS client certificate (certificate required)" in str(tls_refused(mqtt, required))


def test_kafka_refusals_name_the_user_and_never_the_password() -> None:
    kafka = KafkaSettings(bootstrap_servers="k1:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                          sasl_username="portpulse", sasl_password=SecretStr("hunter2-secret"))  # fmt: skip
    said = {
        errors.SaslAuthenticationFailed(): "Kafka k1:9093 refused user 'portpulse' (SCRAM-SHA-512: authentication "
        "failed); check kafka.sasl_username and kafka.sasl_password",
        errors.TopicAuthorizationFailedError(): "Kafka k1:9093 denied user 'portpulse' writes "
        "(TopicAuthorizationFailedError): its ACLs do not allow it",
        verify_failed("unable to get local issuer certificate"): "Kafka k1:9093: its TLS certificate is not trusted "
        "(unable to get local issuer certificate); check kafka.ssl_ca_file (the system CAs)",
    }  # fmt: skip
    for exc, message in said.items():
        refused = kafka_refused(kafka, exc, "writes")
        assert refused is not None and str(refused) == message
        assert "hunter2" not in str(refused)
    assert kafka_refused(kafka, errors.KafkaConnectionError(), "writes") is None  # retried: Kafka may come back
    assert kafka_refused(kafka, errors.RequestTimedOutError(), "writes") is None
    anonymous = kafka_refused(None, errors.ClusterAuthorizationFailedError(), "the readings producer")
    assert str(anonymous) == (
        "Kafka denied this client (no SASL user) the readings producer (ClusterAuthorizationFailedError): "
        "its ACLs do not allow it"
    )


def test_influx_refusals_name_the_user_of_a_1x_token_and_never_its_password() -> None:
    v1 = InfluxSettings(url="https://influx:8086", token=SecretStr("portpulse:s3cret-pw"))
    assert str(influx_refused(v1, 401, "authorization failed")) == (
        "InfluxDB https://influx:8086 refused user 'portpulse' (HTTP 401: authorization failed); check influx.token"
    )
    v2 = InfluxSettings(url="https://influx:8086", token=SecretStr("an-api-token"))
    assert "refused the token (HTTP 403" in str(influx_refused(v2, 403, "forbidden"))
    assert "an-api-token" not in str(influx_refused(v2, 403, "forbidden"))
    assert str(influx_refused(v2, 500, "oops")) == "InfluxDB https://influx:8086 answered HTTP 500: oops"


def test_tls_files_are_checked_when_settings_load(tmp_path: Path) -> None:
    assert MqttSettings(ca_file="", cert_file="  ").ca_file is None  # as an empty environment variable gives
    with pytest.raises(ValidationError, match=r"no such file: /nowhere/ca\.pem"):
        MqttSettings(ca_file=Path("/nowhere/ca.pem"))
    with pytest.raises(ValidationError, match="no such file"):
        KafkaSettings(ssl_ca_file=tmp_path)  # a directory
    there = tmp_path / "ca.pem"
    there.write_text("x")
    assert InfluxSettings(ca_file=there).ca_file == there
