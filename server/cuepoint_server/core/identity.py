"""Who a session's user is: verified by the app backend's token, or only claimed by the device.

A session's subject (``user:<id>`` or ``device:<id>``) is what caps, cooldowns, decline memory, holdouts and
the associate's journey follow. A user id becomes the subject only when it identifies the user: a valid
user token asserted it (core/user_tokens.py), or the server runs without auth, where every id is taken at
its word. Otherwise it is claimed: kept with the device's session, never stitched with another device.
"""

from __future__ import annotations

import structlog

from .core_base import CoreBase
from .model import UserVerified
from .sessions import DeviceSession
from .user_tokens import InvalidUserToken, verify_user_token

__all__ = ["Identity"]

log = structlog.get_logger("cuepoint.core")


class Identity(CoreBase):
    def _verify_token(self, app_id: str, token: str, claimed: str, now: float) -> tuple[str, UserVerified]:
        """(the verified user id or "", the verdict for the device)."""
        try:
            user_id = verify_user_token(self.config.user_token_keys, app_id, token, now)
        except InvalidUserToken as exc:
            log.info("user.token_refused", app_id=app_id, reason=str(exc))
            return "", UserVerified(claimed, False, str(exc))
        return user_id, UserVerified(user_id, True)

    def _identifies(self, user_id: str, verified_user: str, consent: str) -> bool:
        """Whether `user_id` is the session's identity (its subject), not just a claim."""
        if not user_id or consent == "none":
            return False
        return user_id == verified_user or not self.config.enforce_user_tokens

    def _subject(self, session_device_id: str, user_id: str, verified_user: str, consent: str) -> str:
        if self._identifies(user_id, verified_user, consent):
            return f"user:{user_id}"
        return f"device:{session_device_id}"

    def present_user_token(self, session: DeviceSession, token: str) -> None:
        """The app signed its user in (or refreshed the token) mid-session: verify, then identify."""
        now = self.clock.now()
        claimed = str(session.state.context.get("user.id") or "")
        user_id, verdict = self._verify_token(session.app_id, token, claimed, now)
        session.send(verdict)
        if not user_id:
            return
        session.verified_user = user_id
        # The token is the authority on who signed in.
        session.state.context["user.id"] = user_id
        if session.consent != "none":  # without consent no identity is kept (core/consent.py)
            self._identify(session, user_id, now)

    def _identify(self, session: DeviceSession, user_id: str, now: float) -> None:
        raise NotImplementedError  # core/ingest.py
