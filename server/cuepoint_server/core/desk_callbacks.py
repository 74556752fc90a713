"""Callbacks: the user chose to be called back at a time; the engagement waits for it, then queues again.

Offered in the fallback (desk_routing.py) when nobody could take the engagement in time. The chosen time
and number are stored with the engagement (state ``callback_requested``) together with its
``engagement.callback_scheduled`` webhook; a timer at that time puts the engagement back in its queue as a
callback (kind ``callback``), for the associate to phone the user. The timer is the stored row, not the
process: after a restart, recovery arms it again (or fires it at once if it fell due meanwhile). The time is
also a timer row (core/deadlines.py): the engagement's row moves to ``queued`` in the same transaction that
marks that timer done, so it happens once, here or on the replica that claims the row when this one is gone
(core/timer_claims.py).

A callback runs without the app: the device is told it is scheduled (with the time) and that it ended,
nothing in between, and it does not hold the device (new cues may be offered meanwhile).
"""

from __future__ import annotations

import structlog

from .deadlines import CALLBACK, timer, timer_id
from .desk_wrapup import WrapUp
from .engagement_model import Engagement
from .errors import InvalidInput
from .live import ScheduledCallback
from .sessions import DeviceSession

__all__ = ["MAX_CALLBACK_AHEAD", "Callbacks"]

log = structlog.get_logger("cuepoint.core.engagements")

# How far ahead a callback may be asked for.
MAX_CALLBACK_AHEAD = 30 * 86400.0


class Callbacks(WrapUp):
    async def _callback_chosen(self, engagement: Engagement, phone: str, at: float | None, now: float) -> None:
        if at is not None and at > now + MAX_CALLBACK_AHEAD:
            raise InvalidInput("fallback_choice.callback_at", "at most 30 days ahead")
        # Unset, or in the past by the device's clock: as soon as someone is free.
        due = now if at is None else max(at, now)
        self.router.unwait(engagement.queue, engagement.engagement_id)
        self._withdraw_offer(engagement)
        engagement.state = "callback_requested"
        engagement.callback_at, engagement.callback_number = due, phone
        engagement.notes = f"callback requested {phone}".strip()
        self._release_device(engagement)
        # The row first: one without its callback stored is moot when it fires (the engagement is not waiting).
        await self.store.arm_timers([timer(CALLBACK, engagement.engagement_id, due, self.replica())])
        # The time is on file (with its webhook) before the device hears of it or a timer counts on it.
        await self._persist(engagement, "engagement.callback_scheduled")
        self._notify_device(engagement)
        self._emit("engagement.callback_scheduled", engagement)
        log.info("engagement.callback_scheduled", engagement_id=engagement.engagement_id, callback_at=due)
        self._arm_callback(engagement)

    def _arm_callback(self, engagement: Engagement) -> None:
        if engagement.callback_timer is not None or engagement.callback_at is None:
            return
        engagement.callback_timer = self.clock.call_at(engagement.callback_at, lambda: self._callback_due(engagement))

    def _callback_due(self, engagement: Engagement) -> None:
        engagement.callback_timer = None
        if engagement.state != "callback_requested" or self._engagements.get(engagement.engagement_id) is None:
            return
        self._spawn(self._fire_callback(engagement))

    async def _fire_callback(self, engagement: Engagement) -> bool:
        """Queue the callback again, once: stored (with engagement.queued) only if its timer row had not fired
        yet; if another replica fired it, that replica owns the engagement now and this one lets it go."""
        engagement.state = "queued"
        rows = self._webhooks("engagement.queued", self._payload("engagement.queued", engagement))
        fired = await self.store.save_engagement(
            engagement.record(), webhooks=rows, timer=timer_id(CALLBACK, engagement.engagement_id)
        )
        if not fired:
            if self._engagements.get(engagement.engagement_id) is engagement:
                del self._engagements[engagement.engagement_id]
            log.info("engagement.callback_fired_elsewhere", engagement_id=engagement.engagement_id)
            return False
        if rows:
            self._wake_outbox()
        self._tell_supervisors(engagement)
        self._emit("engagement.queued", engagement)
        log.info("engagement.callback_due", engagement_id=engagement.engagement_id, queue=engagement.queue)
        self._route(engagement)
        return True

    async def callback_claimed(self, engagement_id: str, at: float) -> bool:
        """This replica claimed the callback's timer row (its owner is gone): fire it here, taking the
        engagement over from storage if this desk does not hold it. False: nothing to do (done or moot)."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            record = await self.store.get_engagement(engagement_id)
            if record is not None and record.state == "callback_requested":
                if self.shared:
                    # Routed here from now on: no other replica adopts it as a gone replica's.
                    await self.store.take_over(engagement_id, self.replica_id, at)
                self.restore(record)
                engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.state != "callback_requested":
            await self.store.finish_timer(timer_id(CALLBACK, engagement_id), at)
            return False
        if engagement.callback_timer is not None:
            engagement.callback_timer.cancel()
            engagement.callback_timer = None
        return await self._fire_callback(engagement)

    def callbacks(self) -> list[ScheduledCallback]:
        """Callbacks not yet wrapped up, soonest first (the console's live view)."""
        due = [e for e in self._engagements.values() if e.callback_at is not None and e.state != "ended"]
        return [
            ScheduledCallback(
                e.engagement_id,
                e.queue,
                e.callback_at or 0.0,
                e.state,
                e.associate.associate_id if e.associate else "",
            )
            for e in sorted(due, key=lambda e: (e.callback_at or 0.0, e.engagement_id))
        ]

    def _callback_restored(self, engagement: Engagement) -> None:
        """After a restart: the stored callback's timer again (at once if it fell due while down). Its row
        is left as it is: armed (this replica's alarm or a claim fires it) or done (fired: then this alarm
        writes nothing and the engagement is let go)."""
        self._arm_callback(engagement)

    async def end_by_user(self, session: DeviceSession, engagement_id: str) -> None:
        """The user may also call off a callback still to come."""
        engagement = self._of_device(session, engagement_id, "end_engagement.engagement_id")
        if engagement.state != "callback_requested":
            await super().end_by_user(session, engagement_id)
            return
        if engagement.callback_timer is not None:
            engagement.callback_timer.cancel()
            engagement.callback_timer = None
        now = self.clock.now()
        engagement.state, engagement.ended_at, engagement.ended_by = "ended", now, "user"
        engagement.disposition = "cancelled"
        await self._persist(engagement, "engagement.ended")
        self._notify_device(engagement)
        self._emit("engagement.ended", engagement)
