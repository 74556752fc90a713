"""Device sessions: opening (fresh or resumed within the window), replacing and closing them."""

from __future__ import annotations

import uuid

import structlog

from ..engine.state import DeviceState
from ..storage import SessionRecord
from .core_base import session_record
from .device_credentials import DeviceCredentials
from .ingest import Ingest
from .model import (
    Hello,
    Withdrawal,
)
from .sessions import DeviceSession
from .validation import validate_hello

__all__ = ["SessionLifecycle"]

log = structlog.get_logger("cuepoint.core")


class SessionLifecycle(Ingest, DeviceCredentials):
    async def open_session(self, hello: Hello) -> DeviceSession:
        validate_hello(hello)
        now = self.clock.now()
        # First, before anything of the device is touched: a Hello refused here never reaches its session.
        issued_secret = await self._admit_device(hello, now)
        # Back: timers and cues are its live session's again.
        self._reg.away.pop(hello.device_id, None)
        state = self._reg.states.get(hello.device_id)
        if state is None:
            state = self._reg.states[hello.device_id] = DeviceState(hello.device_id, hello.app_id)
            # First sight of this device in this process (e.g. after a restart): windows
            # and de-duplication resume from what storage holds.
            await self._restore_state(state, now)
        # The hello carries the whole context; it replaces what we had.
        state.app_id = hello.app_id
        state.context = {**hello.context, "app.id": hello.app_id, "consent": hello.consent}
        resumed = await self._resumable(hello, now)
        if resumed is None:
            state.new_session()
        user_id = str(hello.context.get("user.id") or "")
        verified_user, verdict = "", None
        if hello.user_token:
            verified_user, verdict = self._verify_token(hello.app_id, hello.user_token, user_id, now)
            if verified_user:
                # The token is the authority on who signed in.
                user_id = state.context["user.id"] = verified_user
        subject = self._subject(hello.device_id, user_id, verified_user, hello.consent)
        session = DeviceSession(
            session_id=resumed.session_id if resumed else uuid.uuid4().hex,
            app_id=hello.app_id,
            device_id=hello.device_id,
            subject=subject,
            consent=hello.consent,
            state=state,
            started_at=now,
            issued_secret=issued_secret,
            verified_user=verified_user,
        )
        await self.store.save_session(
            session_record(session, user_id if hello.consent != "none" else "", resumed.started_at if resumed else now)
        )
        await self._restore_memory(subject)
        previous = self._reg.sessions.get(hello.device_id)
        if previous is not None:
            previous.closed = True
        self._reg.sessions[hello.device_id] = session
        if verdict is not None:
            session.send(verdict)
        await self._start_scoring(session)
        pending = self._reg.pending.get(hello.device_id) or await self._restore_cue(session, now)
        if pending is not None:
            session.send(pending.offer)
        # An engagement accepted before a reconnect (or a restart) answers the device again.
        self.desk.resume_device(session)
        await self.desk.tell_ended(session, hello.engaged_cue_ids)
        # Held by another replica: it moves here, the replica the device talks to (core/follow.py).
        self.follow_device(session)
        if resumed is not None:
            # Offers settled while the device was away (expired, withdrawn) may
            # still be on its screen: withdraw them again on the new stream.
            for cue in await self.store.cues_for_session(session.session_id):
                if cue.status in ("expired", "withdrawn"):
                    session.send(Withdrawal(cue.cue_id, cue.status))
        # A hello sets the whole context: scenarios whose trigger reads it are evaluated (segment entry fires).
        self._on_context(session, None, now, now)
        self._schedule_timer(session.device_id, now)
        log.info("session.opened", session_id=session.session_id, device_id=hello.device_id, app_id=hello.app_id)
        return session

    async def _resumable(self, hello: Hello, now: float) -> SessionRecord | None:
        """The earlier session a reconnecting device may continue, if it ended recently."""
        if not hello.resume_session_id:
            return None
        record = await self.store.get_session(hello.resume_session_id)
        if record is None or record.device_id != hello.device_id or record.app_id != hello.app_id:
            return None
        # Still open (the old stream is not yet known dead, or the process crashed) or ended recently.
        if record.ended_at is None or now - record.ended_at <= self.config.resume_window:
            return record
        return None

    async def close_session(self, session: DeviceSession) -> None:
        session.closed = True
        current = self._reg.sessions.get(session.device_id)
        # A reconnect that resumed this session before the old stream ended keeps it open.
        resumed = current is not None and current is not session and current.session_id == session.session_id
        if current is session:
            del self._reg.sessions[session.device_id]
            armed = self._timers.pop(session.device_id, None)
            if armed is not None:
                armed[1].cancel()
        await self.settle(session)
        if resumed:
            return
        await self.store.end_session(session.session_id, self.clock.now())
        self._stop_scoring(session)
        if self._reg.sessions.get(session.device_id) is None:
            self._went_away(session, self.clock.now())
        log.info("session.closed", session_id=session.session_id, device_id=session.device_id)
        # Memory stays bounded by the devices connected now: once the session can no longer be resumed
        # its state goes, and storage rebuilds it (windows, dedupe ids, open cue, caps) when it returns.
        self.clock.call_at(self.clock.now() + self.config.resume_window, lambda: self._evict(session))
        if session.consent == "none":
            # No consent: the journey serves this session only. A reconnect may
            # resume it within the window, so it is dropped once that has passed.
            self.clock.call_at(
                self.clock.now() + self.config.resume_window, lambda: self._spawn(self._forget_unless_resumed(session))
            )

    async def _forget_unless_resumed(self, session: DeviceSession) -> None:
        current = self._reg.sessions.get(session.device_id)
        if current is not None and current.session_id == session.session_id:
            return  # resumed; its own close schedules this again
        await self.store.forget_session_journey(session.session_id)
        log.info("session.closed", session_id=session.session_id, device_id=session.device_id)

    def _evict(self, session: DeviceSession) -> None:
        """Free a closed device's state after the resume window, unless it came back meanwhile."""
        device_id = session.device_id
        if device_id in self._reg.sessions or device_id in self._reg.away:
            return
        state = self._reg.states.pop(device_id, None)
        if state is None:
            return
        state.release()
        self._deadline_rows.pop(device_id, None)
        timer = self._timers.pop(device_id, None)
        if timer is not None:
            timer[1].cancel()
        # A cue still on offer keeps its small entry until it expires (its timer records that); a device
        # returning before then gets it from there, after from storage.
        subject = session.subject
        if not any(s.subject == subject for s in self._reg.sessions.values()):
            # Caps, cooldowns and decline memory are replayed from stored cues when the subject returns.
            self.arbiter.forget(subject)
            self._remembered.forget(subject)
        log.debug("device.evicted", device_id=device_id)
