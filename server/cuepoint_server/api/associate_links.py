"""An associate's stream reaches every replica: engagements of devices anywhere find them (issue 14).

The replica holding the associate's gRPC stream (its home) announces the sign-in on the bus; every other
replica opens a stand-in stream for it, running the same `AssociateServicer` code over the bus instead of a
socket, so its desk routes its own devices' engagements to the associate as if they were signed in there.
What a stand-in writes travels back as the rendered `AssociateEvent` and goes out on the real stream; what
the associate sends goes to the replica that owns the engagement it names (learnt from the events that
named it), or to every replica when it names none (presence). The home re-announces the link on each sweep,
so a replica that starts later (or missed a message) opens its stand-in then, and a stand-in whose home went
quiet for three sweeps signs out, which puts its engagements back in their queues.

What travels between a home and its stand-ins is stored first (core/delivery.py): a stand-in's event is a
row for `link:<link>` (the home's side), a message for a stand-in a row for `stand-in:<link>:<replica>`, an
invitation for a device on another replica a row for `device:<device>`; the bus only wakes the holder, and
the cluster sweep takes what a lost wake-up left. So no offer, chat line or accept is lost with a bus
message, and none arrives twice. The `desk` topic (broadcast: link announced / gone) stays a plain message:
the home re-announces every sweep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.message import Message

from cuepoint.v1 import associate_pb2

from ..core.bus import Bus
from ..core.delivery import Delivery
from ..core.model import Forwarded, SessionFailed
from ..core.service import Core
from ..core.sessions import AssociateSession

__all__ = ["AssociateLinks", "Link"]

log = structlog.get_logger("cuepoint.api.associate_links")

DESK = "desk"
# Seconds a stand-in's slot release waits for what it wrote to be stored (a stuck store holds no slot long).
SETTLE_WAIT = 2.0


def home_recipient(link_id: str) -> str:
    return f"link:{link_id}"


def stand_in_recipient(link_id: str, replica: str) -> str:
    return f"stand-in:{link_id}:{replica}"


def device_recipient(device_id: str) -> str:
    return f"device:{device_id}"


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _b64(message: Message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def engagement_of(message: Message) -> str:
    """The engagement an AssociateMessage or AssociateEvent is about ("" when none)."""
    kind = message.WhichOneof("kind")
    return str(getattr(getattr(message, kind), "engagement_id", "")) if kind else ""


def device_of(message: Message) -> str:
    """The device an invitation (or its result) is for ("" when none): whose data the message carries."""
    kind = message.WhichOneof("kind")
    return str(getattr(getattr(message, kind), "device_id", "")) if kind else ""


@dataclass(eq=False)
class Link:
    """The home's side: one associate stream shared with the other replicas."""

    link_id: str
    associate: AssociateSession
    sign_in: associate_pb2.AssociateMessage
    # engagement id -> the replica that owns it (learnt from its events; from storage once that one is gone).
    owners: dict[str, str] = field(default_factory=dict)
    # Handles a message here as the stream's own reader does (api/associate.py): one the replica it was
    # sent to never took, whose engagement this replica adopted.
    local: Callable[[associate_pb2.AssociateMessage], Awaitable[None]] | None = None


@dataclass(eq=False)
class _StandIn:
    """A remote replica's side: the associate's stream, fed from the bus."""

    link_id: str
    home: str
    inbox: asyncio.Queue[associate_pb2.AssociateMessage | None] = field(default_factory=asyncio.Queue)
    last_heard: float = 0.0
    task: asyncio.Task[None] | None = None


