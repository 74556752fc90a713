"""Choose at most one cue among qualifying scenarios, and say why not for the rest.

Memory of past offers is keyed by subject (the user id when known, else the
device), on the server, so cooldowns survive reinstalls and follow the user
across devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..scenarios.compiler import CompiledScenario

__all__ = ["Arbiter", "Blocked", "Decision"]


@dataclass(frozen=True, slots=True)
class Blocked:
    scenario_id: str
    # priority | cooldown | cue_pending | engagement_active
    reason: str
    detail: str = ""


@dataclass(slots=True)
class Decision:
    offer: CompiledScenario | None = None
    blocked: list[Blocked] = field(default_factory=list)


class Arbiter:
    def __init__(self) -> None:
        self._last_offer: dict[tuple[str, str], float] = {}

    def remember_offer(self, subject: str, scenario_id: str, at: float) -> None:
        key = (subject, scenario_id)
        self._last_offer[key] = max(at, self._last_offer.get(key, at))

    def decide(
        self, qualified: Sequence[CompiledScenario], subject: str, busy: str | None, now: float
    ) -> Decision:
        """`qualified` is in arbitration order; `busy` names why the device can take no cue."""
        decision = Decision()
        for scenario in qualified:
            if decision.offer is not None:
                decision.blocked.append(Blocked(scenario.id, "priority", f"lost to {decision.offer.id}"))
                continue
            if busy is not None:
                decision.blocked.append(Blocked(scenario.id, busy))
                continue
            last = self._last_offer.get((subject, scenario.id))
            if last is not None and now - last < scenario.cooldown:
                decision.blocked.append(
                    Blocked(
                        scenario.id,
                        "cooldown",
                        f"offered {now - last:.0f}s ago, cooldown {scenario.cooldown:.0f}s",
                    )
                )
                continue
            decision.offer = scenario
        return decision
