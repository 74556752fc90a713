"""The associate desk's handlers: one WebSocket per open desk page is one signed-in associate.

Opening the socket signs the associate in to the core (as an AssociateService stream does). Closing it
detaches them (core/desk_resume.py): a reload or a network blip within the grace period resumes the same
associate with the same engagements, shown again with their chat; after it, or on signing out, they are
signed out and what they held goes back to its queue. Everything the core puts on the associate's outbox
goes to the page as JSON; what the page does comes back as POSTs that call the same core methods the gRPC
servicer calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from ..core.errors import CoreError, InvalidInput
from ..core.model import SessionFailed
from ..core.service import Core
from ..core.sessions import AssociateSession
from . import views
from .common import Guard, json_body, text_field

__all__ = ["Desk"]

log = structlog.get_logger("cuepoint.http.desk")

# The desk's status selector, onto the core's presence: wrap-up and offline take no new engagements.
STATUSES = {"available": "available", "busy": "busy", "wrap_up": "busy", "offline": "away"}
CHANNELS = ("audio", "screen_share", "chat", "video")
CALL_KINDS = ("offer", "answer", "candidate", "hangup")
COUNTS_EVERY = 1.0
# How long a desk whose page went away keeps its associate signed in, with their engagements.
RESUME_GRACE = 30.0


@dataclass(slots=True)
class _Open:
    associate: AssociateSession
    ws: web.WebSocketResponse
    status: str = "available"
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Another page of the same browser session took this associate over: closing this one changes nothing.
    handed_over: bool = False
    # Signed out from the page: no grace period.
    signed_out: bool = False


class Desk:
    def __init__(self, core: Core, guard: Guard, resume_grace: float = RESUME_GRACE) -> None:
        self.core = core
        self.guard = guard
        self.resume_grace = resume_grace
        self._open: dict[str, _Open] = {}
        # The status each associate last chose on the desk, shown again when their session resumes.
        self._status: dict[str, str] = {}
        self._closing = False

    def routes(self) -> list[web.RouteDef]:
        e = "/api/desk/engagements/{engagement_id}"
        return [
            web.get("/api/desk/ws", self.socket),
            web.post("/api/desk/status", self.status),
            web.post(f"{e}/accept", self.accept),
            web.post(f"{e}/decline", self.decline),
            web.post(f"{e}/chat", self.chat),
            web.post(f"{e}/upgrade", self.upgrade),
            web.post(f"{e}/upgrade-response", self.upgrade_response),
            web.post(f"{e}/call-signal", self.call_signal),
            web.post(f"{e}/wrap-up", self.wrap_up),
        ]

    async def close(self) -> None:
        self._closing = True
        for desk in list(self._open.values()):
            await desk.ws.close()

    def sign_out(self, sid: str, associate_id: str) -> None:
        """The page signed out: the associate leaves now, whether their page is open or just went away."""
        desk = self._open.get(sid)
        if desk is not None:
            desk.signed_out = True
        else:
            detached = self.core.desk.resume(associate_id, ())
            if detached is not None:
                self.core.sign_out(detached)
        self._status.pop(associate_id, None)

    # -- the live channel -----------------------------------------------------------------

    async def socket(self, request: web.Request) -> web.StreamResponse:
        session = self.guard.session(request, "associate")
        self.guard.same_origin(request)
        assert session.sign_in is not None
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        sign_in = session.sign_in
        associate: AssociateSession | None = None
        previous = self._open.pop(session.sid, None)
        if previous is not None:
            # The same browser session opened the desk again while the old page was still connected
            # (a second tab, or a reload seen before the old socket closed): this page takes it over.
            previous.handed_over = True
            for task in previous.tasks:
                task.cancel()
            await previous.ws.close(message=b"opened elsewhere")
            associate = previous.associate
        else:
            # Back within the grace period (a reload, a network blip): the same associate, same engagements.
            associate = self.core.desk.resume(sign_in.associate_id, sign_in.queues)
        resumed = associate is not None
        if associate is None:
            try:
                associate = self.core.sign_in(sign_in)
            except CoreError as exc:
                await ws.send_json({"type": "error", "error": str(exc)})
                await ws.close()
                return ws
            self._status[associate.associate_id] = "available"
        desk = _Open(associate, ws, self._status.get(associate.associate_id, "available"))
        self._open[session.sid] = desk
        try:
            await ws.send_json(
                {
                    "type": "signed_in",
                    "associate_id": associate.associate_id,
                    "display_name": associate.display_name,
                    "queues": list(associate.queues),
                    "status": desk.status,
                    "resumed": resumed,
                    "queue_config": {
                        q: views.queue_config(self.core.engine.scenarios.routing, q) for q in associate.queues
                    },
                }
            )
            if resumed:
                await self._show_again(desk)
            desk.tasks = [asyncio.create_task(self._forward(desk)), asyncio.create_task(self._counts(desk))]
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data == "ping":
                    await ws.send_str("pong")
        finally:
            for task in desk.tasks:
                task.cancel()
            if not desk.handed_over:
                if self._open.get(session.sid) is desk:
                    del self._open[session.sid]
                if desk.signed_out or self._closing:
                    self.core.sign_out(associate)
                else:
                    self.core.desk.detach(associate, self.resume_grace)
        return ws

    async def _show_again(self, desk: _Open) -> None:
        """A resumed desk: what the associate holds (with its chat so far), then offers waiting for them."""
        routing, now = self.core.engine.scenarios.routing, self.core.clock.now()
        for item in self.core.desk.holding(desk.associate):
            event = views.associate_event(item, routing, now)
            if event is not None:
                await desk.ws.send_json(event)
        self.core.desk.after_resume(desk.associate)

    async def _forward(self, desk: _Open) -> None:
        with contextlib.suppress(ConnectionResetError):
            while True:
                item = await desk.associate.outbox.get()
                if isinstance(item, SessionFailed):
                    await desk.ws.send_json({"type": "error", "error": item.reason or "session ended"})
                    await desk.ws.close()
                    return
                event = views.associate_event(item, self.core.engine.scenarios.routing, self.core.clock.now())
                if event is not None:
                    await desk.ws.send_json(event)

    async def _counts(self, desk: _Open) -> None:
        """The queues this associate serves, with waiting engagements and free associates, every second."""
        last: Any = None
        with contextlib.suppress(ConnectionResetError):
            while not desk.ws.closed:
                mine = set(desk.associate.queues)
                counts = [
                    {
                        "queue": q.queue,
                        "waiting": q.waiting,
                        "longest_wait": round(q.longest_wait),
                        "associates": q.associates,
                        "available": q.available,
                    }
                    for q in self.core.queue_loads()
                    if q.queue in mine
                ]
                if counts != last:
                    await desk.ws.send_json({"type": "queues", "queues": counts})
                    last = counts
                await asyncio.sleep(COUNTS_EVERY)

    # -- what the associate does ------------------------------------------------------------

    def _desk(self, request: web.Request) -> _Open:
        session = self.guard.session(request, "associate", csrf=True)
        desk = self._open.get(session.sid)
        if desk is None:
            raise web.HTTPConflict(
                text='{"error": "the desk is not connected: open /desk/ first"}', content_type="application/json"
            )
        return desk

    async def status(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        status = text_field(body, "status", 32)
        if status not in STATUSES:
            raise InvalidInput("status", f"one of {', '.join(STATUSES)}")
        self.core.desk.set_presence(desk.associate, STATUSES[status])
        desk.status = self._status[desk.associate.associate_id] = status
        return web.json_response({"status": status})

    async def accept(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        self.core.desk.claim(desk.associate, request.match_info["engagement_id"])
        return web.json_response({"ok": True})

    async def decline(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        reason = text_field(body, "reason", 200)
        self.core.desk.reject(desk.associate, request.match_info["engagement_id"], reason)
        return web.json_response({"ok": True})

    async def chat(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        engagement = self.core.desk.associate_engagement(desk.associate, request.match_info["engagement_id"])
        await self.core.desk.chat("associate", engagement, text_field(body, "text", 4000, strip=False))
        return web.json_response({"ok": True})

    async def upgrade(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        channel = text_field(body, "channel", 32)
        if channel not in CHANNELS:
            raise InvalidInput("channel", f"one of {', '.join(CHANNELS)}")
        engagement = self.core.desk.associate_engagement(desk.associate, request.match_info["engagement_id"])
        request_id = uuid.uuid4().hex
        self.core.desk.request_upgrade("associate", engagement, request_id, channel)
        return web.json_response({"request_id": request_id})

    async def upgrade_response(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        accepted = body.get("accepted")
        if not isinstance(accepted, bool):
            raise InvalidInput("accepted", "true or false")
        engagement = self.core.desk.associate_engagement(desk.associate, request.match_info["engagement_id"])
        self.core.desk.respond_upgrade("associate", engagement, text_field(body, "request_id", 64), accepted)
        return web.json_response({"ok": True})

    async def call_signal(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        kind = text_field(body, "kind", 16)
        if kind not in CALL_KINDS:
            raise InvalidInput("kind", f"one of {', '.join(CALL_KINDS)}")
        engagement = self.core.desk.associate_engagement(desk.associate, request.match_info["engagement_id"])
        payload = text_field(body, "payload", 64 * 1024, strip=False).encode("utf-8")
        self.core.desk.call_signal("associate", engagement, kind, payload)
        return web.json_response({"ok": True})

    async def wrap_up(self, request: web.Request) -> web.Response:
        desk = self._desk(request)
        body = await json_body(request)
        await self.core.end_engagement(
            desk.associate,
            request.match_info["engagement_id"],
            text_field(body, "disposition", 64),
            text_field(body, "notes", 4000, strip=False),
            text_field(body, "outcome", 64),
        )
        return web.json_response({"ok": True})
