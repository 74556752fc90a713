"""Local checks that mirror the server's input rules.

A malformed signal makes the server end the whole stream with
INVALID_ARGUMENT, so catching it here (and raising before anything is queued)
turns a lost session into an exception at the offending call site. The rules
match the server's validation; keep the two in step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidSignal
from .models import CallSignalKind, Channel, Context, FallbackOption, Location, Presence, Scalar, User

APP_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
EVENT_NAME = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")
KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Property, attribute and user-attribute keys."""
CONTEXT_PATH = re.compile(
    r"app\.version|device\.(os|os_version|model|locale|timezone)|location\.(country|region|city)"
    r"|user\.[A-Za-z0-9_.-]{1,64}|attributes\.[A-Za-z0-9_.-]{1,64}"
)
"""Keys a context update may set or clear."""
MAX_DEVICE_ID = 128
MAX_ENTRIES = 64
MAX_STRING = 1024
MAX_CHAT_TEXT = 4000
"""Characters in one chat message."""
MAX_CALL_PAYLOAD = 64 * 1024
"""Bytes in one call signal's payload."""
MAX_PHONE_NUMBER = 32
MAX_REASON = 1024
# user.id and user.tier address UserIdentity fields, so attributes may not shadow them.
RESERVED_USER_KEYS = frozenset({"id", "tier"})

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Names and keys that passed their pattern. An app tracks a few dozen distinct ones millions of times, and
# a set lookup is a fifth of a regex match on the hottest call (track(): issue 13). Bounded, so an app that
# makes up keys cannot grow it: once full it stops remembering (the pattern still decides).
_KNOWN_LIMIT = 4096
_known_names: set[str] = set()
_known_keys: set[str] = set()


def event_name(name: object) -> str:
    if name.__class__ is str and name in _known_names:
        return name  # checked when it was remembered
    if not isinstance(name, str) or not EVENT_NAME.fullmatch(name):
        raise InvalidSignal(f"event name {name!r} must match {EVENT_NAME.pattern}", field="event.name")
    if len(_known_names) < _KNOWN_LIMIT:
        _known_names.add(name)
    return name


def scalar(value: object, where: str) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return string(value, where)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidSignal(f"{where} = {value} does not fit in int64", field=where)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidSignal(f"{where} = {value} is not a finite number", field=where)
        return value
    raise InvalidSignal(
        f"{where} has type {type(value).__name__}; expected str, int, float or bool",
        field=where,
    )


def string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidSignal(f"{where} must be a string", field=where)
    if len(value) > MAX_STRING:
        raise InvalidSignal(f"{where} is longer than {MAX_STRING} characters", field=where)
    return value


def attributes(
    values: Mapping[str, object] | None, where: str, *, reserved: frozenset[str] = frozenset()
) -> dict[str, Scalar]:
    """A validated copy, so later mutation by the caller cannot change what is sent."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidSignal(f"{where} must be a mapping", field=where)
    return own_attributes(dict(values), where, reserved=reserved)


def own_attributes(values: dict[str, Any], where: str, *, reserved: frozenset[str] = frozenset()) -> dict[str, Scalar]:
    """``values`` checked in place and returned, for a dict nobody else holds: track()'s keyword arguments
    (Python builds that dict anew for every call, so track() need not copy it: issue 13) or attributes()' copy."""
    if len(values) > MAX_ENTRIES:
        raise InvalidSignal(f"{where} has more than {MAX_ENTRIES} entries", field=where)
    for key, value in values.items():
        if key.__class__ is not str or key not in _known_keys:
            if not isinstance(key, str) or not KEY.fullmatch(key):
                raise InvalidSignal(f"{where} key {key!r} must match {KEY.pattern}", field=where)
            if len(_known_keys) < _KNOWN_LIMIT:
                _known_keys.add(key)
        if key in reserved:
            raise InvalidSignal(f"{where} key {key!r} is reserved", field=f"{where}.{key}")
        # The common cases inline (exact types: bool is an int, a str subclass goes the long way).
        kind = value.__class__
        if kind is str:
            if len(value) > MAX_STRING:
                raise InvalidSignal(f"{where}.{key} is longer than {MAX_STRING} characters", field=f"{where}.{key}")
        elif kind is not int or not _INT64_MIN <= value <= _INT64_MAX:
            scalar(value, f"{where}.{key}")  # raises for anything but a valid scalar
    return values  # every value was checked to be a Scalar


def clear_keys(keys: Iterable[str]) -> tuple[str, ...]:
    if isinstance(keys, str):
        # A lone string would otherwise be cleared character by character.
        raise InvalidSignal("clear_keys must be a list of keys, not a string", field="clear_keys")
    out = tuple(keys)
    for key in out:
        if not isinstance(key, str) or not CONTEXT_PATH.fullmatch(key):
            raise InvalidSignal(
                f"cannot clear {key!r}: use a context path such as app.version, "
                "location.city, attributes.<key> or user.<key>",
                field="clear_keys",
            )
    return out


