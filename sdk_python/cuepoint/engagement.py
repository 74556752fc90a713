"""The device side of one engagement: its updates, chat, upgrades, call signals and fallback.

Returned by ``Client.accept``; it talks to the server through its client's stream.
"""

# ruff: noqa: ASYNC109 -- `timeout=` arguments are part of the public API by design;
# they are applied with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

from cuepoint.v1 import device_pb2

from . import _convert, _validate
from ._conversation import Conversation, Feed, deadline
from ._inbox import InboxClosed
from .errors import (
    ClientClosed,
    CuepointError,
    EngagementClosed,
    InvalidSignal,
    Rejected,
    TimedOut,
)
from .models import (
    CallSignal,
    CallSignalKind,
    Channel,
    ChannelChange,
    ChatMessage,
    ConnectionState,
    Cue,
    EngagementState,
    EngagementUpdate,
    FallbackOffer,
    FallbackOption,
    Party,
    UpgradeRequest,
)

log = logging.getLogger("cuepoint")

CueCallback = Callable[[Cue], object]
"""Called with each new cue; may be a plain function or return an awaitable."""

StateCallback = Callable[[ConnectionState], object]

QueueCallback = Callable[[EngagementUpdate], object]
"""Called with each QUEUED update that tells the position in line or the estimated wait;
may be a plain function or return an awaitable."""
"""Called with each new :class:`ConnectionState`; may be a plain function or return an awaitable."""

# Cues nobody consumed via cues()/next_cue() are kept up to this many; the
# oldest go first because a stale offer is the least useful one to show.

__all__ = ["Engagement", "EngagementItem"]

# Traffic the client routes to an engagement by its id.
EngagementItem: TypeAlias = ChatMessage | UpgradeRequest | ChannelChange | CallSignal | FallbackOffer
# How an engagement writes to its client's stream. The handle is given this
# callable rather than the Client itself, so this module never imports client.py.
SendEngagement: TypeAlias = Callable[[device_pb2.DeviceMessage], Awaitable[None]]


def _random_id() -> str:
    return uuid.uuid4().hex


