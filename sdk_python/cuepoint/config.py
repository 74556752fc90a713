"""Typed, immutable settings for the device and associate clients.

The device client reconnects by itself (``ClientConfig.reconnect``): after a
retryable failure it opens a new stream with jittered exponential backoff,
sends a Hello with the current context, and resends every unacked signal with
its original id, which the server de-duplicates. ``outbox_path`` additionally
keeps unacked signals on disk across app restarts. Both clients enable gRPC
keepalive pings by default (:data:`DEFAULT_CHANNEL_OPTIONS`, overridable
through ``channel_options``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = ["DEFAULT_CHANNEL_OPTIONS", "AssociateConfig", "ClientConfig", "merge_channel_options"]

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Ping every 20 s, idle or not, and drop the connection if a ping is not answered within
    # 10 s: a dead network path (NAT timeout, switched radio) is noticed within ~30 s instead
    # of at the next write. The server must accept pings this often (grpcio's default does);
    # a proxy or server enforcing a longer minimum answers with GOAWAY "too_many_pings".
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # grpc shares connections (subchannels) process-wide by default, and one that failed sits
    # in grpc's own backoff (1 s growing to 120 s) where every new channel fails fast. The SDK
    # opens a channel per (re)connect attempt and paces attempts itself, so each channel dials
    # afresh instead.
    ("grpc.use_local_subchannel_pool", 1),
)


def merge_channel_options(
    defaults: Sequence[tuple[str, Any]], overrides: Sequence[tuple[str, Any]]
) -> tuple[tuple[str, Any], ...]:
    """``defaults`` with every key also given in ``overrides`` replaced; the overrides win."""
    given = {key for key, _ in overrides}
    return (*(item for item in defaults if item[0] not in given), *overrides)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_secret(name: str, secret: str | None, metadata: Sequence[tuple[str, str]]) -> None:
    if secret is None:
        return
    if not isinstance(secret, str) or not secret or not secret.isprintable() or any(c.isspace() for c in secret):
        raise ValueError(f"{name} must be a non-empty string without spaces")
    if any(key.lower() == "authorization" for key, _ in metadata):
        raise ValueError(f"give either {name} or an 'authorization' entry in metadata, not both")


def _call_metadata(secret: str | None, metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    bearer = (("authorization", f"Bearer {secret}"),) if secret else ()
    return (*metadata, *bearer)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Settings of the device :class:`~cuepoint.client.Client`."""

    max_batch: int = 100
    """Most signals per SignalBatch; lowered further by the server's Welcome."""

    linger: float = 0.02
    """Seconds a queued signal may wait for company before its batch is sent."""

    max_pending_signals: int = 10_000
    """Queued plus unacked signals kept in memory before ``track`` raises BufferFull."""

    connect_timeout: float = 10.0
    """Seconds to get from opening the stream to the server's Welcome."""

    close_timeout: float = 5.0
    """Seconds ``close()`` spends flushing and letting the server end the stream."""

    clock: Callable[[], float] = time.time
    """Device clock in epoch seconds, used for signal and response timestamps."""

    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials; ``None`` opens a plaintext channel."""

    channel_options: Sequence[tuple[str, Any]] = ()
    """Extra grpc channel options; they override :data:`DEFAULT_CHANNEL_OPTIONS` key by key."""

    metadata: Sequence[tuple[str, str]] = ()
    """Call metadata sent when the stream opens."""

    api_key: str | None = field(default=None, repr=False)
    """The app's API key, sent as ``authorization: Bearer <api_key>`` (servers run with ``--auth``)."""

    reconnect: bool = True
    """Reconnect after a retryable failure (stream broken or ended early, UNAVAILABLE, CANCELLED,
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) instead of failing with ConnectionLost. The first
    ``start()`` is never retried: a client that cannot connect at all fails at once."""

    reconnect_initial_backoff: float = 0.2
    """Seconds; attempt n waits uniform(0, min(reconnect_max_backoff, initial * 2**n)) ("full jitter")."""

    reconnect_max_backoff: float = 30.0
    """Upper bound of one wait between reconnect attempts, seconds."""

    heartbeat_interval: float = 15.0
    """Seconds of silence after which the client probes the link with an empty batch; 0 disables.
    gRPC keepalive alone did not notice a link that drops packets without closing (a mobile network
    gone dark); an unanswered heartbeat does, and the client reconnects."""

    heartbeat_timeout: float = 10.0
    """Seconds a heartbeat may go unanswered before the link counts as dead."""

    reconnect_max_attempts: int | None = None
    """Consecutive attempts without progress before giving up with ConnectionLost; None: until ``close()``.
    An attempt counts as progress once the new session acks a batch or stays up for 10 s."""

    outbox_path: str | None = None
    """SQLite file keeping unacked signals across app restarts; None keeps them in memory only.

    Signals are written when tracked (coalesced: one transaction per event-loop pass, WAL,
    ``synchronous=NORMAL``) and deleted when acked. They survive the app being killed; an OS crash
    or power loss may lose the last transactions. A lost delete only causes a resend, which the
    server acks as a duplicate. On ``start()`` signals left by an earlier run with the same
    ``app_id`` and ``device_id`` are resent first, with their original ids and times (those older
    than the server accepts, 6 days here, are dropped)."""

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """``metadata`` plus the authorization entry for ``api_key``."""
        return _call_metadata(self.api_key, self.metadata)

    def grpc_options(self) -> tuple[tuple[str, Any], ...]:
        """The channel options actually used: keepalive defaults merged with ``channel_options``."""
        return merge_channel_options(DEFAULT_CHANNEL_OPTIONS, self.channel_options)

    def __post_init__(self) -> None:
        _check_secret("api_key", self.api_key, self.metadata)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch!r}")
        if self.linger < 0:
            raise ValueError(f"linger must be >= 0, got {self.linger!r}")
        if self.heartbeat_interval < 0 or self.heartbeat_timeout <= 0:
            raise ValueError("heartbeat_interval must be >= 0 and heartbeat_timeout > 0")
        if self.max_pending_signals < self.max_batch:
            raise ValueError("max_pending_signals must be >= max_batch")
        _positive("connect_timeout", self.connect_timeout)
        _positive("close_timeout", self.close_timeout)
        _positive("reconnect_initial_backoff", self.reconnect_initial_backoff)
        if self.reconnect_max_backoff < self.reconnect_initial_backoff:
            raise ValueError("reconnect_max_backoff must be >= reconnect_initial_backoff")
        attempts = self.reconnect_max_attempts
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1):
            raise ValueError(f"reconnect_max_attempts must be None or >= 1, got {attempts!r}")
        if self.outbox_path is not None and (not isinstance(self.outbox_path, str) or not self.outbox_path):
            raise ValueError("outbox_path must be a non-empty path or None")


