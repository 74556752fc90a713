"""Funnels per scenario, read from the store: the admin API (GetFunnel) and `cuepoint report` share this.

Definitions (README, "Reporting and observability"):

- Cohort: arbitration decisions (``decisions``) and cues (``cues``) whose time is in [start, end).
  What became of them later (answers, engagements, milestones) counts even after ``end``.
- qualified: decision rows, one per time the scenario qualified and was arbitrated
  (= offered + blocked). ``qualified_sessions`` counts distinct sessions instead.
- blocked: blocked decision rows, by reason (holdout, priority, cooldown, cue_pending, ...).
- offered: cues created. Their ``cues.status`` splits them: accepted, declined, dismissed,
  ignored (status ``expired``: never answered before the cue's ttl), withdrawn (condition
  cleared, outcome reached, scenario removed) and pending (still on screen).
- engaged: accepted cues whose engagement reached an associate (``assigned_at`` set).
- resolved: engaged cues whose engagement ended with the disposition ``resolved``, or whose
  session reached the scenario's outcome milestone after the cue was offered.
- Conversion, per qualified session, split into the treated group and the holdout (control)
  group (sessions blocked with reason ``holdout``): ``outcome_reached`` when the session reached
  the scenario's outcome milestone at or after it first qualified; ``converted`` when that, or
  (treated only: the holdout never gets a cue) an engagement of the scenario's cue in that session
  ended ``resolved``. Rate = converted / sessions.
- Grouping: by context keys of the session's hello (sessions.context), e.g. device.model,
  device.os, app.version; a missing value groups as "".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..storage.base import FunnelSlice

__all__ = [
    "CUE_OUTCOMES",
    "DIMENSIONS",
    "Cohort",
    "Fetch",
    "FunnelQuery",
    "FunnelRow",
    "funnel",
]

# Context keys a funnel can be grouped by (from the session's hello).
DIMENSIONS = (
    "app.id",
    "app.version",
    "device.model",
    "device.os",
    "device.os_version",
    "device.locale",
    "location.country",
    "consent",
)
# cues.status -> FunnelRow field.
CUE_OUTCOMES = {
    "accepted": "accepted",
    "declined": "declined",
    "dismissed": "dismissed",
    "expired": "ignored",
    "withdrawn": "withdrawn",
    "offered": "pending",
}

# Runs the funnel's three aggregate queries: Store.funnel_counts, or the CLI's read-only sqlite3 reader.
Fetch = Callable[[FunnelSlice], Awaitable[Iterable[tuple[str, Iterable[Sequence[Any]]]]]]


@dataclass(frozen=True, slots=True)
class FunnelQuery:
    start: float | None = None  # epoch seconds, inclusive; None: from the beginning
    end: float | None = None  # exclusive; None: up to now
    scenario_id: str | None = None
    group_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [d for d in self.group_by if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}; use {', '.join(DIMENSIONS)}")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by names a dimension twice")


@dataclass(slots=True)
class Cohort:
    sessions: int = 0
    outcome_reached: int = 0
    converted: int = 0

    @property
    def conversion_rate(self) -> float | None:
        return self.converted / self.sessions if self.sessions else None


@dataclass(slots=True)
class FunnelRow:
    scenario_id: str
    # Values of the query's group_by dimensions, in that order.
    group: tuple[str, ...] = ()
    qualified: int = 0
    blocked: dict[str, int] = field(default_factory=dict)
    offered: int = 0
    accepted: int = 0
    declined: int = 0
    dismissed: int = 0
    ignored: int = 0
    withdrawn: int = 0
    pending: int = 0
    engaged: int = 0
    resolved: int = 0
    qualified_sessions: int = 0
    treated: Cohort = field(default_factory=Cohort)
    holdout: Cohort = field(default_factory=Cohort)

    @property
    def blocked_total(self) -> int:
        return sum(self.blocked.values())

    def blocked_by_count(self) -> list[tuple[str, int]]:
        """Reasons, most frequent first (ties by name)."""
        return sorted(self.blocked.items(), key=lambda item: (-item[1], item[0]))

    def as_dict(self, group_by: Sequence[str]) -> dict[str, Any]:
        def cohort(c: Cohort) -> dict[str, Any]:
            rate = c.conversion_rate
            return {
                "sessions": c.sessions,
                "outcome_reached": c.outcome_reached,
                "converted": c.converted,
                "conversion_rate": None if rate is None else round(rate, 6),
            }

        return {
            "scenario_id": self.scenario_id,
            "group": dict(zip(group_by, self.group, strict=True)),
            "qualified": self.qualified,
            "blocked": dict(self.blocked_by_count()),
            "offered": self.offered,
            "accepted": self.accepted,
            "declined": self.declined,
            "dismissed": self.dismissed,
            "ignored": self.ignored,
            "withdrawn": self.withdrawn,
            "pending": self.pending,
            "engaged": self.engaged,
            "resolved": self.resolved,
            "qualified_sessions": self.qualified_sessions,
            "treated": cohort(self.treated),
            "holdout": cohort(self.holdout),
        }


async def funnel(fetch: Fetch, query: FunnelQuery) -> list[FunnelRow]:
    """One row per scenario (and group), sorted by scenario id then group values."""
    rows: dict[tuple[str, tuple[str, ...]], FunnelRow] = {}
    n = len(query.group_by)

    def row_for(values: Sequence[Any]) -> FunnelRow:
        key = (str(values[0]), tuple(str(v) for v in values[1 : n + 1]))
        found = rows.get(key)
        if found is None:
            found = rows[key] = FunnelRow(scenario_id=key[0], group=key[1])
        return found

    cut = FunnelSlice(query.start, query.end, query.scenario_id or "", query.group_by)
    for kind, found in await fetch(cut):
        for values in found:
            row, rest = row_for(values), values[n + 1 :]
            if kind == "decisions":
                outcome, reason, count = str(rest[0]), str(rest[1]), int(rest[2])
                row.qualified += count
                if outcome == "blocked":
                    row.blocked[reason] = row.blocked.get(reason, 0) + count
            elif kind == "cues":
                status, count = str(rest[0]), int(rest[1])
                row.offered += count
                bucket = CUE_OUTCOMES.get(status)
                if bucket is not None:
                    setattr(row, bucket, getattr(row, bucket) + count)
                row.engaged += int(rest[2] or 0)
                row.resolved += int(rest[3] or 0)
            else:
                cohort = row.holdout if rest[0] else row.treated
                count = int(rest[1])
                cohort.sessions += count
                cohort.outcome_reached += int(rest[2] or 0)
                cohort.converted += int(rest[3] or 0)
                row.qualified_sessions += count
    return [rows[key] for key in sorted(rows)]
