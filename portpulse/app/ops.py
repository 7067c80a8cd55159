"""Operations surface of every long-running command: health probes, live state and the HTTP server.

``/metrics`` (Prometheus text), ``/livez`` (the process answers), ``/healthz`` (every dependency
answers), ``/readyz`` (every stage started and every dependency answers), ``/api/state`` (JSON for
the dashboard and ``portpulse top``) and ``/`` (the live dashboard). Loopback by default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import struct
import time
from collections import deque
from importlib import resources
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from portpulse.contract.catalogue import Catalogue
from portpulse.contract.errors import ConfigError
from portpulse.contract.health import Health, Probe
from portpulse.contract.points import Categorical, ForwardingStore, PointColumns, PointStore, WriteReceipt
from portpulse.contract.settings import InfluxSettings, KafkaSettings, OpsSettings

__all__ = [
    "Health",
    "LatestValues",
    "LiveView",
    "OpsServer",
    "TappedSink",
    "authorized",
    "influx_probe",
    "kafka_probe",
    "metric_totals",
    "ops_tls",
]

log = logging.getLogger("portpulse.ops")

Row = dict[str, Any]


def kafka_probe(kafka: KafkaSettings) -> Probe:
    """A real Kafka answer (ApiVersions v0, over TLS where the listener has it; Kafka answers it
    before SASL authentication) from any bootstrap server, not just an open port: a paused broker
    still accepts TCP connections."""
    from portpulse.kafka.client import ssl_context

    context = ssl_context(kafka)

    async def probe() -> tuple[bool, str]:
        errors = []
        for server in kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                reader, writer = await asyncio.open_connection(
                    host.strip("[]"), int(port), ssl=context, server_hostname=host.strip("[]") if context else None
                )
            except (OSError, ValueError) as exc:
                errors.append(f"{server}: {exc}")
                continue
            try:
                client = b"portpulse-health"
                body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
                writer.write(struct.pack(">i", len(body)) + body)
                await writer.drain()
                size, correlation = struct.unpack(">ii", await reader.readexactly(8))
                if correlation == 7 and size >= 4:
                    return True, f"{server} answers"
                errors.append(f"{server}: unexpected answer")
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{server}: {exc}")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return False, "; ".join(errors) or "no bootstrap server"

    return probe


def influx_probe(influx: InfluxSettings) -> Probe:
    """``GET {influx.url}/health`` (InfluxDB 1.8 and 2.x) answers 200."""
    import aiohttp

    url = influx.url
    ssl = influx.ssl_option()

    async def probe() -> tuple[bool, str]:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(f"{url}/health", ssl=ssl) as response,
            ):
                if response.status == 200:
                    return True, f"{url} answers"
                return False, f"{url}/health: HTTP {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return False, f"{url}: {type(exc).__name__} {exc}".strip()

    return probe


# ---------------------------------------------------------------- live state


def dead_letter_reasons(registry: CollectorRegistry = REGISTRY) -> list[dict[str, object]]:
    """The bridge's dead letters so far per reason, most first, each with the command that shows
    them (``portpulse dlq show --reason ...``)."""
    counts: dict[str, float] = {}
    for family in registry.collect():
        if family.name == "portpulse_ingest_dlq":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0.0) + sample.value
    return [
        {"reason": reason, "count": int(count), "command": f"portpulse dlq show --reason {reason}"}
        for reason, count in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


def metric_totals(registry: CollectorRegistry = REGISTRY) -> dict[str, float]:
    """Every sample of the registry summed over its labels, by sample name (counters end in ``_total``)."""
    totals: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


#: What the dashboard charts: label -> sample name. Counters become per-second rates.
RATES = {
    "mqtt_messages": "portpulse_ingest_messages_received_total",
    "kafka_readings": "portpulse_ingest_readings_produced_total",
    "processed": "portpulse_processor_readings_in_total",
    "influx_points": "portpulse_sink_points_written_total",
    "dlq": "portpulse_ingest_dlq_total",
    "refused": "portpulse_ingest_refused_readings_total",
    "rejected": "portpulse_processor_rejected_total",
    "late": "portpulse_processor_late_total",
    "windows_corrected": "portpulse_processor_windows_corrected_total",
    "repeated": "portpulse_processor_readings_repeated_total",
    "sink_rejected": "portpulse_sink_points_rejected_total",
}
LEVELS = {
    "consumer_lag": "portpulse_processor_consumer_lag",
    "event_time_lag_s": "portpulse_processor_event_time_lag_seconds",
    "correction_lag_s": "portpulse_processor_correction_lag_seconds",
    "in_flight": "portpulse_ingest_in_flight",
    "sink_queue": "portpulse_sink_queue_depth",
}


class LatestValues:
    """Latest cleaned value per (domain, sensor, metric), fed with raw points as they go to the
    sink. Offering keeps a reference (O(1) on the hot path); the work happens when asked."""

    def __init__(self, catalogue: Catalogue, backlog: int = 256, max_series: int = 100_000) -> None:
        self._catalogue = catalogue
        self._pending: deque[PointColumns] = deque(maxlen=backlog)
        self._max_series = max_series
        self.values: dict[tuple[str, str, str], tuple[str, float, int]] = {}  # -> (site, value, ts_ns)

    def offer(self, points: PointColumns) -> None:
        self._pending.append(points)

    def _absorb(self, points: PointColumns) -> None:
        sensors, sites = points.tags.get("sensor_id"), points.tags.get("site")
        if sensors is None or not len(points.ts_ns):
            return
        codes, names = _codes(sensors)
        site_codes, site_names = _codes(sites) if sites is not None else (codes, np.full(len(names), "", object))
        # The newest point per sensor: sort by (sensor, ts) and take each run's last row.
        order = np.lexsort((points.ts_ns, codes))
        last = order[np.r_[codes[order][1:] != codes[order][:-1], True]]
        for metric, column in points.fields.items():
            for row in last.tolist():
                value = float(column[row])
                if not np.isfinite(value):
                    continue
                domain = points.measurement if isinstance(points.measurement, str) else str(points.measurement[row])
                key = (domain, str(names[codes[row]]), metric)
                old = self.values.get(key)
                if (old is None and len(self.values) >= self._max_series) or (old and old[2] > points.ts_ns[row]):
                    continue
                self.values[key] = (str(site_names[site_codes[row]]), value, int(points.ts_ns[row]))

    def snapshot(self, now_ns: int, per_domain: int = 200) -> tuple[dict[str, list[Row]], list[Row]]:
        """Rows per domain (by site, sensor, metric; at most ``per_domain``) and the active alerts."""
        while self._pending:
            self._absorb(self._pending.popleft())
        tables: dict[str, list[Row]] = {}
        alerts = []
        for (domain, sensor, metric), (site, value, ts) in self.values.items():
            spec = self._catalogue.get(domain, metric)
            row = {
                "sensor_id": sensor, "site": site, "metric": metric, "value": value,
                "unit": spec.unit if spec else "", "age_s": max(0.0, (now_ns - ts) / 1e9),
            }  # fmt: skip
            tables.setdefault(domain, []).append(row)
            if spec and spec.alert_above is not None and value > spec.alert_above:
                alerts.append({**row, "domain": domain, "alert": spec.alert, "threshold": spec.alert_above})
        for domain, rows in tables.items():
            rows.sort(key=lambda r: (str(r["site"]), str(r["sensor_id"]), str(r["metric"])))
            tables[domain] = rows[:per_domain]
        alerts.sort(key=lambda a: str(a["sensor_id"]))
        return tables, alerts


def _codes(column: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    if isinstance(column, Categorical):
        return column.codes, column.categories
    names, codes = np.unique(np.asarray(column, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1), names.astype(object)


class TappedSink(ForwardingStore):
    """A :class:`PointStore` that shows raw points to :class:`LatestValues` on their way to ``inner``."""

    def __init__(self, inner: PointStore, latest: LatestValues) -> None:
        super().__init__(inner)
        self._latest = latest

    async def write(self, points: PointColumns, source: str = "") -> WriteReceipt:
        if source == "processor:raw":
            self._latest.offer(points)
        return await self._inner.write(points, source)


class LiveView:
    """Samples the metric registry once a second: rates and levels for the last ``history`` seconds."""

    def __init__(
        self,
        health: Health,
        latest: LatestValues | None = None,
        registry: CollectorRegistry = REGISTRY,
        history: int = 300,
    ) -> None:
        self.health = health
        self.latest = latest
        self._registry = registry
        self._t: deque[float] = deque(maxlen=history)
        self._series: dict[str, deque[float]] = {k: deque(maxlen=history) for k in (*RATES, *LEVELS)}
        self._last: tuple[float, dict[str, float]] | None = None
        self._state_json: bytes | None = None
        self.totals: dict[str, float] = {}

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        totals = metric_totals(self._registry)
        if self._last is not None:
            then, before = self._last
            dt = max(now - then, 1e-6)
            self._t.append(now)
            for key, name in RATES.items():
                self._series[key].append(max(0.0, (totals.get(name, 0.0) - before.get(name, 0.0)) / dt))
            for key, name in LEVELS.items():
                self._series[key].append(totals.get(name, 0.0))
        self._last = (now, totals)
        self.totals = {key: totals.get(name, 0.0) for key, name in {**RATES, **LEVELS}.items()}
        self._state_json = None

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def live_totals(self) -> dict[str, float]:
        """The counters and levels of ``totals`` read now (``totals`` is sampled once a second):
        one walk over the registry, for pollers that time runs (the benchmarks)."""
        totals = metric_totals(self._registry)
        return {key: totals.get(name, 0.0) for key, name in {**RATES, **LEVELS}.items()}

    def state(self) -> dict[str, Any]:
        """The JSON document of ``/api/state``: times (epoch s), series by name, totals, health,
        latest values per domain, alerts and the bridge's dead letters per reason."""
        tables, alerts = self.latest.snapshot(time.time_ns()) if self.latest else ({}, [])
        alerts = self.health.notices() + alerts
        return {
            "t": list(self._t),
            "series": {k: list(v) for k, v in self._series.items()},
            "totals": self.totals,
            "health": self.health.snapshot(),
            "latest": tables,
            "alerts": alerts,
            "dead_letters": dead_letter_reasons(self._registry),
        }

    def state_json(self) -> bytes:
        """:meth:`state` as JSON, built once per :meth:`sample` (its figures change only then),
        so many open dashboards or a tight poller cost the pipeline nothing more."""
        if self._state_json is None:
            self._state_json = json.dumps(self.state()).encode()
        return self._state_json


