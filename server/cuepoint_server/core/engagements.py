"""Engagements: from an accepted cue to a human associate and back.

Routing (queues, rules, skills, priority, longest-idle associate), manual
claims and rejects, the fallback when nobody is free in time, chat relay,
channel upgrades that need the other side's consent, call-setup signalling
relay, wrap-up and the engagement's outcome. Knows nothing of gRPC.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..clock import Clock, TimerHandle
from ..engine.engine import Engine
from ..engine.state import DeviceState, Scalar
from ..scenarios.compiler import OutcomeCheck
from ..storage import ChannelChangeRecord, ChatRecord, EngagementRecord, SqliteStore
from .errors import InvalidInput, NotFound, PermissionDenied
from .model import (
    CALL_SIGNAL_KINDS,
    FALLBACKS,
    AssociateSignIn,
    CallSignalRelay,
    ChannelChanged,
    ChatLine,
    CueOffer,
    EngagementContext,
    EngagementEnded,
    EngagementOffered,
    EngagementUpdate,
    EngagementView,
    FallbackOffered,
    JourneyItem,
    OfferWithdrawn,
    PriorEngagement,
    UpgradeAsk,
)
from .routing import Router
from .sessions import AssociateSession, DeviceSession, PendingCue

__all__ = ["EngagementDesk", "EngagementEvent"]

log = structlog.get_logger("cuepoint.core.engagements")

MAX_CHAT = 4000
MAX_CALL_PAYLOAD = 64 * 1024
CHANNELS = ("audio", "screen_share", "chat", "video")
# (event type, payload): engagement.started / engagement.ended, for webhooks.
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
    associate: AssociateSession | None = None
    assigned_at: float | None = None
    ended_at: float | None = None
    ended_by: str = ""
    disposition: str = ""
    notes: str = ""
    outcome: str = ""
    rejected_by: set[str] = field(default_factory=set)
    offered_to: AssociateSession | None = None
    offer_timer: TimerHandle | None = None
    fallback_timer: TimerHandle | None = None
    fallback_offered: tuple[str, ...] = ()
    pending_upgrades: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.state in ("queued", "assigned")

    def view(self) -> EngagementView:
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
        )

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
        )


@dataclass(frozen=True, slots=True)
class DeskConfig:
    journey_limit: int = 50
    prior_limit: int = 10
    # Used when a queue does not set its own fallback_after; None: never.
    default_fallback_after: float | None = None


class EngagementDesk:
    def __init__(
        self,
        store: SqliteStore,
        engine: Engine,
        clock: Clock,
        sessions: Mapping[str, DeviceSession],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        config: DeskConfig | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.config = config or DeskConfig()
        self.router = Router()
        self.listeners: list[EngagementEvent] = []
        self._sessions = sessions
        self._spawn = spawn
        self._engagements: dict[str, Engagement] = {}
        self._active_by_device: dict[str, str] = {}
        self._awaiting_outcome: dict[str, list[Engagement]] = {}

    # -- lookups ------------------------------------------------------------

    def active_for(self, device_id: str) -> str | None:
        return self._active_by_device.get(device_id)

    def get(self, engagement_id: str) -> Engagement | None:
        return self._engagements.get(engagement_id)

    def count(self) -> int:
        return len(self._engagements)

    def queues_in_use(self) -> set[str]:
        return {e.queue for e in self._engagements.values() if e.state == "queued"}

    def _of_device(self, session: DeviceSession, engagement_id: str, field_name: str) -> Engagement:
        engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.device_id != session.device_id:
            raise InvalidInput(field_name, f"no engagement {engagement_id!r} for this device")
        return engagement

    def _of_associate(self, associate: AssociateSession, engagement_id: str) -> Engagement:
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.associate is not associate:
            raise PermissionDenied(f"engagement {engagement_id!r} is not assigned to you")
        return engagement

    # -- start and routing --------------------------------------------------

    async def start(self, session: DeviceSession, pending: PendingCue, now: float) -> Engagement:
        scenarios = self.engine.scenarios
        scenario = scenarios.by_id.get(pending.scenario_id)
        base_queue = str(pending.explanation.get("queue") or "default")
        queue, priority, skills = scenarios.routing.route(
            session.state,
            now,
            base_queue,
            scenario.queue_priority if scenario else 0,
            scenario.skills if scenario else (),
        )
        context = await self._context(session, pending, priority)
        engagement = Engagement(
            engagement_id=uuid.uuid4().hex,
            cue_id=pending.offer.cue_id,
            app_id=session.app_id,
            device_id=session.device_id,
            session_id=session.session_id,
            subject=session.subject,
            scenario_id=pending.scenario_id,
            queue=queue,
            priority=priority,
            skills=skills,
            channel=pending.offer.channel,
            allowed_channels=(pending.offer.channel, *pending.offer.upgrades),
            created_at=now,
            context=context,
            outcome_check=scenario.engagement_outcome if scenario else None,
        )
        self._engagements[engagement.engagement_id] = engagement
        self._active_by_device[session.device_id] = engagement.engagement_id
        await self.store.save_engagement(engagement.record())
        self._notify_device(engagement)
        log.info("engagement.queued", engagement_id=engagement.engagement_id, queue=queue, priority=priority)
        self._route(engagement)
        return engagement

    async def _context(self, session: DeviceSession, pending: PendingCue, priority: int) -> EngagementContext:
        ctx = session.state.context
        consent = session.consent
        user_id = str(ctx.get("user.id") or "")
        if user_id and consent != "none":
            # Identified users: the journey stitched across all their devices.
            journey = await self.store.journey_for_user(user_id, limit=self.config.journey_limit)
        else:
            journey = await self.store.journey(session.device_id, limit=self.config.journey_limit)
        prior = await self.store.engagements_for_subject(session.subject, limit=self.config.prior_limit)
        user_attrs: dict[str, Scalar] = {}
        redacted: list[str] = []
        for key, value in ctx.items():
            if not key.startswith("user.") or key == "user.id":
                continue
            if consent == "full" or (consent == "essential" and key == "user.tier"):
                user_attrs[key.removeprefix("user.")] = value
            else:
                redacted.append(key)
        if consent == "none" and user_id:
            redacted.append("user.id")
            user_id = ""
        return EngagementContext(
            app_id=session.app_id,
            device_id=session.device_id,
            user_id=user_id,
            context={k: v for k, v in ctx.items() if not k.startswith("user.")},
            user_attributes=user_attrs,
            consent=consent,
            journey=tuple(JourneyItem(r.signal_id, r.time, r.kind, r.name, dict(r.payload)) for r in journey),
            trigger=dict(pending.explanation),
            cue=pending.offer,
            redacted_fields=tuple(sorted(redacted)),
            prior_engagements=tuple(
                PriorEngagement(p.engagement_id, p.created_at, p.scenario_id, p.disposition, p.notes, p.outcome)
                for p in prior
            ),
            priority=priority,
        )

    def _route(self, engagement: Engagement) -> None:
        associate = self.router.pick(engagement.queue, engagement.skills, engagement.rejected_by)
        if associate is None:
            self.router.wait(
                engagement.queue, engagement.engagement_id, priority=engagement.priority, since=engagement.created_at
            )
            self._arm_fallback(engagement)
            return
        if associate.manual_claim:
            self._offer(engagement, associate)
        else:
            self._assign(engagement, associate)

    def _offer(self, engagement: Engagement, associate: AssociateSession) -> None:
        queue = self.engine.scenarios.routing.queue(engagement.queue)
        engagement.offered_to = associate
        associate.offers.add(engagement.engagement_id)
        engagement.offer_timer = self.clock.call_at(
            self.clock.now() + queue.offer_timeout, lambda: self._offer_lapsed(engagement, associate)
        )
        associate.send(EngagementOffered(engagement.view()))
        log.info("engagement.offered", engagement_id=engagement.engagement_id, associate_id=associate.associate_id)

    def _withdraw_offer(self, engagement: Engagement) -> AssociateSession | None:
        associate = engagement.offered_to
        if associate is None:
            return None
        associate.offers.discard(engagement.engagement_id)
        engagement.offered_to = None
        if engagement.offer_timer is not None:
            engagement.offer_timer.cancel()
            engagement.offer_timer = None
        return associate

    def _offer_lapsed(self, engagement: Engagement, associate: AssociateSession) -> None:
        if engagement.offered_to is not associate or engagement.state != "queued":
            return
        self._withdraw_offer(engagement)
        engagement.rejected_by.add(associate.associate_id)
        associate.send(OfferWithdrawn(engagement.engagement_id, "timeout"))
        self._route(engagement)

    def _assign(self, engagement: Engagement, associate: AssociateSession) -> None:
        now = self.clock.now()
        self.router.unwait(engagement.queue, engagement.engagement_id)
        if engagement.fallback_timer is not None:
            engagement.fallback_timer.cancel()
            engagement.fallback_timer = None
        engagement.state, engagement.associate, engagement.assigned_at = "assigned", associate, now
        associate.active.add(engagement.engagement_id)
        self._save(engagement)
        associate.send(engagement.view())
        self._notify_device(engagement)
        self._emit("engagement.started", engagement)
        log.info("engagement.assigned", engagement_id=engagement.engagement_id, associate_id=associate.associate_id)

    def _drain(self, associate: AssociateSession) -> None:
        """Give a newly free associate the best waiting engagements it can take."""
        for engagement_id in self.router.waiting(associate.queues):
            if not associate.available:
                return
            engagement = self._engagements.get(engagement_id)
            if engagement is None or engagement.state != "queued" or engagement.offered_to is not None:
                continue
            if associate.associate_id in engagement.rejected_by or not associate.skills.issuperset(engagement.skills):
                continue
            self.router.unwait(engagement.queue, engagement_id)
            if associate.manual_claim:
                self._offer(engagement, associate)
            else:
                self._assign(engagement, associate)

    def restore(self, record: EngagementRecord) -> None:
        """Re-queue an engagement left open by a stopped process; its associate must take it again."""
        if record.engagement_id in self._engagements:
            return
        context = context_from_json(record.context)
        scenario = self.engine.scenarios.by_id.get(record.scenario_id)
        engagement = Engagement(
            engagement_id=record.engagement_id,
            cue_id=record.cue_id,
            app_id=record.app_id,
            device_id=record.device_id,
            session_id=record.session_id,
            subject=record.subject,
            scenario_id=record.scenario_id,
            queue=record.queue,
            priority=record.priority,
            skills=scenario.skills if scenario else (),
            channel=record.channel,
            allowed_channels=(context.cue.channel, *context.cue.upgrades),
            created_at=record.created_at,
            context=context,
            outcome_check=scenario.engagement_outcome if scenario else None,
        )
        self._engagements[engagement.engagement_id] = engagement
        self._active_by_device[engagement.device_id] = engagement.engagement_id
        if record.state == "assigned":
            self._save(engagement)  # back to queued until someone takes it
        log.info("engagement.restored", engagement_id=engagement.engagement_id, queue=engagement.queue)
        self._route(engagement)

    # -- fallback -------------------------------------------------------------

    def _arm_fallback(self, engagement: Engagement) -> None:
        if engagement.fallback_timer is not None or engagement.fallback_offered:
            return
        queue = self.engine.scenarios.routing.queue(engagement.queue)
        after = queue.fallback_after if queue.fallback_after is not None else self.config.default_fallback_after
        if after is None:
            return
        options = tuple(queue.fallback)
        engagement.fallback_timer = self.clock.call_at(
            engagement.created_at + after, lambda: self._offer_fallback(engagement, options)
        )

    def _offer_fallback(self, engagement: Engagement, options: tuple[str, ...]) -> None:
        engagement.fallback_timer = None
        if engagement.state != "queued":
            return
        engagement.fallback_offered = options
        session = self._sessions.get(engagement.device_id)
        if session is not None:
            session.send(
                FallbackOffered(
                    engagement.engagement_id, options, "Everyone is busy right now. How would you like to continue?"
                )
            )
        log.info("engagement.fallback_offered", engagement_id=engagement.engagement_id, options=list(options))

    async def choose_fallback(self, session: DeviceSession, engagement_id: str, option: str, phone: str) -> None:
        engagement = self._of_device(session, engagement_id, "fallback_choice.engagement_id")
        if option not in FALLBACKS:
            raise InvalidInput("fallback_choice.option", "must be callback, chat or cancel")
        if engagement.state != "queued" or option not in engagement.fallback_offered:
            raise InvalidInput("fallback_choice.option", f"{option!r} was not offered for this engagement")
        if len(phone) > 32:
            raise InvalidInput("fallback_choice.phone_number", "at most 32 characters")
        now = self.clock.now()
        if option == "chat":
            engagement.fallback_offered = ()
            self._change_channel(engagement, "", "chat", "system", True, now)
            return
        self.router.unwait(engagement.queue, engagement_id)
        self._withdraw_offer(engagement)
        if option == "callback":
            engagement.state, engagement.notes = "callback_requested", f"callback requested {phone}".strip()
            engagement.ended_by = "user"
        else:
            engagement.state, engagement.disposition, engagement.ended_by = "ended", "cancelled", "user"
        engagement.ended_at = now
        self._release_device(engagement)
        await self.store.save_engagement(engagement.record())
        self._notify_device(engagement)
        self._emit("engagement.ended", engagement)

    # -- associates -----------------------------------------------------------

    def sign_in(self, request: AssociateSignIn) -> AssociateSession:
        if not request.associate_id or len(request.associate_id) > 128:
            raise InvalidInput("sign_in.associate_id", "required; at most 128 characters")
        if request.capacity < 0 or request.capacity > 100:
            raise InvalidInput("sign_in.capacity", "must be between 0 and 100")
        if request.presence not in ("available", "busy", "away"):
            raise InvalidInput("sign_in.presence", "must be available, busy or away")
        associate = AssociateSession(
            associate_id=request.associate_id,
            display_name=request.display_name or request.associate_id,
            queues=request.queues or ("default",),
            capacity=request.capacity or 1,
            idle_since=self.clock.now(),
            skills=frozenset(request.skills),
            manual_claim=request.manual_claim,
            presence=request.presence,
        )
        self.router.add(associate)
        log.info("associate.signed_in", associate_id=associate.associate_id, queues=list(associate.queues))
        self._drain(associate)
        return associate

    def set_presence(self, associate: AssociateSession, presence: str) -> None:
        if presence not in ("available", "busy", "away"):
            raise InvalidInput("presence.presence", "must be available, busy or away")
        associate.presence = presence
        log.info("associate.presence", associate_id=associate.associate_id, presence=presence)
        self._drain(associate)

    def sign_out(self, associate: AssociateSession) -> None:
        associate.closed = True
        self.router.remove(associate)
        # Offers and engagements the associate held go back to their queues, first in line.
        for engagement in list(self._engagements.values()):
            if engagement.offered_to is associate:
                self._withdraw_offer(engagement)
                self._route(engagement)
            elif engagement.associate is associate and engagement.state == "assigned":
                associate.active.discard(engagement.engagement_id)
                engagement.state, engagement.associate, engagement.assigned_at = "queued", None, None
                self._save(engagement)
                self._notify_device(engagement)
                self._route(engagement)
        associate.active.clear()
        log.info("associate.signed_out", associate_id=associate.associate_id)

    def claim(self, associate: AssociateSession, engagement_id: str) -> None:
        engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.offered_to is not associate or engagement.state != "queued":
            # Lost a race (taken, lapsed, cancelled): tell, don't fail the stream.
            associate.send(OfferWithdrawn(engagement_id, "no longer offered to you"))
            return
        self._withdraw_offer(engagement)
        self._assign(engagement, associate)

    def reject(self, associate: AssociateSession, engagement_id: str, reason: str) -> None:
        engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.offered_to is not associate:
            return
        self._withdraw_offer(engagement)
        engagement.rejected_by.add(associate.associate_id)
        log.info("engagement.rejected", engagement_id=engagement_id, associate_id=associate.associate_id, reason=reason)
        self._route(engagement)
        self._drain(associate)

    async def wrap_up(self, associate: AssociateSession, engagement_id: str, disposition: str, notes: str) -> None:
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.associate is not associate:
            raise PermissionDenied(f"engagement {engagement_id!r} is not assigned to you")
        if not disposition or len(disposition) > 64:
            raise InvalidInput("end.disposition", "required; at most 64 characters")
        engagement.disposition, engagement.notes = disposition, notes[:4000]
        if engagement.state == "ended":
            # The user left first; this is the associate's wrap-up.
            await self.store.save_engagement(engagement.record())
            return
        now = self.clock.now()
        engagement.state, engagement.ended_at, engagement.ended_by = "ended", now, "associate"
        self._free(associate, engagement_id, now)
        self._release_device(engagement)
        self._watch_outcome(engagement, now)
        await self.store.save_engagement(engagement.record())
        associate.send(EngagementEnded(engagement_id, disposition, "associate"))
        self._notify_device(engagement)
        self._emit("engagement.ended", engagement)
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
            self._free(associate, engagement_id, now)
            associate.send(EngagementEnded(engagement_id, engagement.disposition, "user"))
        self._release_device(engagement)
        self._watch_outcome(engagement, now)
        await self.store.save_engagement(engagement.record())
        self._notify_device(engagement)
        self._emit("engagement.ended", engagement)
        if associate is not None:
            self._drain(associate)

    def _free(self, associate: AssociateSession, engagement_id: str, now: float) -> None:
        associate.active.discard(engagement_id)
        if not associate.active:
            associate.idle_since = now

    def _release_device(self, engagement: Engagement) -> None:
        if self._active_by_device.get(engagement.device_id) == engagement.engagement_id:
            del self._active_by_device[engagement.device_id]

    # -- outcome --------------------------------------------------------------

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
        self._save(engagement)

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
                self._save(engagement)
                log.info("engagement.outcome", engagement_id=engagement.engagement_id, outcome="achieved")

    # -- conversation -----------------------------------------------------------

    async def chat(self, party: str, engagement: Engagement, text: str) -> None:
        if not text.strip() or len(text) > MAX_CHAT:
            raise InvalidInput("chat.text", f"required; at most {MAX_CHAT} characters")
        if not engagement.open:
            raise InvalidInput("chat.engagement_id", "the engagement has ended")
        line = ChatLine(engagement.engagement_id, uuid.uuid4().hex, party, text, self.clock.now())
        await self.store.save_chat(ChatRecord(line.message_id, line.engagement_id, party, text, line.time))
        # Both sides get every line, the sender included: one ordered transcript.
        self._to_device(engagement, line)
        if engagement.associate is not None:
            engagement.associate.send(line)

    def device_engagement(self, session: DeviceSession, engagement_id: str, field_name: str) -> Engagement:
        return self._of_device(session, engagement_id, field_name)

    def associate_engagement(self, associate: AssociateSession, engagement_id: str) -> Engagement:
        return self._of_associate(associate, engagement_id)

    def request_upgrade(self, party: str, engagement: Engagement, request_id: str, channel: str) -> None:
        if not request_id or len(request_id) > 64:
            raise InvalidInput("upgrade_request.request_id", "required; at most 64 characters")
        if channel not in CHANNELS:
            raise InvalidInput("upgrade_request.channel", "must be audio, screen_share, chat or video")
        now = self.clock.now()
        if (
            engagement.state != "assigned"
            or channel == engagement.channel
            or channel not in engagement.allowed_channels
        ):
            # Refused at once: not allowed by the scenario, or nobody to ask yet.
            self._change_channel(engagement, request_id, channel, party, False, now, only=party)
            return
        engagement.pending_upgrades[request_id] = (channel, party)
        ask = UpgradeAsk(engagement.engagement_id, request_id, channel, party)
        self._to_other(engagement, party, ask)

    def respond_upgrade(self, party: str, engagement: Engagement, request_id: str, accepted: bool) -> None:
        pending = engagement.pending_upgrades.get(request_id)
        if pending is None or pending[1] == party:
            raise InvalidInput("upgrade_response.request_id", f"no upgrade request {request_id!r} awaits your answer")
        del engagement.pending_upgrades[request_id]
        channel, requested_by = pending
        self._change_channel(engagement, request_id, channel, requested_by, accepted, self.clock.now())

    def _change_channel(
        self,
        engagement: Engagement,
        request_id: str,
        channel: str,
        requested_by: str,
        accepted: bool,
        now: float,
        only: str | None = None,
    ) -> None:
        previous = engagement.channel
        if accepted:
            engagement.channel = channel
            self._save(engagement)
        self._spawn(
            self.store.save_channel_change(
                ChannelChangeRecord(
                    engagement.engagement_id, now, request_id, previous, channel, requested_by, accepted
                )
            )
        )
        change = ChannelChanged(engagement.engagement_id, request_id, channel, requested_by, accepted, now)
        if only in (None, "user", "system"):
            self._to_device(engagement, change)
        if only in (None, "associate") and engagement.associate is not None:
            engagement.associate.send(change)
        log.info("engagement.channel", engagement_id=engagement.engagement_id, channel=channel, accepted=accepted)

    def call_signal(self, party: str, engagement: Engagement, kind: str, payload: bytes) -> None:
        if kind not in CALL_SIGNAL_KINDS:
            raise InvalidInput("call_signal.kind", "must be offer, answer, candidate or hangup")
        if len(payload) > MAX_CALL_PAYLOAD:
            raise InvalidInput("call_signal.payload", f"larger than {MAX_CALL_PAYLOAD} bytes")
        if engagement.state != "assigned":
            log.info("call_signal.dropped", engagement_id=engagement.engagement_id, reason="no counterpart")
            return
        self._to_other(engagement, party, CallSignalRelay(engagement.engagement_id, kind, payload, party))

    # -- delivery -----------------------------------------------------------------

    def _to_device(self, engagement: Engagement, message: Any) -> None:
        session = self._sessions.get(engagement.device_id)
        if session is not None:
            session.send(message)

    def _to_other(self, engagement: Engagement, party: str, message: Any) -> None:
        if party == "user":
            if engagement.associate is not None:
                engagement.associate.send(message)
        else:
            self._to_device(engagement, message)

    def _notify_device(self, engagement: Engagement) -> None:
        self._to_device(
            engagement,
            EngagementUpdate(
                engagement_id=engagement.engagement_id,
                cue_id=engagement.cue_id,
                state=engagement.state,
                channel=engagement.channel,
                queue=engagement.queue,
                associate_name=engagement.associate.display_name if engagement.associate else "",
                time=self.clock.now(),
                disposition=engagement.disposition,
            ),
        )

    def _save(self, engagement: Engagement) -> None:
        self._spawn(self.store.save_engagement(engagement.record()))

    def _emit(self, kind: str, engagement: Engagement) -> None:
        if not self.listeners:
            return
        payload = {
            "type": kind,
            "engagement_id": engagement.engagement_id,
            "state": engagement.state,
            "queue": engagement.queue,
            "channel": engagement.channel,
            "associate_id": engagement.associate.associate_id if engagement.associate else "",
            "disposition": engagement.disposition,
            "notes": engagement.notes,
            "ended_by": engagement.ended_by,
            "context": context_json(engagement.context),
        }
        for listener in self.listeners:
            try:
                listener(kind, payload)
            except Exception:
                log.exception("engagement.listener_failed", kind=kind)


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
            }
            for p in ctx.prior_engagements
        ],
        "priority": ctx.priority,
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
            )
            for p in data.get("prior_engagements", [])
        ),
        priority=int(data.get("priority", 0)),
    )
