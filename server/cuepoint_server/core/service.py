"""The Cuepoint domain core.

Turns device sessions' signals into cues and accepted cues into engagements
routed to associates. Evaluation is synchronous and in memory; storage writes
go through the store's single writer and are awaited only where durability is
promised (acks) or needed (an engagement's journey).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..clock import Clock, TimerHandle
from ..engine.arbiter import Arbiter, Blocked, Situation
from ..engine.engine import Engine
from ..engine.scenario_set import ScenarioSet
from ..engine.state import MAX_REMEMBERED_IDS, DeviceState, EventOccurrence
from ..scenarios.compiler import CompiledScenario, milestone_event
from ..storage import CueRecord, DecisionRecord, SessionRecord, SignalRecord, SqliteStore
from ..storage.records import MilestoneRecord
from .engagements import DeskConfig, EngagementDesk
from .errors import InvalidInput
from .live import LiveNow, QueueLoad, describe_session, queue_loads
from .model import (
    Ack,
    AssociateSignIn,
    CueOffer,
    Hello,
    IncomingBatch,
    SessionFailed,
    Withdrawal,
)
from .observers import CoreObserver
from .sessions import AssociateSession, DeviceSession, PendingCue
from .validation import Limits, clock_offset, validate_batch, validate_hello

# Signals read back per device to rebuild its windows after a restart.
RESTORE_SIGNALS = 5000

__all__ = ["Core", "CoreConfig"]

log = structlog.get_logger("cuepoint.core")

RESPONSES = ("accepted", "declined", "dismissed", "expired")


@dataclass(frozen=True, slots=True)
class CoreConfig:
    # Signals shown to the associate in the journey timeline.
    journey_limit: int = 50
    # Journey data older than this many days is deleted by purge(); None keeps it.
    retention_days: float | None = None
    # A device reconnecting within this many seconds resumes its session.
    resume_window: float = 120.0
    # Seconds an engagement may wait before the user is offered a callback or
    # chat, when its queue sets no fallback_after; None: never.
    fallback_after: float | None = None
    max_signals_per_batch: int = Limits.max_signals_per_batch
    # Live now (admin ListLiveSessions): seconds since a device's last signal before idle, then inactive.
    live_idle_after: float = 45.0
    live_inactive_after: float = 60.0


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    connected: bool
    segments: list[str]
    milestones: list[str]


@dataclass
class _Registry:
    states: dict[str, DeviceState] = field(default_factory=dict)
    sessions: dict[str, DeviceSession] = field(default_factory=dict)
    pending: dict[str, PendingCue] = field(default_factory=dict)


class Core:
    def __init__(self, store: SqliteStore, engine: Engine, clock: Clock, config: CoreConfig | None = None) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.config = config or CoreConfig()
        self.arbiter = Arbiter()
        self._reg = _Registry()
        self._background: set[asyncio.Task[Any]] = set()
        self.desk = EngagementDesk(
            store,
            engine,
            clock,
            self._reg.sessions,
            self._spawn,
            DeskConfig(journey_limit=self.config.journey_limit, default_fallback_after=self.config.fallback_after),
        )
        self.router = self.desk.router
        self._timers: dict[str, tuple[float, TimerHandle]] = {}
        self._restored: set[str] = set()
        # The runtime emergency switch (admin API); the policy file has its own.
        self.paused_by_admin = False
        # Called with every arbitration decision (simulate, metrics).
        self.decision_listeners: list[Callable[[DecisionRecord], None]] = []
        # Called as signals arrive, cues are offered and settled, engagements assigned (metrics).
        self.observers: list[CoreObserver] = []

    @property
    def offers_paused(self) -> bool:
        return self.paused_by_admin or self.engine.scenarios.policy.offers_paused

    # -- device sessions -------------------------------------------------

    async def open_session(self, hello: Hello) -> DeviceSession:
        validate_hello(hello)
        now = self.clock.now()
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
        subject = f"user:{user_id}" if user_id and hello.consent != "none" else f"device:{hello.device_id}"
        session = DeviceSession(
            session_id=resumed.session_id if resumed else uuid.uuid4().hex,
            app_id=hello.app_id,
            device_id=hello.device_id,
            subject=subject,
            consent=hello.consent,
            state=state,
            started_at=now,
        )
        await self.store.save_session(
            _session_record(session, user_id if hello.consent != "none" else "", resumed.started_at if resumed else now)
        )
        await self._restore_memory(subject)
        previous = self._reg.sessions.get(hello.device_id)
        if previous is not None:
            previous.closed = True
        self._reg.sessions[hello.device_id] = session
        pending = self._reg.pending.get(hello.device_id) or await self._restore_cue(session, now)
        if pending is not None:
            session.send(pending.offer)
        if resumed is not None:
            # Offers settled while the device was away (expired, withdrawn) may
            # still be on its screen: withdraw them again on the new stream.
            for cue in await self.store.cues_for_session(session.session_id):
                if cue.status in ("expired", "withdrawn"):
                    session.send(Withdrawal(cue.cue_id, cue.status))
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

    async def _restore_state(self, state: DeviceState, now: float) -> None:
        scenarios = self.engine.scenarios
        horizon = min(max(scenarios.retention.values(), default=0.0), Limits.max_age)
        for record in await self.store.journey(state.device_id, limit=RESTORE_SIGNALS, since=now - horizon):
            state.remember(record.signal_id)
            state.last_signal_at = max(state.last_signal_at, record.time)
            if record.kind == "event":
                occurrence = EventOccurrence(record.time, record.signal_id, record.payload, state.next_seq())
                state.record_event(record.name, occurrence, scenarios.keep_seconds(record.name))
        # Ids older than the windows still dedupe a resend after a crash.
        for signal_id in await self.store.recent_signal_ids(state.device_id, limit=MAX_REMEMBERED_IDS):
            state.remember(signal_id)

    async def _restore_cue(self, session: DeviceSession, now: float) -> PendingCue | None:
        record = await self.store.open_cue(session.device_id)
        if record is None:
            return None
        if record.expires_at <= now:
            await self.store.set_cue_status(record.cue_id, "expired", now)
            return None
        scenario = self.engine.scenarios.by_id.get(record.scenario_id)
        offer = CueOffer(
            cue_id=record.cue_id,
            scenario_id=record.scenario_id,
            message=record.message,
            channel=record.channel,
            upgrades=scenario.upgrades if scenario else (),
            created_at=record.created_at,
            expires_at=record.expires_at,
            title=scenario.title if scenario else "",
        )
        pending = PendingCue(offer, record.scenario_id, dict(record.explanation))
        pending.expiry = self.clock.call_at(offer.expires_at, lambda: self._expire(session.device_id, offer.cue_id))
        self._reg.pending[session.device_id] = pending
        log.info("cue.restored", device_id=session.device_id, cue_id=record.cue_id)
        return pending

    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        if not user_id:
            raise InvalidInput("user_id", "required")
        return await self.store.export_user(user_id)

    async def erase_user(self, user_id: str) -> dict[str, int]:
        """Delete a user's data from storage and from memory (caps, declines, windows)."""
        if not user_id:
            raise InvalidInput("user_id", "required")
        await self.drain()
        deleted = await self.store.erase_user(user_id)
        self.arbiter.forget(f"user:{user_id}")
        for state in self._reg.states.values():
            if state.context.get("user.id") == user_id:
                state.history.clear()
        log.warning("user.erased", rows=sum(deleted.values()))
        return deleted

    async def purge(self) -> int:
        """Retention: delete journey data older than the configured number of days."""
        if self.config.retention_days is None:
            return 0
        removed = await self.store.purge_journey(self.clock.now() - self.config.retention_days * 86400)
        log.info("journey.purged", signals=removed)
        return removed

    async def recover(self) -> None:
        """At start-up: engagements that were queued or assigned when the process stopped wait again.

        Journeys of sessions without consent are dropped too: their timers died with the process.
        """
        await self.store.forget_unconsented(ended_before=self.clock.now() - self.config.resume_window)
        for record in await self.store.open_engagements():
            self.desk.restore(record)

    async def _restore_memory(self, subject: str) -> None:
        # Caps, cooldowns and decline memory follow the user across devices
        # and restarts: replay their stored cues once per process.
        if subject in self._restored:
            return
        self._restored.add(subject)
        for cue in await self.store.cues_for_subject(subject):
            self.arbiter.remember_offer(subject, cue.scenario_id, cue.created_at, cue.session_id)
            if cue.status == "declined":
                self.arbiter.remember_decline(
                    subject, cue.scenario_id, cue.responded_at or cue.created_at, cue.session_id
                )
            elif cue.status == "accepted":
                self.arbiter.remember_engagement(subject, cue.session_id)

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
        if session.writes:
            await asyncio.gather(*session.writes, return_exceptions=True)
        if resumed:
            return
        await self.store.end_session(session.session_id, self.clock.now())
        log.info("session.closed", session_id=session.session_id, device_id=session.device_id)
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

    def ingest(self, session: DeviceSession, batch: IncomingBatch) -> None:
        """Apply a batch: validate, update state, evaluate, and ack once stored.

        Synchronous up to the storage hand-off so evaluation never waits on a
        commit; the ack follows asynchronously through the session's outbox.
        """
        now = self.clock.now()
        validate_batch(batch, now)
        state = session.state
        rows: list[SignalRecord] = []
        fresh: list[str] = []
        duplicates: list[str] = []
        events: set[str] = set()
        # Once per batch, not per signal: this loop is the server's hottest code.
        retention = self.engine.scenarios.retention
        offset = clock_offset(batch, now)
        awaiting_outcome = self.desk.awaits_outcome(session.device_id)
        device_id, session_id = session.device_id, session.session_id
        latest = state.last_signal_at
        for signal in batch.signals:
            if not state.remember(signal.id):
                duplicates.append(signal.id)
                continue
            fresh.append(signal.id)
            at = now if signal.time is None else min(signal.time + offset, now)
            payload: Mapping[str, Any]
            if signal.kind == "event":
                name = signal.name
                state.record_event(
                    name, EventOccurrence(at, signal.id, signal.props, state.next_seq()), retention.get(name, 0.0)
                )
                events.add(name)
                if awaiting_outcome:
                    # Receipt time: an outcome must arrive after the engagement ended.
                    self.desk.observe(state, name, signal.props, now)
                payload = signal.props
            else:
                identified = signal.context_set.get("user.id")
                state.context.update(signal.context_set)
                for key in signal.clear_keys:
                    state.context.pop(key, None)
                if identified and session.consent != "none":
                    self._identify(session, str(identified), now)
                payload = {"set": dict(signal.context_set), "clear": list(signal.clear_keys)}
            if at > latest:
                latest = at
            rows.append(SignalRecord(device_id, signal.id, session_id, signal.kind, signal.name, at, now, payload))
        state.last_signal_at = latest
        self._track(session, self._store_and_ack(session, batch.batch_id, rows, fresh, duplicates))
        session.last_received_at = now
        for observer in self.observers:
            observer.signals_received(len(fresh), len(duplicates))
        if events:
            for milestone in self.engine.advance_milestones(state, events, now):
                events.add(milestone_event(milestone))
                log.info("milestone.reached", device_id=session.device_id, milestone=milestone)
                reached = MilestoneRecord(now, session.app_id, session.device_id, session.session_id, milestone)
                self._track(session, self.store.save_milestone(reached))
            self._evaluate(session, self.engine.scenarios.candidates(events), now)
        if fresh:
            self._schedule_timer(session.device_id, now)

    def _identify(self, session: DeviceSession, user_id: str, now: float) -> None:
        """The app signed the user in: stitch this device's journey and memory under the user."""
        subject = f"user:{user_id}"
        if session.subject == subject:
            return
        self.arbiter.merge(session.subject, subject)
        session.subject = subject
        self._track(
            session,
            self.store.save_session(_session_record(session, user_id, session.started_at)),
        )
        self._track(session, self._restore_memory(subject))
        log.info("device.identified", device_id=session.device_id, session_id=session.session_id)

    async def _store_and_ack(
        self,
        session: DeviceSession,
        batch_id: str,
        rows: list[SignalRecord],
        fresh: list[str],
        duplicates: list[str],
    ) -> None:
        try:
            if rows:
                await self.store.append_signals(rows)
        except Exception:
            log.exception("signals.store_failed", device_id=session.device_id, batch_id=batch_id)
            for signal_id in fresh:
                session.state.forget(signal_id)
            session.send(SessionFailed("could not store signals; resend them"))
            return
        session.send(Ack(batch_id, tuple(fresh + duplicates), tuple(duplicates)))

    # -- evaluation and arbitration ---------------------------------------

    def _evaluate(self, session: DeviceSession, candidates: list[CompiledScenario], now: float) -> None:
        """Qualify `candidates`, settle a pending cue whose reason is gone, arbitrate, offer."""
        state = session.state
        qualified = self.engine.check(candidates, state, now)
        pending = self._reg.pending.get(session.device_id)
        if pending is not None:
            scenario = self.engine.scenarios.by_id.get(pending.scenario_id)
            if scenario is None or not scenario.enabled:
                self._withdraw(session.device_id, "scenario_removed")
            elif scenario.outcome is not None and scenario.outcome in state.milestones:
                self._withdraw(session.device_id, "outcome_achieved")
            elif scenario in candidates and scenario not in qualified:
                self._withdraw(session.device_id, "condition_cleared")
        if not qualified:
            return
        situation = Situation(
            subject=session.subject,
            session_id=session.session_id,
            state=state,
            now=now,
            policy=self.engine.scenarios.policy,
            busy=self._busy(session.device_id, now),
            paused=self.offers_paused,
            has_capacity=self.router.has_capacity,
        )
        decision = self.arbiter.decide(qualified, situation)
        offer = self._offer(session, decision.offer, decision.blocked, now) if decision.offer else None
        for blocked in decision.blocked:
            # Every block is also stored (decisions table): the log line is for debugging only.
            log.debug(
                "scenario.blocked",
                device_id=session.device_id,
                scenario_id=blocked.scenario_id,
                reason=blocked.reason,
                detail=blocked.detail,
            )
            self._decided(session, now, blocked.scenario_id, "blocked", blocked.reason, blocked.detail, "")
        if offer is not None and decision.offer is not None:
            self._decided(session, now, decision.offer.id, "offered", "", "", offer.cue_id)

    def _offer(
        self, session: DeviceSession, scenario: CompiledScenario, blocked: list[Blocked], now: float
    ) -> CueOffer:
        state = session.state
        explanation = scenario.explain(state, now)
        episode = scenario.episode(state)
        if episode is not None:
            state.fired_episodes[scenario.id] = episode
        offer = CueOffer(
            cue_id=uuid.uuid4().hex,
            scenario_id=scenario.id,
            message=scenario.template.render(state.context),
            channel=scenario.channel,
            upgrades=scenario.upgrades,
            created_at=now,
            expires_at=now + scenario.ttl,
            title=scenario.title,
        )
        why: dict[str, Any] = {
            "scenario_id": scenario.id,
            "scenario_name": scenario.name,
            "scenario_file": scenario.file,
            "priority": scenario.priority,
            "queue": scenario.queue,
            "conditions": [list(c) for c in explanation.conditions],
            "signal_ids": list(dict.fromkeys(explanation.signal_ids)),
            "blocked": [{"scenario_id": b.scenario_id, "reason": b.reason} for b in blocked],
            "segments": self.engine.segments_of(state, now),
            "milestones": sorted(state.milestones),
        }
        pending = PendingCue(offer, scenario.id, why)
        pending.expiry = self.clock.call_at(offer.expires_at, lambda: self._expire(session.device_id, offer.cue_id))
        self._reg.pending[session.device_id] = pending
        self.arbiter.remember_offer(session.subject, scenario.id, now, session.session_id)
        self._track(
            session,
            self.store.save_cue(
                CueRecord(
                    cue_id=offer.cue_id,
                    scenario_id=scenario.id,
                    app_id=session.app_id,
                    device_id=session.device_id,
                    subject=session.subject,
                    session_id=session.session_id,
                    created_at=now,
                    expires_at=offer.expires_at,
                    channel=offer.channel,
                    message=offer.message,
                    status="offered",
                    responded_at=None,
                    explanation=why,
                )
            ),
        )
        log.info("cue.offered", device_id=session.device_id, scenario_id=scenario.id, cue_id=offer.cue_id)
        session.send(offer)
        for observer in self.observers:
            observer.cue_offered(scenario.id, self.clock.now() - now)
        return offer

    def _decided(
        self,
        session: DeviceSession,
        now: float,
        scenario_id: str,
        outcome: str,
        reason: str,
        detail: str,
        cue_id: str,
    ) -> None:
        scenario = self.engine.scenarios.by_id.get(scenario_id)
        record = DecisionRecord(
            time=now,
            app_id=session.app_id,
            device_id=session.device_id,
            subject=session.subject,
            session_id=session.session_id,
            scenario_id=scenario_id,
            outcome=outcome,
            reason=reason,
            detail=detail,
            cue_id=cue_id,
            outcome_milestone=(scenario.outcome or "") if scenario is not None else "",
        )
        for listener in self.decision_listeners:
            listener(record)
        self._track(session, self.store.save_decision(record))

    def _busy(self, device_id: str, now: float) -> str | None:
        if self.desk.active_for(device_id) is not None:
            return "engagement_active"
        pending = self._reg.pending.get(device_id)
        if pending is not None and pending.offer.expires_at > now:
            return "cue_pending"
        return None

    def _withdraw(self, device_id: str, reason: str) -> None:
        pending = self._reg.pending.pop(device_id, None)
        if pending is None:
            return
        if pending.expiry is not None:
            pending.expiry.cancel()
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, "withdrawn")
        self._spawn(self._settled(device_id, pending.offer.cue_id, "withdrawn", reason))

    def _expire(self, device_id: str, cue_id: str) -> None:
        pending = self._reg.pending.get(device_id)
        if pending is None or pending.offer.cue_id != cue_id:
            return
        del self._reg.pending[device_id]
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, "expired")
        self._spawn(self._settled(device_id, cue_id, "expired", "expired"))

    async def _settled(self, device_id: str, cue_id: str, status: str, reason: str) -> None:
        # Record first, so a withdrawal the device sees is already on file.
        await self.store.set_cue_status(cue_id, status, self.clock.now())
        session = self._reg.sessions.get(device_id)
        if session is not None:
            session.send(Withdrawal(cue_id, reason))
        log.info("cue.withdrawn", device_id=device_id, cue_id=cue_id, reason=reason)

    def scenarios_swapped(self, old: ScenarioSet, new: ScenarioSet) -> None:
        """After a reload: settle cues whose scenario is gone and re-arm every timer."""
        now = self.clock.now()
        for device_id, pending in list(self._reg.pending.items()):
            scenario = new.by_id.get(pending.scenario_id)
            if scenario is None or not scenario.enabled:
                self._withdraw(device_id, "scenario_removed")
        for device_id, (_, handle) in list(self._timers.items()):
            handle.cancel()
            del self._timers[device_id]
        for device_id in self._reg.sessions:
            self._schedule_timer(device_id, now)

    # -- timers -------------------------------------------------------------

    def _schedule_timer(self, device_id: str, now: float) -> None:
        """Arm one timer per device at the next moment a time-driven scenario may fire."""
        if not self.engine.scenarios.timed:
            return
        state = self._reg.states.get(device_id)
        if state is None or device_id not in self._reg.sessions:
            return
        due = self.engine.next_deadline(state, now)
        current = self._timers.get(device_id)
        if current is not None:
            if due is not None and current[0] == due:
                return
            current[1].cancel()
            del self._timers[device_id]
        if due is not None:
            handle = self.clock.call_at(due, lambda: self._on_timer(device_id, due))
            self._timers[device_id] = (due, handle)

    def _on_timer(self, device_id: str, due: float) -> None:
        current = self._timers.get(device_id)
        if current is not None and current[0] == due:
            del self._timers[device_id]
        session = self._reg.sessions.get(device_id)
        if session is None:
            return
        now = self.clock.now()
        timed = [s for s in self.engine.scenarios.timed if s.applies_to(session.app_id)]
        self._evaluate(session, timed, now)
        self._schedule_timer(device_id, now)

    async def respond(self, session: DeviceSession, cue_id: str, response: str) -> None:
        if response not in RESPONSES:
            raise InvalidInput("cue_response.kind", "must be accepted, declined, dismissed or expired")
        now = self.clock.now()
        pending = self._reg.pending.get(session.device_id)
        if pending is None or pending.offer.cue_id != cue_id:
            known = await self.store.get_cue(cue_id)
            # A stale or stray answer is not worth the session: settled cues
            # (expired, withdrawn, answered) and ids this device never saw are
            # both answered with a withdrawal the app can act on.
            mine = known is not None and known.device_id == session.device_id
            session.send(Withdrawal(cue_id, known.status if mine and known else "unknown"))
            return
        del self._reg.pending[session.device_id]
        if pending.expiry is not None:
            pending.expiry.cancel()
        status = self.store.set_cue_status(cue_id, response, now)
        if response == "accepted":
            await status
        else:
            # The answer is settled in memory; the device's next message need not wait for the commit.
            self._track(session, status)
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, response)
        log.info("cue.answered", device_id=session.device_id, cue_id=cue_id, response=response)
        if response == "declined":
            self.arbiter.remember_decline(session.subject, pending.scenario_id, now, session.session_id)
        if response == "accepted":
            self.arbiter.remember_engagement(session.subject, session.session_id)
            if session.writes:
                # The journey the associate sees must include every signal that led here.
                await asyncio.gather(*session.writes, return_exceptions=True)
            await self.desk.start(session, pending, now)

    # -- engagements (core/engagements.py does the work) -------------------

    def sign_in(self, request: AssociateSignIn) -> AssociateSession:
        return self.desk.sign_in(request)

    def sign_out(self, associate: AssociateSession) -> None:
        self.desk.sign_out(associate)

    async def end_engagement(
        self, associate: AssociateSession, engagement_id: str, disposition: str, notes: str
    ) -> None:
        await self.desk.wrap_up(associate, engagement_id, disposition, notes)

    # -- housekeeping -----------------------------------------------------

    def _track(self, session: DeviceSession, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        session.writes.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            session.writes.discard(finished)
            session.notify_room()

        task.add_done_callback(done)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background.failed", error=repr(task.exception()))

    async def drain(self) -> None:
        """Wait for background writes; used on shutdown."""
        pending: set[asyncio.Future[Any]] = set(self._background)
        for session in self._reg.sessions.values():
            pending |= session.writes
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def device_view(self, device_id: str) -> DeviceView:
        state = self._reg.states.get(device_id)
        if state is None:
            return DeviceView(device_id, False, [], [])
        now = self.clock.now()
        return DeviceView(
            device_id,
            device_id in self._reg.sessions,
            self.engine.segments_of(state, now),
            sorted(state.milestones),
        )

    def live_now(self) -> LiveNow:
        """Connected sessions (live / idle / inactive), pending cues and queue loads: the admin's live view."""
        now, config = self.clock.now(), self.config
        sessions = []
        for session in list(self._reg.sessions.values()):
            engagement = self.desk.get(self.desk.active_for(session.device_id) or "")
            sessions.append(
                describe_session(
                    session,
                    now,
                    status_after=(config.live_idle_after, config.live_inactive_after),
                    segments=self.engine.segments_of(session.state, now),
                    pending=self._reg.pending.get(session.device_id),
                    engagement=(engagement.engagement_id, engagement.state) if engagement else ("", ""),
                )
            )
        return LiveNow(now, sessions, self.queue_loads())

    def queue_loads(self) -> list[QueueLoad]:
        """Per queue (of a scenario, an associate or a waiting engagement): waiting engagements, associates."""
        queues = {s.queue for s in self.engine.scenarios.scenarios} | self.desk.queues_in_use()
        return queue_loads(queues, self.router.associates(), self.router.waiting_count)

    def stats(self) -> dict[str, int]:
        return {
            "devices": len(self._reg.states),
            "sessions": len(self._reg.sessions),
            "associates": len(self.router.associates()),
            "pending_cues": len(self._reg.pending),
            "engagements": self.desk.count(),
            "evaluations": self.engine.evaluations,
        }


def _session_record(session: DeviceSession, user_id: str, started_at: float) -> SessionRecord:
    return SessionRecord(
        session_id=session.session_id,
        app_id=session.app_id,
        device_id=session.device_id,
        user_id=user_id,
        started_at=started_at,
        context=dict(session.state.context),
        consent=session.consent,
    )
