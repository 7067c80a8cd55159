"""The bridge loop: MQTT messages -> decode -> Kafka, acknowledging MQTT only after Kafka did.

Messages are taken in batches, decoded together, and sent as one group of Kafka records; a
batch's MQTT acks go out (in receive order, as MQTT requires) once Kafka has acknowledged every
record and dead letter derived from it. If Kafka is away the sends are retried with backoff,
no acks go out, at most ``ingest.max_in_flight`` messages are held, and the broker keeps the
rest in the persistent session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from portpulse.arrays import FACTORISER
from portpulse.codecs.mqttwire import PACKET_SPLITTER
from portpulse.codecs.recordbatch import RECORD_ENCODER, OutgoingRecords
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.deadletter import DeadLetter, dead_letter_headers
from portpulse.contract.health import Health
from portpulse.contract.settings import KafkaSettings, Settings
from portpulse.contract.topics import births_topic, dlq_topic, pipeline_topics, registry_topic
from portpulse.ingest.admission import (
    MESSAGE_REFUSALS,
    Admission,
    SeriesKey,
    SiteIndex,
    decode_registry_record,
    encode_registry_record,
    load_registry_file,
)
from portpulse.ingest.decode import (
    LINE_TOKENIZER,
    PAYLOAD_OF,
    TOPIC_OF,
    DecodedBatch,
    DecodeLimits,
    Message,
    Problem,
    decode_messages,
)
from portpulse.ingest.metrics import INGEST_METRICS
from portpulse.ingest.mqtt import MESSAGE_OF, Inbound, MqttSource, PahoMqttSource, Presence, subscription_filters
from portpulse.ingest.mqtt_asyncio import AsyncioMqttSource
from portpulse.ingest.records import OutRecords, SeriesCodes, build_dead_letters, build_records
from portpulse.ingest.sparkplug import NAMESPACE, SparkplugHost, load_mapping, state_payload
from portpulse.kafka import (
    BatchSender,
    KafkaOut,
    ensure_topics,
    read_compacted,
    start_producer,
)

__all__ = [
    "Bridge",
    "BridgeStats",
    "KafkaRecordSink",
    "RecordSink",
    "admission_alerts",
    "load_admission",
    "read_registry",
    "run_bridge",
    "sparkplug_alerts",
    "sparkplug_presence",
    "sparkplug_summary",
    "start_sparkplug_host",
]

log = logging.getLogger("portpulse.bridge")

BATCH_MESSAGES = 5_000  # taken from the MQTT queue per step
MAX_DISPATCH = 20_000  # messages per Kafka delivery
# Payload bytes per delivery: decoding is the one long step that holds the event loop (the ops
# endpoints, Kafka's acks); 2 MiB is ~50 ms of work and keeps gateway batches (7 KB each) flowing
# through in overlapping deliveries instead of seconds-long ones.
MAX_DISPATCH_BYTES = 2 * 1024 * 1024
# Longest wait for the first message: the loop wakes at once for a message or a delivery
# completing, so this only bounds how long a stop request waits (not a polling period).
IDLE_WAIT_S = 0.1


def _payload_bytes(inbound: list[Inbound]) -> int:
    """The MQTT payload bytes of these messages."""
    return sum(map(len, map(PAYLOAD_OF, map(MESSAGE_OF, inbound))))


@dataclass
class BridgeStats:
    messages: int = 0
    readings: int = 0
    dead_letters: int = 0
    acked: int = 0
    ack_skipped: int = 0
    kafka_retries: int = 0
    mqtt_reconnects: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    refused_readings: dict[str, int] = field(default_factory=dict)  # by the admission gate, per reason


class RecordSink(Protocol):
    """Where the bridge hands records: :class:`KafkaRecordSink`, or a fake in unit tests."""

    async def ensure_topics(self, topics: set[str]) -> None:
        """Make sure ``topics`` exist before records are sent to them."""
        ...

    async def send(self, records: OutgoingRecords, others: list[KafkaOut]) -> int:
        """Return once every record is acknowledged; the number of retries it took."""
        ...


class KafkaRecordSink:
    """aiokafka producer for readings and dead letters: idempotent, ``acks=all``, compressed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sender: BatchSender | None = None
        self._known_topics: set[str] = set()
        self.healthy = True

    async def __aenter__(self) -> KafkaRecordSink:
        k = self._settings.kafka
        self._sender = BatchSender(
            await self._start_producer(),
            on_failure=self._note_failure,
            on_recovery=self._note_recovery,
            compression=k.compression,
            max_batch_bytes=k.max_batch_bytes,
            delivery_timeout_s=k.delivery_timeout_ms / 1000,
            new_producer=self._start_producer,
            kafka=k,
        )
        return self

    async def _start_producer(self) -> Any:
        k = self._settings.kafka
        return await start_producer(
            k,
            "readings producer",
            linger_ms=k.linger_ms,
            max_batch_size=k.max_batch_bytes,
            max_request_size=max(k.max_batch_bytes, self._settings.ingest.max_payload_bytes * 2),
        )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sender is not None:
            await self._sender.producer.stop()

    async def ensure_topics(self, topics: set[str]) -> None:
        """Create missing topics with the configured partitions, retention and cleanup policy
        (idempotent); check the retention of those that existed (see ``ensure_topics``)."""
        missing = topics - self._known_topics
        if not missing:
            return
        created = await ensure_topics(self._settings.kafka, missing, horizon_s=self._settings.ingest.max_past_s)
        if created:
            log.info("created Kafka topics %s", ", ".join(created))
        self._known_topics |= missing

    async def send(self, records: OutgoingRecords, others: list[KafkaOut]) -> int:
        """Send records (columns and tuples) until Kafka acknowledged every one; returns the number
        of retries it took."""
        assert self._sender is not None, "use 'async with KafkaRecordSink(...)'"
        retries = await self._sender.send_columns(records) if len(records) else 0
        return retries + (await self._sender.send_all(others) if others else 0)

    def _note_recovery(self, retries: int) -> None:
        if not self.healthy:
            log.info("Kafka acknowledges records again after %d retries", retries)
        self.healthy = True
        INGEST_METRICS.kafka_healthy.set(1)

    def _note_failure(self, exc: Exception) -> None:
        if self.healthy:
            log.warning("Kafka send failed (%s); holding MQTT acks and retrying", type(exc).__name__)
        self.healthy = False
        INGEST_METRICS.kafka_healthy.set(0)


@dataclass
class _Flight:
    inbound: list[Inbound]
    task: asyncio.Task[None]


class Bridge:
    """MQTT -> Kafka. ``await bridge.run(stop)`` until ``stop`` is set, then drain and return."""

    def __init__(
        self,
        settings: Settings,
        source: MqttSource,
        sink: RecordSink,
        admission: Admission | None = None,
        sparkplug: SparkplugHost | None = None,
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        self.sparkplug = sparkplug
        self.admission = admission or Admission(settings.admission)
        self._registry_topic = registry_topic(settings.kafka.topic_prefix)
        self._sites = SiteIndex(settings.mqtt.topic_prefix)
        i = settings.ingest
        self._limits = DecodeLimits(
            topic_prefix=settings.mqtt.topic_prefix,
            max_payload_bytes=i.max_payload_bytes,
            max_future_ns=int(i.max_future_s * 1e9),
            max_past_ns=int(i.max_past_s * 1e9),
        )
        self._flights: collections.deque[_Flight] = collections.deque()
        self._in_flight = 0  # handed to Kafka, not yet acknowledged there
        self._accumulated: list[Inbound] = []  # received, waiting for the delivery in progress
        self._accumulated_bytes = 0
        self.stats = BridgeStats()

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged to MQTT (waiting or being delivered)."""
        return self._in_flight + len(self._accumulated)

    def _report_in_flight(self) -> None:
        INGEST_METRICS.in_flight.set(self.in_flight)

    async def run(self, stop: asyncio.Event, drain_timeout_s: float = 30.0) -> None:
        """Move messages until ``stop`` is set, then deliver and ack what is held (bounded wait).

        One delivery is in flight at a time; messages arriving meanwhile accumulate and leave
        together when it completes, so batches grow with load (rate x Kafka round trip) instead of
        many small batches queueing behind each other per partition.
        """
        max_in_flight = self._settings.ingest.max_in_flight
        linger_ns = int(self._settings.ingest.linger_ms * 1e6)
        try:
            while not stop.is_set():
                self._ack_completed()
                sending = bool(self._flights) and not self._flights[-1].task.done()
                full = len(self._accumulated) >= MAX_DISPATCH or self._accumulated_bytes >= MAX_DISPATCH_BYTES
                room = max_in_flight - self.in_flight
                # No lingering once the bridge holds all it may: nothing more could join.
                linger_s = 0.0 if sending or room <= 0 or not self._accumulated else self._linger_s(linger_ns)
                if self._accumulated and (full or (not sending and linger_s <= 0)):
                    await self._dispatch(self._take_dispatch())
                    continue
                if room <= 0:
                    # Kafka is slow or away: stop taking messages; the source stops reading and the
                    # broker keeps the rest in the session.
                    await asyncio.wait({self._flights[0].task}, timeout=0.1)
                    continue
                if linger_s > 0:  # let messages gather in the source, then take them all at once
                    await asyncio.sleep(linger_s)
                got = await self._next_messages(min(room, BATCH_MESSAGES), 0.0 if linger_s > 0 else IDLE_WAIT_S)
                if got:
                    self._accumulated += got
                    self._accumulated_bytes += _payload_bytes(got)
                    INGEST_METRICS.messages.inc(len(got))
                    self._report_in_flight()
        finally:
            while self._accumulated:
                await self._dispatch(self._take_dispatch())
            await self._drain(drain_timeout_s)

    def _linger_s(self, linger_ns: int) -> float:
        """How long the accumulated messages may still wait for others to join them (s, at most
        ``linger_ns``; <= 0: not at all)."""
        waited = time.time_ns() - self._accumulated[0].message.received_ns
        return (linger_ns - max(waited, 0)) / 1e9

    async def _next_messages(self, most: int, wait_s: float) -> list[Inbound]:
        """Up to ``most`` messages from the source, waiting at most ``wait_s`` for the first;
        returns early, maybe with none, when a delivery in flight completes: its messages are then
        acknowledged and the next delivery starts at once, without polling on a short timer."""
        flying = [flight.task for flight in self._flights if not flight.task.done()]
        if not flying:
            return await self._source.get_batch(most, wait_s)
        getter = asyncio.ensure_future(self._source.get_batch(most, wait_s))
        await asyncio.wait({getter, *flying}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
        try:
            return await getter  # taken before the cancellation reached it: never dropped
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this loop itself is being cancelled
            return []

    def _take_dispatch(self) -> list[Inbound]:
        """The oldest accumulated messages, up to MAX_DISPATCH of them and MAX_DISPATCH_BYTES."""
        if len(self._accumulated) <= MAX_DISPATCH and self._accumulated_bytes <= MAX_DISPATCH_BYTES:
            batch, self._accumulated, self._accumulated_bytes = self._accumulated, [], 0
            return batch
        size = 0
        for count, inbound in enumerate(self._accumulated[:MAX_DISPATCH]):
            size += len(inbound.message.payload)
            if size > MAX_DISPATCH_BYTES and count:
                break
        else:
            count = min(len(self._accumulated), MAX_DISPATCH)
        batch, self._accumulated = self._accumulated[:count], self._accumulated[count:]
        self._accumulated_bytes -= _payload_bytes(batch)
        return batch

    async def _dispatch(self, batch: list[Inbound]) -> None:
        messages = list(map(MESSAGE_OF, batch))
        decoded = self._decode(messages)
        codes = decoded.codes or SeriesCodes.of(decoded.readings)
        refused, codes = self._admit(decoded, codes)
        records = build_records(decoded, self._settings.kafka.topic_prefix, codes)
        letters = build_dead_letters(decoded, messages)
        self.stats.messages += len(batch)
        for problems in decoded.problems.values():
            for p in problems:
                self.stats.rejected_by_reason[p.reason] = self.stats.rejected_by_reason.get(p.reason, 0) + 1
                INGEST_METRICS.dlq.labels(p.reason).inc()
        for reason, count in refused.items():
            self.stats.refused_readings[reason] = self.stats.refused_readings.get(reason, 0) + count
            INGEST_METRICS.refused.labels(reason).inc(count)
        registry: list[KafkaOut] = [
            (self._registry_topic, key, value, None)
            for key, value in map(encode_registry_record, self.admission.take_changes())
        ]
        registry += self._sparkplug_outcome()
        topics = records.topics | ({self._dlq_topic} if letters else set()) | {topic for topic, *_ in registry}
        await self._sink.ensure_topics(topics)
        others = registry + self._dead_letter_records([x for _, x in letters])
        self._flights.append(_Flight(batch, asyncio.create_task(self._deliver(records, others, len(letters)))))
        self._in_flight += len(batch)
        self._report_in_flight()

    def _sparkplug_outcome(self) -> list[KafkaOut]:
        """Publish the rebirth requests the Sparkplug host wants; its births topic records."""
        host = self.sparkplug
        if host is None:
            return []
        for topic, payload in host.commands:
            group, _, edge_node = topic.removeprefix(f"{NAMESPACE}/").partition("/NCMD/")
            sent = self._source.publish(topic, payload)
            log.info(
                "asked Sparkplug edge node %s/%s for a rebirth%s", group, edge_node, "" if sent else " (not connected)"
            )
            INGEST_METRICS.sparkplug_rebirths.labels(group, edge_node).inc()
        host.commands.clear()
        for kind, count in host.counts.items():
            if count and kind != "commands_ignored":
                INGEST_METRICS.sparkplug_values.labels(kind).inc(count)
                host.counts[kind] = 0
        out: list[KafkaOut] = [(self._births_topic, key, value, None) for key, value in host.birth_records]
        if out:
            for node in host.nodes.values():
                INGEST_METRICS.sparkplug_online.labels(node.group, node.edge_node).set(int(node.online))
        host.birth_records.clear()
        return out

    @property
    def _births_topic(self) -> str:
        return births_topic(self._settings.kafka.topic_prefix)

    def _decode(self, messages: list[Message]) -> DecodedBatch:
        """Decode the messages whose site is within its rate ceiling; the others become
        ``rate_limit`` problems undecoded, so a flooding site costs little more than its reception."""
        if not self.admission.rationing:
            return decode_messages(messages, self._limits, sparkplug=self.sparkplug)
        sites = self._sites.of(list(map(TOPIC_OF, messages)), list(map(len, map(PAYLOAD_OF, messages))))
        limited = self.admission.ration(sites, time.time())
        decoded = decode_messages(
            messages, self._limits, {i: Problem(*r) for i, r in limited.items()}, sparkplug=self.sparkplug
        )
        self.admission.settle(sites, limited, np.bincount(decoded.message_index, minlength=len(messages)))
        return decoded

    @property
    def _dlq_topic(self) -> str:
        return dlq_topic(self._settings.kafka.topic_prefix)

    def _admit(self, decoded: DecodedBatch, codes: SeriesCodes) -> tuple[dict[str, int], SeriesCodes]:
        """Drop from ``decoded`` the readings :class:`Admission` refuses, adding each refusal to the
        problems of the message it came in (so the message is dead-lettered with its payload);
        returns the refused readings per reason and the codes of the readings kept."""
        if not len(decoded.readings):
            return {}, codes
        verdict = self.admission.admit(codes, time.time())
        INGEST_METRICS.known_series.set(self.admission.known_series)
        if verdict.all_admitted:
            return {}, codes
        refused = np.flatnonzero(verdict.refusal)
        # One problem per (message, refusal): a gateway batch of 500 rogue ids is one dead letter.
        width = len(verdict.refusals) + 1
        pairs = np.unique(decoded.message_index[refused] * width + verdict.refusal[refused])
        for message, which in zip((pairs // width).tolist(), (pairs % width).tolist(), strict=True):
            reason, detail = verdict.refusals[which - 1]
            decoded.problems.setdefault(message, []).append(Problem(reason, detail))
        keep = verdict.admitted
        decoded.readings, decoded.message_index = decoded.readings.take(keep), decoded.message_index[keep]
        decoded.codes = codes.take(keep)
        counts = np.bincount(verdict.refusal[refused], minlength=len(verdict.refusals) + 1)
        by_reason: dict[str, int] = {}
        for (reason, _), count in zip(verdict.refusals, counts[1:].tolist(), strict=True):
            by_reason[reason] = by_reason.get(reason, 0) + count
        return by_reason, decoded.codes

    def _dead_letter_records(self, letters: list[DeadLetter]) -> list[KafkaOut]:
        return [(self._dlq_topic, None, letter.payload, dead_letter_headers(letter)) for letter in letters]

    async def _deliver(self, records: OutRecords, others: list[KafkaOut], dead_letters: int) -> None:
        started = time.perf_counter()
        self.stats.kafka_retries += await self._sink.send(records.records, others)
        INGEST_METRICS.kafka_send_seconds.observe(time.perf_counter() - started)
        readings = int(records.readings.sum())
        self.stats.readings += readings
        self.stats.dead_letters += dead_letters
        INGEST_METRICS.readings.inc(readings)

    def _ack_completed(self) -> None:
        """Ack finished batches from the head, so PUBACKs leave in receive order."""
        while self._flights and self._flights[0].task.done() and not self._flights[0].task.cancelled():
            flight = self._flights.popleft()
            flight.task.result()  # re-raise a bug rather than ack what was not delivered
            acked = self._source.ack_all(flight.inbound)
            self.stats.acked += acked
            self.stats.ack_skipped += len(flight.inbound) - acked
            self._in_flight -= len(flight.inbound)
        self._report_in_flight()

    async def _drain(self, timeout_s: float) -> None:
        """On shutdown: wait (bounded) for Kafka to acknowledge what is in flight, then ack it."""
        if self._flights:
            _done, pending = await asyncio.wait([f.task for f in self._flights], timeout=timeout_s)
            if pending:
                log.warning("shutdown: %d batches not acknowledged by Kafka; MQTT will redeliver them", len(pending))
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._ack_completed()
        self._flights.clear()
        self._in_flight = 0


async def run_bridge(
    settings: Settings, stop: asyncio.Event, ready: asyncio.Event | None = None, health: Health | None = None
) -> BridgeStats:
    """Run a bridge until ``stop`` is set; sets ``ready`` once subscribed; returns its counters.
    With ``health``, reports the MQTT connection there."""
    source_class = PahoMqttSource if settings.mqtt.client == "paho" else AsyncioMqttSource
    mqtt, sparkplug, presence = settings.mqtt, None, None
    if settings.sparkplug.enabled:
        sparkplug = await start_sparkplug_host(settings)
        # Filters of the namespace already configured (some groups only) are kept as they are.
        if not any(f.startswith(f"{NAMESPACE}/") for f in mqtt.subscriptions):
            mqtt = mqtt.model_copy(update={"subscriptions": (*mqtt.subscriptions, f"{NAMESPACE}/#")})
        presence = sparkplug_presence(settings.sparkplug.host_id)
    async with (
        KafkaRecordSink(settings) as sink,
        source_class(mqtt, settings.ingest.max_in_flight, presence=presence) as source,
    ):
        if health is not None:
            where = f"{settings.mqtt.host}:{settings.mqtt.port}"

            async def mqtt_probe() -> tuple[bool, str]:
                if not source.connected:
                    return False, f"{where} disconnected: {source.last_error or 'connecting'}"
                state = "subscribed" if source.subscribed else "connected, subscription not yet acknowledged"
                shortfalls = source.shortfalls.summary()
                return True, f"{where} {state} ({source.reconnects} reconnects)" + (
                    f"; broker shortfall: {shortfalls}" if shortfalls else ""
                )

            health.add("mqtt", mqtt_probe)
        log.info(
            "bridge up: MQTT %s:%d %s (QoS %d) -> Kafka %s; line-protocol tokenizer %s, MQTT packet splitter %s, "
            "Kafka record encoder %s, name factoriser %s",
            settings.mqtt.host,
            settings.mqtt.port,
            subscription_filters(mqtt),
            settings.mqtt.qos,
            settings.kafka.bootstrap_servers,
            LINE_TOKENIZER,
            PACKET_SPLITTER,
            RECORD_ENCODER,
            FACTORISER,
        )
        if {LINE_TOKENIZER, PACKET_SPLITTER, RECORD_ENCODER, FACTORISER} != {"compiled"}:
            log.warning(
                "the bridge's compiled parts are not built (no C compiler at install time?): line protocol "
                "and MQTT input and Kafka output cost up to twice the CPU; reinstall with gcc to build them (setup.py)"
            )
        domains = load_catalogue(settings.processor.catalogue).domains()
        await sink.ensure_topics(pipeline_topics(settings.kafka.topic_prefix, domains))
        bridge = Bridge(settings, source, sink, await load_admission(settings), sparkplug)
        if health is not None:
            health.add_notices("admission", lambda: admission_alerts(bridge.admission))
            if sparkplug is not None:
                host = sparkplug
                health.add_notices("sparkplug", lambda: sparkplug_alerts(host))

                async def sparkplug_probe() -> tuple[bool, str]:
                    # Edge nodes offline are the field's state, not the pipeline's: always ok.
                    return True, sparkplug_summary(host)

                health.add("sparkplug", sparkplug_probe)
        # The bridge runs before the SUBACK arrives: a broker may send it only once the session's
        # queued messages are acknowledged. ``ready`` means subscribed.
        running = asyncio.create_task(bridge.run(stop), name="bridge")
        try:
            while ready is not None and not ready.is_set() and not running.done():
                if source.subscribed:
                    ready.set()
                else:
                    await asyncio.wait({running}, timeout=0.02)
            await running
        finally:
            running.cancel()
        bridge.stats.mqtt_reconnects = source.reconnects
        return bridge.stats


async def start_sparkplug_host(settings: Settings, live: bool = True) -> SparkplugHost:
    """The Sparkplug host with its mapping, and the births a previous run kept (so it decodes
    DATA at once instead of asking every node for a rebirth); ``live`` False for a DLQ replay."""
    from importlib.resources import files
    from pathlib import Path

    sp, i = settings.sparkplug, settings.ingest
    mapping_file = sp.mapping_file or Path(str(files("portpulse.contract").joinpath("sparkplug.toml")))
    mapping = load_mapping(mapping_file, load_catalogue(settings.processor.catalogue))
    host = SparkplugHost(
        mapping,
        max_future_ns=int(i.max_future_s * 1e9),
        max_past_ns=int(i.max_past_s * 1e9),
        rebirth_interval_s=sp.rebirth_interval_s,
        live=live,
    )
    restored = host.restore(await read_compacted(settings.kafka, births_topic(settings.kafka.topic_prefix)))
    if live:
        for node in host.nodes.values():
            INGEST_METRICS.sparkplug_online.labels(node.group, node.edge_node).set(int(node.online))
    log.info(
        "Sparkplug host%s: %d metrics mapped from %s; %d births read back",
        f" {sp.host_id!r} (primary: STATE published)" if sp.host_id else "",
        len(mapping.metrics),
        mapping_file,
        restored,
    )
    return host


def sparkplug_presence(host_id: str | None) -> Presence | None:
    """A primary host's STATE on ``spBv1.0/STATE/{host_id}``: online once subscribed, offline as
    the will, both with the connection's timestamp (ms), as spec 3.0 requires."""
    if host_id is None:
        return None

    def payloads() -> tuple[bytes, bytes]:
        now_ms = time.time_ns() // 1_000_000
        return state_payload(False, now_ms), state_payload(True, now_ms)

    return Presence(f"{NAMESPACE}/STATE/{host_id}", payloads)


def sparkplug_summary(host: SparkplugHost) -> str:
    """Edge nodes online and offline, for the dashboard's sparkplug check, e.g.
    ``2 of 3 edge nodes online; terminal-a/gw-2 offline for 40 s``."""
    rows = host.status(time.time())
    offline = [r for r in rows if not r["online"]]
    text = f"{len(rows) - len(offline)} of {len(rows)} edge nodes online"
    details = [f"{r['group']}/{r['edge_node']} offline for {r['for_s']:.0f} s" for r in offline[:20]]
    return "; ".join([text, *details])


def sparkplug_alerts(host: SparkplugHost) -> list[dict[str, Any]]:
    """Each sensor of an offline edge node as a dashboard alert: its last values are stale."""
    now = time.time()
    return [
        {"domain": host.mapping.domain, "site": site, "sensor_id": sensor, "value": round(now - node.changed_s),
         "unit": "s offline",
         "alert": f"stale: Sparkplug edge node {node.group}/{node.edge_node} is offline (NDEATH)",
         "age_s": round(now - node.changed_s, 1)}
        for node, site, sensor in host.stale_sensors()
    ]  # fmt: skip


async def load_admission(settings: Settings) -> Admission:
    """The admission gate with the registry file's series and the series the bridges registered
    before (read back from the registry topic), so a restart does not spend the budgets again."""
    allowed = load_registry_file(settings.admission.registry_file) if settings.admission.registry_file else frozenset()
    started = time.perf_counter()
    known = await read_registry(settings.kafka)
    if known:
        log.info(
            "%d known series read back from the registry topic in %.1f s", len(known), time.perf_counter() - started
        )
    return Admission(settings.admission, allowed, known)


async def read_registry(kafka: KafkaSettings) -> dict[SeriesKey, tuple[float, float]]:
    """The series in the registry topic with their (first seen, last seen) times, s since the epoch."""
    known: dict[SeriesKey, tuple[float, float]] = {}
    for key, value in (await read_compacted(kafka, registry_topic(kafka.topic_prefix))).items():
        entry = decode_registry_record(key, value)
        if entry is not None and entry[1] is not None:
            known[entry[0]] = entry[1]
    return known


def admission_alerts(admission: Admission, within_s: float = 600.0) -> list[dict[str, Any]]:
    """The sites refused in the last ``within_s`` s as dashboard alerts (sensor, site, value, alert)."""
    out = []
    for row in admission.report(time.time(), within_s):
        refused: dict[str, int] = row["refused"]  # type: ignore[assignment]
        samples: list[str] = row["sample_ids"]  # type: ignore[assignment]
        units = {"messages" if reason in MESSAGE_REFUSALS else "readings" for reason in refused}
        out.append({
            "domain": row["domain"], "site": row["site"], "sensor_id": ", ".join(samples),
            "value": sum(refused.values()), "unit": f"{units.pop()} refused" if len(units) == 1 else "refused",
            "alert": "; ".join(
                f"{reason} x{count} {'messages' if reason in MESSAGE_REFUSALS else 'readings'}"
                for reason, count in sorted(refused.items())
            ),
            "age_s": row["age_s"],
        })  # fmt: skip
    return out
