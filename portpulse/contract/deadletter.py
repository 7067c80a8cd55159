"""Dead letters: bad records travel as values, with the reason, to the ``portpulse.dlq`` topic.

The record is pure data (:class:`DeadLetter`) with a pure header encoding; stages hand letters to a
:class:`DeadLetterSink` (``portpulse.kafka.KafkaDeadLetters`` in production).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["DeadLetter", "DeadLetterSink", "MemoryDeadLetters", "dead_letter_headers"]


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
