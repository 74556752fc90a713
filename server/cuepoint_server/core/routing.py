"""Queues of engagements waiting for associates; longest-idle associate first."""

from __future__ import annotations

from collections import deque

from .sessions import AssociateSession

__all__ = ["Router"]


class Router:
    def __init__(self) -> None:
        self._associates: dict[str, AssociateSession] = {}
        self._waiting: dict[str, deque[str]] = {}

    def add(self, associate: AssociateSession) -> None:
        self._associates[associate.associate_id] = associate

    def remove(self, associate: AssociateSession) -> None:
        if self._associates.get(associate.associate_id) is associate:
            del self._associates[associate.associate_id]

    def pick(self, queue: str) -> AssociateSession | None:
        candidates = [a for a in self._associates.values() if a.available and queue in a.queues]
        if not candidates:
            return None
        # Longest idle wins; id breaks ties so the choice is deterministic.
        return min(candidates, key=lambda a: (a.idle_since, a.associate_id))

    def has_capacity(self, queue: str) -> bool:
        return self.pick(queue) is not None

    def wait(self, queue: str, engagement_id: str, *, front: bool = False) -> None:
        waiting = self._waiting.setdefault(queue, deque())
        if front:
            waiting.appendleft(engagement_id)
        else:
            waiting.append(engagement_id)

    def next_waiting(self, queues: tuple[str, ...]) -> tuple[str, str] | None:
        """Pop the oldest waiting engagement among `queues` (queue order breaks ties)."""
        for queue in queues:
            waiting = self._waiting.get(queue)
            if waiting:
                return queue, waiting.popleft()
        return None

    def waiting_count(self, queue: str) -> int:
        return len(self._waiting.get(queue, ()))
