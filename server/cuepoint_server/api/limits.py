"""Flood control for device streams: token buckets per device, per app and per peer (client IP).

Costs are counted in signals: a batch costs its number of signals (at least
1), a Hello or a cue response costs 1. A bucket holds up to ``burst`` tokens
and refills at ``rate`` per second on the core's clock (so tests drive it with
a ManualClock). A message passes while every bucket it is charged to holds more
than zero tokens; its whole cost is then taken, possibly into debt, so the
sustained rate holds and yet a batch larger than what is left (or than the
burst) is never refused forever. A message that finds a bucket empty (or in
debt) ends that device's stream with RESOURCE_EXHAUSTED (google.rpc.QuotaFailure
naming the bucket); nothing of it is applied, and devices outside that bucket
are unaffected. The SDK reconnects after such a refusal with a throttled
backoff and resends what was not acked.

Why several buckets: the app key is public (it ships in every app), and a new
device id starts with a full device bucket, so the per-device limit alone lets
one attacker flood by rotating device ids. Rotating ids means opening streams,
so opening a stream (a Hello) is also charged to a per-peer and a per-app
*streams* bucket, and every signal to a per-peer and a per-app *signals* bucket.
All are on by default; the defaults only stop floods:

- per device: 5,000 signals/s, burst 20,000 (more than the SDK's whole offline
  buffer, ``ClientConfig.max_pending_signals`` = 10,000, so a reconnecting phone
  that flushes its backlog is never throttled);
- per peer: 20,000 signals/s (burst 100,000) and 50 new streams/s (burst 500):
  room for many phones behind one carrier NAT, not for one machine posing as thousands;
- per app: 100,000 signals/s (burst 500,000) and 1,000 new streams/s (burst
  20,000): above what one server ingests, so it caps a runaway app without
  touching a healthy one; size it to the app's install base.

Loopback peers are exempt from the per-peer buckets by default (``peer_exempt``):
the operator's own tools, benchmarks and tests open thousands of streams from
127.0.0.1. Behind a proxy on the same host every client looks like loopback, so
the per-peer buckets do nothing there; set ``peer_exempt=()`` to include loopback.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ResourceExhausted

__all__ = ["BUCKETS", "RateLimiter", "RateLimits", "TokenBucket", "peer_address"]

# Bucket kinds, as counted in RateLimiter.refused and shown in metrics.
BUCKETS = ("device", "app", "app_streams", "peer", "peer_streams")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Sustained rate per second and burst size of each bucket.

    A rate of 0 disables that bucket; a burst of 0 means one second's worth (at least 1).
    """

    device_rate: float = 5_000.0
    device_burst: float = 20_000.0
    app_rate: float = 100_000.0
    app_burst: float = 500_000.0
    app_streams_rate: float = 1_000.0
    app_streams_burst: float = 20_000.0
    peer_rate: float = 20_000.0
    peer_burst: float = 100_000.0
    peer_streams_rate: float = 50.0
    peer_streams_burst: float = 500.0
    # Networks whose peers skip the per-peer buckets (CIDR); default loopback only.
    peer_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Buckets kept per kind; the least recently used beyond this are forgotten (start full again).
    max_devices: int = 100_000

    def __post_init__(self) -> None:
        for name in type(self).__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, float | int) and value < 0:
                raise ValueError(f"{name} must be >= 0")
        for network in self.peer_exempt:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"peer_exempt: {network!r} is not a network (e.g. 10.0.0.0/8)") from None


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


def peer_address(peer: str | None) -> str | None:
    """The client IP of a grpc peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); None for others (unix sockets)."""
    if not peer:
        return None
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rpartition(":")[0] or None
    if scheme == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or None
    return None


class _Buckets:
    """One kind of bucket, keyed, least recently used forgotten beyond `limit`."""

    __slots__ = ("burst", "kind", "limit", "rate", "table")

    def __init__(self, kind: str, rate: float, burst: float, limit: int) -> None:
        self.kind = kind
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self.table: OrderedDict[object, TokenBucket] = OrderedDict()

    def get(self, key: object, now: float) -> TokenBucket:
        bucket = self.table.get(key)
        if bucket is None:
            bucket = self.table[key] = TokenBucket(self.rate, self.burst, now)
            if len(self.table) > self.limit:
                self.table.popitem(last=False)
        else:
            self.table.move_to_end(key)
        return bucket


