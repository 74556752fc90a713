"""Browser sessions: a token presented once, exchanged for an HttpOnly, SameSite=Strict cookie.

The token is checked by the same Authenticator as gRPC metadata, so a desk session may act only as
its own associate on its allowed queues, exactly as an AssociateService stream. Each session carries a
CSRF token the page sends back in a header on every state change; a cross-site page can read neither.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Literal

from ..api.auth import ADMIN_ROLES, Authenticator, Principal
from ..core.errors import InvalidInput, PermissionDenied, Unauthenticated
from ..core.model import AssociateSignIn

__all__ = ["COOKIES", "CSRF_HEADER", "Role", "SessionStore", "WebSession"]

Role = Literal["associate", "admin"]
# One cookie per role, so a person may have the desk and the console open in one browser.
COOKIES: dict[Role, str] = {"associate": "cuepoint_desk", "admin": "cuepoint_console"}
CSRF_HEADER = "X-CSRF-Token"
MAX_SESSIONS = 10_000


@dataclass(slots=True)
class WebSession:
    sid: str
    role: Role
    csrf: str
    expires_at: float
    # For the desk: what the core signs in when the page connects (already checked against the token).
    sign_in: AssociateSignIn | None = None
    # For the console: who signed in (the audit trail's actor) and their admin roles (api/admin_roles.py).
    actor: str = "anonymous"
    roles: frozenset[str] = field(default=ADMIN_ROLES)


class SessionStore:
    def __init__(self, auth: Authenticator | None, *, ttl: float = 12 * 3600) -> None:
        self.auth = auth
        self.ttl = ttl
        self._sessions: dict[str, WebSession] = {}

    def create(self, role: Role, body: dict[str, object], now: float) -> WebSession:
        token = _text(body, "token", 4096)
        sign_in: AssociateSignIn | None = None
        if role == "associate":
            queues = body.get("queues") or []
            if not isinstance(queues, list) or not all(isinstance(q, str) and 0 < len(q) <= 128 for q in queues):
                raise InvalidInput("queues", "a list of queue names")
            request = AssociateSignIn(
                associate_id=_text(body, "associate_id", 128),
                display_name=_text(body, "display_name", 128),
                queues=tuple(queues),
                capacity=1,
                # The desk accepts or declines each engagement itself: the notice with its countdown.
                manual_claim=True,
            )
            if self.auth is not None:
                principal = self._principal(token)
                if principal.kind != "associate" or principal.grant is None:
                    raise PermissionDenied(f"{principal} may not open the associate desk")
                request = AssociateSignIn(
                    associate_id=principal.grant.associate_id,
                    display_name=request.display_name,
                    queues=request.queues,
                    capacity=1,
                    manual_claim=True,
                )
                request = self.auth.check_sign_in(principal, request)
            elif not request.associate_id:
                raise InvalidInput("associate_id", "required while auth is off (the server has no --auth file)")
            sign_in = request
        actor, roles = "anonymous", ADMIN_ROLES
        if role == "admin" and self.auth is not None:
            principal = self._principal(token)
            if principal.kind != "admin":
                raise PermissionDenied(f"{principal} may not open the admin console")
            if principal.apps:
                # The console shows and switches every app at once; an admin of some apps uses AdminService.
                raise PermissionDenied(f"{principal} is limited to some apps; the console shows every app")
            actor, roles = f"admin:{principal.name}", principal.roles
        self._expire(now)
        if len(self._sessions) >= MAX_SESSIONS:
            raise PermissionDenied("too many browser sessions; try again later")
        session = WebSession(
            secrets.token_urlsafe(32), role, secrets.token_urlsafe(32), now + self.ttl, sign_in, actor, roles
        )
        self._sessions[session.sid] = session
        return session

    def _principal(self, token: str) -> Principal:
        assert self.auth is not None
        if not token:
            raise Unauthenticated("token: required")
        return self.auth.identify([("authorization", f"Bearer {token}")])

    def get(self, role: Role, sid: str | None, now: float) -> WebSession | None:
        session = self._sessions.get(sid or "")
        if session is None or session.role != role:
            return None
        if session.expires_at <= now:
            del self._sessions[session.sid]
            return None
        return session

    @staticmethod
    def csrf_ok(session: WebSession, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(session.csrf.encode(), presented.encode())

    def drop(self, session: WebSession) -> None:
        self._sessions.pop(session.sid, None)

    def _expire(self, now: float) -> None:
        for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
            del self._sessions[sid]


def _text(body: dict[str, object], name: str, limit: int) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(name, f"a string of at most {limit} characters")
    return value.strip()
