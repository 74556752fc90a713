"""Recovery: what a device, a user or the whole process had before a restart, rebuilt from storage."""

from __future__ import annotations

import dataclasses

import structlog

from ..engine.state import MAX_REMEMBERED_IDS, DeviceState, EventOccurrence
from ..storage import CueRecord
from .bus import ROOM
from .consent import REDACTED
from .deadlines import CUE_EXPIRY, KEEP_TIMERS, timer, timer_id
from .model import (
    CueOffer,
)
from .operations import Operations
from .presentation import restored_offer
from .queue_wait import WINDOW
from .sessions import DeviceSession, PendingCue
from .validation import Limits

__all__ = ["RESTORE_SIGNALS", "Recovery"]

log = structlog.get_logger("cuepoint.core")

# Signals read back per device to rebuild its windows after a restart.
RESTORE_SIGNALS = 5000


class Recovery(Operations):
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
            # Its expiry fell due while no replica held the device: fired now (once, with its webhook),
            # unless a replica's claim of the timer row fired it already (core/timer_claims.py).
            await self._expire_stored(record, now)
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
            variant=record.variant,
            locale=record.locale,
        )
        offer = restored_offer(offer, record.explanation.get("cue"))
        if scenario is not None and (REDACTED in offer.message or REDACTED in offer.title):
            # Stored redacted (core/consent.py): the device gets its own cue filled in again from its context.
            shown = scenario.content(record.variant).render(session.state.context)
            offer = dataclasses.replace(offer, message=shown.message, title=shown.title)
        pending = PendingCue(offer, record.scenario_id, dict(record.explanation))
        pending.expiry = self.clock.call_at(offer.expires_at, lambda: self._expire(session.device_id, offer.cue_id))
        self._reg.pending[session.device_id] = pending
        # This replica holds the device now: its expiry row names this replica as the owner to wait for.
        await self.store.arm_timers([timer(CUE_EXPIRY, record.cue_id, record.expires_at, self.bus.replica_id)])
        log.info("cue.restored", device_id=session.device_id, cue_id=record.cue_id)
        return pending

    async def _expire_stored(self, record: CueRecord, now: float) -> bool:
        """Expire a stored cue no replica holds in memory (its expiry row fires here); False: fired before,
        or the cue was no longer offered."""
        withdrawn = {"cue_id": record.cue_id, "device_id": record.device_id, "status": "expired", "reason": "expired"}
        expiry = timer_id(CUE_EXPIRY, record.cue_id)
        if not await self._set_cue_status(record.cue_id, "expired", now, "", "cue.withdrawn", withdrawn, expiry):
            return False
        log.info("cue.withdrawn", device_id=record.device_id, cue_id=record.cue_id, reason="expired")
        self._emit_cue("cue.withdrawn", withdrawn)
        return True

    async def _restore_memory(self, subject: str) -> None:
        # Caps, cooldowns and decline memory follow the user across devices
        # and restarts: replay their stored cues once per process.
        token = self._remembered.begin(subject)
        if token is None:
            return
        for cue in await self.store.cues_for_subject(subject):
            self.arbiter.remember_offer(subject, cue.scenario_id, cue.created_at, cue.session_id)
            if cue.status == "declined":
                self.arbiter.remember_decline(
                    subject, cue.scenario_id, cue.responded_at or cue.created_at, cue.session_id
                )
            elif cue.status == "accepted":
                self.arbiter.remember_engagement(subject, cue.session_id)
        self._remembered.replayed(subject, token)

    async def recover(self) -> None:
        """At start-up: engagements that were queued or assigned when the process stopped wait again.

        Journeys of sessions without consent are dropped too: their timers died with the process.
        """
        await self.store.forget_unconsented(ended_before=self.clock.now() - self.config.resume_window)
        # Before anything reads cues: an accepted cue with no engagement would block its session for good.
        offered_again, lost = await self.store.repair_unfinished_accepts(self.clock.now())
        if offered_again or lost:
            log.warning("recovery.unfinished_accepts", offered_again=offered_again, lost=lost)
        self.stopped_variants = await self.store.stopped_variants()
        # Timer rows a day past their time are fired or moot (storage/timer_rows.py); one process alone has
        # no claim loop to purge them (core/timer_claims.py), so they go at each start.
        await self.store.purge_timers(self.clock.now() - KEEP_TIMERS)
        # Operations switches set through the admin API outlast the process.
        await self.sync_switches()
        # The wait estimate (core/queue_wait.py) starts from stored history, not from nothing.
        for queue, seconds in await self.store.recent_handle_times(WINDOW):
            self.desk.handle_times.record(queue, seconds)
        if not self.bus.shared:
            for record in await self.store.open_engagements():
                self.desk.restore(record)
            return
        # Other replicas share the database: their live engagements are theirs. This one routes across them
        # (core/desk_shared.py), is known alive by its registry row (core/cluster.py), and adopts only what
        # replicas that are gone owned.
        self.desk.replica_id = self.bus.replica_id
        self.desk.slot_freed = self._announce_room
        await self.adopt_orphans()

    def _alive_window(self) -> float:
        """A replica whose registry row is older than this is gone (core/replicas.py)."""
        return self.config.replica_ttl

    async def adopt_orphans(self) -> None:
        """Route the open engagements of replicas that are gone (and free the slots they held)."""
        now = self.clock.now()
        adopted, freed = await self.store.adopt_engagements(self.bus.replica_id, now - self._alive_window(), now)
        for engagement_id in adopted:
            record = await self.store.get_engagement(engagement_id)
            if record is not None:
                log.info("recovery.adopted", engagement_id=engagement_id)
                await self.desk.adopt(record)  # with its offer still standing, if one was out (desk_timers.py)
        for associate_id in freed:
            await self._announce_room(associate_id)

    async def _announce_room(self, associate_id: str) -> None:
        """Tell every replica (this one too) that `associate_id` has room: each offers them its line."""
        self.desk.room_for(associate_id)
        await self.bus.publish(ROOM, "", {"associate_id": associate_id})
