"""Which signals of a batch of events can make a scenario on their event qualify, read from the columns.

Ingest evaluates the scenarios listening to an event at each of its signals, against the state as of that
signal (core/ingest.py). Most of those evaluations cannot hold: the event's `where` wants another screen,
another value. Each condition group has a guard (scenarios/guards.py), a disjunction of facts necessary
for it to qualify; the facts this module can read for a whole batch at once are

* a context attribute (``ctx``): a batch of events changes no context, so it is looked at once per batch;
* the last occurrence of *this* event (``last``): right after its signal is recorded, the last occurrence
  is that signal (when `EventFilter.positions`'s caller has checked so), so the fact is a test of that
  signal's property, done per distinct value of the column, not per signal.

An event whose groups all have such guards gets a filter; one with any other guard (a count window, a
milestone, another event, none at all) gets None, and ingest evaluates at every signal as before. The
result is a superset of the signals where a group may qualify: the skipped evaluations would have found
nothing, so decisions are those of evaluating every signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import methodcaller

from ..scenarios.guards import Guard
from .dispatch import _Values
from .state import Scalar

__all__ = ["EventFilter"]


@dataclass(slots=True)
class EventFilter:
    """One event's condition groups, as far as the columns of a batch can rule them out."""

    event: str
    # Group position -> the apps it is limited to (empty: all): a group not for the device's app never runs.
    apps: list[frozenset[str]] = field(default_factory=list)
    # Per group: its context atoms by attribute, and its atoms on this event's last occurrence by property.
    context: list[dict[str, _Values]] = field(default_factory=list)
    last: list[dict[str, _Values]] = field(default_factory=list)

    @classmethod
    def build(cls, event: str, groups: Sequence[tuple[frozenset[str], Guard]]) -> EventFilter | None:
        """The filter of `event`'s groups ((apps, guard) each), or None if some guard is not readable here."""
        out = cls(event)
        for apps, guard in groups:
            if guard is None:
                return None
            context: dict[str, _Values] = {}
            last: dict[str, _Values] = {}
            for atom in guard:
                if atom.kind == "ctx":
                    context.setdefault(str(atom.subject), _Values()).add(atom, 0)
                elif atom.kind == "last" and atom.event == event:
                    last.setdefault(str(atom.subject), _Values()).add(atom, 0)
                else:
                    return None
            for values in (*context.values(), *last.values()):
                values.finish()
            out.apps.append(apps)
            out.context.append(context)
            out.last.append(last)
        return out

    def positions(self, app_id: str, context: Mapping[str, Scalar], props: Sequence[Mapping[str, Scalar]]) -> list[int]:
        """Indexes into `props` (this event's signals of a batch, in order) where some group's guard may hold.

        `props[i]` must be the properties of the event's last occurrence once signal i is recorded.
        """
        n = len(props)
        if n == 1:
            return [0] if self._may_hold(app_id, context, props[0]) else []
        found: set[int] = set()
        columns: dict[str, list[Scalar | None]] = {}
        for apps, ctx, last in zip(self.apps, self.context, self.last, strict=True):
            if apps and app_id not in apps:
                continue
            for key, values in ctx.items():
                if _holds(values, context.get(key)):
                    return list(range(n))  # a context fact holds for the whole batch
            for prop, values in last.items():
                column = columns.get(prop)
                if column is None:
                    column = columns[prop] = list(map(methodcaller("get", prop), props))
                if not values.bounds:
                    # Equality only: the dict lookup select() does, for each distinct value at once.
                    hits = values.equal.keys() & set(column)
                    hits.discard(None)
                    if hits:
                        found.update(compress(range(n), map(hits.__contains__, column)))
                    continue
                # Each distinct value tested once ((type, value): 1, 1.0 and True are one key in a set,
                # but not one number to a threshold).
                typed = list(zip(map(type, column), column, strict=True))
                passing = {k for k in set(typed) if _holds(values, k[1])}
                if passing:
                    found.update(compress(range(n), map(passing.__contains__, typed)))
            if len(found) == n:
                break
        return sorted(found)

    def _may_hold(self, app_id: str, context: Mapping[str, Scalar], props: Mapping[str, Scalar]) -> bool:
        """`positions` for a batch of one signal (an unbatched client's every message): the same tests, on the one
        value each, without building columns and sets."""
        for apps, ctx, last in zip(self.apps, self.context, self.last, strict=True):
            if apps and app_id not in apps:
                continue
            for key, values in ctx.items():
                if _holds(values, context.get(key)):
                    return True
            for prop, values in last.items():
                if _holds(values, props.get(prop)):
                    return True
        return False


def _holds(values: _Values, value: Scalar | None) -> bool:
    out: list[int] = []
    values.select(value, out)
    return bool(out)
