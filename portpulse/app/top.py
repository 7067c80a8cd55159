"""``portpulse top``: a live terminal view of a running pipeline, from its ``/api/state``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["fetch_state", "render", "run_top"]

#: (label, series key, unit) of the throughput table, in pipeline order.
STAGE_ROWS = (
    ("MQTT messages in", "mqtt_messages", "msg/s"),
    ("readings to Kafka", "kafka_readings", "/s"),
    ("readings processed", "processed", "/s"),
    ("points to InfluxDB", "influx_points", "/s"),
    ("bridge DLQ", "dlq", "/s"),
    ("rejected by cleaning", "rejected", "/s"),
    ("repeats dropped (delivered again)", "repeated", "/s"),
    ("windows corrected", "windows_corrected", "/s"),
    ("beyond horizon (portpulse.late)", "late", "/s"),
    ("refused by InfluxDB", "sink_rejected", "/s"),
)
LEVEL_ROWS = (
    ("consumer lag", "consumer_lag", "records"),
    ("event-time lag (median series)", "event_time_lag_s", "s"),
    ("last correction lag", "correction_lag_s", "s"),
    ("bridge in flight", "in_flight", "messages"),
    ("sink queue", "sink_queue", "batches"),
)


def fetch_state(url: str, timeout_s: float = 2.0, token: str | None = None) -> dict[str, Any]:
    """``/api/state`` of the ops endpoint at ``url`` (with the bearer ``token`` where it needs one)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/api/state")  # noqa: S310 (the operator's endpoint)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        state: dict[str, Any] = json.loads(response.read())
    return state


def _last(series: dict[str, list[float]], key: str) -> float:
    values = series.get(key) or [0.0]
    return values[-1]


def render(state: dict[str, Any], url: str, rows_per_domain: int = 8) -> Group:
    """The view of one ``/api/state`` document (pure: testable without a terminal)."""
    health = state["health"]
    status = Text()
    for name, check in health["checks"].items():
        status.append(f" {name} ", style="bold white on green" if check["ok"] else "bold white on red")
        status.append(f" {check['detail']}   ")
    for name, up in health["stages"].items():
        status.append(f" {name}: {'running' if up else 'starting/stopped'} ", style="green" if up else "yellow")
    for name, lines in health.get("warnings", {}).items():
        status.append(f"\n {name} ", style="bold black on yellow")
        status.append(" " + "; ".join(lines[:3]) + (f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""))
    flow = Table(title="Throughput", expand=True)
    flow.add_column("stage")
    flow.add_column("now", justify="right")
    flow.add_column("total", justify="right")
    for label, key, unit in STAGE_ROWS:
        flow.add_row(label, f"{_last(state['series'], key):,.0f} {unit}", f"{state['totals'].get(key, 0):,.0f}")
    for label, key, unit in LEVEL_ROWS:
        flow.add_row(label, f"{_last(state['series'], key):,.1f} {unit}", "")
    border = "green" if health["ready"] else "red"
    parts: list[Any] = [
        Panel(status, title=f"PortPulse {url}  ready={health['ready']}", border_style=border),
        flow,
    ]
    if state["alerts"]:
        alerts = Table(title=f"Alerts ({len(state['alerts'])})", expand=True, style="red")
        for col in ("sensor", "site", "value", "alert"):
            alerts.add_column(col)
        for a in state["alerts"][:10]:
            alerts.add_row(a["sensor_id"], a["site"], f"{a['value']:g} {a['unit']}", a["alert"])
        parts.append(alerts)
    for domain, rows in sorted(state["latest"].items()):
        table = Table(title=f"Latest {domain}", expand=True)
        for col in ("sensor", "site", "metric", "value", "age"):
            table.add_column(col, justify="right" if col in ("value", "age") else "left")
        for row in rows[:rows_per_domain]:
            table.add_row(
                row["sensor_id"], row["site"], row["metric"], f"{row['value']:g} {row['unit']}", f"{row['age_s']:.0f}s"
            )
        parts.append(table)
    return Group(*parts)


def run_top(
    url: str, interval_s: float = 1.0, once: bool = False, max_frames: int | None = None, token: str | None = None
) -> int:
    """Refresh the view every ``interval_s`` until Ctrl-C (or once); exit code 1 if unreachable with ``once``."""
    console = Console()
    if once:
        try:
            console.print(render(fetch_state(url, token=token), url))
        except (urllib.error.URLError, OSError) as exc:
            console.print(f"[red]no PortPulse ops endpoint at {url}: {exc}[/red]")
            return 1
        return 0
    frames = 0
    with Live(Text("connecting..."), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while max_frames is None or frames < max_frames:
                try:
                    live.update(render(fetch_state(url, token=token), url))
                except (urllib.error.URLError, OSError) as exc:
                    live.update(Text(f"no PortPulse ops endpoint at {url}: {exc} (retrying)", style="red"))
                frames += 1
                time.sleep(interval_s)
        except KeyboardInterrupt:
            pass
    return 0
