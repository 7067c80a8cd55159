"""Pure: decoded readings -> Kafka records (one per message, domain and sensor) and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ingest.decode import DecodedBatch, Message
from portpulse.deadletter import DeadLetter
from portpulse.kafka import KafkaOut
from portpulse.topics import readings_topic
from portpulse.wire import VERSION_HEADER, encode_singles, encode_value

__all__ = ["OutRecords", "build_dead_letters", "build_records"]


HEADERS: list[tuple[str, bytes]] = [VERSION_HEADER]  # shared by every record (read-only)


@dataclass(frozen=True, slots=True)
class OutRecords:
    """Kafka records ready for :class:`portpulse.kafka.BatchSender` (plain tuples: the bridge
    builds hundreds of thousands per second), with the MQTT message each came from and its
    reading count, ``(n,)`` lists."""

    records: list[KafkaOut]
    message: list[int]
    readings: list[int]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def topics(self) -> set[str]:
        return {topic for topic, *_ in self.records}


def build_records(batch: DecodedBatch, topic_prefix: str) -> OutRecords:
    """Encode each run of consecutive readings of one (message, domain, sensor, site) as a record.

    The decoder emits readings in message order and, within a message, in payload order, so
    records come out in message order and a sensor's readings keep their order. (A sensor that
    reappears later in the same payload simply gets a second record under the same key.)
    Runs are found with one vectorised comparison; runs of one reading (single-reading messages,
    gateway batches of distinct sensors) are encoded together by :func:`encode_singles`.
    """
    r = batch.readings
    n = len(r)
    if n == 0:
        return OutRecords([], [], [])
    message = batch.message_index
    change = np.empty(n, dtype=bool)
    change[0] = True
    change[1:] = message[1:] != message[:-1]
    for column in (r.sensor_id, r.domain, r.site):
        change[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(change)
    stops = np.append(starts[1:], n)
    topics: dict[str, str] = {}
    keys: dict[str, bytes] = {}
    out: list[KafkaOut] = []
    domain, sensor, site, metric = r.domain.tolist(), r.sensor_id.tolist(), r.site.tolist(), r.metric.tolist()
    msg = message.tolist()
    one = starts[stops - starts == 1]
    encoded_singles = encode_singles(r.site[one].tolist(), r.metric[one].tolist(), r.ts_ns[one], r.value[one],
                                     r.flags[one])  # fmt: skip
    if len(one) == n:  # every record holds one reading: no runs to walk
        topics = {d: readings_topic(d, topic_prefix) for d in set(domain)}
        keys = {name: name.encode() for name in set(sensor)}
        out = [(topics[d], keys[k], v, HEADERS) for d, k, v in zip(domain, sensor, encoded_singles, strict=True)]
        return OutRecords(out, msg, [1] * n)
    singles = iter(encoded_singles)
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        if stop - start == 1:
            encoded = next(singles)
        else:
            names = metric[start:stop]
            table = list(dict.fromkeys(names))
            index = [table.index(m) for m in names]
            encoded = encode_value(site[start], table, index, r.ts_ns[start:stop], r.value[start:stop],
                                   r.flags[start:stop])  # fmt: skip
        dom, name = domain[start], sensor[start]
        topic = topics.get(dom) or topics.setdefault(dom, readings_topic(dom, topic_prefix))
        key = keys.get(name) or keys.setdefault(name, name.encode())
        out.append((topic, key, encoded, HEADERS))
    return OutRecords(out, [msg[s] for s in starts.tolist()], (stops - starts).tolist())


def build_dead_letters(batch: DecodedBatch, messages: Sequence[Message]) -> list[tuple[int, DeadLetter]]:
    """One dead letter per message with problems: the original bytes, the first reason, all details."""
    letters = []
    for index, problems in batch.problems.items():
        msg = messages[index]
        detail = "; ".join(f"{p.reason}: {p.detail}" for p in problems[:20])
        if len(problems) > 20:
            detail += f"; ... {len(problems) - 20} more"
        letters.append(
            (
                index,
                DeadLetter(
                    payload=msg.payload,
                    reason=problems[0].reason,
                    source=msg.topic,
                    stage="ingest",
                    detail=detail,
                    time_ns=msg.received_ns,
                ),
            )
        )
    return letters
