"""Health: named dependency probes and the stages' started flags, which the ops server reports.

Stages record whether they run (:meth:`Health.stage`); the shell adds probes of the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Health", "Probe"]

log = logging.getLogger("portpulse.ops")

#: A dependency check: ``(ok, detail)``; ``detail`` is shown to operators and never holds secrets.
Probe = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass(slots=True)
class _Check:
    probe: Probe
    ok: bool = False
    detail: str = "not checked yet"
    since: float = field(default_factory=time.time)


class Health:
    """Named dependency probes, run every ``interval_s`` in the background; answers from the cache
    so an endpoint never blocks on a dead service."""

    def __init__(self, interval_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self._checks: dict[str, _Check] = {}
        self._notices: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self._stages: dict[str, bool] = {}
        self._interval_s = interval_s
        self._timeout_s = timeout_s

    def add(self, name: str, probe: Probe) -> None:
        self._checks[name] = _Check(probe)

    def add_notices(self, name: str, source: Callable[[], list[dict[str, Any]]]) -> None:
        """Register a source of alerts that do not make the process unhealthy (a stage working as
        configured, e.g. refusing readings over a budget): rows with ``domain``, ``site``,
        ``sensor_id``, ``value``, ``unit``, ``alert`` and ``age_s``, shown by the dashboard and
        summarised under ``warnings`` in :meth:`snapshot`."""
        self._notices[name] = source

    def notices(self) -> list[dict[str, Any]]:
        """Every notice source's current rows."""
        rows: list[dict[str, Any]] = []
        for source in self._notices.values():
            rows += source()
        return rows

    def stage(self, name: str, started: bool) -> None:
        """Record whether a pipeline stage (bridge, processor) is running."""
        self._stages[name] = started

    async def probe_once(self) -> None:
        async def one(name: str, check: _Check) -> None:
            try:
                ok, detail = await asyncio.wait_for(check.probe(), self._timeout_s)
            except TimeoutError:
                ok, detail = False, f"no answer within {self._timeout_s:g}s"
            except Exception as exc:  # a probe must never take the server down
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            if ok != check.ok:
                check.since = time.time()
                (log.info if ok else log.warning)("%s %s: %s", name, "reachable" if ok else "UNREACHABLE", detail)
            check.ok, check.detail = ok, detail

        await asyncio.gather(*(one(n, c) for n, c in self._checks.items()))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.probe_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self._checks.values())

    @property
    def ready(self) -> bool:
        return self.healthy and bool(self._stages) and all(self._stages.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "ready": self.ready,
            "checks": {n: {"ok": c.ok, "detail": c.detail, "since": c.since} for n, c in self._checks.items()},
            "stages": dict(self._stages),
            "warnings": {
                name: [f"{r['domain']}/{r['site']}: {r['alert']} (e.g. {r['sensor_id']})" for r in rows]
                for name, rows in ((n, source()) for n, source in self._notices.items())
                if rows
            },
        }
