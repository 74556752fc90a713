"""The associate client: receive engagements with their context, talk, end them.

Same shape as the device client, minus signals: one stream, a reader task
that dispatches server events, and one failure path (``_fail``) that reaches
every waiter and iterator. Per engagement, chat, channel upgrades and call
signalling live in a ``_conversation.Conversation`` (shared with the device
side), created when the engagement is assigned.

Ordering assumptions about the server: SignedIn is the first message; an
engagement's ``assigned`` precedes its chat/upgrade/call traffic (traffic for
an engagement not assigned to this associate is dropped); a claim is answered
by ``assigned`` or ``offer_withdrawn`` for that engagement id. Matching of chat
echoes and channel changes is described in ``cuepoint._conversation``.
"""

# ruff: noqa: ASYNC109 -- `timeout=` arguments are part of the public API by design;
# they are applied with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import types
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Literal, TypeAlias

from cuepoint.v1 import associate_pb2, associate_pb2_grpc

from . import _convert, _validate
from ._conversation import Conversation, deadline
from ._ids import IdGenerator
from ._inbox import Inbox, drain, get_within
from ._transport import BidiStream, handshake
from .config import AssociateConfig
from .errors import (
    ClientClosed,
    ConnectionLost,
    CuepointError,
    EngagementClosed,
    InvalidSignal,
    Rejected,
)
from .models import (
    AssignedEngagement,
    CallSignal,
    CallSignalKind,
    Channel,
    ChannelChange,
    ChatMessage,
    EngagementEnded,
    EngagementState,
    EngagementUpdate,
    InvitationResult,
    ParticipantRole,
    Party,
    Presence,
    SupervisedEngagement,
    TransferMode,
    UpgradeRequest,
)

__all__ = ["AssociateClient", "AssociateEvent", "connect_associate"]

log = logging.getLogger("cuepoint")

AssociateEvent: TypeAlias = AssignedEngagement | EngagementEnded
"""What ``AssociateClient.events()`` yields: assignments, joinings (``role`` not OWNER) and endings."""

_Stream = BidiStream[associate_pb2.AssociateMessage, associate_pb2.AssociateEvent]
_State = Literal["new", "starting", "open", "closing", "closed"]

# Ended engagements whose transcript stays readable, and withdrawn offers remembered.
_KEEP_FINISHED = 256
_KEEP_WITHDRAWN = 256


async def connect_associate(
    target: str,
    *,
    associate_id: str,
    display_name: str = "",
    queues: Iterable[str] = (),
    capacity: int = 1,
    skills: Iterable[str] = (),
    manual_claim: bool = False,
    presence: Presence = Presence.AVAILABLE,
    supervised_queues: Iterable[str] = (),
    config: AssociateConfig | None = None,
    channel_capacity: Mapping[Channel, int] | None = None,
) -> AssociateClient:
    """Sign an associate in and return the started :class:`AssociateClient`.

    ``skills`` are matched against what an engagement requires. With
    ``manual_claim`` engagements arrive as offers (:meth:`AssociateClient.offers`)
    to :meth:`~AssociateClient.claim` or :meth:`~AssociateClient.reject`;
    otherwise they are assigned at once (:meth:`AssociateClient.engagements`).
    ``channel_capacity`` limits concurrency per channel: ``{Channel.CHAT: 3, Channel.AUDIO: 1}`` takes up to
    three chats, or one call alone (``capacity`` is raised to the largest limit).
    """
    client = AssociateClient(
        target,
        associate_id=associate_id,
        display_name=display_name,
        queues=queues,
        capacity=capacity,
        skills=skills,
        manual_claim=manual_claim,
        presence=presence,
        supervised_queues=supervised_queues,
        config=config,
        channel_capacity=channel_capacity,
    )
    return await client.start()


