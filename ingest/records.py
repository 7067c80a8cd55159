"""Pure: decoded readings -> Kafka records (one per message, domain and sensor) and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.decode import DecodedBatch, Message
from portpulse.deadletter import DeadLetter
from portpulse.recordbatch import OutgoingRecords, encode_headers
from portpulse.sorting import factorise
from portpulse.topics import readings_topic
from portpulse.wire import VERSION_HEADER, encode_single_bodies, encode_value, value_header

__all__ = ["OutRecords", "build_dead_letters", "build_records"]


HEADERS = encode_headers([VERSION_HEADER])  # every record's header block


@dataclass(frozen=True, slots=True)
class OutRecords:
    """Kafka records of a batch of messages, as columns for
    :meth:`portpulse.kafka.BatchSender.send_columns`, with the MQTT message each came from and its
    reading count (int64 ``(n,)``)."""

    records: OutgoingRecords
    message: npt.NDArray[np.int64]
    readings: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.message)

    @property
    def topics(self) -> set[str]:
        return set(self.records.topics)


def build_records(batch: DecodedBatch, topic_prefix: str) -> OutRecords:
    """Encode each run of consecutive readings of one (message, domain, sensor, site) as a record.

    The decoder emits readings in message order and, within a message, in payload order, so
    records come out in message order and a sensor's readings keep their order. (A sensor that
    reappears later in the same payload simply gets a second record under the same key.)
    Runs are found with one vectorised comparison on column codes. A run of one reading (single
    reading messages, gateway batches of distinct sensors) is not encoded here at all: its value is
    two slices of the output buffer, the cached header of its (site, metric) and its 22-byte row
    from :func:`encode_single_bodies`; only longer runs are encoded one by one.
    """
    r = batch.readings
    n = len(r)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        nothing = OutgoingRecords(np.zeros(0, np.uint8), [], empty, [], empty, empty, ((empty, empty),), HEADERS)
        return OutRecords(nothing, empty, empty)
    domain, domains = factorise(r.domain.tolist())
    sensor, sensors = factorise(r.sensor_id.tolist())
    site, sites = factorise(r.site.tolist())
    metric, metrics = factorise(r.metric.tolist())
    message = batch.message_index
    change = np.empty(n, dtype=bool)
    change[0] = True
    change[1:] = message[1:] != message[:-1]
    for column in (sensor, domain, site):
        change[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(change)
    counts = np.diff(np.append(starts, n))
    single = counts == 1

    # The buffer: distinct keys | headers of the singles' (site, metric) pairs | single bodies | runs.
    keys = [name.encode() for name in sensors]
    key_blob = b"".join(keys)
    key_start = np.cumsum([0] + [len(k) for k in keys[:-1]], dtype=np.int64)
    one = starts[single]
    pair = site[one] * len(metrics) + metric[one]
    distinct_pairs, pair_code = np.unique(pair, return_inverse=True)
    heads = [value_header(sites[p // len(metrics)], (metrics[p % len(metrics)],)) for p in distinct_pairs.tolist()]
    head_blob = b"".join(heads)
    head_start = len(key_blob) + np.cumsum([0] + [len(h) for h in heads[:-1]], dtype=np.int64)
    head_len = np.array([len(h) for h in heads], dtype=np.int64)
    bodies = encode_single_bodies(r.ts_ns[one], r.value[one], r.flags[one])
    body_base = len(key_blob) + len(head_blob)
    runs = [
        encode_value(sites[site[a]], *_metric_table(metric[a:b], metrics), r.ts_ns[a:b], r.value[a:b], r.flags[a:b])
        for a, b in zip(starts[~single].tolist(), (starts[~single] + counts[~single]).tolist(), strict=True)
    ]
    run_base = body_base + bodies.size
    data = np.concatenate([np.frombuffer(key_blob + head_blob, np.uint8), bodies.ravel(),
                           np.frombuffer(b"".join(runs), np.uint8)])  # fmt: skip

    first_start = np.empty(len(starts), dtype=np.int64)
    first_len = np.empty(len(starts), dtype=np.int64)
    second_start = np.zeros(len(starts), dtype=np.int64)
    second_len = np.zeros(len(starts), dtype=np.int64)
    first_start[single], first_len[single] = head_start[pair_code], head_len[pair_code]
    second_start[single] = body_base + np.arange(len(one), dtype=np.int64) * bodies.shape[1]
    second_len[single] = bodies.shape[1]
    run_len = np.array([len(v) for v in runs], dtype=np.int64)
    first_start[~single] = run_base + np.cumsum(run_len) - run_len
    first_len[~single] = run_len
    topics = [readings_topic(d, topic_prefix) for d in domains]
    records = OutgoingRecords(data, topics, domain[starts], keys, sensor[starts], key_start,
                              ((first_start, first_len), (second_start, second_len)), HEADERS)  # fmt: skip
    return OutRecords(records, message[starts], counts)


def _metric_table(codes: npt.NDArray[np.int64], names: list[str]) -> tuple[list[str], list[int]]:
    """A run's metric-name table (first-seen order) and each reading's index into it."""
    table = list(dict.fromkeys(codes.tolist()))
    return [names[c] for c in table], [table.index(c) for c in codes.tolist()]


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
