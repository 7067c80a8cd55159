"""One error root. Bad *records* are not exceptions that stop a loop: they travel as
:class:`Rejection` values to the dead-letter topic. Exceptions are for the process itself."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "PortPulseError",
    "ServiceUnavailableError",
    "SinkRejectedError",
]


class PortPulseError(Exception):
    """Root of every PortPulse error. ``retriable`` says whether trying again can succeed."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(PortPulseError):
    """Invalid settings or arguments; fix the configuration and start again."""


class DecodeError(PortPulseError):
    """A payload that cannot be turned into readings; ``reason`` is a short stable code for metrics/DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ServiceUnavailableError(PortPulseError):
    """MQTT, Kafka or InfluxDB did not answer; the caller backs off and retries."""

    retriable = True

    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service} unavailable: {detail}")
        self.service = service


class SinkRejectedError(PortPulseError):
    """The sink refused points for a reason that retrying cannot fix (e.g. a field type conflict)."""

    def __init__(self, status: int, server_message: str) -> None:
        super().__init__(f"rejected by sink (HTTP {status}): {server_message}")
        self.status = status
        self.server_message = server_message
