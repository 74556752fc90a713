"""The one boundary where gRPC failures become SDK errors.

Nothing else in the SDK inspects ``grpc.RpcError``: the transport hands every
failure to :func:`from_rpc_error` / :func:`from_status`, so the mapping below
is the complete story of which status code means what to an app.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import grpc

from .errors import ConnectionLost, CuepointError, InvalidSignal, Rejected, ServerError, TimedOut

# Grouped by what an app can do about it: retry later (ConnectionLost), fix
# the input (InvalidSignal), give up / fix setup (Rejected), report (ServerError).
_BY_CODE: dict[grpc.StatusCode, type[CuepointError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidSignal,
    grpc.StatusCode.UNAVAILABLE: ConnectionLost,
    grpc.StatusCode.CANCELLED: ConnectionLost,
    grpc.StatusCode.ABORTED: ConnectionLost,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimedOut,
    grpc.StatusCode.PERMISSION_DENIED: Rejected,
    grpc.StatusCode.UNAUTHENTICATED: Rejected,
    grpc.StatusCode.NOT_FOUND: Rejected,
    grpc.StatusCode.FAILED_PRECONDITION: Rejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Rejected,
    grpc.StatusCode.ALREADY_EXISTS: Rejected,
    grpc.StatusCode.OUT_OF_RANGE: Rejected,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.UNIMPLEMENTED: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
}


LOCAL_TRANSPORT_FAILURE = "Internal error from Core"
# gRPC's C core words a stream the peer reset at the HTTP/2 level (RST_STREAM) this way, and maps the reset's
# INTERNAL_ERROR to INTERNAL: a transport event, not a status the server's code sent. A server stopping with
# grpc's newer HTTP/2 server (GRPC_EXPERIMENTS=ph2_server) ends its streams so, as a proxy may.
_STREAM_RESET = "Stream removed (RST_STREAM"


def from_status(
    code: grpc.StatusCode | None, details: str | None, trailing_metadata: Iterable[Any] | None = None
) -> CuepointError:
    """The SDK error for a finished call's status.

    ``OK`` maps to ConnectionLost: callers only ask once the stream has ended,
    and a server that ends a session stream cleanly has still hung up on us.
    """
    details = details or None
    if code is None or code == grpc.StatusCode.OK:
        return ConnectionLost(details or "the server ended the stream", code=code.name if code else None)
    if code == grpc.StatusCode.INTERNAL and details == LOCAL_TRANSPORT_FAILURE:
        # gRPC's C core reports a write that raced a dead connection this way on
        # the client itself; the server said nothing. Reconnecting is right.
        return ConnectionLost(f"connection failed: {details}", code=code.name, details=details)
    if code == grpc.StatusCode.INTERNAL and details is not None and details.startswith(_STREAM_RESET):
        # Reset, not refused: a new stream (resuming the session, resending what was not acked) is right.
        return ConnectionLost(f"stream reset: {details}", code=code.name, details=details)
    cls = _BY_CODE.get(code, ServerError)
    message = f"{code.name}: {details}" if details else code.name
    if cls is InvalidSignal:
        field = _rich_field(trailing_metadata) or _field_of(details)
        return InvalidSignal(message, field=field, code=code.name, details=details)
    return cls(message, code=code.name, details=details)


# The server words INVALID_ARGUMENT details as "<field path>: <problem>",
# e.g. "signals.signals[3].event.name: invalid event name 'X'".
_FIELD_PREFIX = re.compile(r"([A-Za-z_][\w.]*(?:\[[^\]]*\][\w.]*)*): ")


def _field_of(details: str | None) -> str | None:
    match = _FIELD_PREFIX.match(details or "")
    return match.group(1) if match else None


_STATUS_DETAILS = "grpc-status-details-bin"


def _rich_field(trailing_metadata: Iterable[Any] | None) -> str | None:
    """The field of a google.rpc.BadRequest in the rich status trailer, if any.

    The rich status is decoded only when googleapis-common-protos is installed
    (it comes with grpcio-status); the SDK itself needs just grpcio and
    protobuf, and without it the field is read from the message, which the
    server words the same way.
    """
    blob = next((value for key, value in trailing_metadata or () if key == _STATUS_DETAILS), None)
    if not isinstance(blob, bytes):
        return None
    try:
        from google.protobuf.message import DecodeError
        from google.rpc.error_details_pb2 import BadRequest
        from google.rpc.status_pb2 import Status
    except ImportError:
        return None
    try:
        for detail in Status.FromString(blob).details:
            request = BadRequest()
            if detail.Unpack(request):  # False for other detail types
                for violation in request.field_violations:
                    if violation.field:
                        return str(violation.field)
    except DecodeError:
        return None
    return None


def from_rpc_error(error: grpc.RpcError) -> CuepointError:
    # Sync and aio errors both expose code()/details() when they describe a
    # call; a bare RpcError (e.g. from channel setup) does not.
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    trailers_fn = getattr(error, "trailing_metadata", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if code is None:
        return ConnectionLost(str(error) or "gRPC call failed")
    return from_status(code, details, trailers_fn() if callable(trailers_fn) else None)
