"""The live side of prediction: one model per scored outcome, and the journeys being scored.

The core calls in at four moments: a session opens (with the user's earlier history), a batch of
signals was applied (score, keep a few scoring moments as examples, label the session once the outcome
milestone is reached), a timer fires (time-driven features moved), a session ends (label it as not
reached). Scores are written into `DeviceState.scores`, where `score` conditions read them.

Labelled sessions are not learned here directly: they go to `labelled` (the trainer stores them and one
trainer at a time learns from the stored queue), so several replicas can feed one model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engine.state import DeviceState, Scalar, Score
from ..scenarios.compiler import score_event
from ..scenarios.model import OutcomeSpec
from .features import SCREEN_EVENT, Journey, features
from .model import MAX_EXAMPLES_PER_SESSION, Example, ModelSettings, OutcomeModel, OutcomeReport

__all__ = ["LabelledSession", "Predictor", "SignalLike", "describe_scores"]


class SignalLike(Protocol):
    """What the predictor reads of a stored signal (storage's SignalRecord fits)."""

    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def time(self) -> float: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class LabelledSession:
    outcome: str
    session_id: str
    reached: bool
    examples: tuple[Example, ...]
    time: float


@dataclass(slots=True)
class _Scored:
    """One device session being scored."""

    session_id: str
    journey: Journey
    # Per outcome: up to MAX_EXAMPLES_PER_SESSION scoring moments (a uniform sample) and how many there were.
    examples: dict[str, list[Example]] = field(default_factory=dict)
    moments: dict[str, int] = field(default_factory=dict)
    labelled: set[str] = field(default_factory=set)


class Predictor:
    def __init__(self, seed: int = 0) -> None:
        self.outcomes: tuple[OutcomeSpec, ...] = ()
        self.models: dict[str, OutcomeModel] = {}
        self._scored: dict[str, _Scored] = {}
        self._rng = random.Random(seed)
        # Where labelled sessions go (the trainer); without one they are learned at once (tests, simulate).
        self.labelled: Callable[[LabelledSession], None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.outcomes)

    def configure(self, outcomes: Sequence[OutcomeSpec]) -> None:
        """The loaded set's outcomes (at start and after each reload). Models of kept outcomes keep learning."""
        models: dict[str, OutcomeModel] = {}
        for spec in outcomes:
            settings = ModelSettings(min_sessions=spec.min_sessions)
            model = self.models.get(spec.id)
            if model is None:
                model = OutcomeModel(spec.id, settings)
            else:
                model.settings = settings
            models[spec.id] = model
        self.outcomes = tuple(outcomes)
        self.models = models
        if not self.outcomes:
            self._scored.clear()

    # --- the core's hooks -----------------------------------------------------------------------------

    def session_opened(
        self,
        state: DeviceState,
        session_id: str,
        started_at: float,
        prior_sessions: int = 0,
        prior_milestones: Mapping[str, int] | None = None,
    ) -> None:
        current = self._scored.get(state.device_id)
        if current is not None and current.session_id == session_id:
            return  # resumed: the journey goes on
        self._scored[state.device_id] = _Scored(
            session_id, Journey(started_at, prior_sessions, dict(prior_milestones or {}))
        )
        state.scores = None

    def observe(self, state: DeviceState, signals: Iterable[SignalLike], now: float) -> list[str]:
        """A batch was applied (milestones advanced too): rescore. Returns the pseudo-events of scores set."""
        scored = self._scored.get(state.device_id)
        if scored is None:
            return []
        # Grouped by name first: one list update per event name per batch, not one per signal.
        times: dict[str, list[float]] = {}
        screens: list[tuple[Scalar, float]] = []
        for signal in signals:
            if signal.kind == "event":
                name = signal.name
                at = signal.time
                found = times.get(name)
                if found is None:
                    times[name] = [at]
                else:
                    found.append(at)
                if name == SCREEN_EVENT and (screen := signal.payload.get("screen")) is not None:
                    screens.append((screen, at))
        scored.journey.add(times, screens)
        return self._rescore(state, scored, now, sample=True)

    def refresh(self, state: DeviceState, now: float) -> None:
        """Time moved (a timer fired): rescore without taking an example."""
        scored = self._scored.get(state.device_id)
        if scored is not None:
            self._rescore(state, scored, now, sample=False)

    def session_ended(self, device_id: str, session_id: str, now: float) -> None:
        scored = self._scored.get(device_id)
        if scored is None or scored.session_id != session_id:
            return
        del self._scored[device_id]
        for spec in self.outcomes:
            if spec.id not in scored.labelled:
                self._label(spec.id, scored, False, now)

    def forget(self, device_id: str) -> None:
        self._scored.pop(device_id, None)

    # --- learning and reporting -----------------------------------------------------------------------

    def learn(self, session: LabelledSession) -> None:
        model = self.models.get(session.outcome)
        if model is not None:
            model.learn(session.examples, session.reached)

    def reports(self, versions: Mapping[str, int] | None = None) -> list[OutcomeReport]:
        return [self.models[o.id].report(version=(versions or {}).get(o.id, 0)) for o in self.outcomes]

    # --- internals ------------------------------------------------------------------------------------

    def _rescore(self, state: DeviceState, scored: _Scored, now: float, *, sample: bool) -> list[str]:
        changed: list[str] = []
        scores = state.scores
        if scores is None:
            scores = state.scores = {}
        for spec in self.outcomes:
            model = self.models[spec.id]
            shadow = spec.score == "shadow"
            if spec.id in scored.labelled:
                continue
            if spec.milestone in state.milestones:
                # Reached: the label is known now; the score is a certainty for the rest of the session.
                self._label(spec.id, scored, True, now)
                scores[spec.id] = Score(1.0, model.trained, shadow, list)
                changed.append(score_event(spec.id))
                continue
            x = features(scored.journey, state.milestones, state.context, now, exclude=(spec.milestone,))
            probability, raw = model.score(x)
            scores[spec.id] = Score(probability, model.trained, shadow, _explainer(model, x))
            changed.append(score_event(spec.id))
            if sample:
                self._sample(scored, spec.id, Example(x, raw))
        return changed

    def _sample(self, scored: _Scored, outcome: str, example: Example) -> None:
        # Reservoir sampling: every scoring moment of the session is equally likely to be kept.
        seen = scored.moments[outcome] = scored.moments.get(outcome, 0) + 1
        kept = scored.examples.setdefault(outcome, [])
        if len(kept) < MAX_EXAMPLES_PER_SESSION:
            kept.append(example)
        else:
            slot = self._rng.randrange(seen)
            if slot < MAX_EXAMPLES_PER_SESSION:
                kept[slot] = example

    def _label(self, outcome: str, scored: _Scored, reached: bool, now: float) -> None:
        scored.labelled.add(outcome)
        session = LabelledSession(outcome, scored.session_id, reached, tuple(scored.examples.pop(outcome, ())), now)
        if self.labelled is not None:
            self.labelled(session)
        else:
            self.learn(session)


def _explainer(model: OutcomeModel, x: Mapping[str, float]) -> Callable[[], list[tuple[str, float]]]:
    return lambda: model.contributions(x)


def describe_scores(state: DeviceState, top: int = 5) -> dict[str, dict[str, Scalar | list[list[Scalar]]]]:
    """A device's scores as plain data for explanations: probability, status, top contributing features."""
    out: dict[str, dict[str, Scalar | list[list[Scalar]]]] = {}
    for outcome, score in (state.scores or {}).items():
        status = "shadow" if score.shadow else ("trained" if score.trained else "training")
        out[outcome] = {
            "probability": round(score.probability, 4),
            "status": status,
            "top_features": [[name, round(value, 4)] for name, value in score.explain()[:top]],
        }
    return out
