"""Dead letters: bad records travel as values, with the reason, to the ``portpulse.dlq`` topic.

The record is pure data (:class:`DeadLetter`) with a pure header encoding; :class:`KafkaDeadLetters`
is the thin aiokafka adapter every stage shares, behind the :class:`DeadLetterSink` protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from portpulse.settings import KafkaSettings
from portpulse.topics import dlq_topic

__all__ = ["DeadLetter", "DeadLetterSink", "KafkaDeadLetters", "MemoryDeadLetters", "dead_letter_headers"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected record: the original bytes and why, where from and when (ns since the epoch)."""

    payload: bytes
    reason: str
    source: str
    stage: str
    detail: str = ""
    key: bytes | None = None
    time_ns: int = field(default_factory=time.time_ns)


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead letter (all UTF-8 text)."""
    return [
        ("reason", letter.reason.encode()),
        ("source", letter.source.encode()),
        ("stage", letter.stage.encode()),
        ("detail", letter.detail[:4000].encode()),
        ("time_ns", str(letter.time_ns).encode()),
    ]


class DeadLetterSink(Protocol):
    """Where stages hand rejected records; ``send`` returns once they are durably stored."""

    async def send(self, letters: Sequence[DeadLetter]) -> None: ...


class MemoryDeadLetters:
    """A dead-letter sink that keeps letters in a list (for tools and unit tests of pure logic)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


class KafkaDeadLetters:
    """Dead letters to Kafka with ``acks=all`` and an idempotent producer."""

    def __init__(self, kafka: KafkaSettings, topic: str | None = None) -> None:
        self._kafka = kafka
        self.topic = topic or dlq_topic(kafka.topic_prefix)
        self._producer: Any = None

    async def __aenter__(self) -> KafkaDeadLetters:
        from portpulse.kafka import start_producer

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
