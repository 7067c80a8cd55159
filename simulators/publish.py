"""Where simulated streams go: MQTT at a target rate, or a file to replay later.

The rate limiter compares each message's due time with the monotonic clock: ahead of schedule it
sleeps, behind it publishes without sleeping (catching up), so the achieved rate converges on the
target unless the machine cannot keep up, which the report then shows.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from portpulse.simulators.rawmqtt import RawPublisher
from portpulse.simulators.stream import Block, FaultRecord, OutMessage

__all__ = ["MqttTarget", "PublishReport", "publish", "read_stream", "write_stream"]

_HEADER = struct.Struct("<dIHI")  # due_s, seq, topic length, payload length
_MAGIC = b"PPSIM1\n"


@dataclass(frozen=True, slots=True)
class MqttTarget:
    host: str
    port: int
    qos: int = 0
    client_id: str = "portpulse-simulator"
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class PublishReport:
    messages: int
    reports: int
    faults: int
    elapsed_s: float

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Progress:
    def __init__(self, out: TextIO | None, target_rate: float | None) -> None:
        self._out = out
        self._target = target_rate
        self._next = time.monotonic() + 1.0

    def tick(self, start: float, messages: int, reports: int, done: bool = False) -> None:
        now = time.monotonic()
        if self._out is None or (now < self._next and not done):
            return
        self._next = now + 1.0
        elapsed = max(now - start, 1e-9)
        target = f" (target {self._target:,.0f})" if self._target else ""
        end = "\n" if done or not self._out.isatty() else "\r"
        self._out.write(f"{elapsed:6.1f}s  {messages:,} messages  {reports / elapsed:,.0f} reports/s{target}    {end}")
        self._out.flush()


def publish(
    blocks: Iterable[Block],
    target: MqttTarget,
    manifest: TextIO | None = None,
    progress: TextIO | None = sys.stderr,
    target_rate: float | None = None,
) -> PublishReport:
    """Publish every block's messages when due and write the faults to ``manifest``."""
    bar = _Progress(progress, target_rate)
    messages = reports = faults = 0
    sender = RawPublisher(target.host, target.port, target.client_id, target.username, target.password, qos=target.qos)
    start = time.monotonic()
    try:
        for block in blocks:
            reports += block.reports
            faults += _write_faults(manifest, block.faults)
            for msg in block.messages:
                ahead = msg.due_s - (time.monotonic() - start)
                if ahead > 0.002:
                    sender.flush()  # send what is due before sleeping
                    time.sleep(ahead)
                sender.publish(msg.topic, msg.payload)
                messages += 1
            sender.flush()
            bar.tick(start, messages, reports)
        sender.settle()  # QoS 1: every message acknowledged by the broker
    finally:
        sender.close()
    elapsed = time.monotonic() - start
    bar.tick(start, messages, reports, done=True)
    return PublishReport(messages, reports, faults, elapsed)


def _write_faults(manifest: TextIO | None, faults: list[FaultRecord]) -> int:
    if manifest is not None:
        for fault in faults:
            manifest.write(fault.to_json() + "\n")
    return len(faults)


def write_stream(blocks: Iterable[Block], out: BinaryIO, manifest: TextIO | None = None) -> PublishReport:
    """Write the stream to a file for :func:`read_stream` (same bytes, same due times)."""
    out.write(_MAGIC)
    messages = reports = faults = 0
    for block in blocks:
        reports += block.reports
        faults += _write_faults(manifest, block.faults)
        for msg in block.messages:
            topic = msg.topic.encode()
            out.write(_HEADER.pack(msg.due_s, msg.seq, len(topic), len(msg.payload)))
            out.write(topic)
            out.write(msg.payload)
            messages += 1
    return PublishReport(messages, reports, faults, 0.0)


def read_stream(path: Path, speed: float = 1.0) -> Iterator[Block]:
    """The messages of a file written by :func:`write_stream`, in blocks; ``speed`` scales time."""
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError(f"{path} is not a PortPulse simulator stream")
        batch: list[OutMessage] = []
        while header := f.read(_HEADER.size):
            if len(header) < _HEADER.size:
                raise ValueError(f"{path} is truncated")
            due, seq, topic_len, payload_len = _HEADER.unpack(header)
            topic = f.read(topic_len).decode()
            payload = f.read(payload_len)
            if len(payload) < payload_len:
                raise ValueError(f"{path} is truncated")
            batch.append(OutMessage(seq, due / speed, topic, payload))
            if len(batch) >= 1000:
                yield Block(batch, [], len(batch))
                batch = []
        if batch:
            yield Block(batch, [], len(batch))
