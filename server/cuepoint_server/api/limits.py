"""Flood control for device streams: token buckets per device and per app.

Costs are counted in signals: a batch costs its number of signals (at least
1), a Hello or a cue response costs 1. A bucket holds up to ``burst`` tokens
and refills at ``rate`` per second on the core's clock (so tests drive it with
a ManualClock). A message passes while both buckets hold more than zero
tokens; its whole cost is then taken, possibly into debt, so the sustained
rate holds and yet a batch larger than what is left (or than the burst) is
never refused forever. A message that finds a bucket empty (or in debt) ends
that device's stream with RESOURCE_EXHAUSTED (google.rpc.QuotaFailure naming
the bucket); nothing of it is applied, and other devices (other apps, for the
per-app bucket) are unaffected. The SDK reconnects after such a refusal with a
throttled backoff and resends what was not acked.

The defaults only stop floods: a phone sends a handful of signals a second,
and the burst is larger than the SDK's whole offline buffer
(``ClientConfig.max_pending_signals`` = 10,000), so a reconnecting phone that
flushes its backlog is never throttled. The per-app bucket is off by default:
its right size depends on the app's install base.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import ResourceExhausted

__all__ = ["RateLimiter", "RateLimits", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Sustained signals per second and burst size, per device and per app.

    A rate of 0 disables that bucket; a burst of 0 means one second's worth (at least 1).
    """

    device_rate: float = 5_000.0
    device_burst: float = 20_000.0
    app_rate: float = 0.0
    app_burst: float = 0.0
    # Buckets kept (devices, apps); the least recently used beyond this are forgotten (start full again).
    max_devices: int = 100_000

    def __post_init__(self) -> None:
        for name in ("device_rate", "device_burst", "app_rate", "app_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self.tokens = self.burst
        self.stamp = now

    def refill(self, now: float) -> float:
        # A clock that steps back refills nothing rather than draining.
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        return self.tokens


class RateLimiter:
    def __init__(self, limits: RateLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self._devices: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._apps: OrderedDict[str, TokenBucket] = OrderedDict()

    def charge(self, app_id: str, device_id: str, cost: int = 1) -> None:
        """Take `cost` tokens from the device's and the app's bucket, or raise ResourceExhausted."""
        limits = self.limits
        now = self._clock()
        cost = max(1, cost)
        device = app = None
        if limits.device_rate:
            key = (app_id, device_id)
            device = self._devices.get(key)
            if device is None:
                device = self._devices[key] = TokenBucket(limits.device_rate, limits.device_burst, now)
                if len(self._devices) > limits.max_devices:
                    self._devices.popitem(last=False)
            else:
                self._devices.move_to_end(key)
            if device.refill(now) <= 0:
                raise ResourceExhausted(
                    f"device:{app_id}/{device_id}",
                    f"device rate limit: {limits.device_rate:g} signals/s (burst {device.burst:g})",
                )
        if limits.app_rate:
            app = self._apps.get(app_id)
            if app is None:
                app = self._apps[app_id] = TokenBucket(limits.app_rate, limits.app_burst, now)
                if len(self._apps) > limits.max_devices:
                    self._apps.popitem(last=False)
            else:
                self._apps.move_to_end(app_id)
            if app.refill(now) <= 0:
                raise ResourceExhausted(
                    f"app:{app_id}", f"app rate limit: {limits.app_rate:g} signals/s (burst {app.burst:g})"
                )
        # Both had room: only now take (into debt if need be), so a refusal by one never drains the other.
        if device is not None:
            device.tokens -= cost
        if app is not None:
            app.tokens -= cost
