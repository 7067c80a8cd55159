"""From fleets to MQTT messages, with faults, deterministically (pure: no clock, no sockets).

Schedule: report ``j`` is due ``j / rate`` seconds after the start and comes from sensor
``j % sensors``, so every sensor reports every ``sensors / rate`` seconds, staggered. The
physics noise and the faults draw from separate generators seeded from ``seed``: the clean
stream is the same whatever faults are asked for, and the same arguments give the same bytes.
Every injected fault is recorded as a :class:`FaultRecord` (the manifest).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from portpulse.simulators.fleet import DOMAIN_METRICS, Fleet, make_fleet, reports

__all__ = [
    "FAULT_KINDS",
    "FORMATS",
    "Block",
    "FaultRecord",
    "OutMessage",
    "StreamConfig",
    "generate",
    "parse_faults",
]

FORMATS = ("json", "json-batch", "line")
FAULT_KINDS = (
    "spike",
    "stuck",
    "dropout",
    "duplicate",
    "out_of_order",
    "late",
    "clock_skew",
    "malformed",
    "out_of_range",
    "oversized",
)
LATE_BY_S = 120.0
SKEW_S = 30.0
OVERSIZED_BYTES = 300 * 1024
BLOCK_S = 0.25


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """What to simulate. ``rate`` is sensor reports per second (each report carries all the
    sensor's metrics: 7 for air, 6 for crane and cell); ``faults`` maps a kind to a probability
    per report (``clock_skew``: per sensor)."""

    fleets: tuple[str, ...] = ("air", "crane", "cell")
    sensors: int = 300
    rate: float = 100.0
    duration_s: float = 10.0
    seed: int = 1
    start_ns: int = 1_764_000_000 * 10**9
    fmt: str = "json"
    batch_size: int = 100
    topic_prefix: str = "sensors"
    faults: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        if self.rate <= 0 or self.duration_s < 0 or self.sensors <= 0 or self.batch_size <= 0:
            raise ValueError("rate, sensors and batch size must be positive, duration not negative")
        bad = set(self.faults) - set(FAULT_KINDS)
        if bad:
            raise ValueError(f"unknown fault kind(s) {sorted(bad)}; choose from {', '.join(FAULT_KINDS)}")
        if any(not 0 <= p <= 1 for p in self.faults.values()):
            raise ValueError("fault rates are probabilities in [0, 1]")


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message to publish ``due_s`` seconds after the stream start."""

    seq: int
    due_s: float
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One injected fault. ``seq`` is the message it is in (``-1`` for a dropped report)."""

    kind: str
    seq: int
    topic: str
    sensor_id: str
    metric: str = ""
    ts_ns: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(slots=True)
class Block:
    messages: list[OutMessage]
    faults: list[FaultRecord]
    reports: int


def parse_faults(text: str) -> dict[str, float]:
    """``"spike=0.01,malformed=0.001"`` -> {"spike": 0.01, "malformed": 0.001}; ``"all=R"`` sets every kind."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, rate = part.partition("=")
        value = float(rate) if rate else 0.01
        if kind == "all":
            out.update(dict.fromkeys(FAULT_KINDS, value))
        else:
            out[kind] = value
    return out


def generate(config: StreamConfig) -> Iterator[Block]:
    """The stream in blocks of ``BLOCK_S`` seconds."""
    fleet = make_fleet(config.fleets, config.sensors, config.seed, config.start_ns)
    noise = np.random.default_rng([config.seed, 4])
    faults = np.random.default_rng([config.seed, 3])
    n = len(fleet)
    total = round(config.duration_s * config.rate)
    skewed = faults.random(n) < config.faults.get("clock_skew", 0.0)
    last: dict[tuple[int, str], float] = {}
    seq = 0
    held: OutMessage | None = None
    per_block = max(1, round(BLOCK_S * config.rate))
    for j0 in range(0, total, per_block):
        j = np.arange(j0, min(total, j0 + per_block), dtype=np.int64)
        sensor = j % n
        due = j / config.rate
        ts = config.start_ns + np.round(due * 1e9).astype(np.int64)
        block = reports(fleet, sensor, ts, noise)
        out_faults: list[FaultRecord] = []
        rows, row_faults = _apply_value_faults(
            config, fleet, block.values, sensor, ts, skewed, faults, last, out_faults
        )
        messages: list[OutMessage] = []
        for due_s, topic, payload, members, row_sensors in _format(config, fleet, block.values, sensor, ts, due, rows):
            for r in members:
                for kind, metric in row_faults.get(r, ()):
                    out_faults.append(
                        FaultRecord(kind, seq, topic, fleet.sensor_id[int(sensor[r])], metric, int(ts[r]))
                    )
            payload, message_faults = _message_faults(config, payload, faults)
            for kind in message_faults:
                out_faults.append(FaultRecord(kind, seq, topic, row_sensors, "", 0))
            msg = OutMessage(seq, due_s, topic, payload)
            seq += 1
            copies = [msg, msg] if "duplicate" in message_faults else [msg]
            if held is not None:  # an out-of-order message goes out right after its successor
                messages += copies
                messages.append(OutMessage(held.seq, due_s, held.topic, held.payload))
                held = None
                continue
            if "duplicate" not in message_faults and faults.random() < config.faults.get("out_of_order", 0.0):
                out_faults.append(FaultRecord("out_of_order", msg.seq, topic, row_sensors))
                held = msg
                continue
            messages += copies
        yield Block(messages, out_faults, len(j))
    if held is not None:
        yield Block([held], [], 0)


def _apply_value_faults(
    config: StreamConfig,
    fleet: Fleet,
    values: dict[str, np.ndarray],
    sensor: np.ndarray,
    ts: np.ndarray,
    skewed: np.ndarray,
    rng: np.random.Generator,
    last: dict[tuple[int, str], float],
    out: list[FaultRecord],
) -> tuple[np.ndarray, dict[int, list[tuple[str, str]]]]:
    """Skewed clocks, dropouts, late timestamps, spikes, out-of-range and stuck values.

    Mutates ``values`` and ``ts``; returns the rows that are sent and, per row, the faults in it
    as (kind, metric). Dropouts go straight to ``out`` (they never become a message).
    """
    rates = config.faults
    n = len(sensor)
    ts += np.where(skewed[sensor], int(SKEW_S * 1e9), 0)
    row_faults: dict[int, list[tuple[str, str]]] = {}
    for r in np.flatnonzero(skewed[sensor]).tolist():
        row_faults.setdefault(r, []).append(("clock_skew", ""))
    value_kinds = ("dropout", "late", "spike", "out_of_range", "stuck")
    if not any(rates.get(k, 0.0) for k in value_kinds):
        return np.arange(n), row_faults
    draws = rng.random((n, 6))
    keep = np.ones(n, dtype=bool)
    track_stuck = rates.get("stuck", 0.0) > 0
    for r in range(n):
        s = int(sensor[r])
        metrics = DOMAIN_METRICS[fleet.domain[s]]
        d = draws[r]
        if d[0] < rates.get("dropout", 0.0):
            keep[r] = False
            out.append(FaultRecord("dropout", -1, "", fleet.sensor_id[s], "", int(ts[r])))
            continue
        if d[1] < rates.get("late", 0.0):
            ts[r] -= int(LATE_BY_S * 1e9)
            row_faults.setdefault(r, []).append(("late", ""))
        metric = metrics[int(d[5] * len(metrics)) % len(metrics)]
        if d[2] < rates.get("spike", 0.0):
            values[metric][r] = round(float(values[metric][r]) * 8 + 50, 2)
            row_faults.setdefault(r, []).append(("spike", metric))
        elif d[3] < rates.get("out_of_range", 0.0):
            values[metric][r] = -999.0
            row_faults.setdefault(r, []).append(("out_of_range", metric))
        elif d[4] < rates.get("stuck", 0.0) and (s, metric) in last:
            values[metric][r] = last[(s, metric)]
            row_faults.setdefault(r, []).append(("stuck", metric))
        if track_stuck:
            for m in metrics:
                last[(s, m)] = float(values[m][r])
    return np.flatnonzero(keep), row_faults


def _format(
    config: StreamConfig,
    fleet: Fleet,
    values: dict[str, np.ndarray],
    sensor: np.ndarray,
    ts: np.ndarray,
    due: np.ndarray,
    rows: np.ndarray,
) -> Iterator[tuple[float, str, bytes, list[int], str]]:
    """(due_s, topic, payload, rows in it, who: sensor id or site) per message."""
    prefix = config.topic_prefix
    if config.fmt == "json":
        # A %-template per domain with repr floats: the same JSON as json.dumps, several times faster.
        templates = {
            d: '{"ts":%d,"metrics":{' + ",".join(f'"{m}":%r' for m in DOMAIN_METRICS[d]) + "}}" for d in config.fleets
        }
        columns = {m: v.tolist() for m, v in values.items()}
        ts_ms = (ts // 1_000_000).tolist()
        due_l, sensor_l = due.tolist(), sensor.tolist()
        domains, sites, ids = fleet.domain, fleet.site, fleet.sensor_id
        for r in rows.tolist():
            s = sensor_l[r]
            domain, sid = domains[s], ids[s]
            template = templates[domain]
            payload = (template % (ts_ms[r], *(columns[m][r] for m in DOMAIN_METRICS[domain]))).encode()
            yield due_l[r], f"{prefix}/{domain}/{sites[s]}/{sid}", payload, [r], sid
        return
    # Batches: consecutive reports of one (domain, site), up to batch_size, sent when the last is due.
    groups: dict[tuple[str, str], list[int]] = {}
    for r in rows.tolist():
        s = int(sensor[r])
        groups.setdefault((fleet.domain[s], fleet.site[s]), []).append(r)
    for (domain, site), members in groups.items():
        for k in range(0, len(members), config.batch_size):
            chunk = members[k : k + config.batch_size]
            last_due = float(due[chunk[-1]])
            if config.fmt == "json-batch":
                readings = [
                    {
                        "sensor_id": fleet.sensor_id[int(sensor[r])],
                        "ts": int(ts[r]) // 1_000_000,
                        "metrics": {m: float(values[m][r]) for m in DOMAIN_METRICS[domain]},
                    }
                    for r in chunk
                ]
                payload = json.dumps({"readings": readings}, separators=(",", ":")).encode()
                yield last_due, f"{prefix}/{domain}/{site}", payload, chunk, site
            else:
                lines = [
                    f"{domain},sensor_id={fleet.sensor_id[int(sensor[r])]} "
                    + ",".join(f"{m}={float(values[m][r])!r}" for m in DOMAIN_METRICS[domain])
                    + f" {int(ts[r])}"
                    for r in chunk
                ]
                yield last_due, f"{prefix}/{domain}/{site}/gw-{site[:12]}", "\n".join(lines).encode(), chunk, site


def _message_faults(config: StreamConfig, payload: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    draws = rng.random(3)
    kinds = []
    if draws[0] < config.faults.get("malformed", 0.0):
        payload = payload[: max(1, len(payload) // 2)] + b"\x00{"
        kinds.append("malformed")
    elif draws[1] < config.faults.get("oversized", 0.0):
        payload = payload + b" " * OVERSIZED_BYTES
        kinds.append("oversized")
    if draws[2] < config.faults.get("duplicate", 0.0):
        kinds.append("duplicate")
    return payload, kinds
