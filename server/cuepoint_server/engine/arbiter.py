"""Choose at most one cue among qualifying scenarios, and say why not for the rest.

Memory of offers, declines and engagements is keyed by subject (the user id
when known, else the device), on the server, so caps and decline memory
survive reinstalls and follow the user across devices.

Checks, per qualifying scenario in arbitration order (priority, then id):
its holdout (control) group first, so that group is exactly the hash split
(engine/holdout.py); the emergency switch, its schedule, decline memory, an
engagement earlier in the session, its cooldown and caps; then, if a higher scenario already won,
"priority"; otherwise the device being busy (a cue on screen or an engagement
active), the global minimum gap and caps, and queue capacity. The first
scenario that passes everything is offered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..scenarios.compiler import CompiledScenario
from ..scenarios.durations import format_duration
from ..scenarios.model import CapsSpec, PolicySpec
from ..storage.records import CueRecord
from .holdout import in_holdout
from .state import DeviceState

__all__ = ["INVITATION", "Arbiter", "Blocked", "Decision", "Situation"]

DAY = 86400.0
# The scenario id of cues a person sends (an associate's invitation) rather than a scenario file:
# outside the id syntax of scenario files, so it can never collide with one.
INVITATION = "@invitation"
MAX_REMEMBERED_OFFERS = 512


@dataclass(frozen=True, slots=True)
class Blocked:
    scenario_id: str
    # holdout | paused | schedule | declined | engaged | cooldown | cap | cue_pending |
    # engagement_active | min_gap | no_capacity | priority
    reason: str
    detail: str = ""


@dataclass(slots=True)
class Decision:
    offer: CompiledScenario | None = None
    blocked: list[Blocked] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Situation:
    """What the arbiter needs to know about the device at decision time."""

    subject: str
    session_id: str
    state: DeviceState
    now: float
    policy: PolicySpec
    busy: str | None = None
    paused: bool = False
    # Why nobody could take this scenario's engagement where routing would send it; None: someone can.
    no_capacity: Callable[[CompiledScenario], str | None] = lambda scenario: None


@dataclass(frozen=True, slots=True)
class _Offer:
    at: float
    scenario_id: str
    session_id: str


@dataclass(slots=True)
class _Memory:
    offers: deque[_Offer] = field(default_factory=lambda: deque(maxlen=MAX_REMEMBERED_OFFERS))
    declines: dict[str, tuple[float, str]] = field(default_factory=dict)
    engaged_sessions: set[str] = field(default_factory=set)


class Arbiter:
    def __init__(self) -> None:
        self._memory: dict[str, _Memory] = {}

    def _of(self, subject: str) -> _Memory:
        memory = self._memory.get(subject)
        if memory is None:
            memory = self._memory[subject] = _Memory()
        return memory

    def remember_offer(self, subject: str, scenario_id: str, at: float, session_id: str = "") -> None:
        offers = self._of(subject).offers
        offer = _Offer(at, scenario_id, session_id)
        if offers and offers[-1].at >= at and offer in offers:
            # Already known: replayed from storage after an identity merge re-filed the device's cues.
            return
        offers.append(offer)
        if len(offers) > 1 and offers[-2].at > at:
            # Restored history may arrive out of order; keep it sorted.
            ordered = sorted(offers, key=lambda o: o.at)
            offers.clear()
            offers.extend(ordered)

    def remember_decline(self, subject: str, scenario_id: str, at: float, session_id: str) -> None:
        self._of(subject).declines[scenario_id] = (at, session_id)

    def remember_engagement(self, subject: str, session_id: str) -> None:
        self._of(subject).engaged_sessions.add(session_id)

    def holds_all(self, subject: str) -> bool:
        """Whether memory kept every offer it was told of for the subject (at most MAX_REMEMBERED_OFFERS)."""
        memory = self._memory.get(subject)
        return memory is None or len(memory.offers) < MAX_REMEMBERED_OFFERS

    def forget(self, subject: str) -> None:
        self._memory.pop(subject, None)

    def merge(self, source: str, target: str) -> None:
        """An anonymous device was identified: its history now belongs to the user."""
        old = self._memory.pop(source, None)
        if old is None:
            return
        memory = self._of(target)
        for offer in old.offers:
            self.remember_offer(target, offer.scenario_id, offer.at, offer.session_id)
        for scenario_id, (at, session_id) in old.declines.items():
            if scenario_id not in memory.declines or memory.declines[scenario_id][0] < at:
                memory.declines[scenario_id] = (at, session_id)
        memory.engaged_sessions |= old.engaged_sessions

    def recheck(self, scenario: CompiledScenario, s: Situation, history: Sequence[CueRecord]) -> tuple[str, str] | None:
        """Why an offer decided from this process's memory must not stand, judged on the subject's stored cues.

        Another replica may have offered to the same user meanwhile (storage/base.py, OfferGuard): the rules
        that follow the user (decline memory, after_engagement, cooldown, min_gap, caps) are applied again
        to what is stored. What is local to this device (busy, schedule, capacity, holdout) is not.
        """
        memory = _Memory()
        for cue in history:
            memory.offers.append(_Offer(cue.created_at, cue.scenario_id, cue.session_id))
            if cue.status == "declined":
                memory.declines[cue.scenario_id] = (cue.responded_at or cue.created_at, cue.session_id)
            elif cue.status == "accepted":
                memory.engaged_sessions.add(cue.session_id)
        return self._memory_block(scenario, s, memory) or self._gap_and_caps(s, memory)

    def decide(self, qualified: Sequence[CompiledScenario], situation: Situation) -> Decision:
        decision = Decision()
        memory = self._of(situation.subject)
        for scenario in qualified:
            episode = scenario.episode(situation.state)
            if episode is not None and situation.state.fired_episodes.get(scenario.id) == episode:
                continue  # this idle period / absence / visit already fired
            reason = self._own_block(scenario, situation, memory)
            if reason is None and decision.offer is not None:
                reason = ("priority", f"lost to {decision.offer.id}")
            if reason is None:
                reason = self._shared_block(scenario, situation, memory)
            if reason is not None:
                decision.blocked.append(Blocked(scenario.id, *reason))
                continue
            decision.offer = scenario
        return decision

    def _own_block(self, scenario: CompiledScenario, s: Situation, memory: _Memory) -> tuple[str, str] | None:
        if scenario.holdout and in_holdout(s.subject, scenario.id, scenario.holdout):
            return ("holdout", f"in the {scenario.holdout * 100:g}% holdout (control) group")
        if s.paused:
            return ("paused", "offers are switched off")
        if scenario.schedule is not None and not scenario.schedule.is_open(s.now, s.state.context):
            return ("schedule", f"outside its {scenario.schedule.describe()}")
        return self._memory_block(scenario, s, memory)

    def _memory_block(self, scenario: CompiledScenario, s: Situation, memory: _Memory) -> tuple[str, str] | None:
        """A scenario's own rules that follow the subject: decline memory, after_engagement, cooldown, caps."""
        declined = memory.declines.get(scenario.id)
        if declined is not None:
            at, session_id = declined
            memory_rule = scenario.after_decline
            if (
                memory_rule == "never"
                or (memory_rule == "session" and session_id == s.session_id)
                or (isinstance(memory_rule, float) and s.now - at < memory_rule)
            ):
                return ("declined", f"declined {s.now - at:.0f}s ago (after_decline: {_rule(memory_rule)})")
        if s.policy.after_engagement == "session" and s.session_id in memory.engaged_sessions:
            return ("engaged", "an engagement already happened this session")
        mine = [o for o in memory.offers if o.scenario_id == scenario.id]
        # `cooldown > 0` first: another replica's clock may stamp its offer a little after our `now`, and a
        # negative age must not read as "in cooldown" for a scenario that has none.
        if scenario.cooldown > 0 and mine and s.now - mine[-1].at < scenario.cooldown:
            return (
                "cooldown",
                f"offered {s.now - mine[-1].at:.0f}s ago, cooldown {format_duration(scenario.cooldown)}",
            )
        return _over_cap(scenario.caps, mine, s, "scenario")

    def admit_invitation(self, s: Situation) -> tuple[str, str] | None:
        """Why a person's invitation may not be offered now, if it may not.

        The same policy as a scenario's cue (pause, one thing at a time, min_gap, caps, after_engagement),
        less what only scenarios have (holdout, schedule, cooldown, capacity: the inviter is the capacity);
        a user who declined an invitation is not invited again in the same session.
        """
        memory = self._of(s.subject)
        if s.paused:
            return ("paused", "offers are switched off")
        declined = memory.declines.get(INVITATION)
        if declined is not None and declined[1] == s.session_id:
            return ("declined", "the user declined an invitation this session")
        if s.policy.after_engagement == "session" and s.session_id in memory.engaged_sessions:
            return ("engaged", "an engagement already happened this session")
        return self._policy_block(s, memory)

    def _shared_block(self, scenario: CompiledScenario, s: Situation, memory: _Memory) -> tuple[str, str] | None:
        blocked = self._policy_block(s, memory)
        if blocked is not None:
            return blocked
        if s.policy.require_capacity:
            missing = s.no_capacity(scenario)
            if missing is not None:
                return ("no_capacity", missing)
        return None

    def _policy_block(self, s: Situation, memory: _Memory) -> tuple[str, str] | None:
        """The policy every offer faces, whoever makes it: one thing at a time, min_gap, caps across scenarios."""
        if s.busy is not None:
            return (s.busy, "")
        return self._gap_and_caps(s, memory)

    def _gap_and_caps(self, s: Situation, memory: _Memory) -> tuple[str, str] | None:
        if memory.offers and s.now - memory.offers[-1].at < s.policy.min_gap:
            return (
                "min_gap",
                f"last cue {s.now - memory.offers[-1].at:.0f}s ago, min_gap {format_duration(s.policy.min_gap)}",
            )
        return _over_cap(s.policy.caps, list(memory.offers), s, "all scenarios")


def _rule(rule: float | str) -> str:
    return format_duration(rule) if isinstance(rule, float) else rule


def _over_cap(caps: CapsSpec | None, offers: Sequence[_Offer], s: Situation, scope: str) -> tuple[str, str] | None:
    if caps is None:
        return None
    if caps.per_session is not None:
        in_session = sum(1 for o in offers if o.session_id == s.session_id)
        if in_session >= caps.per_session:
            return ("cap", f"{in_session} offer(s) this session, cap {caps.per_session} ({scope})")
    if caps.per_day is not None:
        today = sum(1 for o in offers if s.now - o.at < DAY)
        if today >= caps.per_day:
            return ("cap", f"{today} offer(s) in 24h, cap {caps.per_day} ({scope})")
    return None
