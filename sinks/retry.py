"""Pure retry policy for the InfluxDB writer: what a status means and how long to wait."""

from __future__ import annotations

import enum

__all__ = ["Outcome", "backoff_s", "classify"]


class Outcome(enum.Enum):
    STORED = "stored"
    #: The batch holds points the server refuses (parse error, type conflict, too large): bisect.
    SPLIT = "split"
    #: The server is away or overloaded: wait and send the same batch again.
    RETRY = "retry"
    #: Auth or bucket problems: nothing the points can fix; keep them and retry slowly, loudly.
    FIX_CONFIG = "fix_config"


def classify(status: int) -> Outcome:
    """Map an HTTP status (0 = no answer: refused, reset, timeout) to what the writer does."""
    if 200 <= status < 300:
        return Outcome.STORED
    if status in (400, 413, 422):
        return Outcome.SPLIT
    if status in (401, 403, 404):
        return Outcome.FIX_CONFIG
    return Outcome.RETRY  # 0, 408, 429, 5xx and anything unexpected: never drop


def backoff_s(attempt: int, initial_s: float, max_s: float, jitter: float, retry_after_s: float | None = None) -> float:
    """Delay before retry ``attempt`` (0-based): full-jitter exponential, at least ``Retry-After``.

    ``jitter`` is a uniform draw in [0, 1); the result lies in [initial_s / 2, max_s] unless the
    server asked for longer with Retry-After (capped at 10 x max_s so a bad header cannot stall us).
    """
    ceiling = min(max_s, initial_s * float(2 ** min(attempt, 30)))
    delay: float = ceiling / 2 + (ceiling / 2) * jitter
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, 10 * max_s))
    return delay
