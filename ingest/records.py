"""Pure: decoded readings -> Kafka records (one per message, domain and sensor) and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ingest.decode import DecodedBatch, Message
from portpulse.deadletter import DeadLetter
from portpulse.topics import readings_topic
from portpulse.wire import VERSION_HEADER, encode_value

__all__ = ["OutRecord", "build_dead_letters", "build_records"]


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
        return [VERSION_HEADER]


def build_records(batch: DecodedBatch, topic_prefix: str) -> list[OutRecord]:
    """Group readings by (message, domain, sensor) into compactly encoded records, in message order."""
    r = batch.readings
    n = len(r)
    if n == 0:
        return []
    # Stable sort by message keeps each sensor's readings in payload order inside its record.
    order = np.argsort(batch.message_index, kind="stable")
    msg = batch.message_index[order]
    domain, sensor, site, metric = r.domain[order], r.sensor_id[order], r.site[order], r.metric[order]
    groups: dict[tuple[int, str, str, str], list[int]] = {}
    for pos, key in enumerate(zip(msg.tolist(), domain.tolist(), sensor.tolist(), site.tolist(), strict=True)):
        groups.setdefault(key, []).append(pos)
    out = []
    for (message, dom, sensor_id, site_name), positions in groups.items():
        idx = order[positions]
        names = metric[positions].tolist()
        table = list(dict.fromkeys(names))
        lookup = {name: k for k, name in enumerate(table)}
        value = encode_value(
            site_name,
            table,
            np.fromiter((lookup[m] for m in names), dtype=np.uint8, count=len(names)),
            r.ts_ns[idx],
            r.value[idx],
            r.flags[idx],
        )
        out.append(OutRecord(readings_topic(dom, topic_prefix), sensor_id.encode(), value, message, len(positions)))
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
