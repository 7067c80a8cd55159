"""Ops surface without network: health logic, routes, live state, latest values and alerts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from portpulse.app.ops import LatestValues, LiveView, OpsServer, metric_totals
from portpulse.app.top import render
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.health import Health, Probe
from portpulse.contract.points import Categorical, PointColumns


def _probe(result: tuple[bool, str]) -> Probe:
    async def probe() -> tuple[bool, str]:
        return result

    return probe


async def test_health_is_red_when_a_dependency_fails_and_ready_needs_every_stage() -> None:
    health = Health(timeout_s=0.1)
    health.add("kafka", _probe((True, "answers")))
    health.add("influx", _probe((False, "connection refused")))

    async def hangs() -> tuple[bool, str]:
        await asyncio.sleep(10)
        return True, ""

    health.add("mqtt", hangs)
    health.stage("bridge", True)
    await health.probe_once()
    snap = health.snapshot()
    assert not snap["healthy"] and not snap["ready"]
    assert snap["checks"]["influx"] == {**snap["checks"]["influx"], "ok": False, "detail": "connection refused"}
    assert snap["checks"]["mqtt"]["detail"] == "no answer within 0.1s"

    healthy = Health()
    healthy.add("kafka", _probe((True, "answers")))
    await healthy.probe_once()
    assert healthy.healthy and not healthy.ready  # no stage registered yet
    healthy.stage("processor", False)
    assert not healthy.ready
    healthy.stage("processor", True)
    assert healthy.ready


async def test_routes_answer_with_status_codes_and_content() -> None:
    registry = CollectorRegistry()
    Counter("portpulse_test_things", "things", registry=registry).inc(3)
    health = Health()
    health.add("kafka", _probe((False, "down")))
    await health.probe_once()
    server = OpsServer(LiveView(health, registry=registry), "127.0.0.1", 0, registry=registry)
    status, ctype, body = server.route("/metrics")
    assert status == 200 and ctype.startswith("text/plain") and b"portpulse_test_things_total 3.0" in body
    assert server.route("/healthz")[0] == 503 and server.route("/readyz")[0] == 503
    assert server.route("/livez")[0] == 200
    assert json.loads(server.route("/healthz")[2])["checks"]["kafka"]["detail"] == "down"
    assert server.route("/nope")[0] == 404
    status, ctype, body = server.route("/")
    assert status == 200 and ctype.startswith("text/html") and b'<canvas id="throughput">' in body


async def test_ops_server_speaks_http_on_loopback() -> None:
    health = Health()
    health.add("kafka", _probe((True, "ok")))
    await health.probe_once()
    health.stage("bridge", True)
    async with OpsServer(LiveView(health), "127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /metrics HTTP/1.1\r\n\r\n")
        refused = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200 OK") and b'"ready": true' in response
    assert refused.startswith(b"HTTP/1.1 405")


def test_live_view_turns_counters_into_rates_and_keeps_levels() -> None:
    registry = CollectorRegistry()
    messages = Counter("portpulse_ingest_messages_received", "m", registry=registry)
    lag = Gauge("portpulse_processor_consumer_lag", "l", ["topic", "partition"], registry=registry)
    view = LiveView(Health(), registry=registry, history=3)
    view.sample(now=100.0)
    messages.inc(500)
    lag.labels("a", "0").set(7)
    lag.labels("a", "1").set(5)
    view.sample(now=102.0)
    state = view.state()
    assert state["series"]["mqtt_messages"] == [250.0]  # 500 in 2 s
    assert state["series"]["consumer_lag"] == [12.0]  # summed over partitions
    assert state["totals"]["mqtt_messages"] == 500.0
    messages.inc(25)  # after the sample: /api/state's totals wait for the next one, /api/totals does not
    assert view.state()["totals"]["mqtt_messages"] == 500.0
    server = OpsServer(view, "127.0.0.1", 0, registry=registry)
    live = json.loads(server.route("/api/totals")[2])
    assert live["mqtt_messages"] == 525.0 and live["consumer_lag"] == 12.0 and live["kafka_readings"] == 0.0
    for t in (103.0, 104.0, 105.0):
        view.sample(now=t)
    assert view.state()["t"] == [103.0, 104.0, 105.0]  # bounded history
    assert metric_totals(registry)["portpulse_ingest_messages_received_total"] == 525.0
    assert view.state()["dead_letters"] == []
    dlq = Counter("portpulse_ingest_dlq", "d", ["reason"], registry=registry)
    dlq.labels("malformed_json").inc(2)
    dlq.labels("rate_limit").inc(7)
    dlq.labels("bad_topic")  # never incremented: not listed
    assert view.state()["dead_letters"] == [
        {"reason": "rate_limit", "count": 7, "command": "portpulse dlq show --reason rate_limit"},
        {"reason": "malformed_json", "count": 2, "command": "portpulse dlq show --reason malformed_json"},
    ]


def test_latest_values_keep_the_newest_per_series_and_raise_catalogue_alerts() -> None:
    latest = LatestValues(load_catalogue())
    sensors = Categorical(np.array([0, 1, 0, 1], dtype=np.int64), np.array(["aq-1", "aq-2"], dtype=object))
    sites = Categorical(np.array([0, 0, 0, 0], dtype=np.int64), np.array(["quai"], dtype=object))
    ts = np.array([3, 1, 1, 2], dtype=np.int64) * 10**9
    latest.offer(PointColumns("air", {"sensor_id": sensors, "site": sites}, {"no2": np.array([250.0, 30, 40, 35])}, ts))
    # An older point arriving later does not replace a newer one.
    latest.offer(PointColumns("air", {"sensor_id": sensors, "site": sites}, {"no2": np.array([1.0] * 4)}, ts - 10**9))
    tables, alerts = latest.snapshot(now_ns=5 * 10**9)
    rows = {(r["sensor_id"], r["metric"]): r for r in tables["air"]}
    assert rows[("aq-1", "no2")]["value"] == 250.0 and rows[("aq-2", "no2")]["value"] == 35.0
    assert rows[("aq-1", "no2")]["age_s"] == 2.0 and rows[("aq-1", "no2")]["unit"] == "µg/m³"
    assert [(a["sensor_id"], a["threshold"]) for a in alerts] == [("aq-1", 200.0)]
    assert "EU hourly limit" in alerts[0]["alert"]


def test_top_renders_a_state_document() -> None:
    from rich.console import Console

    health = Health()
    health.stage("bridge", True)
    state = LiveView(health).state()
    state["latest"] = {"crane": [{"sensor_id": "sts-1", "site": "quai", "metric": "wind_speed", "value": 24.5,
                                  "unit": "m/s", "age_s": 1.0}]}  # fmt: skip
    state["alerts"] = [{**state["latest"]["crane"][0], "domain": "crane", "alert": "wind stop", "threshold": 20.0}]
    console = Console(record=True, width=120)
    console.print(render(state, "http://127.0.0.1:9464"))
    text = console.export_text()
    assert "MQTT messages in" in text and "sts-1" in text and "wind stop" in text and "24.5 m/s" in text


def test_notices_reach_alerts_and_warnings_without_making_the_process_unhealthy() -> None:
    from rich.console import Console

    from portpulse.contract.schema import ReadingColumns, str_array
    from portpulse.contract.settings import AdmissionSettings
    from portpulse.ingest.admission import Admission
    from portpulse.ingest.bridge import admission_alerts
    from portpulse.ingest.records import SeriesCodes

    gate = Admission(AdmissionSettings(site_new_per_hour=2, site_rate_per_s=0))
    n = 5
    air, site, ids = str_array(["air"] * n), str_array(["gw-7"] * n), str_array([f"rogue-{i}" for i in range(n)])
    readings = ReadingColumns(ids, site, air, str_array(["no2"] * n), np.zeros(n, np.int64), np.zeros(n),
                              np.zeros(n, np.uint8))  # fmt: skip
    gate.admit(SeriesCodes.of(readings), time.time())
    health = Health()
    health.stage("bridge", True)
    health.add_notices("admission", lambda: admission_alerts(gate))
    state = LiveView(health).state()
    assert state["health"]["ready"]  # a gate doing its job is not a fault
    assert state["health"]["warnings"] == {
        "admission": ["air/gw-7: cardinality_limit x3 readings (e.g. rogue-2, rogue-3, rogue-4)"]
    }
    (alert,) = state["alerts"]
    assert (alert["site"], alert["value"], alert["unit"]) == ("gw-7", 3, "readings refused")
    console = Console(record=True, width=160)
    console.print(render(state, "http://127.0.0.1:9464"))
    assert "air/gw-7: cardinality_limit x3" in console.export_text()


def test_a_token_is_taken_as_bearer_or_as_the_basic_auth_password() -> None:
    import base64

    from portpulse.app.ops import authorized

    basic = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    assert authorized("Bearer s3cret", "s3cret") and authorized(basic, "s3cret") and authorized(None, None)
    wrong_basic = "Basic " + base64.b64encode(b"s3cret:nope").decode()  # the user name is not the token
    for header in (None, "", "Bearer s3cre", "Bearer s3cret2", wrong_basic, "Basic !!!", "Token s3cret"):
        assert not authorized(header, "s3cret"), header


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (signing itself) and its key."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"), "-out",
         str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return tmp_path / "cert.pem", tmp_path / "key.pem"


async def test_with_a_token_only_liveness_and_readiness_are_open(self_signed: tuple[Path, Path]) -> None:
    health = Health()
    health.add("kafka", _probe((True, "ok")))
    await health.probe_once()
    health.stage("bridge", True)
    cert, key = self_signed
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(cert), str(key))
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def get(port: int, path: str, authorization: str = "") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
        extra = f"Authorization: {authorization}\r\n" if authorization else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        response = await reader.read()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            await writer.wait_closed()
        return response

    async with OpsServer(LiveView(health), "127.0.0.1", 0, token="s3cret", tls=server_tls) as server:
        assert (await get(server.port, "/readyz")).startswith(b"HTTP/1.1 200")
        assert (await get(server.port, "/livez")).startswith(b"HTTP/1.1 200")
        for path in ("/", "/metrics", "/healthz", "/api/state", "/api/totals"):
            refused = await get(server.port, path)
            assert refused.startswith(b"HTTP/1.1 401") and b'WWW-Authenticate: Basic realm="PortPulse"' in refused
            assert (await get(server.port, path, "Bearer s3cret")).startswith(b"HTTP/1.1 200"), path


def test_a_first_signal_asks_for_a_drain_and_a_second_stops_without_it() -> None:
    """``main`` stands for a drain that never ends (InfluxDB away): the first SIGTERM sets its
    stop event, the second ends the run with KeyboardInterrupt (exit 130 from the CLI)."""
    import os
    import signal

    from portpulse.app.runtime import run_until_signal

    seen: list[str] = []

    async def main(stop: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
        seen.append("stop set")
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)  # the drain that does not finish
        seen.append("drained")
        return "drained"

    with pytest.raises(KeyboardInterrupt):
        run_until_signal(main)
    assert seen == ["stop set"]  # the drain was cut short, not completed


@pytest.mark.parametrize(
    ("chosen", "applied", "numpy_advises"), [(None, True, False), ("1", False, True), ("0", True, False)]
)
def test_pipeline_commands_turn_numpys_huge_page_advice_off_unless_the_user_chose(
    chosen: str | None, applied: bool, numpy_advises: bool
) -> None:
    """In a fresh interpreter (numpy reads ``NUMPY_MADVISE_HUGEPAGE`` once, at import): numpy's
    advice is off afterwards, or as the user's variable set it."""
    import os
    import sys

    code = (
        "from numpy._core import multiarray\n"
        "from portpulse.app.runtime import small_pages_for_arrays\n"
        "applied = small_pages_for_arrays()\n"
        "print(applied, multiarray._set_madvise_hugepage(False))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if chosen is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = chosen
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == [str(applied), str(numpy_advises)]
