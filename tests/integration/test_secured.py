"""Every hop secured, against the real services ``scripts/services up secure`` starts: Mosquitto
with mutual TLS and ACLs, Kafka over SASL_SSL (SCRAM-SHA-512) with ACLs, InfluxDB 1.8 over HTTPS
with authentication. The whole pipeline delivers exactly; each way a hop can refuse gives one
clear error naming the hop and the cause; no secret reaches a log line or ``portpulse config``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.test_faults import PipelineProcess
from tests.services import SERVICES_SCRIPT, SecuredServices, free_port, secured_services

pytestmark = pytest.mark.integration

MINUTE = 60 * 10**9


@pytest.fixture(scope="module")
def secured() -> SecuredServices:
    return secured_services()


def secured_env(secured: SecuredServices, unique: str, **overrides: str) -> dict[str, str]:
    """The environment of a ``portpulse`` child with every hop secured, this test's Kafka topics
    and group, and ``overrides`` (``PORTPULSE_*`` names without the prefix)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PORTPULSE_")},
        **secured.env,
        "PORTPULSE_MQTT__CLIENT_ID": f"{unique}-bridge", "PORTPULSE_MQTT__SESSION_EXPIRY_S": "60",
        "PORTPULSE_KAFKA__TOPIC_PREFIX": unique, "PORTPULSE_KAFKA__CONSUMER_GROUP": f"{unique}-g",
        "PORTPULSE_KAFKA__PARTITIONS": "2", "PORTPULSE_KAFKA__REQUEST_TIMEOUT_MS": "5000",
        "PORTPULSE_SINK__FLUSH_INTERVAL_MS": "100", "PORTPULSE_OPS__METRICS_PORT": str(free_port()),
        **{f"PORTPULSE_{k}": v for k, v in overrides.items()},
    }  # fmt: skip


def publish_over_tls(secured: SecuredServices, messages: list[tuple[str, bytes]]) -> None:
    """A gateway: TLS with the run's CA, user gateway-7 and its password, QoS 1, every message acknowledged."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="gateway-7-test", protocol=paho.MQTTv311)
    client.tls_set(ca_certs=str(secured.pki / "ca.pem"))
    client.username_pw_set("gateway-7", secured.credentials["mqtt:gateway-7"])
    client.connect("127.0.0.1", secured.mqtt_tls_port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def influx_rows(secured: SecuredServices, q: str) -> list[list[Any]]:
    """InfluxQL over HTTPS as the read-only user: the rows of the first series set, all series concatenated."""
    auth = urllib.parse.urlencode({"u": "reader", "p": secured.credentials["influx:reader"], "db": "portpulse"})
    url = f"{secured.env['PORTPULSE_INFLUX__URL']}/query?{auth}"
    context = ssl.create_default_context(cafile=str(secured.pki / "ca.pem"))
    data = urllib.parse.urlencode({"q": q, "epoch": "ns"}).encode()
    with urllib.request.urlopen(url, data=data, timeout=30, context=context) as r:
        result = json.loads(r.read())["results"][0]
    return [row for series in result.get("series", []) for row in series["values"]]


async def test_every_hop_secured_delivers_exactly_and_keeps_its_secrets(
    secured: SecuredServices, unique: str, tmp_path: Path
) -> None:
    await deliver_secured(secured, unique, tmp_path)


async def deliver_secured(secured: SecuredServices, unique: str, tmp_path: Path) -> None:
    env = secured_env(secured, unique, OPS__LOG_LEVEL="DEBUG")
    base = (time.time_ns() - 5 * MINUTE) // MINUTE * MINUTE  # closed minutes
    sensors = [f"{unique}-{i}" for i in range(3)]
    readings = {s: [(base + k * 7 * 10**9, 10.0 * i + k * 0.5) for k in range(12)] for i, s in enumerate(sensors)}
    messages = [(f"sensors/air/quai/{s}", json.dumps({"ts": ts // 10**6, "metrics": {"no2": v}}).encode())
                for s, values in readings.items() for ts, v in values]  # fmt: skip
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")  # windows 1m
    await pipeline.start()
    try:
        await asyncio.to_thread(publish_over_tls, secured, messages)
        where = f'"sensor_id" =~ /^{unique}-/'
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            raw = await asyncio.to_thread(influx_rows, secured, f'SELECT sensor_id, no2 FROM "raw"."air" WHERE {where}')
            minutes = await asyncio.to_thread(
                influx_rows, secured, f'SELECT sensor_id, no2_count, no2_mean FROM "1m"."air_1m" WHERE {where}'
            )
            if len(raw) == len(messages) and sum(float(r[2]) for r in minutes) == len(messages):
                break
            await asyncio.sleep(0.5)
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()
    assert sorted((r[1], r[0], r[2]) for r in raw) == sorted(
        (s, ts, v) for s, values in readings.items() for ts, v in values
    )
    expected: dict[tuple[str, int], list[float]] = {}
    for s, values in readings.items():
        for ts, v in values:
            expected.setdefault((s, ts // MINUTE * MINUTE), []).append(v)
    got = {(str(r[1]), int(r[0])): (float(r[2]), float(r[3])) for r in minutes}
    assert sorted(got) == sorted(expected)
    for window, window_values in expected.items():
        count, mean = got[window]
        assert count == len(window_values) and math.isclose(mean, statistics.fmean(window_values)), window

    log = pipeline.log.read_text()
    assert "portpulse.bridge" in log and "portpulse.processor" in log  # DEBUG: everything was logged
    config = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "portpulse", "config"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert config.returncode == 0, config.stderr
    for name, secret in secured.credentials.items():
        assert secret not in log, f"the password of {name} is in the pipeline's log"
        assert secret not in config.stdout + config.stderr, f"the password of {name} is in portpulse config"
    key_line = (secured.pki / "bridge.key").read_text().splitlines()[1]
    assert key_line not in log and key_line not in config.stdout


def client_certificate(pki: Path, out: Path, name: str, expired: bool = False) -> tuple[Path, Path]:
    """A client certificate for portpulse-bridge signed by the run's CA (valid for a day, or
    expired yesterday) and its key, as ``{name}.pem`` and ``{name}.key`` in ``out``."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=3), now - dt.timedelta(days=1)) if expired else (now, now + dt.timedelta(1))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portpulse-bridge")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())  # fmt: skip
    (out / f"{name}.key").write_bytes(pkcs8)
    return out / f"{name}.pem", out / f"{name}.key"


