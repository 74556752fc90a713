"""An associate's stream reaches every replica: engagements of devices anywhere find them (issue 14).

The replica holding the associate's gRPC stream (its home) announces the sign-in on the bus; every other
replica opens a stand-in stream for it, running the same `AssociateServicer` code over the bus instead of a
socket, so its desk routes its own devices' engagements to the associate as if they were signed in there.
What a stand-in writes travels back as the rendered `AssociateEvent` and goes out on the real stream; what
the associate sends goes to the replica that owns the engagement it names (learnt from the events that
named it), or to every replica when it names none (presence). The home re-announces the link on each sweep,
so a replica that starts later (or missed a message) opens its stand-in then, and a stand-in whose home went
quiet for three sweeps signs out, which puts its engagements back in their queues.

Topics: `desk` (broadcast: link announced / gone), `assoc-in.<replica>` (a message for that replica's
stand-in), `assoc-out.<link>` (an event for the home).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.message import Message

from cuepoint.v1 import associate_pb2

from ..core.bus import Bus
from ..core.model import Forwarded, SessionFailed
from ..core.service import Core
from ..core.sessions import AssociateSession

__all__ = ["AssociateLinks", "Link"]

log = structlog.get_logger("cuepoint.api.associate_links")

DESK, TO_STAND_IN, TO_HOME = "desk", "assoc-in", "assoc-out"


def _b64(message: Message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def engagement_of(message: Message) -> str:
    """The engagement an AssociateMessage or AssociateEvent is about ("" when none)."""
    kind = message.WhichOneof("kind")
    return str(getattr(getattr(message, kind), "engagement_id", "")) if kind else ""


@dataclass(eq=False)
class Link:
    """The home's side: one associate stream shared with the other replicas."""

    link_id: str
    associate: AssociateSession
    sign_in: associate_pb2.AssociateMessage
    # engagement id -> the replica that owns it (learnt from its events).
    owners: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _StandIn:
    """A remote replica's side: the associate's stream, fed from the bus."""

    link_id: str
    home: str
    inbox: asyncio.Queue[associate_pb2.AssociateMessage | None] = field(default_factory=asyncio.Queue)
    last_heard: float = 0.0
    task: asyncio.Task[None] | None = None


class _StandInContext:
    """What AssociateServicer.Connect needs of a grpc.aio.ServicerContext, writing to the bus."""

    def __init__(self, links: AssociateLinks, stand_in: _StandIn) -> None:
        self._links, self._stand_in = links, stand_in

    def invocation_metadata(self) -> tuple[()]:
        return ()  # the home checked the credentials; auth is off for stand-ins

    async def write(self, event: associate_pb2.AssociateEvent) -> None:
        if event.WhichOneof("kind") == "signed_in":
            return  # the home already said so
        body = {"event": _b64(event), "engagement_id": engagement_of(event)}
        await self._links.bus.publish(TO_HOME, self._stand_in.link_id, body)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        await self._links.bus.publish(TO_HOME, self._stand_in.link_id, {"failed": details or code.name})
        raise _StandInEnded(details)

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.abort(status.code, status.details)


class _StandInEnded(Exception):
    pass