class AssociateClient:
    """An associate's session. Use :func:`connect_associate` or ``async with``."""

    def __init__(
        self,
        target: str,
        *,
        associate_id: str,
        display_name: str = "",
        queues: Iterable[str] = (),
        capacity: int = 1,
        skills: Iterable[str] = (),
        manual_claim: bool = False,
        presence: Presence = Presence.AVAILABLE,
        supervised_queues: Iterable[str] = (),
        config: AssociateConfig | None = None,
        channel_capacity: Mapping[Channel, int] | None = None,
    ) -> None:
        if not isinstance(associate_id, str) or not associate_id:
            raise InvalidSignal("associate_id must be a non-empty string", field="sign_in.associate_id")
        if isinstance(queues, str):
            raise InvalidSignal("queues must be a list of queue names, not a string", field="sign_in.queues")
        if not isinstance(capacity, int) or capacity < 1:
            raise InvalidSignal("capacity must be an int >= 1", field="sign_in.capacity")
        self._target = target
        self._associate_id = associate_id
        self._display_name = display_name
        self._requested_queues = tuple(queues)
        self._capacity = capacity
        self._skills = _validate.names(skills, "sign_in.skills")
        self._manual_claim = _validate.flag(manual_claim, "sign_in.manual_claim")
        self._presence = _validate.presence(presence, "sign_in.presence")
        if isinstance(supervised_queues, str):
            raise InvalidSignal(
                "supervised_queues must be a list of queue names, not a string", field="sign_in.supervised_queues"
            )
        self._supervised_queues = tuple(supervised_queues)
        limits = dict(channel_capacity or {})
        for channel, limit in limits.items():
            if not isinstance(channel, Channel):
                raise InvalidSignal("channel_capacity keys must be cuepoint.Channel", field="sign_in.channel_capacity")
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
                raise InvalidSignal("channel limits must be ints from 1 to 100", field="sign_in.channel_capacity")
        self._channel_capacity = limits
        self._config = config or AssociateConfig()
        self._new_id = IdGenerator(time.time)

        self._state: _State = "new"
        self._failure: CuepointError | None = None
        self._stream: _Stream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queues: tuple[str, ...] = ()
        self._active: dict[str, AssignedEngagement] = {}
        self._inbox: Inbox[AssignedEngagement] = Inbox()
        self._subscribers: weakref.WeakSet[Inbox[AssociateEvent]] = weakref.WeakSet()
        # Manual claim: outstanding offers, claims awaiting their answer, offers lost.
        self._offers: Inbox[AssignedEngagement] = Inbox()
        self._offered: dict[str, AssignedEngagement] = {}
        self._claims: dict[str, asyncio.Future[AssignedEngagement]] = {}
        self._withdrawn: dict[str, str] = {}
        # Per engagement (assigned since sign-in): its assignment and live traffic.
        self._assigned: dict[str, AssignedEngagement] = {}
        self._conversations: dict[str, Conversation] = {}
        self._finished: deque[str] = deque()
        # Engagements joined (conference, consult, monitor, barge-in), and for supervisors the latest
        # state of every engagement of their queues.
        self._joined: Inbox[AssignedEngagement] = Inbox()
        self._supervised: dict[str, SupervisedEngagement] = {}
        self._supervised_feed: Inbox[SupervisedEngagement] = Inbox()
        # Invitations awaiting the server's answer, per device, oldest first.
        self._invitations: dict[str, deque[asyncio.Future[InvitationResult]]] = {}

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> AssociateClient:
        """Open the stream, send SignIn, wait for SignedIn. Returns ``self``."""
        if self._state == "open":
            return self
        if self._state != "new":
            raise ClientClosed(f"cannot start a client that is {self._state}")
        self._state = "starting"
        stream: _Stream = BidiStream.open(
            self._target,
            lambda channel: associate_pb2_grpc.AssociateServiceStub(channel).Connect,
            credentials=self._config.credentials,
            options=self._config.grpc_options(),
            metadata=self._config.call_metadata(),
        )
        try:
            signed_in = await self._handshake(stream)
            if self._state != "starting":
                raise ClientClosed("the client was closed while starting")
        except BaseException as exc:
            await stream.close()
            if self._state == "starting":  # else close() got here first and cleaned up
                self._state = "closed"
                if isinstance(exc, CuepointError):
                    self._failure = exc
                self._close_consumers(self._failure or ClientClosed("client start was interrupted"))
            raise
        self._stream = stream
        self._queues = tuple(signed_in.queues)
        self._state = "open"
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(stream))
        return self

    async def _handshake(self, stream: _Stream) -> associate_pb2.SignedIn:
        message = _convert.sign_in(
            associate_id=self._associate_id,
            display_name=self._display_name,
            queues=self._requested_queues,
            capacity=self._capacity,
            skills=self._skills,
            manual_claim=self._manual_claim,
            supervised_queues=self._supervised_queues,
            presence=self._presence,
            channel_capacity=self._channel_capacity,
        )
        signed_in: associate_pb2.SignedIn = await handshake(
            stream, message, expect="signed_in", target=self._target, within=self._config.connect_timeout
        )
        return signed_in

    async def close(self) -> None:
        """Half-close and give the server ``close_timeout`` to end the stream. Never raises.

        Engagements still active stay with the server; it decides what
        happens to them when an associate leaves.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state in ("new", "starting"):
            self._state = "closed"
            self._close_consumers(None)
            return
        self._state = "closing"
        stream = self._stream
        assert stream is not None and self._reader is not None
        if self._failure is None:
            await stream.done_writing()
            await asyncio.wait({self._reader}, timeout=self._config.close_timeout)
        if not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await stream.close()
        self._state = "closed"
        self._close_consumers(self._failure)

    async def __aenter__(self) -> AssociateClient:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    # --- state ----------------------------------------------------------------

    @property
    def associate_id(self) -> str:
        return self._associate_id

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues the server signed us into (its answer, not our request)."""
        return self._queues

    @property
    def active(self) -> Mapping[str, AssignedEngagement]:
        """Engagements assigned and not yet ended, by engagement id."""
        return types.MappingProxyType(self._active)

    @property
    def manual_claim(self) -> bool:
        return self._manual_claim

    @property
    def presence(self) -> Presence:
        """The presence last sent (at sign-in or by :meth:`set_presence`)."""
        return self._presence

    @property
    def offers_pending(self) -> Mapping[str, AssignedEngagement]:
        """Offers (manual claim) neither claimed, rejected nor withdrawn, by engagement id."""
        return types.MappingProxyType(self._offered)

    @property
    def is_open(self) -> bool:
        return self._state == "open" and self._failure is None

    @property
    def failure(self) -> CuepointError | None:
        return self._failure

    # --- engagements ----------------------------------------------------------

    def engagements(self) -> AsyncIterator[AssignedEngagement]:
        """Assigned engagements not yet taken, since sign-in, oldest first.

        One shared queue (each engagement goes to one consumer). Ends when the
        client closes; raises the session's error if it fails.
        """
        return self._inbox

    async def next_engagement(self, *, timeout: float | None = None) -> AssignedEngagement:
        """The next engagement from :meth:`engagements`; :class:`TimedOut` after ``timeout`` s."""
        return await get_within(self._inbox, timeout, "engagement")

    def events(self) -> AsyncIterator[AssociateEvent]:
        """Assignments and endings (by either side) received after this call."""
        inbox: Inbox[AssociateEvent] = Inbox()
        if self._state == "closed" or self._failure is not None:
            inbox.close(self._failure)
        else:
            self._subscribers.add(inbox)
        return drain(inbox, self._subscribers)

    async def end(
        self,
        engagement: AssignedEngagement | str,
        *,
        disposition: str = "resolved",
        notes: str = "",
        outcome: str = "",
    ) -> None:
        """Ask the server to end an engagement with a wrap-up ``disposition``.

        ``outcome``: what you record as its outcome, one of the queue's ``outcomes`` (by default
        ``resolved``, ``converted``, ``not_resolved``); success outcomes count in the funnel.

        Returns once sent; the server's EngagementEnded (see :meth:`events`)
        confirms it and removes it from :attr:`active`. Also the wrap-up of an
        engagement the user already ended.
        """
        self._check_usable()
        engagement_id = _engagement_id(engagement, "end.engagement_id")
        await self._send(_convert.end_engagement(engagement_id, disposition, notes, outcome))

    # --- offers (manual claim) -----------------------------------------------------

    def offers(self) -> AsyncIterator[AssignedEngagement]:
        """Offers (with ``manual_claim``) not yet taken, since sign-in, oldest first.

        Each is a full :class:`AssignedEngagement` (context included) to
        :meth:`claim` or :meth:`reject`. One shared queue; withdrawn, claimed
        and rejected offers are dropped from it. Ends when the client closes.
        """
        return self._offers

    async def next_offer(self, *, timeout: float | None = None) -> AssignedEngagement:
        """The next offer from :meth:`offers`; :class:`TimedOut` after ``timeout`` s."""
        return await get_within(self._offers, timeout, "offer")

    async def claim(self, offer: AssignedEngagement | str, *, timeout: float | None = None) -> AssignedEngagement:
        """Take an offered engagement; returns it as assigned by the server.

        Raises :class:`Rejected` if the offer was withdrawn (taken by someone
        else or lapsed), before or in answer to the claim; :class:`TimedOut`
        after ``timeout``. A claimed engagement is returned here and not also
        queued for :meth:`engagements` (it still shows in :meth:`events`).
        """
        engagement_id = _engagement_id(offer, "claim.engagement_id")
        self._check_usable()
        if engagement_id in self._active:
            return self._active[engagement_id]
        if engagement_id in self._withdrawn:
            raise Rejected(_withdrawn_message(engagement_id, self._withdrawn[engagement_id]))
        if engagement_id in self._claims:
            raise Rejected(f"engagement {engagement_id} is already being claimed")
        future: asyncio.Future[AssignedEngagement] = asyncio.get_running_loop().create_future()
        self._claims[engagement_id] = future
        self._drop_offer(engagement_id)
        try:
            await self._send(_convert.claim_engagement(engagement_id))
            async with deadline(timeout, f"answer to the claim of {engagement_id}"):
                return await future
        finally:
            self._claims.pop(engagement_id, None)

    async def reject(self, offer: AssignedEngagement | str, reason: str = "") -> None:
        """Pass an offer on (another associate gets it); returns once sent."""
        engagement_id = _engagement_id(offer, "reject.engagement_id")
        reason = _validate.string(reason, "reject.reason")
        self._check_usable()
        self._drop_offer(engagement_id)
        await self._send(_convert.reject_engagement(engagement_id, reason))

    async def set_presence(self, presence: Presence, reason: str = "") -> None:
        """Set AVAILABLE (takes engagements), BUSY (takes nothing new) or AWAY; returns once sent.

        ``reason`` (at most 64 characters, e.g. "break", "training") shows in live now and reports.
        """
        presence = _validate.presence(presence)
        reason = _validate.string(reason, "presence.reason")
        self._check_usable()
        await self._send(_convert.set_presence(presence, reason))
        self._presence = presence

    # --- transfer, conference, supervision ---------------------------------------------

    async def transfer(
        self,
        engagement: AssignedEngagement | str,
        *,
        to_associate: str = "",
        to_queue: str = "",
        mode: TransferMode = TransferMode.BLIND,
        note: str = "",
    ) -> None:
        """Move an engagement you hold to another associate or queue (exactly one); returns once sent.

        BLIND hands it over at once: your part ends (an EngagementEnded with disposition
        ``transferred``). CONSULT (to an associate) first adds them as a consultant who sees the
        context and the chat; :meth:`complete_transfer` then hands over. The server refuses a
        transfer of an engagement that is not yours with PERMISSION_DENIED, which ends this session.
        """
        engagement_id = _engagement_id(engagement, "transfer.engagement_id")
        if bool(to_associate) == bool(to_queue):
            raise InvalidSignal("set exactly one of to_associate and to_queue", field="transfer.to_queue")
        if not isinstance(mode, TransferMode):
            raise InvalidSignal("mode must be a TransferMode", field="transfer.mode")
        note = _validate.string(note, "transfer.note")
        self._check_usable()
        await self._send(_convert.transfer(engagement_id, to_associate, to_queue, mode, note))

    async def complete_transfer(self, engagement: AssignedEngagement | str) -> None:
        """After a CONSULT transfer: the consulted associate becomes the owner; your part ends."""
        engagement_id = _engagement_id(engagement, "complete_transfer.engagement_id")
        self._check_usable()
        await self._send(_convert.complete_transfer(engagement_id))

    async def add_participant(self, engagement: AssignedEngagement | str, associate_id: str) -> None:
        """Conference: add another signed-in associate to an engagement you hold."""
        engagement_id = _engagement_id(engagement, "add_participant.engagement_id")
        associate_id = _validate.string(associate_id, "add_participant.associate_id")
        self._check_usable()
        await self._send(_convert.add_participant(engagement_id, associate_id))

    async def leave(self, engagement: AssignedEngagement | str, *, disposition: str = "", notes: str = "") -> None:
        """Leave an engagement you joined, with your own wrap-up of your part."""
        engagement_id = _engagement_id(engagement, "leave.engagement_id")
        self._check_usable()
        await self._send(_convert.leave(engagement_id, disposition, notes))

    async def monitor(self, engagement_id: str) -> None:
        """Supervisors: watch an engagement of a supervised queue read-only (see :meth:`joined`)."""
        engagement_id = _engagement_id(engagement_id, "monitor.engagement_id")
        self._check_usable()
        await self._send(_convert.monitor(engagement_id))

    async def barge(self, engagement_id: str) -> None:
        """Supervisors: join the conversation of an engagement of a supervised queue."""
        engagement_id = _engagement_id(engagement_id, "barge.engagement_id")
        self._check_usable()
        await self._send(_convert.barge(engagement_id))

    async def whisper(self, engagement: AssignedEngagement | str, text: str) -> None:
        """A message to the associates on the engagement only; the user never sees it."""
        engagement_id = _engagement_id(engagement, "whisper.engagement_id")
        text = _validate.chat_text(text)
        self._check_usable()
        await self._send(_convert.whisper(engagement_id, text))

    async def invite(
        self, device_id: str, channel: Channel, message: str, *, reason: str, timeout: float | None = None
    ) -> InvitationResult:
        """Invite a connected device (e.g. one you see struggling in live now): a cue from you.

        The same policy as a scenario's cue applies; the result says whether the cue was sent or why
        not. If the user accepts, the engagement comes to you first (see :meth:`engagements`).
        """
        device_id = _validate.string(device_id, "invite.device_id")
        channel = _validate.channel(channel)
        message = _validate.chat_text(message, "invite.message")
        reason = _validate.string(reason, "invite.reason")
        self._check_usable()
        future: asyncio.Future[InvitationResult] = asyncio.get_running_loop().create_future()
        self._invitations.setdefault(device_id, deque()).append(future)
        try:
            await self._send(_convert.invite(device_id, channel, message, reason))
            async with deadline(timeout, f"answer to the invitation of {device_id}"):
                return await future
        finally:
            waiting = self._invitations.get(device_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
            if not waiting:
                self._invitations.pop(device_id, None)

    def joined(self) -> AsyncIterator[AssignedEngagement]:
        """Engagements you were added to (``role`` says how), oldest first, with context and transcript."""
        return self._joined

    async def next_joined(self, *, timeout: float | None = None) -> AssignedEngagement:
        return await get_within(self._joined, timeout, "joined engagement")

    def supervised(self) -> AsyncIterator[SupervisedEngagement]:
        """Supervisors: every change to an engagement of a supervised queue, oldest first."""
        return self._supervised_feed

    async def next_supervised(self, *, timeout: float | None = None) -> SupervisedEngagement:
        return await get_within(self._supervised_feed, timeout, "supervised engagement")

    @property
    def supervised_engagements(self) -> Mapping[str, SupervisedEngagement]:
        """The latest known state of each engagement of the supervised queues."""
        return types.MappingProxyType(self._supervised)

    # --- live engagement traffic ----------------------------------------------------

    def channel_of(self, engagement: AssignedEngagement | str) -> Channel | None:
        """The engagement's current channel: the last accepted change, else the assigned one."""
        engagement_id, conversation = self._conversation(engagement, "engagement_id")
        return conversation.channel or self._assigned[engagement_id].channel

    def transcript(self, engagement: AssignedEngagement | str) -> tuple[ChatMessage, ...]:
        """The engagement's chat so far, in the server's order (both sides)."""
        return tuple(self._conversation(engagement, "engagement_id")[1].messages.items)

    async def send_chat(
        self, engagement: AssignedEngagement | str, text: str, *, timeout: float | None = None
    ) -> ChatMessage:
        """Send a chat message to the user; returns the server's relay of it.

        Resolves on our own echo (sender ASSOCIATE), matched like the device
        side: the oldest unanswered send with the same text, else the oldest.
        ``text`` must be 1-4000 characters, not all blank.
        """
        text = _validate.chat_text(text)
        self._check_usable()
        engagement_id, conversation = self._conversation(engagement, "chat.engagement_id")
        async with deadline(timeout, "chat echo from the server"):
            return await conversation.send_chat(engagement_id, text)

    def messages(self, engagement: AssignedEngagement | str) -> AsyncIterator[ChatMessage]:
        """Every chat message of the engagement (both sides), from the first; ends when it ends."""
        return self._conversation(engagement, "engagement_id")[1].messages.iterate()

    async def request_upgrade(
        self, engagement: AssignedEngagement | str, channel: Channel, *, timeout: float | None = None
    ) -> ChannelChange:
        """Ask the user to move the engagement to ``channel`` (e.g. SCREEN_SHARE).

        Returns the :class:`ChannelChange` answering this request (``accepted``
        False when the user declined or the cue does not allow ``channel``).
        """
        channel = _validate.channel(channel)
        self._check_usable()
        engagement_id, conversation = self._conversation(engagement, "upgrade_request.engagement_id")
        async with deadline(timeout, f"answer to the {channel.name} upgrade request"):
            return await conversation.request_upgrade(engagement_id, channel)

    def upgrade_requests(self, engagement: AssignedEngagement | str) -> AsyncIterator[UpgradeRequest]:
        """Upgrade requests from the user: those still unanswered first, then new ones."""
        conversation = self._conversation(engagement, "engagement_id")[1]
        return conversation.upgrade_requests.iterate(replay=conversation.pending_upgrade_requests)

    async def respond_upgrade(self, request: UpgradeRequest, accept: bool) -> None:
        """Accept or decline the user's upgrade request; returns once sent.

        The outcome arrives as a :class:`ChannelChange` (:meth:`channel_changes`).
        Raises :class:`Rejected` if it was already answered.
        """
        if not isinstance(request, UpgradeRequest):
            raise InvalidSignal("request must be a cuepoint.UpgradeRequest", field="upgrade_response")
        accept = _validate.flag(accept, "upgrade_response.accepted")
        self._check_usable()
        conversation = self._conversation(request.engagement_id, "upgrade_response.engagement_id")[1]
        await conversation.respond_upgrade(request, accept)

    def channel_changes(self, engagement: AssignedEngagement | str) -> AsyncIterator[ChannelChange]:
        """Every ChannelChange of the engagement (accepted or not, whoever asked), from the first."""
        return self._conversation(engagement, "engagement_id")[1].channel_changes.iterate()

    async def send_call_signal(
        self, engagement: AssignedEngagement | str, kind: CallSignalKind, payload: bytes
    ) -> None:
        """Relay opaque call-setup data (SDP, ICE, ...) to the user; at most 64 KiB; not echoed."""
        kind = _validate.call_signal_kind(kind)
        data = _validate.call_payload(payload)
        self._check_usable()
        engagement_id, conversation = self._conversation(engagement, "call_signal.engagement_id")
        await conversation.send_call_signal(engagement_id, kind, data)

    def call_signals(self, engagement: AssignedEngagement | str) -> AsyncIterator[CallSignal]:
        """Call signals from the user, from the first; ends when the engagement ends."""
        return self._conversation(engagement, "engagement_id")[1].call_signals.iterate()

    def _conversation(self, engagement: AssignedEngagement | str, where: str) -> tuple[str, Conversation]:
        engagement_id = _engagement_id(engagement, where)
        conversation = self._conversations.get(engagement_id)
        if conversation is None:
            raise Rejected(f"engagement {engagement_id} is not assigned to associate {self._associate_id}")
        return engagement_id, conversation

    async def _send_payload(self, payload: _convert.EngagementPayload) -> None:
        await self._send(_convert.associate_message(payload))

    async def _send(self, message: associate_pb2.AssociateMessage) -> None:
        self._check_usable()
        assert self._stream is not None
        try:
            await self._stream.write(message)
        except CuepointError as err:
            self._fail(err)
            raise

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise ClientClosed(f"the session has ended: {self._failure}") from self._failure
        if self._state != "open":
            raise ClientClosed("the associate client is not open")

    def _drop_offer(self, engagement_id: str) -> None:
        self._offered.pop(engagement_id, None)
        self._offers.discard(lambda e: e.engagement_id == engagement_id)

    # --- background -------------------------------------------------------------

    async def _read_loop(self, stream: _Stream) -> None:
        try:
            while True:
                message = await stream.read()
                if message is None:
                    if self._state in ("closing", "closed"):
                        return
                    raise ConnectionLost("the server ended the associate stream")
                self._dispatch(message)
        except CuepointError as err:
            self._fail(err)
        except Exception as exc:
            log.exception("cuepoint: unexpected error handling an associate event")
            self._fail(CuepointError(f"unexpected error handling an associate event: {exc!r}"))

    def _dispatch(self, message: associate_pb2.AssociateEvent) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assigned":
            self._on_assigned(_convert.assigned_engagement_from_proto(message.assigned))
        elif kind == "ended":
            self._on_ended(_convert.engagement_ended_from_proto(message.ended))
        elif kind == "offered":
            offer = _convert.assigned_engagement_from_proto(message.offered)
            self._withdrawn.pop(offer.engagement_id, None)
            self._offered[offer.engagement_id] = offer
            self._offers.put(offer)
        elif kind == "offer_withdrawn":
            engagement_id, reason = message.offer_withdrawn.engagement_id, message.offer_withdrawn.reason
            self._drop_offer(engagement_id)
            self._withdrawn[engagement_id] = reason
            while len(self._withdrawn) > _KEEP_WITHDRAWN:
                del self._withdrawn[next(iter(self._withdrawn))]
            claim = self._claims.pop(engagement_id, None)
            if claim is not None and not claim.done():
                claim.set_exception(Rejected(_withdrawn_message(engagement_id, reason)))
        elif kind == "joined":
            self._on_joined(_convert.assigned_engagement_from_proto(message.joined))
        elif kind == "invitation":
            result = _convert.invitation_from_proto(message.invitation)
            # Answers come in the order invitations were sent: the oldest waiting one for this device.
            waiting = self._invitations.get(result.device_id)
            if waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(result)
        elif kind == "supervised":
            snapshot = _convert.supervised_from_proto(message.supervised)
            self._supervised[snapshot.engagement_id] = snapshot
            if snapshot.state is EngagementState.ENDED:
                del self._supervised[snapshot.engagement_id]
            self._supervised_feed.put(snapshot)
        elif kind == "chat":
            chat = _convert.chat_message_from_proto(message.chat)
            if (conversation := self._traffic_target(chat.engagement_id, kind)) is not None:
                conversation.on_chat(chat)
        elif kind == "upgrade_request":
            request = _convert.upgrade_request_from_proto(message.upgrade_request)
            if (conversation := self._traffic_target(request.engagement_id, kind)) is not None:
                conversation.on_upgrade_request(request)
        elif kind == "channel_change":
            change = _convert.channel_change_from_proto(message.channel_change)
            if (conversation := self._traffic_target(change.engagement_id, kind)) is not None:
                conversation.on_channel_change(change)
        elif kind == "call_signal":
            signal = _convert.call_signal_from_proto(message.call_signal)
            if (conversation := self._traffic_target(signal.engagement_id, kind)) is not None:
                conversation.on_call_signal(signal)
        else:
            log.debug("cuepoint: ignoring associate event of kind %r", kind)

    def _on_assigned(self, engagement: AssignedEngagement) -> None:
        engagement_id = engagement.engagement_id
        self._active[engagement_id] = engagement
        self._open_conversation(engagement)
        self._drop_offer(engagement_id)
        claim = self._claims.pop(engagement_id, None)
        if claim is not None and not claim.done():
            claim.set_result(engagement)
        else:
            self._inbox.put(engagement)
        self._publish(engagement)

    def _on_joined(self, engagement: AssignedEngagement) -> None:
        if engagement.role in (ParticipantRole.CONFERENCE, ParticipantRole.CONSULT):
            self._active[engagement.engagement_id] = engagement
        self._open_conversation(engagement)
        self._joined.put(engagement)
        self._publish(engagement)

    def _open_conversation(self, engagement: AssignedEngagement) -> None:
        """Start (or restart, after a transfer back or a new part) following an engagement's traffic."""
        engagement_id = engagement.engagement_id
        self._assigned[engagement_id] = engagement
        conversation = self._conversations.get(engagement_id)
        if conversation is None or conversation.done:
            conversation = self._conversations[engagement_id] = Conversation(
                Party.ASSOCIATE, self._send_payload, self._new_id
            )
            # What was said before it reached us: the transcript travels with the engagement.
            for line in engagement.transcript:
                conversation.on_chat(line)

    def _on_ended(self, ended: EngagementEnded) -> None:
        engagement_id = ended.engagement_id
        self._active.pop(engagement_id, None)
        # Not yet picked up and already over: nothing left to handle.
        self._inbox.discard(lambda e: e.engagement_id == engagement_id)
        self._drop_offer(engagement_id)
        claim = self._claims.pop(engagement_id, None)
        if claim is not None and not claim.done():
            claim.set_exception(Rejected(f"engagement {engagement_id} ended before the claim was answered"))
        conversation = self._conversations.get(engagement_id)
        if conversation is not None and not conversation.done:
            assigned = self._assigned.get(engagement_id)
            update = EngagementUpdate(
                engagement_id=engagement_id,
                cue_id=assigned.cue_id if assigned is not None else "",
                state=EngagementState.ENDED,
                channel=conversation.channel or (assigned.channel if assigned is not None else None),
                queue=assigned.queue if assigned is not None else "",
                disposition=ended.disposition,
            )
            by = f" by the {ended.ended_by.value}" if ended.ended_by is not None else ""

            def closed() -> CuepointError:
                return EngagementClosed(f"engagement {engagement_id} was ended{by}", update=update)

            conversation.finish(None, closed)
            self._finished.append(engagement_id)
            while len(self._finished) > _KEEP_FINISHED:
                old = self._finished.popleft()
                self._conversations.pop(old, None)
                self._assigned.pop(old, None)
        self._publish(ended)

    def _traffic_target(self, engagement_id: str, kind: str) -> Conversation | None:
        conversation = self._conversations.get(engagement_id)
        if conversation is None:
            log.debug("cuepoint: dropping %s for engagement %s, not assigned to us", kind, engagement_id)
        return conversation

    def _publish(self, event: AssociateEvent) -> None:
        for inbox in list(self._subscribers):
            inbox.put(event)

    def _fail(self, error: CuepointError) -> None:
        if self._failure is not None or self._state == "closed":
            return
        self._failure = error
        log.warning("cuepoint: associate %s session failed: %s", self._associate_id, error)
        self._close_consumers(error)

    def _close_consumers(self, error: CuepointError | None) -> None:
        self._inbox.close(error)
        self._offers.close(error)
        self._joined.close(error)
        self._supervised_feed.close(error)
        invitations = [f for waiting in self._invitations.values() for f in waiting]
        self._invitations.clear()
        for future in invitations:
            if not future.done():
                future.set_exception(error or ClientClosed("the associate client was closed"))
        for inbox in list(self._subscribers):
            inbox.close(error)
        claims = list(self._claims.values())
        self._claims.clear()
        for claim in claims:
            if not claim.done():
                claim.set_exception(error or ClientClosed("the associate client was closed"))

        def closed() -> CuepointError:
            if error is None:
                return ClientClosed("the associate client was closed")
            failed = ClientClosed(f"the session has ended: {error}")
            failed.__cause__ = error
            return failed

        for conversation in self._conversations.values():
            conversation.finish(error, closed)


# --- helpers ------------------------------------------------------------------


def _engagement_id(engagement: AssignedEngagement | str, where: str) -> str:
    if isinstance(engagement, AssignedEngagement):
        engagement = engagement.engagement_id
    return _validate.engagement_id(engagement, where)


def _withdrawn_message(engagement_id: str, reason: str) -> str:
    return f"the offer of engagement {engagement_id} was withdrawn" + (f" ({reason})" if reason else "")
