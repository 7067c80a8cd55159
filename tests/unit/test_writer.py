"""The InfluxDB writer with a fake transport at its seam (no network): a server that refuses any
body holding a poison line (as InfluxDB refuses a whole request for one bad point), and one that
is away for a while. What it stores is parsed from the bodies it accepted."""

from __future__ import annotations

import asyncio
import random

import numpy as np
from pydantic import SecretStr

from portpulse.contract.deadletter import MemoryDeadLetters
from portpulse.contract.points import PointColumns
from portpulse.contract.settings import InfluxSettings, SinkSettings
from portpulse.sinks.writer import InfluxWriter, WriteResult

INFLUX = InfluxSettings(url="http://127.0.0.1:1", token=SecretStr("u:p"), org="o", bucket="b/rp")
T0 = 1_764_000_000 * 10**9


class FakeInflux:
    """Stores the lines of accepted bodies; refuses a body (400) holding a line with ``poison``;
    answers 503 (``Retry-After: 0``) to the first ``away`` requests."""

    def __init__(self, poison: str = "poison", away: int = 0) -> None:
        self.poison = poison
        self.away = away
        self.requests: list[int] = []  # lines per request
        self.stored: list[str] = []

    async def write(self, body: bytes, precision: str) -> WriteResult:
        lines = body.decode().splitlines()
        self.requests.append(len(lines))
        await asyncio.sleep(0)
        if self.away > 0:
            self.away -= 1
            return WriteResult(503, "service unavailable", retry_after_s=0.0)
        if any(self.poison in line for line in lines):
            return WriteResult(400, 'partial write: field type conflict: input field "no2" is type string')
        self.stored += lines
        return WriteResult(204)

    async def close(self) -> None:
        pass


def points(sensors: list[str]) -> PointColumns:
    n = len(sensors)
    return PointColumns(
        "air",
        {"sensor_id": np.array(sensors, dtype=object), "site": np.array(["quai"] * n, dtype=object)},
        {"no2": np.arange(n, dtype=np.float64)},
        T0 + np.arange(n, dtype=np.int64),
    )


def sink(batch_lines: int = 50_000) -> SinkSettings:
    return SinkSettings(batch_lines=batch_lines, retry_initial_s=0.001, retry_max_s=0.002, concurrency=1)


async def test_a_refused_batch_is_bisected_until_only_the_poison_lines_are_dead_lettered() -> None:
    sensors = [f"s{i}" for i in range(1024)]
    for bad in (5, 500, 501):
        sensors[bad] = f"poison{bad}"
    server, letters = FakeInflux(), MemoryDeadLetters()
    async with InfluxWriter(INFLUX, sink(), letters, transport=server, rng=random.Random(1)) as writer:
        ticket = await writer.write(points(sensors))
        await writer.flush()
        assert ticket.done()
    good = [s for s in sensors if not s.startswith("poison")]
    assert sorted(line.split(",")[1].split("=")[1] for line in server.stored) == sorted(good)
    assert len(server.stored) == len(set(server.stored)) == 1021  # each good point stored once
    assert sorted(letter.payload.decode().split(",")[1] for letter in letters.letters) == [
        "sensor_id=poison5", "sensor_id=poison500", "sensor_id=poison501"
    ]  # fmt: skip
    assert {letter.reason for letter in letters.letters} == {"influx_rejected"}
    assert all("field type conflict" in letter.detail for letter in letters.letters)
    # Bisection, not line-by-line: each poison line costs about two requests per halving.
    assert len(server.requests) <= 1 + 3 * 2 * 10
    assert server.requests[0] == 1024


async def test_while_the_server_is_away_the_writer_retries_and_stores_every_point_once() -> None:
    server, letters = FakeInflux(away=3), MemoryDeadLetters()
    async with InfluxWriter(INFLUX, sink(batch_lines=100), letters, transport=server) as writer:
        ticket = await writer.write(points([f"s{i}" for i in range(250)]))
        await writer.flush()
        assert ticket.done() and writer.healthy
    assert len(server.stored) == len(set(server.stored)) == 250
    assert letters.letters == []
    assert server.requests[:4] == [100] * 4  # the first batch three times refused, then stored
    assert sum(server.requests) == 250 + 3 * 100


