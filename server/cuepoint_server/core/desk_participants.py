"""More than one associate on an engagement: conference, consult, and supervisors.

The owner (``Engagement.associate``) routes and wraps up the engagement. Others join it in a role:
``conference`` (added by the owner, chats with the user), ``consult`` (asked before a transfer, talks to
the associates only), ``monitor`` (a supervisor watching read-only) and ``barge`` (a supervisor who
joined the conversation). Every joining and leaving is stored (engagement_participants), so who saw an
engagement, and when, can be audited; whispers reach the associates' side only and never the device.

A supervisor's monitor, whisper and barge-in, allowed or refused, is also an entry of the audit trail
(audit_log, AdminService.ListAuditEntries), written before anyone is told: watching someone's work is an
act of oversight and is accountable like an admin's. A whisper's text stays out of the trail (it may
quote the user); its length is kept.
"""

from __future__ import annotations

import structlog

from ..storage import ParticipationRecord
from ..storage.audit_log import AuditRecord
from .desk_wrapup import WrapUp
from .engagement_model import Engagement
from .errors import CoreError, InvalidInput, NotFound, PermissionDenied
from .model import AssociateSignIn, EngagementEnded, EngagementJoined, SupervisedSnapshot
from .sessions import AssociateSession

__all__ = ["Participants"]

log = structlog.get_logger("cuepoint.core.engagements")

# Roles whose chat the user sees.
SPEAKING = ("conference", "barge")
# Roles that take one of the associate's engagement slots (supervisors watch on top of their own work). A
# joining in one of them is never refused for want of room (the owner chose that colleague), but counts
# against their capacity while it lasts: nothing new is offered them beyond it. Across replicas the slot is
# stored with the joining, in one transaction (Store.join_holding), before anyone is told.
HOLDING = ("conference", "consult")


