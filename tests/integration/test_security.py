"""MQTT username/password against a real Mosquitto with a password file, and secrets kept out of
logs, metrics, error messages and ``portpulse config``."""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from portpulse.app.cli import main as cli_main
from portpulse.contract.errors import ConfigError
from portpulse.ingest.bridge import run_bridge
from tests.integration.pipeline import bridge_settings
from tests.services import KafkaEndpoint, MqttEndpoint, free_port, wait_for

pytestmark = pytest.mark.integration

USER, SECRET = "gateway-7", "s3cret-Do-Not-Log-4711"


@pytest.fixture
def secured_mqtt(tmp_path: Path) -> Iterator[tuple[MqttEndpoint, Path]]:
    """A private Mosquitto on loopback that only lets USER/SECRET in; yields it and its log."""
    broker = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    assert Path(broker).exists() and Path(passwd).exists(), "scripts/services installs mosquitto"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), USER, SECRET], check=True, capture_output=True)
    port = free_port()
    log = tmp_path / "mosquitto.log"
    (tmp_path / "mosquitto.conf").write_text(
        # "user": run as us (as root, mosquitto would switch to a user that cannot write tmp_path)
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {tmp_path / 'passwd'}\n"
        f"log_dest file {log}\nlog_type all\npersistence false\n"
    )
    proc = subprocess.Popen([broker, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: log.exists() and "running" in log.read_text(), 30, what="mosquitto with a password file")
        yield MqttEndpoint("127.0.0.1", port), log
    finally:
        proc.terminate()
        proc.wait(30)


async def test_right_credentials_connect_and_wrong_ones_fail_once_with_a_clear_error(
    secured_mqtt: tuple[MqttEndpoint, Path], kafka: KafkaEndpoint, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    mqtt, log = secured_mqtt
    caplog.set_level(logging.DEBUG)
    good = bridge_settings(mqtt, kafka, unique, mqtt_extra={"username": USER, "password": SECRET})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_bridge(good, stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    stop.set()
    await asyncio.wait_for(task, 60)

    bad = bridge_settings(mqtt, kafka, unique, client_id=f"{unique}-intruder",
                          mqtt_extra={"username": USER, "password": "wrong-" + SECRET})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ConfigError) as failure:
        await run_bridge(bad, asyncio.Event())
    assert time.monotonic() - started < 10  # fails fast: no waiting out the connect timeout
    message = str(failure.value)
    assert f"refused user '{USER}'" in message and "mqtt.password" in message
    await asyncio.sleep(2.5)  # longer than paho's reconnect delay: a storm would show in the log now
    attempts = log.read_text().count("not authorised")  # mosquitto logs each refused CONNECT once
    assert attempts == 1, f"{attempts} refused connection attempts: a retry storm"

    # The secret appears nowhere: not in logs, error messages or metrics.
    everything = caplog.text + message + generate_latest(REGISTRY).decode()
    assert SECRET not in everything


def test_cli_masks_secrets_and_never_prints_them_in_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PORTPULSE_MQTT__PASSWORD", "PORTPULSE_KAFKA__SASL_PASSWORD"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("PORTPULSE_INFLUX__TOKEN", f"admin:{SECRET}")
    assert cli_main(["config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and out.count("**********") >= 3
    # An invalid setting next to the secrets: exit 2, the field named, no secret echoed.
    monkeypatch.setenv("PORTPULSE_INFLUX__URL", "ftp://influx")
    assert cli_main(["config"]) == 2
    captured = capsys.readouterr()
    assert "influx.url" in captured.err and SECRET not in captured.err + captured.out
    # A wrong secret in a command that uses it: the error names the problem, not the value.
    monkeypatch.delenv("PORTPULSE_INFLUX__URL")
    monkeypatch.setenv("PORTPULSE_INFLUX__URL", "http://127.0.0.1:1")
    assert cli_main(["query", "--domain", "air", "--metric", "no2"]) == 1
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out
