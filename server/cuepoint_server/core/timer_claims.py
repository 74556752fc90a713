"""Timer rows of replicas that are gone: claimed and fired here, each exactly once.

Each replica fires the deadlines it armed from memory (the clock's alarms: evaluation.py's cue expiry and
device deadlines, desk_callbacks.py's callback time, desk_timers.py's fallback and offer timeout) and keeps
them as rows (storage/timer_rows.py, names in deadlines.py).
While its registry row is alive (core/replicas.py: written within ``--replica-ttl``, the one notion of a
live replica) nobody else touches them; once it is not (SIGKILL, a lost host, a drain), any other replica
claims its due rows (PostgreSQL: ``FOR UPDATE SKIP LOCKED``) and fires them. Whoever fires a timer,
the effect commits in the transaction that marks the row done, only if it was still armed: the owner's
late alarm, a second claim, or the owner coming back writes nothing more.

A replica taken for gone too early only lets others fire what is due, which is safe at any ttl.

What a claim does per kind:
- cue expiry: a cue still offered becomes ``expired`` with its ``cue.withdrawn`` webhook row. If this
  replica holds the device (it reconnected here), through the same path as its own alarm, so the device is
  told too; otherwise the device hears ``expired`` when it reconnects (recovery.py finds it settled).
- callback: the engagement is taken over from storage by this desk and queued again (engagement.queued),
  for associates on any replica.

- device deadline (idle, dwell, absence; one row per device, moved as its signals move it): the device's
  time-driven scenarios are evaluated at that due time, as its owner's alarm would, and what that offers
  commits with the row marked done for that due time (OfferCommit.fires), so a deadline fired by its
  owner just before dying is not fired again, nor by two claimers. A device held here (it reconnected
  here) is evaluated live. A device connected nowhere is rebuilt from storage (its windows, last session,
  open cue and its subject's caps, as a reconnect would) and kept as away here: only its `when_away`
  scenarios may fire, their cue waiting for the device with its push (cue.pending_push); when the device
  reconnects, here or elsewhere, it gets that cue, and the deadline that fired is behind it.
- fallback and offer timeout (core/desk_timers.py): the gone replica's open engagements are adopted first
  (`adopt_orphans`, one adopter each), so the replica firing the row is the one routing the engagement from
  then on; one another live replica adopted is left to it (a fallback row is handed to it as owner).
  Fallback: offered (the row done is that fact) if the engagement still waits; the device hears it on its
  stream here or when it reconnects here. Offer: lapses for that due time if the engagement is still offered
  to that associate here (an adopter keeps a standing offer until its time, or lapses it on adopting it):
  the slot is released, the associate told `timeout`, the engagement offered to the next associate on any
  replica. Rows whose engagement moved on (taken, ended) are marked done without an effect.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from ..engine.state import DeviceState
from ..storage import OfferCommit, TimerRecord
from .deadlines import CALLBACK, CUE_EXPIRY, DEVICE, FALLBACK, KEEP_TIMERS, OFFER, offer_of
from .recovery import Recovery
from .sessions import DeviceSession

__all__ = ["TimerClaims"]

log = structlog.get_logger("cuepoint.core")

# A replica's own rows still armed this long after they fell due: its alarm was cancelled (the cue was
# answered, the callback called off) or lost; claimed by itself to settle them (moot ones only get done).
OWN_OVERDUE = 60.0


class TimerClaims(Recovery):
    _claimer: asyncio.Task[None] | None = None

    async def start_timer_claims(self) -> None:
        """Claim the due rows of replicas that are gone (the heartbeat is the cluster's, core/cluster.py)."""
        self._claimer = asyncio.create_task(self._claim_loop(), name="cuepoint-timer-claims")

    async def stop_timer_claims(self) -> None:
        if self._claimer is not None:
            self._claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._claimer
            self._claimer = None

    async def _claim_loop(self) -> None:
        every = max(self.config.replica_ttl / 4, 0.1)
        purged_at = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                await self.claim_due_timers()
                now = self.clock.now()
                if now - purged_at > 3600:
                    purged_at = now
                    await self.store.purge_timers(now - KEEP_TIMERS)
            except Exception:
                log.warning("timers.claim_failed", exc_info=True)

    async def claim_due_timers(self) -> int:
        """Claim and fire what is due now; returns how many timers this call fired with an effect."""
        now = self.clock.now()
        me = self.bus.replica_id
        fired = 0
        claimed = await self.store.claim_timers(me, now, hold=self.config.replica_ttl, own_after=OWN_OVERDUE)
        for row in claimed:
            try:
                if await self._fire_claimed(row, now):
                    fired += 1
            except Exception:
                # Its claim lapses after `hold`: then it is claimed (and tried) again.
                log.warning("timers.fire_failed", timer_id=row.timer_id, exc_info=True)
        if claimed:
            log.info("timers.claimed", claimed=len(claimed), fired=fired, owners=sorted({r.owner for r in claimed}))
        return fired

    async def _fire_claimed(self, row: TimerRecord, now: float) -> bool:
        if row.kind == CUE_EXPIRY:
            return await self._expiry_claimed(row, now)
        if row.kind == CALLBACK:
            return await self.desk.callback_claimed(row.target, now)
        if row.kind == DEVICE:
            return await self._deadline_claimed(row, now)
        if row.kind in (FALLBACK, OFFER):
            return await self._desk_timer_claimed(row, now)
        log.warning("timers.unknown_kind", timer_id=row.timer_id, kind=row.kind)
        await self.store.finish_timer(row.timer_id, now)
        return False

    async def _expiry_claimed(self, row: TimerRecord, now: float) -> bool:
        record = await self.store.get_cue(row.target)
        if record is None or record.status != "offered":
            await self.store.finish_timer(row.timer_id, now)
            return False
        pending = self._reg.pending.get(record.device_id)
        if pending is not None and pending.offer.cue_id == record.cue_id:
            # The device is here: the same path as this replica's own alarm (the device is told).
            if pending.expiry is not None:
                pending.expiry.cancel()
            self._expire(record.device_id, record.cue_id)
            return True
        return await self._expire_stored(record, now)

    async def _desk_timer_claimed(self, row: TimerRecord, now: float) -> bool:
        engagement_id = offer_of(row.target)[0] if row.kind == OFFER else row.target
        if self.desk.get(engagement_id) is None and self.bus.shared:
            # Its owner is gone: its engagements are adopted first (here, unless another replica was first),
            # so whoever fires the row is the replica routing the engagement from now on.
            await self.adopt_orphans()
        if row.kind == FALLBACK:
            return await self.desk.fallback_claimed(row, now)
        return await self.desk.offer_claimed(row, now)

    async def _deadline_claimed(self, row: TimerRecord, now: float) -> bool:
        device_id = row.target
        if not self._holds(device_id) and not await self._adopt_away(device_id, now):
            # Nothing may fire for it away: done for this due time only (the row may have moved meanwhile).
            await self.store.commit_offer(OfferCommit(fires=[(row.timer_id, row.due_at)]))
            return False
        current = self._timers.get(device_id)
        if current is not None and current[0] == row.due_at:
            current[1].cancel()
        self._on_timer(device_id, row.due_at)
        return True

    def _holds(self, device_id: str) -> bool:
        return device_id in self._reg.sessions or device_id in self._reg.away

    async def _adopt_away(self, device_id: str, now: float) -> bool:
        """Rebuild a device connected nowhere from storage and keep it as away here, if a `when_away` scenario
        may fire for it; False (nothing rebuilt) otherwise."""
        record = await self.store.latest_session(device_id)
        if record is None or not self._away_capable(record.app_id):
            return False
        state = self._reg.states.get(device_id)
        if state is None:
            state = DeviceState(device_id, record.app_id)
            await self._restore_state(state, now)
            # Its idle deadline counts from its last signal, which no window may keep.
            last = await self.store.journey(device_id, limit=1)
            if last:
                state.last_signal_at = max(state.last_signal_at, last[-1].time)
            if self._holds(device_id):
                return True  # it reconnected here meanwhile: evaluated live
            state = self._reg.states.setdefault(device_id, state)
        state.context = {**record.context, "app.id": record.app_id, "consent": record.consent}
        subject = f"user:{record.user_id}" if record.identified else f"device:{device_id}"
        session = DeviceSession(
            session_id=record.session_id,
            app_id=record.app_id,
            device_id=device_id,
            subject=subject,
            consent=record.consent,
            state=state,
            started_at=record.started_at,
            closed=True,
        )
        await self._restore_memory(subject)
        if self._holds(device_id):
            return True
        self._reg.away[device_id] = (session, now + self.config.resume_window)
        if device_id not in self._reg.pending:
            await self._restore_cue(session, now)  # its open cue keeps others from being offered meanwhile
        # As a closed session's: the state goes once nothing more can fire for it (evaluation.py `_away_over`).
        self.clock.call_at(now + self.config.resume_window, lambda: self._evict(session))
        log.info("timers.device_adopted", device_id=device_id)
        return True
