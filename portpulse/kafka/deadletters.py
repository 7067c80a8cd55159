"""Dead letters to the ``portpulse.dlq`` topic: the Kafka side of :class:`DeadLetterSink`."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from portpulse.contract.deadletter import DeadLetter, dead_letter_headers
from portpulse.contract.settings import KafkaSettings
from portpulse.contract.topics import dlq_topic
from portpulse.kafka.client import start_producer

__all__ = ["KafkaDeadLetters"]


class KafkaDeadLetters:
    """Dead letters to Kafka with ``acks=all`` and an idempotent producer."""

    def __init__(self, kafka: KafkaSettings, topic: str | None = None) -> None:
        self._kafka = kafka
        self.topic = topic or dlq_topic(kafka.topic_prefix)
        self._producer: Any = None

    async def __aenter__(self) -> KafkaDeadLetters:
        self._producer = await start_producer(self._kafka, "dead-letter producer", max_request_size=8 * 1024 * 1024)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaDeadLetters used outside 'async with'")
        futures = [
            await self._producer.send(self.topic, letter.payload, key=letter.key, headers=dead_letter_headers(letter))
            for letter in letters
        ]
        for fut in futures:
            await fut
