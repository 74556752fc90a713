"""Live device and associate sessions: an identity plus an outbox the API drains."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..clock import TimerHandle
from ..engine.state import DeviceState
from ..storage import OfferCommit, SignalRecord
from ..storage.journal import JournalBatch, batch_records, journal_batches
from .model import (
    Ack,
    CallSignalRelay,
    ChannelChanged,
    ChatLine,
    CueOffer,
    EngagementEnded,
    EngagementJoined,
    EngagementOffered,
    EngagementUpdate,
    EngagementView,
    FallbackOffered,
    FeedbackAsked,
    Forwarded,
    InvitationResult,
    JourneyAppended,
    OfferWithdrawn,
    SessionFailed,
    SupervisedSnapshot,
    UpgradeAsk,
    UserVerified,
    Withdrawal,
)

__all__ = ["AssociateSession", "DeviceOut", "DeviceSession", "Outbox", "PendingAck", "PendingCue", "Unit"]

T = TypeVar("T")

# What the core puts on each side's outbox; the gRPC layer converts.
Relayed = ChatLine | UpgradeAsk | ChannelChanged | CallSignalRelay
DeviceOut = (
    Ack
    | CueOffer
    | Withdrawal
    | EngagementUpdate
    | SessionFailed
    | Relayed
    | FallbackOffered
    | UserVerified
    | FeedbackAsked
)
AssociateOut = (
    EngagementView
    | Forwarded
    | EngagementOffered
    | OfferWithdrawn
    | EngagementEnded
    | SessionFailed
    | Relayed
    | EngagementJoined
    | SupervisedSnapshot
    | JourneyAppended
    | InvitationResult
)


@dataclass(slots=True)
class PendingCue:
    offer: CueOffer
    scenario_id: str
    explanation: dict[str, object]
    expiry: TimerHandle | None = None
    # The associate whose slot is held for this cue's engagement while it is on screen (require_capacity).
    reserved: AssociateSession | None = None

    def release(self) -> None:
        """The cue is answered, expired or withdrawn: its associate's slot is free again."""
        if self.reserved is not None:
            self.reserved.reserved.discard(self.offer.cue_id)
            self.reserved = None


@dataclass(slots=True, eq=False)
class Unit:
    """What one evaluation of a device decided: stored in one transaction, and only then shown.

    A transactional outbox in miniature: ``shown`` (cues offered) reaches the device only after ``work``
    (the signals that fired them, the cue rows, every decision) is committed, so a crash never leaves the
    device holding a cue the database does not know.
    """

    work: OfferCommit = field(default_factory=OfferCommit)
    shown: list[DeviceOut] = field(default_factory=list)
    sealed: bool = False  # its commit has started: nothing more may be added


@dataclass(slots=True, eq=False)
class PendingAck:
    """One applied batch waiting for its commit: what to store, and what its ack will say."""

    batch_id: str
    unit: Unit
    fresh: list[str]
    duplicates: list[str]
    rows: list[SignalRecord]
    # Or, for a batch of events that came as columns, its signals as one journal batch, and ``rows`` empty: the
    # columns go on to storage as they are, with no object per signal (issue 13).
    journal: JournalBatch | None = None

    def batches(self) -> list[JournalBatch]:
        """What to store, as journal batches."""
        return [self.journal] if self.journal is not None else journal_batches(self.rows)

    def records(self) -> list[SignalRecord]:
        """What to store, a record per signal (built on demand for a journal batch)."""
        return self.rows if self.journal is None else batch_records(self.journal)

    def plain(self) -> bool:
        """Only signals to store: nothing evaluated was staged with them (no cue, decision, milestone)."""
        work = self.unit.work
        return not (
            self.unit.shown
            or work.cues
            or work.decisions
            or work.milestones
            or work.statuses
            or work.webhooks
            or work.guards
            # A device's deadline row moved by these signals (with other replicas; core/evaluation.py)
            or work.timers
            or work.fires
        )


