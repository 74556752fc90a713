"""DeviceService: a thin adapter between one device stream and the core."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import device_pb2, device_pb2_grpc

from ..core.errors import CoreError
from ..core.model import Ack, CueOffer, EngagementUpdate, SessionFailed, UserVerified, Withdrawal
from ..core.service import Core
from ..core.sessions import DeviceOut, DeviceSession
from ..core.validation import validate_hello
from . import conversation, convert
from .auth import Authenticator, undecodable
from .errors import abort, status_for
from .limits import RateLimiter
from .streams import opening

__all__ = ["DeviceServicer"]

log = structlog.get_logger("cuepoint.api.device")

# A grouped ack message (ServerMessage.acks) stops taking more acks once it names this many signal ids: with
# ids of up to 64 characters and a batch's 500 signals, a message stays far below a client's default 4 MiB.
ACK_GROUP_IDS = 2048


@dataclass(frozen=True, slots=True)
class _StreamEnd:
    """How reading the device's stream ended: the client half-closed (no code), or failed."""

    code: grpc.StatusCode | None = None
    message: str = ""
    # When set, the stream ends with this error's rich status (api/errors.py).
    error: CoreError | None = None


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(
        self,
        core: Core,
        *,
        auth: Authenticator | None = None,
        limiter: RateLimiter | None = None,
        hello_timeout: float | None = 10.0,
    ) -> None:
        self.core = core
        self.hello_timeout = hello_timeout
        # None: auth disabled / no rate limits (ServerConfig.auth, ServerConfig.rate_limits).
        self.auth = auth
        self.limiter = limiter

    async def Connect(  # type: ignore[override]  # writes through context, not yield
        self,
        request_iterator: AsyncIterator[device_pb2.DeviceMessage],
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.ServerMessage],
    ) -> None:
        # The client's IP, resolved once per stream, as the per-peer budgets know it (None: exempt or off).
        peer = self.limiter.peer_key(context.peer()) if self.limiter is not None else None
        opened = await self._open(context, peer)
        if opened is None:
            return
        session, cue_acks, ack_groups = opened
        # Every log line of this stream (and of the core work it causes) names the device and session;
        # grpc.aio runs each call in its own task, so the binding ends with the stream.
        structlog.contextvars.bind_contextvars(device_id=session.device_id, session_id=session.session_id)
        # One task per stream: this handler reads on while its batches' group commits are in flight (so the
        # next message is decoded and applied meanwhile, and one commit takes several of its batches); acks,
        # put on the outbox once durable, and cues go out from a writer task that exists only while the
        # session's outbox has something to send (_Writer), one per commit round, not one per ack.
        writer = _Writer(session, context, cue_acks, ack_groups)
        end: _StreamEnd | None
        try:
            # The read loop is here, not in a coroutine of its own: an idle stream waits in it, and a second
            # coroutine awaited from this one would cost every idle device its frame (~360 bytes); it reads with
            # context.read(), not `async for` over the requests (grpc.aio's async generator: see opening). The
            # outer try sees the writer's cancel (stopped_reading) wherever it lands, error paths' settle too.
            try:
                try:
                    while (message := await context.read()) is not grpc.aio.EOF:
                        if not session.has_room():
                            await session.wait_for_room()
                        kind = message.WhichOneof("kind")
                        if self.limiter is not None:
                            if kind == "signals":
                                cost = len(message.signals.signals)
                            elif kind == "signal_columns":
                                cost = len(message.signal_columns.times_us)
                            else:
                                cost = 1
                            self.limiter.charge(session.app_id, session.device_id, cost, peer)
                        if kind == "signals":
                            self.core.ingest(session, convert.batch_from_proto(message.signals))
                        elif kind == "signal_columns":
                            self.core.ingest(session, convert.batch_from_columns(message.signal_columns))
                        elif kind == "cue_response":
                            cue_id, response, button_id = convert.response_from_proto(message.cue_response)
                            await self.core.respond(session, cue_id, response, button_id)
                        elif kind == "user_token":
                            self.core.present_user_token(session, message.user_token.token)
                        elif kind in conversation.DEVICE_KINDS:
                            await conversation.from_device(self.core, session, message)
                        else:
                            await self.core.settle(session)
                            end = _StreamEnd(
                                grpc.StatusCode.INVALID_ARGUMENT, f"unexpected message {kind!r} after hello"
                            )
                            break
                    else:
                        # Half-closed by the client: ack what it sent before we finish. Whatever ends a stream
                        # (a rate limit, bad input too), what was stored must be acked first, or an honest SDK
                        # resends all of it.
                        await self.core.settle(session)
                        end = _StreamEnd()
                except DecodeError as exc:
                    error = undecodable("DeviceMessage", exc)
                    log.info("device.rejected", device_id=session.device_id, code="INVALID_ARGUMENT", error=str(error))
                    await self.core.settle(session)
                    end = _StreamEnd(error=error)
                except CoreError as exc:
                    code, text = status_for(exc)
                    log.info("device.rejected", device_id=session.device_id, code=code.name, error=text)
                    await self.core.settle(session)
                    end = _StreamEnd(code, text, exc)
                except Exception:  # the stream broke under us; nothing to answer
                    log.debug("device.read_failed", device_id=session.device_id, exc_info=True)
                    end = _StreamEnd(grpc.StatusCode.CANCELLED, "stream failed")
            except asyncio.CancelledError:
                if not writer.stopped_reading():
                    raise
                end = None
            await writer.finish(end)
        finally:
            writer.stop()
            await self.core.close_session(session)

    async def _open(
        self,
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.ServerMessage],
        peer: str | None = None,
    ) -> tuple[DeviceSession, bool, bool] | None:
        """Read the Hello, open (or resume) the session and answer the Welcome; None if the client left.

        Also whether the client reads ServerMessage.cue_ack and ServerMessage.acks (Hello.accepts_cue_ack,
        Hello.accepts_ack_groups)."""
        first = await opening(context, device_pb2.DeviceMessage, kind="hello", deadline=self.hello_timeout)
        if first is None:
            return None
        try:
            hello = convert.hello_from_proto(first.hello)
            # A malformed Hello is the client's mistake whoever sent it: name the field before judging the key.
            validate_hello(hello)
            if self.auth is not None:
                # The interceptor checked the key; only the Hello tells which app it is used for.
                self.auth.check_hello(self.auth.identify(context.invocation_metadata()), hello.app_id)
            if self.limiter is not None:
                # A new stream: charged to the streams budgets too, so rotating device ids gets nowhere.
                self.limiter.charge_stream(hello.app_id, hello.device_id, peer)
            session = await self.core.open_session(hello)
        except CoreError as exc:
            await abort(context, exc)
        now = Timestamp()
        now.FromNanoseconds(int(self.core.clock.now() * 1e9))
        await context.write(
            device_pb2.ServerMessage(
                welcome=device_pb2.Welcome(
                    session_id=session.session_id,
                    server_time=now,
                    max_signals_per_batch=self.core.config.max_signals_per_batch,
                    device_secret=session.issued_secret,
                    accepts_property_shape=True,
                )
            )
        )
        session.issued_secret = ""
        return session, first.hello.accepts_cue_ack, first.hello.accepts_ack_groups


