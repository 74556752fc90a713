"""Reject malformed client input before it touches state, naming the field.

Validation is all-or-nothing per message: a batch with one bad signal is
rejected whole, so nothing half-applied needs undoing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import InvalidInput
from .model import CONSENT_LEVELS, EventColumns, Hello, IncomingBatch, IncomingSignal, Scalar

__all__ = ["Limits", "clock_offset", "validate_batch", "validate_columns", "validate_hello"]

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
    # Hello.engaged_cue_ids: the SDK sends its most recent; each is a cue id the server issued.
    max_engaged_cues = 32
    max_cue_id = 64
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
    if len(hello.engaged_cue_ids) > Limits.max_engaged_cues:
        raise InvalidInput("hello.engaged_cue_ids", f"at most {Limits.max_engaged_cues} cue ids")
    for i, cue_id in enumerate(hello.engaged_cue_ids):
        if not cue_id or len(cue_id) > Limits.max_cue_id or not _printable(cue_id):
            raise InvalidInput(f"hello.engaged_cue_ids[{i}]", f"printable, 1 to {Limits.max_cue_id} characters")


def validate_batch(batch: IncomingBatch, now: float) -> None:
    if len(batch.signals) > Limits.max_signals_per_batch:
        raise InvalidInput("signals", f"batch of {len(batch.signals)} exceeds {Limits.max_signals_per_batch} signals")
    if batch.sent_at is not None and not math.isfinite(batch.sent_at):
        raise InvalidInput("signals.sent_at", "invalid timestamp")
    offset = clock_offset(batch, now)
    window = _time_window(now)
    seen: set[str] = set()
    for i, signal in enumerate(batch.signals):
        # Runs for every signal of every batch: field paths are only built for the error.
        problem = _signal_problem(signal, offset, window)
        if problem is not None:
            raise InvalidInput(_field(batch, i, problem[0]), problem[1])
        if signal.id in seen:
            raise InvalidInput(_field(batch, i, ".id"), f"id {signal.id!r} repeated within the batch")
        seen.add(signal.id)


# Where a signal's field is in a SignalColumns (api/convert.py) rather than in signals.signals[i].
_COLUMNS = {".id": "ids", ".time": "times_us", ".event.name": "names", ".kind": "names"}


def _field(batch: IncomingBatch, i: int, below: str) -> str:
    if not batch.columnar:
        return f"signals.signals[{i}]{below}"
    column = _COLUMNS.get(below)
    if column is not None:
        return f"signal_columns.{column}[{i}]"
    # .event.properties[...]: the signal's properties (prop_counts[i] entries of the property columns).
    return f"signal_columns.properties[{i}]{below.removeprefix('.event.properties')}"


# Event names and property keys repeat across millions of signals; once one has passed its pattern, a set
# lookup replaces the regex. Bounded so that a client inventing names cannot grow it without limit.
_KNOWN_GOOD: dict[re.Pattern[str], set[str]] = {}
_KNOWN_GOOD_MAX = 4096


def _good(text: str, pattern: re.Pattern[str]) -> bool:
    known = _KNOWN_GOOD.get(pattern)
    if known is None:
        known = _KNOWN_GOOD[pattern] = set()
    elif text in known:
        return True
    if not pattern.match(text):
        return False
    if len(known) >= _KNOWN_GOOD_MAX:
        known.clear()
    known.add(text)
    return True


def _signal_problem(signal: IncomingSignal, offset: float, window: tuple[float, float]) -> tuple[str, str] | None:
    """(field path below the signal, message) of the first problem, or None."""
    if not SIGNAL_ID.match(signal.id):
        return ".id", "required; 1-64 characters of A-Z a-z 0-9 _ . : -"
    if signal.time is not None:
        corrected = signal.time + offset
        if corrected > window[1]:
            return ".time", "timestamp is in the future"
        if corrected < window[0]:
            return ".time", "timestamp is more than 7 days old"
    if signal.kind == "event":
        if not _good(signal.name, EVENT_NAME):
            return ".event.name", f"invalid event name {signal.name!r}; expected {EVENT_NAME.pattern}"
        return _map_problem(".event.properties", signal.props, PROP_KEY)
    if signal.kind == "context":
        problem = _map_problem(".context", signal.context_set, None)
        if problem is not None:
            return problem
        for key in (*signal.context_set, *signal.clear_keys):
            if not CONTEXT_KEY.match(key):
                return ".context", f"unknown context key {key!r}"
        return None
    return ".kind", "a signal must carry an event or a context update"


def _map_problem(
    field: str, values: Mapping[str, Scalar], key_pattern: re.Pattern[str] | None
) -> tuple[str, str] | None:
    if len(values) > Limits.max_props:
        return field, f"more than {Limits.max_props} entries"
    for key, value in values.items():
        if key_pattern is not None and not _good(key, key_pattern):
            return f"{field}[{key!r}]", f"invalid key; expected {key_pattern.pattern}"
        if type(value) is str:
            if len(value) > Limits.max_string:
                return f"{field}[{key!r}]", f"string longer than {Limits.max_string} characters"
        elif type(value) is float and not math.isfinite(value):
            return f"{field}[{key!r}]", "number must be finite"
    return None


# A batch's ids joined by spaces: one C regex pass checks every id against SIGNAL_ID.
_JOINED_IDS = re.compile(r"[A-Za-z0-9_.:-]{1,64}(?: [A-Za-z0-9_.:-]{1,64})*")


def validate_columns(batch: EventColumns, now: float) -> None:
    """validate_batch for a batch of events held as columns, checked a column at a time.

    Each check reads a whole column (a regex over the joined ids, min and max of the times, each distinct
    name and key once). Only a batch that fails one is looked at signal by signal, by validate_batch, so
    the error names the same field it always did.
    """
    if not _columns_valid(batch, now):
        validate_batch(batch.rows(), now)


def _columns_valid(batch: EventColumns, now: float) -> bool:
    ids = batch.ids
    n = len(ids)
    if batch.sent_at is not None and not math.isfinite(batch.sent_at):
        return False
    if n == 1:
        # One signal (every message of an unbatched client): validate_batch's checks on it, without the
        # column-wide passes (a join, sets, generators), each costlier than the check itself for one value.
        signal = IncomingSignal(ids[0], batch.times[0], "event", batch.names[0], batch.props[0])
        return _signal_problem(signal, clock_offset(batch, now), _time_window(now)) is None
    if n > Limits.max_signals_per_batch:
        return False
    if not n:
        return True
    joined = " ".join(ids)
    if not _JOINED_IDS.fullmatch(joined) or joined.count(" ") != n - 1 or len(set(ids)) != n:
        return False
    times = batch.times
    present: list[float] = [t for t in times if t is not None] if None in times else times  # type: ignore[assignment]
    if present:
        offset = clock_offset(batch, now)
        oldest, newest = _time_window(now)
        if max(present) + offset > newest or min(present) + offset < oldest:
            return False
    if not all(_good(name, EVENT_NAME) for name in set(batch.names)):
        return False
    props = batch.props
    if not any(props):
        return True
    if batch.keys is not None:
        if len(batch.keys) > Limits.max_props or not all(_good(key, PROP_KEY) for key in batch.keys):
            return False
    elif max(map(len, props)) > Limits.max_props or not all(_good(key, PROP_KEY) for key in set().union(*props)):
        return False
    if batch.strings is not None and batch.doubles is not None:
        return max(map(len, batch.strings), default=0) <= Limits.max_string and all(map(math.isfinite, batch.doubles))
    for values in props:
        for value in values.values():
            if type(value) is str:
                if len(value) > Limits.max_string:
                    return False
            elif type(value) is float and not math.isfinite(value):
                return False
    return True


def _time_window(now: float) -> tuple[float, float]:
    """The server-clock times a signal may carry once corrected: at most max_age old, max_future_skew ahead."""
    return now - Limits.max_age, now + Limits.max_future_skew


def clock_offset(batch: IncomingBatch | EventColumns, now: float) -> float:
    """What to add to the batch's device times to move them onto the server clock.

    The offset between the batch's sent_at and our receipt corrects a skewed
    device clock while keeping the spacing of buffered signals intact.
    """
    return now - batch.sent_at if batch.sent_at is not None else 0.0
