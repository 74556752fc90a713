"""Live device and associate sessions: an identity plus an outbox the API drains."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..clock import TimerHandle
from ..engine.state import DeviceState
from .model import (
    Ack,
    CallSignalRelay,
    ChannelChanged,
    ChatLine,
    CueOffer,
    EngagementEnded,
    EngagementOffered,
    EngagementUpdate,
    EngagementView,
    FallbackOffered,
    OfferWithdrawn,
    SessionFailed,
    UpgradeAsk,
    Withdrawal,
)

__all__ = ["AssociateSession", "DeviceOut", "DeviceSession", "PendingCue"]

# What the core puts on each side's outbox; the gRPC layer converts.
Relayed = ChatLine | UpgradeAsk | ChannelChanged | CallSignalRelay
DeviceOut = Ack | CueOffer | Withdrawal | EngagementUpdate | SessionFailed | Relayed | FallbackOffered
AssociateOut = EngagementView | EngagementOffered | OfferWithdrawn | EngagementEnded | SessionFailed | Relayed


@dataclass(slots=True)
class PendingCue:
    offer: CueOffer
    scenario_id: str
    explanation: dict[str, object]
    expiry: TimerHandle | None = None


# Backpressure: past these, the server stops reading the device's stream until
# its outbox drains and its writes commit, so HTTP/2 flow control pushes back on
# the client instead of server memory growing.
OUTBOX_HIGH = 256
PENDING_WRITES_HIGH = 64


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
    # When the last signal batch arrived (core clock); 0 before the first. Live now reads it.
    last_received_at: float = 0.0
    writes: set[asyncio.Future[object]] = field(default_factory=set)
    closed: bool = False

    _room: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: DeviceOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def has_room(self) -> bool:
        return self.outbox.qsize() < OUTBOX_HIGH and len(self.writes) < PENDING_WRITES_HIGH

    def notify_room(self) -> None:
        if self.has_room():
            self._room.set()

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()


@dataclass(eq=False, slots=True)
class AssociateSession:
    associate_id: str
    display_name: str
    queues: tuple[str, ...]
    capacity: int
    idle_since: float
    skills: frozenset[str] = frozenset()
    manual_claim: bool = False
    presence: str = "available"  # available | busy | away
    active: set[str] = field(default_factory=set)
    # Offers awaiting claim hold a slot, so one associate is never offered more than they can take.
    offers: set[str] = field(default_factory=set)
    outbox: asyncio.Queue[AssociateOut] = field(default_factory=asyncio.Queue)
    closed: bool = False

    @property
    def available(self) -> bool:
        return not self.closed and self.presence == "available" and len(self.active) + len(self.offers) < self.capacity

    def send(self, message: AssociateOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)