class Outbox(Generic[T]):
    """A device session's FIFO of outgoing messages: asyncio.Queue's non-blocking half, in under 100 bytes.

    Nothing ever awaits it: whoever drains it (the device stream, api/device.py) sets ``listener``, which
    each put calls, and takes items with ``get_nowait``. The deque exists only while messages wait, so
    an idle device pays for neither it nor an asyncio.Queue's three deques and Event (~3 KB).
    """

    __slots__ = ("_items", "listener")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self.listener: Callable[[], None] | None = None

    def put_nowait(self, item: T) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)
        if self.listener is not None:
            self.listener()

    def get_nowait(self) -> T:
        """The oldest item; raises asyncio.QueueEmpty (like asyncio.Queue) when there is none."""
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def peek(self) -> T | None:
        """The oldest item without taking it; None when there is none."""
        items = self._items
        return items[0] if items else None

    def items(self) -> list[T]:
        """What still waits, oldest first (a look, not a take)."""
        return list(self._items) if self._items else []

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items


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
    outbox: Outbox[DeviceOut] = field(default_factory=Outbox)
    # When the last signal batch arrived (core clock); 0 before the first. Live now reads it.
    last_received_at: float = 0.0
    # Tracked writes in flight (CoreBase._track); None when there are none, as on an idle device (an empty
    # set is 216 bytes).
    writes: set[asyncio.Future[object]] | None = None
    closed: bool = False
    # A device secret issued by this Hello, for the Welcome to carry; cleared once sent.
    issued_secret: str = field(default="", repr=False)
    # The evaluation in progress stages its cues and decisions here (see Unit).
    unit: Unit | None = None
    # The user id a valid user token asserted on this session ("" if none): core/user_tokens.py.
    verified_user: str = ""
    # Batches applied but not yet taken into a group commit, oldest first (core/group_commit.py); None when
    # there are none. `committing` counts those taken and not yet acked.
    acks: list[PendingAck] | None = None
    committing: int = 0
    # Resolved once this session has no batch waiting for its commit (GroupCommit.settled); None when nobody waits.
    ack_waiters: list[asyncio.Future[None]] | None = None

    # Resolved by notify_room once there is room again; exists only while the reader waits for it.
    _room: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    def send(self, message: DeviceOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def has_room(self) -> bool:
        pending = (len(self.writes) if self.writes else 0) + (len(self.acks) if self.acks else 0) + self.committing
        return self.outbox.qsize() < OUTBOX_HIGH and pending < PENDING_WRITES_HIGH

    def notify_room(self) -> None:
        room = self._room
        if room is not None and self.has_room():
            self._room = None
            if not room.done():
                room.set_result(None)

    async def wait_for_room(self) -> None:
        while not self.has_room():
            room = self._room
            if room is None:
                room = self._room = asyncio.get_running_loop().create_future()
            # Shielded: a cancelled waiter must not cancel the future other waiters share.
            await asyncio.shield(room)


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
    # Why busy or away (break, training), for live now and reports.
    presence_reason: str = ""
    # Queues whose engagements this associate supervises.
    supervised_queues: tuple[str, ...] = ()
    # Apps whose engagements this associate may take, see or act on; empty: every app.
    apps: frozenset[str] = frozenset()
    # channel -> most engagements held while one of them is on that channel (chat: 3, audio: 1).
    channel_capacity: Mapping[str, int] = field(default_factory=dict)
    # What each held slot (engagement, offer or reserved cue id) is for: (channel, queue).
    held: dict[str, tuple[str, str]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    # Offers awaiting claim hold a slot, so one associate is never offered more than they can take.
    offers: set[str] = field(default_factory=set)
    # Cues on screen whose engagement this associate's slot is held for, so it is not offered twice.
    reserved: set[str] = field(default_factory=set)
    outbox: asyncio.Queue[AssociateOut] = field(default_factory=asyncio.Queue)
    closed: bool = False
    # Connection lost, within the grace period before sign-out: keeps what it holds, takes nothing new.
    detached: bool = False
    # Several replicas (api/associate_links.py): brings the stream up to date across them before a slot is
    # given back or offered again. A stand-in: what it was sent is stored for the associate's home (so the
    # "ended" is on its way before another replica may offer the slot); the home: what waits for it is taken.
    settle: Callable[[], Awaitable[None]] | None = None

    @property
    def available(self) -> bool:
        held = len(self.active) + len(self.offers) + len(self.reserved)
        return not self.closed and not self.detached and self.presence == "available" and held < self.capacity

    def hold(self, slots: set[str], key: str, channel: str, queue: str) -> None:
        """Take a slot (in `active`, `offers` or `reserved`) for an engagement of this channel and queue."""
        slots.add(key)
        self.held[key] = (channel, queue)

    def fits(self, channel: str, queue: str, queue_limits: Callable[[str], Mapping[str, int]] | None = None) -> bool:
        """Whether one more engagement of `channel` in `queue` fits beside what this associate holds.

        Every held engagement's channel limit (the associate's own, and its queue's) must allow the new
        total, and so must the new one's: with chat 3 and audio 1, three chats fit, a call fits alone, and
        nothing joins a call. Without channel limits, only `capacity` counts.
        """
        if not self.available:
            return False
        slots = self.active | self.offers | self.reserved
        for key in [k for k in self.held if k not in slots]:
            del self.held[key]  # released elsewhere: forget what it was for
        total = len(slots) + 1
        for held_channel, held_queue in (*(self.held[k] for k in slots if k in self.held), (channel, queue)):
            if total > self.channel_limit(held_channel, held_queue, queue_limits):
                return False
        return True

    def fits_beside(
        self,
        held: Mapping[str, tuple[str, str]],
        channel: str,
        queue: str,
        queue_limits: Callable[[str], Mapping[str, int]] | None = None,
    ) -> bool:
        """`fits`, against `held` ({key: (channel, queue)}) instead of what this replica knows of: the slots
        the associate holds on every replica (storage/slots.py)."""
        if self.closed or self.detached or self.presence != "available":
            return False
        total = len(held) + 1
        for held_channel, held_queue in (*held.values(), (channel, queue)):
            if total > self.channel_limit(held_channel, held_queue, queue_limits):
                return False
        return True

    def holding(self) -> dict[str, tuple[str, str]]:
        """{key: (channel, queue)} of every slot held here (engagements, offers, cues on screen)."""
        return {k: self.held.get(k, ("", "")) for k in self.active | self.offers | self.reserved}

    def channel_limit(
        self, channel: str, queue: str, queue_limits: Callable[[str], Mapping[str, int]] | None = None
    ) -> int:
        """The most engagements held while one is on `channel` in `queue`: the tighter of the
        associate's and the queue's limits; `capacity` when neither sets one."""
        limits = [self.capacity]
        if channel in self.channel_capacity:
            limits.append(self.channel_capacity[channel])
        if queue_limits is not None and channel:
            per_queue = queue_limits(queue).get(channel)
            if per_queue is not None:
                limits.append(per_queue)
        return min(limits)

    def serves(self, app_id: str) -> bool:
        """Whether this associate may handle engagements of `app_id` (their credential's apps)."""
        return not self.apps or app_id in self.apps

    def send(self, message: AssociateOut) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)
