"""An engagement follows its device from one replica to another (issue 14); the desk's two sides of it.

The device's actions on its engagement are handled, and what the engagement tells the device is sent, only by
the replica holding both the engagement (in memory) and the device's stream. So when a device's stream lands
on another replica than its engagement (a load balancer, `max_connection_age`, a restart), the engagement
moves to it (core/follow.py asks for it):

- the holder `hand_over`s it: in its slot line (after every reservation and release queued before it), once
  every write of the engagement is stored, it takes it out of memory (alarms stopped, the associate's and
  the line's hold of it dropped, no slot given back) and moves it in one transaction (storage/slots.py
  `hand_over`): its row as held now, its owner row (only while still its own), its slots and its armed
  timer rows. Anything that looks for it meanwhile waits for that to end (`moving`), then asks storage.
- the new holder `take`s it from storage as it stood: an assignment kept with the same associate (their
  stand-in here, api/associate_links.py, or their own stream), the chat so far in its transcript, an offer
  standing for its associate until its time (desk_timers.py `adopt`), the fallback offered again if it was
  (`hints`: what the old holder knew that storage does not say: who rejected it, the fallback's options).

Nothing is announced for the move itself: no webhook, no new assignment; the device is told where it stands
(core/follow.py), the associate sees nothing change.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import structlog

from ..storage import EngagementRecord
from .deadlines import FALLBACK, timer_id
from .desk_bots import BOT_PREFIX
from .desk_resume import Resume
from .engagement_model import TRANSCRIPT_KEPT, Engagement
from .model import ChatLine
from .sessions import AssociateSession

__all__ = ["HandOver"]

log = structlog.get_logger("cuepoint.core.engagements")

# Engagements remembered as moved (to which replica), to route a late message without asking storage.
REMEMBERED_MOVES = 1024


class HandOver(Resume):
    _moving_now: dict[str, asyncio.Future[str]] | None = None
    _moved_to: OrderedDict[str, str] | None = None

    def _moves(self) -> tuple[dict[str, asyncio.Future[str]], OrderedDict[str, str]]:
        if self._moving_now is None or self._moved_to is None:
            self._moving_now, self._moved_to = {}, OrderedDict()
        return self._moving_now, self._moved_to

    def moving(self, engagement_id: str) -> asyncio.Future[str] | None:
        """The hand-over of `engagement_id` under way here (its result: the replica it went to, or "")."""
        return self._moves()[0].get(engagement_id)

    def moved_to(self, engagement_id: str) -> str:
        """The replica this one handed `engagement_id` over to lately ("" if none it remembers)."""
        return self._moves()[1].get(engagement_id, "")

    # -- the old holder --------------------------------------------------------------------------------

    async def hand_over(self, engagement_id: str, to: str, asked_at: float) -> dict[str, Any]:
        """Give `engagement_id` to replica `to`, whose device stream opened at `asked_at`. The answer's
        "result": "handed", "absent" (not held here), "kept" (the device came back here since, or the
        engagement is not one a device acts on: a callback, a conference) or "busy" (ask again)."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            return {"result": "absent", "to": self.moved_to(engagement_id)}
        if not self.shared or to == self.replica_id:
            return {"result": "kept"}
        session = self._sessions.get(engagement.device_id)
        if session is not None and not session.closed and session.started_at > asked_at:
            return {"result": "kept"}  # the device is back here: the engagement stays with it
        if not self._movable(engagement):
            return {"result": "kept"}
        if self._settling(engagement):
            return {"result": "busy"}
        moving, moved = self._moves()
        if engagement_id in moving:
            return {"result": "busy"}
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        moving[engagement_id] = done
        answer: dict[str, Any] = {"result": "busy"}
        try:
            answer = await self._give(engagement, to)
        finally:
            del moving[engagement_id]
            went = to if answer.get("result") == "handed" else ""
            if went:
                moved[engagement_id] = went
                while len(moved) > REMEMBERED_MOVES:
                    moved.popitem(last=False)
            done.set_result(went)
        return answer

    @staticmethod
    def _movable(engagement: Engagement) -> bool:
        """An engagement its device acts on, with one associate at most (a conference stays where it is)."""
        return (
            engagement.state in ("queued", "assigned")
            and engagement.callback_at is None
            and not engagement.participants
        )

    @staticmethod
    def _settling(engagement: Engagement) -> bool:
        """Its fallback or its offer's lapse is being marked in storage right now (desk_timers.py): asked
        again in a moment, it moves with what that decided."""
        return engagement.fallback_firing or (engagement.offered_to is not None and engagement.offer_due is None)

    async def _give(self, engagement: Engagement, to: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"result": "busy"}

        async def work() -> None:
            # Every write of it stored first: none lands after the row the move writes.
            while self._saving:
                await asyncio.gather(*list(self._saving), return_exceptions=True)
            if self._engagements.get(engagement.engagement_id) is not engagement or not self._movable(engagement):
                answer["result"] = "kept" if engagement.open else "absent"
                return
            if self._settling(engagement):
                return  # busy
            record = engagement.record()
            hints = {
                "rejected_by": sorted(engagement.rejected_by),
                "fallback_offered": list(engagement.fallback_offered),
                "preferred_associate": engagement.preferred_associate,
            }
            # Out of memory before the move commits: nothing here changes it meanwhile (whatever looks
            # for it waits for `moving`).
            self._let_go_quietly(engagement)
            try:
                handed = await self.store.hand_over(record, self.replica_id, to, self.clock.now())
            except Exception:
                log.warning("engagement.hand_over_failed", engagement_id=engagement.engagement_id, exc_info=True)
                handed = False
            if handed:
                answer.update(result="handed", hints=hints)
                log.info("engagement.handed_over", engagement_id=engagement.engagement_id, to=to)
                return
            # Not moved: still this replica's (a failed write), or another's by now (it took this one for gone).
            answer["result"] = "absent"
            if await self.store.owner_of(engagement.engagement_id) == self.replica_id:
                stored = await self.store.get_engagement(engagement.engagement_id)
                if stored is not None:
                    await self.take(stored, hints)
                    answer["result"] = "kept"

        await self._slot_now(work)
        return answer

    def _let_go_quietly(self, engagement: Engagement) -> None:
        """Forget an engagement that moves to another replica: its slots, rows and state stay as they are."""
        engagement_id = engagement.engagement_id
        for timer in (engagement.fallback_timer, engagement.offer_timer):
            if timer is not None:
                timer.cancel()
        engagement.fallback_timer = engagement.offer_timer = None
        self.router.unwait(engagement.queue, engagement_id)
        for associate in (engagement.offered_to, engagement.associate):
            if associate is not None:
                associate.offers.discard(engagement_id)
                associate.active.discard(engagement_id)
                associate.held.pop(engagement_id, None)
        engagement.offered_to = None
        del self._engagements[engagement_id]
        self._release_device(engagement)
        self._told_wait.pop(engagement_id, None)
        for key in [k for k in self._joined_at if k[0] == engagement_id]:
            del self._joined_at[key]

    # -- the new holder --------------------------------------------------------------------------------

    async def take(self, record: EngagementRecord, hints: dict[str, Any] | None = None) -> bool:
        """Hold `record`'s engagement here, as storage has it (this replica owns it now); False if it is
        not open any more. `hints`: what the old holder said of it beyond its row."""
        engagement_id = record.engagement_id
        if engagement_id in self._engagements:
            return True
        if record.state not in ("queued", "assigned") or record.callback_at is not None:
            return False
        hints = hints or {}
        if record.state == "assigned" and record.associate_id:
            associate = self._holder(record)
            if associate is not None:
                transcript = await self.store.chat_transcript(engagement_id)
                if engagement_id in self._engagements:
                    return True
                self._keep_assigned(record, associate, transcript[-TRANSCRIPT_KEPT:])
                return True
            # Their stream is not known here (yet): it waits in line, offered back to them first.
        fallback = None
        if record.state == "queued" and not hints:
            fallback = await self.store.get_timer(timer_id(FALLBACK, engagement_id))
        await self.adopt(record)  # with its offer still standing, if one was out (desk_timers.py)
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            return False
        engagement.rejected_by.update(str(a) for a in hints.get("rejected_by", ()))
        engagement.preferred_associate = engagement.preferred_associate or str(hints.get("preferred_associate", ""))
        offered = tuple(str(o) for o in hints.get("fallback_offered", ()))
        if not hints and fallback is not None and fallback.state == "done":
            offered = self._fallback_options(engagement)  # its row says it was offered: it stands
        if offered and engagement.state == "queued" and not engagement.fallback_offered:
            engagement.fallback_offered = offered
            if engagement.fallback_timer is not None:
                engagement.fallback_timer.cancel()
                engagement.fallback_timer = None
        log.info("engagement.taken", engagement_id=engagement_id, state=engagement.state)
        return True

    def _holder(self, record: EngagementRecord) -> AssociateSession | None:
        """Who holds an assigned engagement here: the associate's session (their stream or its stand-in),
        or the queue's built-in bot."""
        if record.associate_id.startswith(BOT_PREFIX):
            bot = self._bot_for(record.queue)
            if bot is None:
                return None
            return AssociateSession(
                associate_id=record.associate_id,
                display_name=bot.name,
                queues=(record.queue,),
                capacity=1,
                idle_since=self.clock.now(),
                closed=True,
            )
        associate = self.router.find(record.associate_id)
        return associate if associate is not None and not associate.closed else None

    def _keep_assigned(self, record: EngagementRecord, associate: AssociateSession, transcript: list[Any]) -> None:
        engagement = self._rebuilt(record)
        engagement.state, engagement.associate = "assigned", associate
        engagement.assigned_at = record.assigned_at
        engagement.transcript = [ChatLine(r.engagement_id, r.message_id, r.sender, r.text, r.time) for r in transcript]
        self._engagements[engagement.engagement_id] = engagement
        self._active_by_device[engagement.device_id] = engagement.engagement_id
        if not associate.closed:  # a bot's session holds no slot
            associate.hold(associate.active, engagement.engagement_id, engagement.channel, engagement.queue)
            self._slot_taken(associate, engagement)  # moved with it; recorded again if a prune took it meanwhile
        log.info("engagement.taken", engagement_id=record.engagement_id, associate_id=associate.associate_id)

    def replay_since(self, engagement_id: str, since: float) -> None:
        """Tell the device the associates' lines stored since `since` (said while it was on its way here:
        its old holder had no stream to send them on)."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            return
        for line in engagement.transcript:
            if line.time >= since and line.sender != "user":
                self._to_device(engagement, line)
