"""The associate client: receive engagements with their context, end them.

Same shape as the device client, minus signals: one stream, a reader task
that dispatches server events, and one failure path (``_fail``) that reaches
every waiter and iterator.

Ordering assumption about the server: SignedIn is the first message.
"""

# ruff: noqa: ASYNC109 -- `timeout=` arguments are part of the public API by design;
# they are applied with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Literal, TypeAlias

from cuepoint.v1 import associate_pb2, associate_pb2_grpc

from . import _convert
from ._inbox import Inbox, drain, get_within
from ._transport import BidiStream
from .config import AssociateConfig
from .errors import ClientClosed, ConnectionLost, CuepointError, InvalidSignal, ServerError, TimedOut
from .models import AssignedEngagement, EngagementEnded

__all__ = ["AssociateClient", "AssociateEvent", "connect_associate"]

log = logging.getLogger("cuepoint")

AssociateEvent: TypeAlias = AssignedEngagement | EngagementEnded
"""What ``AssociateClient.events()`` yields."""

_Stream = BidiStream[associate_pb2.AssociateMessage, associate_pb2.AssociateEvent]
_State = Literal["new", "starting", "open", "closing", "closed"]


async def connect_associate(
    target: str,
    *,
    associate_id: str,
    display_name: str = "",
    queues: Iterable[str] = (),
    capacity: int = 1,
    config: AssociateConfig | None = None,
) -> AssociateClient:
    """Sign an associate in and return the started :class:`AssociateClient`."""
    client = AssociateClient(
        target,
        associate_id=associate_id,
        display_name=display_name,
        queues=queues,
        capacity=capacity,
        config=config,
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
        config: AssociateConfig | None = None,
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
        self._config = config or AssociateConfig()

        self._state: _State = "new"
        self._failure: CuepointError | None = None
        self._stream: _Stream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queues: tuple[str, ...] = ()
        self._active: dict[str, AssignedEngagement] = {}
        self._inbox: Inbox[AssignedEngagement] = Inbox()
        self._subscribers: weakref.WeakSet[Inbox[AssociateEvent]] = weakref.WeakSet()

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
            options=self._config.channel_options,
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
        )
        timeout = self._config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await stream.write(message)
                first = await stream.read()
        except CuepointError:
            raise
        except TimeoutError as exc:
            raise TimedOut(f"no SignedIn from {self._target} within {timeout}s") from exc
        if first is None:
            raise ConnectionLost("the server closed the stream before SignedIn")
        kind = first.WhichOneof("kind")
        if kind != "signed_in":
            raise ServerError(f"expected SignedIn as the first server message, got {kind}")
        return first.signed_in

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
    ) -> None:
        """Ask the server to end an engagement with a wrap-up ``disposition``.

        Returns once sent; the server's EngagementEnded (see :meth:`events`)
        confirms it and removes it from :attr:`active`.
        """
        if self._failure is not None:
            raise ClientClosed(f"the session has ended: {self._failure}") from self._failure
        if self._state != "open":
            raise ClientClosed("the associate client is not open")
        engagement_id = engagement.engagement_id if isinstance(engagement, AssignedEngagement) else engagement
        if not engagement_id:
            raise InvalidSignal("engagement_id must be non-empty", field="end.engagement_id")
        assert self._stream is not None
        try:
            await self._stream.write(_convert.end_engagement(engagement_id, disposition, notes))
        except CuepointError as err:
            self._fail(err)
            raise

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
            engagement = _convert.assigned_engagement_from_proto(message.assigned)
            self._active[engagement.engagement_id] = engagement
            self._inbox.put(engagement)
            self._publish(engagement)
        elif kind == "ended":
            ended = _convert.engagement_ended_from_proto(message.ended)
            self._active.pop(ended.engagement_id, None)
            # Not yet picked up and already over: nothing left to handle.
            self._inbox.discard(lambda e: e.engagement_id == ended.engagement_id)
            self._publish(ended)
        else:
            log.debug("cuepoint: ignoring associate event of kind %r", kind)

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
        for inbox in list(self._subscribers):
            inbox.close(error)
