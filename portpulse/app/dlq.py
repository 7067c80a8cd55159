"""``portpulse dlq``: what the dead-letter topic holds (``summary``, ``show``) and sending its
records back through the bridge's decode path (``replay``).

Pure: reading a record's headers (:func:`dlq_record`), filters, the summary and the rows shown.
I/O: reading the topic (:func:`read_dlq`) and the replay, which runs the records through a
:class:`~portpulse.ingest.bridge.Bridge` (decoding, the admission gate, Kafka, dead letters for
what still fails) exactly as if they had arrived over MQTT now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from portpulse.app.times import iso_time
from portpulse.contract.settings import Settings
from portpulse.contract.topics import MqttTopic, dlq_topic, parse_mqtt_topic, replayed_topic

__all__ = [
    "DlqFilter",
    "DlqRecord",
    "ReplayReport",
    "dlq_record",
    "read_dlq",
    "replay",
    "replayed_letters",
    "show_rows",
    "summary_rows",
]

Row = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One dead letter as stored: where it sits (partition, offset), the original bytes, why, and
    where it came from. ``domain``, ``site`` and ``sensor_id`` are read off an MQTT source topic
    (empty where the source is not one, or for a gateway batch's sensor)."""

    partition: int
    offset: int
    payload: bytes
    reason: str
    source: str
    stage: str
    detail: str
    time_ns: int
    domain: str = ""
    site: str = ""
    sensor_id: str = ""
    size: int = 0  # of the payload as stored (bytes), kept when a summary drops the payload

    def without_payload(self) -> DlqRecord:
        return dataclasses.replace(self, payload=b"")


def dlq_record(
    partition: int, offset: int, headers: Sequence[tuple[str, bytes]], value: bytes | None, mqtt_prefix: str
) -> DlqRecord:
    """A dead letter from its Kafka record (headers as :func:`dead_letter_headers` writes them)."""
    h = {k: v.decode("utf-8", "replace") for k, v in headers}
    source = h.get("source", "")
    topic = parse_mqtt_topic(source, mqtt_prefix) if source else "no source"
    where = (topic.domain, topic.site, topic.sensor_id) if isinstance(topic, MqttTopic) else ("", "", "")
    return DlqRecord(
        partition, offset, value or b"", h.get("reason", "unknown"), source, h.get("stage", ""), h.get("detail", ""),
        int(h["time_ns"]) if h.get("time_ns", "").isdigit() else 0, *where, size=len(value or b""),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which dead letters a command takes; None matches anything. Times are ns since the epoch
    (the letter's ``time_ns``: when the stage rejected it), ``until_ns`` excluded."""

    reason: str | None = None
    stage: str | None = None
    domain: str | None = None
    site: str | None = None
    sensor_id: str | None = None
    since_ns: int | None = None
    until_ns: int | None = None

    def matches(self, r: DlqRecord) -> bool:
        # a gateway batch's topic names no sensor: its payload does
        named = r.sensor_id == self.sensor_id or (not r.sensor_id and f'"{self.sensor_id}"'.encode() in r.payload)
        return (
            (self.sensor_id is None or named)
            and self.reason in (None, r.reason)
            and self.stage in (None, r.stage)
            and self.domain in (None, r.domain)
            and self.site in (None, r.site)
            and (self.since_ns is None or r.time_ns >= self.since_ns)
            and (self.until_ns is None or r.time_ns < self.until_ns)
        )


def summary_rows(records: Iterable[DlqRecord], bucket_ns: int) -> list[Row]:
    """Counts and payload bytes per (time bucket, reason, domain, site): oldest bucket first,
    most letters first within it. A bucket is labelled with its start (UTC)."""
    counts: dict[tuple[int, str, str, str], list[int]] = {}
    for r in records:
        key = (r.time_ns // bucket_ns * bucket_ns, r.reason, r.domain or "-", r.site or "-")
        entry = counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += r.size
    ordered = sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1][0], kv[0][1:]))
    return [
        {"from": iso_time(start), "reason": reason, "domain": domain, "site": site, "letters": n, "payload_bytes": size}
        for (start, reason, domain, site), (n, size) in ordered
    ]


#: Control characters as escapes: a payload's newline must not end a row of the table.
_ESCAPED = {c: repr(chr(c))[1:-1] for c in [*range(32), 127]}


def show_rows(records: Iterable[DlqRecord], payload_chars: int | None = 200) -> list[Row]:
    """One row per letter: where it sits, when, why, from where, and its payload as text
    (control characters escaped; cut to ``payload_chars``; None: whole)."""
    rows: list[Row] = []
    for r in records:
        text = r.payload.decode("utf-8", "backslashreplace").translate(_ESCAPED)
        if payload_chars is not None and len(text) > payload_chars:
            text = f"{text[:payload_chars]}... ({len(r.payload)} bytes)"
        rows.append({
            "at": f"{r.partition}:{r.offset}", "time": iso_time(r.time_ns), "reason": r.reason, "stage": r.stage,
            "source": r.source, "detail": r.detail, "payload": text,
        })  # fmt: skip
    return rows


async def read_dlq(
    settings: Settings, which: DlqFilter, include_replayed: bool = False, timeout_s: float = 120.0
) -> AsyncIterator[list[DlqRecord]]:
    """Batches of the dead letters ``which`` selects, oldest offsets first per partition; without
    ``include_replayed``, not those a replay already sent back (see :func:`replayed_letters`)."""
    from portpulse.kafka import read_topic

    skip = set() if include_replayed else await replayed_letters(settings)

    # A letter is written after it was rejected: none rejected since T was written before T.
    since_ms = which.since_ns // 10**6 if which.since_ns is not None else None
    prefix = settings.mqtt.topic_prefix
    topic = dlq_topic(settings.kafka.topic_prefix)
    async for records in read_topic(settings.kafka, topic, since_ms=since_ms, timeout_s=timeout_s):
        letters = [dlq_record(r.partition, r.offset, r.headers, r.value, prefix) for r in records
                   if (r.partition, r.offset) not in skip]  # fmt: skip
        chosen = [letter for letter in letters if which.matches(letter)]
        if chosen:
            yield chosen


