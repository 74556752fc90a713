"""Routing: from an accepted cue to an associate.

Queues, rules, skills, priority and the longest-idle associate; manual claims and rejects; associates
signing in and out; the fallback offered when nobody is free in time; re-queueing after a restart.
Across replicas the fallback and an offer's timeout are also timer rows (desk_timers.py).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import structlog

from ..engine.state import Scalar
from ..predict.registry import describe_scores
from ..storage import EngagementRecord, TimerRecord
from .consent import Redactor
from .desk_timers import FALLBACK_TEXT, DeskTimers
from .engagement_model import Engagement, context_from_json
from .errors import InvalidInput, PermissionDenied
from .model import (
    FALLBACKS,
    AssociateSignIn,
    EngagementContext,
    EngagementOffered,
    FallbackOffered,
    JourneyItem,
    OfferWithdrawn,
    PriorCue,
    PriorEngagement,
    Withdrawal,
    milestone_item,
)
from .sessions import AssociateSession, DeviceSession, PendingCue

__all__ = ["Routing"]

log = structlog.get_logger("cuepoint.core.engagements")


class Routing(DeskTimers):
    async def start(
        self,
        session: DeviceSession,
        pending: PendingCue,
        now: float,
        button_id: str = "",
        answered: dict[str, Any] | None = None,
    ) -> Engagement | None:
        """The user accepted `pending`: store the accept and the engagement (with the cue.answered event
        `answered` and engagement.queued for webhooks, one transaction), then route it."""
        scenarios = self.engine.scenarios
        scenario = scenarios.by_id.get(pending.scenario_id)
        base_queue = str(pending.explanation.get("queue") or "default")
        route = scenarios.routing.decide(
            session.state,
            now,
            base_queue,
            scenario.queue_priority if scenario else 0,
            scenario.skills if scenario else (),
            scenario_id=pending.scenario_id,
        )
        queue, priority, skills = route.queue, route.priority, route.skills
        rule = route.rule
        redactor = Redactor(session.state.context, session.consent)
        if rule is not None and redactor:
            # The rule's observed values obey the same consent as the scenario's explanation.
            held = redactor.explanation({"conditions": rule.conditions})["conditions"]
            rule = replace(rule, conditions=tuple((str(p), str(t)) for p, t in held))
        context = replace(await self._context(session, pending, priority), routing_rule=rule)
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
            preferred_associate=str(pending.explanation.get("invited_by") or ""),
        )
        # Reserved in memory while committing, so nothing else is offered to the device meanwhile.
        self._active_by_device[session.device_id] = engagement.engagement_id
        hooks = self._webhooks("cue.answered", answered) if answered is not None else []
        hooks += self._webhooks("engagement.queued", self._payload("engagement.queued", engagement))
        try:
            # The accept, the engagement and their webhooks commit in one transaction: never an accepted
            # cue without one, nor either without its webhook.
            # Across replicas its fallback row too (desk_timers.py): no replica dies between the two.
            rows = self._first_rows(engagement)
            outcome = await self.store.accept_cue(
                engagement.cue_id, now, engagement.record(), button_id, webhooks=hooks, owner=self.replica_id,
                timers=rows,
            )  # fmt: skip
        finally:
            self._release_device(engagement)
        if not outcome.accepted:
            # Settled meanwhile (expired, withdrawn) or accepted before: answer with what is on file.
            if not self.answer_again(session, engagement.cue_id):
                session.send(Withdrawal(engagement.cue_id, outcome.status or "unknown"))
            return None
        self._engagements[engagement.engagement_id] = engagement
        self._active_by_device[session.device_id] = engagement.engagement_id
        engagement.fallback_row = bool(rows)
        if hooks:
            self._wake_outbox()
        self._notify_device(engagement)
        log.info("engagement.queued", engagement_id=engagement.engagement_id, queue=queue, priority=priority)
        self._emit("engagement.queued", engagement)
        self._route(engagement)
        return engagement

    def answer_again(self, session: DeviceSession, cue_id: str) -> bool:
        """Re-send the state of the live engagement an accepted cue started (a resent accept, a reconnect)."""
        engagement = self._engagements.get(self._active_by_device.get(session.device_id, ""))
        if engagement is None or engagement.cue_id != cue_id:
            return False
        self._notify_device(engagement)
        return True

    async def _context(self, session: DeviceSession, pending: PendingCue, priority: int) -> EngagementContext:
        ctx = session.state.context
        consent = session.consent
        user_id = str(ctx.get("user.id") or "")
        if user_id and consent != "none" and session.subject == f"user:{user_id}":
            # Identified users: the journey stitched across all their devices. A claimed user id
            # (core/identity.py) gets this device's journey only.
            journey = await self.store.journey_for_user(user_id, limit=self.config.journey_limit)
        else:
            journey = await self.store.journey(session.device_id, limit=self.config.journey_limit)
        prior = await self.store.engagements_for_subject(session.subject, limit=self.config.prior_limit)
        cues = [c for c in await self.store.cues_for_subject(session.subject) if c.cue_id != pending.offer.cue_id]
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
        # The journey, the cue's text and its explanation obey the same rules (core/consent.py): the
        # engagement's context is stored, sent to associates and webhooks, and exported as built here.
        redactor = Redactor(ctx, consent)
        items = []
        for r in journey:
            payload = dict(r.payload)
            if r.kind == "context" and consent != "full":
                payload = redactor.payload(payload)
            items.append(JourneyItem(r.signal_id, r.time, r.kind, r.name, payload))
        # Milestones this session reached, held in core with their reach time, beside the signals.
        if session.state.milestones:
            items.extend(milestone_item(session.session_id, m, at) for m, at in session.state.milestones.items())
            items.sort(key=lambda item: item.time)
        cue = pending.offer
        if redactor:
            cue = replace(cue, message=redactor.text(cue.message), title=redactor.text(cue.title))
        return EngagementContext(
            app_id=session.app_id,
            device_id=session.device_id,
            user_id=user_id,
            context={k: v for k, v in ctx.items() if not k.startswith("user.")},
            user_attributes=user_attrs,
            consent=consent,
            journey=tuple(items),
            trigger=dict(pending.explanation),
            cue=cue,
            redacted_fields=tuple(sorted(redacted)),
            prior_engagements=tuple(
                PriorEngagement(
                    p.engagement_id, p.created_at, p.scenario_id, p.disposition, p.notes, p.outcome, p.wrap_up_outcome
                )
                for p in prior
            ),
            prior_cues=tuple(
                PriorCue(c.cue_id, c.created_at, c.scenario_id, c.status) for c in cues[-self.config.prior_limit :]
            ),
            priority=priority,
            user_verified=bool(user_id) and user_id == session.verified_user,
            scores=describe_scores(session.state),
        )

    def _route(self, engagement: Engagement) -> None:
        bot = self._bot_for(engagement.queue)
        if bot is not None:
            self._bot_take(engagement, bot)
            return
        if self.shared:
            self._route_shared(engagement)  # decided in storage with the other replicas (desk_shared.py)
            return
        associate = self._preferred(engagement) or self.router.pick(
            engagement.queue, engagement.skills, engagement.rejected_by, engagement.app_id, engagement.channel
        )
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

    def _route_again(self, engagement: Engagement) -> None:
        self._route(engagement)

    async def _callback_chosen(self, engagement: Engagement, phone: str, at: float | None, now: float) -> None:
        raise NotImplementedError  # callbacks (desk_callbacks.py) provide it

    def _callback_restored(self, engagement: Engagement) -> None:
        raise NotImplementedError  # callbacks (desk_callbacks.py) provide it

    def _preferred(self, engagement: Engagement) -> AssociateSession | None:
        """The associate who invited the user, while free to take what they started."""
        wanted = self.router.find(engagement.preferred_associate) if engagement.preferred_associate else None
        if wanted is None or wanted.associate_id in engagement.rejected_by:
            return None
        if not wanted.fits(engagement.channel, engagement.queue, self.router.queue_limits):
            return None
        if not wanted.serves(engagement.app_id):
            return None
        return wanted

    def _offer(
        self, engagement: Engagement, associate: AssociateSession, reserved: bool = False, due: float | None = None
    ) -> None:
        """`due`: when the offer lapses, its timer row committed with the slot's reservation (desk_shared.py)."""
        queue = self.engine.scenarios.routing.queue(engagement.queue)
        engagement.offered_to = associate
        associate.hold(associate.offers, engagement.engagement_id, engagement.channel, engagement.queue)
        if not reserved:
            self._slot_taken(associate, engagement)
        armed = due is not None
        due = due if due is not None else self.clock.now() + queue.offer_timeout
        engagement.offer_timer = self.clock.call_at(due, lambda: self._offer_lapsed(engagement, associate))
        if armed:
            engagement.offer_due = due
        else:
            self._offer_row(engagement, associate, due)
        associate.send(EngagementOffered(engagement.view()))
        log.info("engagement.offered", engagement_id=engagement.engagement_id, associate_id=associate.associate_id)

    def _withdraw_offer(self, engagement: Engagement, keep_slot: bool = False) -> AssociateSession | None:
        """The offer is over; `keep_slot`: the associate claimed it, their slot now holds the engagement."""
        associate = engagement.offered_to
        if associate is None:
            return None
        associate.offers.discard(engagement.engagement_id)
        if not keep_slot:
            self._slot_released(associate.associate_id, engagement.engagement_id)
        engagement.offered_to = None
        if engagement.offer_timer is not None:
            engagement.offer_timer.cancel()
            engagement.offer_timer = None
        self._offer_over(engagement)
        return associate

    def _offer_lapsed(self, engagement: Engagement, associate: AssociateSession) -> None:
        if engagement.offered_to is not associate or engagement.state != "queued":
            return
        if self.shared:
            # Once across replicas: its row marked done first (desk_timers.py), then the same lapse.
            self._spawn(self._lapse_once(engagement, associate, engagement.offer_due))
            return
        self._lapse(engagement, associate)

    def _lapse(self, engagement: Engagement, associate: AssociateSession) -> None:
        self._withdraw_offer(engagement)
        engagement.rejected_by.add(associate.associate_id)
        associate.send(OfferWithdrawn(engagement.engagement_id, "timeout"))
        self._route(engagement)

    def _assign(self, engagement: Engagement, associate: AssociateSession, reserved: bool = False) -> None:
        """`reserved`: storage already gave this associate's slot to the engagement (desk_shared.py)."""
        now = self.clock.now()
        self.router.unwait(engagement.queue, engagement.engagement_id)
        if engagement.fallback_timer is not None:
            engagement.fallback_timer.cancel()
            engagement.fallback_timer = None
        engagement.state, engagement.associate, engagement.assigned_at = "assigned", associate, now
        associate.hold(associate.active, engagement.engagement_id, engagement.channel, engagement.queue)
        if not reserved:
            self._slot_taken(associate, engagement)
        # Across replicas its fallback row is moot from now on: marked done in the same write.
        self._save(engagement, "engagement.assigned", settle=self._fallback_settled(engagement))
        associate.send(engagement.view())
        self._notify_device(engagement)
        self._emit("engagement.assigned", engagement)
        log.info("engagement.assigned", engagement_id=engagement.engagement_id, associate_id=associate.associate_id)

    def _drain(self, associate: AssociateSession) -> None:
        """Give a newly free associate the best waiting engagements it can take."""
        if self.shared:
            self._fill_shared(associate)  # each reserved in storage with the other replicas (desk_shared.py)
            return
        for engagement_id in self.router.waiting(associate.queues):
            if not associate.available:
                return
            engagement = self._engagements.get(engagement_id)
            if engagement is None or engagement.state != "queued" or engagement.offered_to is not None:
                continue
            if associate.associate_id in engagement.rejected_by or not associate.skills.issuperset(engagement.skills):
                continue
            if not associate.serves(engagement.app_id):
                continue
            if not associate.fits(engagement.channel, engagement.queue, self.router.queue_limits):
                continue  # e.g. a call while chats are held: a later chat in line may still fit
            self.router.unwait(engagement.queue, engagement_id)
            if associate.manual_claim:
                self._offer(engagement, associate)
            else:
                self._assign(engagement, associate)

    def restore(self, record: EngagementRecord, standing: TimerRecord | None = None, rejected: str = "") -> None:
        """Re-queue an engagement left open by a stopped process; its associate must take it again.
        Adopted across replicas (desk_timers.py `adopt`): `standing`, the gone replica's offer row still
        armed, stays offered to its associate until its time; `rejected`, the associate whose offer lapsed."""
        if record.engagement_id in self._engagements:
            return
        engagement = self._rebuilt(record, rejected)
        self._engagements[engagement.engagement_id] = engagement
        if record.state == "callback_requested":
            # A callback still to make: its timer again; the fallback was offered already.
            engagement.state, engagement.fallback_offered = "callback_requested", FALLBACKS
            log.info("engagement.restored", engagement_id=engagement.engagement_id, callback_at=record.callback_at)
            self._callback_restored(engagement)
            return
        if engagement.callback_at is not None:
            engagement.fallback_offered = FALLBACKS  # a callback already: never offered a fallback again
        else:
            self._active_by_device[engagement.device_id] = engagement.engagement_id
        if record.state == "assigned":
            if self.shared and record.associate_id:
                # Adopted from a replica that is gone while its associate may still be signed in elsewhere:
                # offered back to them first (the slot is theirs again in storage), else it waits in line.
                engagement.preferred_associate = record.associate_id
            self._save(engagement)  # back to queued until someone takes it
        log.info("engagement.restored", engagement_id=engagement.engagement_id, queue=engagement.queue)
        if standing is not None and record.state == "queued" and self._stand(engagement, standing):
            return
        self._route(engagement)

    def _rebuilt(self, record: EngagementRecord, rejected: str = "") -> Engagement:
        """The engagement of a stored row, in memory again (not yet held here)."""
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
            callback_at=record.callback_at,
            callback_number=record.callback_number,
            fallback_choice=record.fallback_choice,
        )
        if rejected:
            engagement.rejected_by.add(rejected)
        return engagement

    def _arm_fallback(self, engagement: Engagement) -> None:
        if (
            engagement.fallback_timer is not None
            or engagement.fallback_offered
            or engagement.fallback_firing
            or engagement.fallback_choice  # answered: it goes on as the user chose, never offered again
        ):
            return
        due = self._fallback_due(engagement)
        if due is None:
            return
        options = self._fallback_options(engagement)
        engagement.fallback_timer = self.clock.call_at(due, lambda: self._offer_fallback(engagement, options))
        self._fallback_row(engagement, due)

    def _offer_fallback(self, engagement: Engagement, options: tuple[str, ...]) -> None:
        engagement.fallback_timer = None
        if engagement.state != "queued" or engagement.fallback_choice:
            return
        if self.shared:
            # Once across replicas: its row marked done first (desk_timers.py), then offered.
            self._spawn(self._fire_fallback(engagement))
            return
        engagement.fallback_offered = options
        session = self._sessions.get(engagement.device_id)
        if session is not None:
            session.send(FallbackOffered(engagement.engagement_id, options, FALLBACK_TEXT))
        log.info("engagement.fallback_offered", engagement_id=engagement.engagement_id, options=list(options))

    async def choose_fallback(
        self, session: DeviceSession, engagement_id: str, option: str, phone: str, callback_at: float | None = None
    ) -> None:
        engagement = self._of_device(session, engagement_id, "fallback_choice.engagement_id")
        if option not in FALLBACKS:
            raise InvalidInput("fallback_choice.option", "must be callback, chat or cancel")
        if engagement.state != "queued" or option not in engagement.fallback_offered:
            raise InvalidInput("fallback_choice.option", f"{option!r} was not offered for this engagement")
        if len(phone) > 32:
            raise InvalidInput("fallback_choice.phone_number", "at most 32 characters")
        now = self.clock.now()
        if option == "chat":
            # The answer is stored with the channel change (one write): a replica adopting the engagement
            # later, or this one restarted, does not offer the fallback again.
            engagement.fallback_offered, engagement.fallback_choice = (), "chat"
            self._change_channel(engagement, "", "chat", "system", True, now)
            return
        if option == "callback":
            await self._callback_chosen(engagement, phone, callback_at, now)
            return
        self.router.unwait(engagement.queue, engagement_id)
        self._withdraw_offer(engagement)
        engagement.state, engagement.disposition, engagement.ended_by = "ended", "cancelled", "user"
        engagement.ended_at = now
        self._release_device(engagement)
        await self._persist(engagement, "engagement.ended")
        self._notify_device(engagement)
        self._emit("engagement.ended", engagement)

    def sign_in(self, request: AssociateSignIn) -> AssociateSession:
        if not request.associate_id or len(request.associate_id) > 128:
            raise InvalidInput("sign_in.associate_id", "required; at most 128 characters")
        if request.capacity < 0 or request.capacity > 100:
            raise InvalidInput("sign_in.capacity", "must be between 0 and 100")
        limits: dict[str, int] = {}
        for i, (channel, limit) in enumerate(request.channel_capacity):
            if channel in limits:
                raise InvalidInput(f"sign_in.channel_capacity[{i}].channel", f"{channel} is listed twice")
            if not 1 <= limit <= 100:
                raise InvalidInput(f"sign_in.channel_capacity[{i}].limit", "must be between 1 and 100")
            limits[channel] = limit
        if request.presence not in ("available", "busy", "away"):
            raise InvalidInput("sign_in.presence", "must be available, busy or away")
        if request.apps:
            # One installation, several apps: an associate of some apps serves none of the others' queues.
            routing = self.engine.scenarios.routing
            for where, names in (("queues", request.queues), ("supervised_queues", request.supervised_queues)):
                foreign = [q for q in names if routing.owner(q) and routing.owner(q) not in request.apps]
                if foreign:
                    raise PermissionDenied(
                        f"sign_in.{where}: {', '.join(foreign)} belong(s) to another app than yours "
                        f"({', '.join(request.apps)})"
                    )
        associate = AssociateSession(
            associate_id=request.associate_id,
            display_name=request.display_name or request.associate_id,
            queues=request.queues or ("default",),
            # Raised to the largest channel limit: "chat: 3" means three chats without also saying capacity 3.
            capacity=max([request.capacity or 1, *limits.values()]),
            channel_capacity=limits,
            idle_since=self.clock.now(),
            skills=frozenset(request.skills),
            manual_claim=request.manual_claim,
            presence=request.presence,
            supervised_queues=request.supervised_queues,
            apps=frozenset(request.apps),
        )
        self.router.add(associate)
        log.info("associate.signed_in", associate_id=associate.associate_id, queues=list(associate.queues))
        self._drain(associate)
        return associate

    def set_presence(self, associate: AssociateSession, presence: str, reason: str = "") -> None:
        if presence not in ("available", "busy", "away"):
            raise InvalidInput("presence.presence", "must be available, busy or away")
        associate.presence = presence
        associate.presence_reason = "" if presence == "available" else reason
        log.info("associate.presence", associate_id=associate.associate_id, presence=presence, reason=reason)
        self._drain(associate)

    def sign_out(self, associate: AssociateSession) -> None:
        associate.closed = True
        self.router.remove(associate)
        # Across replicas: their slots here are given back before what they held is routed again.
        self._slots_resync()
        # Offers and engagements the associate held go back to their queues, first in line.
        for engagement in list(self._engagements.values()):
            if engagement.offered_to is associate:
                self._withdraw_offer(engagement, keep_slot=self.shared)  # given back above
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
        self._withdraw_offer(engagement, keep_slot=True)
        self._assign(engagement, associate, reserved=True)

    def reject(self, associate: AssociateSession, engagement_id: str, reason: str) -> None:
        engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.offered_to is not associate:
            return
        self._withdraw_offer(engagement)
        engagement.rejected_by.add(associate.associate_id)
        log.info("engagement.rejected", engagement_id=engagement_id, associate_id=associate.associate_id, reason=reason)
        self._route(engagement)
        self._drain(associate)
