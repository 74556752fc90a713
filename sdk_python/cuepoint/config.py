"""Typed, immutable settings for the device and associate clients.

Reconnect is deliberately absent: the client fails fast with
:class:`~cuepoint.errors.ConnectionLost`. The pieces a reconnecting client
needs are already in place (signal ids are generated once and kept with the
unacked payload, and ``_batcher.SignalBatcher.requeue_in_flight`` puts sent
but unacked signals back in order), so adding ``reconnect``/backoff settings
here later will not change any existing field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = ["AssociateConfig", "ClientConfig"]


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
    """Extra grpc channel options, e.g. keepalive settings."""

    metadata: Sequence[tuple[str, str]] = ()
    """Call metadata sent when the stream opens."""

    api_key: str | None = field(default=None, repr=False)
    """The app's API key, sent as ``authorization: Bearer <api_key>`` (servers run with ``--auth``)."""

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """``metadata`` plus the authorization entry for ``api_key``."""
        return _call_metadata(self.api_key, self.metadata)

    def __post_init__(self) -> None:
        _check_secret("api_key", self.api_key, self.metadata)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch!r}")
        if self.linger < 0:
            raise ValueError(f"linger must be >= 0, got {self.linger!r}")
        if self.max_pending_signals < self.max_batch:
            raise ValueError("max_pending_signals must be >= max_batch")
        _positive("connect_timeout", self.connect_timeout)
        _positive("close_timeout", self.close_timeout)


@dataclass(frozen=True, kw_only=True)
class AssociateConfig:
    """Settings of the :class:`~cuepoint.associate.AssociateClient`."""

    connect_timeout: float = 10.0
    """Seconds to get from opening the stream to the server's SignedIn."""

    close_timeout: float = 5.0
    """Seconds ``close()`` lets the server end the stream after half-closing it."""

    credentials: grpc.ChannelCredentials | None = None
    channel_options: Sequence[tuple[str, Any]] = ()
    metadata: Sequence[tuple[str, str]] = ()

    token: str | None = field(default=None, repr=False)
    """The associate's token, sent as ``authorization: Bearer <token>``; it names the
    associate id and the queues the server lets this associate sign in to."""

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """``metadata`` plus the authorization entry for ``token``."""
        return _call_metadata(self.token, self.metadata)

    def __post_init__(self) -> None:
        _check_secret("token", self.token, self.metadata)
        _positive("connect_timeout", self.connect_timeout)
        _positive("close_timeout", self.close_timeout)
