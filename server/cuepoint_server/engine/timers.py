"""The time-driven scenarios of one app, indexed so a device's next deadline costs O(log n), not a scan.

After every batch the core asks for the earliest moment a time-driven leaf (idle, dwell, absence) of an
applicable, enabled scenario may turn true. Asking each scenario made that cost grow with every time-driven
scenario loaded, related to the device or not. Here the leaves are grouped by what moves their deadline:

* idle: the device's last signal; one sorted list of durations;
* dwell: the last screen_viewed; sorted durations per screen, so only the screen shown is looked at;
* absence: the last occurrence of an event matching a filter; per event, one anchor per distinct filter
  with its sorted durations, and only events the device has a history of are looked at.

The answer is exactly the minimum, over every leaf, of its deadline when that lies after `now` (as
CompiledScenario.next_deadline computes it), found by bisection in each sorted list.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..scenarios.compiler import EPSILON, SCREEN_EVENT, CompiledScenario
from .state import DeviceState, EventOccurrence

__all__ = ["TimerIndex"]

Anchor = Callable[[DeviceState], EventOccurrence | None]


def _first_after(durations: list[float], base: float, limit: float) -> float | None:
    """The smallest `base + d` (d in sorted `durations`) greater than `limit`, computed as the scan did."""
    i = bisect.bisect_right(durations, limit - base)
    # Bisection on `limit - base` may be off by one from `base + d > limit` in floating point: settle it.
    while i > 0 and base + durations[i - 1] > limit:
        i -= 1
    while i < len(durations) and base + durations[i] <= limit:
        i += 1
    return base + durations[i] if i < len(durations) else None


@dataclass(slots=True)
class _Absence:
    anchor: Anchor
    durations: list[float] = field(default_factory=list)


@dataclass(slots=True)
class TimerIndex:
    # Applicable, enabled time-driven scenarios in arbitration order (what a timer evaluates).
    timed: tuple[CompiledScenario, ...] = ()
    idle: list[float] = field(default_factory=list)
    dwell: dict[str, list[float]] = field(default_factory=dict)
    # event -> (filter -> its anchor and durations)
    absence: dict[str, dict[object, _Absence]] = field(default_factory=dict)
    # Some scenario may fire for a device that went away (cue.when_away).
    away_capable: bool = False
    # `timed` as the engine evaluates them: a scenario_set.Candidates (grouped, guards indexed), set by its set.
    candidates: Sequence[CompiledScenario] = ()

    @classmethod
    def build(cls, scenarios: Iterable[CompiledScenario]) -> TimerIndex:
        index = cls()
        timed = []
        for scenario in scenarios:
            timed.append(scenario)
            index.away_capable = index.away_capable or scenario.when_away is not None
            for timer in scenario.timers:
                if timer.kind == "idle":
                    index.idle.append(timer.seconds)
                elif timer.kind == "dwell":
                    index.dwell.setdefault(str(timer.key), []).append(timer.seconds)
                elif timer.kind == "absence" and timer.anchor is not None and isinstance(timer.key, tuple):
                    groups = index.absence.setdefault(str(timer.key[0]), {})
                    group = groups.get(timer.key)
                    if group is None:
                        group = groups[timer.key] = _Absence(timer.anchor)
                    group.durations.append(timer.seconds)
                else:
                    raise ValueError(f"unknown timer {timer.kind}")
        index.timed = tuple(timed)
        index.idle.sort()
        for durations in index.dwell.values():
            durations.sort()
        for groups in index.absence.values():
            for group in groups.values():
                group.durations.sort()
        return index

    def next_deadline(self, state: DeviceState, now: float) -> float | None:
        limit = now + EPSILON
        best: float | None = None
        if self.idle and state.last_signal_at > 0:
            best = _first_after(self.idle, state.last_signal_at, limit)
        if self.dwell:
            view = state.last(SCREEN_EVENT)
            screen = view.props.get("screen") if view is not None else None
            durations = self.dwell.get(screen) if isinstance(screen, str) else None
            if view is not None and durations:
                at = _first_after(durations, view.time, limit)
                if at is not None and (best is None or at < best):
                    best = at
        absence = self.absence
        if absence:
            history = state.history
            # Only events the device has sent can anchor an absence: walk the smaller of the two.
            names = [n for n in history if n in absence] if len(history) < len(absence) else absence
            for name in names:
                if name not in history:
                    continue
                for group in absence[name].values():
                    start = group.anchor(state)
                    if start is None:
                        continue
                    at = _first_after(group.durations, start.time, limit)
                    if at is not None and (best is None or at < best):
                        best = at
        return best
