"""Evaluate the scenarios a batch of signals (or a timer) concerns, for one device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..scenarios.compiler import CompiledScenario
from .scenario_set import Candidates, ConditionGroup, ScenarioSet, _order
from .state import DeviceState
from .timers import TimerIndex

__all__ = ["Engine"]


class Engine:
    def __init__(self, scenarios: ScenarioSet | None = None) -> None:
        self.scenarios = scenarios or ScenarioSet.empty()
        # Scenario ids an admin switched off at run time (Core.set_scenario_enabled; stored, restored at start).
        # Replaced, never mutated, through disable()/enable(): the timer indexes built from it must follow.
        self.disabled: frozenset[str] = frozenset()
        # Counted, not timed, so tests can prove cost tracks relevance.
        self.evaluations = 0
        # Look groups up by their guards where the set indexed them (engine/dispatch.py), and skip a batch's
        # signals no guard of their event's groups allows (engine/batch_filter.py, core/ingest.py); off:
        # evaluate every group at every listened-to signal (the same decisions, compared by tests).
        self.dispatching = True
        # Per app id, its time-driven scenarios indexed (engine/timers.py); rebuilt after a swap or a switch.
        self._timers: dict[str, TimerIndex] = {}
        self._timers_of = self.scenarios

    def swap(self, scenarios: ScenarioSet) -> None:
        self.scenarios = scenarios
        self._timers = {}

    def disable(self, scenario_id: str) -> None:
        self.disabled = self.disabled | {scenario_id}
        self._timers = {}

    def enable(self, scenario_id: str) -> None:
        self.disabled = self.disabled - {scenario_id}
        self._timers = {}

    def timers(self, app_id: str) -> TimerIndex:
        """The app's applicable, enabled time-driven scenarios and their deadlines, indexed."""
        index = self._timers.get(app_id)
        if index is None or self._timers_of is not self.scenarios:
            if self._timers_of is not self.scenarios:
                # A new set (swap, or assigned directly): every index describes the old one.
                self._timers, self._timers_of = {}, self.scenarios
            index = self._timers[app_id] = self.scenarios.timers(app_id, self.disabled)
        return index

    def advance_milestones(self, state: DeviceState, events: Iterable[str], now: float) -> list[str]:
        """Mark milestones reached by these events; returns the newly reached ids."""
        reached: list[str] = []
        seen: set[str] = set()
        for event in events:
            for milestone in self.scenarios.milestones_by_event.get(event, ()):
                if milestone.id in seen or milestone.id in state.milestones:
                    continue
                seen.add(milestone.id)
                self.evaluations += 1
                if milestone.predicate(state, now):
                    state.milestones[milestone.id] = now
                    reached.append(milestone.id)
        return reached

    def qualified(self, state: DeviceState, events: Iterable[str], now: float) -> list[CompiledScenario]:
        """Scenarios listening to `events` that qualify now, highest priority first."""
        return self.check(self.scenarios.candidates(events), state, now)

    def qualified_timed(self, state: DeviceState, now: float) -> list[CompiledScenario]:
        """Time-driven scenarios that qualify now (a timer fired)."""
        index = self.timers(state.app_id)
        return self.check(index.candidates or sorted(index.timed, key=_order), state, now)

    def check(self, candidates: Iterable[CompiledScenario], state: DeviceState, now: float) -> list[CompiledScenario]:
        """The candidates that qualify now, in their order.

        With Candidates (from the event index), each group of scenarios with identical conditions is
        evaluated once, and where their guards are indexed only the groups whose guard holds are (the
        others cannot qualify); either way conditions shared across scenarios are computed once
        (state.memo). `evaluations` counts what was evaluated: a group counts once.
        """
        groups: Sequence[ConditionGroup] | None = None
        if isinstance(candidates, Candidates):
            groups = candidates.groups
            if candidates.dispatch is not None and self.dispatching:
                every = groups
                groups = [every[i] for i in candidates.dispatch.select(state, now)]
        app_id, disabled = state.app_id, self.disabled
        out: list[CompiledScenario] = []
        state.memo = {}
        try:
            if groups is None:
                for scenario in candidates:
                    if not scenario.applies_to(app_id) or scenario.id in disabled:
                        continue
                    self.evaluations += 1
                    if scenario.qualifies(state, now):
                        out.append(scenario)
                return out
            held = 0
            for group in groups:
                if group.apps and app_id not in group.apps:
                    continue
                members = group.members
                if disabled and len(members) == 1 and members[0].id in disabled:
                    continue
                self.evaluations += 1
                if group.qualifies(state, now):
                    # Switched-off members are dropped only from a group that holds: no scan per signal.
                    if disabled:
                        members = tuple(s for s in members if s.id not in disabled)
                    out.extend(members)
                    held += 1
            if held > 1:
                out.sort(key=_order)
            return out
        finally:
            state.memo = None

    def next_deadline(self, state: DeviceState, now: float) -> float | None:
        """The earliest moment after `now` a time-driven scenario of the device's app may turn true.

        Exactly the minimum of CompiledScenario.next_deadline over them (tests compare the two), in time
        that does not grow with the number of time-driven scenarios loaded (engine/timers.py).
        """
        if not self.scenarios.timed:
            return None
        return self.timers(state.app_id).next_deadline(state, now)

    def segments_of(self, state: DeviceState, now: float) -> list[str]:
        return [s.id for s in self.scenarios.segments if s.predicate(state, now)]
