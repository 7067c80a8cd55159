"""PortPulse: streaming ingestion for smart-port sensors (MQTT -> Kafka -> numpy windows -> InfluxDB).

This package is the shared contract: settings, reading schema, metric catalogue, topic names and errors.
"""

from portpulse.contract.catalogue import Catalogue, MetricSpec, load_catalogue
from portpulse.contract.errors import (
    ConfigError,
    DecodeError,
    PortPulseError,
    ServiceUnavailableError,
    SinkRejectedError,
)
from portpulse.contract.schema import FLAG_TS_FROM_RECEIVE, Reading, ReadingColumns
from portpulse.contract.settings import Settings, load_settings
from portpulse.contract.topics import dlq_topic, late_topic, parse_mqtt_topic, readings_topic

__version__ = "0.1.0"

__all__ = [
    "FLAG_TS_FROM_RECEIVE",
    "Catalogue",
    "ConfigError",
    "DecodeError",
    "MetricSpec",
    "PortPulseError",
    "Reading",
    "ReadingColumns",
    "ServiceUnavailableError",
    "Settings",
    "SinkRejectedError",
    "__version__",
    "dlq_topic",
    "late_topic",
    "load_catalogue",
    "load_settings",
    "parse_mqtt_topic",
    "readings_topic",
]
