"""Pure: which readings may enter the pipeline. Budgets of new series per site and domain, a total,
an optional registry of the sensors each site may have, and a per-site rate ceiling.

A series here is one ``(domain, site, sensor_id)``: the tags of one InfluxDB series in the raw
table and in each window table, so the budgets bound InfluxDB's series cardinality directly.
The registry of known series is an exact dict (no sketch, no error), bounded by
``AdmissionSettings.max_series``; series unseen for ``quiet_after_s`` are forgotten. Time is
passed in (wall clock, s since the epoch); budgets count per UTC hour and day.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from portpulse.arrays import code_groups, group_starts, stable_sort
from portpulse.contract.errors import ConfigError
from portpulse.contract.settings import AdmissionSettings
from portpulse.contract.topics import ID_RE, MqttTopic, parse_mqtt_topic
from portpulse.ingest.records import SeriesCodes

__all__ = [
    "FIRST_BYTES_PER_READING",
    "MESSAGE_REFUSALS",
    "Admission",
    "MessageSites",
    "RegistryChange",
    "SeriesKey",
    "SiteIndex",
    "Verdict",
    "decode_registry_record",
    "encode_registry_record",
    "load_registry_file",
]

#: (domain, site, sensor_id)
SeriesKey = tuple[str, str, str]

#: How often (s of wall time) a known series' last-seen time is written to the registry topic.
LAST_SEEN_EVERY_S = 600.0
#: How often (s) quiet series are looked for.
SWEEP_EVERY_S = 60.0
#: How often (s) the series of the batches since the last time are marked seen: a series in
#: every batch costs a Python step per interval, not per batch.
MARK_SEEN_EVERY_S = 1.0
#: Sample ids kept per refused site, and refused sites tracked (the rest are summed).
SAMPLES_PER_SITE = 5
MAX_TRACKED_SITES = 1_000
#: Refusals counted per MQTT message rather than per reading: they are decided before decoding.
MESSAGE_REFUSALS = frozenset({"rate_limit"})


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """A registry entry to persist: ``last_seen_s`` None means the series was forgotten."""

    key: SeriesKey
    first_seen_s: float
    last_seen_s: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The readings of one batch that may pass. ``refusal`` (int32 ``(n,)``): 0 for an admitted
    reading, else 1 + the index of its refusal in ``refusals`` (``(reason, detail)`` pairs, one
    per refused series)."""

    refusal: npt.NDArray[np.int32]
    refusals: list[tuple[str, str]]

    @property
    def admitted(self) -> npt.NDArray[np.bool_]:
        return np.equal(self.refusal, 0)

    @property
    def all_admitted(self) -> bool:
        return not self.refusals


@dataclass(slots=True, eq=False)  # compared by identity: ``None in entries`` stays in C
class _Known:
    """A registered series and when it was first seen, last seen and last written to the
    registry topic as seen (s)."""

    key: SeriesKey
    first_s: float
    last_s: float
    written_s: float


@dataclass(slots=True)
class _Refused:
    """What was refused of one site: counts per limit, a few ids, when it last happened."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: deque[str] = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_SITE))
    last_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MessageSites:
    """Where each message of a batch came from: ``code`` (int64 ``(n,)``) indexes ``sites``, the
    ``(domain, site)`` of its MQTT topic (None for a topic that is not a sensor topic: the decoder
    rejects it); ``size`` (float64 ``(n,)``) is its payload's length in bytes."""

    code: npt.NDArray[np.int64]
    sites: list[tuple[str, str] | None]
    size: npt.NDArray[np.float64]


