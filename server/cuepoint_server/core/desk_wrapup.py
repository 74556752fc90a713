"""The end of an engagement: wrap-up by the associate or the user leaving, and the outcome watched afterwards."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from ..engine.state import DeviceState, Scalar
from .desk_routing import Routing
from .engagement_model import Engagement
from .errors import InvalidInput, NotFound, PermissionDenied
from .model import (
    EngagementEnded,
)
from .sessions import AssociateSession, DeviceSession

__all__ = ["WrapUp"]

log = structlog.get_logger("cuepoint.core.engagements")


class WrapUp(Routing):
    async def wrap_up(
        self, associate: AssociateSession, engagement_id: str, disposition: str, notes: str, outcome: str = ""
    ) -> None:
        """End (or, after the user left, complete) an engagement with a disposition, notes and optionally
        the outcome the associate records: one of the queue's `outcomes`, stored with the wrap-up."""
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.associate is not associate:
            raise PermissionDenied(f"engagement {engagement_id!r} is not assigned to you")
        if not disposition or len(disposition) > 64:
            raise InvalidInput("end.disposition", "required; at most 64 characters")
        queue = self.engine.scenarios.routing.queue(engagement.queue)
        if queue.dispositions and disposition not in queue.dispositions:
            codes = ", ".join(queue.dispositions)
            raise InvalidInput("end.disposition", f"queue {engagement.queue!r} takes one of: {codes}")
        success = False
        if outcome:
            choices = {o.id: o.success for o in queue.wrap_up_outcomes}
            if outcome not in choices:
                raise InvalidInput("end.outcome", f"queue {engagement.queue!r} records one of: {', '.join(choices)}")
            success = choices[outcome]
        engagement.disposition, engagement.notes = disposition, notes[:4000]
        engagement.wrapped_up_at = self.clock.now()
        engagement.wrap_up_outcome, engagement.wrap_up_success = outcome, success
        if engagement.state == "ended":
            # The user left first; this is the associate's wrap-up.
            await self._persist(engagement, "engagement.wrapped_up")
            self._emit("engagement.wrapped_up", engagement)
            return
        now = self.clock.now()
        engagement.state, engagement.ended_at, engagement.ended_by = "ended", now, "associate"
        self._handled(engagement, now)
        self._free(associate, engagement_id, now)
        self._release_device(engagement)
        self._dismiss_participants(engagement, "associate", now)
        self._watch_outcome(engagement, now)
        await self._persist(engagement, "engagement.ended", "engagement.wrapped_up")
        associate.send(EngagementEnded(engagement_id, disposition, "associate"))
        self._notify_device(engagement)
        self._ask_feedback(engagement)
        self._emit("engagement.ended", engagement)
        self._emit("engagement.wrapped_up", engagement)
        log.info("engagement.ended", engagement_id=engagement_id, disposition=disposition)
        self._drain(associate)

    async def end_by_user(self, session: DeviceSession, engagement_id: str) -> None:
        engagement = self._of_device(session, engagement_id, "end_engagement.engagement_id")
        if not engagement.open:
            return
        now = self.clock.now()
        self.router.unwait(engagement.queue, engagement_id)
        self._withdraw_offer(engagement)
        engagement.state, engagement.ended_at, engagement.ended_by = "ended", now, "user"
        engagement.disposition = engagement.disposition or "user_ended"
        associate = engagement.associate
        if associate is not None:
            self._handled(engagement, now)
            self._free(associate, engagement_id, now)
            associate.send(EngagementEnded(engagement_id, engagement.disposition, "user"))
        self._release_device(engagement)
        self._dismiss_participants(engagement, "user", now)
        self._watch_outcome(engagement, now)
        await self._persist(engagement, "engagement.ended")
        self._notify_device(engagement)
        self._ask_feedback(engagement)
        self._emit("engagement.ended", engagement)
        if associate is not None:
            self._drain(associate)

    def forget_erased(self, subject: str, device_ids: set[str]) -> None:
        """Erasure: the user's engagements (and those of the devices they used) end now and are never stored
        again; storage has just deleted them. Both sides are told it ended ("erased")."""
        now = self.clock.now()
        for engagement in list(self._engagements.values()):
            if engagement.subject != subject and engagement.device_id not in device_ids:
                continue
            associate = engagement.associate
            if engagement.open:
                self.router.unwait(engagement.queue, engagement.engagement_id)
                self._withdraw_offer(engagement)
                engagement.state, engagement.ended_at, engagement.ended_by = "ended", now, "system"
                engagement.disposition = "erased"
                if associate is not None:
                    self._free(associate, engagement.engagement_id, now)
                    associate.send(EngagementEnded(engagement.engagement_id, "erased", "system"))
                self._release_device(engagement)
                self._dismiss_participants(engagement, "system", now)
                self._notify_device(engagement)
            self._forget_outcome(engagement)
            del self._engagements[engagement.engagement_id]
            if associate is not None:
                self._drain(associate)

    def _ask_feedback(self, engagement: Engagement) -> None:
        """Overridden by the feedback part of the desk (desk_feedback.py)."""

    def _watch_outcome(self, engagement: Engagement, now: float) -> None:
        check = engagement.outcome_check
        if check is None:
            return
        engagement.outcome = "pending"
        self._awaiting_outcome.setdefault(engagement.device_id, []).append(engagement)
        self.clock.call_at(now + check.within, lambda: self._outcome_due(engagement))

    def _outcome_due(self, engagement: Engagement) -> None:
        if engagement.outcome != "pending":
            return
        engagement.outcome = "not_achieved"
        self._forget_outcome(engagement)
        self._save(engagement, "engagement.outcome")
        self._emit("engagement.outcome", engagement)

    def _forget_outcome(self, engagement: Engagement) -> None:
        waiting = self._awaiting_outcome.get(engagement.device_id, [])
        if engagement in waiting:
            waiting.remove(engagement)
        if not waiting:
            self._awaiting_outcome.pop(engagement.device_id, None)

    def awaits_outcome(self, device_id: str) -> bool:
        """Whether an ended engagement of this device still waits for its outcome event."""
        return bool(self._awaiting_outcome.get(device_id))

    def observe(self, state: DeviceState, name: str, props: Mapping[str, Scalar], at: float) -> None:
        """An event arrived: settle engagements waiting for it as their outcome."""
        waiting = self._awaiting_outcome.get(state.device_id)
        if not waiting:
            return
        for engagement in list(waiting):
            check = engagement.outcome_check
            ended = engagement.ended_at or 0.0
            if check is not None and check.event == name and check.where(props) and ended <= at <= ended + check.within:
                engagement.outcome = "achieved"
                self._forget_outcome(engagement)
                self._save(engagement, "engagement.outcome")
                self._emit("engagement.outcome", engagement)
                log.info("engagement.outcome", engagement_id=engagement.engagement_id, outcome="achieved")
