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
- outcome: engaged cues whose engagement achieved its outcome: the associate recorded a success
  outcome at wrap-up (a queue's ``outcomes`` marked ``success``; by default resolved, converted),
  the scenario's ``engagement_outcome`` check was achieved, or the session reached the scenario's
  outcome milestone after the cue was offered. ``wrap_up_outcomes`` counts what associates
  recorded, per outcome id.
- Conversion, per qualified session, split into the treated group and the holdout (control)
  group (sessions blocked with reason ``holdout``): ``outcome_reached`` when the session reached
  the scenario's outcome milestone at or after it first qualified; ``converted`` when that, or
  (treated only: the holdout never gets a cue) an engagement of the scenario's cue in that session
  ended ``resolved``. Rate = converted / sessions.
- opened: cues answered with a button that opens a deep link or web address.
- Variants (A/B): per variant recorded on the cues (``cues.variant``), over the sessions that
  were offered a cue of that variant: cues offered and accepted, and conversion as above (the
  outcome milestone reached at or after the first such cue, or such a cue's engagement ended
  ``resolved``), with its 95% Wilson interval and a two-sided two-proportion z-test against the
  control (the scenario's first variant, marked on its cues).
- Feedback: ratings given after the engagements of the cohort's cues, per kind (CSAT 1-5, NPS
  0-10): responses, average score, satisfied share (CSAT 4-5, NPS promoters 9-10) and, for NPS,
  promoters minus detractors (0-6) in points; per scenario in its row, and per queue and associate.
- Grouping: by context keys of the session's hello (sessions.context), e.g. device.model,
  device.os, app.version; a missing value groups as "".
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..storage.base import FunnelSlice
from .stats import Z95, two_proportion_test, wilson_interval

__all__ = [
    "CUE_OUTCOMES",
    "DIMENSIONS",
    "Cohort",
    "DeskFeedback",
    "FeedbackSummary",
    "Fetch",
    "FunnelQuery",
    "FunnelRow",
    "VariantRow",
    "funnel",
    "funnel_report",
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
    # An accept an older version lost in a crash, found at start (Store.repair_unfinished_accepts): the
    # server took the cue back, in effect; counting it as accepted would promise an engagement never made.
    "lost": "withdrawn",
    "offered": "pending",
    "opened": "opened",
}

# Runs the funnel's aggregate queries: Store.funnel_counts, or the CLI's read-only sqlite3 reader.
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


@dataclass(frozen=True, slots=True)
class FeedbackSummary:
    kind: str  # csat | nps
    responses: int
    score_sum: int
    satisfied: int  # CSAT 4-5; NPS promoters 9-10
    detractors: int  # NPS 0-6

    @property
    def average(self) -> float:
        return self.score_sum / self.responses if self.responses else 0.0

    @property
    def satisfied_share(self) -> float:
        return self.satisfied / self.responses if self.responses else 0.0

    @property
    def net_promoter_score(self) -> float:
        """NPS only: promoters minus detractors, in points (-100 to 100)."""
        if self.kind != "nps" or not self.responses:
            return 0.0
        return 100 * (self.satisfied - self.detractors) / self.responses

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "responses": self.responses,
            "average_score": round(self.average, 6),
            "satisfied_share": round(self.satisfied_share, 6),
        }
        if self.kind == "nps":
            out["net_promoter_score"] = round(self.net_promoter_score, 6)
        return out


@dataclass(frozen=True, slots=True)
class DeskFeedback:
    queue: str
    associate_id: str
    summary: FeedbackSummary


def _summary(kind: Any, rest: Sequence[Any]) -> FeedbackSummary:
    return FeedbackSummary(str(kind), int(rest[0]), int(rest[1] or 0), int(rest[2] or 0), int(rest[3] or 0))


@dataclass(slots=True)
class VariantRow:
    variant_id: str
    control: bool = False
    offered: int = 0
    accepted: int = 0
    cohort: Cohort = field(default_factory=Cohort)
    ci_low: float = 0.0
    ci_high: float = 0.0
    # Against the control: two-sided p-value and difference of conversion rates (1 and 0 for the control).
    p_value: float = 1.0
    difference: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rate = self.cohort.conversion_rate
        return {
            "variant_id": self.variant_id,
            "control": self.control,
            "offered": self.offered,
            "accepted": self.accepted,
            "sessions": self.cohort.sessions,
            "converted": self.cohort.converted,
            "conversion_rate": None if rate is None else round(rate, 6),
            "ci": [round(self.ci_low, 6), round(self.ci_high, 6)],
            "p_value": round(self.p_value, 6),
            "difference": round(self.difference, 6),
        }


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
    outcome: int = 0
    # Outcome id recorded at wrap-up -> engaged cues.
    wrap_up_outcomes: dict[str, int] = field(default_factory=dict)
    qualified_sessions: int = 0
    treated: Cohort = field(default_factory=Cohort)
    holdout: Cohort = field(default_factory=Cohort)
    opened: int = 0
    # Control first, then the other variants by id.
    variants: list[VariantRow] = field(default_factory=list)
    # One per kind of rating, by kind.
    feedback: list[FeedbackSummary] = field(default_factory=list)

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
            "outcome": self.outcome,
            "wrap_up_outcomes": dict(sorted(self.wrap_up_outcomes.items())),
            "qualified_sessions": self.qualified_sessions,
            "treated": cohort(self.treated),
            "holdout": cohort(self.holdout),
            "opened": self.opened,
            "variants": [v.as_dict() for v in self.variants],
            "feedback": [f.as_dict() for f in self.feedback],
        }


