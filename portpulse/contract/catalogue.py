"""The metric catalogue: unit, valid range and max rate of change per (domain, metric).

The numbers live in ``catalogue.toml`` (data, not code); this module only loads and indexes them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from portpulse.contract.errors import ConfigError

__all__ = ["Catalogue", "MetricSpec", "load_catalogue"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """Limits of one metric, in its canonical ``unit``."""

    domain: str
    metric: str
    unit: str
    min: float
    max: float
    max_rate_per_s: float
    convert: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    spike_check: bool = True  # False for step signals (a lock, a load) whose jumps are real
    spike_floor: float | None = None  # smallest spike threshold scale; default 1 % of the range
    alert_above: float | None = None  # latest value above this raises ``alert`` on dashboards
    alert: str = ""

    def to_canonical(self, value: float, unit: str) -> float:
        """Convert ``value`` given in ``unit`` to the canonical unit; raises KeyError for unknown units."""
        if unit == self.unit:
            return value
        return value * self.convert[unit]


@dataclass(frozen=True, slots=True)
class Catalogue:
    """All known metrics, indexed by ``(domain, metric)``."""

    specs: Mapping[tuple[str, str], MetricSpec]

    def get(self, domain: str, metric: str) -> MetricSpec | None:
        return self.specs.get((domain, metric))

    def domains(self) -> list[str]:
        return sorted({d for d, _ in self.specs})

    def metrics(self, domain: str) -> list[str]:
        return sorted(m for d, m in self.specs if d == domain)


def _spec(domain: str, metric: str, raw: Mapping[str, Any]) -> MetricSpec:
    where = f"[{domain}.{metric}]"
    try:
        spec = MetricSpec(
            domain=domain,
            metric=metric,
            unit=str(raw["unit"]),
            min=float(raw["min"]),
            max=float(raw["max"]),
            max_rate_per_s=float(raw["max_rate_per_s"]),
            convert={str(k): float(v) for k, v in raw.get("convert", {}).items()},
            description=str(raw.get("description", "")),
            spike_check=bool(raw.get("spike_check", True)),
            spike_floor=float(raw["spike_floor"]) if "spike_floor" in raw else None,
            alert_above=float(raw["alert_above"]) if "alert_above" in raw else None,
            alert=str(raw.get("alert", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"catalogue {where}: missing or invalid {exc}") from None
    if not (math.isfinite(spec.min) and math.isfinite(spec.max) and spec.min < spec.max):
        raise ConfigError(f"catalogue {where}: need finite min < max")
    if spec.spike_floor is not None and not spec.spike_floor > 0:
        raise ConfigError(f"catalogue {where}: spike_floor must be > 0")
    if not spec.max_rate_per_s > 0:
        raise ConfigError(f"catalogue {where}: max_rate_per_s must be > 0")
    return spec


def load_catalogue(path: Path | None = None) -> Catalogue:
    """Load the catalogue from ``path``, or the one shipped with PortPulse."""
    text = path.read_text() if path else resources.files("portpulse.contract").joinpath("catalogue.toml").read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"catalogue is not valid TOML: {exc}") from None
    specs: dict[tuple[str, str], MetricSpec] = {}
    for domain, metrics in raw.items():
        if not isinstance(metrics, dict):
            raise ConfigError(f"catalogue: [{domain}] must be a table of metrics")
        for metric, body in metrics.items():
            specs[(domain, metric)] = _spec(domain, metric, body)
    return Catalogue(specs)