class _Writer:
    """Sends a session's outbox on its stream, in ``session.send`` order, from a task started on demand.

    ``session.send`` wakes it (``Outbox.listener``); the task writes until the outbox is empty, then
    exits, so an idle device holds one task (the grpc.aio handler, reading) instead of a reader and a
    writer. At most one writer task runs at a time, which keeps the order. If a write fails or the core
    sends SessionFailed, the writer stops and cancels the reading handler, which catches that
    (``stopped_reading``) and ends the stream with ``finish``.

    Acks arrive a commit round at a time (core/group_commit.py), so one writer task writes every ack of
    the round for this stream, in one message if the client reads grouped acks (``_ack_group``). The
    handler does not wait for them: waiting for each batch's commit before reading the next (measured
    2026-12-05, issue 13) left the event loop idle while SQLite committed and gave each commit one batch
    per stream; reading on keeps the client's window of batches in one round.
    """

    __slots__ = ("_ack_groups", "_context", "_cue_acks", "_handler", "_session", "ending", "failure", "task")

    def __init__(
        self,
        session: DeviceSession,
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.ServerMessage],
        cue_acks: bool = False,
        ack_groups: bool = False,
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._session = session
        self._context = context
        # The client reads ServerMessage.cue_ack: a cue and the ack right behind it go as one message (_send).
        self._cue_acks = cue_acks
        # The client reads ServerMessage.acks: the acks one commit round put on the outbox go as one message.
        self._ack_groups = ack_groups
        self._handler = handler
        self.task: asyncio.Task[None] | None = None
        self.failure: SessionFailed | Exception | None = None
        self.ending = False  # the handler flushes and ends the stream itself; no more writer tasks
        # The writer itself is the outbox's listener (__call__): a bound method would cost every idle device
        # 64 bytes more.
        session.outbox.listener = self
        if not session.outbox.empty():  # what open_session queued before the Welcome
            self.wake()

    def wake(self) -> None:
        if self.task is None and not self.ending and self.failure is None:
            # Not the sender's context (another stream's log binding, an admin call's): a fresh one, bound
            # by _drain to this stream. Made here rather than kept from the start, which would cost every
            # idle device a copy of its handler's context.
            self.task = self._handler.get_loop().create_task(self._drain(), context=contextvars.Context())

    __call__ = wake

    async def _drain(self) -> None:
        session = self._session
        structlog.contextvars.bind_contextvars(device_id=session.device_id, session_id=session.session_id)
        outbox = session.outbox
        try:
            while not outbox.empty():
                item = outbox.get_nowait()
                if isinstance(item, SessionFailed):
                    self._fail(item)
                    return
                await self._send(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (or was ended); the handler re-raises it
            self._fail(exc)
        finally:
            self.task = None

    def _fail(self, failure: SessionFailed | Exception) -> None:
        self.failure = failure
        if not self.ending:
            self._handler.cancel()  # stop reading; see stopped_reading

    async def _send(self, item: DeviceOut) -> None:
        session = self._session
        if not session.closed or isinstance(item, Ack):
            if self._cue_acks and isinstance(item, CueOffer) and isinstance(session.outbox.peek(), Ack):
                # A batch that fires a cue puts the cue and then its ack on the outbox together
                # (core/ingest.py, _commit_acked): one write instead of two (issue 13).
                ack = session.outbox.get_nowait()
                assert isinstance(ack, Ack)
                message = device_pb2.ServerMessage(cue=convert.cue_to_proto(item), cue_ack=convert.ack_to_proto(ack))
            elif self._ack_groups and isinstance(item, Ack) and isinstance(session.outbox.peek(), Ack):
                message = device_pb2.ServerMessage(acks=device_pb2.SignalAcks(acks=self._ack_group(item)))
            else:
                message = _to_proto(item)
            await self._context.write(message)
        session.notify_room()

    def _ack_group(self, first: Ack) -> list[device_pb2.SignalAck]:
        """``first`` and the acks right behind it on the outbox, as many as fit in one message (ACK_GROUP_IDS).

        A commit round acks every batch of the stream it stored (core/group_commit.py): with a few batches in
        flight, each write of its own cost the stream more than the acks themselves (bench_ingest.py, one
        signal per batch: 0.52x -> 0.60-0.64x of the echo, issue 13). Only consecutive acks: a cue between two
        acks stays between them."""
        outbox = self._session.outbox
        group = [convert.ack_to_proto(first)]
        ids = len(first.signal_ids)
        while ids < ACK_GROUP_IDS and isinstance(ack := outbox.peek(), Ack):
            outbox.get_nowait()
            group.append(convert.ack_to_proto(ack))
            ids += len(ack.signal_ids)
        return group

    def stopped_reading(self) -> bool:
        """Called with the handler's CancelledError: True if it was only this writer's (then absorbed)."""
        if self.failure is None:
            return False
        return self._handler.uncancel() == 0

    async def finish(self, end: _StreamEnd | None) -> None:
        """End the stream: send what is queued (unless writing failed), then the status ``end`` asks for."""
        self.ending = True
        if end is not None:
            task = self.task
            if task is not None:
                await task
            outbox = self._session.outbox
            while self.failure is None and not outbox.empty():
                item = outbox.get_nowait()
                if isinstance(item, SessionFailed):
                    self.failure = item
                else:
                    await self._send(item)
        failure = self.failure
        if isinstance(failure, SessionFailed):
            await self._context.abort(grpc.StatusCode.UNAVAILABLE, failure.reason)
        elif failure is not None:
            raise failure
        assert end is not None
        if end.error is not None:
            await abort(self._context, end.error)
        if end.code is not None:
            await self._context.abort(end.code, end.message)

    def stop(self) -> None:
        self.ending = True
        self._session.outbox.listener = None
        if self.task is not None:
            self.task.cancel()


def _to_proto(item: DeviceOut) -> device_pb2.ServerMessage:
    if isinstance(item, Ack):
        return device_pb2.ServerMessage(ack=convert.ack_to_proto(item))
    if isinstance(item, CueOffer):
        return device_pb2.ServerMessage(cue=convert.cue_to_proto(item))
    if isinstance(item, Withdrawal):
        return device_pb2.ServerMessage(withdrawal=convert.withdrawal_to_proto(item))
    if isinstance(item, EngagementUpdate):
        return device_pb2.ServerMessage(engagement=convert.engagement_update_to_proto(item))
    if isinstance(item, UserVerified):
        verdict = device_pb2.UserVerification(user_id=item.user_id, verified=item.verified, reason=item.reason)
        return device_pb2.ServerMessage(user_verification=verdict)
    relayed = conversation.to_device(item)
    if relayed is not None:
        return relayed
    raise TypeError(f"cannot send {type(item).__name__}")