class SiteIndex:
    """MQTT topic -> the code of its ``(domain, site)``, kept across batches so a batch costs one
    dict lookup per message; topics are parsed once. Bounded: past ``max_topics`` it starts over."""

    def __init__(self, prefix: str, max_topics: int = 200_000) -> None:
        self._prefix, self._max_topics = prefix, max_topics
        self._topic_code: dict[str, int] = {}
        self._site_code: dict[tuple[str, str] | None, int] = {}
        self.sites: list[tuple[str, str] | None] = []

    def of(self, topics: list[str], sizes: list[int]) -> MessageSites:
        """The sites of a batch's messages, given their topics and payload sizes (bytes)."""
        codes = list(map(self._topic_code.get, topics))
        if None in codes:
            if len(self._topic_code) > self._max_topics:
                self._topic_code.clear()
                self._site_code.clear()
                self.sites = []
                codes = [None] * len(topics)
            for i, code in enumerate(codes):
                if code is None:
                    codes[i] = self._learn(topics[i])
        return MessageSites(np.array(codes, dtype=np.int64), self.sites, np.array(sizes, dtype=np.float64))

    def _learn(self, topic: str) -> int:
        parsed = parse_mqtt_topic(topic, self._prefix)
        site = (parsed.domain, parsed.site) if isinstance(parsed, MqttTopic) else None
        code = self._site_code.get(site)
        if code is None:
            code = self._site_code[site] = len(self.sites)
            self.sites.append(site)
        self._topic_code[topic] = code
        return code


#: Payload bytes per reading assumed for a site before any of its messages was decoded: about
#: the least a reading takes in the formats the bridge reads (one metric of a multi-metric JSON
#: report is 11-19 bytes), so a site's first messages are charged too much rather than too little.
FIRST_BYTES_PER_READING = 10.0


@dataclass(slots=True)
class _Bucket:
    """A site's token bucket: readings it may still send, when it was refilled (s), and the
    payload bytes per reading of its recent messages (how a message is charged before decoding)."""

    tokens: float
    at_s: float
    bytes_per_reading: float = FIRST_BYTES_PER_READING


