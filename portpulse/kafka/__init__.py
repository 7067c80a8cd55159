"""The Kafka adapter: client options, producer start-up and batched sending (``client``), dead
letters to their topic (``deadletters``), topic creation and compacted topics (``compacted``), and the aiokafka
internals PortPulse's speed relies on, quarantined and checked at start-up (``hooks``)."""

from portpulse.kafka.client import (
    BatchSender,
    KafkaOut,
    client_options,
    committed_offsets,
    start_client,
    start_producer,
)
from portpulse.kafka.compacted import ensure_topics, read_compacted, read_topic, topic_partitions
from portpulse.kafka.deadletters import KafkaDeadLetters
from portpulse.kafka.hooks import check_hooks, columnar_consumer_options, fetched_columns

__all__ = [
    "BatchSender",
    "KafkaDeadLetters",
    "KafkaOut",
    "check_hooks",
    "client_options",
    "columnar_consumer_options",
    "committed_offsets",
    "ensure_topics",
    "fetched_columns",
    "read_compacted",
    "read_topic",
    "start_client",
    "start_producer",
    "topic_partitions",
]
