"""Prometheus metrics of the processor (process-wide, created on first use)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["PROCESSOR_METRICS", "ProcessorMetrics"]


@dataclass
class ProcessorMetrics:
    @cached_property
    def records(self) -> Counter:
        return Counter("portpulse_processor_readings_in", "Readings consumed from Kafka")

    @cached_property
    def rejected(self) -> Counter:
        return Counter("portpulse_processor_rejected", "Readings rejected by cleaning, by reason", ["reason"])

    @cached_property
    def windows(self) -> Counter:
        return Counter("portpulse_processor_windows_emitted", "Window aggregates emitted")

    @cached_property
    def late(self) -> Counter:
        return Counter("portpulse_processor_late", "Readings older than the correction horizon, sent to portpulse.late")

    @cached_property
    def repeated(self) -> Counter:
        return Counter(
            "portpulse_processor_readings_repeated", "Readings delivered again (same series, time and value), dropped"
        )

    @cached_property
    def rejudged(self) -> Counter:
        return Counter(
            "portpulse_processor_readings_rejudged",
            "Readings whose verdict changed when a reading before them in event time arrived later",
        )

    @cached_property
    def corrections(self) -> Counter:
        return Counter(
            "portpulse_processor_corrections", "Readings (per window they fall in) behind a window already emitted"
        )

    @cached_property
    def windows_corrected(self) -> Counter:
        return Counter(
            "portpulse_processor_windows_corrected", "Window aggregates recomputed from the store and written again"
        )

    @cached_property
    def correction_seconds(self) -> Histogram:
        return Histogram(
            "portpulse_processor_correction_seconds",
            "Correction lag: a step's readings behind emitted windows -> corrected aggregates handed to the sink",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    @cached_property
    def correction_lag(self) -> Gauge:
        return Gauge(
            "portpulse_processor_correction_lag_seconds", "The latest correction's lag (see correction_seconds)"
        )

    @cached_property
    def series(self) -> Gauge:
        return Gauge("portpulse_processor_series", "Series (sensor and metric) the processor holds state for")

    @cached_property
    def consumer_lag(self) -> Gauge:
        return Gauge(
            "portpulse_processor_consumer_lag",
            "Records in Kafka not yet consumed, per partition",
            ["topic", "partition"],
        )

    @cached_property
    def event_time_lag(self) -> Gauge:
        return Gauge(
            "portpulse_processor_event_time_lag_seconds",
            "Wall clock minus the median series' newest event time: how far a typical series trails real time",
        )

    @cached_property
    def batch_seconds(self) -> Histogram:
        return Histogram(
            "portpulse_processor_batch_seconds",
            "Time to decode, clean and window one Kafka fetch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


PROCESSOR_METRICS = ProcessorMetrics()
