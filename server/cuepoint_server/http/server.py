"""The HTTP server: aiohttp on the gRPC server's own event loop, so handlers call the core directly.

Off unless asked (`cuepoint serve --http-port N`, `ServerConfig.http_port`). Serves the two pages
from static/ and the JSON API (README, "The browser desk and console").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from ..api.auth import Authenticator
from ..core.audit import AuditTrail
from ..core.service import Core
from .common import Guard, errors_as_json, json_body, security_headers
from .console import Console, ScenarioStatus
from .desk import RESUME_GRACE, Desk
from .sessions import COOKIES, Role, SessionStore

__all__ = ["HttpServer"]

log = structlog.get_logger("cuepoint.http")

STATIC = Path(__file__).parent / "static"
PAGES = {"/desk/": "desk.html", "/console/": "console.html", "/": "index.html"}


class HttpServer:
    def __init__(
        self,
        core: Core,
        auth: Authenticator | None,
        audit: AuditTrail | None = None,
        *,
        resume_grace: float = RESUME_GRACE,
    ) -> None:
        self.core = core
        self.auth = auth
        self.sessions = SessionStore(auth)
        self.guard = Guard(self.sessions, core.clock)
        self.scenario_status = ScenarioStatus()
        self.desk = Desk(core, self.guard, resume_grace)
        self.console = Console(core, self.guard, self.scenario_status, audit)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.app = self._build()

    def _build(self) -> web.Application:
        # 1 MiB bodies at most: a pasted scenario file or trace, a call set-up message.
        app = web.Application(middlewares=[errors_as_json], client_max_size=1024 * 1024)
        app.on_response_prepare.append(security_headers)
        routes = [
            web.get("/api/config", self.config),
            *[r for role in ("associate", "admin") for r in self._session_routes(role)],
            *self.desk.routes(),
            *self.console.routes(),
            *[web.get(path, self._page(name)) for path, name in PAGES.items()],
            web.get("/desk", self._redirect("/desk/")),
            web.get("/console", self._redirect("/console/")),
        ]
        app.add_routes(routes)
        app.router.add_static("/static/", STATIC, append_version=False)
        return app

    def _session_routes(self, role: Role) -> list[web.RouteDef]:
        base = "/api/desk/session" if role == "associate" else "/api/console/session"

        async def sign_in(request: web.Request) -> web.Response:
            body = await json_body(request)
            session = self.sessions.create(role, body, self.core.clock.now())
            response = web.json_response(self._describe(session.csrf, session.sign_in))
            response.set_cookie(
                COOKIES[role],
                session.sid,
                httponly=True,
                samesite="Strict",
                secure=request.secure,
                path="/",
                max_age=int(self.sessions.ttl),
            )
            log.info("http.signed_in", role=role)
            return response

        async def current(request: web.Request) -> web.Response:
            session = self.guard.session(request, role)
            return web.json_response(self._describe(session.csrf, session.sign_in))

        async def sign_out(request: web.Request) -> web.Response:
            session = self.guard.session(request, role, csrf=True)
            if session.sign_in is not None:
                self.desk.sign_out(session.sid, session.sign_in.associate_id)
            self.sessions.drop(session)
            response = web.json_response({"ok": True})
            response.del_cookie(COOKIES[role], path="/")
            return response

        return [web.post(base, sign_in), web.get(base, current), web.post(f"{base}/sign-out", sign_out)]

    @staticmethod
    def _describe(csrf: str, sign_in: object) -> dict[str, object]:
        out: dict[str, object] = {"csrf": csrf}
        if sign_in is not None:
            out["associate_id"] = getattr(sign_in, "associate_id", "")
            out["queues"] = list(getattr(sign_in, "queues", ()))
        return out

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({"auth": self.auth is not None})

    @staticmethod
    def _page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
        async def page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(STATIC / name)

        return page

    @staticmethod
    def _redirect(to: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(to)

        return redirect

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # the bound socket tells the port when 0 was asked
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("http.started", host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        await self.desk.close()
        await self.console.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
