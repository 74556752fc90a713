"""An associate's connection drops for a moment (a page reload, a network blip): what they hold stays theirs.

Signing out re-queues an associate's engagements at once, which is right when they leave, and wrong when
their browser only reloads. A detached associate keeps their engagements for a grace period and takes
nothing new meanwhile (offers they had not answered go to the next associate); if they come back in time
(resume), they carry on with the same engagements and the device never notices. If not, they are signed
out as usual and their engagements go back to their queues.
"""

from __future__ import annotations

import structlog

from .desk_participants import Participants
from .engagement_model import Engagement
from .model import EngagementEnded, EngagementView
from .sessions import AssociateSession

__all__ = ["Resume"]

log = structlog.get_logger("cuepoint.core.engagements")


class Resume(Participants):
    def detach(self, associate: AssociateSession, grace: float) -> None:
        """The associate's connection dropped: keep their engagements for `grace` seconds, offer them nothing."""
        if grace <= 0:
            self.sign_out(associate)
            return
        associate.detached = True
        for engagement in list(self._engagements.values()):
            if engagement.offered_to is associate:
                # Nobody is there to answer the notice: the next associate gets it (this one again on resume).
                self._withdraw_offer(engagement)
                self._route(engagement)
        timer = self.clock.call_at(self.clock.now() + grace, lambda: self._grace_over(associate))
        previous = self._detached.pop(associate.associate_id, None)
        if previous is not None and previous[0] is not associate:
            previous[1].cancel()
            self.sign_out(previous[0])
        self._detached[associate.associate_id] = (associate, timer)
        log.info("associate.detached", associate_id=associate.associate_id, grace=grace)

    def resume(self, associate_id: str, queues: tuple[str, ...]) -> AssociateSession | None:
        """The same associate is back within the grace period, for the same queues: their session again,
        or None (then sign in afresh)."""
        found = self._detached.get(associate_id)
        if found is None:
            return None
        associate, timer = found
        if queues and tuple(queues) != associate.queues:
            return None
        del self._detached[associate_id]
        timer.cancel()
        associate.detached = False
        log.info("associate.resumed", associate_id=associate_id)
        return associate

    def holding(self, associate: AssociateSession) -> list[EngagementView | EngagementEnded]:
        """What a resumed associate's desk shows again: each engagement they own, with its transcript,
        followed by its end when the user left meanwhile and the associate has still to wrap it up."""
        out: list[EngagementView | EngagementEnded] = []
        for engagement in sorted(self._engagements.values(), key=lambda e: e.created_at):
            if engagement.associate is not associate:
                continue
            if engagement.state == "assigned":
                out.append(engagement.view())
            elif self._awaits_wrap_up(engagement):
                out.append(engagement.view())
                out.append(EngagementEnded(engagement.engagement_id, engagement.disposition, "user"))
        return out

    def after_resume(self, associate: AssociateSession) -> None:
        """Once the desk shows what it holds: offer it what waits in its queues."""
        self._drain(associate)

    def _grace_over(self, associate: AssociateSession) -> None:
        found = self._detached.get(associate.associate_id)
        if found is None or found[0] is not associate:
            return
        del self._detached[associate.associate_id]
        log.info("associate.grace_over", associate_id=associate.associate_id)
        self.sign_out(associate)

    @staticmethod
    def _awaits_wrap_up(engagement: Engagement) -> bool:
        return engagement.state == "ended" and engagement.ended_by == "user" and engagement.disposition == "user_ended"

