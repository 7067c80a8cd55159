"""Pure: decoded readings -> Kafka records (one per message, domain and sensor) and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ingest.decode import DecodedBatch, Message
from portpulse.deadletter import DeadLetter
from portpulse.topics import readings_topic
from portpulse.wire import VERSION_HEADER, encode_single, encode_value

__all__ = ["OutRecord", "build_dead_letters", "build_records"]


HEADERS = [VERSION_HEADER]  # shared by every record (read-only)


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A Kafka record and the index of the MQTT message it came from."""

    topic: str
    key: bytes
    value: bytes
    message: int
    readings: int

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return HEADERS


def build_records(batch: DecodedBatch, topic_prefix: str) -> list[OutRecord]:
    """Encode each run of consecutive readings of one (message, domain, sensor, site) as a record.

    The decoder emits readings in message order and, within a message, in payload order, so
    records come out in message order and a sensor's readings keep their order. (A sensor that
    reappears later in the same payload simply gets a second record under the same key.)
    """
    r = batch.readings
    n = len(r)
    if n == 0:
        return []
    message, domain, sensor, site = (
        batch.message_index.tolist(),
        r.domain.tolist(),
        r.sensor_id.tolist(),
        r.site.tolist(),
    )
    metric, ts, value, flags = r.metric.tolist(), r.ts_ns.tolist(), r.value.tolist(), r.flags.tolist()
    topics: dict[str, str] = {}
    out = []
    start = 0
    while start < n:
        key = (message[start], domain[start], sensor[start], site[start])
        stop = start + 1
        while stop < n and (message[stop], domain[stop], sensor[stop], site[stop]) == key:
            stop += 1
        if stop - start == 1:  # one reading per record: the common case, packed directly
            encoded = encode_single(key[3], metric[start], ts[start], value[start], flags[start])
        else:
            names = metric[start:stop]
            table = list(dict.fromkeys(names))
            index = [table.index(m) for m in names]
            encoded = encode_value(key[3], table, index, ts[start:stop], value[start:stop], flags[start:stop])
        dom = key[1]
        topic = topics.get(dom) or topics.setdefault(dom, readings_topic(dom, topic_prefix))
        out.append(OutRecord(topic, key[2].encode(), encoded, key[0], stop - start))
        start = stop
    return out


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