# ---------------------------------------------------------------- HTTP


def dashboard_html() -> bytes:
    return resources.files("portpulse.app").joinpath("dashboard.html").read_bytes()


def ops_tls(ops: OpsSettings) -> ssl.SSLContext | None:
    """The server's TLS context from ``ops.tls_cert_file``/``tls_key_file``; None for plain HTTP."""
    if ops.tls_cert_file is None or ops.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(ops.tls_cert_file), str(ops.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ops.tls_cert_file/tls_key_file cannot be used: {exc}") from None
    return context


#: Endpoints open without the token: an orchestrator's liveness and readiness probes.
OPEN_PATHS = frozenset({"/livez", "/readyz"})


def authorized(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token``: ``Bearer <token>``, or basic auth with
    it as the password (any user name). No token: everyone is."""
    if token is None:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        offered = value.strip()
    elif scheme.lower() == "basic":
        try:
            offered = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(offered.encode(), token.encode())


def _resolved(host: str) -> str:
    """An address for ``host`` ("" and "0.0.0.0" bind every interface: not loopback)."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 (what is being checked)
        return "0.0.0.0"  # noqa: S104
    try:
        return str(socket.getaddrinfo(host, None)[0][4][0])
    except OSError:
        return "0.0.0.0"  # noqa: S104 (unknown: assume reachable)


class OpsServer:
    """A small HTTP/1.1 server (GET only, one request per connection) on the event loop. With
    ``token``, every path but :data:`OPEN_PATHS` needs it (see :func:`authorized`); with ``tls``
    it speaks HTTPS."""

    def __init__(
        self,
        view: LiveView,
        host: str,
        port: int,
        registry: CollectorRegistry = REGISTRY,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._view = view
        self._host, self._port = host, port
        self._registry = registry
        self._token, self._tls = token, tls
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> OpsServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, ssl=self._tls)
        scheme = "https" if self._tls else "http"
        log.info("ops endpoints on %s://%s:%d/ (/metrics, /healthz, /readyz)%s", scheme, self._host, self.port,
                 "; a token is needed but for /livez and /readyz" if self._token else "")  # fmt: skip
        if self._token is None and not ipaddress.ip_address(_resolved(self._host)).is_loopback:
            log.warning(
                "ops endpoints on %s are reachable from other machines without a token: set ops.auth_token "
                "(and ops.tls_cert_file/tls_key_file, or a TLS reverse proxy)", self._host,
            )  # fmt: skip
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def route(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for ``path`` (pure apart from reading the state)."""
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path in ("/healthz", "/readyz", "/livez"):
            snap = self._view.health.snapshot()
            ok = {"/healthz": snap["healthy"], "/readyz": snap["ready"], "/livez": True}[path]
            return (200 if ok else 503), "application/json", json.dumps(snap).encode()
        if path == "/api/state":
            return 200, "application/json", self._view.state_json()
        if path == "/api/totals":
            return 200, "application/json", json.dumps(self._view.live_totals()).encode()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", dashboard_html()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            first, _, rest = request.decode("latin-1").partition("\r\n")
            method, path, _ = first.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest.split("\r\n")) if k}
            challenge = ""
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"GET only\n"
            elif path.split("?", 1)[0] not in OPEN_PATHS and not authorized(headers.get("authorization"), self._token):
                status, ctype, body = 401, "text/plain", b"a token is needed (ops.auth_token)\n"
                challenge = 'WWW-Authenticate: Basic realm="PortPulse", charset="UTF-8"\r\n'
            else:
                status, ctype, body = self.route(path)
            reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]  # fmt: skip
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{challenge}Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method == "GET" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, OSError):
            pass  # a broken or idle client (or a failed TLS handshake): nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
