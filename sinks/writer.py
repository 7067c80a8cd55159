"""The InfluxDB writer: batching, backpressure, retries and poison isolation.

``await writer.write(points)`` encodes, batches and *waits for queue space* (backpressure: the
caller slows down, nothing is dropped) and returns a :class:`WriteTicket` that completes when
every point is stored in InfluxDB or, if InfluxDB refused it as invalid, in the dead-letter
topic with the server's message. Retriable failures (connection, timeout, 429, 5xx) are retried
forever with exponential backoff and jitter, honouring ``Retry-After``; meanwhile the writer
reports itself unhealthy. A 400/413/422 is bisected until the offending lines are isolated, and a
refused line of several fields is split into one line per field: only the field InfluxDB refused
(a type conflict) is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from portpulse.contract.deadletter import DeadLetter, DeadLetterSink
from portpulse.contract.errors import PortPulseError
from portpulse.contract.points import SeriesRange, StoredReadings
from portpulse.contract.settings import InfluxSettings, SinkSettings
from portpulse.sinks.lineprotocol import (
    LINE_ENCODER,
    Categorical,
    EncodedLines,
    PointColumns,
    encode_lines,
    one_field_per_line,
)
from portpulse.sinks.metrics import SINK_METRICS
from portpulse.sinks.retry import Outcome, backoff_s, classify

__all__ = ["InfluxTransport", "InfluxWriter", "LineTransport", "WriteResult", "WriteTicket", "rejection_reason"]

log = logging.getLogger("portpulse.sink")

#: Sensors per read-back query (see :meth:`InfluxWriter.read`).
READBACK_SENSORS = 100
#: A request that timed out is split in two while it holds at least twice this many lines.
_SPLIT_ON_TIMEOUT_LINES = 500


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What the server said about one request: ``status`` 204 = stored; 0 = no HTTP answer."""

    status: int
    message: str = ""
    retry_after_s: float | None = None


class LineTransport(Protocol):
    """Sends one line-protocol body; never raises for server or network errors, returns them."""

    async def write(self, body: bytes, precision: str) -> WriteResult: ...

    async def close(self) -> None: ...


# aiohttp >= 3.12 warns on every request body over 1 MiB given as bytes ("might lock the event
# loop"); a write batch is a few MB handed to the transport buffer once, which is what we want.
warnings.filterwarnings("ignore", "Sending a large body directly with raw bytes", ResourceWarning)