class RateLimiter:
    def __init__(self, limits: RateLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        n = limits.max_devices
        self._devices = _Buckets("device", limits.device_rate, limits.device_burst, n)
        self._apps = _Buckets("app", limits.app_rate, limits.app_burst, n)
        self._app_streams = _Buckets("app_streams", limits.app_streams_rate, limits.app_streams_burst, n)
        self._peers = _Buckets("peer", limits.peer_rate, limits.peer_burst, n)
        self._peer_streams = _Buckets("peer_streams", limits.peer_streams_rate, limits.peer_streams_burst, n)
        self._exempt = tuple(ipaddress.ip_network(net, strict=False) for net in limits.peer_exempt)
        self._exempt_cache: OrderedDict[str, bool] = OrderedDict()
        # Refusals by bucket kind (metrics: cuepoint_rate_limited_total{bucket}).
        self.refused: Counter[str] = Counter()

    def charge_stream(self, app_id: str, device_id: str, peer: str | None) -> None:
        """A Hello: one token from the signal buckets and from the streams buckets.

        `peer` is `peer_key()` of the stream's grpc peer, resolved once per stream.
        """
        self._charge(app_id, device_id, peer, 1, streams=True)

    def charge(self, app_id: str, device_id: str, cost: int = 1, peer: str | None = None) -> None:
        """Take `cost` tokens from the device's, the app's and the peer's bucket, or raise ResourceExhausted."""
        self._charge(app_id, device_id, peer, cost, streams=False)

    def tracked(self) -> dict[str, int]:
        """Buckets currently kept, by kind."""
        return {b.kind: len(b.table) for b in self._all()}

    def _all(self) -> tuple[_Buckets, ...]:
        return (self._devices, self._apps, self._app_streams, self._peers, self._peer_streams)

    def peer_key(self, peer: str | None) -> str | None:
        """The per-peer budgets' key for a grpc peer string: its IP, or None when exempt (loopback) or off."""
        address = peer_address(peer)
        if address is None or not (self.limits.peer_rate or self.limits.peer_streams_rate):
            return None
        exempt = self._exempt_cache.get(address)
        if exempt is None:
            try:
                ip = ipaddress.ip_address(address)
                exempt = any(ip in net for net in self._exempt)
            except ValueError:
                exempt = False
            self._exempt_cache[address] = exempt
            if len(self._exempt_cache) > self.limits.max_devices:
                self._exempt_cache.popitem(last=False)
        return None if exempt else address

    def _charge(self, app_id: str, device_id: str, peer: str | None, cost: int, *, streams: bool) -> None:
        now = self._clock()
        cost = max(1, cost)
        taken: list[tuple[TokenBucket, int]] = []
        # (buckets, key, unit); the refusal's subject is spelled only when one refuses (this runs per message).
        checks: list[tuple[_Buckets, Any, str]] = [
            (self._devices, (app_id, device_id), "signals"),
            (self._apps, app_id, "signals"),
        ]
        if peer is not None:
            checks.append((self._peers, peer, "signals"))
        if streams:
            checks.append((self._app_streams, app_id, "new streams"))
            if peer is not None:
                checks.append((self._peer_streams, peer, "new streams"))
        for buckets, key, unit in checks:
            if not buckets.rate:
                continue
            bucket = buckets.get(key, now)
            if bucket.refill(now) <= 0:
                self.refused[buckets.kind] += 1
                what = buckets.kind.replace("_streams", "")
                subject = f"device:{key[0]}/{key[1]}" if buckets is self._devices else f"{buckets.kind}:{key}"
                raise ResourceExhausted(
                    subject, f"{what} rate limit: {buckets.rate:g} {unit}/s (burst {bucket.burst:g})"
                )
            taken.append((bucket, 1 if unit == "new streams" else cost))
        # All had room: only now take (into debt if need be), so a refusal by one never drains another.
        for bucket, amount in taken:
            bucket.tokens -= amount