@dataclass(frozen=True, kw_only=True)
class AssociateConfig:
    """Settings of the :class:`~cuepoint.associate.AssociateClient`."""

    connect_timeout: float = 10.0
    """Seconds to get from opening the stream to the server's SignedIn."""

    close_timeout: float = 5.0
    """Seconds ``close()`` lets the server end the stream after half-closing it."""

    credentials: grpc.ChannelCredentials | None = None
    channel_options: Sequence[tuple[str, Any]] = ()
    """Extra grpc channel options; they override :data:`DEFAULT_CHANNEL_OPTIONS` key by key."""
    metadata: Sequence[tuple[str, str]] = ()

    token: str | None = field(default=None, repr=False)
    """The associate's token, sent as ``authorization: Bearer <token>``; it names the
    associate id and the queues the server lets this associate sign in to."""

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """``metadata`` plus the authorization entry for ``token``."""
        return _call_metadata(self.token, self.metadata)

    def grpc_options(self) -> tuple[tuple[str, Any], ...]:
        """The channel options actually used: keepalive defaults merged with ``channel_options``."""
        return merge_channel_options(DEFAULT_CHANNEL_OPTIONS, self.channel_options)

    def __post_init__(self) -> None:
        _check_secret("token", self.token, self.metadata)
        _positive("connect_timeout", self.connect_timeout)
        _positive("close_timeout", self.close_timeout)
