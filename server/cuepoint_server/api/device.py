"""DeviceService: a thin adapter between one device stream and the core."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import device_pb2, device_pb2_grpc

from ..core.errors import CoreError
from ..core.model import Ack, CueOffer, EngagementUpdate, SessionFailed, Withdrawal
from ..core.service import Core
from ..core.sessions import DeviceOut, DeviceSession
from . import conversation, convert
from .auth import Authenticator, undecodable
from .errors import abort, status_for
from .limits import RateLimiter
from .streams import opening

__all__ = ["DeviceServicer"]

log = structlog.get_logger("cuepoint.api.device")


@dataclass(frozen=True, slots=True)
class _StreamEnd:
    """Put on the outbox by the reader: the client half-closed, or failed."""

    code: grpc.StatusCode | None = None
    message: str = ""
    # When set, the stream ends with this error's rich status (api/errors.py).
    error: CoreError | None = None


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, core: Core, *, auth: Authenticator | None = None, limiter: RateLimiter | None = None) -> None:
        self.core = core
        # None: auth disabled / no rate limits (ServerConfig.auth, ServerConfig.rate_limits).
        self.auth = auth
        self.limiter = limiter

    async def Connect(  # type: ignore[override]  # writes through context, not yield
        self,
        request_iterator: AsyncIterator[device_pb2.DeviceMessage],
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.ServerMessage],
    ) -> None:
        first = await opening(request_iterator, context, kind="hello", type_name="DeviceMessage")
        if first is None:
            return
        try:
            hello = convert.hello_from_proto(first.hello)
            if self.auth is not None:
                # The interceptor checked the key; only the Hello tells which app it is used for.
                self.auth.check_hello(self.auth.identify(context.invocation_metadata()), hello.app_id)
            if self.limiter is not None:
                self.limiter.charge(hello.app_id, hello.device_id)
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
                )
            )
        )
        # Every log line of this stream (and of the core work it causes) names the device and session;
        # grpc.aio runs each call in its own task, so the binding ends with the stream.
        structlog.contextvars.bind_contextvars(device_id=session.device_id, session_id=session.session_id)
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            await self._write(session, context)
        finally:
            reader.cancel()
            await self.core.close_session(session)

    async def _read(self, requests: AsyncIterator[device_pb2.DeviceMessage], session: DeviceSession) -> None:
        outbox: asyncio.Queue[DeviceOut | _StreamEnd] = session.outbox  # type: ignore[assignment]
        try:
            async for message in requests:
                await session.wait_for_room()
                kind = message.WhichOneof("kind")
                if self.limiter is not None:
                    cost = len(message.signals.signals) if kind == "signals" else 1
                    self.limiter.charge(session.app_id, session.device_id, cost)
                if kind == "signals":
                    self.core.ingest(session, convert.batch_from_proto(message.signals))
                elif kind == "cue_response":
                    cue_id, response = convert.response_from_proto(message.cue_response)
                    await self.core.respond(session, cue_id, response)
                elif kind in conversation.DEVICE_KINDS:
                    await conversation.from_device(self.core, session, message)
                else:
                    await outbox.put(
                        _StreamEnd(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected message {kind!r} after hello")
                    )
                    return
        except DecodeError as exc:
            error = undecodable("DeviceMessage", exc)
            log.info("device.rejected", device_id=session.device_id, code="INVALID_ARGUMENT", error=str(error))
            await outbox.put(_StreamEnd(error=error))
            return
        except CoreError as exc:
            code, text = status_for(exc)
            log.info("device.rejected", device_id=session.device_id, code=code.name, error=text)
            await outbox.put(_StreamEnd(code, text, exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream broke under us; nothing to answer
            log.debug("device.read_failed", device_id=session.device_id, exc_info=True)
            await outbox.put(_StreamEnd(grpc.StatusCode.CANCELLED, "stream failed"))
            return
        # Half-closed by the client: ack what it sent before we finish.
        if session.writes:
            await asyncio.gather(*session.writes, return_exceptions=True)
        await outbox.put(_StreamEnd())

    async def _write(
        self,
        session: DeviceSession,
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.ServerMessage],
    ) -> None:
        outbox: asyncio.Queue[DeviceOut | _StreamEnd] = session.outbox  # type: ignore[assignment]
        while True:
            item = await outbox.get()
            if isinstance(item, _StreamEnd):
                # Flush what was queued before the end marker (e.g. final acks).
                while not outbox.empty():
                    extra = outbox.get_nowait()
                    if not isinstance(extra, _StreamEnd):
                        await context.write(_to_proto(extra))
                if item.error is not None:
                    await abort(context, item.error)
                if item.code is not None:
                    await context.abort(item.code, item.message)
                return
            if isinstance(item, SessionFailed):
                await context.abort(grpc.StatusCode.UNAVAILABLE, item.reason)
            if session.closed and not isinstance(item, Ack):
                continue
            await context.write(_to_proto(item))
            session.notify_room()


def _to_proto(item: DeviceOut) -> device_pb2.ServerMessage:
    if isinstance(item, Ack):
        return device_pb2.ServerMessage(ack=convert.ack_to_proto(item))
    if isinstance(item, CueOffer):
        return device_pb2.ServerMessage(cue=convert.cue_to_proto(item))
    if isinstance(item, Withdrawal):
        return device_pb2.ServerMessage(withdrawal=convert.withdrawal_to_proto(item))
    if isinstance(item, EngagementUpdate):
        return device_pb2.ServerMessage(engagement=convert.engagement_update_to_proto(item))
    relayed = conversation.to_device(item)
    if relayed is not None:
        return relayed
    raise TypeError(f"cannot send {type(item).__name__}")