async def test_backpressure_holds_the_caller_while_the_queue_is_full() -> None:
    """With the server away, ``write`` returns only while queue space lasts: the caller waits."""
    server, letters = FakeInflux(away=10**9), MemoryDeadLetters()
    settings = SinkSettings(batch_lines=10, max_pending_batches=2, concurrency=1, retry_initial_s=0.001,
                            retry_max_s=0.002)  # fmt: skip
    async with InfluxWriter(INFLUX, settings, letters, transport=server) as writer:
        handed = 0

        async def producer() -> None:
            nonlocal handed
            for i in range(20):
                await writer.write(points([f"s{i}-{k}" for k in range(10)]))
                handed += 1

        task = asyncio.create_task(producer())
        for _ in range(200):
            await asyncio.sleep(0.001)
        assert handed <= 4  # one being sent, two queued, one waiting for space
        assert not writer.healthy
        server.away = 0
        await asyncio.wait_for(task, 10)
        await writer.flush()
    assert len(server.stored) == 200 and handed == 20


async def test_a_refused_line_of_several_fields_dead_letters_only_the_refused_field() -> None:
    n = 8
    poison = np.full(n, np.nan)
    poison[3] = 7.0
    columns = PointColumns(
        "air",
        {"sensor_id": np.array([f"s{i}" for i in range(n)], dtype=object), "site": np.array(["q"] * n, dtype=object)},
        {"no2": np.arange(n, dtype=np.float64), "o3": np.arange(n, dtype=np.float64) + 0.5, "poison": poison},
        T0 + np.arange(n, dtype=np.int64),
    )
    server, letters = FakeInflux(), MemoryDeadLetters()
    async with InfluxWriter(INFLUX, sink(), letters, transport=server, rng=random.Random(1)) as writer:
        ticket = await writer.write(columns)
        await writer.flush()
        assert ticket.done()
    stored = {(line.split(",")[1], line.split(" ")[1]) for line in server.stored}
    assert ("sensor_id=s3", "no2=3") in stored and ("sensor_id=s3", "o3=3.5") in stored
    assert ("sensor_id=s2", "no2=2,o3=2.5") in stored  # the others stay one line each
    assert len(server.stored) == 7 + 2
    assert [letter.payload for letter in letters.letters] == [f"air,sensor_id=s3,site=q poison=7 {T0 + 3}\n".encode()]


class SlowInflux(FakeInflux):
    """Times out on any request of more than ``most`` lines (as InfluxDB does on one it cannot
    finish within the client's timeout)."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most

    async def write(self, body: bytes, precision: str) -> WriteResult:
        if body.count(b"\n") > self.most:
            self.requests.append(body.count(b"\n"))
            return WriteResult(0, "TimeoutError: ")
        return await super().write(body, precision)


async def test_a_request_that_times_out_is_split_until_its_halves_get_through() -> None:
    server, letters = SlowInflux(most=1500), MemoryDeadLetters()
    async with InfluxWriter(INFLUX, sink(), letters, transport=server) as writer:
        ticket = await writer.write(points([f"s{i}" for i in range(5000)]))
        await writer.flush()
        assert ticket.done() and writer.healthy
    assert len(server.stored) == len(set(server.stored)) == 5000
    assert server.requests == [5000, 2500, 1250, 1250, 2500, 1250, 1250]  # halves, each half retried whole first
    assert letters.letters == []


async def test_a_request_closes_at_batch_values_when_lines_hold_several_fields() -> None:
    n = 1000
    columns = PointColumns(
        "air",
        {"sensor_id": np.array([f"s{i}" for i in range(n)], dtype=object)},
        {name: np.full(n, 1.5) for name in ("no2", "pm25", "pm10", "o3", "so2", "temperature", "humidity")},
        T0 + np.arange(n, dtype=np.int64),
    )
    server = FakeInflux()
    settings = SinkSettings(batch_lines=50_000, batch_values=700, concurrency=1)
    async with InfluxWriter(INFLUX, settings, MemoryDeadLetters(), transport=server) as writer:
        await writer.write(columns)
        await writer.flush()
    assert server.requests == [100] * 10  # 700 values: 100 lines of 7 fields
    assert len(set(server.stored)) == n
