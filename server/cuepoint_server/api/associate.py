"""AssociateService: a thin adapter between one associate stream and the core."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
import structlog
from google.protobuf.message import DecodeError

from cuepoint.v1 import associate_pb2, associate_pb2_grpc

from ..core.errors import CoreError
from ..core.model import EngagementEnded, EngagementView, Forwarded, SessionFailed
from ..core.service import Core
from ..core.sessions import AssociateSession
from . import conversation, convert
from .associate_links import AssociateLinks, Link
from .auth import Authenticator, undecodable
from .errors import abort, status_for
from .streams import opening

__all__ = ["AssociateServicer"]

log = structlog.get_logger("cuepoint.api.associate")

Context: TypeAlias = grpc.aio.ServicerContext[associate_pb2.AssociateMessage, associate_pb2.AssociateEvent]


class AssociateServicer(associate_pb2_grpc.AssociateServiceServicer):
    def __init__(
        self,
        core: Core,
        *,
        auth: Authenticator | None = None,
        sign_in_timeout: float | None = 10.0,
        links: AssociateLinks | None = None,
    ) -> None:
        self.core = core
        # Several replicas: the stream is shared with the others' desks (api/associate_links.py).
        self.links = links
        self.auth = auth  # None: auth disabled
        # Like a device's Hello: a stream that never signs in holds server memory for nothing.
        self.sign_in_timeout = sign_in_timeout

    async def Connect(  # type: ignore[override]  # writes through context, not yield
        self, request_iterator: AsyncIterator[associate_pb2.AssociateMessage], context: Context
    ) -> None:
        first = await opening(
            context,
            associate_pb2.AssociateMessage,
            kind="sign_in",
            deadline=self.sign_in_timeout,
            requests=request_iterator,
        )
        if first is None:
            return
        try:
            request = convert.sign_in_from_proto(first.sign_in)
            if self.auth is not None:
                # Own associate id only, allowed queues only: engagements of other queues never reach it.
                request = self.auth.check_sign_in(self.auth.identify(context.invocation_metadata()), request)
            associate = self.core.sign_in(request)
        except CoreError as exc:
            await abort(context, exc)
        await context.write(
            associate_pb2.AssociateEvent(
                signed_in=associate_pb2.SignedIn(associate_id=associate.associate_id, queues=associate.queues)
            )
        )
        # Every log line of this stream names the associate (each call runs in its own task).
        structlog.contextvars.bind_contextvars(associate_id=associate.associate_id)
        link = await self._link(associate, first)
        reader = asyncio.create_task(self._read(request_iterator, associate, link))
        try:
            while True:
                item = await associate.outbox.get()
                if isinstance(item, SessionFailed):
                    if isinstance(item.error, CoreError):
                        await abort(context, item.error)
                    if not item.reason:
                        return
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.reason)
                if isinstance(item, Forwarded):
                    await context.write(associate_pb2.AssociateEvent.FromString(item.data))
                elif isinstance(item, EngagementView):
                    await context.write(associate_pb2.AssociateEvent(assigned=convert.engagement_to_proto(item)))
                elif isinstance(item, EngagementEnded):
                    await context.write(associate_pb2.AssociateEvent(ended=convert.engagement_ended_to_proto(item)))
                elif (relayed := conversation.to_associate(item)) is not None:
                    await context.write(relayed)
        finally:
            reader.cancel()
            self.core.sign_out(associate)
            if link is not None and self.links is not None:
                await self.links.close(link)

    async def _link(self, associate: AssociateSession, first: associate_pb2.AssociateMessage) -> Link | None:
        if self.links is None:
            return None
        shared = associate_pb2.AssociateMessage()
        shared.CopyFrom(first)
        # As signed in here, after the credentials' grants (which may have chosen the queues).
        del shared.sign_in.queues[:]
        shared.sign_in.queues.extend(associate.queues)
        link = await self.links.open(associate, shared)

        async def local(message: associate_pb2.AssociateMessage) -> None:
            if not await self._handle(associate, message):
                log.info("associate.rerouted_unexpected", associate_id=associate.associate_id)

        link.local = local
        return link

    async def _handle(self, associate: AssociateSession, message: associate_pb2.AssociateMessage) -> bool:
        """Act on one message of the associate's (False: not one a signed-in stream sends)."""
        kind = message.WhichOneof("kind")
        if kind == "end":
            end = message.end
            await self.core.end_engagement(associate, end.engagement_id, end.disposition, end.notes, end.outcome)
        elif kind in conversation.ASSOCIATE_KINDS:
            await conversation.from_associate(self.core, associate, message)
        else:
            return False
        return True

    async def _read(
        self,
        requests: AsyncIterator[associate_pb2.AssociateMessage],
        associate: AssociateSession,
        link: Link | None = None,
    ) -> None:
        try:
            async for message in requests:
                if link is not None and self.links is not None and await self.links.forward(link, message):
                    continue  # another replica's engagement: its stand-in of this stream acts on it
                if not await self._handle(associate, message):
                    associate.outbox.put_nowait(SessionFailed("unexpected message after sign_in"))
                    return
        except DecodeError as exc:
            associate.outbox.put_nowait(SessionFailed(str(undecodable("AssociateMessage", exc))))
            return
        except CoreError as exc:
            _, text = status_for(exc)
            log.info("associate.rejected", associate_id=associate.associate_id, error=text)
            associate.outbox.put_nowait(SessionFailed(text, exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("associate.read_failed", associate_id=associate.associate_id, exc_info=True)
        associate.outbox.put_nowait(SessionFailed(""))