def location(value: Location | None, where: str) -> Location | None:
    if value is None:
        return None
    if not isinstance(value, Location):
        raise InvalidSignal(f"{where} must be a cuepoint.Location", field=where)
    for name in ("country", "region", "city"):
        string(getattr(value, name), f"{where}.{name}")
    return value


def context(value: Context, where: str = "context") -> Context:
    if not isinstance(value, Context):
        raise InvalidSignal(f"{where} must be a cuepoint.Context", field=where)
    for name in ("app_version", "os", "os_version", "device_model", "locale", "timezone"):
        string(getattr(value, name), f"{where}.{name}")
    location(value.location, f"{where}.location")
    attributes(value.attributes, f"{where}.attributes")
    return value


def user(value: User | None, where: str = "user") -> User | None:
    if value is None:
        return None
    if not isinstance(value, User):
        raise InvalidSignal(f"{where} must be a cuepoint.User", field=where)
    string(value.user_id, f"{where}.user_id")
    string(value.tier, f"{where}.tier")
    attributes(value.attributes, f"{where}.attributes", reserved=RESERVED_USER_KEYS)
    return value


def identity(app_id: object, device_id: object) -> None:
    if not isinstance(app_id, str) or not APP_ID.fullmatch(app_id):
        raise InvalidSignal(f"app_id {app_id!r} must match {APP_ID.pattern}", field="hello.app_id")
    if not isinstance(device_id, str) or not device_id or len(device_id) > MAX_DEVICE_ID or not device_id.isprintable():
        raise InvalidSignal(
            f"device_id must be 1-{MAX_DEVICE_ID} printable characters",
            field="hello.device_id",
        )


# Longest user token the server accepts (a JWT with a few claims is a few hundred bytes).
MAX_USER_TOKEN = 8192


def user_token(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_USER_TOKEN or not value.isprintable():
        raise InvalidSignal(f"user_token must be 1-{MAX_USER_TOKEN} printable characters", field="hello.user_token")
    return value


def cue_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSignal("cue_id must be a non-empty string", field="cue_response.cue_id")
    return value


# --- engagements ----------------------------------------------------------------


def engagement_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSignal(f"{where} must be a non-empty string", field=where)
    return value


def chat_text(value: object, where: str = "chat.text") -> str:
    """1-4000 characters, not only whitespace. Sent as given (never trimmed)."""
    if not isinstance(value, str):
        raise InvalidSignal(f"{where} must be a string", field=where)
    if not value.strip():
        raise InvalidSignal(f"{where} must not be empty", field=where)
    if len(value) > MAX_CHAT_TEXT:
        raise InvalidSignal(f"{where} is longer than {MAX_CHAT_TEXT} characters ({len(value)})", field=where)
    return value


def call_payload(value: object, where: str = "call_signal.payload") -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidSignal(f"{where} must be bytes, not {type(value).__name__}", field=where)
    data = bytes(value)
    if len(data) > MAX_CALL_PAYLOAD:
        raise InvalidSignal(f"{where} is larger than {MAX_CALL_PAYLOAD} bytes ({len(data)})", field=where)
    return data


def call_signal_kind(value: object, where: str = "call_signal.kind") -> CallSignalKind:
    if not isinstance(value, CallSignalKind):
        raise InvalidSignal(f"{where} must be a cuepoint.CallSignalKind", field=where)
    return value


def channel(value: object, where: str = "upgrade_request.channel") -> Channel:
    if not isinstance(value, Channel):
        raise InvalidSignal(f"{where} must be a cuepoint.Channel", field=where)
    return value


def flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidSignal(f"{where} must be a bool", field=where)
    return value


def fallback_option(value: object, where: str = "fallback_choice.option") -> FallbackOption:
    if not isinstance(value, FallbackOption):
        raise InvalidSignal(f"{where} must be a cuepoint.FallbackOption", field=where)
    return value


def phone_number(value: object, where: str = "fallback_choice.phone_number") -> str:
    if not isinstance(value, str) or len(value) > MAX_PHONE_NUMBER or not value.isprintable():
        raise InvalidSignal(f"{where} must be at most {MAX_PHONE_NUMBER} printable characters", field=where)
    return value


def presence(value: object, where: str = "presence") -> Presence:
    if not isinstance(value, Presence):
        raise InvalidSignal(f"{where} must be a cuepoint.Presence", field=where)
    return value


def names(values: Iterable[str], where: str) -> tuple[str, ...]:
    """A list of short names (queues, skills); a lone string is a mistake, not a list of letters."""
    if isinstance(values, str):
        raise InvalidSignal(f"{where} must be a list of names, not a string", field=where)
    out = tuple(values)
    for value in out:
        if not isinstance(value, str) or not value:
            raise InvalidSignal(f"{where} entries must be non-empty strings", field=where)
        string(value, where)
    return out