class Engagement:
    """Handle on the engagement started by :meth:`Client.accept`.

    Everything about the engagement is recorded as it arrives, so ``updates()``,
    ``messages()``, ``channel_changes()`` and ``call_signals()`` replay from the
    first item and no consumer misses one because it started late.

    Methods that send need the engagement id, which the server's first update
    (QUEUED) carries; called before it arrived, they wait for it. Once the
    engagement has ENDED they raise :class:`EngagementClosed` (``end()`` just
    returns). Input is checked locally first and rejected with
    :class:`InvalidSignal`, because the server answers malformed input by
    ending the whole session.
    """

    def __init__(
        self, cue: Cue, *, _send: SendEngagement | None = None, _new_id: Callable[[], str] | None = None
    ) -> None:
        self.cue = cue
        self._sender = _send
        self._updates: Feed[EngagementUpdate] = Feed()
        self._done = False
        self._error: CuepointError | None = None
        self._conversation = Conversation(Party.USER, self._send_payload, _new_id or _random_id)
        self._id_waiters: list[asyncio.Future[str]] = []
        self._fallback: FallbackOffer | None = None
        self._fallback_waiters: list[asyncio.Future[FallbackOffer]] = []
        self._queue_callbacks: list[QueueCallback] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = self.state.name if self.state else "PENDING"
        return f"<Engagement cue={self.cue.cue_id} id={self.engagement_id or '?'} {state}>"

    # --- state ------------------------------------------------------------------

    @property
    def cue_id(self) -> str:
        return self.cue.cue_id

    @property
    def last_update(self) -> EngagementUpdate | None:
        return self._updates.items[-1] if self._updates.items else None

    @property
    def history(self) -> tuple[EngagementUpdate, ...]:
        return tuple(self._updates.items)

    @property
    def engagement_id(self) -> str | None:
        """Known from the server's first update on."""
        return next((u.engagement_id for u in reversed(self._updates.items) if u.engagement_id), None)

    @property
    def state(self) -> EngagementState | None:
        return self._updates.items[-1].state if self._updates.items else None

    @property
    def associate_name(self) -> str:
        return next((u.associate_name for u in reversed(self._updates.items) if u.associate_name), "")

    @property
    def disposition(self) -> str:
        """How it ended (e.g. ``resolved``, ``user_ended``, ``cancelled``); empty until then."""
        return next((u.disposition for u in reversed(self._updates.items) if u.disposition), "")

    @property
    def channel(self) -> Channel | None:
        """The current channel: the last accepted :class:`ChannelChange`, else the server's, else the cue's."""
        if self._conversation.channel is not None:
            return self._conversation.channel
        from_updates = next((u.channel for u in reversed(self._updates.items) if u.channel), None)
        return from_updates or self.cue.channel

    @property
    def queue_position(self) -> int | None:
        """While QUEUED and in line: 1 for the next to be served, 2 behind it, ...; else None."""
        last = self.last_update
        if last is None or last.state is not EngagementState.QUEUED or last.queue_position <= 0:
            return None
        return last.queue_position

    @property
    def estimated_wait(self) -> float | None:
        """While QUEUED: the server's latest estimate of the wait, in seconds; None without one."""
        last = self.last_update
        if last is None or last.state is not EngagementState.QUEUED:
            return None
        return last.estimated_wait

    def on_queue_update(self, callback: QueueCallback) -> Callable[[], None]:
        """Call ``callback`` with each QUEUED update carrying a position or an estimate, as the line moves.

        Returns a function that unregisters it.
        """
        self._queue_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._queue_callbacks.remove(callback)

        return remove

    @property
    def transcript(self) -> tuple[ChatMessage, ...]:
        """The chat so far, in the server's order (both sides, own messages included)."""
        return tuple(self._conversation.messages.items)

    @property
    def fallback_offer(self) -> FallbackOffer | None:
        """The server's fallback offer awaiting the user's choice; None before one and after choosing."""
        return self._fallback

    @property
    def pending_upgrade_requests(self) -> tuple[UpgradeRequest, ...]:
        """Requests from the associate not yet answered (by us) or settled (by the server)."""
        return self._conversation.pending_upgrade_requests

    # --- lifecycle ----------------------------------------------------------------

    def updates(self) -> AsyncIterator[EngagementUpdate]:
        """Every update for this engagement, from the first; ends after ENDED.

        Raises the client's error if the session fails first.
        """
        return self._updates.iterate()

    async def wait_for(self, state: EngagementState, *, timeout: float | None = None) -> EngagementUpdate:
        """The first update at or past ``state`` in the lifecycle QUEUED < ASSIGNED < ENDED.

        Raises :class:`EngagementClosed` if the engagement ends before reaching
        ``state`` (a CALLBACK_REQUESTED update counts as "will not be ASSIGNED"),
        :class:`TimedOut` after ``timeout`` seconds. Waiting for ENDED skips a
        CALLBACK_REQUESTED update; ``wait_for(CALLBACK_REQUESTED)`` returns it.
        """
        inbox = self._updates.subscribe()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    update = await inbox.get()
                    if update.state is None or update.state.rank < state.rank:
                        continue
                    if update.state is EngagementState.ENDED and state is not EngagementState.ENDED:
                        raise EngagementClosed(
                            f"engagement for cue {self.cue_id} ended before reaching {state.name}",
                            update=update,
                        )
                    if update.state is EngagementState.CALLBACK_REQUESTED and state is EngagementState.ASSIGNED:
                        raise EngagementClosed(
                            f"engagement for cue {self.cue_id} became a callback request instead of {state.name}",
                            update=update,
                        )
                    if update.state is EngagementState.CALLBACK_REQUESTED and state is EngagementState.ENDED:
                        continue
                    return update
        except CuepointError:
            raise
        except TimeoutError as exc:
            raise TimedOut(f"engagement for cue {self.cue_id} not {state.name} within {timeout}s") from exc
        except InboxClosed:
            raise ClientClosed(f"client closed before the engagement reached {state.name}") from None
        finally:
            self._updates.unsubscribe(inbox)

    async def end(self) -> None:
        """End the engagement on the user's behalf. Returns once sent; a no-op after ENDED.

        The server confirms with an ENDED update (disposition ``user_ended``);
        use ``wait_for(EngagementState.ENDED)`` to wait for it.
        """
        if self.state is EngagementState.ENDED:
            return
        try:
            engagement_id = await self._ready()
        except EngagementClosed:
            return
        await self._send(_convert.end_by_user(engagement_id))

    # --- chat ---------------------------------------------------------------------

    async def send_chat(self, text: str, *, timeout: float | None = None) -> ChatMessage:
        """Send a chat message; returns the server's relay of it (message_id, sender USER, time).

        The server relays every message to both sides in one order, the
        sender's own included: this resolves on our own echo, matched to the
        oldest unanswered ``send_chat`` with the same text (or the oldest one,
        if the server altered the text). The message also appears in
        :meth:`messages`. ``text`` must be 1-4000 characters, not all blank.
        ``timeout`` covers waiting for the engagement id and the echo.
        """
        text = _validate.chat_text(text)
        async with deadline(timeout, "chat echo from the server"):
            engagement_id = await self._ready()
            return await self._conversation.send_chat(engagement_id, text)

    def messages(self) -> AsyncIterator[ChatMessage]:
        """Every chat message of the engagement (both sides), from the first; ends after ENDED."""
        return self._conversation.messages.iterate()

    # --- channel upgrades -----------------------------------------------------------

    async def request_upgrade(self, channel: Channel, *, timeout: float | None = None) -> ChannelChange:
        """Ask the associate to move the engagement to ``channel``.

        Returns the :class:`ChannelChange` answering this request: ``accepted``
        says whether the associate agreed (False at once when ``channel`` is
        not among the cue's allowed upgrades). :class:`TimedOut` after ``timeout``.
        """
        channel = _validate.channel(channel)
        async with deadline(timeout, f"answer to the {channel.name} upgrade request"):
            engagement_id = await self._ready()
            return await self._conversation.request_upgrade(engagement_id, channel)

    def upgrade_requests(self) -> AsyncIterator[UpgradeRequest]:
        """Upgrade requests from the associate: those still unanswered first, then new ones.

        Answer each with :meth:`respond_upgrade`. Ends after ENDED.
        """
        conversation = self._conversation
        return conversation.upgrade_requests.iterate(replay=conversation.pending_upgrade_requests)

    async def respond_upgrade(self, request: UpgradeRequest, accept: bool) -> None:
        """Accept or decline the associate's upgrade request; returns once sent.

        The outcome arrives as a :class:`ChannelChange` (see :meth:`channel_changes`
        and :attr:`channel`). Raises :class:`Rejected` if it was already answered.
        """
        if not isinstance(request, UpgradeRequest):
            raise InvalidSignal("request must be a cuepoint.UpgradeRequest", field="upgrade_response")
        accept = _validate.flag(accept, "upgrade_response.accepted")
        engagement_id = self.engagement_id
        if engagement_id is not None and request.engagement_id != engagement_id:
            raise InvalidSignal(
                f"upgrade request {request.request_id} belongs to engagement {request.engagement_id}, "
                f"not {engagement_id}",
                field="upgrade_response.engagement_id",
            )
        self._check_open()
        await self._conversation.respond_upgrade(request, accept)

    def channel_changes(self) -> AsyncIterator[ChannelChange]:
        """Every ChannelChange (accepted or not, whoever asked), from the first; ends after ENDED."""
        return self._conversation.channel_changes.iterate()

    # --- call signalling --------------------------------------------------------------

    async def send_call_signal(self, kind: CallSignalKind, payload: bytes) -> None:
        """Relay opaque call-setup data (SDP, ICE, ...) to the associate; returns once sent.

        ``payload`` is at most 64 KiB. Not echoed back.
        """
        kind = _validate.call_signal_kind(kind)
        data = _validate.call_payload(payload)
        engagement_id = await self._ready()
        await self._conversation.send_call_signal(engagement_id, kind, data)

    def call_signals(self) -> AsyncIterator[CallSignal]:
        """Call signals from the associate, from the first; ends after ENDED."""
        return self._conversation.call_signals.iterate()

    # --- fallback ---------------------------------------------------------------------

    async def wait_fallback(self, *, timeout: float | None = None) -> FallbackOffer:
        """The fallback offer awaiting a choice, waiting for one if need be.

        The server sends one when nobody took the engagement within its wait.
        Raises :class:`EngagementClosed` if the engagement ends first and
        :class:`TimedOut` after ``timeout`` (also when an associate took it).
        """
        if self._fallback is not None:
            return self._fallback
        self._check_open()
        future: asyncio.Future[FallbackOffer] = asyncio.get_running_loop().create_future()
        self._fallback_waiters.append(future)
        try:
            async with deadline(timeout, "fallback offer"):
                return await future
        finally:
            with contextlib.suppress(ValueError):
                self._fallback_waiters.remove(future)

    async def choose_fallback(
        self, option: FallbackOption, phone_number: str = "", *, callback_at: float | None = None
    ) -> None:
        """Answer the fallback offer; returns once sent.

        CALLBACK leads to a CALLBACK_REQUESTED update (``phone_number``, at most
        32 characters, is optional; ``callback_at``, epoch seconds, is when to
        call: unset, as soon as someone is free, at most 30 days ahead); the
        server queues the engagement again then, as a callback. CHAT keeps the engagement QUEUED and moves
        it to chat (a SYSTEM :class:`ChannelChange`); CANCEL ends it with
        disposition ``cancelled``. Raises :class:`Rejected` when no offer awaits
        a choice, :class:`InvalidSignal` for an option the offer does not list.
        """
        option = _validate.fallback_option(option)
        phone_number = _validate.phone_number(phone_number)
        self._check_open()
        offer = self._fallback
        if offer is None:
            raise Rejected(f"no fallback offer awaits a choice for the engagement of cue {self.cue_id}")
        if offer.options and option not in offer.options:
            offered = ", ".join(o.name for o in offer.options)
            raise InvalidSignal(
                f"{option.name} is not among the offered options ({offered})", field="fallback_choice.option"
            )
        self._fallback = None
        try:
            await self._send(_convert.fallback_choice(offer.engagement_id, option, phone_number, callback_at))
        except BaseException:
            if self._fallback is None and not self._done:
                self._fallback = offer
            raise

    # --- plumbing -----------------------------------------------------------------------

    async def _ready(self) -> str:
        """The engagement id, once the server's first update brought it."""
        self._check_open()
        engagement_id = self.engagement_id
        if engagement_id is not None:
            return engagement_id
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._id_waiters.append(future)
        try:
            return await future
        finally:
            with contextlib.suppress(ValueError):
                self._id_waiters.remove(future)

    def _check_open(self) -> None:
        if self._sender is None:
            raise ClientClosed("this engagement handle is not attached to a client")
        if self._done:
            raise self._closed_error()

    def _closed_error(self) -> CuepointError:
        last = self.last_update
        if last is not None and last.state is EngagementState.ENDED:
            return EngagementClosed(f"the engagement for cue {self.cue_id} has ended", update=last)
        if isinstance(self._error, Rejected):
            return Rejected(self._error.message, code=self._error.code, details=self._error.details)
        if self._error is not None:
            closed = ClientClosed(f"the session has ended: {self._error}")
            closed.__cause__ = self._error
            return closed
        return ClientClosed("the client was closed")

    async def _send(self, message: device_pb2.DeviceMessage) -> None:
        if self._sender is None:
            raise ClientClosed("this engagement handle is not attached to a client")
        await self._sender(message)

    async def _send_payload(self, payload: _convert.EngagementPayload) -> None:
        await self._send(_convert.device_message(payload))

    def _push(self, update: EngagementUpdate) -> None:
        if self._done:
            return
        self._updates.push(update)
        if update.engagement_id:
            for future in self._id_waiters:
                if not future.done():
                    future.set_result(update.engagement_id)
        if update.state is EngagementState.QUEUED and (update.queue_position or update.estimated_wait is not None):
            self._tell_queue(update)
        if update.state is EngagementState.ENDED:
            self._finish(None)

    def _tell_queue(self, update: EngagementUpdate) -> None:
        for callback in list(self._queue_callbacks):
            try:
                result = callback(update)
            except Exception:
                log.exception("cuepoint: on_queue_update callback failed")
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(_run_queue_callback(result))
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)

    def _receive(self, item: EngagementItem) -> None:
        """Chat, upgrade, call and fallback traffic the client routed here by engagement id."""
        if self._done:
            return
        if isinstance(item, ChatMessage):
            self._conversation.on_chat(item)
        elif isinstance(item, UpgradeRequest):
            self._conversation.on_upgrade_request(item)
        elif isinstance(item, ChannelChange):
            self._conversation.on_channel_change(item)
        elif isinstance(item, CallSignal):
            self._conversation.on_call_signal(item)
        else:
            self._fallback = item
            for future in self._fallback_waiters:
                if not future.done():
                    future.set_result(item)

    def _finish(self, error: CuepointError | None) -> None:
        if self._done:
            return
        self._done, self._error = True, error
        self._fallback = None
        self._updates.finish(error)
        self._conversation.finish(error, self._closed_error)
        waiters: list[asyncio.Future[Any]] = [*self._id_waiters, *self._fallback_waiters]
        for future in waiters:
            if not future.done():
                future.set_exception(error or self._closed_error())


async def _run_queue_callback(result: Awaitable[object]) -> None:
    try:
        await result
    except Exception:
        log.exception("cuepoint: on_queue_update callback failed")