async def replayed_letters(settings: Settings) -> set[tuple[int, int]]:
    """The (partition, offset) of every dead letter a replay has sent back."""
    from portpulse.kafka import read_compacted

    out = set()
    for key, value in (await read_compacted(settings.kafka, replayed_topic(settings.kafka.topic_prefix))).items():
        partition, _, offset = key.decode().partition(":")
        if value is not None and partition.isdigit() and offset.isdigit():
            out.add((int(partition), int(offset)))
    return out


@dataclass
class ReplayReport:
    """What a replay did (or, dry, would do)."""

    selected: int = 0
    replayed: int = 0  # sent through the bridge's decode path
    not_replayable: dict[str, int] = field(default_factory=dict)  # per stage: letters of other stages
    readings: int = 0  # readings produced to the readings topics
    failed_again: dict[str, int] = field(default_factory=dict)  # per reason: problems of letters that failed again


class _ListSource:
    """An MQTT source holding a fixed list of messages (what a replay sends through the bridge)."""

    def __init__(self, waiting: list[Any]) -> None:
        self._waiting, self._total = waiting, len(waiting)
        self.acked = 0
        self.all_acked = asyncio.Event()
        self.reconnects = 0
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return True

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Any]:
        got, self._waiting = self._waiting[:max_messages], self._waiting[max_messages:]
        if not got:
            await asyncio.sleep(min(wait_s, 0.01))
        return got

    def ack(self, inbound: Any) -> bool:
        return self.ack_all([inbound]) == 1

    def ack_all(self, inbound: list[Any]) -> int:
        self.acked += len(inbound)
        if self.acked >= self._total:
            self.all_acked.set()
        return len(inbound)

    def publish(self, topic: str, payload: bytes) -> bool:
        return False


class _DrySink:
    """A record sink that keeps nothing: a dry run counts what the bridge would send."""

    async def ensure_topics(self, topics: set[str]) -> None:
        return None

    async def send(self, records: Any, others: list[Any]) -> int:
        return 0


async def replay(
    settings: Settings, batches: AsyncIterator[list[DlqRecord]], dry_run: bool = False, chunk: int = 5_000
) -> ReplayReport:
    """Send the ingest-stage letters of ``batches`` through the bridge as if they arrived over
    MQTT now: decoded, held to the admission budgets (not to the per-site rate ceiling: a
    replay is the operator's choice), their readings produced to the readings topics, and what
    still fails dead-lettered again with its new reason. Each letter sent back is recorded in
    the replayed topic once Kafka has what it made. Replaying a letter twice stores its readings
    once (the same reading again is no fault). ``dry_run`` sends and records nothing."""
    from portpulse.codecs.recordbatch import OutgoingRecords
    from portpulse.ingest.bridge import Bridge, KafkaRecordSink, load_admission, start_sparkplug_host
    from portpulse.ingest.decode import Message
    from portpulse.ingest.mqtt import Inbound

    settings = settings.model_copy(update={"admission": settings.admission.model_copy(update={"site_rate_per_s": 0.0})})
    report = ReplayReport()
    marked = replayed_topic(settings.kafka.topic_prefix)
    admission = await load_admission(settings)
    # Sparkplug letters decode against the births the bridge holds now (see SparkplugHost.live).
    sparkplug = await start_sparkplug_host(settings, live=False) if settings.sparkplug.enabled else None
    sink: Any = _DrySink() if dry_run else KafkaRecordSink(settings)
    if not dry_run:
        await sink.__aenter__()
    try:
        pending: list[DlqRecord] = []

        async def run(letters: list[DlqRecord]) -> None:
            now = time.time_ns()
            inbound = [Inbound(Message(r.source, r.payload, now), mid=i, qos=1, generation=0) for i, r in
                       enumerate(letters)]  # fmt: skip
            source = _ListSource(inbound)
            bridge = Bridge(settings, source, sink, admission, sparkplug)
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.run(stop))
            acked = asyncio.create_task(source.all_acked.wait())
            await asyncio.wait({task, acked}, return_when=asyncio.FIRST_COMPLETED)
            acked.cancel()
            stop.set()
            await task
            if not dry_run and source.all_acked.is_set():
                when = str(time.time_ns()).encode()
                marks = [(marked, f"{r.partition}:{r.offset}".encode(), when, None) for r in letters]
                await sink.ensure_topics({marked})
                await sink.send(OutgoingRecords.empty(), marks)
            report.replayed += len(letters)
            report.readings += bridge.stats.readings
            for reason, count in bridge.stats.rejected_by_reason.items():
                report.failed_again[reason] = report.failed_again.get(reason, 0) + count

        async for letters in batches:
            report.selected += len(letters)
            for letter in letters:
                if letter.stage != "ingest" or not letter.source:
                    report.not_replayable[letter.stage] = report.not_replayable.get(letter.stage, 0) + 1
                else:
                    pending.append(letter)
            while len(pending) >= chunk:
                await run(pending[:chunk])
                pending = pending[chunk:]
        if pending:
            await run(pending)
    finally:
        if not dry_run:
            await sink.__aexit__(None, None, None)
    return report