class _StandInContext:
    """What AssociateServicer.Connect needs of a grpc.aio.ServicerContext, writing to the home's outbox rows."""

    def __init__(self, links: AssociateLinks, stand_in: _StandIn) -> None:
        self._links, self._stand_in = links, stand_in
        self._associate: AssociateSession | None = None
        self._writing = 0

    def invocation_metadata(self) -> tuple[()]:
        return ()  # the home checked the credentials; auth is off for stand-ins

    async def write(self, event: associate_pb2.AssociateEvent) -> None:
        if event.WhichOneof("kind") == "signed_in":
            # The home already said so. The session the stand-in signed in: its slots wait for settle().
            self._associate = self._links.core.router.find(event.signed_in.associate_id)
            if self._associate is not None:
                self._associate.settle = self.settle
            return
        engagement_id = engagement_of(event)
        body = {"event": _b64(event), "engagement_id": engagement_id, "replica": self._links.replica}
        await self._to_home(body, engagement_id=engagement_id, device_id=device_of(event))

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        await self._to_home({"failed": details or code.name, "replica": self._links.replica})
        raise _StandInEnded(details)

    async def _to_home(self, body: dict[str, Any], *, engagement_id: str = "", device_id: str = "") -> None:
        self._writing += 1
        try:
            await self._links.delivery.send(
                home_recipient(self._stand_in.link_id),
                _encode(body),
                replica=self._stand_in.home,
                engagement_id=engagement_id,
                device_id=device_id,
            )
        finally:
            self._writing -= 1

    async def settle(self) -> None:
        """Return once everything the desk sent this stand-in so far is stored for the home (the servicer
        takes an item off the outbox and starts writing it without awaiting in between)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + SETTLE_WAIT
        while self._writing or (self._associate is not None and not self._associate.outbox.empty()):
            if loop.time() >= until:
                log.warning("associate.stand_in_settle_slow", link=self._stand_in.link_id)
                return
            await asyncio.sleep(0.005)

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.abort(status.code, status.details)


class _StandInEnded(Exception):
    pass


class AssociateLinks:
    def __init__(self, core: Core, servicer: Any, sweep_every: float = 2.0) -> None:
        """`servicer`: an AssociateServicer without auth (the home authenticated) for the stand-ins."""
        self.core = core
        self.bus: Bus = core.bus
        if core.delivery is None:
            raise ValueError("associate links need the delivery outbox (core.delivery)")
        self.delivery: Delivery = core.delivery
        self._servicer = servicer
        self._sweep_every = sweep_every
        self._links: dict[str, Link] = {}
        self._stand_ins: dict[str, _StandIn] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Replicas named as owners in this replica's links that the last sweep found gone.
        self._gone: set[str] = set()
        # Links whose home announced them closed: an invitation still in the outbox opens no stand-in for them.
        self._closed: deque[str] = deque(maxlen=4096)
        self._announcements_to_drop = self.delivery.faults.announcements_dropped

    @property
    def replica(self) -> str:
        return self.bus.replica_id

    async def start(self) -> None:
        await self.bus.subscribe(DESK, "", self._on_desk)
        # An invitation for a device connected here goes to this replica's stand-in of the inviter's stream.
        self.delivery.hold_by(self._device_receiver)
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

    # -- the home's side ------------------------------------------------------------------------------------

    async def open(self, associate: AssociateSession, sign_in: associate_pb2.AssociateMessage) -> Link:
        link = Link(uuid.uuid4().hex, associate, sign_in)
        self._links[link.link_id] = link
        recipient = home_recipient(link.link_id)

        async def from_stand_in(data: bytes) -> None:
            body = json.loads(data)
            if "moved" in body:
                # An engagement followed its device (core/follow.py): what the associate sends for it goes
                # to the replica holding it now.
                link.owners[str(body["moved"])] = str(body["replica"])
                return
            if "failed" in body:
                associate.send(SessionFailed(str(body["failed"])))
                return
            if body.get("engagement_id"):
                link.owners[str(body["engagement_id"])] = str(body["replica"])
            associate.send(Forwarded(base64.b64decode(body["event"])))

        async def settle() -> None:
            await self.delivery.claim(recipient)

        self.delivery.hold(recipient, from_stand_in)
        associate.settle = settle
        await self._announce(link, "open")
        return link

    async def forward(self, link: Link, message: associate_pb2.AssociateMessage) -> bool:
        """Send `message` to the replica owning its engagement; True when it is not this replica's to handle."""
        engagement_id = engagement_of(message)
        kind = message.WhichOneof("kind")
        if engagement_id and self.core.desk.get(engagement_id) is None:
            owner = link.owners.get(engagement_id)
            if owner in self._gone:
                owner = await self._owner_now(link, engagement_id)  # adopted by another replica since?
            elif not owner:
                # Held here until it followed its device to another replica (core/follow.py): held there now.
                owner = await self.core.holder_of(engagement_id)
            if owner and owner != self.replica:
                await self._to_stand_in(link, owner, message, engagement_id)
                return True
            return False
        if kind == "invite" and not self.core.holds_device(message.invite.device_id):
            return await self._invite_elsewhere(link, message)
        if not engagement_id and kind == "presence":
            # Presence is the associate's, wherever their engagements live: every stand-in takes it too.
            for replica in sorted(await self.core.live_replicas() - {self.replica}):
                await self._to_stand_in(link, replica, message, "")
        return False

    # -- engagements whose owner is gone ---------------------------------------------------------------------

    async def _follow_owners(self) -> None:
        """On each sweep: the engagements of this replica's links whose owner is gone follow their adopter
        (storage's `engagement_owners`), and what the associate sent the gone owner that it never took (a
        claim or reject sent before anyone knew it was gone) goes to the adopter: the offer the adopter keeps
        standing (core/desk_timers.py `adopt`) can be claimed wherever the associate's stream is."""
        named = {owner for link in self._links.values() for owner in link.owners.values()} - {self.replica}
        if not named:
            self._gone = set()
            return
        self._gone = named - await self.core.live_replicas()
        for link in list(self._links.values()):
            for engagement_id, owner in list(link.owners.items()):
                if owner in self._gone:
                    await self._owner_now(link, engagement_id)
            for gone in sorted(self._gone - set(link.owners.values())):
                await self._take_over(link, gone)

    async def _owner_now(self, link: Link, engagement_id: str) -> str:
        """The engagement's owner as storage names it now, remembered when alive (or forgotten when the
        engagement is over); the gone one while nobody adopted it yet."""
        owner = await self.core.store.owner_of(engagement_id)
        if owner == self.replica and self.core.desk.get(engagement_id) is None:
            owner = ""  # being adopted here this moment: asked again on the next message or sweep
        if owner and owner not in self._gone:
            link.owners[engagement_id] = owner
        elif not owner or owner in self._gone:
            record = await self.core.store.get_engagement(engagement_id)
            if record is None or record.state not in ("queued", "assigned", "callback_requested"):
                link.owners.pop(engagement_id, None)
        return link.owners.get(engagement_id, "")

    async def _take_over(self, link: Link, gone: str) -> None:
        """Take the rows left for the gone replica's stand-in of `link` (their engagements all have a live
        owner, or are over) and send each where its engagement lives now."""
        recipient = stand_in_recipient(link.link_id, gone)

        async def receive(data: bytes) -> None:
            message = associate_pb2.AssociateMessage.FromString(base64.b64decode(json.loads(data)["message"]))
            if not engagement_of(message):
                return  # presence: it went to every live replica when it was sent
            if not await self.forward(link, message) and link.local is not None:
                await link.local(message)

        self.delivery.hold(recipient, receive)
        try:
            taken = await self.delivery.claim(recipient)
        finally:
            self.delivery.release(recipient)
        if taken:
            log.info("associate.rerouted", link=link.link_id, gone=gone, messages=taken)

    async def _to_stand_in(
        self, link: Link, replica: str, message: associate_pb2.AssociateMessage, engagement_id: str
    ) -> None:
        body = _encode({"link": link.link_id, "message": _b64(message)})
        recipient = stand_in_recipient(link.link_id, replica)
        await self.delivery.send(recipient, body, replica=replica, engagement_id=engagement_id)

    async def _invite_elsewhere(self, link: Link, message: associate_pb2.AssociateMessage) -> bool:
        """An invitation for a device connected to another replica: that replica's stand-in of this stream
        invites it (its answer comes back like any event). False when no replica holds the device: handled
        here, it is refused as not connected."""
        device_id = message.invite.device_id
        holders, unanswered = await self.core.device_holders(device_id)
        if not holders and not unanswered:
            return False
        # Sure of the one holder: wake only it; else every replica, and whoever holds the device takes it.
        replica = holders[0] if len(holders) == 1 and not unanswered else ""
        # With the sign-in, so the device's replica can open its stand-in of this stream at once when the
        # link's announcement has not reached it yet (it would otherwise have nobody to invite through).
        body = _encode(
            {"link": link.link_id, "message": _b64(message), "home": self.replica, "sign_in": _b64(link.sign_in)}
        )
        await self.delivery.send(device_recipient(device_id), body, replica=replica, device_id=device_id)
        return True

    async def close(self, link: Link) -> None:
        if self._links.pop(link.link_id, None) is None:
            return
        self.delivery.release(home_recipient(link.link_id))
        with contextlib.suppress(Exception):
            await self._announce(link, "closed")

    async def _announce(self, link: Link, state: str) -> None:
        body = {"state": state, "link": link.link_id, "sign_in": _b64(link.sign_in)}
        await self.bus.publish(DESK, "", body)

    # -- a stand-in's side ----------------------------------------------------------------------------------

    async def _on_desk(self, _key: str, body: dict[str, Any]) -> None:
        home, link_id = str(body.get("replica", "")), str(body.get("link", ""))
        if home == self.replica or not link_id:
            return
        if self._announcements_to_drop:
            self._announcements_to_drop -= 1  # test-only (DeliveryFaults.announcements_dropped)
            return
        stand_in = self._stand_ins.get(link_id)
        if body.get("state") == "closed":
            self._closed.append(link_id)
            if stand_in is not None:
                self._end_stand_in(stand_in)
            return
        if stand_in is not None:
            stand_in.last_heard = asyncio.get_running_loop().time()
            return
        self._open_stand_in(link_id, home, str(body["sign_in"]))

    def _open_stand_in(self, link_id: str, home: str, sign_in_b64: str) -> _StandIn:
        sign_in = associate_pb2.AssociateMessage.FromString(base64.b64decode(sign_in_b64))
        stand_in = _StandIn(link_id, home, last_heard=asyncio.get_running_loop().time())
        self._stand_ins[link_id] = stand_in
        self.delivery.hold(stand_in_recipient(link_id, self.replica), lambda data: self._on_message(stand_in, data))
        stand_in.task = asyncio.create_task(self._run(stand_in, sign_in), name=f"cuepoint-stand-in-{link_id}")
        log.info("associate.stand_in", link=link_id, home=home, associate_id=sign_in.sign_in.associate_id)
        return stand_in

    async def _on_message(self, stand_in: _StandIn, data: bytes) -> None:
        body = json.loads(data)
        message = associate_pb2.AssociateMessage.FromString(base64.b64decode(body["message"]))
        engagement_id = engagement_of(message)
        if engagement_id and self.core.desk.get(engagement_id) is None:
            holder = await self.core.holder_of(engagement_id)
            if holder and holder != self.replica:
                await self._moved_on(stand_in, holder, data, engagement_id)
                return
        stand_in.inbox.put_nowait(message)

    async def _moved_on(self, stand_in: _StandIn, holder: str, data: bytes, engagement_id: str) -> None:
        """The engagement a message names followed its device to `holder` (core/follow.py): the message goes
        on to the stand-in there, and the home learns where to send the next ones (after this one is stored,
        so they cannot overtake it)."""
        recipient = stand_in_recipient(stand_in.link_id, holder)
        await self.delivery.send(recipient, data, replica=holder, engagement_id=engagement_id)
        moved = {"moved": engagement_id, "replica": holder}
        await self.delivery.send(home_recipient(stand_in.link_id), _encode(moved), replica=stand_in.home)
        log.info("associate.message_moved_on", engagement_id=engagement_id, to=holder)

    def _device_receiver(self, recipient: str) -> Callable[[bytes], Awaitable[None]] | None:
        kind, _, device_id = recipient.partition(":")
        if kind != "device" or not self.core.holds_device(device_id):
            return None

        async def receive(data: bytes) -> None:
            body = json.loads(data)
            link_id = str(body.get("link", ""))
            stand_in = self._stand_ins.get(link_id)
            if stand_in is None and link_id not in self._closed and body.get("sign_in") and body.get("home"):
                # The link's announcement has not reached this replica yet (it is a plain bus message, repeated
                # every sweep): the invitation carries the sign-in, so the stand-in opens now and invites.
                stand_in = self._open_stand_in(link_id, str(body["home"]), str(body["sign_in"]))
            if stand_in is None:
                # The inviter signed out: nobody to answer.
                log.warning("associate.invitation_unrouted", link=link_id, device_id=device_id)
                return
            await self._on_message(stand_in, data)

        return receive

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
                self.delivery.release(stand_in_recipient(stand_in.link_id, self.replica))

    def _end_stand_in(self, stand_in: _StandIn) -> None:
        stand_in.inbox.put_nowait(None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_every)
            for link in list(self._links.values()):
                with contextlib.suppress(Exception):
                    await self._announce(link, "open")
            try:
                await self._follow_owners()
            except Exception:
                log.warning("associate.follow_owners_failed", exc_info=True)
            for stand_in in list(self._stand_ins.values()):
                if loop.time() - stand_in.last_heard > 3 * self._sweep_every:
                    log.warning("associate.stand_in_expired", link=stand_in.link_id, home=stand_in.home)
                    self._end_stand_in(stand_in)