class Participants(WrapUp):
    def sign_in(self, request: AssociateSignIn) -> AssociateSession:
        associate = super().sign_in(request)
        if associate.supervised_queues:
            self._supervisors.append(associate)
            now = self.clock.now()
            # A supervisor starts with the open engagements of their queues, then hears of every change.
            for engagement in self._engagements.values():
                if (
                    engagement.open
                    and engagement.queue in associate.supervised_queues
                    and associate.serves(engagement.app_id)
                ):
                    associate.send(
                        SupervisedSnapshot(
                            engagement.engagement_id,
                            engagement.queue,
                            engagement.state,
                            engagement.channel,
                            engagement.associate.associate_id if engagement.associate else "",
                            engagement.participant_infos(),
                            now,
                        )
                    )
        return associate

    def sign_out(self, associate: AssociateSession) -> None:
        if associate in self._supervisors:
            self._supervisors.remove(associate)
        now = self.clock.now()
        for engagement in list(self._engagements.values()):
            joined = engagement.participants.get(associate.associate_id)
            if joined is not None and joined[0] is associate:
                self._part(engagement, associate, joined[1], now, "signed_out", "")
        super().sign_out(associate)

    # -- joining ------------------------------------------------------------------

    async def add_participant(self, owner: AssociateSession, engagement_id: str, associate_id: str) -> None:
        """Conference: the owner adds another signed-in associate."""
        engagement = self._of_associate(owner, engagement_id)
        target = self._joinable(engagement, associate_id, "add_participant")
        await self._join(engagement, target, "conference")

    async def monitor(self, supervisor: AssociateSession, engagement_id: str) -> None:
        engagement = await self._audited_supervision(supervisor, engagement_id, "monitor")
        joined = engagement.participants.get(supervisor.associate_id)
        if joined is not None and joined[0] is supervisor:
            return  # already watching (or barged in): nothing changes
        await self._join(engagement, supervisor, "monitor")

    async def barge(self, supervisor: AssociateSession, engagement_id: str) -> None:
        engagement = await self._audited_supervision(supervisor, engagement_id, "barge")
        joined = engagement.participants.get(supervisor.associate_id)
        if joined is not None and joined[0] is supervisor:
            if joined[1] == "barge":
                return
            # From watching to talking: the monitoring part ends, the barge-in part starts.
            self._part(engagement, supervisor, joined[1], self.clock.now(), "barged_in", "", quiet=True)
        await self._join(engagement, supervisor, "barge")
        # The user is told someone else joined, in the conversation itself.
        await self.chat("system", engagement, f"{supervisor.display_name} joined the conversation")

    def _joinable(self, engagement: Engagement, associate_id: str, where: str) -> AssociateSession:
        if engagement.state != "assigned":
            raise InvalidInput(f"{where}.engagement_id", "the engagement is not in progress")
        target = self.router.find(associate_id)
        if target is None or target.closed:
            raise InvalidInput(f"{where}.associate_id", f"associate {associate_id!r} is not signed in")
        if target is engagement.associate or associate_id in engagement.participants:
            raise InvalidInput(f"{where}.associate_id", f"associate {associate_id!r} is already on this engagement")
        if not target.serves(engagement.app_id):
            raise PermissionDenied(f"associate {associate_id!r} does not serve app {engagement.app_id!r}")
        return target

    async def _audited_supervision(self, supervisor: AssociateSession, engagement_id: str, action: str) -> Engagement:
        """The supervised engagement, the attempt recorded in the audit trail either way before it acts."""
        try:
            engagement = self._supervised(supervisor, engagement_id, f"{action}.engagement_id")
        except CoreError as exc:
            await self._audit_supervision(supervisor, action, engagement_id, outcome="denied", detail=str(exc))
            raise
        await self._audit_supervision(supervisor, action, engagement_id, queue=engagement.queue)
        return engagement

    async def _audit_supervision(
        self,
        associate: AssociateSession,
        action: str,
        engagement_id: str,
        *,
        outcome: str = "ok",
        detail: str = "",
        queue: str = "",
        after: dict[str, object] | None = None,
    ) -> None:
        roles = ("supervisor",) if associate.supervised_queues else ()
        await self.store.append_audit(
            AuditRecord(
                time=self.clock.now(),
                actor=f"associate:{associate.associate_id}",
                action=f"engagement.{action}",
                target=f"engagement:{engagement_id}",
                outcome=outcome,
                detail=detail,
                roles=roles,
                after={"queue": queue, **(after or {})} if queue else dict(after or {}),
            )
        )

    def _supervised(self, supervisor: AssociateSession, engagement_id: str, field_name: str) -> Engagement:
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.queue not in supervisor.supervised_queues or not supervisor.serves(engagement.app_id):
            raise PermissionDenied(f"you do not supervise queue {engagement.queue!r}")
        if not engagement.open:
            raise InvalidInput(field_name, "the engagement has ended")
        return engagement

    async def _join(self, engagement: Engagement, associate: AssociateSession, role: str) -> None:
        now = self.clock.now()
        record = ParticipationRecord(engagement.engagement_id, associate.associate_id, role, now, None, "", "")
        # Stored before anyone is told: the audit of who saw the engagement is never behind what they saw.
        if role in HOLDING and self.shared:
            # With the slot it takes, so no replica offers that slot meanwhile; in the job line, after any
            # release of the same slot (a participant who left this engagement a moment ago) queued before.
            channel, queue, replica = engagement.channel, engagement.queue, self.replica_id
            await self._slot_now(lambda: self.store.join_holding(record, channel, queue, replica))
        else:
            await self.store.save_participation(record)
        self._joined_at[(engagement.engagement_id, associate.associate_id)] = now
        engagement.participants[associate.associate_id] = (associate, role)
        if role in HOLDING:
            associate.hold(associate.active, engagement.engagement_id, engagement.channel, engagement.queue)
        associate.send(EngagementJoined(engagement.view(role=role)))
        self._tell_supervisors(engagement)
        self._emit("engagement.participant_joined", engagement)
        log.info(
            "engagement.joined", engagement_id=engagement.engagement_id, associate_id=associate.associate_id, role=role
        )

    # -- leaving ------------------------------------------------------------------

    async def leave(self, associate: AssociateSession, engagement_id: str, disposition: str, notes: str) -> None:
        """A participant wraps up their own part; the engagement goes on with its owner."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        joined = engagement.participants.get(associate.associate_id)
        if joined is None or joined[0] is not associate:
            raise PermissionDenied(f"you are not taking part in engagement {engagement_id!r}")
        if len(disposition) > 64:
            raise InvalidInput("leave.disposition", "at most 64 characters")
        self._part(engagement, associate, joined[1], self.clock.now(), disposition or "left", notes[:4000])
        self._drain(associate)

    def _part(
        self,
        engagement: Engagement,
        associate: AssociateSession,
        role: str,
        now: float,
        disposition: str,
        notes: str,
        *,
        quiet: bool = False,
        keep_slot: bool = False,
    ) -> None:
        """`keep_slot`: the associate goes on holding the engagement's slot (a consult becoming its owner)."""
        del engagement.participants[associate.associate_id]
        if role in HOLDING and not keep_slot:
            self._free(associate, engagement.engagement_id, now)
        joined_at = self._joined_at.pop((engagement.engagement_id, associate.associate_id), now)
        self._spawn(
            self.store.save_participation(
                ParticipationRecord(
                    engagement.engagement_id, associate.associate_id, role, joined_at, now, disposition, notes
                )
            )
        )
        if quiet:
            return
        associate.send(EngagementEnded(engagement.engagement_id, disposition, "associate"))
        self._tell_supervisors(engagement)
        self._emit("engagement.participant_left", engagement)

    # -- talking --------------------------------------------------------------------

    def speaking_engagement(self, associate: AssociateSession, engagement_id: str) -> Engagement:
        """The engagement, if this associate may chat with its user: the owner, a conference or barge-in."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.associate is associate:
            return engagement
        joined = engagement.participants.get(associate.associate_id)
        if joined is not None and joined[0] is associate:
            if joined[1] in SPEAKING:
                return engagement
            raise PermissionDenied(f"as {joined[1]} on engagement {engagement_id!r} you may whisper, not chat")
        raise PermissionDenied(f"engagement {engagement_id!r} is not assigned to you")

    async def whisper(self, associate: AssociateSession, engagement_id: str, text: str) -> None:
        """To the associates on the engagement only: its owner, participants, and the sender."""
        engagement = self._engagements.get(engagement_id)
        on_it = engagement is not None and (
            engagement.associate is associate
            or (
                associate.associate_id in engagement.participants
                and engagement.participants[associate.associate_id][0] is associate
            )
        )
        supervises = engagement is not None and (
            engagement.queue in associate.supervised_queues and associate.serves(engagement.app_id)
        )
        if engagement is None or (not on_it and not supervises):
            error: CoreError = (
                NotFound(f"no engagement {engagement_id!r}")
                if engagement is None
                else PermissionDenied(f"you are not on engagement {engagement_id!r} and do not supervise its queue")
            )
            await self._audit_supervision(associate, "whisper", engagement_id, outcome="denied", detail=str(error))
            raise error
        line = self._line("whisper", "associate", engagement, text, associate, whisper=True)
        # On record before it is heard: who whispered, as what, and how much (not what: it may quote the user).
        joined = engagement.participants.get(associate.associate_id)
        as_role = "owner" if engagement.associate is associate else joined[1] if on_it and joined else "supervisor"
        await self._audit_supervision(
            associate, "whisper", engagement_id, queue=engagement.queue, after={"as": as_role, "chars": len(text)}
        )
        recipients = engagement.associates()
        if associate not in recipients:
            recipients.append(associate)  # a supervisor whispering without watching still sees their line
        for recipient in recipients:
            recipient.send(line)
        # Whispers are not part of the user's transcript; who whispered to whom is still on record.
        log.info("engagement.whisper", engagement_id=engagement_id, associate_id=associate.associate_id)
