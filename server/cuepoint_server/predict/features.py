"""Features of a journey at one moment, from what the server already keeps about the device.

Every feature is computed from signals that arrived at or before the scoring moment `now`: event times
and milestone times after it are skipped, so a score (and the example the model later learns from) never
sees the future. The outcome's own milestone is never a feature of its model.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..engine.state import Scalar

__all__ = ["WINDOWS", "Journey", "features"]

# Event counts per name over these windows (seconds): 1, 5 and 30 minutes.
WINDOWS = (60.0, 300.0, 1800.0)
_LONGEST = WINDOWS[-1]
SCREEN_EVENT = "screen_viewed"
# Bounds per scored session, so a flood of names or events cannot grow memory: counts saturate.
MAX_EVENT_NAMES = 64
MAX_TIMES_PER_EVENT = 512
MAX_SCREENS = 256


@dataclass(slots=True)
class Journey:
    """One device session as the scorer sees it: recent event times per name, screens, earlier history."""

    started_at: float
    # Earlier sessions of the same user (or device while anonymous), and in how many each milestone was reached.
    prior_sessions: int = 0
    prior_milestones: Mapping[str, int] = field(default_factory=dict)
    # Per event name, its times within the longest window, sorted.
    times: dict[str, list[float]] = field(default_factory=dict)
    screens: dict[str, float] = field(default_factory=dict)

    def observe(self, name: str, at: float, props: Mapping[str, Scalar]) -> None:
        """One event; `add` takes a whole batch at once (the ingest path)."""
        screen = props.get("screen") if name == SCREEN_EVENT else None
        self.add({name: [at]}, [(screen, at)] if screen is not None else [])

    def add(self, times_by_name: Mapping[str, list[float]], screens: Iterable[tuple[Scalar, float]]) -> None:
        """A batch of events: their times per name, and the screens viewed with when."""
        for name, new in times_by_name.items():
            times = self.times.get(name)
            if times is None:
                if len(self.times) >= MAX_EVENT_NAMES:
                    continue
                times = self.times[name] = []
            late = bool(times) and new[0] < times[-1]
            times.extend(new)
            if late or len(new) > 1:
                # Keep time order (late arrivals from offline buffers); timsort is linear on sorted runs.
                times.sort()
            # Sorted, so the window counts are binary searches; older than the longest window goes.
            if times[0] < times[-1] - _LONGEST or len(times) > MAX_TIMES_PER_EVENT:
                stale = bisect.bisect_left(times, times[-1] - _LONGEST)
                del times[: max(stale, len(times) - MAX_TIMES_PER_EVENT)]
        for screen, at in screens:
            key = str(screen)
            if key in self.screens:
                self.screens[key] = min(self.screens[key], at)
            elif len(self.screens) < MAX_SCREENS:
                self.screens[key] = at


def _local_hour(now: float, zone: Scalar | None) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    if isinstance(zone, str) and zone:
        try:
            moment = moment.astimezone(ZoneInfo(zone))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return moment.hour + moment.minute / 60


def features(
    journey: Journey,
    milestones: Mapping[str, float],
    context: Mapping[str, Scalar],
    now: float,
    *,
    exclude: Iterable[str] = (),
) -> dict[str, float]:
    """The feature vector at `now`. `exclude`: milestones that must not be features (the outcome's own)."""
    x: dict[str, float] = {}
    w1, w5, w30 = WINDOWS
    for name, times in journey.times.items():
        # Occurrences at or before `now` and within each window: at > now - window.
        upto = bisect.bisect_right(times, now)
        n30 = upto - bisect.bisect_right(times, now - w30, 0, upto)
        if n30:
            x[f"events_30m:{name}"] = float(n30)
            n5 = upto - bisect.bisect_right(times, now - w5, 0, upto)
            if n5:
                x[f"events_5m:{name}"] = float(n5)
                n1 = upto - bisect.bisect_right(times, now - w1, 0, upto)
                if n1:
                    x[f"events_1m:{name}"] = float(n1)
    x["distinct_screens"] = float(sum(1 for at in journey.screens.values() if at <= now))
    skipped = set(exclude)
    last_milestone = journey.started_at
    reached = 0
    for name, at in milestones.items():
        if at > now or name in skipped:
            continue
        x[f"milestone:{name}"] = 1.0
        reached += 1
        last_milestone = max(last_milestone, at)
    x["milestones_reached"] = float(reached)
    # Durations on a log scale: the first minutes matter more than the difference between hours.
    x["log_seconds_in_session"] = math.log1p(max(0.0, now - journey.started_at))
    x["log_seconds_since_milestone"] = math.log1p(max(0.0, now - last_milestone))
    x["log_prior_sessions"] = math.log1p(journey.prior_sessions)
    for name, count in journey.prior_milestones.items():
        if count:
            x[f"prior:{name}"] = math.log1p(count)
    platform = context.get("device.os")
    if platform is not None:
        x[f"platform:{platform}"] = 1.0
    version = context.get("app.version")
    if version is not None:
        x[f"app_version:{version}"] = 1.0
    hour = _local_hour(now, context.get("device.timezone"))
    x["hour_sin"] = math.sin(2 * math.pi * hour / 24)
    x["hour_cos"] = math.cos(2 * math.pi * hour / 24)
    return x