class InfluxTransport:
    """``influxdb-client``'s async write API (``/api/v2/write``) for InfluxDB 1.8 and 2.x."""

    def __init__(self, influx: InfluxSettings, gzip: bool) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        self._bucket = influx.bucket
        self._client = InfluxDBClientAsync(
            url=influx.url,
            token=influx.token.get_secret_value(),
            org=influx.org,
            timeout=influx.timeout_ms,
            enable_gzip=gzip,
            verify_ssl=influx.verify_ssl,
            ssl_ca_cert=str(influx.ca_file) if influx.ca_file else None,
        )
        self._api = self._client.write_api()

    async def write(self, body: bytes, precision: str) -> WriteResult:
        from influxdb_client.rest import ApiException

        try:
            await self._api.write(bucket=self._bucket, record=body, write_precision=precision)
        except ApiException as exc:
            headers = exc.headers or {}
            retry_after = headers.get("Retry-After") if hasattr(headers, "get") else None
            message = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason)
            return WriteResult(int(exc.status or 0), message, _parse_retry_after(retry_after))
        except (TimeoutError, OSError) as exc:
            return WriteResult(0, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # aiohttp.ClientError and friends: the server is not answering
            return WriteResult(0, f"{type(exc).__name__}: {exc}")
        return WriteResult(204)

    async def close(self) -> None:
        await self._client.close()


def _rfc3339(ts_ns: int) -> str:
    """ns since the epoch as RFC 3339 with all nine digits."""
    seconds, ns = divmod(ts_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns:09d}Z"


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class WriteTicket:
    """Completes when every point of one ``write()`` call is stored or dead-lettered."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.dead_lettered = 0
        self._open = 0
        self._done = asyncio.get_running_loop().create_future()

    def _add(self) -> None:
        self._open += 1

    def _finish(self) -> None:
        self._open -= 1
        if self._open == 0 and not self._done.done():
            self._done.set_result(None)

    def done(self) -> bool:
        return self._done.done()

    async def wait(self) -> None:
        await asyncio.shield(self._done)

    def __await__(self) -> Any:
        return self.wait().__await__()


@dataclass(slots=True)
class _Batch:
    body: bytes
    line_ends: npt.NDArray[np.int64]  # offset just past each line's newline, relative to body
    tickets: list[WriteTicket] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.line_ends)

    def split(self) -> tuple[_Batch, _Batch]:
        half = len(self) // 2
        cut = int(self.line_ends[half - 1])
        return (
            _Batch(self.body[:cut], self.line_ends[:half], source=self.source),
            _Batch(self.body[cut:], self.line_ends[half:] - cut, source=self.source),
        )


@functools.cache
def _announce_line_encoder() -> None:
    """Say once per process which line-protocol encoder runs (and warn when it is not compiled)."""
    log.info("InfluxDB writer: line-protocol encoder %s", LINE_ENCODER)
    if LINE_ENCODER != "compiled":
        log.warning(
            "the line-protocol encoder is not compiled (no C compiler at install time?): writing to InfluxDB "
            "costs about twice the CPU; reinstall with gcc to build it (setup.py)"
        )


class InfluxWriter:
    """Async InfluxDB writer; use as ``async with InfluxWriter(...) as writer``."""

    def __init__(
        self,
        influx: InfluxSettings,
        sink: SinkSettings,
        dead_letters: DeadLetterSink,
        transport: LineTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._influx = influx
        self._sink = sink
        self._dead_letters = dead_letters
        self._transport = transport
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=sink.max_pending_batches)
        self._pending: list[tuple[EncodedLines, int, int, WriteTicket]] = []
        self._pending_lines = 0
        self._pending_values = 0.0
        self._pending_since = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: Any = None  # influxdb-client's async client for read-backs, made on first use
        self._influx_v1 = False  # InfluxDB 1.x: deletes go through InfluxQL
        self._healthy = True
        self._last_error = ""

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> InfluxWriter:
        _announce_line_encoder()
        if self._transport is None:
            self._transport = InfluxTransport(self._influx, self._sink.gzip)
        self._tasks = [
            asyncio.create_task(self._sender(), name=f"influx-sender-{i}") for i in range(self._sink.concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._age_flusher(), name="influx-age-flusher"))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks = []
            if self._transport is not None:
                await self._transport.close()
            if self._reader is not None:
                await self._reader.close()

    # ------------------------------------------------------------ public

    @property
    def healthy(self) -> bool:
        """False while InfluxDB is not accepting writes (the circuit is open)."""
        return self._healthy

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def write(self, points: PointColumns, source: str = "") -> WriteTicket:
        """Hand points to the writer; waits while the queue is full (backpressure)."""
        encoded = encode_lines(points, self._sink.precision)
        ticket = WriteTicket(len(points))
        ticket._add()  # held until this call has queued everything
        if encoded.rejected:
            letters = [
                DeadLetter(
                    payload=_describe_row(points, row).encode(),
                    reason="unencodable_point",
                    source=source or "influx",
                    stage="sink",
                    detail=reason,
                )
                for row, reason in encoded.rejected.items()
            ]
            await self._dead_letters.send(letters)
            ticket.dead_lettered += len(letters)
            SINK_METRICS.rejected.inc(len(letters))
        per_line = _values(points) / max(len(points), 1)
        start = 0
        while start < len(encoded):
            room = min(self._sink.batch_lines - self._pending_lines,
                       math.ceil((self._sink.batch_values - self._pending_values) / per_line))  # fmt: skip
            take = min(len(encoded) - start, max(room, 1))
            if not self._pending:
                self._pending_since = time.monotonic()
            ticket._add()
            self._pending.append((encoded, start, start + take, ticket))
            self._pending_lines += take
            self._pending_values += take * per_line
            start += take
            if self._pending_lines >= self._sink.batch_lines or self._pending_values >= self._sink.batch_values:
                await self._enqueue_pending(source)
        ticket._finish()
        return ticket

    async def flush(self) -> None:
        """Send what is buffered and wait until every handed point is stored or dead-lettered."""
        if self._pending:
            await self._enqueue_pending("")
        await self._queue.join()

    async def read(self, query: SeriesRange) -> StoredReadings:
        """What InfluxDB stores for ``query`` (raw points and rejected readings), for the
        processor's window recomputation. Connection errors, timeouts and 5xx are retried with
        backoff for as long as they last, like writes (a correction must not be dropped; the
        processor commits nothing past it meanwhile), with ``healthy`` false; a refusal (4xx:
        token, bucket, query) raises :class:`PortPulseError` naming it.

        A range over many sensors is read ``READBACK_SENSORS`` at a time: Flux evaluates the
        filter's ``or`` of sensor ids per row, so one query over thousands of sensors (a fleet's
        windows recomputed together) takes longer than any timeout, and retrying it never ends."""
        sensors = query.sensor_ids
        parts = [
            await self._read_range(replace(query, sensor_ids=sensors[i : i + READBACK_SENSORS]))
            for i in range(0, max(len(sensors), 1), READBACK_SENSORS)
        ]
        return StoredReadings.concat(query.domain, parts)

    async def _read_range(self, query: SeriesRange) -> StoredReadings:
        import csv

        from influxdb_client.domain.dialect import Dialect

        from portpulse.sinks.query import parse_readback, readback_flux

        reader = self._query_client()
        flux = readback_flux(self._influx.bucket, query)
        attempt = 0
        while True:
            try:
                text = await reader.query_api().query_raw(flux, dialect=Dialect(header=True, annotations=[]))
                if attempt:  # it had failed: InfluxDB answers again
                    self._healthy = True
                    SINK_METRICS.healthy.set(1)
                return parse_readback(query, list(csv.reader(text.splitlines())))
            except Exception as exc:  # ApiException, aiohttp/socket errors, timeouts
                status = getattr(exc, "status", None)
                if status is not None and 400 <= int(status) < 500:
                    raise PortPulseError(
                        f"InfluxDB refused the processor's read-back (HTTP {status}); check the token and bucket"
                    ) from None
                self._healthy = False
                self._last_error = f"read-back: {type(exc).__name__}"
                SINK_METRICS.healthy.set(0)
                if attempt % 10 == 0:
                    log.warning("InfluxDB read-back failing (%s); retrying", self._last_error)
                await asyncio.sleep(
                    backoff_s(attempt, self._sink.retry_initial_s, self._sink.retry_max_s, self._rng.random())
                )
                attempt += 1

    def _query_client(self) -> Any:
        """influxdb-client's async client for read-backs (made on first use)."""
        if self._reader is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

            self._reader = InfluxDBClientAsync(
                url=self._influx.url, token=self._influx.token.get_secret_value(), org=self._influx.org,
                timeout=self._influx.timeout_ms, verify_ssl=self._influx.ssl_option(),
            )  # fmt: skip
        return self._reader

    async def retract(self, domain: str, metric: str, instants: list[tuple[str, int]]) -> None:
        """Take field ``metric`` out of each (sensor_id, ts_ns) point of measurement ``domain``.
        InfluxDB deletes whole points (by series and time, never by field), so the point's other
        fields are read first and written again after the delete. Rare: only readings rejected
        when a reading before them arrived late."""
        import csv

        from influxdb_client.domain.dialect import Dialect

        from portpulse.sinks.query import flux_time_ns, point_flux

        await self.flush()
        reader = self._query_client()
        for sensor, ts in instants:
            text = await reader.query_api().query_raw(
                point_flux(self._influx.bucket, domain, sensor, ts), dialect=Dialect(header=True, annotations=[])
            )
            fields: dict[str, float] = {}
            site = ""
            header: list[str] = []
            for row in csv.reader(text.splitlines()):
                if "_field" in row and "_value" in row:
                    header = row
                elif header and row and any(row):
                    record = dict(zip(header, row, strict=False))
                    if record.get("_time") and flux_time_ns(record["_time"]) == ts:
                        fields[record["_field"]] = float(record["_value"])
                        site = record.get("site", "") or site
            if metric not in fields:
                continue
            await self._delete(domain, sensor, ts)
            others = {name: np.array([v]) for name, v in fields.items() if name != metric}
            if others:
                tags = {"sensor_id": np.array([sensor], dtype=object), "site": np.array([site], dtype=object)}
                await self.write(PointColumns(domain, tags, others, np.array([ts], dtype=np.int64)), "retract")
        await self.flush()

    async def delete_range(self, measurement: str, start_ns: int, stop_ns: int) -> None:
        """Delete every point of ``measurement`` in ``[start_ns, stop_ns)`` from this writer's
        bucket (on InfluxDB 1.x: from every retention policy of its database), after everything
        written before it is stored."""
        await self.flush()
        await self._delete(measurement, None, start_ns, stop_ns)

    async def _delete(self, measurement: str, sensor: str | None, start_ns: int, stop_ns: int | None = None) -> None:
        """Delete points of ``measurement`` (of one sensor, or all) at ``start_ns`` or in
        ``[start_ns, stop_ns)``: InfluxDB 2.x's ``/api/v2/delete``, or on 1.x (which answers 404
        there) an InfluxQL ``DELETE`` on ``/query``."""
        import aiohttp

        from portpulse.sinks.query import flux_string, influxql_delete

        token = self._influx.token.get_secret_value()
        url = self._influx.url.rstrip("/")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._influx.timeout_ms / 1000)) as http:
            if not self._influx_v1:
                predicate = f"_measurement={flux_string(measurement)}"
                if sensor is not None:
                    predicate += f" AND sensor_id={flux_string(sensor)}"
                # /api/v2/delete takes both ends inclusive
                body = {"start": _rfc3339(start_ns), "stop": _rfc3339(start_ns if stop_ns is None else stop_ns - 1),
                        "predicate": predicate}  # fmt: skip
                async with http.post(
                    f"{url}/api/v2/delete", params={"org": self._influx.org, "bucket": self._influx.bucket},
                    json=body, headers={"Authorization": f"Token {token}"}, ssl=self._influx.ssl_option(),
                ) as response:  # fmt: skip
                    if response.status == 404:
                        self._influx_v1 = True
                    elif response.status >= 300:
                        raise PortPulseError(f"InfluxDB refused a delete (HTTP {response.status})")
                    else:
                        return
            user, _, password = token.partition(":")
            q = influxql_delete(measurement, sensor, start_ns, stop_ns)
            params = {"db": self._influx.bucket.split("/")[0], "q": q}
            if password:
                params |= {"u": user, "p": password}
            async with http.post(f"{url}/query", params=params, ssl=self._influx.ssl_option()) as response:
                answer = await response.text()
                # InfluxQL answers 200 with {"results":[{"error": ...}]} for a statement it refused
                if response.status >= 300 or '"error"' in answer:
                    raise PortPulseError(f"InfluxDB refused a delete (HTTP {response.status}): {answer[:300]}")

    # ------------------------------------------------------------ internals

    async def _enqueue_pending(self, source: str) -> None:
        parts, self._pending, self._pending_lines, self._pending_values = self._pending, [], 0, 0.0
        bodies, ends, offset = [], [], 0
        tickets = []
        for encoded, start, stop, ticket in parts:
            body = encoded.line_slice(start, stop)
            base = 0 if start == 0 else int(encoded.line_ends[start - 1])
            ends.append(encoded.line_ends[start:stop] - base + offset)
            bodies.append(body)
            offset += len(body)
            tickets.append(ticket)
        batch = _Batch(b"".join(bodies), np.concatenate(ends), tickets, source)
        await self._queue.put(batch)  # backpressure: blocks while max_pending_batches are queued
        SINK_METRICS.queue_depth.set(self._queue.qsize())

    async def _age_flusher(self) -> None:
        interval = self._sink.flush_interval_ms / 1000
        while True:
            await asyncio.sleep(interval / 2)
            if self._pending and time.monotonic() - self._pending_since >= interval:
                await self._enqueue_pending("")

    async def _sender(self) -> None:
        while True:
            batch = await self._queue.get()
            try:
                await self._deliver(batch)
            finally:
                for ticket in batch.tickets:
                    ticket._finish()
                self._queue.task_done()
                SINK_METRICS.queue_depth.set(self._queue.qsize())

    async def _deliver(self, batch: _Batch) -> None:
        assert self._transport is not None
        attempt = 0
        while True:
            started = time.perf_counter()
            result = await self._transport.write(batch.body, self._sink.precision)
            outcome = classify(result.status)
            if outcome is Outcome.STORED:
                SINK_METRICS.write_seconds.observe(time.perf_counter() - started)
                SINK_METRICS.points.inc(len(batch))
                SINK_METRICS.batches.inc()
                if not self._healthy:
                    log.info("InfluxDB accepts writes again after %d retries", attempt)
                self._healthy = True
                SINK_METRICS.healthy.set(1)
                return
            if outcome is Outcome.SPLIT:
                if len(batch) == 1:
                    fields = one_field_per_line(batch.body)
                    if len(fields) > 1:  # InfluxDB refuses a point for one field: store the others
                        ends = np.cumsum([len(f) for f in fields], dtype=np.int64)
                        await self._deliver(_Batch(b"".join(fields), ends, source=batch.source))
                    else:
                        await self._dead_letter(batch, result)
                    return
                first, second = batch.split()
                await self._deliver(first)
                await self._deliver(second)
                return
            if result.status == 0 and "Timeout" in result.message and len(batch) >= 2 * _SPLIT_ON_TIMEOUT_LINES:
                # A request InfluxDB cannot finish within the timeout may never finish: halves
                # (idempotent, each retried on its own) make progress where the whole would not.
                first, second = batch.split()
                await self._deliver(first)
                await self._deliver(second)
                return
            # RETRY: the server is away or overloaded, or a configuration problem (auth, bucket)
            # that an operator must fix; the points are kept either way.
            self._healthy = False
            SINK_METRICS.healthy.set(0)
            self._last_error = f"HTTP {result.status}: {result.message[:300]}" if result.status else result.message
            SINK_METRICS.retries.inc()
            delay = backoff_s(
                attempt, self._sink.retry_initial_s, self._sink.retry_max_s, self._rng.random(), result.retry_after_s
            )
            if attempt == 0 or outcome is Outcome.FIX_CONFIG:
                log.warning("InfluxDB write failed (%s); retrying in %.2fs", self._last_error, delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def _dead_letter(self, batch: _Batch, result: WriteResult) -> None:
        letter = DeadLetter(
            payload=batch.body,
            reason=rejection_reason(result.message),
            source=batch.source or "influx",
            stage="sink",
            detail=f"HTTP {result.status}: {result.message}",
        )
        await self._dead_letters.send([letter])
        SINK_METRICS.rejected.inc()
        log.warning("InfluxDB rejected a point, sent to the DLQ: %s", result.message[:300])


#: What InfluxDB 1.8 says when a point would pass its cardinality guards (``max-series-per-database``,
#: ``max-values-per-tag``) in a "partial write" answer; the other points of the write are stored.
_CARDINALITY_REFUSALS = ("max-series-per-database limit exceeded", "max-values-per-tag limit exceeded")


def rejection_reason(message: str) -> str:
    """The dead-letter reason of a point InfluxDB refused with ``message``: ``cardinality_limit``
    for its cardinality guards, ``influx_rejected`` for anything else (bad type, bad syntax)."""
    return "cardinality_limit" if any(r in message for r in _CARDINALITY_REFUSALS) else "influx_rejected"


def _values(points: PointColumns) -> int:
    """Field values ``points`` holds (a NaN or None field is absent from its line)."""
    return sum(
        int(np.count_nonzero(np.isfinite(column))) if column.dtype != np.object_
        else sum(value is not None for value in column.tolist())
        for column in points.fields.values()
    )  # fmt: skip


def _describe_row(points: PointColumns, row: int) -> str:
    """A readable rendering of a row that could not be encoded (for the dead letter's payload)."""
    measurement = points.measurement if isinstance(points.measurement, str) else points.measurement[row]
    tags = {k: (v.categories[v.codes[row]] if isinstance(v, Categorical) else v[row]) for k, v in points.tags.items()}
    fields = {k: v[row] for k, v in points.fields.items()}
    return repr({"measurement": measurement, "tags": tags, "fields": fields, "ts_ns": int(points.ts_ns[row])})
