"""The Cuepoint domain core.

Turns device sessions' signals into cues and accepted cues into engagements
routed to associates. Evaluation is synchronous and in memory; storage writes
go through the store's single writer and are awaited only where durability is
promised (acks) or needed (an engagement's journey).

The work is split by idea into the classes `Core` combines: session_lifecycle.py, ingest.py,
recovery.py, evaluation.py, invitations.py, privacy.py and operations.py, over core_base.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..predict.registry import describe_scores
from .cluster import Answerer
from .core_base import CoreConfig
from .errors import InvalidInput
from .follow import Follow
from .invitations import Invitations
from .live import LiveNow, QueueLoad, describe_session, queue_loads
from .live_cluster import LIVE, live_items, merge_live
from .model import AssociateSignIn, CueOffer
from .privacy import Privacy
from .session_lifecycle import SessionLifecycle
from .sessions import AssociateSession

__all__ = ["Core", "CoreConfig", "DeviceView", "VariantState"]


@dataclass(frozen=True, slots=True)
class VariantState:
    variant_id: str
    weight: float
    control: bool
    stopped: bool


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    connected: bool
    segments: list[str]
    milestones: list[str]
    # predict.registry.describe_scores: outcome -> probability, status, top features.
    scores: dict[str, Any] = field(default_factory=dict)


# The question asking which replica holds a device's stream.
HOLDS = "holds-device"


class Core(SessionLifecycle, Invitations, Privacy, Follow):
    """The domain core the API adapters (gRPC, HTTP) and `simulate` drive."""

    def sign_in(self, request: AssociateSignIn) -> AssociateSession:
        return self.desk.sign_in(request)

    def sign_out(self, associate: AssociateSession) -> None:
        self.desk.sign_out(associate)

    async def end_engagement(
        self, associate: AssociateSession, engagement_id: str, disposition: str, notes: str, outcome: str = ""
    ) -> None:
        await self.desk.wrap_up(associate, engagement_id, disposition, notes, outcome)

    def variant_states(self, scenario_id: str) -> list[VariantState]:
        """A scenario's A/B variants in file order (the first is the control), with their switches."""
        scenario = self.engine.scenarios.by_id.get(scenario_id)
        weights = scenario.variant_weights if scenario else ()
        return [
            VariantState(v, w, i == 0, (scenario_id, v) in self.stopped_variants) for i, (v, w) in enumerate(weights)
        ]

    async def set_variant_stopped(
        self, scenario_id: str, variant_id: str, stopped: bool, reason: str
    ) -> list[VariantState]:
        """Stop (or restart) a variant: its users see the control. Stored before it takes effect."""
        scenario = self.engine.scenarios.by_id.get(scenario_id)
        if scenario is None:
            raise InvalidInput("scenario_id", f"no scenario {scenario_id!r} is being served")
        ids = [v for v, _ in scenario.variant_weights]
        if variant_id not in ids:
            raise InvalidInput("variant_id", f"scenario {scenario_id!r} has no variant {variant_id!r}")
        if variant_id == ids[0]:
            raise InvalidInput("variant_id", "the control cannot be stopped; disable the scenario instead")
        await self.store.set_variant_stopped(scenario_id, variant_id, stopped, reason, self.clock.now())
        if stopped:
            self.stopped_variants.add((scenario_id, variant_id))
        else:
            self.stopped_variants.discard((scenario_id, variant_id))
        return self.variant_states(scenario_id)

    def pending_offer(self, device_id: str) -> CueOffer | None:
        """The cue waiting for the device (on screen, or kept while it is away), if any."""
        pending = self._reg.pending.get(device_id)
        return pending.offer if pending is not None else None

    def device_view(self, device_id: str) -> DeviceView:
        state = self._reg.states.get(device_id)
        if state is None:
            return DeviceView(device_id, False, [], [])
        now = self.clock.now()
        return DeviceView(
            device_id,
            device_id in self._reg.sessions,
            self.engine.segments_of(state, now),
            sorted(state.milestones),
            describe_scores(state),
        )

    def live_now(self) -> LiveNow:
        """Connected sessions (live / idle / inactive), pending cues and queue loads: the admin's live view."""
        now, config = self.clock.now(), self.config
        sessions = []
        for session in list(self._reg.sessions.values()):
            engagement = self.desk.get(self.desk.active_for(session.device_id) or "")
            sessions.append(
                describe_session(
                    session,
                    now,
                    status_after=(config.live_idle_after, config.live_inactive_after),
                    segments=self.engine.segments_of(session.state, now),
                    pending=self._reg.pending.get(session.device_id),
                    engagement=(engagement.engagement_id, engagement.state) if engagement else ("", ""),
                    replica_id=self.bus.replica_id,
                )
            )
        return LiveNow(now, sessions, self.queue_loads(), self.desk.callbacks())

    async def cluster_live_now(self) -> LiveNow:
        """Live now of every replica: this one's view merged with the others' (core/live_cluster.py)."""
        here = self.live_now()
        answers, unanswered = await self.ask_replicas(LIVE)
        return merge_live(here, answers, unanswered) if answers or unanswered else here

    async def device_holders(self, device_id: str) -> tuple[list[str], list[str]]:
        """The other replicas whose process holds `device_id`'s stream, and the live ones that did not say
        (an invitation for it goes there: api/associate_links.py)."""
        answers, unanswered = await self.ask_replicas(HOLDS, {"device_id": device_id})
        return sorted(replica for replica, items in answers.items() if items), unanswered

    def answerers(self) -> dict[str, Answerer]:
        async def live(_args: dict[str, Any]) -> list[dict[str, Any]]:
            return live_items(self.live_now())

        async def holds(args: dict[str, Any]) -> list[dict[str, Any]]:
            device_id = str(args.get("device_id", ""))
            return [{"device_id": device_id}] if self.holds_device(device_id) else []

        return {LIVE: live, HOLDS: holds}

    def queue_loads(self) -> list[QueueLoad]:
        """Per queue (of a scenario, an associate or a waiting engagement): waiting engagements, associates."""
        queues = {s.queue for s in self.engine.scenarios.scenarios} | self.desk.queues_in_use()
        return queue_loads(
            queues, self.router.associates(), self.router.waiting_count, self.router.oldest_since, self.clock.now()
        )

    def stats(self) -> dict[str, int]:
        return {
            "devices": len(self._reg.states),
            "sessions": len(self._reg.sessions),
            "associates": len(self.router.associates()),
            "pending_cues": len(self._reg.pending),
            "engagements": self.desk.count(),
            "evaluations": self.engine.evaluations,
        }
