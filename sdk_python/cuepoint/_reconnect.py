"""Reconnect policy: which failures are worth another session, and how long to wait.

Pure (no I/O, no clock): the client asks :func:`is_retryable` when a stream
fails and sleeps :meth:`Backoff.delay` before each attempt, so the tests can
check the schedule with a seeded random source.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .errors import ConnectionLost, CuepointError, TimedOut

__all__ = ["Backoff", "is_retryable", "is_throttled"]

# Status codes that mean "not now" rather than "not like this". Everything else
# (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, INTERNAL, ...)
# would fail the same way on a new stream, so it ends the client.
_THROTTLED = "RESOURCE_EXHAUSTED"


def is_retryable(error: CuepointError) -> bool:
    """True for a broken, timed-out or early-ended stream (UNAVAILABLE, CANCELLED, ABORTED,
    DEADLINE_EXCEEDED, a clean end without goodbye, no Welcome in time) and for RESOURCE_EXHAUSTED."""
    if error.code == _THROTTLED:
        return True
    return isinstance(error, ConnectionLost | TimedOut)


def is_throttled(error: CuepointError) -> bool:
    """The server refused for load: wait at least half the backoff cap before retrying."""
    return error.code == _THROTTLED


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(maximum, initial * 2**n)).

    ``throttled`` waits draw from the upper half, uniform(cap / 2, cap), so a
    server shedding load is never hit again at once.
    """

    def __init__(self, initial: float, maximum: float, uniform: Callable[[float, float], float] | None = None) -> None:
        if not initial > 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._uniform = uniform or random.uniform

    def cap(self, attempt: int) -> float:
        """The largest wait before attempt ``attempt`` (0-based)."""
        # 2**64 * initial exceeds any sane maximum; the clamp keeps the float finite.
        return min(self.maximum, self.initial * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, *, throttled: bool = False) -> float:
        cap = self.cap(attempt)
        return self._uniform(cap / 2 if throttled else 0.0, cap)
