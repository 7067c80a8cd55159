"""Shared fixtures: real services (session scope), unique names per test, and leak guards."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.services import (
    InfluxEndpoint,
    KafkaEndpoint,
    MqttEndpoint,
    influx_endpoint,
    kafka_endpoint,
    mqtt_endpoint,
)

THREAD_GRACE_S = 10.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (e.g. a paho loop or a writer never stopped)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        pytest.fail(f"test left threads running: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
async def no_leaked_tasks(no_leaked_threads: None) -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks pending on its loop; then join the loop's default
    executor (``asyncio.to_thread`` workers, aiokafka's name lookups), whose idle threads would
    otherwise count as leaked. It requests ``no_leaked_threads`` so that the thread check is torn
    down after this join (async fixtures are otherwise finalised after the sync ones)."""
    yield
    me = asyncio.current_task()
    deadline = time.monotonic() + THREAD_GRACE_S
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        pending = [t for t in pending if not t.done()]
    if pending:
        for task in pending:
            task.cancel()
        pytest.fail(f"test left asyncio tasks pending: {[t.get_coro() for t in pending]}")
    await asyncio.get_running_loop().shutdown_default_executor()


@pytest.fixture
def unique() -> str:
    """A short name no other test uses: prefix topics, groups, client ids and databases with it."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def mqtt() -> Iterator[MqttEndpoint]:
    with mqtt_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaEndpoint]:
    with kafka_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def influx() -> Iterator[InfluxEndpoint]:
    with influx_endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def influx_bucket(influx: InfluxEndpoint, unique: str) -> Iterator[str]:
    """A fresh, empty bucket for one test (a database ``{unique}/autogen`` on 1.8); dropped afterwards,
    with the retention tiers' buckets on 2.x."""
    from influxdb_client import InfluxDBClient

    with InfluxDBClient(url=influx.url, token=influx.token, org=influx.org) as client:
        if influx.major == "1":
            client.api_client.call_api(
                "/query", "POST", query_params=[("q", f'CREATE DATABASE "{unique}"')], _return_http_data_only=True
            )
            yield f"{unique}/autogen"
            client.api_client.call_api(
                "/query", "POST", query_params=[("q", f'DROP DATABASE "{unique}"')], _return_http_data_only=True
            )
        else:
            client.buckets_api().create_bucket(bucket_name=unique, org=influx.org)
            yield unique
            # with the tiers' buckets ({unique}_{window}) the pipeline made
            for bucket in client.buckets_api().find_buckets_iter():
                if bucket.name == unique or bucket.name.startswith(f"{unique}_"):
                    client.buckets_api().delete_bucket(bucket)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's report: loss and redelivered duplicates per scenario."""
    import sys

    module = sys.modules.get("tests.integration.test_faults")
    lines = getattr(module, "FAULT_REPORT", [])
    if lines:
        terminalreporter.section("fault suite report")
        terminalreporter.write_line(
            "| scenario | messages the broker acknowledged | readings PortPulse acknowledged | lost | "
            "duplicates in Kafka | lost by the broker |"
        )
        terminalreporter.write_line("|---|---:|---:|---:|---:|---:|")
        for line in lines:
            terminalreporter.write_line(line)
    cardinality = getattr(sys.modules.get("tests.integration.test_cardinality"), "CARDINALITY_REPORT", [])
    if cardinality:
        terminalreporter.section("cardinality budget")
        for line in cardinality:
            terminalreporter.write_line(line)
    matrix = getattr(sys.modules.get("tests.integration.test_interop"), "MATRIX_REPORT", [])
    if matrix:
        terminalreporter.section("broker interop matrix")
        for line in sorted(matrix):
            terminalreporter.write_line(line)
