"""The desk's own deadlines across replicas: a queue's fallback and an offer's timeout as timer rows (issue 14).

Alone, both are alarms in memory (desk_routing.py), and a restart arms them again from the stored engagement.
With other replicas each is also a row (core/deadlines.py FALLBACK, OFFER) owned by the replica routing the
engagement, so when that replica dies another fires it, once (core/timer_claims.py claims it, or the replica
adopting the engagement finds it):

- fallback ("fallback:<engagement>", due `fallback_after` after the engagement was created; armed in the
  transaction that stores the engagement, `accept_cue`): the row marked done is the fact "the fallback was
  offered".
  Whoever marks it (the owner's alarm, the adopter's alarm, a claim) offers it: the engagement knows its
  options, and the device is told on its stream if it is here, else when it reconnects here
  (`resume_device`). An alarm that finds the row done already (fired by a replica that died after, or settled
  when an associate took the engagement before it was re-queued) offers it as well, without counting as a
  second firing: the replica holding the engagement now is the one the device hears it from. The user's
  answer that keeps the engagement open ("chat") is stored with the channel change (`fallback_choice`), and
  an engagement answered so is never offered its fallback again, by this replica or an adopter. An
  associate taking the engagement settles the row in the assignment's own write.
- offer ("offer:<engagement>", target "<engagement>:<associate>", due when the offer lapses; one row moved from
  one associate's offer to the next): marked done when the offer ends otherwise (claimed, rejected,
  withdrawn), in the same ordered line (desk_shared.py `_slot_job`) as the arming, so a late write never
  re-arms an offer that is over. Lapsing marks it done for that due time first; only the firing that did
  releases the slot, tells the associate "timeout" and offers the engagement to the next associate. A
  replica adopting the engagement of a replica that is gone (`adopt`) finds the offer still armed: it keeps
  it standing for that associate until its time (they can claim it wherever their stream is: a claim sent
  to the gone replica is taken from its rows by the associate's home and sent here, api/associate_links.py),
  then lapses it as its own; or lapses it at once when its time has passed or the associate is gone.

Each row commits with the state change that arms it: the fallback with the engagement (`accept_cue`), the
offer with the slot's hold (storage/slots.py, `SlotClaim.timer`). A replica dies with both or neither; an
adopter re-owns a row by arming it again (`_fallback_row`, `_stand`).
"""

from __future__ import annotations

import structlog

from ..storage import EngagementRecord, TimerRecord
from .deadlines import FALLBACK, OFFER, offer_of, offer_timer, timer, timer_id
from .desk_shared import SharedSlots
from .engagement_model import Engagement
from .model import FallbackOffered, OfferWithdrawn
from .sessions import AssociateSession

__all__ = ["FALLBACK_TEXT", "DeskTimers"]

log = structlog.get_logger("cuepoint.core.engagements")

FALLBACK_TEXT = "Everyone is busy right now. How would you like to continue?"


