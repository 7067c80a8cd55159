"""Prometheus metrics of the InfluxDB sink (process-wide, created on first use)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["SINK_METRICS", "SinkMetrics"]


@dataclass
class SinkMetrics:
    @cached_property
    def points(self) -> Counter:
        return Counter("portpulse_sink_points_written", "Points stored in InfluxDB")

    @cached_property
    def batches(self) -> Counter:
        return Counter("portpulse_sink_batches_written", "Write requests InfluxDB accepted")

    @cached_property
    def retries(self) -> Counter:
        return Counter("portpulse_sink_retries", "Write attempts retried (InfluxDB away, overloaded or misconfigured)")

    @cached_property
    def rejected(self) -> Counter:
        return Counter("portpulse_sink_points_rejected", "Points sent to the DLQ (refused by InfluxDB or unencodable)")

    @cached_property
    def write_seconds(self) -> Histogram:
        return Histogram(
            "portpulse_sink_write_seconds",
            "Latency of successful write requests",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    @cached_property
    def queue_depth(self) -> Gauge:
        return Gauge("portpulse_sink_queue_depth", "Batches waiting to be written")

    @cached_property
    def healthy(self) -> Gauge:
        return Gauge("portpulse_sink_healthy", "1 while InfluxDB accepts writes, 0 while the circuit is open")


SINK_METRICS = SinkMetrics()
