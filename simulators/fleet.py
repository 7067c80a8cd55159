"""The port's sensor fleets, vectorised and deterministic for a seed (pure: time is passed in).

A *report* is one sensor's values for all its metrics at one instant (one MQTT message in the
single-reading format). :func:`reports` turns a block of report times into metric columns with
the physics of each domain:

- air: NO2/PM/SO2 follow a diurnal traffic curve (rush hours 8h and 18h local) plus ship plumes
  while a ship is at the station's berth, O3 peaks in the afternoon, each sensor drifts slowly.
- crane: load/unload cycles (spreader locks, hoists a container, travels, unlocks); wind gusts
  above 20 m/s stop operations (spreader unlocked, no load, trolley parked).
- cell: a daily load curve of connected UEs, cruise-ship calls crowding the cruise terminal's
  cells; per-UE throughput falls and latency rises with the number of UEs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from portpulse.contract.schema import str_array

__all__ = [
    "DOMAIN_METRICS",
    "SITES",
    "Fleet",
    "Reports",
    "make_fleet",
    "reports",
]

#: Real places of the Le Havre port and city area, per domain.
SITES: dict[str, tuple[str, ...]] = {
    "air": (
        "quai-de-l-europe",
        "bassin-vauban",
        "quai-de-southampton",
        "terminal-croisiere-pointe-de-floride",
        "port-2000",
        "harfleur",
        "sainte-adresse",
        "le-havre-centre",
    ),
    "crane": ("terminal-de-france", "terminal-porte-oceane", "terminal-de-normandie", "port-2000-tnmsc"),
    "cell": (
        "terminal-croisiere-pointe-de-floride",
        "port-2000",
        "quai-de-southampton",
        "le-havre-centre",
        "gare-du-havre",
        "bassin-de-l-eure",
    ),
}

DOMAIN_METRICS: dict[str, tuple[str, ...]] = {
    "air": ("no2", "pm25", "pm10", "o3", "so2", "temperature", "humidity"),
    "crane": ("hoist_load", "trolley_position", "wind_speed", "motor_temperature", "spreader_locked", "move_counter"),
    "cell": ("rsrp", "sinr", "dl_throughput", "ul_throughput", "connected_ues", "latency"),
}

WIND_STOP_MS = 20.0
CRANE_CYCLE_S = 120.0
_HOUR_NS = 3_600 * 10**9
_DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """The sensors: ids, sites and per-sensor parameters, all arrays of shape ``(n,)``."""

    domain: npt.NDArray[np.object_]
    sensor_id: npt.NDArray[np.object_]
    site: npt.NDArray[np.object_]
    base: npt.NDArray[np.float64]  # per-sensor level factor (~1)
    drift_per_day: npt.NDArray[np.float64]  # relative drift per day
    phase_s: npt.NDArray[np.float64]  # per-sensor phase (crane cycle offset, jitter)
    seed: int
    epoch_ns: int  # when the sensors were calibrated: drift grows from here

    def __len__(self) -> int:
        return len(self.sensor_id)

    def of(self, domain: str) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self.domain == domain)


def make_fleet(domains: tuple[str, ...], sensors: int, seed: int, epoch_ns: int = 0) -> Fleet:
    """``sensors`` sensors split evenly over ``domains``, ids like ``air-no2-00042``."""
    unknown = set(domains) - set(DOMAIN_METRICS)
    if unknown:
        raise ValueError(f"unknown fleet(s) {sorted(unknown)}; choose from {sorted(DOMAIN_METRICS)}")
    if sensors < len(domains):
        raise ValueError("need at least one sensor per fleet")
    rng = np.random.default_rng([seed, 0])
    dom, ids, sites = [], [], []
    for k, d in enumerate(domains):
        count = sensors // len(domains) + (1 if k < sensors % len(domains) else 0)
        prefix = {"air": "aq", "crane": "sts", "cell": "gnb"}[d]
        for i in range(count):
            dom.append(d)
            ids.append(f"{prefix}-{i:05d}")
            sites.append(SITES[d][i % len(SITES[d])])
    n = len(ids)
    return Fleet(
        domain=str_array(dom),
        sensor_id=str_array(ids),
        site=str_array(sites),
        base=rng.uniform(0.8, 1.2, n),
        drift_per_day=rng.normal(0.0, 0.01, n),
        phase_s=rng.uniform(0, CRANE_CYCLE_S, n),
        seed=seed,
        epoch_ns=epoch_ns,
    )


@dataclass(frozen=True, slots=True)
class Reports:
    """A block of reports: ``sensor`` (int64 index into the fleet), ``ts_ns`` (int64) and one
    float64 column per metric name (NaN where the metric is not the sensor's domain)."""

    sensor: npt.NDArray[np.int64]
    ts_ns: npt.NDArray[np.int64]
    values: dict[str, npt.NDArray[np.float64]]

    def __len__(self) -> int:
        return len(self.sensor)


def _local_hour(ts_ns: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Hour of day in Le Havre (UTC+1, ignoring summer time), float in [0, 24)."""
    return ((ts_ns / _HOUR_NS) + 1.0) % 24.0


def _traffic(hour: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Road and port traffic, ~0.2 at night, peaks ~1 at 8h and 18h."""
    return 0.2 + 0.8 * np.exp(-((hour - 8.0) ** 2) / 3.0) + 0.7 * np.exp(-((hour - 18.0) ** 2) / 4.0)


def ship_at_berth(site_code: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.bool_]:
    """Deterministic berth schedule: per site, a ship is alongside for 6 h of every 16 h, offset by site."""
    rng = np.random.default_rng([seed, 1])
    offsets_h = rng.uniform(0, 16, 64)
    hours = ts_ns / _HOUR_NS + offsets_h[site_code % 64]
    return (hours % 16.0) < 6.0


def cruise_call(ts_ns: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.float64]:
    """Crowd factor at the cruise terminal: 0 normally, up to 1 during a call (every 3rd day, 7h-19h)."""
    rng = np.random.default_rng([seed, 2])
    day_offset = int(rng.integers(0, 3))
    day = (ts_ns // (24 * _HOUR_NS) + day_offset) % 3
    hour = _local_hour(ts_ns)
    on = (day == 0) & (hour >= 7) & (hour < 19)
    return np.where(on, np.sin(np.pi * (hour - 7) / 12).clip(0, 1), 0.0)


def reports(
    fleet: Fleet, sensor: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64], rng: np.random.Generator
) -> Reports:
    """Metric values for reports of ``sensor`` (fleet indices) at ``ts_ns``; both of shape ``(n,)``.

    ``rng`` supplies the noise; the same fleet, inputs and generator state give identical output.
    """
    n = len(sensor)
    values = {m: np.full(n, np.nan) for metrics in DOMAIN_METRICS.values() for m in metrics}
    noise = rng.standard_normal((n, 6))
    hour = _local_hour(ts_ns)
    days = np.maximum(0.0, (ts_ns - fleet.epoch_ns) / (_DAY_S * 1e9))
    domain = fleet.domain[sensor]
    site_code = np.fromiter((hash_site(s) for s in fleet.site[sensor].tolist()), dtype=np.int64, count=n)
    base = fleet.base[sensor]
    drift = 1.0 + fleet.drift_per_day[sensor] * days

    air = domain == "air"
    if air.any():
        t = _traffic(hour[air])
        plume = ship_at_berth(site_code[air], ts_ns[air], fleet.seed).astype(np.float64)
        b, d, z = base[air], drift[air], noise[air]
        values["no2"][air] = np.maximum(0.0, (15 + 55 * t + 35 * plume) * b * d + 4 * z[:, 0]).round(1)
        values["pm25"][air] = np.maximum(0.0, (6 + 14 * t + 6 * plume) * b * d + 1.5 * z[:, 1]).round(1)
        values["pm10"][air] = np.maximum(0.0, values["pm25"][air] * 1.7 + 2 * np.abs(z[:, 2])).round(1)
        sun = np.clip(np.sin(np.pi * (hour[air] - 6) / 14), 0, None)
        values["o3"][air] = np.maximum(0.0, (30 + 60 * sun - 10 * t) * b + 5 * z[:, 3]).round(1)
        values["so2"][air] = np.maximum(0.0, (2 + 25 * plume) * b * d + 1.0 * np.abs(z[:, 4])).round(1)
        values["temperature"][air] = (10 + 5 * sun + 0.1 * z[:, 5]).round(2)
        values["humidity"][air] = np.clip(80 - 20 * sun + 0.8 * z[:, 0], 5, 100).round(1)

    crane = domain == "crane"
    if crane.any():
        ts_s = ts_ns[crane] / 1e9
        z = noise[crane]
        # Gusty wind: a slow daily swell plus gusts; above WIND_STOP_MS operations stop.
        wind = np.maximum(0.0, 9 + 5 * np.sin(2 * np.pi * ts_s / 5400.0) + 4 * np.abs(z[:, 0]) ** 1.5)
        stopped = wind > WIND_STOP_MS
        cycle = ((ts_s + fleet.phase_s[sensor[crane]]) % CRANE_CYCLE_S) / CRANE_CYCLE_S
        locked = (cycle >= 0.15) & (cycle < 0.75) & ~stopped
        container_t = 12 + 18 * ((np.floor((ts_s + fleet.phase_s[sensor[crane]]) / CRANE_CYCLE_S) * 7919) % 17) / 16
        values["spreader_locked"][crane] = locked.astype(np.float64)
        values["hoist_load"][crane] = np.where(locked, container_t + 0.2 * z[:, 1], 0.0).round(2)
        # Trolley from quay (0 m) to vessel (55 m) and back over the cycle (at most 1.5 m/s); a gust
        # stops the lift, not the trolley's travel.
        values["trolley_position"][crane] = (55 * np.sin(np.pi * cycle) ** 2).round(2)
        values["wind_speed"][crane] = wind.round(2)
        # The hoist motor warms over the cycle and cools back (a thermal mass does not jump).
        values["motor_temperature"][crane] = (45 + 20 * np.sin(np.pi * cycle) ** 2 + 0.3 * z[:, 2]).round(1)
        values["move_counter"][crane] = np.floor(
            (ts_s + fleet.phase_s[sensor[crane]]) / CRANE_CYCLE_S - 14_000_000
        ).clip(0, None)

    cell = domain == "cell"
    if cell.any():
        z = noise[cell]
        load = 0.15 + 0.85 * np.exp(-((hour[cell] - 13.0) ** 2) / 18.0)
        crowd = cruise_call(ts_ns[cell], fleet.seed) * (
            fleet.site[sensor[cell]] == "terminal-croisiere-pointe-de-floride"
        )
        ues = np.maximum(0.0, np.round((80 + 420 * load + 2500 * crowd) * base[cell] + 10 * z[:, 0]))
        values["connected_ues"][cell] = ues
        values["rsrp"][cell] = np.clip(-85 - 8 * (base[cell] - 1) * 10 + 2 * z[:, 1], -140, -44).round(1)
        values["sinr"][cell] = np.clip(22 - 4 * np.log1p(ues / 100) + 1.5 * z[:, 2], -20, 40).round(1)
        cell_capacity = 1500.0  # Mbit/s shared by the UEs
        values["dl_throughput"][cell] = np.maximum(0.1, cell_capacity / (1 + ues / 40) + 3 * z[:, 3]).round(2)
        values["ul_throughput"][cell] = np.maximum(0.05, values["dl_throughput"][cell] / 4 + z[:, 4]).round(2)
        values["latency"][cell] = np.maximum(1.0, 8 + ues / 60 + np.abs(z[:, 5]) * 2).round(1)
    return Reports(sensor, ts_ns, values)


_SITE_CODES: dict[str, int] = {}


def hash_site(site: str) -> int:
    """A stable small integer per site name (not Python's salted hash)."""
    code = _SITE_CODES.get(site)
    if code is None:
        code = _SITE_CODES[site] = sum(site.encode()) * 31 + len(site)
    return code
