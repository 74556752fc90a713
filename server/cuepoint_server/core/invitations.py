"""Associate-initiated engagement: a person invites a connected device.

From live now, an associate (or supervisor) who sees a user struggling may send that device a cue
themselves. It is a cue like any other (the same policy, the same commit-before-show path, the same
consent rules for what the associate then sees), with ``@invitation`` as its scenario, the inviter
and their reason recorded in its explanation, and the engagement it starts routed to the inviter
first while they are free.
"""

from __future__ import annotations

from typing import Any

import structlog

from ..engine.arbiter import INVITATION, Situation
from ..storage import CueRecord
from .errors import InvalidInput
from .evaluation import Evaluation
from .ids import ordered_id
from .model import CueOffer, InvitationResult
from .sessions import AssociateSession, DeviceSession, PendingCue

__all__ = ["INVITATION_TTL", "Invitations"]

log = structlog.get_logger("cuepoint.core")

# How long an invitation stays on the device's screen unanswered.
INVITATION_TTL = 120.0
CHANNELS = ("audio", "screen_share", "chat", "video")
MAX_MESSAGE = 500
MAX_REASON = 200


class Invitations(Evaluation):
    def holds_device(self, device_id: str) -> bool:
        """Whether the device's stream is connected to this process (an invitation for it is handled here)."""
        return device_id in self._reg.sessions

    def invite(
        self, associate: AssociateSession, device_id: str, channel: str, message: str, reason: str
    ) -> InvitationResult:
        """Offer a connected device a cue from this associate, if the policy allows it now."""
        if channel not in CHANNELS:
            raise InvalidInput("invite.channel", "must be audio, screen_share, chat or video")
        if not message.strip() or len(message) > MAX_MESSAGE:
            raise InvalidInput("invite.message", f"required; at most {MAX_MESSAGE} characters")
        if not reason.strip() or len(reason) > MAX_REASON:
            # The reason is what the funnel and the engagement's "why" show in place of conditions.
            raise InvalidInput("invite.reason", f"required; at most {MAX_REASON} characters")
        session = self._reg.sessions.get(device_id)
        if session is None or not associate.serves(session.app_id):
            # Another app's device is as unknown to this associate as one not connected.
            raise InvalidInput("invite.device_id", f"device {device_id!r} is not connected")
        now = self.clock.now()
        situation = Situation(
            subject=session.subject,
            session_id=session.session_id,
            state=session.state,
            now=now,
            policy=self.engine.scenarios.policy_for(session.app_id),
            busy=self._busy(device_id, now),
            paused=self.paused_for(session.app_id),
        )
        blocked = self.arbiter.admit_invitation(situation)
        # The decision (and the cue) commit as one unit, then the cue is shown: as for a timer's evaluation.
        unit = self._open_unit(session)
        try:
            if blocked is not None:
                self._decided(session, now, INVITATION, "blocked", blocked[0], blocked[1], "")
                log.info(
                    "invitation.blocked", device_id=device_id, associate_id=associate.associate_id, reason=blocked[0]
                )
                return InvitationResult(device_id, "", blocked[0], blocked[1])
            return self._send_invitation(associate, session, channel, message, reason, now)
        finally:
            self._track(session, self._commit_unit(session, unit))

    def _send_invitation(
        self, associate: AssociateSession, session: DeviceSession, channel: str, message: str, reason: str, now: float
    ) -> InvitationResult:
        device_id = session.device_id
        offer = CueOffer(
            cue_id=ordered_id(),
            scenario_id=INVITATION,
            message=message,
            channel=channel,
            upgrades=(),
            created_at=now,
            expires_at=now + INVITATION_TTL,
        )
        why: dict[str, Any] = {
            "scenario_id": INVITATION,
            "scenario_name": f"Invitation from {associate.display_name}",
            "scenario_file": "",
            "priority": 0,
            # The inviter's first queue that may hold this app's engagements (never another app's queue).
            "queue": next(
                (q for q in associate.queues if self.engine.scenarios.routing.admits(q, session.app_id)), "default"
            ),
            # In place of the conditions that held: who invited the user, and why (the associate's "why").
            "conditions": [["invitation", f"{associate.display_name} invited the user: {reason}"]],
            "signal_ids": [],
            "blocked": [],
            "segments": self.engine.segments_of(session.state, now),
            "milestones": sorted(session.state.milestones),
            "cue": offer.content(),
            "invited_by": associate.associate_id,
            "reason": reason,
        }
        pending = PendingCue(offer, INVITATION, why)
        pending.expiry = self.clock.call_at(offer.expires_at, lambda: self._expire(device_id, offer.cue_id))
        self._reg.pending[device_id] = pending
        self.arbiter.remember_offer(session.subject, INVITATION, now, session.session_id)
        # Shown only once the cue and its decision are committed, like a scenario's.
        self._stage_offer(
            session,
            CueRecord(
                cue_id=offer.cue_id,
                scenario_id=INVITATION,
                app_id=session.app_id,
                device_id=device_id,
                subject=session.subject,
                session_id=session.session_id,
                created_at=now,
                expires_at=offer.expires_at,
                channel=channel,
                message=message,
                status="offered",
                responded_at=None,
                explanation=why,
            ),
            offer,
        )
        self._decided(session, now, INVITATION, "offered", "invited", reason, offer.cue_id)
        log.info("invitation.sent", device_id=device_id, associate_id=associate.associate_id, cue_id=offer.cue_id)
        return InvitationResult(device_id, offer.cue_id)
