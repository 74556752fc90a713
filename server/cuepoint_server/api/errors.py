"""The one boundary where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from ..core.errors import CoreError, InvalidInput, NotFound, PermissionDenied, Unavailable

__all__ = ["status_for"]

_CODES: tuple[tuple[type[CoreError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: CoreError) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"