class _Budget:
    """New series admitted per key (a site or a domain) in the current UTC hour and day."""

    __slots__ = ("_counts", "_day", "_hour", "per_day", "per_hour")

    def __init__(self, per_hour: int, per_day: int) -> None:
        self.per_hour, self.per_day = per_hour, per_day
        self._hour = self._day = -1
        self._counts: dict[str, list[int]] = {}  # key -> [this hour, this day]

    def spent(self, key: str, now_s: float) -> str | None:
        """The limit ``key`` has reached ("hour" or "day"), or None if it may admit one more."""
        hour, day = int(now_s // 3600), int(now_s // 86_400)
        if day != self._day:
            self._counts.clear()
            self._day, self._hour = day, hour
        elif hour != self._hour:
            for counts in self._counts.values():
                counts[0] = 0
            self._hour = hour
        found = self._counts.get(key)
        if found is None:
            return None
        counts = found
        if self.per_hour and counts[0] >= self.per_hour:
            return "hour"
        if self.per_day and counts[1] >= self.per_day:
            return "day"
        return None

    def charge(self, key: str, first_seen_s: float | None = None, now_s: float = 0.0) -> None:
        """Count one new series of ``key``: now, or (with ``first_seen_s``) one registered earlier,
        counted only in the hour and day it belongs to if those are the current ones."""
        if first_seen_s is not None:
            self.spent(key, now_s)  # roll the hour and day over first
            hour, day = first_seen_s // 3600 == now_s // 3600, first_seen_s // 86_400 == now_s // 86_400
            if day:
                counts = self._counts.setdefault(key, [0, 0])
                counts[0] += hour
                counts[1] += 1
            return
        counts = self._counts.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += 1


class Admission:
    """The bridge's gate, one per bridge process (budgets are not shared between bridges).

    ``allowed``: the registry file's series (admitted without charging a budget). ``known``:
    series already registered, with their first- and last-seen times (s), as read back from the
    registry topic at start-up, so a restart does not count the whole fleet as new. In strict
    mode only ``allowed`` and ``known`` pass.
    """

    def __init__(
        self,
        settings: AdmissionSettings,
        allowed: Iterable[SeriesKey] = (),
        known: Mapping[SeriesKey, tuple[float, float]] | None = None,
    ) -> None:
        self._s = settings
        self._allowed = frozenset(allowed) | (frozenset(known or ()) if settings.registry == "strict" else frozenset())
        self._known: dict[SeriesKey, _Known] = {}
        # The same entries by (domain, site), then sensor: a batch's series are looked up per site
        # by their sensor names, without a key tuple per series.
        self._by_site: dict[tuple[str, str], dict[str, _Known]] = {}
        for key, (first_s, last_s) in (known or {}).items():
            self._add_known(_Known(key, first_s, last_s, last_s))
        self._site_budget = _Budget(settings.site_new_per_hour, settings.site_new_per_day)
        self._domain_budget = _Budget(settings.domain_new_per_hour, settings.domain_new_per_day)
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # (domain, site) -> its readings/s ceiling
        self._changes: list[RegistryChange] = []
        self._swept_s = -math.inf
        self._unmarked: list[list[_Known]] = []  # entries of the batches seen since _marked_s
        self._unmarked_s = self._marked_s = -math.inf  # when the latest of them came; the last marking
        self.refused: dict[tuple[str, str], _Refused] = {}

    @property
    def known_series(self) -> int:
        return len(self._known)

    def take_changes(self) -> list[RegistryChange]:
        """Registry entries created, refreshed or forgotten since the last call."""
        changes, self._changes = self._changes, []
        return changes

    def admit(self, codes: SeriesCodes, now_s: float) -> Verdict:
        """The verdict on a batch's readings, given by their factorised series. Python work is per
        distinct series of the batch, numpy work per reading."""
        if self._swept_s == -math.inf:
            self._charge_known(now_s)
        if now_s - self._swept_s >= SWEEP_EVERY_S:
            self._mark_seen()
            self._forget_quiet(now_s)
        first, code = codes.distinct_series()
        # Known series, the usual case, are looked up per site by their sensor names. A batch
        # with a new one takes them all in order of first appearance: budgets and the total
        # admit the first ones when they run out in the middle of a batch.
        n_sites = len(codes.sites)
        sensor_of = codes.sensor[first]
        found: list[_Known | None] = []
        for place, rows in code_groups(codes.domain[first] * n_sites + codes.site[first]):
            of_site = self._by_site.get((codes.domains[place // n_sites], codes.sites[place % n_sites]), {})
            found += map(of_site.get, map(codes.sensors.__getitem__, sensor_of[rows].tolist()))
        if None in found:
            return self._admit_in_order(codes, first, code, now_s)
        self._seen(cast(list[_Known], found), now_s)
        return Verdict(np.zeros(len(code), dtype=np.int32), [])

    def _seen(self, entries: list[_Known], now_s: float) -> None:
        self._unmarked.append(entries)
        self._unmarked_s = now_s
        if now_s - self._marked_s >= MARK_SEEN_EVERY_S:
            self._mark_seen()

    def _mark_seen(self) -> None:
        """Mark the entries of the batches since the last marking, each once, as seen when the
        latest of those batches came: less than :data:`MARK_SEEN_EVERY_S` after any of them."""
        now_s = self._marked_s = self._unmarked_s
        batches, self._unmarked = self._unmarked, []
        changes = self._changes
        for entry in dict.fromkeys(chain.from_iterable(batches)):  # by identity, in order
            entry.last_s = now_s
            if now_s - entry.written_s >= LAST_SEEN_EVERY_S:
                entry.written_s = now_s
                changes.append(RegistryChange(entry.key, entry.first_s, now_s))

    def _admit_in_order(
        self, codes: SeriesCodes, first: npt.NDArray[np.int64], code: npt.NDArray[np.int64], now_s: float
    ) -> Verdict:
        """:meth:`admit` one series at a time, in order of first appearance (``first``, the row of
        each; ``code``, each reading's series)."""
        domains, sites, sensors = codes.domains, codes.sites, codes.sensors
        keys = [
            (domains[d], sites[s], sensors[i])
            for d, s, i in zip(codes.domain[first].tolist(), codes.site[first].tolist(), codes.sensor[first].tolist(),
                               strict=True)
        ]  # fmt: skip
        refusals: list[tuple[str, str]] = []
        key_refusal = np.zeros(len(keys), dtype=np.int32)
        refused_keys: list[tuple[int, SeriesKey]] = []
        seen: list[_Known] = []
        for j, key in enumerate(keys):
            entry = self._known.get(key)
            if entry is not None:
                seen.append(entry)
                continue
            problem = self._new_series(key, now_s)
            if problem is not None:
                refusals.append(problem)
                key_refusal[j] = len(refusals)
                refused_keys.append((j, key))
        self._seen(seen, now_s)
        refusal = key_refusal[code]
        if refused_keys:
            readings = np.bincount(code, minlength=len(keys))
            for j, key in refused_keys:
                self._note_refused(key, refusals[key_refusal[j] - 1][0], now_s, int(readings[j]))
        return Verdict(refusal, refusals)

    def _new_series(self, key: SeriesKey, now_s: float) -> tuple[str, str] | None:
        """Register ``key`` if the registry and the budgets admit it, else the refusal."""
        if key not in self._allowed:
            refusal = self._refusal(key, now_s)
            if refusal is not None:
                return refusal
            self._site_budget.charge(f"{key[0]}/{key[1]}")
            self._domain_budget.charge(key[0])
        self._add_known(_Known(key, now_s, now_s, now_s))
        self._changes.append(RegistryChange(key, now_s, now_s))
        return None

    def _add_known(self, entry: _Known) -> None:
        domain, site, sensor = entry.key
        self._known[entry.key] = entry
        self._by_site.setdefault((domain, site), {})[sensor] = entry

    def _refusal(self, key: SeriesKey, now_s: float) -> tuple[str, str] | None:
        """Why a new series outside the registry file may not enter now, or None."""
        domain, site, sensor = key
        s = self._s
        if s.registry == "strict":
            return "unknown_sensor", f"{domain}/{site}/{sensor} is not in the registry (strict mode)"
        if s.max_series and len(self._known) >= s.max_series:
            return "cardinality_limit", f"{domain}/{site}/{sensor}: {s.max_series} series in all (admission.max_series)"
        if limit := self._site_budget.spent(f"{domain}/{site}", now_s):
            allowed = s.site_new_per_hour if limit == "hour" else s.site_new_per_day
            return "cardinality_limit", (
                f"{domain}/{site}/{sensor}: site {site} has had {allowed} new series this {limit}"
                f" (admission.site_new_per_{limit})"
            )
        if limit := self._domain_budget.spent(domain, now_s):
            allowed = s.domain_new_per_hour if limit == "hour" else s.domain_new_per_day
            return "cardinality_limit", (
                f"{domain}/{site}/{sensor}: domain {domain} has had {allowed} new series this {limit}"
                f" (admission.domain_new_per_{limit})"
            )
        return None

    @property
    def rationing(self) -> bool:
        """Whether sites have a rate ceiling (``site_rate_per_s``)."""
        return bool(self._s.site_rate_per_s)

    def ration(self, sites: MessageSites, now_s: float) -> dict[int, tuple[str, str]]:
        """The messages of a batch refused for ``rate_limit``, by index, as ``(reason, detail)``.

        Called before decoding, so a flood costs numpy work per message, not a decode. Each
        message is charged its payload's bytes over its site's bytes per reading; per site, in
        arrival order, messages pass while the bucket holds tokens. :meth:`settle` then charges
        what they really held. Python work is per distinct site of the batch.
        """
        rate = self._s.site_rate_per_s
        if not rate or not len(sites.code):
            return {}
        burst = rate * self._s.site_burst_s
        present = np.flatnonzero(np.bincount(sites.code, minlength=len(sites.sites))).tolist()
        tokens = np.full(len(sites.sites), np.inf)
        bytes_per_reading = np.ones(len(sites.sites))
        buckets: dict[int, _Bucket] = {}
        for j in present:
            source = sites.sites[j]
            if source is None:
                continue
            bucket = self._buckets.get(source)
            if bucket is None:
                bucket = self._buckets[source] = _Bucket(burst, now_s)
            elif bucket.at_s != now_s:
                bucket.tokens = min(burst, bucket.tokens + rate * max(0.0, now_s - bucket.at_s))
                bucket.at_s = now_s
            buckets[j], tokens[j], bytes_per_reading[j] = bucket, bucket.tokens, bucket.bytes_per_reading
        charge = sites.size / bytes_per_reading[sites.code]
        wanted = np.bincount(sites.code, weights=charge, minlength=len(sites.sites))
        if (wanted <= tokens).all():
            passing = None
            for j, bucket in buckets.items():
                bucket.tokens -= float(wanted[j])
        else:
            # per site in arrival order: a message passes while the charges before it leave tokens
            order, code = stable_sort(sites.code)
            spent = np.cumsum(charge[order])
            before = spent - charge[order]
            starts = group_starts(code)
            before -= np.repeat(before[starts], np.diff(np.append(starts, len(code))))
            passing = np.empty(len(code), dtype=bool)
            passing[order] = before < tokens[code]
            charged = np.bincount(sites.code[passing], weights=charge[passing], minlength=len(sites.sites))
            for j, bucket in buckets.items():
                bucket.tokens -= float(charged[j])
        if len(self._buckets) > 4 * MAX_TRACKED_SITES:  # sites that stopped sending: full buckets anyway
            self._buckets = {k: b for k, b in self._buckets.items() if now_s - b.at_s < self._s.site_burst_s}
        if passing is None:
            return {}
        refused = np.flatnonzero(~passing)
        code_of = sites.code[refused].tolist()
        details: dict[int, tuple[str, str]] = {}
        for j, count in zip(*np.unique(code_of, return_counts=True), strict=True):
            domain, site = sites.sites[j] or ("", "")
            details[int(j)] = (
                "rate_limit",
                f"{domain}/{site} over {rate:g} readings/s (admission.site_rate_per_s, burst {burst:g})",
            )
            self._note_refused((domain, site, ""), "rate_limit", now_s, int(count))
        return {i: details[j] for i, j in zip(refused.tolist(), code_of, strict=True)}

    def settle(self, sites: MessageSites, refused: Mapping[int, object], held: npt.NDArray[np.int64]) -> None:
        """Charge the messages :meth:`ration` let pass (those not in ``refused``) the readings
        they held (``held``, ``(n,)``) instead of their estimate, and learn each site's bytes per
        reading from them."""
        if not self._s.site_rate_per_s or not len(sites.code):
            return
        code, size = sites.code, sites.size
        if refused:
            passing = np.ones(len(code), dtype=bool)
            passing[np.fromiter(refused, dtype=np.int64, count=len(refused))] = False
            code, size, held = code[passing], size[passing], held[passing]
        n = len(sites.sites)
        readings = np.bincount(code, weights=held, minlength=n)
        payload = np.bincount(code, weights=size, minlength=n)
        present = np.flatnonzero(np.bincount(code, minlength=n))
        for j, total, nbytes in zip(
            present.tolist(), readings[present].tolist(), payload[present].tolist(), strict=True
        ):
            source = sites.sites[j]
            bucket = self._buckets.get(source) if source is not None else None
            if bucket is not None:
                bucket.tokens -= total - nbytes / bucket.bytes_per_reading
                if total:
                    bucket.bytes_per_reading = nbytes / total

    def _note_refused(self, key: SeriesKey, reason: str, now_s: float, count: int = 1) -> None:
        site = (key[0], key[1])
        refused = self.refused.get(site)
        if refused is None:
            if len(self.refused) >= MAX_TRACKED_SITES:
                site = (key[0], "(other sites)")
            refused = self.refused.setdefault(site, _Refused())
        refused.counts[reason] = refused.counts.get(reason, 0) + count
        if key[2]:
            refused.samples.append(key[2])
        refused.last_s = now_s

    def _charge_known(self, now_s: float) -> None:
        """Charge the budgets with the known series first seen this hour and day (a restarted
        bridge must not grant a site's hourly budget again)."""
        for (domain, site, sensor), entry in self._known.items():
            if (domain, site, sensor) not in self._allowed:
                self._site_budget.charge(f"{domain}/{site}", entry.first_s, now_s)
                self._domain_budget.charge(domain, entry.first_s, now_s)

    def _forget_quiet(self, now_s: float) -> None:
        self._swept_s = now_s
        horizon = now_s - self._s.quiet_after_s
        quiet = [entry for entry in self._known.values() if entry.last_s < horizon]
        for entry in quiet:
            domain, site, sensor = entry.key
            del self._known[entry.key]
            of_site = self._by_site[(domain, site)]
            del of_site[sensor]
            if not of_site:
                del self._by_site[(domain, site)]
            self._changes.append(RegistryChange(entry.key, entry.first_s, None))

    def report(self, now_s: float, within_s: float = 600.0) -> list[dict[str, object]]:
        """Sites whose readings were refused in the last ``within_s`` seconds, most refused first:
        domain, site, counts per reason (messages for :data:`MESSAGE_REFUSALS`, else readings),
        sample ids, seconds since the last refusal."""
        rows: list[dict[str, object]] = [
            {"domain": d, "site": s, "refused": dict(r.counts), "sample_ids": list(r.samples),
             "age_s": round(now_s - r.last_s, 1)}
            for (d, s), r in self.refused.items()
            if now_s - r.last_s <= within_s
        ]  # fmt: skip
        rows.sort(key=lambda row: -sum(row["refused"].values()))  # type: ignore[attr-defined]
        return rows


# ---------------------------------------------------------------- registry file and topic records


def load_registry_file(path: Path) -> frozenset[SeriesKey]:
    """The series of a registry file: TOML (``[site]`` tables of ``domain = ["sensor_id", ...]``)
    or CSV (header ``domain,site,sensor_id``). Raises :class:`ConfigError` naming the problem."""
    if path.suffix not in (".csv", ".toml"):
        raise ConfigError(f"admission.registry_file {path}: must end in .toml or .csv")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"admission.registry_file {path}: {exc.strerror}") from None
    keys: list[SeriesKey] = []
    if path.suffix == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        if rows.fieldnames is None or not {"domain", "site", "sensor_id"} <= set(rows.fieldnames):
            raise ConfigError(f"admission.registry_file {path}: the header must name domain,site,sensor_id")
        keys = [(r["domain"].strip(), r["site"].strip(), r["sensor_id"].strip()) for r in rows]
    elif path.suffix == ".toml":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"admission.registry_file {path}: {exc}") from None
        for site, domains in doc.items():
            if not isinstance(domains, dict):
                raise ConfigError(f"admission.registry_file {path}: [{site}] must be a table of domain = [ids]")
            for domain, ids in domains.items():
                if not isinstance(ids, list):
                    raise ConfigError(f"admission.registry_file {path}: {site}.{domain} must be a list of ids")
                keys += [(domain, site, str(i)) for i in ids]
    bad = [k for k in keys if not all(ID_RE.fullmatch(part) for part in k)]
    if bad:
        raise ConfigError(f"admission.registry_file {path}: invalid id in {'/'.join(bad[0])} ({len(bad)} such)")
    return frozenset(keys)


def encode_registry_record(change: RegistryChange) -> tuple[bytes, bytes | None]:
    """Key and value of the registry topic's record (compacted; a None value forgets the key)."""
    key = "/".join(change.key).encode()
    if change.last_seen_s is None:
        return key, None
    # json.dumps' text for two floats, without its per-call set-up (a fleet's first minute has
    # one record per sensor)
    return key, f'{{"first_seen": {float(change.first_seen_s)!r}, "last_seen": {float(change.last_seen_s)!r}}}'.encode()


def decode_registry_record(key: bytes, value: bytes | None) -> tuple[SeriesKey, tuple[float, float] | None] | None:
    """``(series, (first seen, last seen))`` of a registry record, ``(series, None)`` for a
    tombstone, None for a record that is not one of ours."""
    parts = key.decode(errors="replace").split("/")
    if len(parts) != 3:
        return None
    series = (parts[0], parts[1], parts[2])
    if value is None:
        return series, None
    try:
        doc = json.loads(value)
        return series, (float(doc["first_seen"]), float(doc["last_seen"]))
    except (ValueError, KeyError, TypeError):
        return None
