"""The ``portpulse`` command line. Settings are loaded once here and passed down.

Each command imports the stages it runs when it runs, so ``portpulse --help``, ``config`` and
``catalogue`` do not load numpy kernels, aiokafka or influxdb-client."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portpulse import __version__
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.errors import ConfigError, PortPulseError, ServiceUnavailableError
from portpulse.contract.settings import Settings, load_settings

__all__ = ["main"]

#: Exit codes: 0 ok, 1 runtime failure, 2 usage/configuration error, 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portpulse",
        description="Streaming ingestion for smart-port sensors: MQTT -> Kafka -> numpy windows -> InfluxDB.",
        epilog="Configuration: environment PORTPULSE_* (nested with __) and an optional TOML file (--config).",
    )
    parser.add_argument("--version", action="version", version=f"portpulse {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (environment variables win over it)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("config", help="print the effective settings as JSON (secrets masked)")
    cat = sub.add_parser("catalogue", help="print the metric catalogue")
    cat.add_argument("--domain", help="only this domain")
    sens = sub.add_parser("sensors", help="list the sensors the bridges admitted, per site, with last-seen times")
    sens.add_argument("--site", help="list this site's sensors one by one")
    sens.add_argument("--domain", help="only this domain")
    sens.add_argument("--format", choices=("table", "csv", "json"), default="table")
    dlq = sub.add_parser("dlq", help="inspect the dead-letter topic (summary, show) and replay records from it")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    dlq_summary = dlq_sub.add_parser("summary", help="letters per time bucket, reason, domain and site")
    dlq_summary.add_argument("--bucket", default="1h", help="time bucket, e.g. 10m, 1h, 1d (default 1h)")
    dlq_show = dlq_sub.add_parser("show", help="the letters themselves: reason, source, time, detail, payload")
    dlq_show.add_argument("--limit", type=int, default=20, help="at most this many, the newest (default 20; 0: all)")
    dlq_show.add_argument("--full", action="store_true", help="whole payloads (default: the first 200 characters)")
    dlq_replay = dlq_sub.add_parser(
        "replay", help="send letters back through the bridge's decode path (ingest-stage letters)"
    )
    dlq_replay.add_argument("--dry-run", action="store_true", help="say what would happen; send nothing")
    for p in (dlq_summary, dlq_show, dlq_replay):
        p.add_argument("--reason", help="e.g. malformed_json, out_of_range, cardinality_limit, rate_limit")
        p.add_argument("--stage", choices=("ingest", "sink"), help="where the letter was rejected")
        p.add_argument("--domain", help="domain of the source topic")
        p.add_argument("--site", help="site of the source topic")
        p.add_argument("--sensor", help="sensor_id (of the topic, or named in a gateway batch)")
        p.add_argument("--since", help="rejected at or after: -1h, -7d, RFC 3339 or epoch seconds")
        p.add_argument("--until", help="rejected before (same forms as --since)")
        p.add_argument("--all", action="store_true", help="also the letters a replay already sent back")
    for p in (dlq_summary, dlq_show):
        p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    rp = sub.add_parser(
        "reprocess",
        help="clean and aggregate a range again from the readings Kafka holds, over what InfluxDB stores for it",
    )
    rp.add_argument("--from", dest="start", required=True, help="event time: -7d, RFC 3339 or epoch seconds")
    rp.add_argument("--to", dest="stop", required=True, help="event time, excluded (same forms as --from)")
    rp.add_argument("--domain", action="append", help="only this domain (repeat for more; default: the catalogue's)")
    rp.add_argument("--windows", default="10s,1m,15m", help="the windows 'portpulse run' writes (default 10s,1m,15m)")
    rp.add_argument("--dry-run", action="store_true", help="check the range and say what would be read; change nothing")
    run = sub.add_parser("run", help="run the whole pipeline (bridge + processor + sink) with ops endpoints")
    sub.add_parser("bridge", help="run the MQTT -> Kafka bridge until SIGINT/SIGTERM")
    proc = sub.add_parser("process", help="run the processor (Kafka -> clean -> windows -> InfluxDB)")
    for p in (run, proc):
        p.add_argument("--windows", default="10s,1m,15m", help="window sizes, e.g. 10s,1m,15m or 5m/1m (hopping)")
        p.add_argument("--lateness", type=float, default=10.0, help="allowed lateness, seconds")
        p.add_argument("--idle-timeout", type=float, default=30.0, help="close windows of a quiet partition, seconds")
    top = sub.add_parser("top", help="live terminal view of a running pipeline (reads its /api/state)")
    top.add_argument("--url", help="ops endpoint (default http://{ops.metrics_host}:{ops.metrics_port})")
    top.add_argument("--interval", type=float, default=1.0, help="refresh period, seconds")
    top.add_argument("--once", action="store_true", help="print one view and exit (for scripts)")
    sim = sub.add_parser("simulate", help="simulate the port's sensor fleets (to MQTT or a file)")
    sim.add_argument("--fleet", default="air,crane,cell", help="comma-separated: air, crane, cell")
    sim.add_argument("--sensors", type=int, default=300, help="number of sensors, split over the fleets")
    sim.add_argument("--rate", type=float, default=100.0, help="sensor reports per second (all metrics of a sensor)")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds of simulated stream")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument(
        "--faults",
        default="",
        help="kind=rate,... (spike, stuck, dropout, duplicate, out_of_order, "
        "late, clock_skew, malformed, out_of_range, oversized) or all=RATE; "
        "with --format sparkplug: outage, seq_gap",
    )
    sim.add_argument(
        "--format",
        choices=("json", "json-batch", "line", "sparkplug"),
        default="json",
        help="sparkplug: the crane fleet as Sparkplug B edge nodes (births, aliases, will, rebirth)",
    )
    sim.add_argument("--batch-size", type=int, default=100, help="readings per gateway batch message")
    sim.add_argument("--qos", type=int, choices=(0, 1), default=0)
    sim.add_argument("--start", type=float, help="stream start, epoch seconds (default: now)")
    sim.add_argument("--out", type=Path, help="write the stream to this file instead of publishing")
    sim.add_argument("--manifest", type=Path, help="write every injected fault here (JSON lines)")
    rep = sub.add_parser("replay", help="publish a stream file written by 'simulate --out'")
    rep.add_argument("file", type=Path)
    rep.add_argument("--speed", type=float, default=1.0, help="time factor (2 = twice as fast)")
    rep.add_argument("--qos", type=int, choices=(0, 1), default=0)
    q = sub.add_parser("query", help="query a sensor's or a site's metric from InfluxDB (raw or per window)")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--sensor", help="sensor_id")
    who.add_argument("--site", help="site (all its sensors together)")
    q.add_argument("--domain", required=True, help="domain, e.g. air, crane, cell")
    q.add_argument("--metric", required=True, help="metric, e.g. no2 (aggregate tables: no2_mean, ...)")
    q.add_argument("--table", help="aggregate table window, e.g. 1m queries measurement {domain}_1m")
    q.add_argument("--start", default="-1h", help="'now', a negative duration like -1h, or RFC 3339 (default -1h)")
    q.add_argument("--stop", default="now", help="like --start (default now)")
    q.add_argument("--every", help="aggregate per window of this duration, e.g. 1m")
    q.add_argument("--fn", default="mean", help="aggregate function with --every (default mean)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


def _cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    from portpulse.sinks.query import QuerySpec, format_rows, run_query
    from portpulse.sinks.tiers import tier_bucket

    spec = QuerySpec(
        bucket=tier_bucket(settings.influx, settings.retention, args.table),
        measurement=f"{args.domain}_{args.table}" if args.table else args.domain,
        field=args.metric,
        sensor_id=args.sensor,
        site=args.site,
        start=args.start,
        stop=args.stop,
        every=args.every,
        fn=args.fn,
    )
    print(format_rows(run_query(settings.influx, spec), args.format))
    return EXIT_OK


def _cmd_pipeline(settings: Settings, stages: tuple[str, ...], args: argparse.Namespace) -> int:
    """``run``, ``bridge`` and ``process``: the stages until SIGINT/SIGTERM, then drain and report."""
    import logging

    from portpulse.app.pipeline import ProcessorOptions, run_pipeline
    from portpulse.app.runtime import (
        keep_heap_for_reuse,
        run_until_signal,
        setup_logging,
        small_pages_for_arrays,
        tune_gc_for_streaming,
    )

    setup_logging(settings.ops)
    if "processor" in stages:
        keep_heap_for_reuse()
    small_pages_for_arrays()
    tune_gc_for_streaming()
    options = ProcessorOptions(
        getattr(args, "windows", "10s,1m,15m"), getattr(args, "lateness", 10.0), getattr(args, "idle_timeout", 30.0)
    )
    stats = run_until_signal(lambda stop: run_pipeline(settings, stop, stages, options))
    for name, stage_stats in stats.items():
        logging.getLogger(f"portpulse.{name}").info("%s stopped: %s", name, stage_stats)
    return EXIT_OK


def _cmd_top(settings: Settings, args: argparse.Namespace) -> int:
    from portpulse.app.top import run_top

    ops = settings.ops
    scheme = "https" if ops.tls_cert_file else "http"
    url = args.url or f"{scheme}://{ops.metrics_host}:{ops.metrics_port}"
    token = ops.auth_token.get_secret_value() if ops.auth_token else None
    return run_top(url, args.interval, once=args.once, token=token)


def _cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    import contextlib
    import time

    from portpulse.simulators.publish import publish, write_stream
    from portpulse.simulators.stream import StreamConfig, generate, parse_faults

    if args.format == "sparkplug":
        return _simulate_sparkplug(settings, args)
    try:
        config = StreamConfig(
            fleets=tuple(f.strip() for f in args.fleet.split(",") if f.strip()),
            sensors=args.sensors,
            rate=args.rate,
            duration_s=args.duration,
            seed=args.seed,
            start_ns=int((args.start if args.start is not None else time.time()) * 1e9),
            fmt=args.format,
            batch_size=args.batch_size,
            topic_prefix=settings.mqtt.topic_prefix,
            faults=parse_faults(args.faults),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        manifest = stack.enter_context(open(args.manifest, "w")) if args.manifest else None
        if args.out:
            out = stack.enter_context(open(args.out, "wb"))
            report = write_stream(generate(config), out, manifest)
            print(
                f"wrote {report.messages:,} messages ({report.reports:,} reports, "
                f"{report.faults:,} faults) to {args.out}"
            )
            return EXIT_OK
        report = publish(generate(config), _target(settings, args.qos), manifest, target_rate=config.rate)
    print(
        f"published {report.messages:,} messages, {report.reports:,} reports in {report.elapsed_s:.1f}s: "
        f"{report.reports_per_s:,.0f} reports/s (target {config.rate:,.0f}), {report.faults:,} faults injected"
    )
    return EXIT_OK


def _simulate_sparkplug(settings: Settings, args: argparse.Namespace) -> int:
    import contextlib
    import time

    from portpulse.simulators.sparkplug import SparkplugConfig, run_sparkplug_fleet
    from portpulse.simulators.stream import parse_faults

    if args.out:
        raise ConfigError(
            "--format sparkplug publishes live (edge nodes answer rebirth requests): --out is not available"
        )
    try:
        config = SparkplugConfig(
            sensors=args.sensors,
            rate=args.rate,
            duration_s=args.duration,
            seed=args.seed,
            start_ns=int((args.start if args.start is not None else time.time()) * 1e9),
            faults=parse_faults(args.faults),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        manifest = stack.enter_context(open(args.manifest, "w")) if args.manifest else None
        try:
            report = run_sparkplug_fleet(config, _target(settings, args.qos), manifest)
        except ConnectionError as exc:
            raise ServiceUnavailableError("mqtt", str(exc)) from None
    print(
        f"published {report.messages:,} Sparkplug messages, {report.reports:,} crane reports in "
        f"{report.elapsed_s:.1f}s: {report.reports_per_s:,.0f} reports/s (target {config.rate:,.0f}), "
        f"{report.faults:,} faults injected"
    )
    return EXIT_OK


def _target(settings: Settings, qos: int) -> Any:
    from portpulse.simulators.publish import MqttTarget

    m = settings.mqtt
    return MqttTarget(
        m.host, m.port, qos, f"{m.client_id}-sim", m.username, m.password.get_secret_value() if m.password else None
    )


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from portpulse.simulators.publish import publish, read_stream

    if not args.file.is_file():
        raise ConfigError(f"no such stream file: {args.file}")
    try:
        report = publish(read_stream(args.file, args.speed), _target(settings, args.qos))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"replayed {report.messages:,} messages in {report.elapsed_s:.1f}s ({report.messages_per_s:,.0f}/s)")
    return EXIT_OK


def _cmd_sensors(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import time

    from portpulse.app.sensors import sensor_rows
    from portpulse.app.tables import format_table
    from portpulse.ingest.admission import load_registry_file
    from portpulse.ingest.bridge import read_registry

    allowed = load_registry_file(settings.admission.registry_file) if settings.admission.registry_file else frozenset()
    seen = asyncio.run(read_registry(settings.kafka))
    rows = sensor_rows(seen, allowed, time.time(), args.site, args.domain)
    print(format_table(rows, args.format, empty="no sensors registered yet"))
    return EXIT_OK


def _cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import heapq
    import time

    from portpulse.app.dlq import DlqFilter, read_dlq, replay, show_rows, summary_rows
    from portpulse.app.tables import format_table
    from portpulse.app.times import parse_time_ns
    from portpulse.processors.window import duration_ns

    now = time.time_ns()
    try:
        which = DlqFilter(
            reason=args.reason, stage=args.stage, domain=args.domain, site=args.site, sensor_id=args.sensor,
            since_ns=parse_time_ns(args.since, now) if args.since else None,
            until_ns=parse_time_ns(args.until, now) if args.until else None,
        )  # fmt: skip
        bucket_ns = duration_ns(args.bucket) if args.dlq_command == "summary" else 0
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    async def summarised() -> list[Any]:
        return [letter.without_payload() async for batch in read_dlq(settings, which, args.all) for letter in batch]

    if args.dlq_command == "summary":
        rows = summary_rows(asyncio.run(summarised()), bucket_ns)
        print(format_table(rows, args.format, empty="no dead letters match"))
    elif args.dlq_command == "show":

        def newest(r: Any) -> tuple[int, int, int]:
            return (r.time_ns, r.partition, r.offset)

        async def shown() -> list[Any]:  # the newest --limit, without holding every payload
            kept: list[Any] = []
            async for batch in read_dlq(settings, which, args.all):
                kept += batch
                if args.limit and len(kept) > 2 * args.limit:
                    kept = heapq.nlargest(args.limit, kept, key=newest)
            return sorted(kept, key=newest)[-args.limit :] if args.limit else sorted(kept, key=newest)

        chosen = asyncio.run(shown())
        print(format_table(show_rows(chosen, None if args.full else 200), args.format, empty="no dead letters match"))
    else:
        report = asyncio.run(replay(settings, read_dlq(settings, which, args.all), dry_run=args.dry_run))
        verb = "would send" if args.dry_run else "sent"
        print(
            f"{report.selected:,} letters selected; {report.replayed:,} {verb} back through the bridge: "
            f"{report.readings:,} readings {'would reach' if args.dry_run else 'produced to'} the readings topics"
        )
        if report.failed_again:
            again = ", ".join(f"{reason} x{n:,}" for reason, n in sorted(report.failed_again.items()))
            print(f"still failing ({'would go' if args.dry_run else 'dead-lettered'} again): {again}")
        if report.not_replayable:
            stages = ", ".join(f"{stage or 'unknown'} x{n:,}" for stage, n in sorted(report.not_replayable.items()))
            print(f"not replayable through the bridge (rejected after it): {stages}")
    return EXIT_OK


def _cmd_reprocess(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import time

    from portpulse.app.times import iso_time, parse_time_ns
    from portpulse.kafka import KafkaDeadLetters
    from portpulse.processors.reprocess import ReprocessProgress, describe, plan_reprocess, progress_line, reprocess
    from portpulse.processors.window import parse_windows
    from portpulse.sinks.tiers import ensure_tiers, open_tiered_store, tier_plan

    now = time.time_ns()
    domains = load_catalogue(settings.processor.catalogue).domains()
    chosen = [d for arg in args.domain or [] for d in arg.split(",") if d] or domains
    if unknown := sorted(set(chosen) - set(domains)):
        raise ConfigError(f"unknown domain(s) {', '.join(unknown)}; the catalogue has {', '.join(domains)}")
    try:
        windows = parse_windows(args.windows)
        # The live processor closes a window once its series' lateness (10 s) and idle timeout
        # (30 s) have passed after its end: a window ending within the last minute may be open.
        latest = now - 60 * 10**9
        plan = plan_reprocess(parse_time_ns(args.start, now), parse_time_ns(args.stop, now), chosen, windows, latest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tty = sys.stderr.isatty()
    shown = [0.0]

    def on_progress(p: ReprocessProgress) -> None:
        if tty:
            print(f"\r{progress_line(p)}", end="", file=sys.stderr, flush=True)
        elif p.elapsed_s - shown[0] >= 5 or p.done >= p.total:
            shown[0] = p.elapsed_s
            print(progress_line(p), file=sys.stderr, flush=True)

    async def go() -> Any:
        async with contextlib.AsyncExitStack() as stack:
            tiers = tier_plan(settings.influx, settings.retention, [w.name for w in windows])
            if not args.dry_run:
                await ensure_tiers(settings.influx, tiers)
            dlq = await stack.enter_async_context(KafkaDeadLetters(settings.kafka))
            store = await open_tiered_store(stack, settings, tiers, dlq)
            return await reprocess(settings, store, plan, on_progress, dry_run=args.dry_run)

    widest = max(windows, key=lambda w: w.size_ns).name
    print(f"range {iso_time(plan.start_ns)} .. {iso_time(plan.stop_ns)} (whole {widest} windows)", file=sys.stderr)
    try:
        report = asyncio.run(go())
    except KeyboardInterrupt:
        print("\ninterrupted: the range is partly rewritten; run the same command again to finish it", file=sys.stderr)
        raise
    if tty:
        print(file=sys.stderr)
    if report.without_topic:
        print(f"left as stored (Kafka has no readings topic): {', '.join(report.without_topic)}")
    if args.dry_run:
        cleared = ", ".join(m for m, _, _ in report.plan.deletions())
        print(f"would clear {cleared} in the range and read {report.to_read:,} records from {report.partitions} "
              "partitions")  # fmt: skip
    else:
        print(describe(report))
    return EXIT_OK


def _cmd_config(settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2, ensure_ascii=False))
    return EXIT_OK


def _cmd_catalogue(settings: Settings, domain: str | None) -> int:
    catalogue = load_catalogue(settings.processor.catalogue)
    print(f"{'domain':8} {'metric':18} {'unit':8} {'min':>10} {'max':>12} {'max rate/s':>11}  description")
    for (d, m), spec in sorted(catalogue.specs.items()):
        if domain and d != domain:
            continue
        print(
            f"{d:8} {m:18} {spec.unit:8} {spec.min:>10g} {spec.max:>12g} {spec.max_rate_per_s:>11g}  {spec.description}"
        )
    return EXIT_OK


_TIME_OPTIONS = ("--start", "--stop", "--since", "--until", "--from", "--to")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--start -1h`` -> ``--start=-1h`` (also ``--stop``, ``--since``, ``--until``, ``--from``,
    ``--to``): argparse would take ``-1h`` for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if (
            argv[i] in ("--start", "--stop", "--since", "--until", "--from", "--to")
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
        ):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``portpulse`` console script; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        settings = load_settings(args.config)
        if args.command == "config":
            return _cmd_config(settings)
        if args.command == "catalogue":
            return _cmd_catalogue(settings, args.domain)
        if args.command == "sensors":
            return _cmd_sensors(settings, args)
        if args.command == "dlq":
            return _cmd_dlq(settings, args)
        if args.command == "reprocess":
            return _cmd_reprocess(settings, args)
        if args.command == "simulate":
            return _cmd_simulate(settings, args)
        if args.command == "replay":
            return _cmd_replay(settings, args)
        if args.command in ("run", "bridge", "process"):
            stages = {"run": ("bridge", "processor"), "bridge": ("bridge",), "process": ("processor",)}
            return _cmd_pipeline(settings, stages[args.command], args)
        if args.command == "top":
            return _cmd_top(settings, args)
        if args.command == "query":
            return _cmd_query(settings, args)
    except PortPulseError as exc:
        print(f"portpulse: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
