"""The SDK's exceptions.

Everything the SDK raises on purpose derives from :class:`CuepointError`, so an
app can guard a whole integration with one ``except``. gRPC's own exceptions
never escape: they are translated in ``cuepoint._grpc_errors`` and the status
code name and server message are kept on the SDK error for diagnostics.

Configuration mistakes (a negative ``linger``) are programming errors and
raise :class:`ValueError` when the config is built, not a ``CuepointError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import EngagementUpdate

__all__ = [
    "BufferFull",
    "ClientClosed",
    "ConnectionLost",
    "CuepointError",
    "EngagementClosed",
    "InvalidSignal",
    "Rejected",
    "ServerError",
    "TimedOut",
]


class CuepointError(Exception):
    """Root of every error the SDK raises.

    ``code`` is the gRPC status code name (e.g. ``"INVALID_ARGUMENT"``) when the
    error came from the server, else ``None``. ``details`` is the server's status
    message verbatim, so logs show exactly what the server objected to.
    """

    def __init__(self, message: str, *, code: str | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


class ConnectionLost(CuepointError):
    """The server could not be reached, or the stream broke or ended early.

    With ``ClientConfig.reconnect`` (the default) an established client
    reconnects by itself and resends unacked signals; this error reaches the
    app only from ``connect()``/``start()``, when reconnecting gave up
    (``reconnect_max_attempts``), or from an engagement send made while the
    link was down. Without reconnect, signals that were queued or in flight but
    not acked are not known to be stored; the app may track them again on a
    new client.
    """


class TimedOut(CuepointError, TimeoutError):
    """An SDK wait (connect, flush, next cue, engagement state) ran out of time.

    Also a builtin :class:`TimeoutError`, so generic timeout handling works.
    """


class InvalidSignal(CuepointError):
    """Input the server would reject, caught locally or rejected by the server.

    Raised before anything is sent when ``track``/``set_context``/``connect``
    get malformed input (``field`` names the culprit), and when the server ends
    the stream with ``INVALID_ARGUMENT`` (``details`` is the server's
    explanation; ``field`` is the path it names, if any). Local checks exist
    because a server-side rejection ends the whole session, not just the bad
    signal.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        details: str | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.field = field


class Rejected(CuepointError):
    """The server (or the SDK on its behalf) refused the request.

    Covers unknown apps, missing permission, quota exhaustion and answering a
    cue that was already answered or withdrawn. Retrying unchanged will not help.
    """


class ServerError(CuepointError):
    """The server failed or broke the protocol (INTERNAL, UNIMPLEMENTED, ...)."""


class BufferFull(CuepointError):
    """Too many signals are waiting for acks (``ClientConfig.max_pending_signals``).

    Raised instead of blocking so an app's UI path never stalls on telemetry.
    """


class ClientClosed(CuepointError):
    """The client was closed, used before it was started, or its session ended.

    After a session failure, waits that were in progress get the failure
    itself; later calls get ClientClosed with the failure as ``__cause__``
    (also on ``client.failure``).
    """


class EngagementClosed(CuepointError):
    """An engagement ended before reaching the state that was waited for."""

    def __init__(self, message: str, *, update: EngagementUpdate) -> None:
        super().__init__(message)
        self.update = update
