"""Ingest: MQTT -> Kafka. Pure decoders (``ingest.decode``, ``ingest.records``), the paho adapter
(``ingest.mqtt``) and the bridge loop (``ingest.bridge``)."""

from portpulse.ingest.decode import DecodedBatch, DecodeLimits, Message, Problem, decode_messages
from portpulse.ingest.records import OutRecords, build_dead_letters, build_records

__all__ = [
    "DecodeLimits",
    "DecodedBatch",
    "Message",
    "OutRecords",
    "Problem",
    "build_dead_letters",
    "build_records",
    "decode_messages",
]
