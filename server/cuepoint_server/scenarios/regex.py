"""Regular expressions for `matches`, run by RE2: time linear in the value, whatever the pattern.

`matches` tests device-supplied values on the event loop. A backtracking engine (Python's `re`) can
take exponential time on a crafted value: `^([a-zA-Z0-9]+\\s?)*$` against 29 characters stalled the
whole server for 17 s. RE2 (google-re2) never backtracks, so a 1,024-character value costs
microseconds. The price is RE2's syntax: no backreferences and no lookaround. A pattern RE2 cannot
run is a scenario file error (file, line, field), found by `cuepoint validate` and by a reload.
"""

from __future__ import annotations

from collections.abc import Callable

import re2

__all__ = ["RegexError", "compile_search"]

# A bounded program: RE2 refuses patterns whose compiled form would need more (e.g. a{1000}{1000}),
# and its matching memory stays within this per pattern.
MAX_MEM = 8 << 20


class RegexError(ValueError):
    """The pattern is not valid RE2 syntax (or too large)."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the error goes into our report, not to stderr
    options.max_mem = MAX_MEM
    return options


def compile_search(pattern: str) -> Callable[[str], bool]:
    """A test "the pattern is found anywhere in the text" (like `re.search`); RegexError if RE2 refuses it."""
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(
            f"invalid regular expression: {reason}; `matches` uses RE2 syntax, which runs in linear time "
            "(no backreferences or lookaround)"
        ) from None
    search = compiled.search

    def found(text: str) -> bool:
        return search(text) is not None

    return found
