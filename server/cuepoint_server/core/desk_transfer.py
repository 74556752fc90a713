"""Transfers: an engagement moves to another associate or queue, blind or after a consult.

The context, journey, transcript and channel travel with the engagement (they are the engagement); the
transferring associate's part ends (EngagementEnded, disposition ``transferred``); the device hears the
new state and, once someone takes it, who it is talking to now. Each transfer is stored before anyone
is told, and reaches webhooks and the funnel as ``engagement.transferred``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import structlog

from ..storage import TransferRecord
from .desk_participants import Participants
from .desk_shared import RETRY_AFTER
from .engagement_model import Engagement
from .errors import InvalidInput, PermissionDenied
from .model import TRANSFER_MODES, EngagementEnded, TransferInfo
from .sessions import AssociateSession

__all__ = ["Transfers"]

log = structlog.get_logger("cuepoint.core.engagements")

MAX_NOTE = 500
# Times a named transfer asks storage for the target's slot while another replica is deciding for them.
NAMED_TRIES = 20


class Transfers(Participants):
    async def transfer(
        self,
        associate: AssociateSession,
        engagement_id: str,
        *,
        to_associate_id: str = "",
        to_queue: str = "",
        mode: str = "blind",
        note: str = "",
    ) -> None:
        # Every check comes before any change: a refused transfer leaves the engagement as it was.
        engagement = self._of_associate(associate, engagement_id)
        if engagement.state != "assigned":
            raise InvalidInput("transfer.engagement_id", "only an engagement in progress can be transferred")
        if bool(to_associate_id) == bool(to_queue):
            raise InvalidInput("transfer.to_queue", "set exactly one of to_associate_id and to_queue")
        if mode not in TRANSFER_MODES:
            raise InvalidInput("transfer.mode", "must be blind or consult")
        if len(note) > MAX_NOTE:
            raise InvalidInput("transfer.note", f"at most {MAX_NOTE} characters")
        if len(to_queue) > 128:
            raise InvalidInput("transfer.to_queue", "at most 128 characters")
        if mode == "consult" and not to_associate_id:
            raise InvalidInput("transfer.mode", "a consult transfer needs to_associate_id")
        if any(role == "consult" for _, role in engagement.participants.values()):
            raise InvalidInput("transfer.engagement_id", "a consult is already in progress; complete it first")
        if not to_associate_id:
            if not self.engine.scenarios.routing.admits(to_queue, engagement.app_id):
                owner = self.engine.scenarios.routing.owner(to_queue)
                raise PermissionDenied(f"queue {to_queue!r} belongs to app {owner!r}, not {engagement.app_id!r}")
            await self._hand_over(engagement, associate, None, to_queue, "blind", note)
            return
        if to_associate_id == associate.associate_id:
            raise InvalidInput("transfer.to_associate_id", "that is you")
        target = self._joinable(engagement, to_associate_id, "transfer")
        unavailable = InvalidInput("transfer.to_associate_id", f"associate {to_associate_id!r} is not available")
        if mode == "blind" and not target.fits(engagement.channel, engagement.queue, self.router.queue_limits):
            raise unavailable
        if mode == "consult":
            engagement.consult_note = note
            await self._join(engagement, target, "consult")
            return
        # Across replicas this replica's view of the target is only a first filter: storage decides.
        if self.shared and not await self._reserve_named(engagement, target):
            raise unavailable
        await self._hand_over(engagement, associate, target, "", "blind", note, reserved=self.shared)

    async def _reserve_named(self, engagement: Engagement, target: AssociateSession) -> bool:
        """A slot of `target` for `engagement`, against what they hold on every replica (desk_shared.py);
        False when they have no room. Another replica deciding for them this instant: asked again shortly."""
        for _ in range(NAMED_TRIES):
            claim = self._claim(engagement, [target], [True])
            result = await self.store.reserve_slot(claim, self.clock.now())
            if result.associate_id:
                if engagement.state == "assigned":
                    await self._settle(target)  # the end that freed the slot reaches them first (desk_shared.py)
                    return True
                # Ended while storage decided: nothing to hand over, the slot goes back.
                await self.store.release_slot(engagement.engagement_id, target.associate_id, self.clock.now())
                raise InvalidInput("transfer.engagement_id", "only an engagement in progress can be transferred")
            if not result.contended:
                return False
            await asyncio.sleep(RETRY_AFTER)
        return False

    async def complete_transfer(self, associate: AssociateSession, engagement_id: str) -> None:
        """After a consult: the consulted associate becomes the owner."""
        engagement = self._of_associate(associate, engagement_id)
        consulted = next((a for a, role in engagement.participants.values() if role == "consult"), None)
        if consulted is None:
            raise InvalidInput("complete_transfer.engagement_id", "no consult in progress on this engagement")
        now = self.clock.now()
        # The consult part ends quietly: the consulted associate goes on as the owner, not out. The slot their
        # consult held (key: the engagement) becomes the owner's in place: never free in between, here or in
        # storage, for anyone to be offered.
        self._part(engagement, consulted, "consult", now, "transfer_completed", "", quiet=True, keep_slot=True)
        try:
            await self._hand_over(
                engagement, associate, consulted, "", "consult", engagement.consult_note, reserved=True
            )
        except BaseException:
            if engagement.associate is not consulted:
                self._free(consulted, engagement.engagement_id, self.clock.now())
            raise

    async def _hand_over(
        self,
        engagement: Engagement,
        owner: AssociateSession,
        target: AssociateSession | None,
        to_queue: str,
        mode: str,
        note: str,
        reserved: bool = False,
    ) -> None:
        """`reserved`: `target` already holds the engagement's slot (storage gave it to a named transfer across
        replicas, or their consult held it)."""
        now = self.clock.now()
        info = TransferInfo(owner.associate_id, target.associate_id if target else "", to_queue, mode, note, now)
        # The engagement.transferred event as it will read once handed over, stored with the transfer.
        after = replace(engagement, state="queued", associate=None, transfers=[*engagement.transfers, info])
        hooks = self._webhooks("engagement.transferred", self._payload("engagement.transferred", after))
        await self.store.save_transfer(
            TransferRecord(
                engagement.engagement_id, now, info.from_associate_id, info.to_associate_id, to_queue, mode, note
            ),
            webhooks=hooks,
        )
        if hooks:
            self._wake_outbox()
        engagement.transfers.append(info)
        engagement.consult_note = ""
        self._free(owner, engagement.engagement_id, now)
        owner.send(EngagementEnded(engagement.engagement_id, "transferred", "associate"))
        engagement.state, engagement.associate, engagement.assigned_at = "queued", None, None
        # Not straight back to whoever passed it on, whatever queue it lands in.
        engagement.rejected_by = {owner.associate_id}
        self._emit("engagement.transferred", engagement)
        log.info(
            "engagement.transferred",
            engagement_id=engagement.engagement_id,
            from_associate_id=owner.associate_id,
            to_associate_id=info.to_associate_id,
            to_queue=to_queue,
            mode=mode,
        )
        if target is not None:
            self._assign(engagement, target, reserved=reserved)
        else:
            engagement.queue = to_queue
            self._save(engagement)
            self._notify_device(engagement)
            self._route(engagement)
        self._drain(owner)
