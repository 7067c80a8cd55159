"""The bridge loop with fakes at both seams (no network): an MQTT source that hands out queued
messages and records acks, and a record sink whose deliveries the test completes by hand, like
a Kafka that acknowledges when the test says so."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import pytest

from portpulse.codecs.recordbatch import OutgoingRecords
from portpulse.codecs.wire import decode_values
from portpulse.contract.settings import AdmissionSettings, IngestSettings, Settings
from portpulse.ingest.admission import FIRST_BYTES_PER_READING
from portpulse.ingest.bridge import Bridge
from portpulse.ingest.decode import Message
from portpulse.ingest.mqtt import Inbound, MqttSource
from portpulse.kafka import KafkaOut

T0_MS = 1_764_000_000_000


def reading(sensor: int, ts_ms: int, value: float) -> Inbound:
    payload = json.dumps({"ts": ts_ms, "metrics": {"no2": value}}).encode()
    return Inbound(Message(f"sensors/air/quai/s{sensor}", payload, T0_MS * 10**6), mid=sensor + 1, qos=1, generation=0)


class FakeSource(MqttSource):
    """An MQTT subscription holding ``waiting`` messages; ``acked`` is the PUBACK order."""

    def __init__(self, waiting: list[Inbound]) -> None:
        self.waiting = list(waiting)
        self.taken = 0
        self.most_held = 0  # the most messages taken and not yet acked at any time
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self.reconnects = 0
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return True

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        got, self.waiting = self.waiting[:max_messages], self.waiting[max_messages:]
        self.taken += len(got)
        self.most_held = max(self.most_held, self.taken - len(self.acked))
        await asyncio.sleep(0 if got else min(wait_s, 0.001))
        return got

    def ack(self, inbound: Inbound) -> bool:
        self.acked.append(inbound.mid)
        return True

    def publish(self, topic: str, payload: bytes) -> bool:
        self.published.append((topic, payload))
        return True


@dataclass
class Delivery:
    records: list[tuple[str, bytes | None, bytes]]
    others: list[KafkaOut]
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeKafka:
    """Deliveries wait until the test sets their ``done`` (or ``auto`` acknowledges at once)."""

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.deliveries: list[Delivery] = []
        self.topics: set[str] = set()

    async def ensure_topics(self, topics: set[str]) -> None:
        self.topics |= topics

    async def send(self, records: OutgoingRecords, others: list[KafkaOut]) -> int:
        delivery = Delivery(records.as_tuples(), others)
        self.deliveries.append(delivery)
        if self.auto:
            delivery.done.set()
        await delivery.done.wait()
        return 0


def settings(max_in_flight: int = 20_000) -> Settings:
    return Settings(ingest=IngestSettings(max_in_flight=max_in_flight, max_past_s=10**9))


async def until(condition: object, what: str) -> None:
    for _ in range(2000):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def test_acks_leave_after_kafka_and_in_receive_order_when_deliveries_finish_out_of_order() -> None:
    source, kafka = FakeSource([reading(i, T0_MS + i, 40.0 + i) for i in range(3)]), FakeKafka()
    bridge = Bridge(settings(), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: len(kafka.deliveries) == 1, "the first delivery")
    source.waiting += [reading(i, T0_MS + i, 40.0 + i) for i in range(3, 5)]
    for _ in range(50):  # the bridge keeps receiving while the first delivery is in flight
        await asyncio.sleep(0.001)
    assert source.acked == [] and bridge.in_flight == 5
    # Nothing is acked before Kafka acknowledges it; a later delivery finishing first waits.
    await until(lambda: source.taken == 5, "the later messages")
    kafka.deliveries[0].done.set()
    await until(lambda: source.acked == [1, 2, 3], "the first acks")
    await until(lambda: len(kafka.deliveries) == 2, "the second delivery")
    kafka.deliveries[1].done.set()
    await until(lambda: source.acked == [1, 2, 3, 4, 5], "every ack")
    stop.set()
    await task
    assert bridge.stats.acked == 5 and bridge.stats.readings == 5
    sent = [rec for d in kafka.deliveries for rec in d.records]
    assert sorted(key or b"" for _, key, _ in sent) == [f"s{i}".encode() for i in range(5)]
    assert {topic for topic, _, _ in sent} == {"portpulse.readings.air"}
    assert sorted(decode_values([v for _, _, v in sent]).value.tolist()) == [40.0, 41.0, 42.0, 43.0, 44.0]


def fresh(sensor: int) -> Inbound:
    """:func:`reading`, received just now."""
    inbound = reading(sensor, T0_MS, 40.0 + sensor)
    return inbound._replace(message=inbound.message._replace(received_ns=time.time_ns()))


@pytest.mark.parametrize("linger_ms", [1000.0, 0.0])
async def test_with_kafka_idle_a_fresh_message_lingers_for_others_to_join_its_delivery(linger_ms: float) -> None:
    """A message received just now waits ``ingest.linger_ms`` for company, so a delivery under load
    holds more reports per sensor (fuller records); with no linger every message leaves as soon as
    Kafka is free."""
    source, kafka = FakeSource([fresh(1)]), FakeKafka(auto=True)
    bridge = Bridge(Settings(ingest=IngestSettings(max_past_s=10**9, linger_ms=linger_ms)), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: source.taken == 1, "the first message")
    if linger_ms:
        for _ in range(10):  # the bridge loop goes round: a delivery would have left by now
            await asyncio.sleep(0.001)
        assert kafka.deliveries == []  # lingering
    else:
        await until(lambda: len(kafka.deliveries) == 1, "the lone message's delivery")
    source.waiting.append(fresh(2))
    await until(lambda: source.taken == 2, "the second message")
    if not linger_ms:
        await until(lambda: len(kafka.deliveries) == 2, "the second delivery")
    stop.set()  # a stopping bridge delivers what it holds
    await task
    assert [len(d.records) for d in kafka.deliveries] == ([2] if linger_ms else [1, 1])
    assert source.acked == [2, 3]


async def test_a_bridge_holding_all_it_may_stops_lingering() -> None:
    """Messages that fill ``ingest.max_in_flight`` while they linger leave at once (nothing more
    could join them), and the next ones follow."""
    source, kafka = FakeSource([fresh(k) for k in range(5)]), FakeKafka(auto=True)
    ingest = IngestSettings(max_past_s=10**9, max_in_flight=3, linger_ms=300.0)
    bridge = Bridge(Settings(ingest=ingest), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: len(kafka.deliveries) == 1, "the first delivery")
    assert len(kafka.deliveries[0].records) == 3
    await until(lambda: source.acked == [1, 2, 3, 4, 5], "every message")  # the last two after the linger
    stop.set()
    await task
    assert sum(len(d.records) for d in kafka.deliveries) == 5 and source.most_held <= 3


def test_the_linger_counts_from_the_oldest_message_held() -> None:
    bridge = Bridge(settings(), FakeSource([]), FakeKafka())
    bridge._accumulated = [reading(1, T0_MS, 40.0), fresh(2)]  # the first received long ago
    assert bridge._linger_s(10**9) <= 0  # it leaves at once
    bridge._accumulated = [fresh(2), reading(1, T0_MS, 40.0)]
    assert 0.5 < bridge._linger_s(10**9) <= 1.0


async def test_while_kafka_does_not_acknowledge_the_bridge_takes_no_more_than_max_in_flight() -> None:
    source, kafka = FakeSource([reading(i % 50, T0_MS + i, 40.0) for i in range(500)]), FakeKafka()
    bridge = Bridge(settings(max_in_flight=64), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: source.taken == 64, "the bound to fill")
    for _ in range(100):
        await asyncio.sleep(0.001)
    assert source.taken == 64 and bridge.in_flight == 64 and source.acked == []
    kafka.auto = True
    for delivery in kafka.deliveries:
        delivery.done.set()
    await until(lambda: len(source.acked) == 500, "every message acked once Kafka is back")
    stop.set()
    await task
    assert source.most_held <= 64
    assert sorted(source.acked) == sorted(i % 50 + 1 for i in range(500))


async def test_bad_messages_go_to_the_dead_letter_topic_with_their_reason_and_are_acked_after_it() -> None:
    bad = Inbound(Message("sensors/air/quai/s9", b"{not json", T0_MS * 10**6), mid=99, qos=1, generation=0)
    source, kafka = FakeSource([reading(1, T0_MS, 40.0), bad]), FakeKafka(auto=True)
    bridge = Bridge(settings(), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: len(source.acked) == 2, "both acks")
    stop.set()
    await task
    assert kafka.topics == {"portpulse.readings.air", "portpulse.dlq", "portpulse.sensors"}
    registered = [o for d in kafka.deliveries for o in d.others if o[0] == "portpulse.sensors"]
    assert [key for _, key, _, _ in registered] == [b"air/quai/s1"]
    (letter,) = [o for d in kafka.deliveries for o in d.others if o[0] == "portpulse.dlq"]
    topic, key, payload, headers = letter
    assert (topic, key, payload) == ("portpulse.dlq", None, b"{not json")
    assert headers is not None and dict(headers)["source"] == b"sensors/air/quai/s9"
    assert bridge.stats.dead_letters == 1 and bridge.stats.rejected_by_reason == {"malformed_json": 1}
    (record,) = [r for d in kafka.deliveries for r in d.records]
    assert record[1] == b"s1"


async def test_on_shutdown_what_kafka_never_acknowledged_is_not_acked_so_mqtt_redelivers_it() -> None:
    source, kafka = FakeSource([reading(i, T0_MS + i, 40.0) for i in range(4)]), FakeKafka()
    bridge = Bridge(settings(), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop, drain_timeout_s=0.05))
    await until(lambda: len(kafka.deliveries) == 1, "a delivery")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert source.acked == [] and bridge.in_flight == 0


async def run_until_acked(inbound: list[Inbound], admission: AdmissionSettings) -> tuple[Bridge, FakeSource, FakeKafka]:
    """A bridge over ``inbound`` (every message acked by Kafka at once) run until all are acked."""
    source, kafka = FakeSource(inbound), FakeKafka(auto=True)
    bridge = Bridge(Settings(ingest=IngestSettings(max_past_s=10**9), admission=admission), source, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: len(source.acked) == len(inbound), "every message acked")
    stop.set()
    await task
    return bridge, source, kafka


async def test_readings_over_the_budget_are_dead_lettered_with_their_message_and_the_rest_pass() -> None:
    def gateway(mid: int, ids: list[str]) -> Inbound:
        rows = [{"sensor_id": i, "ts": T0_MS, "metrics": {"no2": 40.0, "pm10": 12.0}} for i in ids]
        return Inbound(Message("sensors/air/quai", json.dumps({"readings": rows}).encode(), T0_MS * 10**6),
                       mid=mid, qos=1, generation=0)  # fmt: skip

    # three new series an hour for the site: a0..a2 pass; rogue ids do not, nor do they later
    admission = AdmissionSettings(site_new_per_hour=3)
    first, second = gateway(1, ["a0", "a1", "a2", "rogue-1", "rogue-2"]), gateway(2, ["a1", "rogue-3"])
    bridge, _, kafka = await run_until_acked([first, second], admission)
    sent = [rec for d in kafka.deliveries for rec in d.records]
    assert {(key or b"").decode() for _, key, _ in sent} == {"a0", "a1", "a2"}
    stored = decode_values([v for _, _, v in sent])
    keys = [(key or b"").decode() for _, key, _ in sent]
    per_sensor = sorted(keys[r] for r in stored.record.tolist())
    assert per_sensor == ["a0", "a0", "a1", "a1", "a1", "a1", "a2", "a2"]  # a1 in both messages, two metrics
    letters = [o for d in kafka.deliveries for o in d.others if o[0] == "portpulse.dlq"]
    assert sorted(payload or b"" for _, _, payload, _ in letters) == sorted(
        [first.message.payload, second.message.payload]
    )
    details = sorted(dict(h or [])["detail"].decode() for _, _, _, h in letters)
    assert all(dict(h or [])["reason"] == b"cardinality_limit" for _, _, _, h in letters)
    assert "rogue-1" in details[0] and "rogue-2" in details[0] and "rogue-3" in details[1]
    assert bridge.stats.refused_readings == {"cardinality_limit": 6}  # 3 ids x 2 metrics
    registered = [key for d in kafka.deliveries for t, key, _, _ in d.others if t == "portpulse.sensors"]
    assert registered == [b"air/quai/a0", b"air/quai/a1", b"air/quai/a2"]


async def test_a_site_over_its_rate_ceiling_is_dead_lettered_undecoded_and_the_others_pass() -> None:
    def gateway(mid: int, site: str) -> Inbound:
        rows = [{"sensor_id": f"s{k}", "ts": T0_MS + mid, "metrics": {"no2": 40.0}} for k in range(10)]
        return Inbound(Message(f"sensors/air/{site}", json.dumps({"readings": rows}).encode(), T0_MS * 10**6),
                       mid=mid, qos=1, generation=0)  # fmt: skip

    # a bucket of 200 readings a site; nothing decoded yet, a message is charged 10 payload bytes
    # a reading: about 80 readings for these 10, so the flood's first 3 pass, and calm-0's 2
    inbound = [gateway(i, "flood") for i in range(1, 51)] + [gateway(i, "calm-0") for i in range(51, 53)]
    charged = len(inbound[0].message.payload) / FIRST_BYTES_PER_READING
    passing = math.ceil(200 / charged)
    assert passing == 3
    bridge, _, kafka = await run_until_acked(inbound, AdmissionSettings(site_rate_per_s=10, site_burst_s=20))
    letters = [o for d in kafka.deliveries for o in d.others if o[0] == "portpulse.dlq"]
    sent = [rec for d in kafka.deliveries for rec in d.records]
    stored = decode_values([v for _, _, v in sent])
    sites = sorted({(key or b"").decode() for _, key, _ in sent})
    assert sites == [f"s{k}" for k in range(10)]
    # every message is either stored whole (10 readings) or dead-lettered whole with its payload
    assert len(stored.value) + 10 * len(letters) == 52 * 10
    assert len(letters) == 50 - passing
    flood = {i.message.payload for i in inbound[passing:50]}
    assert all(payload in flood for _, _, payload, _ in letters)
    assert {dict(h or [])["reason"] for _, _, _, h in letters} == {b"rate_limit"}
    assert bridge.stats.rejected_by_reason == {"rate_limit": 50 - passing}
    assert bridge.stats.refused_readings == {}


async def test_sparkplug_rebirth_requests_go_out_on_mqtt_and_births_to_their_compacted_topic() -> None:
    from portpulse.codecs.sparkplug import Payload
    from portpulse.contract.catalogue import load_catalogue
    from portpulse.ingest.sparkplug import SparkplugHost, SparkplugMapping

    birth = Payload(timestamp=T0_MS, seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
    data = Payload(timestamp=T0_MS, seq=1)
    data.metrics.add(alias=1, double_value=1.0)
    now = T0_MS * 10**6
    source = FakeSource([
        Inbound(Message("spBv1.0/quai/NBIRTH/gw", birth.SerializeToString(), now), mid=1, qos=1, generation=0),
        Inbound(Message("spBv1.0/quai/DDATA/gw/crane-9", data.SerializeToString(), now), mid=2, qos=1, generation=0),
    ])  # fmt: skip
    kafka = FakeKafka(auto=True)
    assert "crane" in load_catalogue(settings().processor.catalogue).domains()
    host = SparkplugHost(SparkplugMapping(domain="crane"), max_future_ns=10**12, max_past_ns=10**18)
    bridge = Bridge(settings(), source, kafka, sparkplug=host)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await until(lambda: source.acked == [1, 2], "both acks")
    stop.set()
    await task
    assert [topic for topic, _ in source.published] == ["spBv1.0/quai/NCMD/gw"]  # DDATA of a device never born
    births = [(topic, key) for d in kafka.deliveries for topic, key, _, _ in d.others if topic.endswith("births")]
    assert births == [("portpulse.sparkplug.births", b"quai/gw")]
    assert bridge.stats.rejected_by_reason == {"sparkplug_data_before_birth": 1}


class StillSource(FakeSource):
    """A source that hands out nothing until ``release`` is set, however long it is asked to
    wait; ``keep_when_cancelled``: a cancelled wait still returns what it took (the race of a
    message arriving as the bridge stops waiting)."""

    def __init__(self, keep_when_cancelled: bool = False) -> None:
        super().__init__([])
        self.release = asyncio.Event()
        self.keep_when_cancelled = keep_when_cancelled

    async def get_batch(self, max_messages: int, wait_s: float) -> list[Inbound]:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            if not self.keep_when_cancelled:
                raise
        got, self.waiting = self.waiting[:max_messages], self.waiting[max_messages:]
        return got


async def test_the_bridge_wakes_when_a_delivery_completes_and_never_drops_what_a_cancelled_wait_took() -> None:
    from portpulse.ingest.bridge import _Flight

    for keep in (False, True):
        source = StillSource(keep_when_cancelled=keep)
        bridge = Bridge(settings(), source, FakeKafka())
        landed = asyncio.Event()

        async def delivery(landed: asyncio.Event) -> None:
            await landed.wait()

        bridge._flights.append(_Flight([], asyncio.create_task(delivery(landed))))
        source.waiting = [reading(1, T0_MS, 40.0)] if keep else []
        waiting = asyncio.create_task(bridge._next_messages(10, 0.1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # no message, no delivery completed: still waiting
        landed.set()  # the delivery in flight completes: the wait ends without any message
        got = await asyncio.wait_for(waiting, 5)
        assert [i.mid for i in got] == ([2] if keep else [])
        assert source.waiting == []
