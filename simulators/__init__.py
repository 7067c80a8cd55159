"""Simulators: the port's sensor fleets (pure, seeded), fault injection, MQTT publishing and replay."""

from portpulse.simulators.fleet import DOMAIN_METRICS, SITES, Fleet, make_fleet, reports
from portpulse.simulators.stream import (
    FAULT_KINDS,
    Block,
    FaultRecord,
    OutMessage,
    StreamConfig,
    generate,
    parse_faults,
)

__all__ = [
    "DOMAIN_METRICS",
    "FAULT_KINDS",
    "SITES",
    "Block",
    "FaultRecord",
    "Fleet",
    "OutMessage",
    "StreamConfig",
    "generate",
    "make_fleet",
    "parse_faults",
    "reports",
]
