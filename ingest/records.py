"""Pure: decoded readings -> Kafka records (one per sensor of a delivery) and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from portpulse.arrays import distinct_codes, factorise, group_starts, stable_sort
from portpulse.codecs.recordbatch import OutgoingRecords, encode_headers
from portpulse.codecs.wire import VERSION_HEADER, encode_rows, value_header
from portpulse.contract.deadletter import DeadLetter
from portpulse.contract.topics import readings_topic
from portpulse.ingest.decode import DecodedBatch, Message, SeriesCodes

__all__ = ["OutRecords", "SeriesCodes", "build_dead_letters", "build_records"]


HEADERS = encode_headers([VERSION_HEADER])  # every record's header block
#: Readings per record at most: 74 KB values, far below Kafka's 1 MB message limit, however many
#: readings of one sensor a 2 MiB delivery brings.
MAX_READINGS_PER_RECORD = 4096


@dataclass(frozen=True, slots=True)
class OutRecords:
    """Kafka records of a batch of messages, as columns for
    :meth:`portpulse.kafka.BatchSender.send_columns`, with the MQTT message of each record's first
    reading and its reading count (int64 ``(n,)``)."""

    records: OutgoingRecords
    message: npt.NDArray[np.int64]
    readings: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.message)

    @property
    def topics(self) -> set[str]:
        return set(self.records.topics)


#: Metric names per record at most: a record's name table is a bitmask over one block of this
#: many of the delivery's distinct metric names (a sensor reporting more spans several records).
METRICS_PER_RECORD = 62


def build_records(batch: DecodedBatch, topic_prefix: str, codes: SeriesCodes | None = None) -> OutRecords:
    """Encode the readings of one delivery as one record per (domain, sensor, site), all its
    metrics in it.

    A stable sort by those codes gathers each sensor's readings in arrival order, whichever MQTT
    messages they came in (a delivery's messages are acknowledged together, after Kafka has every
    record). A fleet's report of 7 metrics is one record, not 7, and a gateway reporting often
    puts many reports of a sensor in one: the record framing, Kafka's and the processor's
    per-record work shrink with them. Each record's name table lists the metrics it holds (a
    bitmask of the delivery's metric codes, so equal sets share one cached header) and each row
    indexes it. No value is encoded one by one: each is three slices of one buffer, the header,
    its count, and its run of 18-byte rows (:func:`encode_rows`, in sorted order).
    """
    r = batch.readings
    n = len(r)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return OutRecords(OutgoingRecords.empty(HEADERS), empty, empty)
    codes = codes or batch.codes or SeriesCodes.of(r)
    domain, domains, sensor, sensors, site, sites = (
        codes.domain,
        codes.domains,
        codes.sensor,
        codes.sensors,
        codes.site,
        codes.sites,
    )
    if codes.metric is not None and codes.metrics is not None:  # the decoder had them at hand
        metric, metrics = codes.metric, codes.metrics
    else:
        metric, metrics = factorise(r.metric.tolist())
    block, bit = np.divmod(metric, METRICS_PER_RECORD)
    blocks = len(metrics) // METRICS_PER_RECORD + 1
    key = domain  # the record code: one int64 per reading
    for column, size in ((sensor, len(sensors)), (site, len(sites)), (block, blocks)):
        if (int(key.max()) + 1) * size >= 2**62:  # too wide to extend (hostile input): renumber first
            key = distinct_codes(key)[1]
        key = key * size + column
    order, ordered = stable_sort(key)
    starts = group_starts(ordered)
    counts = np.diff(np.append(starts, n))
    first = order[starts]  # each sensor's first (earliest) reading

    # Each sensor's metric set as a bitmask; a row's index into its name table is the number of
    # the set's bits below its own.
    row_bit = bit[order]
    row_mask = np.left_shift(np.int64(1), row_bit)
    mask = np.bitwise_or.reduceat(row_mask, starts)
    local = np.bitwise_count(np.repeat(mask, counts) & (row_mask - 1))
    block_of = block[first]
    _, mask_code = distinct_codes(mask)
    place = site[first] * blocks + block_of
    head_first, head_code = distinct_codes(mask_code * (int(place.max()) + 1) + place)
    heads = [
        value_header(
            sites[site_of],
            tuple(metrics[b * METRICS_PER_RECORD + j] for j in range(METRICS_PER_RECORD) if m >> j & 1),
        )
        for site_of, b, m in zip(
            site[first[head_first]].tolist(), block_of[head_first].tolist(), mask[head_first].tolist(), strict=True
        )
    ]

    if (counts > MAX_READINGS_PER_RECORD).any():  # one chatty sensor: several records, in order
        long = np.flatnonzero(counts > MAX_READINGS_PER_RECORD).tolist()
        extra = [
            np.arange(starts[i] + MAX_READINGS_PER_RECORD, starts[i] + counts[i], MAX_READINGS_PER_RECORD) for i in long
        ]
        chunks = np.sort(np.concatenate([starts, *extra]))
        head_code = head_code[np.searchsorted(starts, chunks, side="right") - 1]
        starts = chunks
        counts = np.diff(np.append(starts, n))
        first = order[starts]

    # The buffer: distinct keys | headers | counts | rows.
    keys = list(map(str.encode, sensors))  # one per sensor: passes in C
    key_blob = b"".join(keys)
    key_len = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    key_start = np.cumsum(key_len) - key_len
    head_blob = b"".join(heads)
    head_len = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
    head_start = len(key_blob) + np.cumsum(head_len) - head_len
    count_bytes = counts.astype("<u4").view(np.uint8)
    rows = encode_rows(r.ts_ns[order], r.value[order], r.flags[order], local)
    count_base = len(key_blob) + len(head_blob)
    row_base = count_base + len(count_bytes)
    data = np.concatenate([np.frombuffer(key_blob + head_blob, np.uint8), count_bytes, rows.ravel()])
    width = rows.shape[1]
    value_parts = (
        (head_start[head_code], head_len[head_code]),
        (count_base + 4 * np.arange(len(starts), dtype=np.int64), np.full(len(starts), 4, dtype=np.int64)),
        (row_base + width * starts, width * counts),
    )
    topics = [readings_topic(d, topic_prefix) for d in domains]
    records = OutgoingRecords(data, topics, domain[first], keys, sensor[first], key_start, value_parts, HEADERS)
    return OutRecords(records, batch.message_index[first], counts)


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
