"""An engagement in memory, and its context as stored JSON (for restore after a restart)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..clock import TimerHandle
from ..scenarios.compiler import OutcomeCheck, RuleMatch
from ..storage import EngagementRecord
from .model import (
    ChatLine,
    CueOffer,
    EngagementContext,
    EngagementView,
    JourneyItem,
    ParticipantInfo,
    PriorCue,
    PriorEngagement,
    TransferInfo,
)
from .sessions import AssociateSession

__all__ = ["TRANSCRIPT_KEPT", "Engagement", "EngagementEvent", "context_from_json", "context_json"]

# Chat lines an engagement keeps in memory for associates who receive or join it later.
TRANSCRIPT_KEPT = 200

# (event type, payload): engagement.queued / assigned / transferred / ended / wrapped_up / outcome, for webhooks.
EngagementEvent = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class Engagement:
    engagement_id: str
    cue_id: str
    app_id: str
    device_id: str
    session_id: str
    subject: str
    scenario_id: str
    queue: str
    priority: int
    skills: tuple[str, ...]
    channel: str
    allowed_channels: tuple[str, ...]
    created_at: float
    context: EngagementContext
    outcome_check: OutcomeCheck | None
    state: str = "queued"  # queued | assigned | ended | callback_requested
    # A callback the user chose (desk_callbacks.py): due at callback_at, then queued again as kind "callback".
    callback_at: float | None = None
    callback_number: str = ""
    callback_timer: TimerHandle | None = None
    associate: AssociateSession | None = None
    assigned_at: float | None = None
    ended_at: float | None = None
    ended_by: str = ""
    # When the associate wrapped it up (handling-time reports); None until then.
    wrapped_up_at: float | None = None
    disposition: str = ""
    notes: str = ""
    outcome: str = ""
    # Recorded by the associate at wrap-up: one of the queue's outcomes, and whether it counts as success.
    wrap_up_outcome: str = ""
    wrap_up_success: bool = False
    rejected_by: set[str] = field(default_factory=set)
    offered_to: AssociateSession | None = None
    offer_timer: TimerHandle | None = None
    # When the offer to `offered_to` lapses (its timer row's due time across replicas, desk_timers.py).
    offer_due: float | None = None
    fallback_timer: TimerHandle | None = None
    fallback_offered: tuple[str, ...] = ()
    # Across replicas: its fallback row is being marked done (desk_timers.py); offered once that commits.
    fallback_firing: bool = False
    # Across replicas: its fallback row is armed with this replica as its owner (with the engagement's accept,
    # or re-owned by an adopter), so arming the alarm writes nothing and an assignment settles it.
    fallback_row: bool = False
    # The user's answer that kept it open ("chat"), stored with the change: never offered the fallback again.
    fallback_choice: str = ""
    pending_upgrades: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Associates taking part besides the owner: associate id -> (session, role).
    participants: dict[str, tuple[AssociateSession, str]] = field(default_factory=dict)
    transfers: list[TransferInfo] = field(default_factory=list)
    # The note of a consult transfer in progress, carried to its completion.
    consult_note: str = ""
    # Who invited the user (an associate-initiated engagement): routed to them first while they are free.
    preferred_associate: str = ""
    # The conversation so far (whispers excluded), for whoever receives or joins the engagement
    # later; the newest TRANSCRIPT_KEPT lines, the full transcript is in storage.
    transcript: list[ChatLine] = field(default_factory=list)
    # The device's events since it was assigned (the live journey), the newest TRANSCRIPT_KEPT, for a
    # desk that reloads and shows the engagement again.
    journey_since: list[JourneyItem] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.state in ("queued", "assigned")

    @property
    def kind(self) -> str:
        return "callback" if self.callback_at is not None else "live"

    def view(self, role: str = "owner") -> EngagementView:
        return EngagementView(
            engagement_id=self.engagement_id,
            cue_id=self.cue_id,
            queue=self.queue,
            state=self.state,
            channel=self.channel,
            created_at=self.created_at,
            associate_id=self.associate.associate_id if self.associate else "",
            associate_name=self.associate.display_name if self.associate else "",
            context=self.context,
            transcript=tuple(self.transcript),
            transfers=tuple(self.transfers),
            role=role,
            participants=self.participant_infos(),
            kind=self.kind,
            callback_at=self.callback_at,
            callback_number=self.callback_number,
            journey_since=tuple(self.journey_since),
        )

    def participant_infos(self) -> tuple[ParticipantInfo, ...]:
        return tuple(ParticipantInfo(a.associate_id, a.display_name, role) for a, role in self.participants.values())

    def associates(self) -> list[AssociateSession]:
        """Everyone on the associates' side: the owner first, then the participants."""
        people = [self.associate] if self.associate is not None else []
        people.extend(a for a, _ in self.participants.values() if a is not self.associate)
        return people

    def record(self) -> EngagementRecord:
        return EngagementRecord(
            engagement_id=self.engagement_id,
            cue_id=self.cue_id,
            app_id=self.app_id,
            device_id=self.device_id,
            session_id=self.session_id,
            queue=self.queue,
            state=self.state,
            channel=self.channel,
            created_at=self.created_at,
            assigned_at=self.assigned_at,
            ended_at=self.ended_at,
            associate_id=self.associate.associate_id if self.associate else "",
            disposition=self.disposition,
            notes=self.notes,
            context=context_json(self.context),
            subject=self.subject,
            scenario_id=self.scenario_id,
            priority=self.priority,
            outcome=self.outcome,
            ended_by=self.ended_by,
            callback_at=self.callback_at,
            callback_number=self.callback_number,
            wrapped_up_at=self.wrapped_up_at,
            wrap_up_outcome=self.wrap_up_outcome,
            wrap_up_success=self.wrap_up_success,
            fallback_choice=self.fallback_choice,
        )


