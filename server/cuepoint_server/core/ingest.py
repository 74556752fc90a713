"""Ingest: a device's signal batch validated, applied to its state, evaluated, stored and acknowledged."""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Mapping
from functools import partial
from operator import itemgetter, le
from typing import Any

import structlog

from ..engine.state import REORDER_TOLERANCE, DeviceState, EventOccurrence, Scalar
from ..scenarios.compiler import milestone_event
from ..storage import JournalBatch, SignalRecord
from ..storage.records import MilestoneRecord
from .consent import Redactor
from .core_base import session_record
from .identity import Identity
from .model import (
    Ack,
    EventColumns,
    IncomingBatch,
    SessionFailed,
)
from .recovery import Recovery
from .sessions import DeviceSession, PendingAck
from .validation import clock_offset, validate_batch, validate_columns

__all__ = ["Ingest"]

log = structlog.get_logger("cuepoint.core")

_SIGNAL_ID = itemgetter(1)  # EventOccurrence.signal_id, read in C
# EventOccurrence from a (time, signal id, properties, seq) tuple, without the NamedTuple's Python-level __new__.
_occurrence = partial(tuple.__new__, EventOccurrence)


class Ingest(Recovery, Identity):
    def ingest(self, session: DeviceSession, batch: IncomingBatch | EventColumns) -> None:
        """Apply a batch: validate, update state, evaluate, and ack once stored.

        Signal by signal, in order: each event a scenario or milestone listens to is evaluated
        against the state as of that signal, at that signal's time, so a batch means exactly what
        the same signals sent one at a time mean (milestones reached mid-batch, a "last occurrence"
        that held only until the next signal). Synchronous up to the storage hand-off so evaluation
        never waits on a commit; the ack follows asynchronously through the session's outbox.

        A batch of events (EventColumns) is applied a column at a time between the events something
        listens to (`_ingest_events`); the rest, signal by signal (`_ingest_signals`).
        """
        now = self.clock.now()
        if isinstance(batch, EventColumns):
            validate_columns(batch, now)
            if not self.desk.awaits_outcome(session.device_id):
                self._ingest_events(session, batch, now)
                return
            batch = batch.rows()  # each event may be the outcome an ended engagement waits for
        else:
            validate_batch(batch, now)
        self._ingest_signals(session, batch, now)

    def _ingest_events(self, session: DeviceSession, batch: EventColumns, now: float) -> None:
        """Events as columns: the same outcome as `_ingest_signals`, without an object per signal.

        Dedupe is a set operation; a run of events nothing listens to is recorded per event name at once
        (DeviceState.record_events builds occurrences only for what windows keep); each listened-to event
        is recorded and evaluated on its own, at its place in the batch, as one at a time would be.
        """
        state = session.state
        ids, times, names, props = batch.ids, batch.times, batch.names, batch.props
        duplicates = state.remember_all(ids)
        if duplicates:
            gone = set(duplicates)
            kept = [i for i, signal_id in enumerate(ids) if signal_id not in gone]
            ids = [ids[i] for i in kept]
            times = [times[i] for i in kept]
            names = [names[i] for i in kept]
            props = [props[i] for i in kept]
        n = len(ids)
        offset = clock_offset(batch, now)
        if None in times:
            ats = [now if t is None else min(t + offset, now) for t in times]
        elif times and max(times) + offset <= now:  # type: ignore[type-var,operator]
            ats = list(map(offset.__add__, times))  # type: ignore[arg-type]  # none ahead of now: a C loop
        else:
            ats = [min(t + offset, now) for t in times]  # type: ignore[operator]
        # Stored as the columns it came as: one journal batch, no record per signal (rows, then grouped back into
        # a batch by the commit, cost ~0.6 us per signal more: issue 13). The unit is opened before anything is
        # evaluated, which stages its cues in it.
        journal = (
            JournalBatch(session.device_id, session.session_id, now, ids, ["event"] * n, names, ats, props)
            if n
            else None
        )
        unit = self._open_unit(session)
        if journal is not None:
            unit.work.batches.append(journal)
        ack = PendingAck(batch.batch_id, unit, ids, duplicates, [], journal)
        self._queue_ack(session, ack)
        first_seq = state.seq + 1
        state.seq += n
        scenarios = self.engine.scenarios
        retention = scenarios.retention
        listened = scenarios.listened
        heard = [i for i, name in enumerate(names) if name in listened] if not listened.isdisjoint(names) else []
        # Of the listened-to signals, those whose evaluation may do something; the rest are recorded with the
        # runs between them.
        chosen = self._worth_evaluating(session, heard, names, ats, ids, props) if heard else heard
        pending = self._reg.pending
        start = k = 0
        while True:
            stop = chosen[k] if k < len(chosen) else n
            if stop > start:
                self._record_run(state, names, ats, ids, props, first_seq, start, stop, retention)
            if stop == n:
                break
            self._record_run(state, names, ats, ids, props, first_seq, stop, stop + 1, retention)
            self._on_event(session, names[stop], ats[stop], now)
            k += 1
            if chosen is not heard and session.device_id in pending:
                # This signal's evaluation offered a cue: each later one may withdraw it ("condition_cleared"),
                # so from here on every listened-to signal is evaluated, as one at a time would be.
                chosen, k = heard, bisect_right(heard, stop)
            start = stop + 1
        session.last_received_at = now
        for observer in self.observers:
            observer.signals_received(n, len(duplicates))
        if n:
            scored = self._score_batch(session, ack.records, now)
            if scored:
                self._evaluate(session, self.engine.scenarios.candidates(scored), now)
            self._schedule_timer(session.device_id, now)

    def _worth_evaluating(
        self,
        session: DeviceSession,
        heard: list[int],
        names: list[str],
        ats: list[float],
        ids: list[str],
        props: list[Mapping[str, Scalar]],
    ) -> list[int]:
        """The positions in `heard` (listened-to events, ascending) where evaluating may change anything.

        Elsewhere evaluation would find no scenario qualifying and nothing else to do: no cue pending to
        withdraw, no milestone on the event left to reach, and every guard of the event's groups false
        for that signal (engine/batch_filter.py). Per event name, once per batch, from the columns.
        """
        state = session.state
        if session.device_id in self._reg.pending or not self.engine.dispatching:
            return heard
        first = names[heard[0]]
        if len(heard) == len(names) and names.count(first) == len(names):
            by_name = {first: heard}  # the usual batch: one event throughout
        else:
            by_name = {}
            for i in heard:
                by_name.setdefault(names[i], []).append(i)
        out: list[int] = []
        for name, at in by_name.items():
            found = self._event_positions(state, session.app_id, name, at, ats, ids, props)
            if found is at and len(by_name) == 1:
                return heard
            out.extend(found)
        if len(by_name) > 1:
            out.sort()
        return out

    def _event_positions(
        self,
        state: DeviceState,
        app_id: str,
        name: str,
        at: list[int],
        ats: list[float],
        ids: list[str],
        props: list[Mapping[str, Scalar]],
    ) -> list[int]:
        """_worth_evaluating for one event name's positions `at` (returned as is: all of them)."""
        scenarios = self.engine.scenarios
        milestones = scenarios.milestones_by_event.get(name)
        if milestones and any(m.id not in state.milestones for m in milestones):
            return at
        found = scenarios.event_filter(name)
        if found is None:
            return at
        # The filter reads each signal's properties as the event's last occurrence once it is recorded:
        # true unless record_event would insert it earlier (a late arrival) or skip it (an id its window
        # still holds, older than what dedupe remembers).
        times = [ats[i] for i in at] if len(at) < len(ats) else ats
        if len(times) > 1 and not all(map(le, times, times[1:])):
            return at
        queue = state.history.get(name)
        if queue:
            last = queue[-1].time
            if times[0] < last - REORDER_TOLERANCE:
                return at
            # (The batch's ids, not only this event's: a superset, checked in C.)
            if (times[0] <= last or len(set(times)) < len(times)) and not set(map(_SIGNAL_ID, queue)).isdisjoint(ids):
                return at
        column = [props[i] for i in at] if len(at) < len(props) else props
        return [at[j] for j in found.positions(app_id, state.context, column)]

    @staticmethod
    def _record_run(
        state: DeviceState,
        names: list[str],
        ats: list[float],
        ids: list[str],
        props: list[Mapping[str, Scalar]],
        first_seq: int,
        start: int,
        stop: int,
        retention: Mapping[str, float],
    ) -> None:
        """Record events start..stop into the state: per event name, at once (or one, before its evaluation)."""
        if stop - start == 1:  # one signal (a listened-to one, every message of an unbatched client): no slices
            time = ats[start]
            if time > state.last_signal_at:
                state.last_signal_at = time
            name = names[start]
            occurrence = _occurrence((time, ids[start], props[start], first_seq + start))
            state.record_event(name, occurrence, retention.get(name, 0.0))
            return
        latest = max(ats[start:stop])
        if latest > state.last_signal_at:
            state.last_signal_at = latest
        name = names[start]
        run = names[start:stop]
        if run.count(name) == len(run):
            seqs = range(first_seq + start, first_seq + stop)
            state.record_events(
                name, ats[start:stop], ids[start:stop], props[start:stop], seqs, retention.get(name, 0.0)
            )
            return
        groups: dict[str, list[int]] = {}
        for i in range(start, stop):
            groups.setdefault(names[i], []).append(i)
        for name, at in groups.items():
            state.record_events(
                name,
                [ats[i] for i in at],
                [ids[i] for i in at],
                [props[i] for i in at],
                [first_seq + i for i in at],
                retention.get(name, 0.0),
            )

    def _ingest_signals(self, session: DeviceSession, batch: IncomingBatch, now: float) -> None:
        """Signal by signal (context updates among them, or an engagement waiting for an outcome event)."""
        state = session.state
        rows: list[SignalRecord] = []
        fresh: list[str] = []
        duplicates: list[str] = []
        # Evaluation below, signal by signal, stages its cues and decisions in this unit; the session's
        # commit task commits it with the signals once ingest returns (it cannot start before, so the loop
        # has filled the lists it reads by then), then shows the cues and acks.
        unit = self._open_unit(session)
        unit.work.signals = rows
        self._queue_ack(session, PendingAck(batch.batch_id, unit, fresh, duplicates, rows))
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
        scored = self._score_batch(session, rows.copy, now) if evented else []
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
                self._remembered.merged(session.subject, subject)
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

    def _queue_ack(self, session: DeviceSession, pending: PendingAck) -> None:
        """Queue an applied batch for the next group commit (core/group_commit.py), which acks it."""
        self._group.put(session, pending)

    async def _commit_round(self, sessions: list[DeviceSession]) -> None:
        """One group commit: what every queued session applied, stored together, then each batch acked.

        Per session, in order: its leading batches that are only signals, or else its first batch with
        something evaluated staged beside its signals (cues, decisions, milestones: its own transaction,
        committed beside the append, then shown before its ack). The rest waits for the next round, so a
        session's acks and cues leave in the order its batches came. A session whose signal ids another
        session in this round also sent waits too: storage reports skipped resends by id, and within a
        round each id must name one batch.
        """
        plain: list[tuple[DeviceSession, list[PendingAck]]] = []
        units: list[tuple[DeviceSession, PendingAck]] = []
        later: list[DeviceSession] = []
        seen: set[str] = set()
        for session in sessions:
            group = session.acks
            assert group is not None
            session.acks = None
            for pending in group:
                self._seal_unit(session, pending.unit)
            if not group[0].plain():
                taken = 1
                units.append((session, group[0]))
            else:
                taken = 1
                while taken < len(group) and group[taken].plain():
                    taken += 1
                ids = [i for pending in group[:taken] for i in pending.fresh] if taken > 1 else group[0].fresh
                if not seen.isdisjoint(ids):
                    session.acks = group
                    later.append(session)
                    continue
                seen.update(ids)
                plain.append((session, group[:taken]))
            session.committing += taken
            if taken < len(group):
                session.acks = group[taken:]
                later.append(session)
        self._group.requeue(later)
        batches = [b for _, taken_ in plain for pending in taken_ for b in pending.batches()]
        skipped: list[str] | None
        commits = [self._commit_acked(session, pending) for session, pending in units]
        if not commits:
            skipped = await self._append_round(batches)
        elif batches:
            skipped = (await asyncio.gather(self._append_round(batches), *commits))[0]
        else:
            # Nothing plain to append: gather would wrap an empty append in a task of its own, and a lone unit
            # too; a cue round (one batch that fires a cue) is exactly this case (issue 13).
            skipped = []
            if len(commits) == 1:
                await commits[0]
            else:
                await asyncio.gather(*commits)
        if skipped is None:
            await self._append_each(plain)
        else:
            known = set(skipped)
            for session, taken_ in plain:
                for pending in taken_:
                    self._acked(session, pending, [i for i in pending.fresh if i in known] if known else [])
        for session, taken_ in plain:
            self._settle_taken(session, len(taken_))
        for session, _ in units:
            self._settle_taken(session, 1)

    async def _commit_acked(self, session: DeviceSession, pending: PendingAck) -> None:
        """A batch with something evaluated staged beside it: its own transaction, then what it showed and its
        ack, put on the outbox back to back (no await between), so the stream may send a cue and the ack of the
        batch that fired it as one message (api/device.py). The unit's transaction stores the batch's signals,
        so the ack need not wait for the round's other append."""
        self._acked(session, pending, await self._commit_unit(session, pending.unit))

    def _settle_taken(self, session: DeviceSession, count: int) -> None:
        session.committing -= count
        session.notify_room()
        self._group.wake(session)

    async def _append_round(self, batches: list[JournalBatch]) -> list[str] | None:
        """Every plain batch of the round in one append; None if storage failed."""
        if not batches:
            return []
        try:
            return await self.store.append_journal(batches)
        except Exception:
            log.warning("acks.round_store_failed", batches=len(batches), exc_info=True)
            return None

    async def _append_each(self, plain: list[tuple[DeviceSession, list[PendingAck]]]) -> None:
        """The round's append failed: each session's batches on their own, so one bad write fails one stream."""
        for session, group in plain:
            batches = [b for pending in group for b in pending.batches()]
            try:
                skipped = await self.store.append_journal(batches) if batches else []
            except Exception:
                log.exception("unit.store_failed", device_id=session.device_id, batches=len(group))
                session.send(SessionFailed("could not store signals; resend them"))
                for pending in group:
                    self._acked(session, pending, None)
                continue
            known = set(skipped)
            for pending in group:
                self._acked(session, pending, [i for i in pending.fresh if i in known] if known else [])

    def _acked(self, session: DeviceSession, pending: PendingAck, skipped: list[str] | None) -> None:
        """A batch's commit is over: ack it (or, if storage failed, forget its ids so a resend counts)."""
        fresh, duplicates = pending.fresh, pending.duplicates
        if skipped is None:
            log.error("signals.store_failed", device_id=session.device_id, batch_id=pending.batch_id)
            for signal_id in fresh:
                session.state.forget(signal_id)
            return
        gone: set[str] = set()
        if skipped:
            # Resends older than the ids kept in memory: storage knew them (and record_event kept them out of
            # the windows if they were still in one).
            gone = set(skipped)
            fresh = [i for i in fresh if i not in gone]
            duplicates = duplicates + skipped
            log.info("signals.resend_skipped_by_storage", device_id=session.device_id, count=len(skipped))
        if fresh and self.desk.follows_journey(session.device_id):
            # Stored, so now the associate of a running engagement may see them.
            self.desk.journey_stored(session.device_id, [r for r in pending.records() if r.signal_id not in gone])
        session.send(Ack(pending.batch_id, tuple(fresh + duplicates), tuple(duplicates)))
