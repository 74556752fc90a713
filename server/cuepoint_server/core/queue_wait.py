"""While the user waits: a queued engagement's place in line and how long it will likely wait.

How the estimate is computed (per queue):

- handle time: for each of the queue's last `WINDOW` engagements that an associate took and that then
  ended, the time from assignment to its end (a rolling window in memory, read back from storage at
  start-up by `Recovery.recover`, so a restart does not forget it);
- staffed capacity: the engagement slots of the associates signed in to the queue and not away
  (`capacity` each; busy ones count, they free slots as they finish);
- estimated wait of the engagement at position p = p x (average handle time) / (staffed capacity):
  with c slots each freeing on average every H seconds, a slot frees about every H / c, and p - 1
  engagements ahead of it take the first p - 1 of those.

Fallbacks: a queue with no finished engagement yet borrows the average over every queue's window (the
same desk, likely similar work); with no history at all, or nobody staffing the queue, there is no
basis for a number and none is sent (the position still is).

An update goes to the device each time its position changes and, every `REFRESH` seconds while it
waits, when the estimate moved materially (`material`), so a device is never flooded with jitter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .sessions import AssociateSession

__all__ = ["REFRESH", "WINDOW", "HandleTimes", "estimate", "material"]

# Finished engagements per queue the average looks at.
WINDOW = 20
# Seconds between re-estimates of engagements still waiting.
REFRESH = 15.0
# An estimate is sent again when it differs from the last one sent by at least this share and this many seconds.
MATERIAL_SHARE = 0.2
MATERIAL_SECONDS = 10.0


class HandleTimes:
    """The rolling window of handle times, per queue."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._by_queue: dict[str, deque[float]] = {}

    def record(self, queue: str, seconds: float) -> None:
        if seconds < 0:
            return
        self._by_queue.setdefault(queue, deque(maxlen=self._window)).append(seconds)

    def average(self, queue: str) -> float | None:
        """The queue's average handle time; else every queue's together; None without any history."""
        times = self._by_queue.get(queue)
        if not times:
            times = deque(t for q in self._by_queue.values() for t in q)
        return sum(times) / len(times) if times else None


def staffed(queue: str, associates: Iterable[AssociateSession]) -> int:
    """Engagement slots of the associates serving `queue` now (busy ones too, not the away)."""
    return sum(a.capacity for a in associates if not a.closed and a.presence != "away" and queue in a.queues)


def estimate(position: int, average_handle: float | None, slots: int) -> float | None:
    """Seconds the engagement at `position` likely waits (see the module docstring); None: no basis."""
    if position <= 0 or average_handle is None or slots <= 0:
        return None
    return position * average_handle / slots


def material(before: float | None, after: float | None) -> bool:
    """Whether a new estimate is worth telling the device."""
    if before is None or after is None:
        return before is not after
    change = abs(after - before)
    return change >= MATERIAL_SECONDS and change >= MATERIAL_SHARE * before
