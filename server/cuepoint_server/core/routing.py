"""Queues of engagements waiting for associates.

The longest-idle available associate with the required skills gets an
engagement; waiting engagements are served by priority, then age.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Mapping

from .sessions import AssociateSession

__all__ = ["Router"]


class Router:
    def __init__(self) -> None:
        self._associates: dict[str, AssociateSession] = {}
        # Per queue, sorted by (-priority, created_at, engagement_id).
        self._waiting: dict[str, list[tuple[int, float, str]]] = {}
        # Called with a queue whose line changed (an engagement joined or left it): positions moved.
        self.moved: Callable[[str], None] | None = None
        # A queue's per-channel concurrency limits (its routing entry's channel_capacity), set by the desk.
        self.queue_limits: Callable[[str], Mapping[str, int]] = lambda queue: {}

    def add(self, associate: AssociateSession) -> None:
        self._associates[associate.associate_id] = associate

    def remove(self, associate: AssociateSession) -> None:
        if self._associates.get(associate.associate_id) is associate:
            del self._associates[associate.associate_id]

    def find(self, associate_id: str) -> AssociateSession | None:
        return self._associates.get(associate_id)

    def pick(
        self,
        queue: str,
        skills: Collection[str] = (),
        exclude: Collection[str] = (),
        app_id: str = "",
        channel: str = "",
    ) -> AssociateSession | None:
        """The associate to take an engagement of `app_id` on `channel` in `queue`: one with room for that
        channel beside what they hold (AssociateSession.fits), and never one whose credential is limited
        to other apps, whatever queues they serve (one installation, several apps)."""
        candidates = self._able(queue, skills, exclude, app_id, channel)
        if not candidates:
            return None
        # Longest idle wins; id breaks ties so the choice is deterministic.
        return min(candidates, key=lambda a: (a.idle_since, a.associate_id))

    def candidates(
        self,
        queue: str,
        skills: Collection[str] = (),
        exclude: Collection[str] = (),
        app_id: str = "",
        channel: str = "",
    ) -> list[AssociateSession]:
        """Everyone `pick` could choose, longest idle first: what a reservation across replicas asks storage
        to choose from (core/desk_shared.py)."""
        return sorted(self._able(queue, skills, exclude, app_id, channel), key=lambda a: (a.idle_since, a.associate_id))

    def _able(
        self, queue: str, skills: Collection[str], exclude: Collection[str], app_id: str, channel: str
    ) -> list[AssociateSession]:
        return [
            a
            for a in self._associates.values()
            if a.fits(channel, queue, self.queue_limits)
            and queue in a.queues
            and a.associate_id not in exclude
            and a.skills.issuperset(skills)
            and a.serves(app_id)
        ]

    def has_capacity(self, queue: str, skills: Collection[str] = (), app_id: str = "", channel: str = "") -> bool:
        return self.pick(queue, skills, app_id=app_id, channel=channel) is not None

    def wait(self, queue: str, engagement_id: str, *, priority: int = 0, since: float = 0.0) -> None:
        bisect.insort(self._waiting.setdefault(queue, []), (-priority, since, engagement_id))
        if self.moved is not None:
            self.moved(queue)

    def unwait(self, queue: str, engagement_id: str) -> None:
        waiting = self._waiting.get(queue, [])
        before = len(waiting)
        waiting[:] = [w for w in waiting if w[2] != engagement_id]
        if len(waiting) != before and self.moved is not None:
            self.moved(queue)

    def line(self, queue: str) -> list[str]:
        """The engagement ids waiting in `queue`, next to be served first."""
        return [w[2] for w in self._waiting.get(queue, ())]

    def lines(self) -> list[str]:
        """Queues with someone waiting."""
        return [q for q, waiting in self._waiting.items() if waiting]

    def waiting(self, queues: Collection[str]) -> list[str]:
        """Waiting engagement ids across `queues`, best first."""
        merged = sorted(w for q in queues for w in self._waiting.get(q, ()))
        return [w[2] for w in merged]

    def oldest_since(self, queue: str) -> float | None:
        """When the longest-waiting engagement of `queue` started waiting; None when none waits."""
        waiting = self._waiting.get(queue)
        return min(w[1] for w in waiting) if waiting else None

    def waiting_count(self, queue: str) -> int:
        return len(self._waiting.get(queue, ()))

    def associates(self) -> list[AssociateSession]:
        """Signed-in associates (read-only view for live status and metrics)."""
        return list(self._associates.values())
