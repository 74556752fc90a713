"""Why (not): each scenario's conditions for one device, with what each expects and what the device shows.

For scenarios that never qualified as well as for those the arbiter blocked: the admin API
(ExplainDevice), `cuepoint explain DEVICE` and `cuepoint simulate --why` all read this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.arbiter import Decision
from ..engine.state import DeviceState
from ..scenarios.compiler import CompiledScenario

__all__ = ["ConditionCheck", "ScenarioCheck", "check_scenarios"]


@dataclass(frozen=True, slots=True)
class ConditionCheck:
    path: str  # where in the file: target, trigger.all[1], ...
    expected: str  # what the file asks for
    observed: str  # what the device shows
    holds: bool


@dataclass(frozen=True, slots=True)
class ScenarioCheck:
    scenario_id: str
    # offered (would be offered now) | blocked | not_qualified | other_app | disabled
    status: str
    conditions: tuple[ConditionCheck, ...] = ()
    # For blocked: the arbiter's reason and detail (cooldown, cue_pending, no_capacity, ...).
    reason: str = ""
    detail: str = ""


def check_scenarios(
    scenarios: Sequence[CompiledScenario],
    state: DeviceState,
    now: float,
    decide: Callable[[list[CompiledScenario]], Decision] | None,
) -> list[ScenarioCheck]:
    """Every scenario, in arbitration order; `decide` (a dry run of the arbiter) for those that qualify."""
    checks: dict[str, ScenarioCheck] = {}
    qualified: list[CompiledScenario] = []
    for scenario in scenarios:
        if not scenario.enabled:
            checks[scenario.id] = ScenarioCheck(scenario.id, "disabled")
            continue
        if not scenario.applies_to(state.app_id):
            checks[scenario.id] = ScenarioCheck(
                scenario.id, "other_app", detail=f"apps: {', '.join(sorted(scenario.apps))}"
            )
            continue
        conditions = tuple(ConditionCheck(*c) for c in scenario.checks(state, now))
        holds = scenario.qualifies(state, now)
        checks[scenario.id] = ScenarioCheck(scenario.id, "offered" if holds else "not_qualified", conditions)
        if holds:
            qualified.append(scenario)
    if qualified and decide is not None:
        decision = decide(qualified)
        for blocked in decision.blocked:
            check = checks[blocked.scenario_id]
            checks[blocked.scenario_id] = ScenarioCheck(
                check.scenario_id, "blocked", check.conditions, blocked.reason, blocked.detail
            )
    return [checks[s.id] for s in scenarios]
