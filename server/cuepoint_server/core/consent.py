"""One set of consent rules for everything derived from the user.

What the user agreed to decides which ``user.*`` facts may be stored or shown to anyone but the user:

- ``full``: all of them;
- ``essential``: the user id and tier (identity and the commercial fact routing needs);
- ``none``: none, not even the id.

The same rules apply to the associate's context panel, the journey (context updates in the signal journal),
the session rows, a cue's stored text and explanation, the engagement context (and so webhooks and
exports): a withheld key never reaches storage or another person, and its value is replaced by
``[redacted]`` wherever it was filled into text. The device itself still sees its own cue as rendered
("Hi Alice"): that is the user reading about themselves. Evaluation keeps the full context in memory for the
session's lifetime only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "Redactor", "shared"]

REDACTED = "[redacted]"
_ESSENTIAL = frozenset({"user.id", "user.tier"})
# Values shorter than this are not searched for in text: "3" or "US" would hit unrelated words.
_MIN_VALUE_LENGTH = 3
_NOTE = re.compile(r"\([^()]*\)\s*$")


def shared(key: str, consent: str) -> bool:
    """May this context key be stored or shown under this consent?"""
    if not key.startswith("user."):
        return True
    if consent == "full":
        return True
    return consent == "essential" and key in _ESSENTIAL


class Redactor:
    """The withheld keys and values of one context under one consent."""

    __slots__ = ("consent", "keys", "values")

    def __init__(self, context: Mapping[str, object], consent: str) -> None:
        self.consent = consent
        if consent == "full":
            # Nothing is withheld (`shared`): no pass over the context, which every offer would pay.
            self.keys: list[str] = []
            self.values: list[str] = []
            return
        self.keys = sorted(k for k in context if not shared(k, consent))
        values = {str(context[k]) for k in self.keys if context[k] is not None}
        # Longest first, so a value containing another is replaced whole.
        self.values = sorted((v for v in values if len(v) >= _MIN_VALUE_LENGTH), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def context(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in context.items() if shared(k, self.consent)}

    def text(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def payload(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """A context-update signal's payload ({"set", "clear"}): withheld keys dropped and listed."""
        changed = payload.get("set") or {}
        kept = {k: v for k, v in changed.items() if shared(k, self.consent)}
        out: dict[str, Any] = {"set": kept, "clear": list(payload.get("clear") or ())}
        withheld = sorted(set(changed) - set(kept))
        if withheld or payload.get("redacted"):
            out["redacted"] = sorted({*withheld, *(payload.get("redacted") or ())})
        return out

    def explanation(self, why: Mapping[str, Any]) -> dict[str, Any]:
        """A cue's explanation: observed values of withheld keys and values filled into its texts."""
        out = dict(why)
        conditions = []
        for path, description in why.get("conditions", []):
            if any(key in description for key in self.keys):
                description = _NOTE.sub(f"({REDACTED})", description)
            conditions.append([path, self.text(description)])
        out["conditions"] = conditions
        if isinstance(why.get("cue"), Mapping):
            out["cue"] = self._deep(why["cue"])
        return out

    def _deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self._deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._deep(v) for v in value]
        return value
