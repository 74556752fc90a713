"""An immutable, indexed set of compiled scenarios, milestones and segments.

Scenarios are indexed by the events their trigger listens to, so a signal
costs evaluations only for scenarios that care about it, however many others
are loaded. A new set replaces the old in one assignment (atomic swap).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..scenarios.compiler import (
    CompiledDefinition,
    CompiledScenario,
    Routing,
    compile_definition,
    compile_routing,
    compile_scenario,
)
from ..scenarios.loader import LoadedSet, load_directory
from ..scenarios.model import OutcomeSpec, PolicySpec

__all__ = ["ScenarioSet"]


def _order(s: CompiledScenario) -> tuple[int, str]:
    # Highest priority first; ties go to the id that sorts first, so the
    # outcome never depends on file order or load timing.
    return (-s.priority, s.id)


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


@dataclass(frozen=True)
class ScenarioSet:
    scenarios: tuple[CompiledScenario, ...]
    by_event: dict[str, tuple[CompiledScenario, ...]]
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

    @classmethod
    def empty(cls) -> ScenarioSet:
        return cls.build(LoadedSet())

    @classmethod
    def load(cls, directory: str) -> ScenarioSet:
        return cls.build(load_directory(directory), source=directory)

    @classmethod
    def build(cls, loaded: LoadedSet, source: str = "") -> ScenarioSet:
        segment_defs = {s.spec.id: s for s in loaded.segments}
        compiled = sorted((compile_scenario(item, segment_defs) for item in loaded.scenarios), key=_order)
        milestones = tuple(compile_definition(m, segment_defs) for m in loaded.milestones)
        segments = tuple(compile_definition(s, segment_defs) for s in loaded.segments)
        enabled = [s for s in compiled if s.enabled]
        by_id = {s.id: s for s in compiled}
        by_event = {event: tuple(by_id[i] for i in ids) for event, ids in _index(enabled).items()}
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
        )

    def policy_for(self, app_id: str) -> PolicySpec:
        """The policy an app's devices face: its own (apps/<app>/), else the installation's."""
        return self.app_policies.get(app_id, self.policy)

    def candidates(self, events: Iterable[str]) -> list[CompiledScenario]:
        """Enabled scenarios listening to any of `events`, in arbitration order."""
        seen: dict[str, CompiledScenario] = {}
        for event in events:
            for scenario in self.by_event.get(event, ()):
                seen.setdefault(scenario.id, scenario)
        return sorted(seen.values(), key=_order)

    def keyed(self, keys: Iterable[str]) -> list[CompiledScenario]:
        """Enabled scenarios whose trigger reads any of these context keys, in arbitration order."""
        seen: dict[str, CompiledScenario] = {}
        for key in keys:
            for scenario in self.by_key.get(key, ()):
                seen.setdefault(scenario.id, scenario)
        return sorted(seen.values(), key=_order)

    def keep_seconds(self, event: str) -> float:
        return self.retention.get(event, 0.0)
