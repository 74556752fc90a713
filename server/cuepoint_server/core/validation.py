"""Reject malformed client input before it touches state, naming the field.

Validation is all-or-nothing per message: a batch with one bad signal is
rejected whole, so nothing half-applied needs undoing.
"""

from __future__ import annotations

import math
import re

from .errors import InvalidInput
from .model import CONSENT_LEVELS, Hello, IncomingBatch, IncomingSignal, Scalar

__all__ = ["Limits", "validate_batch", "validate_hello"]

APP_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
SIGNAL_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
PROP_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CONTEXT_KEY = re.compile(
    r"^(app\.version|device\.(os|os_version|model|locale|timezone)|location\.(country|region|city)"
    r"|user\.[A-Za-z0-9_.-]{1,64}|attributes\.[A-Za-z0-9_.-]{1,64})$"
)


class Limits:
    max_signals_per_batch = 500
    max_props = 64
    max_string = 1024
    max_device_id = 128
    # Encoded size of one SignalBatch (the whole gRPC message is capped by ServerConfig.max_message_bytes).
    max_batch_bytes = 1024 * 1024
    # How far a corrected timestamp may sit in the future, and how old a
    # buffered signal may be, before we call the clock absurd.
    max_future_skew = 300.0
    max_age = 7 * 86400.0


def _printable(text: str) -> bool:
    return text.isprintable()


def _check_value(field: str, value: Scalar) -> None:
    if isinstance(value, str):
        if len(value) > Limits.max_string:
            raise InvalidInput(field, f"string longer than {Limits.max_string} characters")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(field, "number must be finite")


def _check_map(field: str, values: dict[str, Scalar], key_pattern: re.Pattern[str]) -> None:
    if len(values) > Limits.max_props:
        raise InvalidInput(field, f"more than {Limits.max_props} entries")
    for key, value in values.items():
        if not key_pattern.match(key):
            raise InvalidInput(f"{field}[{key!r}]", f"invalid key; expected {key_pattern.pattern}")
        _check_value(f"{field}[{key!r}]", value)


def validate_hello(hello: Hello) -> None:
    if not APP_ID.match(hello.app_id):
        raise InvalidInput("hello.app_id", "required; lowercase letters, digits, _ . - (at most 64)")
    if not hello.device_id or len(hello.device_id) > Limits.max_device_id or not _printable(hello.device_id):
        raise InvalidInput("hello.device_id", f"required; printable, at most {Limits.max_device_id} characters")
    if hello.consent not in CONSENT_LEVELS:
        raise InvalidInput("hello.consent.level", f"unknown consent level {hello.consent!r}")
    for key, value in hello.context.items():
        if not CONTEXT_KEY.match(key):
            raise InvalidInput(f"hello.context[{key[:80]!r}]", "invalid key; expected " + CONTEXT_KEY.pattern)
        _check_value(f"hello.context[{key!r}]", value)


def validate_batch(batch: IncomingBatch, now: float) -> None:
    if len(batch.signals) > Limits.max_signals_per_batch:
        raise InvalidInput("signals", f"batch of {len(batch.signals)} exceeds {Limits.max_signals_per_batch} signals")
    if batch.sent_at is not None and not math.isfinite(batch.sent_at):
        raise InvalidInput("signals.sent_at", "invalid timestamp")
    seen: set[str] = set()
    for i, signal in enumerate(batch.signals):
        _validate_signal(f"signals.signals[{i}]", signal, batch, now)
        if signal.id in seen:
            raise InvalidInput(f"signals.signals[{i}].id", f"id {signal.id!r} repeated within the batch")
        seen.add(signal.id)


def _validate_signal(field: str, signal: IncomingSignal, batch: IncomingBatch, now: float) -> None:
    if not SIGNAL_ID.match(signal.id):
        raise InvalidInput(f"{field}.id", "required; 1-64 characters of A-Z a-z 0-9 _ . : -")
    if signal.time is not None:
        corrected = event_time(signal, batch, now)
        if corrected > now + Limits.max_future_skew:
            raise InvalidInput(f"{field}.time", "timestamp is in the future")
        if corrected < now - Limits.max_age:
            raise InvalidInput(f"{field}.time", "timestamp is more than 7 days old")
    if signal.kind == "event":
        if not EVENT_NAME.match(signal.name):
            raise InvalidInput(
                f"{field}.event.name", f"invalid event name {signal.name!r}; expected {EVENT_NAME.pattern}"
            )
        _check_map(f"{field}.event.properties", signal.props, PROP_KEY)
    elif signal.kind == "context":
        _check_map(f"{field}.context", signal.context_set, re.compile(r".*"))
        for key in (*signal.context_set, *signal.clear_keys):
            if not CONTEXT_KEY.match(key):
                raise InvalidInput(f"{field}.context", f"unknown context key {key!r}")
    else:
        raise InvalidInput(f"{field}.kind", "a signal must carry an event or a context update")


def event_time(signal: IncomingSignal, batch: IncomingBatch, now: float) -> float:
    """Device time moved onto the server clock.

    The offset between the batch's sent_at and our receipt corrects a skewed
    device clock while keeping the spacing of buffered signals intact.
    """
    if signal.time is None:
        return now
    offset = now - batch.sent_at if batch.sent_at is not None else 0.0
    return signal.time + offset
