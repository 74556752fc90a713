"""Live device and associate sessions: an identity plus an outbox the API drains."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..clock import TimerHandle
from ..engine.state import DeviceState
from .model import (
    Ack,
    CueOffer,
    EngagementEnded,
    EngagementUpdate,
    EngagementView,
    SessionFailed,
    Withdrawal,
)

__all__ = ["AssociateSession", "DeviceOut", "DeviceSession", "PendingCue"]

DeviceOut = Ack | CueOffer | Withdrawal | EngagementUpdate | SessionFailed
AssociateOut = EngagementView | EngagementEnded | SessionFailed


@dataclass(slots=True)
class PendingCue:
    offer: CueOffer
    scenario_id: str
    explanation: dict[str, object]
    expiry: TimerHandle | None = None


@dataclass(eq=False, slots=True)
class DeviceSession:
    session_id: str
    app_id: str
    device_id: str
    subject: str
    consent: str
    state: DeviceState
    started_at: float
    outbox: asyncio.Queue[DeviceOut] = field(default_factory=asyncio.Queue)
    writes: set[asyncio.Future[object]] = field(default_factory=set)
    closed: bool = False

    def send(self, message: DeviceOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)


@dataclass(eq=False, slots=True)
class AssociateSession:
    associate_id: str
    display_name: str
    queues: tuple[str, ...]
    capacity: int
    idle_since: float
    active: set[str] = field(default_factory=set)
    outbox: asyncio.Queue[AssociateOut] = field(default_factory=asyncio.Queue)
    closed: bool = False

    @property
    def available(self) -> bool:
        return not self.closed and len(self.active) < self.capacity

    def send(self, message: AssociateOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)