def other_ca(out: Path) -> Path:
    """A CA that signed none of the services' certificates."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out / "other.key"), "-out",
         str(out / "other.pem"), "-days", "2", "-subj", "/CN=Some other CA"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "other.pem"


async def create_pipeline_topics(secured: SecuredServices, prefix: str) -> None:
    """The pipeline's topics, made as the administrator (the plaintext listener)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from portpulse.contract.catalogue import load_catalogue
    from portpulse.contract.topics import pipeline_topics

    admin = AIOKafkaAdminClient(bootstrap_servers=secured.kafka_admin)
    await admin.start()
    try:
        topics = sorted(pipeline_topics(prefix, load_catalogue().domains()))
        await admin.create_topics([NewTopic(t, 2, 1) for t in topics])
    finally:
        await admin.close()


#: case -> (settings that break one hop, with {other_ca}, {expired_cert}, {expired_key}, {reader} filled
#: in; what the one error line says)
REFUSALS = {
    "mqtt: a CA that did not sign the broker's certificate": (
        {"MQTT__CA_FILE": "{other_ca}"},
        "MQTT broker 127.0.0.1:11894: its TLS certificate is not trusted (self-signed certificate in certificate "
        "chain); check mqtt.ca_file",
    ),
    "mqtt: an expired client certificate": (
        {"MQTT__CERT_FILE": "{expired_cert}", "MQTT__KEY_FILE": "{expired_key}"},
        "MQTT broker 127.0.0.1:11894 refused our TLS client certificate (certificate expired)",
    ),
    "mqtt (paho client): a CA that did not sign the broker's certificate": (
        {"MQTT__CLIENT": "paho", "MQTT__CA_FILE": "{other_ca}"},
        "MQTT broker 127.0.0.1:11894: its TLS certificate is not trusted (self-signed certificate in certificate "
        "chain); check mqtt.ca_file",
    ),
    "mqtt (paho client): an expired client certificate": (
        {"MQTT__CLIENT": "paho", "MQTT__CERT_FILE": "{expired_cert}", "MQTT__KEY_FILE": "{expired_key}"},
        "MQTT broker 127.0.0.1:11894 refused our TLS client certificate (certificate expired)",
    ),
    "mqtt: a user the broker's ACL does not let subscribe": (
        {"MQTT__PORT": "{mqtt_dynsec_port}", "MQTT__CERT_FILE": "", "MQTT__KEY_FILE": "",
         "MQTT__USERNAME": "gateway-7", "MQTT__PASSWORD": "{gateway}"},
        "MQTT broker 127.0.0.1:11895 denied user 'gateway-7' the subscription to sensors/# (not authorized: the "
        "broker's ACL)",
    ),
    "mqtt: a wrong password": (
        {"MQTT__PORT": "{mqtt_tls_port}", "MQTT__CERT_FILE": "", "MQTT__KEY_FILE": "", "MQTT__USERNAME": "portpulse",
         "MQTT__PASSWORD": "not-the-mqtt-password-1"},
        "MQTT broker 127.0.0.1:11893 refused user 'portpulse' (not authorized); check mqtt.username and mqtt.password",
    ),
    "kafka: a wrong password": (
        {"KAFKA__SASL_PASSWORD": "not-the-kafka-password-2"},
        "Kafka 127.0.0.1:19194 refused user 'portpulse' (SCRAM-SHA-512: authentication failed); check "
        "kafka.sasl_username and kafka.sasl_password",
    ),
    "kafka: a CA that did not sign the broker's certificate": (
        {"KAFKA__SSL_CA_FILE": "{other_ca}"},
        "Kafka 127.0.0.1:19194: its TLS certificate is not trusted (unable to get local issuer certificate)",
    ),
    "kafka: a user without write permission": (
        {"KAFKA__SASL_USERNAME": "reader", "KAFKA__SASL_PASSWORD": "{reader}"},
        "Kafka 127.0.0.1:19194 denied user 'reader' writes (TopicAuthorizationFailedError): its ACLs do not allow it",
    ),
    "influx: a wrong password": (
        {"INFLUX__TOKEN": "portpulse:not-the-influx-password-3"},
        "InfluxDB https://127.0.0.1:18096 refused user 'portpulse' (HTTP 401: authorization failed); check "
        "influx.token",
    ),
    "influx: a CA that did not sign the server's certificate": (
        {"INFLUX__CA_FILE": "{other_ca}"},
        "InfluxDB https://127.0.0.1:18096: its TLS certificate is not trusted (unable to get local issuer "
        "certificate); check influx.ca_file",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refusing_hop_stops_start_up_with_one_clear_error(
    secured: SecuredServices, unique: str, tmp_path: Path, case: str
) -> None:
    await refused(secured, unique, tmp_path, case)


async def refused(secured: SecuredServices, unique: str, tmp_path: Path, case: str) -> None:
    broken, said = REFUSALS[case]
    cert, key = client_certificate(secured.pki, tmp_path, "expired", expired=True)
    values = {
        "other_ca": str(other_ca(tmp_path)), "expired_cert": str(cert), "expired_key": str(key),
        "reader": secured.credentials["kafka:reader"], "gateway": secured.credentials["mqtt:gateway-7"],
        "mqtt_tls_port": str(secured.mqtt_tls_port), "mqtt_dynsec_port": str(secured.mqtt_dynsec_port),
    }  # fmt: skip
    env = secured_env(secured, unique, **{k: v.format(**values) for k, v in broken.items()})
    if "without write permission" in case:
        await create_pipeline_topics(secured, unique)  # creating them is not the reader's to do
    run = PipelineProcess(env, tmp_path / "run.log")
    writes = "without write permission" in case
    await run.start() if writes else run.spawn()  # start: spawn, then wait until ready
    assert run.proc is not None
    try:
        if writes:  # the bridge writes nothing before a reading arrives: one, once it is subscribed
            await asyncio.to_thread(
                publish_over_tls, secured, [(f"sensors/air/quai/{unique}", b'{"metrics": {"no2": 1.0}}')]
            )
        for _ in range(900):  # bounded: 90 s
            if run.proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        if run.proc.poll() is None:
            run.kill()
    err = run.log.read_bytes()
    stderr = err.decode()
    assert run.proc.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"portpulse: {said}"), stderr[-3000:]
    assert stderr.count(said) == 1, stderr[-3000:]  # said once: no retry loop repeating it
    for name, secret in {**secured.credentials, **{k: v for k, v in broken.items() if "PASSWORD" in k}}.items():
        assert secret not in stderr, f"{name}'s secret is in the output"


async def test_client_certificates_replaced_on_disk_are_used_on_the_next_reconnect(
    secured: SecuredServices, unique: str, tmp_path: Path
) -> None:
    await rotate(secured, unique, tmp_path)


async def rotate(secured: SecuredServices, unique: str, tmp_path: Path) -> None:
    """The bridge's certificate files are replaced while it runs and the broker restarts: an
    expired certificate is refused on each reconnect (so the new files are read, and the refusal
    logged), then a valid new one gets through and readings flow again, all without a restart."""
    cert, key = tmp_path / "bridge.pem", tmp_path / "bridge.key"
    cert.write_bytes((secured.pki / "bridge.pem").read_bytes())
    key.write_bytes((secured.pki / "bridge.key").read_bytes())
    env = secured_env(secured, unique, MQTT__CERT_FILE=str(cert), MQTT__KEY_FILE=str(key),
                      MQTT__RECONNECT_MAX_S="1")  # fmt: skip
    pipeline = PipelineProcess(env, tmp_path / "pipeline.log")
    now_ms = time.time_ns() // 10**6

    def reading(sensor: str, value: float) -> tuple[str, bytes]:
        return f"sensors/air/quai/{sensor}", json.dumps({"ts": now_ms, "metrics": {"no2": value}}).encode()

    async def stored(sensor: str) -> bool:
        rows = await asyncio.to_thread(
            influx_rows, secured, f'SELECT no2 FROM "raw"."air" WHERE sensor_id = \'{sensor}\''
        )
        return len(rows) == 1

    async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
        for _ in range(240):  # bounded: 120 s
            if await condition():
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n{pipeline.log.read_text()[-3000:]}")

    await pipeline.start()
    try:
        await asyncio.to_thread(publish_over_tls, secured, [reading(f"{unique}-before", 1.0)])
        await until(lambda: stored(f"{unique}-before"), "the first reading")
        expired = client_certificate(secured.pki, tmp_path, "expired", expired=True)
        for new, old in zip(expired, (cert, key), strict=True):
            new.replace(old)
        await asyncio.to_thread(restart_secured_mqtt)

        async def refused() -> bool:
            return "refused our TLS client certificate (certificate expired)" in pipeline.log.read_text()

        await until(refused, "the expired certificate to be refused")
        assert pipeline.proc is not None and pipeline.proc.poll() is None  # still running
        fresh = client_certificate(secured.pki, tmp_path, "fresh")
        for new, old in zip(fresh, (cert, key), strict=True):
            new.replace(old)

        async def resubscribed() -> bool:  # the restarted broker kept no session: publish after it
            return "subscribed (1 reconnects)" in pipeline.log.read_text()

        await until(resubscribed, "the bridge to subscribe again")
        await asyncio.to_thread(publish_over_tls, secured, [reading(f"{unique}-after", 2.0)])
        await until(lambda: stored(f"{unique}-after"), "a reading through the new certificate")
        assert await pipeline.stop() == 0, pipeline.log.read_text()[-3000:]
    finally:
        await pipeline.stop()


def restart_secured_mqtt() -> None:
    for command in ("down", "up"):
        done = subprocess.run([str(SERVICES_SCRIPT), command, "mqtt-secure"], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]


async def test_kafka_plain_over_tls_creates_topics_and_takes_records(secured: SecuredServices, unique: str) -> None:
    """SASL PLAIN (user portpulse-plain) on the same SASL_SSL listener: what the pipeline does
    first, creating its topics and producing, works; the record is read back as written."""
    await plain_over_tls(secured, unique)


async def plain_over_tls(secured: SecuredServices, unique: str) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from portpulse.contract.settings import KafkaSettings
    from portpulse.kafka import client_options, ensure_topics, start_producer

    kafka = KafkaSettings(
        bootstrap_servers=secured.env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"], security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN", sasl_username="portpulse-plain",
        sasl_password=secured.credentials["kafka:portpulse-plain"], ssl_ca_file=secured.pki / "ca.pem",
        topic_prefix=unique, partitions=1, request_timeout_ms=5000,
    )  # fmt: skip
    topic = f"{unique}.readings.air"
    assert await ensure_topics(kafka, [topic]) == [topic]
    producer = await start_producer(kafka, "test producer")
    try:
        sent = await producer.send_and_wait(topic, b"plain-value", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, sent.partition)
        consumer.assign([tp])
        consumer.seek(tp, sent.offset)
        records = (await consumer.getmany(tp, timeout_ms=10_000)).get(tp, [])
    finally:
        await consumer.stop()
    assert [(r.key, r.value) for r in records[:1]] == [(b"k", b"plain-value")]
