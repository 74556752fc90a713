"""An immutable, indexed set of compiled scenarios.

Scenarios are indexed by the events their trigger listens to, so a signal
costs evaluations only for scenarios that care about it, however many others
are loaded. A new set replaces the old in one assignment (atomic swap).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..scenarios.compiler import CompiledScenario, compile_scenario
from ..scenarios.loader import LoadedScenario, load_directory

__all__ = ["ScenarioSet"]


def _order(s: CompiledScenario) -> tuple[int, str]:
    # Highest priority first; ties go to the id that sorts first, so the
    # outcome never depends on file order or load timing.
    return (-s.priority, s.id)


@dataclass(frozen=True)
class ScenarioSet:
    scenarios: tuple[CompiledScenario, ...]
    by_event: dict[str, tuple[CompiledScenario, ...]]
    by_id: dict[str, CompiledScenario]
    retention: dict[str, float]
    source: str = ""

    @classmethod
    def empty(cls) -> ScenarioSet:
        return cls.build([])

    @classmethod
    def load(cls, directory: str) -> ScenarioSet:
        return cls.build(load_directory(directory), source=directory)

    @classmethod
    def build(cls, loaded: Sequence[LoadedScenario], source: str = "") -> ScenarioSet:
        compiled = sorted((compile_scenario(item) for item in loaded), key=_order)
        by_event: dict[str, list[CompiledScenario]] = {}
        retention: dict[str, float] = {}
        for scenario in compiled:
            for name, seconds in scenario.retention.items():
                retention[name] = max(retention.get(name, 0.0), seconds)
            if not scenario.enabled:
                continue
            for event in scenario.events:
                by_event.setdefault(event, []).append(scenario)
        return cls(
            scenarios=tuple(compiled),
            by_event={k: tuple(v) for k, v in by_event.items()},
            by_id={s.id: s for s in compiled},
            retention=retention,
            source=source,
        )

    def candidates(self, events: Iterable[str]) -> list[CompiledScenario]:
        """Enabled scenarios listening to any of `events`, in arbitration order."""
        seen: dict[str, CompiledScenario] = {}
        for event in events:
            for scenario in self.by_event.get(event, ()):
                seen.setdefault(scenario.id, scenario)
        return sorted(seen.values(), key=_order)

    def keep_seconds(self, event: str) -> float:
        return self.retention.get(event, 0.0)
