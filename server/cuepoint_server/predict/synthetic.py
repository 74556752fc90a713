"""Synthetic shop journeys with a known conversion rule, for tests and benchmarks.

Each session is a journey (screens, searches, cart additions, maybe the payment page) up to a scoring
moment; whether it then converts is drawn from a logistic rule over the journey's own features, so a
well-trained model can reach the rule's AUC and be calibrated. `CONVERTING` lists what raises the odds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .features import Journey, features

__all__ = ["CONVERTING", "SyntheticSession", "conversion_probability", "sessions"]

# The known rule: log-odds = intercept + sum(weight x feature value).
INTERCEPT = -4.0
CONVERTING: dict[str, float] = {
    "milestone:payment": 3.0,
    "events_5m:add_to_cart": 0.8,
    "prior:purchased": 1.5,
    "platform:iOS": 0.7,
    "events_30m:search": -0.3,
}
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class SyntheticSession:
    journey: Journey
    milestones: dict[str, float]
    context: dict[str, str]
    now: float
    x: dict[str, float]
    probability: float
    converted: bool


def conversion_probability(x: dict[str, float]) -> float:
    logit = INTERCEPT + sum(w * x.get(name, 0.0) for name, w in CONVERTING.items())
    return 1 / (1 + math.exp(-logit))


def sessions(count: int, seed: int = 7) -> Iterator[SyntheticSession]:
    rng = random.Random(seed)
    for i in range(count):
        start = START + i * 37.0
        prior = rng.choice((0, 0, 0, 1, 2, 4))
        purchases = sum(rng.random() < 0.3 for _ in range(prior))
        journey = Journey(start, prior, {"purchased": purchases} if purchases else {})
        context = {
            "device.os": rng.choice(("iOS", "Android")),
            "app.version": rng.choice(("4.1.0", "4.2.0")),
            "device.timezone": rng.choice(("Europe/Paris", "America/New_York")),
        }
        t = start
        milestones: dict[str, float] = {}
        for _ in range(rng.randint(1, 12)):
            t += rng.expovariate(1 / 20)
            kind = rng.random()
            if kind < 0.35:
                screen = rng.choice(("home", "product", "product", "cart"))
                journey.observe("screen_viewed", t, {"screen": screen})
            elif kind < 0.6:
                journey.observe("search", t, {})
            elif kind < 0.85:
                journey.observe("add_to_cart", t, {})
            elif "payment" not in milestones:
                journey.observe("screen_viewed", t, {"screen": "payment"})
                milestones["payment"] = t
        now = t + rng.uniform(0, 30)
        x = features(journey, milestones, context, now, exclude=("purchased",))
        p = conversion_probability(x)
        yield SyntheticSession(journey, milestones, context, now, x, p, rng.random() < p)
