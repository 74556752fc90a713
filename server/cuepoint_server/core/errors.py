"""Domain errors. The gRPC layer maps each to a status code in one place."""

from __future__ import annotations

__all__ = [
    "CoreError",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]


class CoreError(Exception):
    pass


class InvalidInput(CoreError):
    """Client input is malformed; `field` is its path, e.g. signals[3].event.name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class NotFound(CoreError):
    pass


class PermissionDenied(CoreError):
    pass


class Unavailable(CoreError):
    pass


class Unauthenticated(CoreError):
    """No credentials, or credentials nobody issued."""


class ResourceExhausted(CoreError):
    """A rate limit is used up; `subject` names whose, e.g. ``device:fitkit/d1``."""

    def __init__(self, subject: str, message: str) -> None:
        super().__init__(message)
        self.subject = subject
        self.message = message
