"""The deployment files agree with the code: Grafana dashboards, datasources, compose wiring, Dockerfile."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path
from types import ModuleType

import yaml

from portpulse.contract.catalogue import load_catalogue
from portpulse.ingest.metrics import INGEST_METRICS
from portpulse.processors.metrics import PROCESSOR_METRICS
from portpulse.sinks.metrics import SINK_METRICS

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
WINDOW_STATS = {"count", "rejected", "mean", "min", "max", "last", "stddev", "p95"}


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    for metrics in (INGEST_METRICS, PROCESSOR_METRICS, SINK_METRICS):
        for name in dir(type(metrics)):
            if not name.startswith("_"):
                getattr(metrics, name)  # create every (lazily registered) metric
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("portpulse_")
        for suffix in suffixes.get(family.type, ("",))
    }


def test_checked_in_dashboards_are_the_generated_ones() -> None:
    rendered = _builder().render()
    on_disk = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == rendered, "run: python deploy/grafana/build_dashboards.py"
    assert set(rendered) == {"air-quality.json", "cranes.json", "cells.json", "pipeline-health.json"}


def test_every_panel_queries_something_portpulse_writes_or_exports() -> None:
    catalogue = load_catalogue()
    exported = _exported_metric_names()
    panels = 0
    for text in _builder().render().values():
        for panel in json.loads(text)["panels"]:
            for target in panel["targets"]:
                panels += 1
                if "query" in target:  # Flux on an aggregate measurement
                    measurement, field = re.search(
                        r'_measurement == "(\w+)" and r._field == "(\w+)"', target["query"]
                    ).groups()  # type: ignore[union-attr]
                    domain, _, window = measurement.partition("_")
                    metric, _, stat = field.rpartition("_")
                    assert window and catalogue.get(domain, metric) is not None and stat in WINDOW_STATS, field
                else:  # PromQL on our metrics
                    names = re.findall(r"portpulse_\w+", target["expr"])
                    assert names and set(names) <= exported, (target["expr"], set(names) - exported)
    assert panels >= 16


def test_grafana_datasources_match_the_dashboards_and_compose() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "portpulse.yaml").read_text())["datasources"]
    uids = {s["uid"]: s for s in sources}
    for text in _builder().render().values():
        for panel in json.loads(text)["panels"]:
            assert panel["datasource"]["uid"] in uids
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    influx_env = compose["services"]["influxdb"]["environment"]
    influx = uids["portpulse-influx"]
    assert influx["jsonData"]["organization"] == influx_env["DOCKER_INFLUXDB_INIT_ORG"]
    assert influx["jsonData"]["defaultBucket"] == influx_env["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert influx["secureJsonData"]["token"] == influx_env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    for source in sources:
        host = re.match(r"https?://([\w-]+):", source["url"]).group(1)  # type: ignore[union-attr]
        assert host in compose["services"], source["url"]


def test_compose_pipeline_is_wired_to_the_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pipeline", "simulator", "prometheus", "grafana"} <= set(services)
    env = services["pipeline"]["environment"]
    assert env["PORTPULSE_MQTT__HOST"] in services
    kafka_host = env["PORTPULSE_KAFKA__BOOTSTRAP_SERVERS"]
    assert kafka_host in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert services["pipeline"]["command"][0] == "run"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["pipeline:9464"]
    for volume in services["grafana"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).is_dir(), volume


def test_dockerfile_copies_every_package() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = ["portpulse", *setuptools["package-dir"].values()]
    assert len(folders) == 5
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in folders:
        assert f"COPY {name} ./{name}" in dockerfile, name
