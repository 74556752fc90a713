"""An immutable, indexed set of compiled scenarios, milestones and segments.

Scenarios are indexed by the events their trigger listens to, so a signal
costs evaluations only for scenarios that care about it, however many others
are loaded. Scenarios with identical conditions (target, trigger, outcome and
apps) form one group, evaluated once for all of them, so many variants on one
event cost about what their distinct conditions cost. Many groups on one event
are indexed by their guards (engine/dispatch.py), so only those that may hold
are evaluated. A new set replaces the old in one assignment (atomic swap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..scenarios.compiler import (
    CompiledDefinition,
    CompiledScenario,
    Routing,
    Sharing,
    compile_definition,
    compile_routing,
    compile_scenario,
)
from ..scenarios.guards import Guard, guard_of
from ..scenarios.loader import LoadedSet, load_directory
from ..scenarios.model import OutcomeSpec, PolicySpec
from .batch_filter import EventFilter
from .dispatch import Dispatch
from .state import DeviceState
from .timers import TimerIndex

__all__ = ["DISPATCH_FROM", "Candidates", "ConditionGroup", "ScenarioSet"]

# Fewer groups than this on one event are simply all evaluated: looking up an index costs about as much as
# evaluating a few groups.
DISPATCH_FROM = 8


def _order(s: CompiledScenario) -> tuple[int, str]:
    # Highest priority first; ties go to the id that sorts first, so the
    # outcome never depends on file order or load timing.
    return (-s.priority, s.id)


@dataclass(frozen=True, slots=True, eq=False)
class ConditionGroup:
    """Scenarios whose conditions are identical: one evaluation answers for all of them."""

    apps: frozenset[str]
    # The first member's CompiledScenario.qualifies: every member's gives the same answer.
    qualifies: Callable[[DeviceState, float], bool]
    # In arbitration order.
    members: tuple[CompiledScenario, ...]
    # A necessary condition of the members' conditions (scenarios/guards.py); None: none found.
    guard: Guard = None


class Candidates(tuple[CompiledScenario, ...]):
    """Scenarios to evaluate, in arbitration order, with their condition groups (Engine.check uses them) and,
    from `dispatch_from` groups on, their groups' guards indexed."""

    groups: tuple[ConditionGroup, ...]
    dispatch: Dispatch | None

    @classmethod
    def of(
        cls,
        scenarios: Iterable[CompiledScenario],
        group_of: dict[str, ConditionGroup],
        dispatch_from: int | None = None,
    ) -> Candidates:
        """`scenarios` in arbitration order; their groups keep the members among them, in that order."""
        out = cls(scenarios)
        members: dict[int, list[CompiledScenario]] = {}
        firsts: dict[int, ConditionGroup] = {}
        for scenario in out:
            group = group_of[scenario.id]
            firsts.setdefault(id(group), group)
            members.setdefault(id(group), []).append(scenario)
        out.groups = tuple(
            group
            if len(group.members) == len(members[key])
            else ConditionGroup(group.apps, group.qualifies, tuple(members[key]), group.guard)
            for key, group in firsts.items()
        )
        use = dispatch_from is not None and len(out.groups) >= dispatch_from
        out.dispatch = Dispatch.build([g.guard for g in out.groups]) if use else None
        return out


def _groups(scenarios: Iterable[CompiledScenario], sharing: Sharing, loaded: LoadedSet) -> dict[str, ConditionGroup]:
    """Scenario id -> its condition group (scenarios in arbitration order)."""
    specs = {item.spec.id: item.spec for item in loaded.scenarios}
    segments = {s.spec.id: s for s in loaded.segments}
    by_key: dict[object, list[CompiledScenario]] = {}
    for scenario in scenarios:
        spec = specs[scenario.id]
        target = sharing.key(spec.target) if spec.target is not None else None
        key = (scenario.apps, scenario.outcome, target, sharing.key(spec.trigger))
        by_key.setdefault(key, []).append(scenario)
    out: dict[str, ConditionGroup] = {}
    for members in by_key.values():
        spec = specs[members[0].id]
        guard = guard_of(spec.target, spec.trigger, segments)
        group = ConditionGroup(members[0].apps, members[0].qualifies, tuple(members), guard)
        for scenario in members:
            out[scenario.id] = group
    return out


