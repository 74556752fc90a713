"""Ingest: a device's signal batch validated, applied to its state, evaluated, stored and acknowledged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from ..engine.state import EventOccurrence
from ..scenarios.compiler import milestone_event
from ..storage import SignalRecord
from ..storage.records import MilestoneRecord
from .consent import Redactor
from .core_base import session_record
from .identity import Identity
from .model import (
    Ack,
    IncomingBatch,
)
from .recovery import Recovery
from .sessions import DeviceSession, Unit
from .validation import clock_offset, validate_batch

__all__ = ["Ingest"]

log = structlog.get_logger("cuepoint.core")


class Ingest(Recovery, Identity):
    def ingest(self, session: DeviceSession, batch: IncomingBatch) -> None:
        """Apply a batch: validate, update state, evaluate, and ack once stored.

        Signal by signal, in order: each event a scenario or milestone listens to is evaluated
        against the state as of that signal, at that signal's time, so a batch means exactly what
        the same signals sent one at a time mean (milestones reached mid-batch, a "last occurrence"
        that held only until the next signal). Synchronous up to the storage hand-off so evaluation
        never waits on a commit; the ack follows asynchronously through the session's outbox.
        """
        now = self.clock.now()
        validate_batch(batch, now)
        state = session.state
        rows: list[SignalRecord] = []
        fresh: list[str] = []
        duplicates: list[str] = []
        # Evaluation below, signal by signal, stages its cues and decisions in this unit; the task commits
        # it with the signals once ingest returns (it cannot start before, so the loop has filled the
        # lists it reads by then), then shows the cues and acks.
        unit = self._open_unit(session)
        unit.work.signals = rows
        self._track(session, self._store_and_ack(session, batch.batch_id, unit, fresh, duplicates, rows))
        # Once per batch, not per signal: this loop is the server's hottest code.
        scenarios = self.engine.scenarios
        retention = scenarios.retention
        listened = scenarios.listened
        offset = clock_offset(batch, now)
        awaiting_outcome = self.desk.awaits_outcome(session.device_id)
        device_id, session_id = session.device_id, session.session_id
        latest = state.last_signal_at
        evented = False
        for signal in batch.signals:
            if not state.remember(signal.id):
                duplicates.append(signal.id)
                continue
            fresh.append(signal.id)
            at = now if signal.time is None else min(signal.time + offset, now)
            if at > latest:
                latest = state.last_signal_at = at
            payload: Mapping[str, Any]
            if signal.kind == "event":
                name = signal.name
                state.record_event(
                    name, EventOccurrence(at, signal.id, signal.props, state.next_seq()), retention.get(name, 0.0)
                )
                if awaiting_outcome:
                    # Receipt time: an outcome must arrive after the engagement ended.
                    self.desk.observe(state, name, signal.props, now)
                payload = signal.props
                evented = True
                if name in listened:
                    self._on_event(session, name, at, now)
            else:
                identified = signal.context_set.get("user.id")
                context = state.context
                changed = [k for k, v in signal.context_set.items() if context.get(k) != v]
                changed += [k for k in signal.clear_keys if k in context]
                context.update(signal.context_set)
                for key in signal.clear_keys:
                    context.pop(key, None)
                if identified and session.consent != "none":
                    self._identify(session, str(identified), now)
                if changed:
                    # Context is a trigger: what reads a changed key is evaluated again, at this signal.
                    self._on_context(session, changed, at, now)
                payload = {"set": dict(signal.context_set), "clear": list(signal.clear_keys)}
                if session.consent != "full":
                    # The journal keeps only what the consent lets be stored (core/consent.py).
                    payload = Redactor(signal.context_set, session.consent).payload(payload)
            rows.append(SignalRecord(device_id, signal.id, session_id, signal.kind, signal.name, at, now, payload))
        session.last_received_at = now
        for observer in self.observers:
            observer.signals_received(len(fresh), len(duplicates))
        # Scores are rescored once per batch (core/scoring.py); their pseudo-events wake scenarios then.
        scored = self._score_batch(session, rows, now) if evented else []
        if scored:
            self._evaluate(session, self.engine.scenarios.candidates(scored), now)
        if fresh:
            self._schedule_timer(session.device_id, now)

    def _on_event(self, session: DeviceSession, name: str, at: float, now: float) -> None:
        """One listened-to event arrived: advance milestones, then evaluate the scenarios it concerns."""
        state = session.state
        events = [name]
        for milestone in self.engine.advance_milestones(state, events, at):
            events.append(milestone_event(milestone))
            log.info("milestone.reached", device_id=session.device_id, milestone=milestone)
            reached = MilestoneRecord(now, session.app_id, session.device_id, session.session_id, milestone)
            self._track(session, self._save_milestone(session, reached, at))
        candidates = self.engine.scenarios.candidates(events)
        if candidates:
            self._evaluate(session, candidates, now, at)

    async def _save_milestone(self, session: DeviceSession, reached: MilestoneRecord, at: float) -> None:
        await self.store.save_milestone(reached)
        # Stored, so now the associate of a running engagement may see it.
        self.desk.milestone_stored(session.session_id, session.device_id, reached.milestone_id, at)

    def _identify(self, session: DeviceSession, user_id: str, now: float) -> None:
        """The app set a user id: stitch this device's journey and memory under the user, if it identifies them.

        A claimed id (no valid user token, with auth on) is stored with the session but changes nothing else.
        """
        subject = self._subject(session.device_id, user_id, session.verified_user, session.consent)
        if session.subject != subject:
            if subject.startswith("user:"):
                self.arbiter.merge(session.subject, subject)
                # Stored too, so the user's decisions on any replica (and after a restart) count these cues.
                self._track(session, self.store.merge_subject(session.subject, subject))
            session.subject = subject
            self._track(session, self._restore_memory(subject))
        self._track(session, self.store.save_session(session_record(session, user_id, session.started_at)))
        log.info(
            "device.identified" if subject.startswith("user:") else "device.user_claimed",
            device_id=session.device_id,
            session_id=session.session_id,
        )

    async def _store_and_ack(
        self,
        session: DeviceSession,
        batch_id: str,
        unit: Unit,
        fresh: list[str],
        duplicates: list[str],
        rows: list[SignalRecord],
    ) -> None:
        skipped = await self._commit_unit(session, unit)
        if skipped is None:
            log.error("signals.store_failed", device_id=session.device_id, batch_id=batch_id)
            for signal_id in fresh:
                session.state.forget(signal_id)
            return
        if skipped:
            # Resends older than the ids kept in memory: storage knew them (and record_event kept them out of
            # the windows if they were still in one).
            gone = set(skipped)
            fresh = [i for i in fresh if i not in gone]
            duplicates = duplicates + skipped
            rows = [r for r in rows if r.signal_id not in gone]
            log.info("signals.resend_skipped_by_storage", device_id=session.device_id, count=len(skipped))
        if rows:
            # Stored, so now the associate of a running engagement may see them.
            self.desk.journey_stored(session.device_id, rows)
        session.send(Ack(batch_id, tuple(fresh + duplicates), tuple(duplicates)))