async def funnel(fetch: Fetch, query: FunnelQuery) -> list[FunnelRow]:
    """One row per scenario (and group), sorted by scenario id then group values."""
    rows, _ = await funnel_report(fetch, query)
    return rows


# The storage aggregates a funnel reads (the desk's handling times are reporting/handling.py's).
FUNNEL_KINDS = ("decisions", "cues", "wrap_up_outcomes", "sessions", "variants", "feedback", "desk_feedback")


async def funnel_report(fetch: Fetch, query: FunnelQuery) -> tuple[list[FunnelRow], list[DeskFeedback]]:
    """The funnel rows, and the ratings of the same cues' engagements per queue and associate."""
    rows: dict[tuple[str, tuple[str, ...]], FunnelRow] = {}
    desk: list[DeskFeedback] = []
    n = len(query.group_by)

    def row_for(values: Sequence[Any]) -> FunnelRow:
        key = (str(values[0]), tuple(str(v) for v in values[1 : n + 1]))
        found = rows.get(key)
        if found is None:
            found = rows[key] = FunnelRow(scenario_id=key[0], group=key[1])
        return found

    cut = FunnelSlice(query.start, query.end, query.scenario_id or "", query.group_by, FUNNEL_KINDS)
    for kind, found in await fetch(cut):
        if kind == "desk_feedback":
            desk.extend(DeskFeedback(str(v[0]), str(v[1]), _summary(v[2], v[3:])) for v in found)
            continue
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
                row.outcome += int(rest[4] or 0)
            elif kind == "wrap_up_outcomes":
                name, count = str(rest[0]), int(rest[1])
                row.wrap_up_outcomes[name] = row.wrap_up_outcomes.get(name, 0) + count
            elif kind == "feedback":
                row.feedback.append(_summary(rest[0], rest[1:]))
            elif kind == "variants":
                variant = VariantRow(
                    str(rest[0]), control=bool(rest[1]), offered=int(rest[2]), accepted=int(rest[3] or 0)
                )
                variant.cohort = Cohort(int(rest[4]), int(rest[5] or 0), int(rest[6] or 0))
                row.variants.append(variant)
            else:
                cohort = row.holdout if rest[0] else row.treated
                count = int(rest[1])
                cohort.sessions += count
                cohort.outcome_reached += int(rest[2] or 0)
                cohort.converted += int(rest[3] or 0)
                row.qualified_sessions += count
    for row in rows.values():
        _compare_variants(row)
        row.feedback.sort(key=lambda f: f.kind)
    desk.sort(key=lambda d: (d.queue, d.associate_id, d.summary.kind))
    return [rows[key] for key in sorted(rows)], desk


def _compare_variants(row: FunnelRow) -> None:
    row.variants.sort(key=lambda v: (not v.control, v.variant_id))
    control = next((v for v in row.variants if v.control), None)
    for v in row.variants:
        v.ci_low, v.ci_high = wilson_interval(v.cohort.converted, v.cohort.sessions)
        if control is not None and v is not control:
            v.p_value, v.difference = two_proportion_test(
                v.cohort.converted, v.cohort.sessions, control.cohort.converted, control.cohort.sessions
            )


def lift_interval(treated: Cohort, holdout: Cohort, z: float = Z95) -> tuple[float, float, float] | None:
    """Treated minus holdout conversion rate, with its confidence interval (normal approximation, 95%).

    None unless both groups have sessions. Small groups give wide intervals, which is the point:
    the console shows whether the difference could be chance.
    """
    p1, p2 = treated.conversion_rate, holdout.conversion_rate
    if p1 is None or p2 is None:
        return None
    diff = p1 - p2
    half = z * math.sqrt(p1 * (1 - p1) / treated.sessions + p2 * (1 - p2) / holdout.sessions)
    return diff, diff - half, diff + half