def _index(items: Iterable[CompiledScenario | CompiledDefinition]) -> dict[str, tuple[str, ...]]:
    index: dict[str, list[str]] = {}
    for item in items:
        for event in item.events:
            index.setdefault(event, []).append(item.id)
    return {k: tuple(v) for k, v in index.items()}


def _by_key(scenarios: Iterable[CompiledScenario]) -> dict[str, tuple[CompiledScenario, ...]]:
    index: dict[str, list[CompiledScenario]] = {}
    for scenario in scenarios:
        for key in scenario.trigger_keys:
            index.setdefault(key, []).append(scenario)
    return {k: tuple(v) for k, v in index.items()}


_NONE = Candidates()
_NONE.groups = ()
_NONE.dispatch = None


@dataclass(frozen=True)
class ScenarioSet:
    scenarios: tuple[CompiledScenario, ...]
    # Enabled scenarios by event, in arbitration order, grouped by identical conditions.
    by_event: dict[str, Candidates]
    by_id: dict[str, CompiledScenario]
    retention: dict[str, float]
    milestones: tuple[CompiledDefinition, ...] = ()
    milestones_by_event: dict[str, tuple[CompiledDefinition, ...]] = field(default_factory=dict)
    segments: tuple[CompiledDefinition, ...] = ()
    # Enabled scenarios with idle, dwell or absence leaves: they need timers.
    timed: tuple[CompiledScenario, ...] = ()
    policy: PolicySpec = field(default_factory=PolicySpec)
    routing: Routing = field(default_factory=Routing)
    source: str = ""
    # Outcomes to predict (score: true or shadow), in file order.
    outcomes: tuple[OutcomeSpec, ...] = ()
    # Events some enabled scenario or milestone listens to: only these are evaluated on arrival.
    listened: frozenset[str] = frozenset()
    # Enabled scenarios by the context keys their trigger reads: a change of one evaluates them.
    by_key: dict[str, tuple[CompiledScenario, ...]] = field(default_factory=dict)
    # Enabled scenarios whose trigger reads any context key: evaluated when a session opens (its hello).
    contextual: tuple[CompiledScenario, ...] = ()
    # Per app (a folder under apps/): its own policy, replacing `policy` for its devices.
    app_policies: dict[str, PolicySpec] = field(default_factory=dict)
    # Apps with a folder of their own, and outcome id -> the app that declares it.
    apps: frozenset[str] = frozenset()
    outcome_owners: dict[str, str] = field(default_factory=dict)
    # Enabled scenario id -> its group of scenarios with identical conditions.
    group_of: dict[str, ConditionGroup] = field(default_factory=dict)
    # Index the guards of an event's (or an app's time-driven) groups from this many groups on; None: never.
    dispatch_from: int | None = DISPATCH_FROM
    # (app id, switched-off ids) -> that app's time-driven scenarios indexed (timers()).
    _timer_indexes: dict[tuple[str, frozenset[str]], TimerIndex] = field(default_factory=dict, compare=False)
    # Event -> its groups as a batch's columns can rule them out (event_filter()), built on first use.
    _event_filters: dict[str, EventFilter | None] = field(default_factory=dict, compare=False)

    @classmethod
    def empty(cls) -> ScenarioSet:
        return cls.build(LoadedSet())

    @classmethod
    def load(cls, directory: str) -> ScenarioSet:
        return cls.build(load_directory(directory), source=directory)

    @classmethod
    def build(cls, loaded: LoadedSet, source: str = "", dispatch_from: int | None = DISPATCH_FROM) -> ScenarioSet:
        segment_defs = {s.spec.id: s for s in loaded.segments}
        sharing = Sharing((c for item in loaded.scenarios for c in (item.spec.target, item.spec.trigger)), segment_defs)
        compiled = sorted((compile_scenario(item, segment_defs, sharing) for item in loaded.scenarios), key=_order)
        milestones = tuple(compile_definition(m, segment_defs) for m in loaded.milestones)
        segments = tuple(compile_definition(s, segment_defs) for s in loaded.segments)
        enabled = [s for s in compiled if s.enabled]
        by_id = {s.id: s for s in compiled}
        group_of = _groups(enabled, sharing, loaded)
        by_event = {
            event: Candidates.of((by_id[i] for i in ids), group_of, dispatch_from)
            for event, ids in _index(enabled).items()
        }
        milestone_ids = {m.id: m for m in milestones}
        milestones_by_event = {event: tuple(milestone_ids[i] for i in ids) for event, ids in _index(milestones).items()}
        retention: dict[str, float] = {}
        items: list[CompiledScenario | CompiledDefinition] = [*compiled, *milestones, *segments]
        for item in items:
            for name, seconds in item.retention.items():
                retention[name] = max(retention.get(name, 0.0), seconds)
        return cls(
            scenarios=tuple(compiled),
            by_event=by_event,
            by_id=by_id,
            retention=retention,
            milestones=milestones,
            milestones_by_event=milestones_by_event,
            segments=segments,
            timed=tuple(s for s in enabled if s.timed),
            policy=loaded.policy,
            routing=compile_routing(
                loaded.combined_routing(),
                segment_defs,
                loaded.queue_owners(),
                # Each rule's file, line and place in its file, in the combined table's order.
                [
                    (part.at[0], part.line_of(("rules", j)), j)
                    for part in loaded.routing_parts()
                    for j in range(len(part.spec.rules))
                ],
            ),
            source=source,
            outcomes=tuple(o.spec for o in loaded.outcomes if o.spec.score),
            listened=frozenset(by_event) | frozenset(milestones_by_event),
            by_key=_by_key(enabled),
            contextual=tuple(s for s in enabled if s.trigger_keys),
            app_policies={app: spec for app, (spec, _) in loaded.app_policies.items()},
            apps=frozenset(loaded.apps),
            outcome_owners=dict(loaded.outcome_owners),
            group_of=group_of,
            dispatch_from=dispatch_from,
        )

    def policy_for(self, app_id: str) -> PolicySpec:
        """The policy an app's devices face: its own (apps/<app>/), else the installation's."""
        return self.app_policies.get(app_id, self.policy)

    def candidates(self, events: Iterable[str]) -> Candidates:
        """Enabled scenarios listening to any of `events`, in arbitration order (one event: no work)."""
        names = events if isinstance(events, list | tuple) else list(events)
        if len(names) == 1:
            return self.by_event.get(names[0], _NONE)
        seen: dict[str, CompiledScenario] = {}
        for event in names:
            for scenario in self.by_event.get(event, ()):
                seen.setdefault(scenario.id, scenario)
        return Candidates.of(sorted(seen.values(), key=_order), self.group_of)

    def keyed(self, keys: Iterable[str]) -> list[CompiledScenario]:
        """Enabled scenarios whose trigger reads any of these context keys, in arbitration order."""
        seen: dict[str, CompiledScenario] = {}
        for key in keys:
            for scenario in self.by_key.get(key, ()):
                seen.setdefault(scenario.id, scenario)
        return sorted(seen.values(), key=_order)

    def timers(self, app_id: str, disabled: frozenset[str]) -> TimerIndex:
        """The app's enabled time-driven scenarios (less `disabled`) and their deadlines, indexed once per set."""
        key = (app_id, disabled)
        index = self._timer_indexes.get(key)
        if index is None:
            if len(self._timer_indexes) >= 256:
                self._timer_indexes.clear()  # many apps or switch flips: rebuilt on demand, never unbounded
            timed = [s for s in self.timed if s.applies_to(app_id) and s.id not in disabled]
            index = self._timer_indexes[key] = TimerIndex.build(timed)
            # What a timer evaluates: grouped and indexed as an event's candidates are (already in order).
            index.candidates = Candidates.of(timed, self.group_of, self.dispatch_from)
        return index

    def event_filter(self, event: str) -> EventFilter | None:
        """Which signals of a batch may make `event`'s scenarios qualify (engine/batch_filter.py); None: any."""
        try:
            return self._event_filters[event]
        except KeyError:
            groups = self.by_event.get(event, _NONE).groups
            found = self._event_filters[event] = EventFilter.build(event, [(g.apps, g.guard) for g in groups])
            return found

    def keep_seconds(self, event: str) -> float:
        return self.retention.get(event, 0.0)
