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
        return Counter("portpulse_processor_late", "Readings behind a closed window, sent to portpulse.late")

    @cached_property
    def consumer_lag(self) -> Gauge:
        return Gauge(
            "portpulse_processor_consumer_lag",
            "Records in Kafka not yet consumed, per partition",
            ["topic", "partition"],
        )

    @cached_property
    def watermark_lag(self) -> Gauge:
        return Gauge(
            "portpulse_processor_watermark_lag_seconds",
            "Wall clock minus the oldest partition watermark: how far window closing trails real time",
        )

    @cached_property
    def batch_seconds(self) -> Histogram:
        return Histogram(
            "portpulse_processor_batch_seconds",
            "Time to decode, clean and window one Kafka fetch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


PROCESSOR_METRICS = ProcessorMetrics()
