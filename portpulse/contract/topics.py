"""Topic naming: MQTT topics gateways publish to and the Kafka topics PortPulse writes."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "DOMAIN_RE",
    "ID_RE",
    "MqttTopic",
    "dlq_topic",
    "late_topic",
    "parse_mqtt_topic",
    "readings_topic",
    "registry_topic",
]

DOMAIN_RE = re.compile(r"[a-z0-9_-]{1,64}")
# Site and sensor ids end up as InfluxDB tag values and Kafka keys; a conservative alphabet keeps
# them printable and unambiguous in every downstream format (no spaces, commas, quotes, '=' or '\').
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class MqttTopic:
    """The parts of ``{prefix}/{domain}/{site}/{sensor_id}``."""

    domain: str
    site: str
    sensor_id: str


@functools.lru_cache(maxsize=200_000)
def parse_mqtt_topic(topic: str, prefix: str = "sensors") -> MqttTopic | str:
    """Split an MQTT topic into its parts, or return the reason it is not a sensor topic.

    ``sensor_id`` may be empty for gateway batches (``{prefix}/{domain}/{site}``): each reading
    in the batch then names its own sensor.
    """
    parts = topic.split("/")
    if parts[0] != prefix:
        return f"topic prefix is not {prefix!r}"
    if len(parts) not in (3, 4):
        return "topic must be {prefix}/{domain}/{site}[/{sensor_id}]"
    domain, site = parts[1], parts[2]
    sensor_id = parts[3] if len(parts) == 4 else ""
    if not DOMAIN_RE.fullmatch(domain):
        return "domain must match [a-z0-9_-]{1,64}"
    if not ID_RE.fullmatch(site):
        return "site must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
    if sensor_id and not ID_RE.fullmatch(sensor_id):
        return "sensor_id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
    return MqttTopic(domain, site, sensor_id)


def readings_topic(domain: str, prefix: str = "portpulse") -> str:
    """Kafka topic carrying cleaned-for-transport readings of one domain, keyed by sensor_id."""
    return f"{prefix}.readings.{domain}"


def dlq_topic(prefix: str = "portpulse") -> str:
    """Kafka dead-letter topic: original payload plus reason, source topic and time headers."""
    return f"{prefix}.dlq"


def late_topic(prefix: str = "portpulse") -> str:
    """Kafka topic for readings that arrived behind an already closed window."""
    return f"{prefix}.late"


def registry_topic(prefix: str = "portpulse") -> str:
    """Compacted Kafka topic of the series the bridges admitted, keyed ``domain/site/sensor_id``,
    with their first- and last-seen times (a null value: the series was forgotten)."""
    return f"{prefix}.sensors"
