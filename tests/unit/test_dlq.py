"""``portpulse dlq``'s pure parts: reading a letter's headers, filters, times, the summary and the
rows shown, against values worked out by hand."""

from __future__ import annotations

import pytest

from portpulse.app.dlq import DlqFilter, DlqRecord, dlq_record, show_rows, summary_rows
from portpulse.app.times import parse_time_ns
from portpulse.contract.deadletter import DeadLetter, dead_letter_headers

NOW_NS = 1_764_000_000 * 10**9 + 3_600 * 10**9  # 2025-11-24T17:00:00Z
HOUR = 3_600 * 10**9


def letter(source: str, payload: bytes, reason: str, time_ns: int, offset: int = 0, stage: str = "ingest") -> DlqRecord:
    headers = dead_letter_headers(DeadLetter(payload, reason, source, stage, f"{reason}: why", time_ns=time_ns))
    return dlq_record(0, offset, headers, payload, "sensors")


def test_a_letter_is_read_back_from_its_headers_with_the_topic_parts() -> None:
    single = letter("sensors/air/harfleur/aq-1", b"{bad", "malformed_json", NOW_NS, offset=7)
    assert single == DlqRecord(0, 7, b"{bad", "malformed_json", "sensors/air/harfleur/aq-1", "ingest",
                               "malformed_json: why", NOW_NS, "air", "harfleur", "aq-1", size=4)  # fmt: skip
    batch = letter("sensors/crane/port-2000", b'{"readings": []}', "rate_limit", NOW_NS)
    assert (batch.domain, batch.site, batch.sensor_id) == ("crane", "port-2000", "")
    sink = letter("air", b"air,sensor_id=a no2=1 1", "cardinality_limit", NOW_NS, stage="sink")
    assert (sink.stage, sink.domain, sink.site) == ("sink", "", "")
    bare = dlq_record(1, 2, [], None, "sensors")
    assert (bare.reason, bare.payload, bare.time_ns, bare.source) == ("unknown", b"", 0, "")


def test_filters_by_reason_site_sensor_and_time() -> None:
    letters = [
        letter("sensors/air/harfleur/aq-1", b"{", "malformed_json", NOW_NS - 2 * HOUR),
        letter("sensors/air/harfleur", b'{"readings": [{"sensor_id": "aq-2"}]}', "rate_limit", NOW_NS - HOUR),
        letter("sensors/air/port-2000/aq-2", b"{", "malformed_json", NOW_NS),
    ]

    def chosen(which: DlqFilter) -> list[int]:
        return [i for i, r in enumerate(letters) if which.matches(r)]

    assert chosen(DlqFilter()) == [0, 1, 2]
    assert chosen(DlqFilter(reason="malformed_json")) == [0, 2]
    assert chosen(DlqFilter(site="harfleur")) == [0, 1]
    assert chosen(DlqFilter(sensor_id="aq-2")) == [1, 2]  # named in the gateway batch, or in the topic
    assert chosen(DlqFilter(sensor_id="aq-1")) == [0]
    assert chosen(DlqFilter(since_ns=NOW_NS - HOUR, until_ns=NOW_NS)) == [1]
    assert chosen(DlqFilter(stage="sink")) == []


def test_times_relative_absolute_and_epoch() -> None:
    assert parse_time_ns("-1h", NOW_NS) == NOW_NS - HOUR
    assert parse_time_ns("-7d", NOW_NS) == NOW_NS - 7 * 24 * HOUR
    assert parse_time_ns("2025-11-24T16:00:00Z", NOW_NS) == 1_764_000_000 * 10**9
    assert parse_time_ns("2025-11-24T16:00:00", NOW_NS) == 1_764_000_000 * 10**9  # UTC when no zone
    assert parse_time_ns("1764000000.5", NOW_NS) == 1_764_000_000_500_000_000
    with pytest.raises(ValueError, match="not a time like -1h"):
        parse_time_ns("yesterday", NOW_NS)


def test_summary_counts_per_bucket_reason_and_site_and_show_cuts_payloads() -> None:
    letters = [
        letter("sensors/air/harfleur/aq-1", b"x" * 10, "malformed_json", NOW_NS + 5),
        letter("sensors/air/harfleur/aq-2", b"x" * 20, "malformed_json", NOW_NS + 10),
        letter("sensors/air/harfleur/aq-3", b"x" * 5, "rate_limit", NOW_NS + 20),
        letter("sensors/air/port-2000/aq-4", b"x", "malformed_json", NOW_NS + HOUR),
        letter("influx", b"line", "cardinality_limit", NOW_NS - 1, stage="sink"),
    ]
    assert summary_rows([r.without_payload() for r in letters], HOUR) == [  # sizes outlive payloads
        {"from": "2025-11-24T16:00:00Z", "reason": "cardinality_limit", "domain": "-", "site": "-", "letters": 1,
         "payload_bytes": 4},
        {"from": "2025-11-24T17:00:00Z", "reason": "malformed_json", "domain": "air", "site": "harfleur", "letters": 2,
         "payload_bytes": 30},
        {"from": "2025-11-24T17:00:00Z", "reason": "rate_limit", "domain": "air", "site": "harfleur", "letters": 1,
         "payload_bytes": 5},
        {"from": "2025-11-24T18:00:00Z", "reason": "malformed_json", "domain": "air", "site": "port-2000",
         "letters": 1, "payload_bytes": 1},
    ]  # fmt: skip
    (row,) = show_rows(letters[1:2], payload_chars=8)
    assert row == {"at": "0:0", "time": "2025-11-24T17:00:00Z", "reason": "malformed_json", "stage": "ingest",
                   "source": "sensors/air/harfleur/aq-2", "detail": "malformed_json: why",
                   "payload": "xxxxxxxx... (20 bytes)"}  # fmt: skip
    assert show_rows(letters[1:2], payload_chars=None)[0]["payload"] == "x" * 20
    broken = letter("sensors/air/harfleur/aq-1", b'{"ts": 1,\n\t"m": \xff}', "malformed_json", NOW_NS)
    assert show_rows([broken])[0]["payload"] == '{"ts": 1,\\n\\t"m": \\xff}'  # one line, bytes kept visible
