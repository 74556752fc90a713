"""Cue messages with {{ key }} placeholders filled from the device context.

Deliberately tiny (substitution and a default) rather than a general template
engine: messages are written by admins and rendered on the hot path, and an
admin typo must be caught when the file loads, not when a user sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Template", "TemplateError"]

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
_INNER = re.compile(
    r"""^\s*(?P<key>[A-Za-z][A-Za-z0-9_.-]*)\s*(?:\|\s*default\(\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')\s*\)\s*)?$"""
)


class TemplateError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Slot:
    key: str
    default: str | None


class Template:
    __slots__ = ("_parts", "keys", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[str | _Slot] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(source):
            parts.append(source[pos : match.start()])
            inner = _INNER.match(match.group(1))
            if not inner:
                raise TemplateError(
                    f"cannot read placeholder {match.group(0)!r}; write {{{{ key }}}} or "
                    f'{{{{ key | default("text") }}}}'
                )
            default = inner.group("dq") if inner.group("dq") is not None else inner.group("sq")
            parts.append(_Slot(inner.group("key"), default))
            pos = match.end()
        tail = source[pos:]
        if "{{" in tail or "}}" in tail:
            raise TemplateError("unbalanced {{ or }} in message")
        parts.append(tail)
        self._parts = tuple(p for p in parts if p != "")
        self.keys = frozenset(p.key for p in self._parts if isinstance(p, _Slot))

    def render(self, context: Mapping[str, object]) -> str:
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = context.get(part.key)
            if value is None or value == "":
                out.append(part.default if part.default is not None else "")
            else:
                out.append(str(value))
        # A missing value without default leaves double spaces; tidy them.
        return re.sub(r"\s{2,}", " ", "".join(out)).strip()
