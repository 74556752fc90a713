"""Evaluate the scenarios a batch of signals concerns, for one device."""

from __future__ import annotations

from collections.abc import Iterable

from ..scenarios.compiler import CompiledScenario
from .scenario_set import ScenarioSet
from .state import DeviceState

__all__ = ["Engine"]


class Engine:
    def __init__(self, scenarios: ScenarioSet | None = None) -> None:
        self.scenarios = scenarios or ScenarioSet.empty()
        # Counted, not timed, so tests can prove cost tracks relevance.
        self.evaluations = 0

    def swap(self, scenarios: ScenarioSet) -> None:
        self.scenarios = scenarios

    def qualified(self, state: DeviceState, events: Iterable[str], now: float) -> list[CompiledScenario]:
        """Scenarios that qualify now, highest priority first."""
        out = []
        for scenario in self.scenarios.candidates(events):
            if not scenario.applies_to(state.app_id):
                continue
            self.evaluations += 1
            if scenario.qualifies(state, now):
                out.append(scenario)
        return out
