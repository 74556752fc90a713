"""Local checks that mirror the server's input rules.

A malformed signal makes the server end the whole stream with
INVALID_ARGUMENT, so catching it here (and raising before anything is queued)
turns a lost session into an exception at the offending call site. The rules
are at least as strict as the contract in ``common.proto``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from .errors import InvalidSignal
from .models import Context, Scalar, User

EVENT_NAME = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")
MAX_DEVICE_ID = 128

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Keys a ContextUpdate may clear: the fixed scenario paths plus custom
# attributes ("attributes.<key>") and user attributes ("user.<key>").
CLEARABLE_PATHS = frozenset(
    {
        "app.version",
        "device.os",
        "device.os_version",
        "device.model",
        "device.locale",
        "device.timezone",
        "location.country",
        "location.region",
        "location.city",
    }
)
_CLEARABLE_PREFIXES = ("attributes.", "user.")


def event_name(name: object) -> str:
    if not isinstance(name, str) or not EVENT_NAME.fullmatch(name):
        raise InvalidSignal(
            f"event name {name!r} must match {EVENT_NAME.pattern}",
            field="event.name",
        )
    return name


def scalar(value: object, where: str) -> Scalar:
    if isinstance(value, bool | str):
        return value
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


def attributes(values: Mapping[str, object] | None, where: str) -> dict[str, Scalar]:
    """A validated copy, so later mutation by the caller cannot change what is sent."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidSignal(f"{where} must be a mapping", field=where)
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise InvalidSignal(f"{where} keys must be non-empty strings, got {key!r}", field=where)
        out[key] = scalar(value, f"{where}.{key}")
    return out


def clear_keys(keys: Iterable[str]) -> tuple[str, ...]:
    if isinstance(keys, str):
        # A lone string would otherwise be cleared character by character.
        raise InvalidSignal("clear_keys must be a list of keys, not a string", field="clear_keys")
    out = tuple(keys)
    for key in out:
        ok = isinstance(key, str) and (
            key in CLEARABLE_PATHS
            or any(key.startswith(p) and len(key) > len(p) for p in _CLEARABLE_PREFIXES)
        )
        if not ok:
            raise InvalidSignal(
                f"cannot clear {key!r}: use a scenario path such as app.version, "
                "attributes.<key> or user.<key>",
                field="clear_keys",
            )
    return out


def context(value: Context, where: str = "context") -> Context:
    if not isinstance(value, Context):
        raise InvalidSignal(f"{where} must be a cuepoint.Context", field=where)
    attributes(value.attributes, f"{where}.attributes")
    return value


def user(value: User | None, where: str = "user") -> User | None:
    if value is None:
        return None
    if not isinstance(value, User):
        raise InvalidSignal(f"{where} must be a cuepoint.User", field=where)
    attributes(value.attributes, f"{where}.attributes")
    return value


def identity(app_id: str, device_id: str) -> None:
    if not isinstance(app_id, str) or not app_id:
        raise InvalidSignal("app_id must be a non-empty string", field="hello.app_id")
    if not isinstance(device_id, str) or not device_id or len(device_id) > MAX_DEVICE_ID:
        raise InvalidSignal(
            f"device_id must be a non-empty string of at most {MAX_DEVICE_ID} characters",
            field="hello.device_id",
        )
