"""Generate PortPulse's Grafana dashboards (JSON) from one description: ``python deploy/grafana/build_dashboards.py``.

The checked-in JSON must equal this script's output (a unit test checks it), so the panels and
the data model cannot drift apart: every Flux panel queries ``{domain}_{window}`` fields of the
metric catalogue, every Prometheus panel a metric PortPulse exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
INFLUX = {"type": "influxdb", "uid": "portpulse-influx"}
PROMETHEUS = {"type": "prometheus", "uid": "portpulse-prometheus"}
BUCKET = "portpulse"


def flux_panel(title: str, domain: str, field: str, unit: str, window: str = "1m", fn: str = "mean") -> dict[str, Any]:
    """Per-site series of one aggregate field from ``{domain}_{window}``."""
    query = (
        f'from(bucket: "{BUCKET}")\n'
        "  |> range(start: v.timeRangeStart, stop: v.timeRangeStop)\n"
        f'  |> filter(fn: (r) => r._measurement == "{domain}_{window}" and r._field == "{field}")\n'
        '  |> group(columns: ["site"])\n'
        f"  |> aggregateWindow(every: v.windowPeriod, fn: {fn}, createEmpty: false)"
    )
    return {
        "type": "timeseries",
        "title": title,
        "datasource": INFLUX,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "datasource": INFLUX, "query": query}],
    }


def prom_panel(title: str, exprs: dict[str, str], unit: str) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": PROMETHEUS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(exprs.items())
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {
        "uid": uid,
        "title": title,
        "tags": ["portpulse"],
        "timezone": "browser",
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
    }


DASHBOARDS = {
    "air-quality": dashboard("portpulse-air", "PortPulse · Air quality", [
        flux_panel("NO2 per site (1-min mean; EU hourly limit 200)", "air", "no2_mean", "conµgm3"),
        flux_panel("PM2.5 per site (1-min mean)", "air", "pm25_mean", "conµgm3"),
        flux_panel("PM10 per site (1-min mean)", "air", "pm10_mean", "conµgm3"),
        flux_panel("SO2 per site (ship plumes, 1-min max)", "air", "so2_max", "conµgm3", fn="max"),
    ]),
    "cranes": dashboard("portpulse-cranes", "PortPulse · Ship-to-shore cranes", [
        flux_panel("Wind at boom (1-min max; stop above 20 m/s)", "crane", "wind_speed_max", "velocityms", fn="max"),
        flux_panel("Hoist load (1-min max)", "crane", "hoist_load_max", "masst", fn="max"),
        flux_panel("Hoist motor temperature (1-min mean)", "crane", "motor_temperature_mean", "celsius"),
        flux_panel("Readings rejected by cleaning (per minute)", "crane", "wind_speed_rejected", "short", fn="sum"),
    ]),
    "cells": dashboard("portpulse-cells", "PortPulse · 5G cells", [
        flux_panel("Connected UEs per site (1-min mean)", "cell", "connected_ues_mean", "short"),
        flux_panel("Downlink throughput (1-min mean)", "cell", "dl_throughput_mean", "Mbits"),
        flux_panel("Latency to the core (1-min p95)", "cell", "latency_p95", "ms", fn="max"),
        flux_panel("SINR (1-min mean)", "cell", "sinr_mean", "dB"),
    ]),
    "pipeline-health": dashboard("portpulse-pipeline", "PortPulse · Pipeline health", [
        prom_panel("Throughput per stage", {
            "MQTT messages/s": "rate(portpulse_ingest_messages_received_total[1m])",
            "readings to Kafka/s": "rate(portpulse_ingest_readings_produced_total[1m])",
            "readings processed/s": "rate(portpulse_processor_readings_in_total[1m])",
            "points to InfluxDB/s": "rate(portpulse_sink_points_written_total[1m])",
        }, "ops"),
        prom_panel("Lag", {
            "consumer lag (records)": "sum(portpulse_processor_consumer_lag)",
            "event-time lag, median series (s)": "portpulse_processor_event_time_lag_seconds",
            "correction lag p99 (s)":
                "histogram_quantile(0.99, rate(portpulse_processor_correction_seconds_bucket[5m]))",
            "bridge in flight": "portpulse_ingest_in_flight",
        }, "short"),
        prom_panel("Dead letters and rejections per second", {
            "DLQ {{reason}}": "sum by (reason) (rate(portpulse_ingest_dlq_total[5m]))",
            "rejected {{reason}}": "sum by (reason) (rate(portpulse_processor_rejected_total[5m]))",
            "windows corrected": "rate(portpulse_processor_windows_corrected_total[5m])",
            "beyond correction horizon (late)": "rate(portpulse_processor_late_total[5m])",
        }, "ops"),
        prom_panel("Latency (p99)", {
            "Kafka send": "histogram_quantile(0.99, rate(portpulse_ingest_kafka_send_seconds_bucket[5m]))",
            "InfluxDB write": "histogram_quantile(0.99, rate(portpulse_sink_write_seconds_bucket[5m]))",
            "processor batch": "histogram_quantile(0.99, rate(portpulse_processor_batch_seconds_bucket[5m]))",
        }, "s"),
    ]),
}  # fmt: skip


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(body, indent=2, ensure_ascii=False) + "\n" for name, body in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
