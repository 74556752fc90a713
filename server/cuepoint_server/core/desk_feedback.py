"""Feedback after an engagement: ask for a rating when it ends, store the device's answer once.

The question comes from the scenario (cue.feedback) or, failing that, the engagement's queue
(routing.queues[].feedback). An answer is checked against that setting when it arrives, from the
stored engagement, so it is accepted after a restart too.
"""

from __future__ import annotations

from typing import Any

import structlog

from ..scenarios.model import FeedbackSpec
from ..storage import FeedbackRecord
from .desk_wrapup import WrapUp
from .engagement_model import Engagement
from .errors import InvalidInput
from .model import FeedbackAsked
from .sessions import DeviceSession

__all__ = ["SCORES", "Feedback"]

log = structlog.get_logger("cuepoint.core.engagements")

# Allowed scores per kind, and the question when the file gives none.
SCORES = {"csat": (1, 5), "nps": (0, 10)}
QUESTIONS = {
    "csat": "How satisfied are you with the help you got?",
    "nps": "How likely are you to recommend us to a friend or colleague?",
}
MAX_COMMENT = 1000


class Feedback(WrapUp):
    def _feedback_spec(self, scenario_id: str, queue: str) -> FeedbackSpec | None:
        scenarios = self.engine.scenarios
        scenario = scenarios.by_id.get(scenario_id)
        if scenario is not None and scenario.feedback is not None:
            return scenario.feedback
        return scenarios.routing.queue(queue).feedback

    def _ask_feedback(self, engagement: Engagement) -> None:
        """Called once the end is stored and the device told: ask for a rating if one is wanted."""
        asked = self._feedback_question(engagement.engagement_id, engagement.scenario_id, engagement.queue)
        if asked is not None:
            self._to_device(engagement, asked)

    def _feedback_question(self, engagement_id: str, scenario_id: str, queue: str) -> FeedbackAsked | None:
        """What the device is asked when the engagement ends; None if no rating is wanted."""
        spec = self._feedback_spec(scenario_id, queue)
        if spec is None:
            return None
        low, high = SCORES[spec.kind]
        return FeedbackAsked(engagement_id, spec.kind, spec.question or QUESTIONS[spec.kind], low, high, spec.comment)

    async def give_feedback(self, session: DeviceSession, engagement_id: str, score: int, comment: str) -> None:
        record = await self.store.get_engagement(engagement_id)
        if record is None or record.device_id != session.device_id:
            raise InvalidInput("feedback.engagement_id", f"no engagement {engagement_id!r} for this device")
        if record.state != "ended":
            raise InvalidInput("feedback.engagement_id", "the engagement has not ended")
        spec = self._feedback_spec(record.scenario_id, record.queue)
        if spec is None:
            raise InvalidInput("feedback.engagement_id", "no feedback was asked for this engagement")
        low, high = SCORES[spec.kind]
        if not low <= score <= high:
            raise InvalidInput("feedback.score", f"a {spec.kind} score is {low} to {high}")
        if comment and not spec.comment:
            raise InvalidInput("feedback.comment", "this question takes no comment")
        if len(comment) > MAX_COMMENT:
            raise InvalidInput("feedback.comment", f"at most {MAX_COMMENT} characters")
        if await self.store.get_feedback(engagement_id) is not None:
            # The first answer counts; a device's messages are handled in order, so this cannot race itself.
            log.info("engagement.feedback_repeated", engagement_id=engagement_id)
            return
        cue = await self.store.get_cue(record.cue_id)
        rating = FeedbackRecord(
            engagement_id=engagement_id,
            cue_id=record.cue_id,
            scenario_id=record.scenario_id,
            queue=record.queue,
            associate_id=record.associate_id,
            variant=cue.variant if cue is not None else "",
            kind=spec.kind,
            score=score,
            comment=comment,
            time=self.clock.now(),
        )
        payload: dict[str, Any] = {
            "type": "feedback.received",
            "engagement_id": engagement_id,
            "scenario_id": rating.scenario_id,
            "queue": rating.queue,
            "associate_id": rating.associate_id,
            "variant": rating.variant,
            "kind": rating.kind,
            "score": rating.score,
            "comment": rating.comment,
        }
        hooks = self._webhooks("feedback.received", payload)
        # Stored with its webhook before anyone hears of it; a resend for the same engagement is ignored by
        # the store, its webhook rows too.
        await self.store.save_feedback(rating, webhooks=hooks)
        if hooks:
            self._wake_outbox()
        log.info("engagement.feedback", engagement_id=engagement_id, kind=spec.kind, score=score)
        self._emit_payload("feedback.received", payload)
