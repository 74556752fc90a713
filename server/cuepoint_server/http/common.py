"""What every handler shares: the session guard (cookie, CSRF, origin), JSON bodies, error mapping, headers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from ..clock import Clock
from ..core.errors import CoreError, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from .sessions import COOKIES, CSRF_HEADER, Role, SessionStore, WebSession

__all__ = ["SECURITY_HEADERS", "Guard", "errors_as_json", "json_body", "security_headers", "text_field"]

log = structlog.get_logger("cuepoint.http")

# Scripts, styles and connections from this origin only: no inline code, no third party, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "media-src 'self' blob: mediastream:; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Guard:
    def __init__(self, sessions: SessionStore, clock: Clock) -> None:
        self.sessions = sessions
        self.clock = clock

    def session(self, request: web.Request, role: Role, *, csrf: bool = False) -> WebSession:
        """The signed-in session of `role` this request carries; 401 without one, 403 on a bad CSRF token."""
        session = self.sessions.get(role, request.cookies.get(COOKIES[role]), self.clock.now())
        if session is None:
            raise Unauthenticated("sign in first")
        if csrf and not self.sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise PermissionDenied(f"missing or wrong {CSRF_HEADER} header")
        return session

    @staticmethod
    def same_origin(request: web.Request) -> None:
        """Browsers always send Origin on WebSockets and cross-site POSTs: it must be this server."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc != request.host:
            raise PermissionDenied("cross-origin request refused")


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidInput("", "send a JSON object with Content-Type: application/json")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("", f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("", "send a JSON object")
    return body


def text_field(body: dict[str, Any], name: str, limit: int, *, strip: bool = True) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(name, f"a string of at most {limit} characters")
    return value.strip() if strip else value


_STATUS: list[tuple[type[CoreError], int]] = [
    (InvalidInput, 400),
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (ResourceExhausted, 429),
]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors become JSON with the HTTP status matching their gRPC code; no input crashes a handler."""
    try:
        if request.method == "POST":
            Guard.same_origin(request)
        return await handler(request)
    except CoreError as exc:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 503)
        body: dict[str, str] = {"error": str(exc)}
        if isinstance(exc, InvalidInput) and exc.field:
            body["field"] = exc.field
        return web.json_response(body, status=status)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("http.handler_failed", path=request.path)
        return web.json_response({"error": "internal error"}, status=500)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
