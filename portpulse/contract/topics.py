"""Topic naming: MQTT topics gateways publish to and the Kafka topics PortPulse writes."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from portpulse.contract.settings import KafkaSettings

__all__ = [
    "DOMAIN_RE",
    "ID_RE",
    "MqttTopic",
    "births_topic",
    "dlq_topic",
    "is_readings_topic",
    "late_topic",
    "parse_mqtt_topic",
    "parse_mqtt_topics",
    "pipeline_topics",
    "readings_topic",
    "registry_topic",
    "replayed_topic",
    "retention_shortfall",
    "topic_configs",
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


#: Topics parsed by :func:`parse_mqtt_topics`, per prefix (bounded like parse_mqtt_topic's cache).
_PARSED: dict[str, dict[str, MqttTopic | str]] = {}
_PARSED_MAX = 200_000


def parse_mqtt_topics(topics: list[str], prefix: str = "sensors") -> list[MqttTopic | str]:
    """:func:`parse_mqtt_topic` of each topic of a delivery: a topic seen before costs one dict
    lookup, in a pass in C, instead of a call (a fleet's sensors publish on the same topics)."""
    known = _PARSED.setdefault(prefix, {})
    parsed = list(map(known.get, topics))
    if None in parsed:
        if len(known) > _PARSED_MAX:
            known.clear()
        for i, found in enumerate(parsed):
            if found is None:
                parsed[i] = known[topics[i]] = parse_mqtt_topic(topics[i], prefix)
    return cast(list[MqttTopic | str], parsed)


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


def births_topic(prefix: str = "portpulse") -> str:
    """Compacted Kafka topic of the Sparkplug births the bridge holds, keyed
    ``group/edge_node[/device]``, valued with the NBIRTH/DBIRTH payload (a null value: it died)."""
    return f"{prefix}.sparkplug.births"


def replayed_topic(prefix: str = "portpulse") -> str:
    """Compacted Kafka topic of the dead letters ``portpulse dlq replay`` sent back, keyed
    ``partition:offset`` of the DLQ, valued with the time of the replay (ns, text)."""
    return f"{prefix}.dlq.replayed"


def is_readings_topic(topic: str, prefix: str = "portpulse") -> bool:
    return topic.startswith(f"{prefix}.readings.")


def pipeline_topics(prefix: str, domains: Iterable[str]) -> set[str]:
    """Every Kafka topic the pipeline writes, for these domains: created and checked at start-up."""
    return {readings_topic(d, prefix) for d in domains} | {
        dlq_topic(prefix),
        late_topic(prefix),
        registry_topic(prefix),
    }


def topic_configs(topic: str, kafka: KafkaSettings) -> dict[str, str]:
    """The topic configs PortPulse creates ``topic`` with: retention and cleanup policy by kind
    (readings, DLQ, late), compaction for the registry; ``{}`` for a topic that is not ours."""
    prefix = kafka.topic_prefix
    if topic in (registry_topic(prefix), replayed_topic(prefix), births_topic(prefix)):
        return {"cleanup.policy": "compact"}
    retention_s = {dlq_topic(prefix): kafka.dlq_retention_s, late_topic(prefix): kafka.late_retention_s}.get(topic)
    if retention_s is None and is_readings_topic(topic, prefix):
        retention_s = kafka.readings_retention_s
    if retention_s is None:
        return {}
    retention_ms = -1 if retention_s < 0 else int(retention_s * 1000)
    return {"cleanup.policy": kafka.cleanup_policy, "retention.ms": str(retention_ms)}


def retention_shortfall(topic: str, retention_ms: int, kafka: KafkaSettings, horizon_s: float) -> str | None:
    """Why an existing topic's ``retention.ms`` (-1: forever) is too short, or None. A readings
    topic must keep the correction horizon (``horizon_s``: a start-up error, see
    :func:`is_readings_topic`); the others what their ``kafka.*_retention_s`` asks (a warning)."""
    if retention_ms < 0:
        return None
    days = f"{retention_ms / 86_400_000:g} days (retention.ms={retention_ms})"
    if is_readings_topic(topic, kafka.topic_prefix):
        if retention_ms >= horizon_s * 1000:
            return None
        return (
            f"Kafka topic {topic} keeps records {days}, less than the correction horizon of "
            f"{horizon_s / 86_400:g} days (ingest.max_past_s): a correction could need readings Kafka has "
            f"deleted. Raise it: kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
            f"--add-config retention.ms={int(kafka.readings_retention_s * 1000)}"
        )
    asked = topic_configs(topic, kafka).get("retention.ms")
    wanted = int(asked) if asked is not None else None
    if wanted is None or 0 <= wanted <= retention_ms:
        return None
    return f"Kafka topic {topic} keeps records {days}; the settings ask for retention.ms={wanted}"
