"""Handling times per queue and per associate: how long people spend on engagements.

From the stored engagements an associate took that ended in the range (storage/funnel_sql.py,
``desk_handling``), attributed to the associate who had it last and its queue then:

- handle time: from the (last) assignment to the end of the conversation;
- wrap-up time: from the end of the conversation to the associate's wrap-up (0 when the associate ended
  it with the wrap-up; engagements the user left and nobody wrapped up yet are counted as awaiting);
- wait: from the engagement's creation to its (last) assignment.

Averages and medians are computed here, in Python, so both storage backends share one definition.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..storage.base import FunnelSlice

__all__ = ["HandlingFigures", "HandlingQuery", "HandlingReport", "handling_report"]

Fetch = Callable[[FunnelSlice], Awaitable[list[tuple[str, list[tuple[Any, ...]]]]]]


@dataclass(frozen=True, slots=True)
class HandlingQuery:
    start: float | None = None
    end: float | None = None
    scenario_id: str = ""


@dataclass(slots=True)
class HandlingFigures:
    """One queue's or one associate's figures ("" for the other key)."""

    queue: str = ""
    associate_id: str = ""
    engagements: int = 0
    handle: list[float] = field(default_factory=list, repr=False)
    wrap_up: list[float] = field(default_factory=list, repr=False)
    wait: list[float] = field(default_factory=list, repr=False)
    awaiting_wrap_up: int = 0

    @property
    def average_handle(self) -> float:
        return statistics.fmean(self.handle) if self.handle else 0.0

    @property
    def median_handle(self) -> float:
        return statistics.median(self.handle) if self.handle else 0.0

    @property
    def average_wrap_up(self) -> float:
        return statistics.fmean(self.wrap_up) if self.wrap_up else 0.0

    @property
    def median_wrap_up(self) -> float:
        return statistics.median(self.wrap_up) if self.wrap_up else 0.0

    @property
    def average_wait(self) -> float:
        return statistics.fmean(self.wait) if self.wait else 0.0

    def add(self, created_at: float, assigned_at: float, ended_at: float, wrapped_up_at: float | None) -> None:
        self.engagements += 1
        self.handle.append(max(0.0, ended_at - assigned_at))
        self.wait.append(max(0.0, assigned_at - created_at))
        if wrapped_up_at is None:
            self.awaiting_wrap_up += 1
        else:
            self.wrap_up.append(max(0.0, wrapped_up_at - ended_at))


@dataclass(slots=True)
class HandlingReport:
    queues: list[HandlingFigures]
    associates: list[HandlingFigures]


def summarize(rows: Iterable[Sequence[Any]], keep_queue: Callable[[str], bool] | None = None) -> HandlingReport:
    """Rows (queue, associate_id, channel, created_at, assigned_at, ended_at, wrapped_up_at) into figures;
    `keep_queue` leaves out other queues (an admin of some apps sees their queues only)."""
    queues: dict[str, HandlingFigures] = {}
    associates: dict[str, HandlingFigures] = {}
    for queue, associate_id, _channel, created_at, assigned_at, ended_at, wrapped_up_at in rows:
        if keep_queue is not None and not keep_queue(str(queue)):
            continue
        figures = (
            queues.setdefault(str(queue), HandlingFigures(queue=str(queue))),
            associates.setdefault(str(associate_id), HandlingFigures(associate_id=str(associate_id))),
        )
        wrapped = None if wrapped_up_at is None else float(wrapped_up_at)
        for f in figures:
            f.add(float(created_at), float(assigned_at), float(ended_at), wrapped)
    return HandlingReport(
        queues=[queues[k] for k in sorted(queues)], associates=[associates[k] for k in sorted(associates)]
    )


async def handling_report(
    fetch: Fetch, query: HandlingQuery, keep_queue: Callable[[str], bool] | None = None
) -> HandlingReport:
    cut = FunnelSlice(query.start, query.end, query.scenario_id, (), ("desk_handling",))
    rows = [row for kind, found in await fetch(cut) if kind == "desk_handling" for row in found]
    return summarize(rows, keep_queue)
