"""Evaluate the scenarios a batch of signals (or a timer) concerns, for one device."""

from __future__ import annotations

from collections.abc import Iterable

from ..scenarios.compiler import CompiledScenario
from .scenario_set import ScenarioSet, _order
from .state import DeviceState

__all__ = ["Engine"]


class Engine:
    def __init__(self, scenarios: ScenarioSet | None = None) -> None:
        self.scenarios = scenarios or ScenarioSet.empty()
        # Scenario ids an admin switched off at run time (Core.set_scenario_enabled; stored, restored at start).
        self.disabled: set[str] = set()
        # Counted, not timed, so tests can prove cost tracks relevance.
        self.evaluations = 0

    def swap(self, scenarios: ScenarioSet) -> None:
        self.scenarios = scenarios

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
        return self.check(sorted(self.scenarios.timed, key=_order), state, now)

    def check(self, candidates: Iterable[CompiledScenario], state: DeviceState, now: float) -> list[CompiledScenario]:
        out = []
        for scenario in candidates:
            if not scenario.applies_to(state.app_id) or scenario.id in self.disabled:
                continue
            self.evaluations += 1
            if scenario.qualifies(state, now):
                out.append(scenario)
        return out

    def next_deadline(self, state: DeviceState, now: float) -> float | None:
        best: float | None = None
        for scenario in self.scenarios.timed:
            if not scenario.applies_to(state.app_id) or scenario.id in self.disabled:
                continue
            at = scenario.next_deadline(state, now)
            if at is not None and (best is None or at < best):
                best = at
        return best

    def segments_of(self, state: DeviceState, now: float) -> list[str]:
        return [s.id for s in self.scenarios.segments if s.predicate(state, now)]
