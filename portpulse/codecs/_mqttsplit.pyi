"""Compiled MQTT packet splitting for PacketReader (portpulse/codecs/_mqttsplit.c)."""

from typing import Any

def split(
    buf: bytes,
    v5: bool,
    publish: type,
    message: type = ...,
    received_ns: int = ...,
    generation: int = ...,
    /,
) -> tuple[list[Any], list[tuple[int, bytes]], int, int]:
    """(publishes, control packets, where the first incomplete packet starts, the bytes it needs)."""
