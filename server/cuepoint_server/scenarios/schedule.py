"""Business hours and campaign dates, in a fixed zone or the user's own."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .model import ScheduleSpec

__all__ = ["Schedule"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


class Schedule:
    def __init__(self, spec: ScheduleSpec) -> None:
        self.zone_name = spec.timezone
        self.zone = None if spec.timezone == "user" else ZoneInfo(spec.timezone)
        self.start = spec.start.timestamp() if spec.start else None
        self.end = spec.end.timestamp() if spec.end else None
        self.windows = tuple(
            (frozenset(_DAYS.index(d) for d in h.days), _minutes(h.from_), _minutes(h.to)) for h in spec.hours
        )

    def _zone_for(self, context: Mapping[str, object]) -> ZoneInfo:
        if self.zone is not None:
            return self.zone
        try:
            return ZoneInfo(str(context.get("device.timezone") or "UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            # A device reporting a zone we don't know falls back to UTC rather
            # than never being offered anything.
            return ZoneInfo("UTC")

    def is_open(self, now: float, context: Mapping[str, object]) -> bool:
        if self.start is not None and now < self.start:
            return False
        if self.end is not None and now > self.end:
            return False
        if not self.windows:
            return True
        local = datetime.fromtimestamp(now, UTC).astimezone(self._zone_for(context))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        for days, start, end in self.windows:
            if start <= end:
                if day in days and start <= minute < end:
                    return True
            # A window crossing midnight belongs to the day it starts on.
            elif (day in days and minute >= start) or ((day - 1) % 7 in days and minute < end):
                return True
        return False

    def describe(self) -> str:
        return f"schedule in {self.zone_name}"
