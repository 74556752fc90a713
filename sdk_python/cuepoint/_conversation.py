"""Chat, channel upgrades and call signalling of one engagement, seen from one side.

The device's :class:`~cuepoint.engagement.Engagement` handle and the
:class:`~cuepoint.associate.AssociateClient` (one per engagement) share this:
both sides speak the same protocol, mirror-imaged, and differ only in how a
payload is wrapped for their stream and which :class:`Party` they are.

How replies are matched, i.e. what the server must honour:

* Chat: the server relays every message of the engagement to both parties,
  the sender's own included, in one order, with the text unchanged. A
  ``send_chat`` registers a pending entry *before* its write; writes on a
  stream are serialised in call order, so own-party echoes come back in send
  order. An echo resolves the oldest pending entry with exactly its text, or,
  when none has it (the server normalised the text), the oldest pending entry.
* Upgrades: a ChannelChange resolves ``request_upgrade`` when its request_id
  is one of ours and its requested_by is our party (or unset, as on an
  immediate refusal). Request ids are SDK-generated and unique, so the other
  side's ids cannot collide in practice; the party check covers the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

from . import _convert
from ._convert import EngagementPayload
from ._inbox import Inbox, drain
from .errors import CuepointError, Rejected, TimedOut
from .models import CallSignal, CallSignalKind, Channel, ChannelChange, ChatMessage, Party, UpgradeRequest

T = TypeVar("T")

Send = Callable[[EngagementPayload], Awaitable[None]]
"""Writes one payload on the owning stream (wrapping it for that stream)."""


# `timeout` carries the public API's timeout= arguments through to asyncio.timeout.
@contextlib.asynccontextmanager
async def deadline(timeout: float | None, what: str) -> AsyncIterator[None]:  # noqa: ASYNC109
    """``asyncio.timeout`` raising :class:`TimedOut` ("no {what} within {timeout}s")."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except CuepointError:
        # Also a failure that is itself a TimedOut: it must not be re-labelled below.
        raise
    except TimeoutError as exc:
        raise TimedOut(f"no {what} within {timeout}s") from exc


class Feed(Generic[T]):
    """Items recorded in arrival order plus live subscribers.

    Each subscriber first gets a replay (everything, unless told otherwise),
    then follows live until :meth:`finish`, after which it drains and ends
    (or raises the error it was finished with).
    """

    def __init__(self) -> None:
        self.items: list[T] = []
        self._subscribers: weakref.WeakSet[Inbox[T]] = weakref.WeakSet()
        self.done = False
        self.error: CuepointError | None = None

    def push(self, item: T) -> None:
        if self.done:
            return
        self.items.append(item)
        for inbox in list(self._subscribers):
            inbox.put(item)

    def finish(self, error: CuepointError | None) -> None:
        if self.done:
            return
        self.done, self.error = True, error
        for inbox in list(self._subscribers):
            inbox.close(error)

    def subscribe(self, replay: Iterable[T] | None = None) -> Inbox[T]:
        inbox: Inbox[T] = Inbox()
        for item in self.items if replay is None else replay:
            inbox.put(item)
        if self.done:
            inbox.close(self.error)
        else:
            self._subscribers.add(inbox)
        return inbox

    def unsubscribe(self, inbox: Inbox[T]) -> None:
        self._subscribers.discard(inbox)

    def iterate(self, replay: Iterable[T] | None = None) -> AsyncIterator[T]:
        return drain(self.subscribe(replay), self._subscribers)


