"""A scenario's guard: leaves that must hold for it to qualify, for the engine to index (engine/dispatch.py).

When a thousand scenarios listen to one event with conditions of their own (other property values,
other thresholds), evaluating each on every signal grows with their number. Most of them cannot hold:
the property has another value, the count is below the threshold, the event was never sent. A guard
names, for one scenario, a disjunction of simple facts ("atoms") of which at least one is true whenever
the scenario qualifies: a necessary condition, never a sufficient one. The engine indexes every
scenario's atoms by what they read, looks each distinct thing up once per signal (a dict for equality,
bisection for thresholds), and evaluates only the scenarios whose guard may hold; their full conditions
still decide, so decisions are exactly those of evaluating all of them.

Atoms (each implied by the leaf it comes from, as the compiler evaluates it):

* ``ctx``: a context attribute equals / is in values, or compares with a numeric bound;
* ``last``: the last occurrence of an event has a property that equals / is in values, or compares with
  a bound (a leaf on the latest occurrence, with a `where`; dwell on a screen);
* ``count``: the occurrences of an event matching a filter, newer than `within`, are at least N (a count
  leaf: its window is the one the compiler shares per event and filter);
* ``has``: the device has an occurrence of the event (any leaf that needs one);
* ``milestone``: the milestone is reached.

A scenario with no guard (only idle, negations, version or regex tests...) is evaluated every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from .compiler import SCREEN_EVENT, WindowCounter
from .loader import LoadedDefinition
from .model import (
    AllCondition,
    AnyCondition,
    AttributeCondition,
    Comparison,
    DwellCondition,
    EventCondition,
    MilestoneCondition,
    SegmentCondition,
)

__all__ = ["NUMERIC", "Atom", "Guard", "guard_of"]

# Threshold operators an atom may carry (bound compared with the value as the compiler's `_number` reads it).
NUMERIC = ("gt", "gte", "lt", "lte")


class Atom(NamedTuple):
    """One indexable fact; see the module docstring for the kinds.

    `subject` is the attribute (ctx), the property (last), the filter and window (count), the milestone id
    (milestone), or "" (has). `op` is "eq" (arg: the values), one of NUMERIC (arg: the bound), "ge" (count;
    arg: at least), or "" (has, milestone). `counter` (count only) counts the window's occurrences newer than
    `now - within`, from the same shared window the count leaf reads (subject: (counter.key, within)).
    """

    kind: str
    event: str
    subject: object
    op: str
    arg: Any
    counter: WindowCounter | None = None


# One disjunction of atoms; None: nothing indexable is necessary (the scenario is always evaluated).
Guard = tuple[Atom, ...] | None

# Rough cost of a clause's atoms when choosing among the children of an `all`: an equality splits by value,
# a threshold by bound, "has the event" only by what the device ever sent.
_WEIGHT = {"eq": 1, "gt": 2, "gte": 2, "lt": 2, "lte": 2, "ge": 2, "": 1}
_HAS_WEIGHT = 8
# The target is who the scenario is for (tiers, platforms, versions): usually shared by many scenarios, so it
# splits them worse than the trigger's behaviour does. Used only when the trigger gives nothing better.
_TARGET_FACTOR = 4


def guard_of(target: Any, trigger: Any, segments: Mapping[str, LoadedDefinition]) -> Guard:
    """A necessary condition of `target` and `trigger` both holding (the scenario's outcome and apps aside)."""
    found = _Finder(segments)
    options = [(found.cost(g), 0, g) for g in (found.guard(trigger),) if g is not None]
    if target is not None and (g := found.guard(target)) is not None:
        options.append((_TARGET_FACTOR * found.cost(g), 1, g))
    return min(options, key=lambda o: (o[0], o[1]))[2] if options else None


class _Finder:
    def __init__(self, segments: Mapping[str, LoadedDefinition]) -> None:
        self.segments = segments

    def cost(self, guard: tuple[Atom, ...]) -> int:
        return sum(
            _HAS_WEIGHT if a.kind == "has" else _WEIGHT[a.op] * (len(a.arg) if a.op == "eq" else 1) for a in guard
        )

    def guard(self, cond: Any, seen: frozenset[str] = frozenset()) -> Guard:
        if isinstance(cond, AllCondition):
            # Any one child is necessary: take the one that splits best.
            found = [g for c in cond.all if (g := self.guard(c, seen)) is not None]
            return min(found, key=self.cost) if found else None
        if isinstance(cond, AnyCondition):
            # One of the children holds: the union of their guards, if each has one.
            atoms: list[Atom] = []
            for c in cond.any:
                g = self.guard(c, seen)
                if g is None:
                    return None
                atoms.extend(a for a in g if a not in atoms)
            return tuple(atoms)
        if isinstance(cond, SegmentCondition):
            # The loader rejects cycles; `seen` only keeps a broken set from recursing forever.
            segment = self.segments.get(cond.segment)
            if segment is None or cond.segment in seen:
                return None
            return self.guard(segment.spec.when, seen | {cond.segment})
        if isinstance(cond, AttributeCondition):
            atom = _value_atom("ctx", "", cond.attribute, cond)
            return (atom,) if atom is not None else None
        if isinstance(cond, EventCondition):
            return (_event_atom(cond),) if _needs_occurrence(cond) else None
        if isinstance(cond, DwellCondition):
            # The last screen_viewed is on that screen (compiler: view.props.get("screen") == screen).
            return (Atom("last", SCREEN_EVENT, "screen", "eq", (cond.dwell.screen,)),)
        if isinstance(cond, MilestoneCondition):
            return (Atom("milestone", "", cond.milestone, "", None),)
        # not (a negation holds without anything indexable), idle, score.
        return None


def _needs_occurrence(cond: EventCondition) -> bool:
    """Whether the leaf can hold only if the device has an occurrence of its event."""
    if cond.rate is not None:
        # A rate of at least 0 (or only at most) holds with no occurrence at all.
        return cond.rate.at_least is not None and cond.rate.at_least > 0
    # count (at_least >= 1), streak (>= 1), aggregate (of some values), absence (of a follow-up to one),
    # latest (the last occurrence).
    return True


def _event_atom(cond: EventCondition) -> Atom:
    if cond.count is not None:
        counter = WindowCounter(cond.event, cond.where)
        within = cond.count.within
        return Atom("count", cond.event, (counter.key, within), "ge", cond.count.at_least, counter)
    if cond.rate is None and cond.streak is None and cond.aggregate is None and cond.not_followed_by is None:
        # The latest occurrence must match every `where` test: one of them will do.
        for prop, cmp in (cond.where or {}).items():
            atom = _value_atom("last", cond.event, prop, cmp)
            if atom is not None:
                return atom
    return Atom("has", cond.event, "", "", None)


def _value_atom(kind: str, event: str, subject: str, cmp: Comparison) -> Atom | None:
    """An atom for one of the comparison's operators (all must hold): equality first, then a threshold."""
    ops = cmp.operators()
    if "equals" in ops:
        return Atom(kind, event, subject, "eq", (ops["equals"],))
    if "in_" in ops:
        return Atom(kind, event, subject, "eq", tuple(dict.fromkeys(ops["in_"])))
    for op in NUMERIC:
        if op in ops and not math.isnan(float(ops[op])):
            return Atom(kind, event, subject, op, float(ops[op]))
    return None
