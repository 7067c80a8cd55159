"""The pipeline as one process: bridge and/or processor with the InfluxDB sink, plus the ops server.

``portpulse run`` runs both stages; ``portpulse bridge`` and ``portpulse process`` run one. Each
stage is an asyncio task on one loop; if one fails the others are stopped and the error surfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from portpulse.app.ops import (
    Health,
    LatestValues,
    LiveView,
    OpsServer,
    TappedSink,
    influx_probe,
    kafka_probe,
    ops_tls,
)
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.errors import ConfigError, PortPulseError
from portpulse.contract.settings import Settings
from portpulse.ingest.bridge import run_bridge
from portpulse.kafka import KafkaDeadLetters, check_hooks
from portpulse.processors.loop import run_processor
from portpulse.processors.window import parse_windows
from portpulse.sinks.tiers import Tier, ensure_tiers, open_tiered_store, tier_plan

__all__ = ["STAGES", "ProcessorOptions", "ensure_tiers_while", "run_pipeline"]

log = logging.getLogger("portpulse.pipeline")

STAGES = ("bridge", "processor")


@dataclass(frozen=True, slots=True)
class ProcessorOptions:
    """Windows (``10s,1m,15m``; ``5m/1m`` is hopping), allowed lateness and idle timeout in seconds."""

    windows: str = "10s,1m,15m"
    lateness_s: float = 10.0
    idle_timeout_s: float = 30.0


async def run_pipeline(
    settings: Settings,
    stop: asyncio.Event,
    stages: tuple[str, ...] = STAGES,
    processor: ProcessorOptions = ProcessorOptions(),
    on_ops_port: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``stages`` until ``stop`` is set (or one fails); returns each stage's counters by name.

    The ops server listens on ``settings.ops.metrics_host:metrics_port`` (port 0: no server);
    ``on_ops_port`` is told the bound port.
    """
    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    check_hooks()  # logs an error (and counts it) now, at start-up, if aiokafka no longer fits
    health = Health()
    health.add("kafka", kafka_probe(settings.kafka))
    latest = LatestValues(load_catalogue(settings.processor.catalogue))
    view = LiveView(health, latest)
    halt = asyncio.Event()  # stop or a failed stage: tells every stage to drain

    async def watch_stop() -> None:
        await stop.wait()
        halt.set()

    ops_token = settings.ops.auth_token.get_secret_value() if settings.ops.auth_token else None
    async with contextlib.AsyncExitStack() as stack:
        if settings.ops.metrics_port:
            try:
                server = await stack.enter_async_context(
                    OpsServer(
                        view,
                        settings.ops.metrics_host,
                        settings.ops.metrics_port,
                        token=ops_token,
                        tls=ops_tls(settings.ops),
                    )
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve ops endpoints on {settings.ops.metrics_host}:{settings.ops.metrics_port} "
                    f"({exc.strerror}); set PORTPULSE_OPS__METRICS_PORT (0 turns them off)"
                ) from None
            if on_ops_port is not None:
                on_ops_port(server.port)
        background = [
            asyncio.create_task(health.run(halt)),
            asyncio.create_task(view.run(halt)),
            asyncio.create_task(watch_stop()),
        ]
        tasks: dict[str, asyncio.Task[Any]] = {}

        async def staged(name: str, start: Callable[[asyncio.Event], Any]) -> Any:
            ready = asyncio.Event()
            health.stage(name, False)
            marker = asyncio.create_task(_mark_ready(health, name, ready))
            try:
                return await start(ready)
            except BaseException:
                halt.set()
                raise
            finally:
                marker.cancel()
                health.stage(name, False)

        if "processor" in stages:
            dlq = await stack.enter_async_context(KafkaDeadLetters(settings.kafka))
            plan = tier_plan(settings.influx, settings.retention, [w.name for w in parse_windows(processor.windows)])
            writer = await open_tiered_store(stack, settings, plan, dlq)
            http_probe = influx_probe(settings.influx)

            async def influx_health() -> tuple[bool, str]:
                ok, detail = await http_probe()
                if ok and not writer.healthy:
                    return False, f"writes failing: {writer.last_error}"
                return ok, detail

            health.add("influx", influx_health)
            sink = TappedSink(writer, latest)
            windows, lateness_s, idle_s = processor.windows, processor.lateness_s, processor.idle_timeout_s

            async def tiers_then_processor(ready: asyncio.Event) -> Any:
                if not await ensure_tiers_while(settings, plan, halt):
                    return None
                return await run_processor(settings, sink, halt, windows, lateness_s, idle_s, ready=ready)

            tasks["processor"] = asyncio.create_task(staged("processor", tiers_then_processor))
        if "bridge" in stages:
            tasks["bridge"] = asyncio.create_task(
                staged("bridge", lambda ready: run_bridge(settings, halt, ready, health))
            )
        try:
            results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        finally:
            halt.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    out: dict[str, Any] = {}
    for name, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, PortPulseError):
                raise result
            raise PortPulseError(f"{name} failed: {type(result).__name__}: {result}") from result
        out[name] = result
    return out


async def _mark_ready(health: Health, name: str, ready: asyncio.Event) -> None:
    await ready.wait()
    health.stage(name, True)
    log.info("%s ready", name)


async def ensure_tiers_while(settings: Settings, plan: Mapping[str, Tier], halt: asyncio.Event) -> bool:
    """:func:`ensure_tiers`, retried with backoff while InfluxDB does not answer (nothing can be
    written meanwhile); False if ``halt`` was set first. A refusal (auth, rights) is raised."""
    import aiohttp

    attempt = 0
    while not halt.is_set():
        try:
            await ensure_tiers(settings.influx, plan)
            return True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if attempt % 10 == 0:
                log.warning("InfluxDB does not answer (%s); retention tiers not checked yet, retrying", exc)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), min(30.0, 0.5 * 2 ** min(attempt, 6)))
    return False