class Conversation:
    """One engagement's live traffic from the point of view of party ``own``.

    ``closed`` builds the error raised by sends once the conversation is
    finished and given to replies still pending when it finishes.
    """

    def __init__(
        self,
        own: Party,
        send: Send,
        new_id: Callable[[], str],
        channel: Channel | None = None,
    ) -> None:
        self.own = own
        self.channel = channel
        self.messages: Feed[ChatMessage] = Feed()
        self.upgrade_requests: Feed[UpgradeRequest] = Feed()
        self.channel_changes: Feed[ChannelChange] = Feed()
        self.call_signals: Feed[CallSignal] = Feed()
        self._send = send
        self._new_id = new_id
        self._echoes: deque[tuple[str, asyncio.Future[ChatMessage]]] = deque()
        self._changes: dict[str, asyncio.Future[ChannelChange]] = {}
        # The other side's requests still awaiting our answer, and those settled.
        self._open_requests: dict[str, UpgradeRequest] = {}
        self._settled: set[str] = set()
        # Message ids heard: after a reconnect the server sends the recent chat again (what was said while
        # the stream was down reached no one), and a line already shown is skipped.
        self._heard: set[str] = set()
        self._closed: Callable[[], CuepointError] | None = None

    @property
    def done(self) -> bool:
        return self._closed is not None

    @property
    def pending_upgrade_requests(self) -> tuple[UpgradeRequest, ...]:
        return tuple(self._open_requests.values())

    # --- inbound ----------------------------------------------------------------

    def on_chat(self, message: ChatMessage) -> None:
        if self.done:
            return
        if message.message_id:
            if message.message_id in self._heard:
                return
            self._heard.add(message.message_id)
        self.messages.push(message)
        if message.sender is self.own:
            self._resolve_echo(message)

    def _resolve_echo(self, message: ChatMessage) -> None:
        if not self._echoes:
            return  # ours, but sent by another connection of the same party
        index = next((i for i, (text, _) in enumerate(self._echoes) if text == message.text), 0)
        _, future = self._echoes[index]
        del self._echoes[index]
        if not future.done():  # a send that timed out leaves a cancelled future
            future.set_result(message)

    def on_upgrade_request(self, request: UpgradeRequest) -> None:
        if self.done or request.request_id in self._open_requests or request.request_id in self._settled:
            return  # asked again after a reconnect (the server repeats what may not have arrived)
        self._open_requests[request.request_id] = request
        self.upgrade_requests.push(request)

    def on_channel_change(self, change: ChannelChange) -> None:
        if self.done:
            return
        if change.accepted and change.channel is not None:
            self.channel = change.channel
        if change.requested_by is not self.own:
            self._open_requests.pop(change.request_id, None)
            if change.request_id:
                self._settled.add(change.request_id)
        if change.requested_by in (self.own, None):
            future = self._changes.pop(change.request_id, None)
            if future is not None and not future.done():
                future.set_result(change)
        self.channel_changes.push(change)

    def on_call_signal(self, signal: CallSignal) -> None:
        if self.done:
            return
        self.call_signals.push(signal)

    # --- outbound (arguments validated by the caller) ------------------------------

    async def send_chat(self, engagement_id: str, text: str) -> ChatMessage:
        self.check_open()
        future: asyncio.Future[ChatMessage] = asyncio.get_running_loop().create_future()
        entry = (text, future)
        # Registered before the write, and nothing awaits in between, so the
        # order of _echoes is the order of the writes on the stream.
        self._echoes.append(entry)
        try:
            await self._send(_convert.chat_message_to_proto(ChatMessage(engagement_id=engagement_id, text=text)))
        except BaseException:
            if entry in self._echoes:
                self._echoes.remove(entry)
            raise
        return await future

    async def request_upgrade(self, engagement_id: str, channel: Channel) -> ChannelChange:
        self.check_open()
        request_id = self._new_id()
        future: asyncio.Future[ChannelChange] = asyncio.get_running_loop().create_future()
        self._changes[request_id] = future
        try:
            request = UpgradeRequest(engagement_id=engagement_id, request_id=request_id, channel=channel)
            await self._send(_convert.upgrade_request_to_proto(request))
            return await future
        finally:
            self._changes.pop(request_id, None)

    async def respond_upgrade(self, request: UpgradeRequest, accept: bool) -> None:
        self.check_open()
        if request.request_id in self._settled:
            raise Rejected(f"upgrade request {request.request_id} was already answered")
        self._settled.add(request.request_id)
        self._open_requests.pop(request.request_id, None)
        await self._send(_convert.upgrade_response_to_proto(request.engagement_id, request.request_id, accept))

    async def send_call_signal(self, engagement_id: str, kind: CallSignalKind, payload: bytes) -> None:
        self.check_open()
        await self._send(_convert.call_signal_to_proto(CallSignal(engagement_id, kind, payload)))

    # --- end ----------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed is not None:
            raise self._closed()

    def finish(self, feed_error: CuepointError | None, closed: Callable[[], CuepointError]) -> None:
        """No more traffic: iterators end (or raise ``feed_error``).

        Pending replies get ``feed_error`` (a session failure), else ``closed()``,
        which later sends raise too.
        """
        if self._closed is not None:
            return
        self._closed = closed
        pending: list[asyncio.Future[Any]] = [f for _, f in self._echoes]
        pending += self._changes.values()
        self._echoes.clear()
        self._changes.clear()
        for future in pending:
            if not future.done():
                future.set_exception(feed_error or closed())
        for feed in (self.messages, self.upgrade_requests, self.channel_changes, self.call_signals):
            feed.finish(feed_error)
