"""Prometheus metrics of the MQTT -> Kafka bridge (process-wide, created on first use)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["INGEST_METRICS", "IngestMetrics"]


@dataclass
class IngestMetrics:
    @cached_property
    def messages(self) -> Counter:
        return Counter("portpulse_ingest_messages_received", "MQTT messages received")

    @cached_property
    def readings(self) -> Counter:
        return Counter("portpulse_ingest_readings_produced", "Readings Kafka acknowledged")

    @cached_property
    def dlq(self) -> Counter:
        return Counter("portpulse_ingest_dlq", "Rejected values or messages sent to the DLQ, by reason", ["reason"])

    @cached_property
    def refused(self) -> Counter:
        return Counter(
            "portpulse_ingest_refused_readings",
            "Readings the admission gate sent to the DLQ (cardinality_limit, unknown_sensor); messages over a "
            'site\'s rate ceiling are counted undecoded by portpulse_ingest_dlq{reason="rate_limit"}',
            ["reason"],
        )

    @cached_property
    def known_series(self) -> Gauge:
        return Gauge("portpulse_ingest_known_series", "Series (domain, site, sensor_id) the bridge has admitted")

    @cached_property
    def reconnects(self) -> Counter:
        return Counter("portpulse_ingest_mqtt_reconnects", "MQTT reconnections")

    @cached_property
    def mqtt_connected(self) -> Gauge:
        return Gauge("portpulse_ingest_mqtt_connected", "1 while the bridge is connected to MQTT")

    @cached_property
    def mqtt_subscribed(self) -> Gauge:
        return Gauge("portpulse_ingest_mqtt_subscribed", "1 once the broker acknowledged the subscription (SUBACK)")

    @cached_property
    def broker_shortfalls(self) -> Counter:
        return Counter(
            "portpulse_ingest_mqtt_broker_shortfalls",
            "Connections on which the broker did not grant what the configuration asked, by kind",
            ["kind"],
        )

    @cached_property
    def in_flight(self) -> Gauge:
        return Gauge("portpulse_ingest_in_flight", "MQTT messages received and not yet acknowledged")

    @cached_property
    def kafka_send_seconds(self) -> Histogram:
        return Histogram(
            "portpulse_ingest_kafka_send_seconds",
            "Time from handing a batch to Kafka until every record is acknowledged",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
        )

    @cached_property
    def kafka_healthy(self) -> Gauge:
        return Gauge("portpulse_ingest_kafka_healthy", "1 while Kafka acknowledges records, 0 while retrying")

    @cached_property
    def sparkplug_online(self) -> Gauge:
        return Gauge(
            "portpulse_sparkplug_node_online",
            "1 while a Sparkplug edge node is born and not dead, 0 after its NDEATH",
            ["group", "edge_node"],
        )

    @cached_property
    def sparkplug_rebirths(self) -> Counter:
        return Counter(
            "portpulse_sparkplug_rebirth_requests", "Rebirth requests (NCMD) sent to edge nodes", ["group", "edge_node"]
        )

    @cached_property
    def sparkplug_values(self) -> Counter:
        return Counter(
            "portpulse_sparkplug_values",
            "Sparkplug metric values not stored as readings, by kind: null (is_null), unmapped "
            "(the mapping file lacks the name), and historical values stored (is_historical)",
            ["kind"],
        )


INGEST_METRICS = IngestMetrics()