class AssociateLinks:
    def __init__(self, core: Core, servicer: Any, sweep_every: float = 2.0) -> None:
        """`servicer`: an AssociateServicer without auth (the home authenticated) for the stand-ins."""
        self.core = core
        self.bus: Bus = core.bus
        self._servicer = servicer
        self._sweep_every = sweep_every
        self._links: dict[str, Link] = {}
        self._stand_ins: dict[str, _StandIn] = {}
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def replica(self) -> str:
        return self.bus.replica_id

    async def start(self) -> None:
        await self.bus.subscribe(DESK, "", self._on_desk)
        await self.bus.subscribe(TO_STAND_IN, self.replica, self._on_message)
        # Presence broadcasts reach every replica's stand-ins of a link.
        await self.bus.subscribe(TO_STAND_IN, "", self._on_message)
        self._sweeper = asyncio.create_task(self._sweep(), name="cuepoint-associate-links")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for link in list(self._links.values()):
            await self.close(link)
        for stand_in in list(self._stand_ins.values()):
            self._end_stand_in(stand_in)
        tasks = [s.task for s in self._stand_ins.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await self.bus.unsubscribe(DESK, "")
        await self.bus.unsubscribe(TO_STAND_IN, self.replica)
        await self.bus.unsubscribe(TO_STAND_IN, "")

    # -- the home's side ------------------------------------------------------------------------------------

    async def open(self, associate: AssociateSession, sign_in: associate_pb2.AssociateMessage) -> Link:
        link = Link(uuid.uuid4().hex, associate, sign_in)
        self._links[link.link_id] = link

        async def from_stand_in(_key: str, body: dict[str, Any]) -> None:
            if "failed" in body:
                associate.send(SessionFailed(str(body["failed"])))
                return
            if body.get("engagement_id"):
                link.owners[str(body["engagement_id"])] = str(body["replica"])
            associate.send(Forwarded(base64.b64decode(body["event"])))

        await self.bus.subscribe(TO_HOME, link.link_id, from_stand_in)
        await self._announce(link, "open")
        return link

    async def forward(self, link: Link, message: associate_pb2.AssociateMessage) -> bool:
        """Send `message` to the replica owning its engagement; True when it is not this replica's to handle."""
        engagement_id = engagement_of(message)
        if engagement_id and self.core.desk.get(engagement_id) is None:
            owner = link.owners.get(engagement_id)
            if owner and owner != self.replica:
                await self.bus.publish(TO_STAND_IN, owner, {"link": link.link_id, "message": _b64(message)})
                return True
            return False
        if not engagement_id and message.WhichOneof("kind") == "presence":
            # Presence is the associate's, wherever their engagements live: every stand-in takes it too.
            await self.bus.publish(TO_STAND_IN, "", {"link": link.link_id, "message": _b64(message)})
        return False

    async def close(self, link: Link) -> None:
        if self._links.pop(link.link_id, None) is None:
            return
        with contextlib.suppress(Exception):
            await self._announce(link, "closed")
        await self.bus.unsubscribe(TO_HOME, link.link_id)

    async def _announce(self, link: Link, state: str) -> None:
        body = {"state": state, "link": link.link_id, "sign_in": _b64(link.sign_in)}
        await self.bus.publish(DESK, "", body)

    # -- a stand-in's side ----------------------------------------------------------------------------------

    async def _on_desk(self, _key: str, body: dict[str, Any]) -> None:
        home, link_id = str(body.get("replica", "")), str(body.get("link", ""))
        if home == self.replica or not link_id:
            return
        stand_in = self._stand_ins.get(link_id)
        if body.get("state") == "closed":
            if stand_in is not None:
                self._end_stand_in(stand_in)
            return
        now = asyncio.get_running_loop().time()
        if stand_in is not None:
            stand_in.last_heard = now
            return
        sign_in = associate_pb2.AssociateMessage.FromString(base64.b64decode(body["sign_in"]))
        stand_in = _StandIn(link_id, home, last_heard=now)
        self._stand_ins[link_id] = stand_in
        stand_in.task = asyncio.create_task(self._run(stand_in, sign_in), name=f"cuepoint-stand-in-{link_id}")
        log.info("associate.stand_in", link=link_id, home=home, associate_id=sign_in.sign_in.associate_id)

    async def _on_message(self, _key: str, body: dict[str, Any]) -> None:
        stand_in = self._stand_ins.get(str(body.get("link", "")))
        if stand_in is None or body.get("replica") == self.replica:
            return
        stand_in.inbox.put_nowait(associate_pb2.AssociateMessage.FromString(base64.b64decode(body["message"])))

    async def _run(self, stand_in: _StandIn, sign_in: associate_pb2.AssociateMessage) -> None:
        async def requests() -> AsyncIterator[associate_pb2.AssociateMessage]:
            yield sign_in
            while (message := await stand_in.inbox.get()) is not None:
                yield message

        try:
            await self._servicer.Connect(requests(), _StandInContext(self, stand_in))
        except _StandInEnded:
            pass
        except Exception:
            log.exception("associate.stand_in_failed", link=stand_in.link_id)
        finally:
            if self._stand_ins.get(stand_in.link_id) is stand_in:
                del self._stand_ins[stand_in.link_id]

    def _end_stand_in(self, stand_in: _StandIn) -> None:
        stand_in.inbox.put_nowait(None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_every)
            for link in list(self._links.values()):
                with contextlib.suppress(Exception):
                    await self._announce(link, "open")
            for stand_in in list(self._stand_ins.values()):
                if loop.time() - stand_in.last_heard > 3 * self._sweep_every:
                    log.warning("associate.stand_in_expired", link=stand_in.link_id, home=stand_in.home)
                    self._end_stand_in(stand_in)
