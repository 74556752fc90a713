"""Routing across replicas: who gets an engagement is decided in storage, not in one replica's memory.

Alone (the default), the desk routes in memory exactly as desk_routing.py says. With other replicas
(`replica_id` set by core/recovery.py), every replica holds a stand-in of every associate
(api/associate_links.py), and each stand-in only knows the engagements its own replica gave them. So
here a replica picks its candidates as before (skills, queues, apps, room as far as it knows, longest idle
first), and storage decides (`Store.reserve_slot`, storage/slots.py): in one transaction it locks their
rows, skipping any another replica is deciding for at that moment, counts what each holds on every
replica and takes a slot of the longest idle one with room. Two replicas racing for one associate: one
wins; the other's engagement waits in line, and tries again as soon as the row is free.

Reservations, releases and re-tries run one at a time, in order, on this replica (`_slot_job`), so a
release always lands before the routing it makes room for. A release is announced on the bus
(`slot_freed`): every replica then offers that associate what waits in its own lines; the cluster sweep
does the same every few seconds, in case a message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

import structlog

from ..storage import SlotClaim, TimerRecord
from .deadlines import offer_timer
from .desk_bots import Bots
from .engagement_model import Engagement
from .sessions import AssociateSession

__all__ = ["SharedSlots"]

log = structlog.get_logger("cuepoint.core.engagements")

# Another replica held a candidate's row: ask again this much later (its transaction is short).
RETRY_AFTER = 0.05


class SharedSlots(Bots):
    # This replica's id when other replicas route to the same associates; "" alone (core/recovery.py).
    replica_id: str = ""
    # Told the id of an associate who got room (core/cluster.py announces it to every replica).
    slot_freed: Callable[[str], Awaitable[None]] | None = None
    _slot_jobs: asyncio.Queue[Callable[[], Awaitable[None]]] | None = None
    # Engagements on their way here from another replica (desk_handover.py): the slots they hold become this
    # replica's in storage before they are in memory, so a prune meanwhile leaves them alone.
    incoming: frozenset[str] = frozenset()
    _slot_worker: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return bool(self.replica_id)

    # -- provided by desk_routing.py -----------------------------------------------------------------

    def _assign(self, engagement: Engagement, associate: AssociateSession, reserved: bool = False) -> None:
        raise NotImplementedError

    def _offer(
        self, engagement: Engagement, associate: AssociateSession, reserved: bool = False, due: float | None = None
    ) -> None:
        raise NotImplementedError

    def _arm_fallback(self, engagement: Engagement) -> None:
        raise NotImplementedError

    def _preferred(self, engagement: Engagement) -> AssociateSession | None:
        raise NotImplementedError

    # -- the job line -------------------------------------------------------------------------------

    def _slot_job(self, job: Callable[[], Awaitable[None]]) -> None:
        if self._slot_jobs is None:
            self._slot_jobs = asyncio.Queue()
            self._slot_worker = asyncio.get_running_loop().create_task(self._slot_run(), name="cuepoint-slots")
        self._slot_jobs.put_nowait(job)

    async def _slot_run(self) -> None:
        assert self._slot_jobs is not None
        while True:
            job = await self._slot_jobs.get()
            try:
                await job()
            except Exception:
                # The sweep puts right what a failed job left (prune_slots, another drain).
                log.warning("slots.job_failed", exc_info=True)
            finally:
                self._slot_jobs.task_done()

    async def _slot_now(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` in the job line (after every release queued before it, which may be of the same slot)
        and wait until it is done; its error is the caller's."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def job() -> None:
            try:
                await work()
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if not done.done():
                done.set_result(None)

        self._slot_job(job)
        await done

    async def stop_slots(self, within: float = 5.0) -> None:
        """Finish what is queued (within `within` seconds), then give back every slot this replica holds."""
        if self._slot_jobs is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_jobs.join(), within)
        if self._slot_worker is not None:
            self._slot_worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._slot_worker
            self._slot_worker, self._slot_jobs = None, None
        if self.shared:
            with contextlib.suppress(Exception):
                await self.store.prune_slots(self.replica_id, (), self.clock.now())

    # -- taking a slot ------------------------------------------------------------------------------

    def _route_shared(self, engagement: Engagement) -> None:
        self._slot_job(lambda: self._reserve_for(engagement))

    def _routable(self, engagement: Engagement) -> bool:
        return (
            self._engagements.get(engagement.engagement_id) is engagement
            and engagement.state == "queued"
            and engagement.offered_to is None
        )

    def _claim(
        self, engagement: Engagement, group: list[AssociateSession], room: list[bool], replaces: str = ""
    ) -> SlotClaim:
        # An associate who must claim it is offered it: the offer's timeout row is armed with the hold, in the
        # reservation's transaction (desk_timers.py), so no replica dies between the two.
        due = self.clock.now() + self.engine.scenarios.routing.queue(engagement.queue).offer_timeout

        def timer(associate_id: str) -> TimerRecord | None:
            associate = self.router.find(associate_id)
            if associate is None or not associate.manual_claim:
                return None
            return offer_timer(engagement.engagement_id, associate_id, due, self.replica_id)

        return self._slot_claim(
            engagement.engagement_id, engagement.channel, engagement.queue, group, room, replaces=replaces,
            timer=timer,
        )  # fmt: skip

    def _slot_claim(
        self,
        key: str,
        channel: str,
        queue: str,
        group: list[AssociateSession],
        room: list[bool],
        replaces: str = "",
        detail: str = "",
        timer: Callable[[str], TimerRecord | None] | None = None,
    ) -> SlotClaim:
        def fits(associate_id: str, held: Mapping[str, tuple[str, str]]) -> bool:
            associate = self.router.find(associate_id)
            if associate is None:
                return False
            # Everything held anywhere, and what only this replica knows of yet; never the slot being
            # decided (a cue's, held here while its commit runs) nor the one it takes over.
            everywhere = {**held, **associate.holding()}
            everywhere.pop(key, None)
            everywhere.pop(replaces, None)
            room[0] = associate.fits_beside(everywhere, "", "")
            return associate.fits_beside(everywhere, channel, queue, self.router.queue_limits)

        return SlotClaim(
            key=key,
            channel=channel,
            queue=queue,
            replica=self.replica_id,
            candidates=tuple((a.associate_id, a.idle_since) for a in group),
            fits=fits,
            replaces=replaces,
            detail=detail,
            timer=timer,
        )

    def cue_slot(
        self, cue_id: str, queue: str, skills: tuple[str, ...], app_id: str, channel: str, detail: str
    ) -> SlotClaim | None:
        """Across replicas: the slot a cue on screen holds for its engagement (require_capacity), reserved in
        the cue's commit against what every replica holds (OfferCommit.slots). None alone: memory decides."""
        if not self.shared:
            return None
        candidates = self.router.candidates(queue, skills, (), app_id, channel)
        return self._slot_claim(cue_id, channel, queue, candidates, [True], detail=detail)

    async def _reserve_for(self, engagement: Engagement) -> None:
        if not self._routable(engagement):
            return
        preferred = self._preferred(engagement)
        candidates = self.router.candidates(
            engagement.queue, engagement.skills, engagement.rejected_by, engagement.app_id, engagement.channel
        )
        # The associate who invited the user first, then everyone else in longest-idle order.
        groups = [[preferred]] if preferred is not None else []
        groups.append([a for a in candidates if a is not preferred])
        contended = False
        # The slot its cue held on screen (require_capacity) is taken over by the first reservation, so
        # no other replica gets it in between; given back there if nobody here fits.
        replaces = engagement.cue_id
        for group in groups:
            if not group and not replaces:
                continue
            claim = self._claim(engagement, group, [True], replaces)
            replaces = ""
            result = await self.store.reserve_slot(claim, self.clock.now())
            contended = contended or result.contended
            if result.associate_id:
                await self._reserved(engagement, result.associate_id, result.timer)
                return
        self._line_up(engagement)
        if contended:
            self._try_again(lambda: self._route_shared(engagement), engagement)

    async def _reserved(self, engagement: Engagement, associate_id: str, armed: TimerRecord | None = None) -> bool:
        """Storage gave `engagement` a slot of `associate_id` (with `armed`, the offer's timeout row): offer or
        assign it, unless things moved on while it decided (then the slot goes back, and the row is done)."""
        associate = self.router.find(associate_id)
        # The slot was free in storage, so whatever freed it (a stand-in's "ended", an offer withdrawn) is
        # stored for the associate's home: taken before this offer goes out, so the associate never sees the
        # new engagement before the end of the one it replaces, whichever path found the room (an announcement,
        # the sweep, a retry, a new accept).
        await self._settle(associate)
        offered = associate is not None and associate.manual_claim
        if armed is not None and not offered:
            await self.store.finish_due(armed.timer_id, armed.due_at, self.clock.now())
        if (
            associate is None
            or not self._routable(engagement)
            or not associate.fits(engagement.channel, engagement.queue, self.router.queue_limits)
        ):
            if armed is not None and offered:
                await self.store.finish_due(armed.timer_id, armed.due_at, self.clock.now())
            await self.store.release_slot(engagement.engagement_id, associate_id, self.clock.now())
            if self._routable(engagement):
                self._line_up(engagement)
                self._try_again(lambda: self._route_shared(engagement), engagement)
            return False
        self.router.unwait(engagement.queue, engagement.engagement_id)
        if associate.manual_claim:
            self._offer(engagement, associate, reserved=True, due=armed.due_at if armed is not None else None)
        else:
            self._assign(engagement, associate, reserved=True)
        return True

    def _line_up(self, engagement: Engagement) -> None:
        if engagement.engagement_id not in self.router.line(engagement.queue):
            self.router.wait(
                engagement.queue, engagement.engagement_id, priority=engagement.priority, since=engagement.created_at
            )
        self._arm_fallback(engagement)

    def _try_again(self, again: Callable[[], None], engagement: Engagement | None = None) -> None:
        def fire() -> None:
            if engagement is None or self._routable(engagement):
                again()

        self.clock.call_at(self.clock.now() + RETRY_AFTER, fire)

    def _fill_shared(self, associate: AssociateSession) -> None:
        self._slot_job(lambda: self._fill(associate))

    async def _fill(self, associate: AssociateSession) -> None:
        """desk_routing.py's `_drain` across replicas: the best waiting engagements this associate can take,
        each reserved in storage."""
        for engagement_id in self.router.waiting(associate.queues):
            if not associate.available or self.router.find(associate.associate_id) is not associate:
                return
            engagement = self._engagements.get(engagement_id)
            if engagement is None or not self._routable(engagement):
                continue
            if associate.associate_id in engagement.rejected_by or not associate.skills.issuperset(engagement.skills):
                continue
            if not associate.serves(engagement.app_id):
                continue
            if not associate.fits(engagement.channel, engagement.queue, self.router.queue_limits):
                continue
            room = [True]
            result = await self.store.reserve_slot(self._claim(engagement, [associate], room), self.clock.now())
            if result.associate_id:
                await self._reserved(engagement, result.associate_id, result.timer)
                continue
            if result.contended:
                self._try_again(lambda: self._fill_shared(associate))
                return
            if not room[0]:
                return  # full on other replicas: nothing later in line fits either

    # -- giving slots back --------------------------------------------------------------------------

    def _slot_taken(self, associate: AssociateSession, engagement: Engagement) -> None:
        """A slot taken without a reservation (an offer or assignment alone's routing decided): on record.
        A conference or consult joining stores its slot with the joining itself (desk_participants.py)."""
        if not self.shared:
            return
        key, channel, queue, now = engagement.engagement_id, engagement.channel, engagement.queue, self.clock.now()
        associate_id = associate.associate_id

        async def job() -> None:
            await self.store.hold_slot(key, associate_id, channel, queue, self.replica_id, now)

        self._slot_job(job)

    def _slot_released(self, associate_id: str, key: str) -> None:
        if not self.shared:
            return
        now = self.clock.now()

        async def job() -> None:
            # A stand-in's "ended" (or offer withdrawn) is stored for the associate's home before the slot is
            # free for another replica to offer: the associate hears of the end first.
            await self._settle(self.router.find(associate_id))
            await self.store.release_slot(key, associate_id, now)
            await self._announce_room(associate_id)

        self._slot_job(job)

    def release_cue_slot(self, associate_id: str, cue_id: str) -> None:
        """A cue on screen that held `associate_id`'s slot is settled without an engagement."""
        self._slot_released(associate_id, cue_id)

    def _slots_resync(self) -> None:
        """Give back whatever this replica holds in storage but no longer here (a signed-out associate, a
        release that failed)."""
        if not self.shared:
            return

        async def job() -> None:
            # Cues on screen keep theirs too (reserved in their commit, core/evaluation.py).
            keep = {(key, a.associate_id) for a in self.router.associates() for key in a.active | a.offers | a.reserved}
            keep |= {(key, a.associate_id) for a in self.router.associates() for key in self.incoming}
            for associate_id in await self.store.prune_slots(self.replica_id, keep, self.clock.now()):
                await self._announce_room(associate_id)

        self._slot_job(job)

    async def _announce_room(self, associate_id: str) -> None:
        if self.slot_freed is not None:
            try:
                await self.slot_freed(associate_id)
            except Exception:
                log.warning("slots.announce_failed", associate_id=associate_id, exc_info=True)

    def room_for(self, associate_id: str) -> None:
        """Another replica says `associate_id` got room: offer them what waits here."""
        associate = self.router.find(associate_id)
        if associate is None or not self.shared:
            return

        async def job() -> None:
            # What its stand-ins stored for it (the "ended" that made this room) is taken by `_reserved`
            # before anything new is offered.
            await self._fill(associate)

        self._slot_job(job)

    async def _settle(self, associate: AssociateSession | None) -> None:
        if associate is not None and associate.settle is not None:
            try:
                await associate.settle()
            except Exception:
                log.warning("slots.settle_failed", associate_id=associate.associate_id, exc_info=True)

    def sweep_slots(self) -> None:
        """Every few seconds (core/cluster.py): give back stale slots, then try every associate with room
        on what waits here (a lost announcement, a slot another replica gave back silently)."""
        if not self.shared:
            return
        self._slots_resync()
        if not self.router.lines():
            return
        for associate in self.router.associates():
            if associate.available:
                self._fill_shared(associate)