class DeskTimers(SharedSlots):
    # -- provided by desk_routing.py -----------------------------------------------------------------

    def _route(self, engagement: Engagement) -> None:
        raise NotImplementedError

    def _withdraw_offer(self, engagement: Engagement, keep_slot: bool = False) -> AssociateSession | None:
        raise NotImplementedError

    def _lapse(self, engagement: Engagement, associate: AssociateSession) -> None:
        raise NotImplementedError

    def restore(self, record: EngagementRecord, standing: TimerRecord | None = None, rejected: str = "") -> None:
        raise NotImplementedError

    # -- the fallback ---------------------------------------------------------------------------------

    def _fallback_options(self, engagement: Engagement) -> tuple[str, ...]:
        return tuple(self.engine.scenarios.routing.queue(engagement.queue).fallback)

    def _tell_fallback(self, engagement: Engagement) -> None:
        offered = FallbackOffered(engagement.engagement_id, engagement.fallback_offered, FALLBACK_TEXT)
        self._to_device(engagement, offered)

    def _fallback_due(self, engagement: Engagement) -> float | None:
        """When the engagement's fallback falls due (None: its queue has none)."""
        queue = self.engine.scenarios.routing.queue(engagement.queue)
        after = queue.fallback_after if queue.fallback_after is not None else self.config.default_fallback_after
        return None if after is None else engagement.created_at + after

    def _first_rows(self, engagement: Engagement) -> list[TimerRecord]:
        """Across replicas: the fallback row a new engagement is stored with (`accept_cue`, one transaction),
        owned by this replica. None for a queue without a fallback, nor for a bot's (it takes it at once)."""
        due = self._fallback_due(engagement) if self.shared else None
        if due is None or self._bot_for(engagement.queue) is not None:
            return []
        return [timer(FALLBACK, engagement.engagement_id, due, self.replica_id)]

    def _fallback_row(self, engagement: Engagement, due: float) -> None:
        """The fallback's alarm was armed here: its row names this replica. Stored with the engagement when it
        was accepted here; written now only by an adopter (or a restart), which re-owns it."""
        if self.shared and not engagement.fallback_row:
            engagement.fallback_row = True
            self._spawn(self.store.arm_timers([timer(FALLBACK, engagement.engagement_id, due, self.replica_id)]))

    def _fallback_settled(self, engagement: Engagement) -> str:
        """An associate takes the engagement: its fallback row (if armed here) is moot, marked done with the
        assignment's own write (the id for `_save`'s `settle`; "" when there is none)."""
        if not (self.shared and engagement.fallback_row):
            return ""
        engagement.fallback_row = False
        return timer_id(FALLBACK, engagement.engagement_id)

    async def _fire_fallback(self, engagement: Engagement) -> bool:
        """Across replicas: offer the fallback, the row marked done first; True if this was its firing."""
        if (
            engagement.state != "queued"
            or engagement.fallback_offered
            or engagement.fallback_firing
            or engagement.fallback_choice
        ):
            return False
        if engagement.fallback_timer is not None:
            engagement.fallback_timer.cancel()
            engagement.fallback_timer = None
        # A second firing here meanwhile (a claim beside the alarm) does nothing; the offer is shown (and may be
        # answered) only once the row is committed.
        engagement.fallback_firing = True
        try:
            fired = await self.store.finish_timer(timer_id(FALLBACK, engagement.engagement_id), self.clock.now())
        finally:
            engagement.fallback_firing = False
        if engagement.state != "queued" or engagement.fallback_offered or engagement.fallback_choice:
            return fired
        engagement.fallback_offered = self._fallback_options(engagement)
        if self._engagements.get(engagement.engagement_id) is engagement:
            self._tell_fallback(engagement)
        event = "engagement.fallback_offered" if fired else "engagement.fallback_offered_before"
        log.info(event, engagement_id=engagement.engagement_id, options=list(engagement.fallback_offered))
        return fired

    async def fallback_claimed(self, row: TimerRecord, at: float) -> bool:
        """This replica claimed a fallback row (its owner is gone, or it is this one's own, long overdue)."""
        engagement = self._engagements.get(row.target)
        if engagement is None:
            record = await self.store.get_engagement(row.target)
            if record is not None and record.state == "queued":
                # Another replica routes it (it adopted it, or is adopting it now): the row is its to fire.
                owner = await self.store.owner_of(row.target)
                if owner and owner != self.replica_id:
                    await self.store.arm_timers([timer(FALLBACK, row.target, row.due_at, owner)])
                return False
            await self.store.finish_timer(row.timer_id, at)  # over, or never stored: moot
            return False
        if engagement.state != "queued" or engagement.fallback_offered or engagement.fallback_choice:
            # Taken by an associate, offered here already, or answered (chat) before: nothing to offer.
            await self.store.finish_timer(row.timer_id, at)
            return False
        return await self._fire_fallback(engagement)

    # -- the offer's timeout --------------------------------------------------------------------------

    def _offer_row(self, engagement: Engagement, associate: AssociateSession, due: float) -> None:
        engagement.offer_due = due
        if self.shared:
            row = offer_timer(engagement.engagement_id, associate.associate_id, due, self.replica_id)

            async def arm() -> None:
                await self.store.arm_timers([row])

            self._slot_job(arm)

    def _offer_over(self, engagement: Engagement) -> None:
        """The offer ended before its time (claimed, rejected, withdrawn): its row is done for that due time."""
        due, engagement.offer_due = engagement.offer_due, None
        if due is None or not self.shared:
            return
        key, now = timer_id(OFFER, engagement.engagement_id), self.clock.now()

        async def finish() -> None:
            await self.store.finish_due(key, due, now)

        self._slot_job(finish)

    async def _lapse_once(self, engagement: Engagement, associate: AssociateSession, due: float | None) -> bool:
        """Across replicas: the offer due at `due` lapses, its row marked done for that time first; only
        that firing releases the slot and offers the engagement to the next associate."""
        if (
            due is None
            or engagement.offered_to is not associate
            or engagement.offer_due != due
            or engagement.state != "queued"
        ):
            return False
        engagement.offer_due = None  # this firing marks the row: the withdrawal below writes nothing more
        if engagement.offer_timer is not None:
            engagement.offer_timer.cancel()
            engagement.offer_timer = None
        fired = await self.store.finish_due(timer_id(OFFER, engagement.engagement_id), due, self.clock.now())
        if engagement.offered_to is not associate or engagement.state != "queued":
            return fired  # claimed (or withdrawn) while the row was written: that stands
        if not fired:
            # Lapsed by a replica that took this one for gone (and adopted the engagement): it routes it now.
            self._let_go(engagement)
            return False
        log.info("engagement.offer_lapsed", engagement_id=engagement.engagement_id, associate_id=associate.associate_id)
        self._lapse(engagement, associate)
        return True

    def _let_go(self, engagement: Engagement) -> None:
        self.router.unwait(engagement.queue, engagement.engagement_id)
        associate = self._withdraw_offer(engagement)
        if associate is not None:
            associate.send(OfferWithdrawn(engagement.engagement_id, "timeout"))
        if self._engagements.get(engagement.engagement_id) is engagement:
            del self._engagements[engagement.engagement_id]
        self._release_device(engagement)
        log.info("engagement.offer_lapsed_elsewhere", engagement_id=engagement.engagement_id)

    async def offer_claimed(self, row: TimerRecord, at: float) -> bool:
        """This replica claimed an offer row (its owner is gone, or it is this one's own, long overdue)."""
        engagement_id, associate_id = offer_of(row.target)
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            record = await self.store.get_engagement(engagement_id)
            if record is not None and record.state == "queued":
                return False  # another replica routes it: adopting it, it keeps or lapses this offer (`adopt`)
            await self.store.finish_due(row.timer_id, row.due_at, at)  # over, or never stored: moot
            return False
        offered = engagement.offered_to
        if offered is not None and offered.associate_id == associate_id and engagement.offer_due == row.due_at:
            return await self._lapse_once(engagement, offered, row.due_at)
        await self.store.finish_due(row.timer_id, row.due_at, at)  # that offer ended here already: moot
        return False

    # -- adopting an engagement of a replica that is gone ------------------------------------------------

    async def adopt(self, record: EngagementRecord) -> None:
        """Route an engagement adopted from a replica that is gone (core/recovery.py), its offer standing if
        that replica had one out still armed."""
        engagement_id = record.engagement_id
        if engagement_id in self._engagements:
            return
        row = await self.store.get_timer(timer_id(OFFER, engagement_id)) if record.state == "queued" else None
        rejected = ""
        if row is not None and row.state == "armed":
            _, associate_id = offer_of(row.target)
            associate = self.router.find(associate_id)
            now = self.clock.now()
            if associate is None or row.due_at <= now:
                # Its time has passed (or the associate is gone): it lapses here, once, before routing.
                if await self.store.finish_due(row.timer_id, row.due_at, now) and associate is not None:
                    associate.send(OfferWithdrawn(engagement_id, "timeout"))
                rejected, row = associate_id, None
                log.info("engagement.offer_lapsed", engagement_id=engagement_id, associate_id=associate_id)
        else:
            row = None
        if engagement_id in self._engagements:
            return
        self.restore(record, standing=row, rejected=rejected)

    def _stand(self, engagement: Engagement, row: TimerRecord) -> bool:
        """Keep an adopted engagement's offer standing for its associate until its time; False if they are
        not signed in here any more (then it is routed as any other)."""
        _, associate_id = offer_of(row.target)
        associate = self.router.find(associate_id)
        if associate is None:
            return False
        engagement.offered_to = associate
        associate.hold(associate.offers, engagement.engagement_id, engagement.channel, engagement.queue)
        self._slot_taken(associate, engagement)  # the adoption gave back the gone replica's hold
        engagement.offer_timer = self.clock.call_at(row.due_at, lambda: self._offer_lapsed(engagement, associate))
        self._offer_row(engagement, associate, row.due_at)  # re-owned by this replica
        log.info("engagement.offer_kept", engagement_id=engagement.engagement_id, associate_id=associate_id)
        return True

    def _offer_lapsed(self, engagement: Engagement, associate: AssociateSession) -> None:
        raise NotImplementedError
