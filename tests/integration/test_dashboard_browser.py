"""The live dashboard in real headless Chromium, fed by the real pipeline."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portpulse.app.pipeline import ProcessorOptions
from portpulse.simulators.stream import generate
from tests.integration.pipeline import Publisher
from tests.integration.test_end_to_end import http_get, pipeline_settings, running_pipeline, stream
from tests.services import InfluxEndpoint, KafkaEndpoint, MqttEndpoint

pytestmark = pytest.mark.integration

# Flags that keep Chromium on loopback and quiet: no sync, updates, pings or field trials.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-breakpad", "--metrics-recording-only", "--no-pings",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--window-size=1400,1600", "--virtual-time-budget=6000",
]  # fmt: skip
THROUGHPUT_MQTT = (0x4E, 0xA8, 0xDE)  # the "MQTT messages" line: this colour is used nowhere else


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Chromium is missing: `scripts/services tools` installs it (make test runs it)"
    return exe


def browse(url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={out}/profile", *args, url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def test_dashboard_renders_live_charts_tables_and_alerts(
    mqtt: MqttEndpoint, kafka: KafkaEndpoint, influx: InfluxEndpoint, influx_bucket: str, unique: str, tmp_path: Path
) -> None:
    from PIL import Image

    config = stream(unique, sensors=30, seconds=60, faults={"malformed": 0.01})
    messages = [(m.topic, m.payload) for b in generate(config) for m in b.messages]
    ts_ms = json.loads(messages[-1][1])["ts"]
    alerts = [
        (f"{unique}/{where}", json.dumps({"ts": ts_ms, "metrics": reading}).encode())
        for where, reading in (
            ("air/quai-de-l-europe/aq-alert", {"no2": 260.0}),
            ("crane/port-2000-tnmsc/sts-alert", {"wind_speed": 24.5}),
        )
    ]
    settings = pipeline_settings(mqtt, kafka, influx, influx_bucket, unique)
    async with running_pipeline(settings, ProcessorOptions("1m", lateness_s=2, idle_timeout_s=2)) as base:
        with Publisher(mqtt, f"{unique}-sim") as publisher:
            # Three paced rounds, so the throughput chart has a shape, then the alerting readings.
            third = len(messages) // 3
            for i in range(3):
                await asyncio.to_thread(publisher.publish, messages[i * third : (i + 1) * third], 1)
                await asyncio.sleep(1.5)
            await asyncio.to_thread(publisher.publish, messages[3 * third :] + alerts, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        state: dict[str, Any] = {}
        while loop.time() < deadline:
            state = json.loads((await asyncio.to_thread(http_get, f"{base}/api/state"))[1] or b"{}")
            if state and set(state["latest"]) == {"air", "crane", "cell"} and len(state["alerts"]) >= 2:
                break
            await asyncio.sleep(0.5)
        assert len(state["alerts"]) >= 2, state.get("alerts")

        dom = (await asyncio.to_thread(browse, f"{base}/", tmp_path, "--dump-dom")).stdout
        shot = tmp_path / "dashboard.png"
        result = await asyncio.to_thread(browse, f"{base}/", tmp_path, f"--screenshot={shot}")
        assert shot.is_file(), result.stderr[-2000:]

    # The page loaded its state and filled the tables, badges and alerts.
    assert 'data-loaded="true"' in dom
    for text in ('data-domain="air"', 'data-domain="crane"', 'data-domain="cell"', "aq-00000", "sts-00000",
                 "gnb-00000", 'data-check="kafka"', 'data-check="influx"', 'data-check="mqtt"',
                 "NO2 above the EU hourly limit value", "wind stop", "aq-alert", "sts-alert"):  # fmt: skip
        assert text in dom, text
    points = [int(p) for p in re.findall(r'<canvas id="throughput"[^>]*data-points="(\d+)"', dom)]
    assert points and points[0] > 4, "the throughput chart drew no series"

    # The screenshot shows the MQTT throughput line, and it is not flat: data, not an empty axis.
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    near = np.abs(pixels - np.array(THROUGHPUT_MQTT)).sum(axis=2) < 60
    ys, xs = np.nonzero(near)
    assert near.sum() > 300, f"only {near.sum()} pixels of the throughput line"
    assert ys.max() - ys.min() > 20 and xs.max() - xs.min() > 200, "the throughput line is flat or tiny"
