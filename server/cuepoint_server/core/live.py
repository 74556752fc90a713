"""Live now: connected device sessions with their status, and the load of each queue.

A session is live while its device sent a signal within ``CoreConfig.live_idle_after``
seconds (45 s by default), idle until ``live_inactive_after`` (60 s), then inactive.
Times are the core's clock; before its first signal a session counts from its hello.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..engine.state import Scalar
from .sessions import AssociateSession, DeviceSession, PendingCue

__all__ = [
    "LiveNow",
    "LivePendingCue",
    "LiveSession",
    "QueueLoad",
    "ScheduledCallback",
    "describe_session",
    "live_status",
    "queue_loads",
]


@dataclass(frozen=True, slots=True)
class LivePendingCue:
    cue_id: str
    scenario_id: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class LiveSession:
    session_id: str
    device_id: str
    app_id: str
    status: str  # live | idle | inactive
    started_at: float
    # When the last signal was received (core clock); None before the first.
    last_signal_at: float | None
    # Seconds since the last signal (or the hello).
    quiet_for: float
    # The context without user.* keys (device, app, location, attributes).
    context: dict[str, Scalar]
    segments: list[str]
    milestones: list[str]
    pending_cue: LivePendingCue | None
    engagement_id: str
    engagement_state: str  # "" | queued | assigned
    replica_id: str = ""  # the replica holding the device's stream (core/bus.py's replica id)


@dataclass(frozen=True, slots=True)
class QueueLoad:
    queue: str
    waiting: int  # engagements queued for an associate
    associates: int  # signed in to the queue
    available: int  # of which with spare capacity
    longest_wait: float = 0.0  # seconds the longest-waiting engagement has waited (core clock); 0: none


@dataclass(frozen=True, slots=True)
class ScheduledCallback:
    """A callback a user chose, not yet wrapped up: waiting for its time, then queued or assigned."""

    engagement_id: str
    queue: str
    callback_at: float
    state: str  # callback_requested | queued | assigned
    associate_id: str


@dataclass(frozen=True, slots=True)
class LiveNow:
    now: float
    sessions: list[LiveSession]
    queues: list[QueueLoad]
    callbacks: list[ScheduledCallback] = field(default_factory=list)
    # Live replicas that did not answer in time (core/live_cluster.py): their sessions are missing.
    unanswered: list[str] = field(default_factory=list)


def live_status(quiet_for: float, idle_after: float, inactive_after: float) -> str:
    if quiet_for < idle_after:
        return "live"
    if quiet_for < inactive_after:
        return "idle"
    return "inactive"


def describe_session(
    session: DeviceSession,
    now: float,
    *,
    status_after: tuple[float, float],
    segments: list[str],
    pending: PendingCue | None,
    engagement: tuple[str, str],
    replica_id: str = "",
) -> LiveSession:
    quiet = now - max(session.started_at, session.last_received_at)
    offer = pending.offer if pending is not None else None
    return LiveSession(
        session_id=session.session_id,
        device_id=session.device_id,
        app_id=session.app_id,
        status=live_status(quiet, *status_after),
        started_at=session.started_at,
        last_signal_at=session.last_received_at or None,
        quiet_for=quiet,
        context={k: v for k, v in session.state.context.items() if not k.startswith("user.")},
        segments=segments,
        milestones=sorted(session.state.milestones),
        pending_cue=(
            LivePendingCue(offer.cue_id, pending.scenario_id, offer.created_at, offer.expires_at)
            if offer is not None and pending is not None
            else None
        ),
        engagement_id=engagement[0],
        engagement_state=engagement[1],
        replica_id=replica_id,
    )


def queue_loads(
    queues: Iterable[str],
    associates: Sequence[AssociateSession],
    waiting_count: Callable[[str], int],
    oldest_since: Callable[[str], float | None] | None = None,
    now: float = 0.0,
) -> list[QueueLoad]:
    """One row per queue in `queues` or served by an associate, sorted by name."""
    names = set(queues) | {q for a in associates for q in a.queues}

    def longest(name: str) -> float:
        since = oldest_since(name) if oldest_since is not None else None
        return max(0.0, now - since) if since is not None else 0.0

    return [
        QueueLoad(
            queue=name,
            waiting=waiting_count(name),
            associates=sum(1 for a in associates if name in a.queues and not a.closed),
            available=sum(1 for a in associates if name in a.queues and a.available),
            longest_wait=longest(name),
        )
        for name in sorted(names)
    ]