def context_json(ctx: EngagementContext) -> dict[str, Any]:
    cue: CueOffer = ctx.cue
    return {
        "app_id": ctx.app_id,
        "device_id": ctx.device_id,
        "user_id": ctx.user_id,
        "context": dict(ctx.context),
        "user_attributes": dict(ctx.user_attributes),
        "consent": ctx.consent,
        "journey": [
            {"signal_id": j.signal_id, "time": j.time, "kind": j.kind, "name": j.name, "payload": j.payload}
            for j in ctx.journey
        ],
        "trigger": ctx.trigger,
        "cue": {
            "cue_id": cue.cue_id,
            "scenario_id": cue.scenario_id,
            "message": cue.message,
            "channel": cue.channel,
            "upgrades": list(cue.upgrades),
            "created_at": cue.created_at,
            "expires_at": cue.expires_at,
            "title": cue.title,
        },
        "redacted_fields": list(ctx.redacted_fields),
        "prior_engagements": [
            {
                "engagement_id": p.engagement_id,
                "created_at": p.created_at,
                "scenario_id": p.scenario_id,
                "disposition": p.disposition,
                "notes": p.notes,
                "outcome": p.outcome,
                "wrap_up_outcome": p.wrap_up_outcome,
            }
            for p in ctx.prior_engagements
        ],
        "priority": ctx.priority,
        "user_verified": ctx.user_verified,
        "scores": ctx.scores,
        "prior_cues": [
            {"cue_id": c.cue_id, "created_at": c.created_at, "scenario_id": c.scenario_id, "status": c.status}
            for c in ctx.prior_cues
        ],
        "routing_rule": None if ctx.routing_rule is None else ctx.routing_rule.as_dict(),
    }


def context_from_json(data: Mapping[str, Any]) -> EngagementContext:
    """The inverse of context_json, for engagements restored after a restart."""
    cue = data.get("cue", {})
    return EngagementContext(
        app_id=data.get("app_id", ""),
        device_id=data.get("device_id", ""),
        user_id=data.get("user_id", ""),
        context=dict(data.get("context", {})),
        user_attributes=dict(data.get("user_attributes", {})),
        consent=data.get("consent", "essential"),
        journey=tuple(
            JourneyItem(j["signal_id"], j["time"], j["kind"], j["name"], j["payload"]) for j in data.get("journey", [])
        ),
        trigger=dict(data.get("trigger", {})),
        cue=CueOffer(
            cue_id=cue.get("cue_id", ""),
            scenario_id=cue.get("scenario_id", ""),
            message=cue.get("message", ""),
            channel=cue.get("channel", "chat"),
            upgrades=tuple(cue.get("upgrades", ())),
            created_at=cue.get("created_at", 0.0),
            expires_at=cue.get("expires_at", 0.0),
            title=cue.get("title", ""),
        ),
        redacted_fields=tuple(data.get("redacted_fields", ())),
        prior_engagements=tuple(
            PriorEngagement(
                p.get("engagement_id", ""),
                p.get("created_at", 0.0),
                p.get("scenario_id", ""),
                p.get("disposition", ""),
                p.get("notes", ""),
                p.get("outcome", ""),
                p.get("wrap_up_outcome", ""),
            )
            for p in data.get("prior_engagements", [])
        ),
        priority=int(data.get("priority", 0)),
        user_verified=bool(data.get("user_verified", False)),
        scores=dict(data.get("scores", {})),
        prior_cues=tuple(
            PriorCue(c.get("cue_id", ""), c.get("created_at", 0.0), c.get("scenario_id", ""), c.get("status", ""))
            for c in data.get("prior_cues", [])
        ),
        routing_rule=RuleMatch.from_dict(data["routing_rule"]) if data.get("routing_rule") else None,
    )
