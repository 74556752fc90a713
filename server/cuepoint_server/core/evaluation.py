"""Evaluation and arbitration: qualify scenarios, settle cues whose reason is gone, offer, expire, answer.

Also the one timer per device that wakes time-driven scenarios (idle, dwell, absence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog

from ..engine.arbiter import DAY, INVITATION, Blocked, Decision, Situation
from ..engine.scenario_set import ScenarioSet
from ..predict.registry import describe_scores
from ..scenarios.compiler import CompiledScenario
from ..storage import CueRecord, DecisionRecord, OfferGuard
from .consent import Redactor
from .deadlines import CUE_EXPIRY, DEVICE, timer, timer_id
from .errors import InvalidInput
from .explain import ScenarioCheck, check_scenarios
from .ids import ordered_id
from .model import (
    CueOffer,
    Withdrawal,
)
from .presentation import offer_content
from .scoring import Scoring
from .sessions import DeviceSession, PendingCue

__all__ = ["RESPONSES", "Evaluation"]

log = structlog.get_logger("cuepoint.core")

RESPONSES = ("accepted", "declined", "dismissed", "expired", "opened")
# The answer each kind of button gives (scenario files: cue.buttons[].action).
BUTTON_RESPONSES = {"accept": "accepted", "decline": "declined", "dismiss": "dismissed", "open_url": "opened"}


class Evaluation(Scoring):
    def _evaluate(
        self, session: DeviceSession, candidates: Sequence[CompiledScenario], now: float, at: float | None = None
    ) -> None:
        """Qualify `candidates`, settle a pending cue whose reason is gone, arbitrate, offer.

        Conditions are read at `at`, the time of the signal being evaluated (default: now), so a
        signal means the same whether it arrived alone or later in a batch; the decision and the
        cue are made now.
        """
        state = session.state
        qualified = self.engine.check(candidates, state, now if at is None else at)
        pending = self._reg.pending.get(session.device_id)
        # A person's invitation has no scenario whose conditions could clear: it stands until answered or expired.
        if pending is not None and pending.scenario_id != INVITATION:
            scenario = self.engine.scenarios.by_id.get(pending.scenario_id)
            if scenario is None or not scenario.enabled:
                self._withdraw(session.device_id, "scenario_removed")
            elif scenario.id in self.engine.disabled:
                self._withdraw(session.device_id, "scenario_disabled")
            elif scenario.outcome is not None and scenario.outcome in state.milestones:
                self._withdraw(session.device_id, "outcome_achieved")
            elif scenario in candidates and scenario not in qualified and not _pushed(pending):
                self._withdraw(session.device_id, "condition_cleared")
        if not qualified:
            return
        situation = Situation(
            subject=session.subject,
            session_id=session.session_id,
            state=state,
            now=now,
            policy=self.engine.scenarios.policy_for(session.app_id),
            busy=self._busy(session.device_id, now),
            paused=self.paused_for(session.app_id),
            no_capacity=lambda scenario: self._no_capacity(session, scenario, now),
        )
        decision = self.arbiter.decide(qualified, situation)
        offer = self._offer(session, decision.offer, decision.blocked, now, at) if decision.offer else None
        for blocked in decision.blocked:
            # Every block is also stored (decisions table): the log line is for debugging only.
            log.debug(
                "scenario.blocked",
                device_id=session.device_id,
                scenario_id=blocked.scenario_id,
                reason=blocked.reason,
                detail=blocked.detail,
            )
            self._decided(session, now, blocked.scenario_id, "blocked", blocked.reason, blocked.detail, "")
        if offer is not None and decision.offer is not None:
            self._decided(session, now, decision.offer.id, "offered", "", "", offer.cue_id)

    def _offer(
        self, session: DeviceSession, scenario: CompiledScenario, blocked: list[Blocked], now: float, at: float | None
    ) -> CueOffer:
        state = session.state
        explanation = scenario.explain(state, now if at is None else at)
        episode = scenario.episode(state)
        if episode is not None:
            state.fired_episodes[scenario.id] = episode
        # A closed session: the device is away and a `when_away` scenario fired from its timer. The cue waits
        # for the device (when_away.ttl) and the app's push service is told (cue.pending_push, core_base.py).
        away = session.closed and scenario.when_away is not None
        ttl = (scenario.when_away.ttl or scenario.ttl) if away and scenario.when_away else scenario.ttl
        offer = CueOffer(
            cue_id=ordered_id(),
            scenario_id=scenario.id,
            created_at=now,
            expires_at=now + ttl,
            **offer_content(scenario, session.subject, state.context, self.stopped_variants),
        )
        why: dict[str, Any] = {
            "scenario_id": scenario.id,
            "scenario_name": scenario.name,
            "scenario_file": scenario.file,
            "priority": scenario.priority,
            "queue": scenario.queue,
            "conditions": [list(c) for c in explanation.conditions],
            "signal_ids": list(dict.fromkeys(explanation.signal_ids)),
            "blocked": [{"scenario_id": b.scenario_id, "reason": b.reason} for b in blocked],
            "segments": self.engine.segments_of(state, now),
            "milestones": sorted(state.milestones),
            "cue": offer.content(),
            # Funnels compare every variant with the control (the first), even after the file changes.
            "variant_control": bool(offer.variant) and offer.variant == scenario.contents[0].variant,
        }
        if state.scores:
            why["scores"] = describe_scores(state)
        if away:
            why["pending_push"] = True
        # What is stored and shown to associates obeys the consent; the device sees its own cue as rendered.
        redactor = Redactor(state.context, session.consent)
        stored_message = offer.message
        if redactor:
            why, stored_message = redactor.explanation(why), redactor.text(offer.message)
        pending = PendingCue(offer, scenario.id, why)
        slot = None
        if self.engine.scenarios.policy_for(session.app_id).require_capacity and not away:
            # Hold the slot the engagement will need, so one free associate is never offered twice.
            queue, skills = self._routed(session, scenario, now)
            associate = self.router.pick(queue, skills, app_id=session.app_id, channel=offer.channel)
            if associate is not None:
                # Across replicas this replica's view is only a first filter: the commit reserves the slot
                # against what every replica holds, or refuses the cue (desk_shared.py's cue_slot).
                slot = self.desk.cue_slot(
                    offer.cue_id, queue, skills, session.app_id, offer.channel, self._lacking(queue, skills)
                )
                associate.hold(associate.reserved, offer.cue_id, offer.channel, queue)
                pending.reserved = associate
        pending.expiry = self.clock.call_at(offer.expires_at, lambda: self._expire(session.device_id, offer.cue_id))
        self._reg.pending[session.device_id] = pending
        self.arbiter.remember_offer(session.subject, scenario.id, now, session.session_id)
        # Checked again in the commit, against what every replica stored for the subject (OfferGuard).
        policy = self.engine.scenarios.policy
        situation = Situation(
            subject=session.subject, session_id=session.session_id, state=state, now=now, policy=policy
        )
        guard = OfferGuard(
            cue_id=offer.cue_id,
            subject=session.subject,
            session_id=session.session_id,
            since=now - max(DAY, scenario.cooldown, policy.min_gap),
            check=lambda history: self.arbiter.recheck(scenario, situation, history),
            memory_whole=self._remembered.whole(session.subject) and self.arbiter.holds_all(session.subject),
        )
        # Shown only once the cue, its decisions and the signals that fired it are committed (Unit).
        self._stage_offer(
            session,
            CueRecord(
                cue_id=offer.cue_id,
                scenario_id=scenario.id,
                app_id=session.app_id,
                device_id=session.device_id,
                subject=session.subject,
                session_id=session.session_id,
                created_at=now,
                expires_at=offer.expires_at,
                channel=offer.channel,
                message=stored_message,
                status="offered",
                responded_at=None,
                explanation=why,
                variant=offer.variant,
                locale=offer.locale,
            ),
            offer,
            guard,
            slot,
        )
        log.info("cue.offered", device_id=session.device_id, scenario_id=scenario.id, cue_id=offer.cue_id)
        for observer in self.observers:
            observer.cue_offered(scenario.id, self.clock.now() - now)
        return offer

    def _decided(
        self,
        session: DeviceSession,
        now: float,
        scenario_id: str,
        outcome: str,
        reason: str,
        detail: str,
        cue_id: str,
    ) -> None:
        scenario = self.engine.scenarios.by_id.get(scenario_id)
        record = DecisionRecord(
            time=now,
            app_id=session.app_id,
            device_id=session.device_id,
            subject=session.subject,
            session_id=session.session_id,
            scenario_id=scenario_id,
            outcome=outcome,
            reason=reason,
            detail=detail,
            cue_id=cue_id,
            outcome_milestone=(scenario.outcome or "") if scenario is not None else "",
        )
        for listener in self.decision_listeners:
            listener(record)
        self._stage_decision(session, record)

    def _busy(self, device_id: str, now: float) -> str | None:
        if self.desk.active_for(device_id) is not None:
            return "engagement_active"
        pending = self._reg.pending.get(device_id)
        if pending is not None and pending.offer.expires_at > now:
            return "cue_pending"
        return None

    def _on_context(self, session: DeviceSession, keys: list[str] | None, at: float, now: float) -> None:
        """Context changed (`keys`; None: all of it, a hello): evaluate the scenarios whose trigger reads it,
        and withdraw a pending cue whose target or trigger no longer holds."""
        scenarios = self.engine.scenarios
        candidates = list(scenarios.contextual) if keys is None else scenarios.keyed(keys)
        self._recheck_pending(session, at, keys)
        if candidates:
            self._evaluate(session, candidates, now, at)

    def _recheck_pending(self, session: DeviceSession, at: float, keys: list[str] | None = None) -> None:
        """Withdraw the pending cue (condition_cleared) if its scenario no longer qualifies; with `keys`,
        only if its conditions read one of them."""
        pending = self._reg.pending.get(session.device_id)
        if pending is None or _pushed(pending):
            return
        scenario = self.engine.scenarios.by_id.get(pending.scenario_id)
        if scenario is None:
            return
        if keys is not None and not (
            scenario.target_keys.intersection(keys) or scenario.trigger_keys.intersection(keys)
        ):
            return
        if not scenario.qualifies(session.state, at):
            self._withdraw(session.device_id, "condition_cleared")

    def explain_scenarios(self, device_id: str) -> list[ScenarioCheck]:
        """Why (not), now: every scenario's conditions for the device and, for those that qualify, the
        arbiter's verdict (a dry run: nothing is offered or recorded). Empty for a device never seen."""
        state = self._reg.states.get(device_id)
        if state is None:
            return []
        now = self.clock.now()
        session = self._reg.sessions.get(device_id)
        decide: Callable[[list[CompiledScenario]], Decision] | None = None
        if session is not None:
            situation = Situation(
                subject=session.subject,
                session_id=session.session_id,
                state=state,
                now=now,
                policy=self.engine.scenarios.policy_for(session.app_id),
                busy=self._busy(device_id, now),
                paused=self.paused_for(session.app_id),
                no_capacity=lambda scenario: self._no_capacity(session, scenario, now),
            )

            def decide(qualified: list[CompiledScenario]) -> Decision:
                return self.arbiter.decide(qualified, situation)

        return check_scenarios(self.engine.scenarios.scenarios, state, now, decide)

    def _routed(self, session: DeviceSession, scenario: CompiledScenario, now: float) -> tuple[str, tuple[str, ...]]:
        """The queue and skills the routing rules would give this scenario's engagement now."""
        queue, _, skills = self.engine.scenarios.routing.route(
            session.state, now, scenario.queue, scenario.queue_priority, scenario.skills, scenario_id=scenario.id
        )
        return queue, skills

    def _no_capacity(self, session: DeviceSession, scenario: CompiledScenario, now: float) -> str | None:
        queue, skills = self._routed(session, scenario, now)
        if self.desk.has_capacity(queue, skills, session.app_id, scenario.channel):
            return None
        return self._lacking(queue, skills)

    @staticmethod
    def _lacking(queue: str, skills: tuple[str, ...]) -> str:
        needs = f" with skills {', '.join(skills)}" if skills else ""
        return f"no associate available in queue {queue}{needs}"

    def _withdraw(self, device_id: str, reason: str) -> None:
        pending = self._reg.pending.pop(device_id, None)
        if pending is None:
            return
        self._release_cue(pending)
        if pending.expiry is not None:
            pending.expiry.cancel()
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, "withdrawn")
        self._spawn(self._settled(device_id, pending.offer.cue_id, "withdrawn", reason))

    def _expire(self, device_id: str, cue_id: str) -> None:
        pending = self._reg.pending.get(device_id)
        if pending is None or pending.offer.cue_id != cue_id:
            return
        del self._reg.pending[device_id]
        self._release_cue(pending)
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, "expired")
        self._spawn(self._settled(device_id, cue_id, "expired", "expired"))

    async def _settled(self, device_id: str, cue_id: str, status: str, reason: str) -> None:
        # Record first (with its webhook), so a withdrawal the device sees is already on file.
        withdrawn = {"cue_id": cue_id, "device_id": device_id, "status": status, "reason": reason}
        # An expiry is the cue's timer row firing: once, whichever replica gets there first (timer_claims.py).
        expiry = timer_id(CUE_EXPIRY, cue_id) if status == "expired" else ""
        written = await self._set_cue_status(cue_id, status, self.clock.now(), "", "cue.withdrawn", withdrawn, expiry)
        session = self._reg.sessions.get(device_id)
        if session is not None:
            # Also when another replica expired it first: on file as expired either way.
            session.send(Withdrawal(cue_id, reason))
        if not written:
            log.info("cue.expired_elsewhere", device_id=device_id, cue_id=cue_id)
            return
        log.info("cue.withdrawn", device_id=device_id, cue_id=cue_id, reason=reason)
        self._emit_cue("cue.withdrawn", withdrawn)

    def scenarios_swapped(self, old: ScenarioSet, new: ScenarioSet) -> None:
        """After a reload: settle cues whose scenario is gone and re-arm every timer."""
        now = self.clock.now()
        self._outcomes_swapped()
        for device_id, pending in list(self._reg.pending.items()):
            scenario = new.by_id.get(pending.scenario_id)
            if pending.scenario_id != INVITATION and (scenario is None or not scenario.enabled):
                self._withdraw(device_id, "scenario_removed")
        for device_id, (_, handle) in list(self._timers.items()):
            handle.cancel()
            del self._timers[device_id]
        for device_id in [*self._reg.sessions, *self._reg.away]:
            self._schedule_timer(device_id, now)

    def _schedule_timer(self, device_id: str, now: float) -> None:
        """Arm one timer per device at the next moment a time-driven scenario may fire, or the pending
        cue's windows lose an occurrence (its count may drop: the cue is withdrawn at the window's edge)."""
        pending = self._reg.pending.get(device_id)
        if not self.engine.scenarios.timed and pending is None:
            return
        state = self._reg.states.get(device_id)
        away = device_id not in self._reg.sessions
        if state is None or (away and device_id not in self._reg.away):
            return
        due = self.engine.next_deadline(state, now) if self.engine.scenarios.timed else None
        scenario = self.engine.scenarios.by_id.get(pending.scenario_id) if pending is not None else None
        if scenario is not None:
            edge = scenario.next_edge(state, now)
            if edge is not None and (due is None or edge < due):
                due = edge
        current = self._timers.get(device_id)
        if current is not None:
            if due is not None and current[0] == due:
                return
            current[1].cancel()
            del self._timers[device_id]
        self._store_deadline(device_id, due)
        if due is not None:
            handle = self.clock.call_at(due, lambda: self._on_timer(device_id, due))
            self._timers[device_id] = (due, handle)
        elif away:
            self._away_over(device_id)

    def _store_deadline(self, device_id: str, due: float | None) -> None:
        """With other replicas, the device's deadline is also its timer row (deadlines.py DEVICE), owned by
        this replica: if it dies, another claims the row when due and fires it (core/timer_claims.py).
        Written only when it changes, in the unit being committed when one is open (a signal batch's, a
        timer's), else on its own. Alone there is nobody to claim it, and nothing is written."""
        if not self.bus.shared or self._deadline_rows.get(device_id, -1.0) == due:
            return
        self._deadline_rows[device_id] = due
        if due is None:
            # Nothing left to fire: the row (if any) is done, so no replica claims it.
            self._spawn(self.store.finish_timer(timer_id(DEVICE, device_id), self.clock.now()))
            return
        row = timer(DEVICE, device_id, due, self.bus.replica_id)
        session = self._reg.sessions.get(device_id) or self._reg.away.get(device_id, (None, 0.0))[0]
        unit = session.unit if session is not None else None
        if unit is not None and not unit.sealed:
            unit.work.timers.append(row)
        else:
            self._spawn(self.store.arm_timers([row]))

    def _on_timer(self, device_id: str, due: float) -> None:
        current = self._timers.get(device_id)
        if current is not None and current[0] == due:
            del self._timers[device_id]
        session = self._reg.sessions.get(device_id)
        away = session is None
        if session is None:
            entry = self._reg.away.get(device_id)
            if entry is None:
                return
            session = entry[0]
        now = self.clock.now()
        if not away:
            self._score_now(session, now)
        # While the device is away only scenarios with a fallback for that may fire.
        index = self.engine.timers(session.app_id)
        timed = index.candidates if not away else [s for s in index.timed if s.when_away is not None]
        unit = self._open_unit(session)
        if self.bus.shared:
            # Once across replicas: the commit marks the device's row done for this due time first, and stores
            # none of the cues if another replica fired it (storage/timer_rows.py FIRED_ELSEWHERE).
            unit.work.fires.append((timer_id(DEVICE, device_id), due))
            self._deadline_rows[device_id] = None
        self._recheck_pending(session, now)
        if timed:
            self._evaluate(session, timed, now)
        if away:
            # A background task, not the closed session's: drain() must see it after the device's away entry goes.
            self._spawn(self._commit_unit(session, unit))
        else:
            self._track(session, self._commit_unit(session, unit))
        self._schedule_timer(device_id, now)

    # -- away: a device gone while a `when_away` scenario may still fire for it from a timer ----------------

    def _away_capable(self, app_id: str) -> bool:
        return bool(self.engine.scenarios.timed) and self.engine.timers(app_id).away_capable

    def _went_away(self, session: DeviceSession, now: float) -> None:
        """Its session ended (not resumed): keep its timer, and its state past the resume window while armed."""
        pending = self._reg.pending.get(session.device_id)
        if pending is not None and _unsent(session, pending.offer.cue_id):
            scenario = self.engine.scenarios.by_id.get(pending.scenario_id)
            if scenario is not None and scenario.when_away is not None:
                self._spawn(self._push_if_open(pending.offer.cue_id))
        if self._away_capable(session.app_id):
            self._reg.away[session.device_id] = (session, now + self.config.resume_window)
            self._schedule_timer(session.device_id, now)

    async def _push_if_open(self, cue_id: str) -> None:
        record = await self.store.get_cue(cue_id)
        if record is not None and record.status == "offered":
            self._push_undelivered(record)

    def _away_over(self, device_id: str) -> None:
        """Nothing more can fire for the away device: its state goes as any closed device's does."""
        entry = self._reg.away.pop(device_id, None)
        if entry is not None and self.clock.now() >= entry[1]:
            self._evict(entry[0])

    def _evict(self, session: DeviceSession) -> None:
        """Overridden by the session lifecycle (session_lifecycle.py)."""

    async def respond(self, session: DeviceSession, cue_id: str, response: str, button_id: str = "") -> None:
        if response not in RESPONSES:
            raise InvalidInput("cue_response.kind", "must be accepted, declined, dismissed, expired or opened")
        now = self.clock.now()
        pending = self._reg.pending.get(session.device_id)
        if pending is not None and pending.offer.cue_id == cue_id and button_id:
            self._press(pending, response, button_id)
        if pending is None or pending.offer.cue_id != cue_id:
            known = await self.store.get_cue(cue_id)
            # A stale or stray answer is not worth the session: settled cues
            # (expired, withdrawn, answered) and ids this device never saw are
            # both answered with a withdrawal the app can act on.
            mine = known is not None and known.device_id == session.device_id
            if mine and known and known.status == "accepted" and self.desk.answer_again(session, cue_id):
                return  # a resent accept: the engagement it started is the answer
            session.send(Withdrawal(cue_id, known.status if mine and known else "unknown"))
            return
        del self._reg.pending[session.device_id]
        # Freed before the engagement is routed, so the associate held for it can take it. Across replicas
        # an accepted cue's slot in storage passes to its engagement (desk_shared.py's _reserve_for).
        self._release_cue(pending, keep_slot=response == "accepted")
        if pending.expiry is not None:
            pending.expiry.cancel()
        for observer in self.observers:
            observer.cue_settled(pending.scenario_id, response)
        log.info("cue.answered", device_id=session.device_id, cue_id=cue_id, response=response)
        answered = {
            "cue_id": cue_id,
            "device_id": session.device_id,
            "app_id": session.app_id,
            "scenario_id": pending.scenario_id,
            "response": response,
            "button_id": button_id,
        }
        if response != "accepted":
            # The answer is settled in memory; the device's next message need not wait for the commit.
            # Its cue.answered webhook commits with it. An accept is stored by desk.start, together with
            # the engagement it starts (and both webhooks).
            self._track(session, self._set_cue_status(cue_id, response, now, button_id, "cue.answered", answered))
            self._emit_cue("cue.answered", answered)
        if response == "declined":
            self.arbiter.remember_decline(session.subject, pending.scenario_id, now, session.session_id)
        if response == "accepted":
            self.arbiter.remember_engagement(session.subject, session.session_id)
            # The journey the associate sees must include every signal that led here.
            await self.settle(session)
            await self.desk.start(session, pending, now, button_id, answered)
            self._emit_cue("cue.answered", answered)

    @staticmethod
    def _press(pending: PendingCue, response: str, button_id: str) -> None:
        """Check a pressed button against the cue; an accept button may choose the engagement's channel."""
        offer = pending.offer
        button = offer.button(button_id)
        if button is None:
            raise InvalidInput("cue_response.button_id", f"the cue has no button {button_id!r}")
        if BUTTON_RESPONSES[button.action] != response:
            raise InvalidInput(
                "cue_response.kind", f"button {button_id!r} answers {BUTTON_RESPONSES[button.action]}, not {response}"
            )
        if button.channel and button.channel != offer.channel:
            others = tuple(c for c in (offer.channel, *offer.upgrades) if c != button.channel)
            pending.offer = replace(offer, channel=button.channel, upgrades=others)


def _unsent(session: DeviceSession, cue_id: str) -> bool:
    """Whether the cue is still in the closed session's outbox: the stream ended before writing it."""
    return any(isinstance(m, CueOffer) and m.cue_id == cue_id for m in session.outbox.items())


def _pushed(pending: PendingCue) -> bool:
    """Offered while the device was away (cue.pending_push): its device returning clears the conditions that fired
    it (idle, absence), which is the point, so it waits for the device or its ttl, not for them to hold."""
    return bool(pending.explanation.get("pending_push"))
