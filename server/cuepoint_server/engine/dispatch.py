"""Which of many condition groups on one event may hold for a device now, without evaluating each.

Built once per event (and per app's time-driven set) from the groups' guards (scenarios/guards.py): every
atom is filed under what it reads, so one look answers for all the groups that read the same thing:

* a context attribute: a dict from value to groups (equals, in), and per threshold operator a sorted list
  of bounds (bisection gives the groups whose bound the value passes);
* an event the device has sent: the groups that need only that; per property of its last occurrence, the
  same dict and bounds; per shared count window (event, filter, length), the sorted minimum counts;
* a reached milestone: its groups.

Only events the device has a history of and milestones it reached are looked at (the smaller side is
walked), so the cost follows what the device did and the distinct things the scenarios read, not how
many scenarios there are. Groups without a guard are always selected. `select` answers a superset of the
groups that qualify (every qualifying group's guard holds); Engine.check evaluates those in order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..scenarios.compiler import WindowCounter, as_number
from ..scenarios.guards import NUMERIC, Atom, Guard
from .state import DeviceState, Scalar

__all__ = ["Dispatch"]


@dataclass(slots=True)
class _Values:
    """Atoms on one value: equality through a dict, thresholds through sorted bounds."""

    equal: dict[Scalar, list[int]] = field(default_factory=dict)
    # op -> (bounds ascending, the group of each bound)
    bounds: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)

    def add(self, atom: Atom, group: int) -> None:
        if atom.op == "eq":
            for value in atom.arg:
                self.equal.setdefault(value, []).append(group)
        else:
            bounds, groups = self.bounds.setdefault(atom.op, ([], []))
            bounds.append(atom.arg)
            groups.append(group)

    def finish(self) -> None:
        for op, (bounds, groups) in self.bounds.items():
            pairs = sorted(zip(bounds, groups, strict=True))
            self.bounds[op] = ([b for b, _ in pairs], [g for _, g in pairs])

    def select(self, value: Scalar | None, out: list[int]) -> None:
        if value is None:
            return  # equality and thresholds need a value (compiler: _operator)
        if self.equal:
            # A dict finds what `==` finds among scalars (equal numbers hash equal; str never equals a number).
            try:
                found = self.equal.get(value)
            except TypeError:  # unhashable (not a scalar): equals no scalar either
                found = None
            if found:
                out.extend(found)
        if self.bounds:
            n = as_number(value)
            if n is None or n != n:
                return  # not a number, or NaN: no comparison holds
            for op, (bounds, groups) in self.bounds.items():
                if op == "gt":  # bound < n
                    out.extend(groups[: bisect.bisect_left(bounds, n)])
                elif op == "gte":  # bound <= n
                    out.extend(groups[: bisect.bisect_right(bounds, n)])
                elif op == "lt":  # bound > n
                    out.extend(groups[bisect.bisect_right(bounds, n) :])
                else:  # lte: bound >= n
                    out.extend(groups[bisect.bisect_left(bounds, n) :])


@dataclass(slots=True)
class _Count:
    counter: WindowCounter
    within: float
    # Minimum counts ascending, the group of each.
    at_least: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Event:
    has: list[int] = field(default_factory=list)
    last: dict[str, _Values] = field(default_factory=dict)
    counts: dict[object, _Count] = field(default_factory=dict)


@dataclass(slots=True)
class Dispatch:
    # Groups (by position) with no guard: always selected.
    always: list[int] = field(default_factory=list)
    context: dict[str, _Values] = field(default_factory=dict)
    events: dict[str, _Event] = field(default_factory=dict)
    milestones: dict[str, list[int]] = field(default_factory=dict)
    # Things looked up so far (a context key, an event, a window, a milestone): counted, not timed, so
    # tests can prove the index's own work does not grow with the scenarios.
    probes: int = 0

    @classmethod
    def build(cls, guards: Sequence[Guard]) -> Dispatch:
        """Index the guards of groups 0..n-1."""
        index = cls()
        for group, guard in enumerate(guards):
            if guard is None:
                index.always.append(group)
                continue
            for atom in guard:
                index._add(atom, group)
        for values in index.context.values():
            values.finish()
        for event in index.events.values():
            for values in event.last.values():
                values.finish()
            for count in event.counts.values():
                pairs = sorted(zip(count.at_least, count.groups, strict=True))
                count.at_least, count.groups = [a for a, _ in pairs], [g for _, g in pairs]
        return index

    def _add(self, atom: Atom, group: int) -> None:
        if atom.kind == "ctx":
            self.context.setdefault(str(atom.subject), _Values()).add(atom, group)
        elif atom.kind == "milestone":
            self.milestones.setdefault(str(atom.subject), []).append(group)
        else:
            event = self.events.setdefault(atom.event, _Event())
            if atom.kind == "has":
                event.has.append(group)
            elif atom.kind == "last":
                event.last.setdefault(str(atom.subject), _Values()).add(atom, group)
            elif atom.kind == "count" and isinstance(atom.counter, WindowCounter) and atom.op == "ge":
                count = event.counts.get(atom.subject)
                if count is None:
                    count = event.counts[atom.subject] = _Count(atom.counter, atom.subject[1])  # type: ignore[index]
                count.at_least.append(int(atom.arg))
                count.groups.append(group)
            else:
                raise ValueError(f"unknown atom {atom.kind}")
        assert atom.op in ("eq", "ge", "", *NUMERIC), atom

    def select(self, state: DeviceState, now: float) -> list[int]:
        """Positions of the groups whose guard holds (or that have none), ascending, each once."""
        out = list(self.always)
        probes = 0
        if self.context:
            context = state.context
            for key, values in self.context.items():
                probes += 1
                values.select(context.get(key), out)
        if self.events:
            history, events = state.history, self.events
            # Only events the device has a history of can hold an atom: walk the smaller of the two.
            names = [n for n in history if n in events] if len(history) < len(events) else list(events)
            for name in names:
                queue = history.get(name)
                if not queue:
                    continue
                probes += 1
                event = events[name]
                out.extend(event.has)
                if event.last:
                    props = queue[-1].props
                    for prop, values in event.last.items():
                        values.select(props.get(prop), out)
                for count in event.counts.values():
                    probes += 1
                    n = count.counter(state, now - count.within)
                    out.extend(count.groups[: bisect.bisect_right(count.at_least, n)])
        if self.milestones:
            reached, milestones = state.milestones, self.milestones
            for name in [m for m in reached if m in milestones] if len(reached) < len(milestones) else milestones:
                if name in reached:
                    probes += 1
                    out.extend(milestones[name])
        self.probes += probes
        return sorted(set(out))
