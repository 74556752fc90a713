"""structlog set-up: JSON lines for operators, readable lines on a terminal."""

from __future__ import annotations

import functools
import json as _json
import logging
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog

__all__ = ["REDACTED", "configure_logging", "redact"]

REDACTED = "[redacted]"
# Secrets: never logged, whatever the level.
_SECRET_KEY = re.compile(r"(authori[sz]ation|token|api[_-]?key|secret|password|passwd|credential|cookie|bearer)", re.I)
# Personal data: user identity and attributes (also the arbiter subject "user:<id>"), location;
# device and app facts stay.
_PII_KEY = re.compile(r"^(user([._].*)?|user_?id|subject|email|phone(_?number)?|location([._].*)?|ip)$", re.I)
_BEARER = re.compile(r"(bearer\s+)[^\s'\",;]+", re.I)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {k: _redact_entry(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def _redact_text(value: str) -> str:
    # A plain substring test first (the pattern needs "bearer", and only ASCII letters case-fold to it): a
    # regex search per string was most of a log line's redaction, and a cue round logs two lines.
    # search before sub: sub() with a template string re-parses the template on every call, even with no match.
    if "bearer" in value.lower() and _BEARER.search(value):
        return _BEARER.sub(r"\1" + REDACTED, value)
    return value


@functools.lru_cache(maxsize=4096)
def _hidden_key(key: str) -> bool:
    # Log lines reuse a few dozen keys: two regexes per key per line were a fifth of a cue's logging cost.
    return bool(_SECRET_KEY.search(key) or _PII_KEY.match(key))


def _redact_entry(key: str, value: Any, depth: int) -> Any:
    if _hidden_key(key):
        return REDACTED
    return _redact_value(value, depth)


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: secrets and personal data never reach the log.

    Values of secret-looking keys (authorization, token, api_key, password, ...)
    and of personal ones (user, user_id, user.*, email, location.*, ...) are
    replaced, also inside nested mappings such as a logged context; a
    ``Bearer <token>`` inside any string (an exception text, say) is masked.
    """
    # Values are replaced in place (the keys stay, so iterating while assigning is safe); most are short
    # strings (ids, names, the timestamp), handled without a call per level.
    for key, value in event_dict.items():
        if key != "event" and _hidden_key(key):
            event_dict[key] = REDACTED
        elif value.__class__ is str:
            if "bearer" in value.lower():
                event_dict[key] = _redact_text(value)
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


def _unserializable(value: Any) -> str:
    return repr(value)


# One encoder for every line: json.dumps with a `default` builds a new encoder per call (structlog's
# JSONRenderer passes one), which was a measurable share of an offered cue's cost.
_ENCODER = _json.JSONEncoder(default=_unserializable)
# msgspec writes the same JSON ~6x faster than the stdlib's encoder (1.3 against 7.7 us for a cue's line on the
# AMD host of 2026-12-06; every cue round logs two), compact and in UTF-8 rather than \u escapes. What it
# cannot encode (a key that is not a string or a number, say) goes to the stdlib encoder, which decides as
# before.
_FAST_ENCODER = msgspec.json.Encoder(enc_hook=_unserializable)


def _dumps(value: Any, **_: Any) -> str:
    try:
        return _FAST_ENCODER.encode(value).decode()
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return _ENCODER.encode(value)


class _Timestamp:
    """structlog processor: ``timestamp`` in TimeStamper(fmt="iso", utc=True)'s form, with the date and time of
    the current second formatted once per second (TimeStamper built a datetime and its ISO text for every
    line: 5.5 of a line's ~42 us on the AMD host). The microseconds are time.time()'s, rounded; datetime's
    own rounding of the same float differs in the last digit about one time in eight."""

    __slots__ = ("_head", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._head = ""

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # In whole microseconds, rounded as datetime.fromtimestamp rounds (exact: ~1.8e15 < 2**53).
        second, micros = divmod(round(time.time() * 1_000_000), 1_000_000)
        if second != self._second:
            self._head = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        # As datetime.isoformat: no fraction when it is zero.
        event_dict["timestamp"] = f"{self._head}.{micros:06d}Z" if micros else f"{self._head}Z"
        return event_dict


def configure_logging(
    level: str = "info", *, json: bool | None = None, file: TextIO | None = None, cache: bool = False
) -> None:
    """`cache`: each module's logger is built once, on its first line, instead of once per line; only for a
    process that configures logging once (`cuepoint serve`), since a cached logger ignores a later call."""
    if json is None:
        json = not (file or sys.stderr).isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps) if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _Timestamp(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=cache,
    )
