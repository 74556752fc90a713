"""Privacy operations on stored journeys: export, erasure and retention."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from .core_base import CoreBase, session_record
from .errors import InvalidInput
from .model import Withdrawal
from .sessions import DeviceSession

__all__ = ["Privacy"]

log = structlog.get_logger("cuepoint.core")


class Privacy(CoreBase):
    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        if not user_id:
            raise InvalidInput("user_id", "required")
        return await self.store.export_user(user_id)

    async def erase_user(self, user_id: str) -> dict[str, int]:
        """Delete a user's data from storage and from memory (caps, declines, windows), completely.

        Connected devices of the user are re-keyed first, before anything awaits: from that moment what
        they send is stored under a new anonymous session, never under the erased identity. Then storage
        deletes the user's rows and the pre-sign-in history of their devices, the WAL is checkpointed so
        no erased page stays readable, and ``user.erased`` goes to the privacy listeners (webhooks).
        """
        if not user_id:
            raise InvalidInput("user_id", "required")
        subject = f"user:{user_id}"
        now = self.clock.now()
        rekeyed = [
            session
            for session in list(self._reg.sessions.values())
            if session.subject == subject or session.state.context.get("user.id") == user_id
        ]
        for session in rekeyed:
            self._rekey(session, now)
        devices = {session.device_id for session in rekeyed}
        self.desk.forget_erased(subject, devices)
        await self.drain()
        deleted = await self.store.erase_user(user_id)
        # The new anonymous sessions are stored only now: the erasure deletes every anonymous session of
        # the user's devices it finds, and these begin after it.
        for session in rekeyed:
            self._track(session, self.store.save_session(session_record(session, "", session.started_at)))
        if not await self.store.checkpoint():
            log.warning("user.erase_checkpoint_incomplete")
        self.arbiter.forget(subject)
        self._remembered.forget(subject)
        for device_id in devices:
            self.arbiter.forget(f"device:{device_id}")
            self._remembered.forget(f"device:{device_id}")
        for state in self._reg.states.values():
            if state.context.get("user.id") == user_id:
                state.release()
                state.windows = None
                _strip_user(state.context)
        log.warning("user.erased", rows=sum(deleted.values()), connected_devices=len(devices))
        payload: dict[str, Any] = {"user_id": user_id, "erased_at": now, "deleted": deleted}
        for listener in self.privacy_listeners:
            try:
                listener("user.erased", payload)
            except Exception:
                log.exception("privacy.listener_failed")
        return deleted

    def _rekey(self, session: DeviceSession, now: float) -> None:
        """A new anonymous session on the same stream: the erased identity's session ends here."""
        pending = self._reg.pending.pop(session.device_id, None)
        if pending is not None:
            if pending.expiry is not None:
                pending.expiry.cancel()
            session.send(Withdrawal(pending.offer.cue_id, "erased"))
        session.session_id = uuid.uuid4().hex
        session.subject = f"device:{session.device_id}"
        session.verified_user = ""
        session.started_at = now
        state = session.state
        _strip_user(state.context)
        state.release()
        state.windows = None
        state.new_session()
        log.info("session.rekeyed", device_id=session.device_id, session_id=session.session_id)

    async def purge(self) -> int:
        """Retention: delete journey data older than the configured number of days."""
        if self.config.retention_days is None:
            return 0
        removed = await self.store.purge_journey(self.clock.now() - self.config.retention_days * 86400)
        log.info("journey.purged", signals=removed)
        return removed


def _strip_user(context: dict[str, Any]) -> None:
    for key in [k for k in context if k.startswith("user.")]:
        del context[key]
