"""The one boundary where domain errors become gRPC status codes.

Every rejection carries a google.rpc rich status (``grpc-status-details-bin``
trailer) as well as the plain code and message, so clients in any language can
read structured details with their standard status helpers:

- INVALID_ARGUMENT: ``google.rpc.BadRequest`` with one field violation, the
  field path (``signals.signals[1].event.name``) and what is wrong with it;
- RESOURCE_EXHAUSTED: ``google.rpc.QuotaFailure`` naming the limited subject
  (``device:fitkit/phone-1`` or ``app:fitkit``).

The plain message stays ``"<field path>: <problem>"`` for clients that only
read the message.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from google.rpc.error_details_pb2 import BadRequest, QuotaFailure
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from ..core.errors import (
    CoreError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = ["abort", "rich_status", "status_for"]

_CODES: tuple[tuple[type[CoreError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)

# Messages may quote client input (an event name, a key); a client can make
# that input megabytes long, and a status travels in HTTP/2 trailers that
# clients cap at a few KiB. Clip so the status always arrives intact.
MAX_STATUS_TEXT = 512


def _clip(text: str, limit: int = MAX_STATUS_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def status_for(error: CoreError) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code, _clip(str(error))
    return grpc.StatusCode.INTERNAL, "internal error"


def _details(error: CoreError) -> list[Message]:
    if isinstance(error, InvalidInput):
        violation = BadRequest.FieldViolation(field=_clip(error.field, 256), description=_clip(error.message))
        return [BadRequest(field_violations=[violation])]
    if isinstance(error, ResourceExhausted):
        quota = QuotaFailure.Violation(subject=error.subject, description=_clip(error.message))
        return [QuotaFailure(violations=[quota])]
    return []


def rich_status(error: CoreError) -> grpc.Status:
    """The status (code, message and google.rpc details) a client gets for `error`."""
    code, message = status_for(error)
    status = Status(code=code.value[0], message=message)
    for detail in _details(error):
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(context: Any, error: CoreError) -> NoReturn:
    """End the call with `error`'s rich status; `context` is a grpc.aio.ServicerContext."""
    await context.abort_with_status(rich_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover
