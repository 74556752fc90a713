"""One online model per declared outcome: P(outcome reached within the session | journey so far).

river's `Pipeline(StandardScaler(), LogisticRegression())`: it learns one example at a time, as labels
arrive (a session reaches the outcome, or ends without it), and its weights read as an explanation
(weight x standardised value per feature). Until `min_sessions` sessions are labelled, the score is the
observed base rate under a Beta prior and is marked `training`.

Each prediction made before its label was known is kept with that label once it arrives (delayed
progressive validation), so the report's AUC and calibration are measured on predictions the model
made without having seen the answer.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from river import compose, linear_model, optim, preprocessing

__all__ = [
    "DEFAULT_MIN_SESSIONS",
    "Calibration",
    "Example",
    "ModelSettings",
    "OutcomeModel",
    "OutcomeReport",
    "auc",
    "calibration",
]

DEFAULT_MIN_SESSIONS = 200
# Predictions kept (with their labels) for the report's AUC and calibration: the most recent ones.
VALIDATION_WINDOW = 4000
# A session contributes at most this many examples (scoring moments), weighted to one session in total.
MAX_EXAMPLES_PER_SESSION = 8
# Feature names a model learns about; later new names are ignored (a bound on memory and scoring cost).
MAX_FEATURES = 512
STATE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ModelSettings:
    min_sessions: int = DEFAULT_MIN_SESSIONS
    # Beta(prior_positive, prior_negative) on the base rate while training.
    prior_positive: float = 1.0
    prior_negative: float = 1.0
    learning_rate: float = 0.02


@dataclass(frozen=True, slots=True)
class Example:
    """A scoring moment: the features then, and what the model predicted then (before the label)."""

    x: Mapping[str, float]
    predicted: float


@dataclass(frozen=True, slots=True)
class Calibration:
    low: float
    high: float
    count: int
    mean_predicted: float
    observed: float


@dataclass(frozen=True, slots=True)
class OutcomeReport:
    outcome: str
    status: str  # training | trained
    labelled_sessions: int
    positive_sessions: int
    base_rate: float
    auc: float | None
    validated: int
    calibration: tuple[Calibration, ...]
    top_features: tuple[tuple[str, float], ...]
    version: int


def _pipeline(settings: ModelSettings) -> compose.Pipeline:
    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(
            optimizer=optim.SGD(settings.learning_rate), intercept_lr=settings.learning_rate
        ),
    )


class OutcomeModel:
    def __init__(self, outcome: str, settings: ModelSettings | None = None) -> None:
        self.outcome = outcome
        self.settings = settings or ModelSettings()
        self.pipeline = _pipeline(self.settings)
        self.labelled = 0
        self.positives = 0
        self.examples = 0
        # Bumped by every change of the learned state; the trainer saves when it moved.
        self.revision = 0
        self.validation: deque[tuple[float, int]] = deque(maxlen=VALIDATION_WINDOW)
        # Every feature name learned so far. Absent features are passed as explicit zeros: river's scaler
        # only updates the statistics of the keys it is given, so a one-hot feature seen only as 1 would
        # otherwise have no variance and never count.
        self.vocabulary: dict[str, None] = {}

    def _dense(self, x: Mapping[str, float]) -> dict[str, float]:
        dense = dict.fromkeys(self.vocabulary, 0.0)
        for name, value in x.items():
            if name in dense:
                dense[name] = value
        return dense

    def _learn_names(self, x: Mapping[str, float]) -> None:
        for name in x:
            if name not in self.vocabulary and len(self.vocabulary) < MAX_FEATURES:
                self.vocabulary[name] = None

    @property
    def trained(self) -> bool:
        return self.labelled >= self.settings.min_sessions

    @property
    def base_rate(self) -> float:
        s = self.settings
        return (self.positives + s.prior_positive) / (self.labelled + s.prior_positive + s.prior_negative)

    def predict(self, x: Mapping[str, float]) -> float:
        """The model's own probability (also while training, for validation)."""
        return float(self.pipeline.predict_proba_one(self._dense(x)).get(True, 0.0))

    def score(self, x: Mapping[str, float]) -> tuple[float, float]:
        """(the score to use, the model's raw probability): the base rate while training."""
        raw = self.predict(x)
        return (raw if self.trained else self.base_rate), raw

    def contributions(self, x: Mapping[str, float], top: int = 5) -> list[tuple[str, float]]:
        """The features that moved this score most: weight x standardised value, largest magnitude first."""
        scaled = self.pipeline["StandardScaler"].transform_one(self._dense(x))
        weights = self.pipeline["LogisticRegression"]._weights
        parts = [(name, float(weights.get(name, 0.0)) * value) for name, value in scaled.items()]
        parts = [p for p in parts if p[1] != 0.0]
        parts.sort(key=lambda p: (-abs(p[1]), p[0]))
        return parts[:top]

    def learn(self, examples: Sequence[Example], reached: bool) -> None:
        """One labelled session: its scoring moments, weighted so the session counts once."""
        self.labelled += 1
        self.positives += int(reached)
        self.revision += 1
        if not examples:
            return
        weight = 1.0 / len(examples)
        for example in examples:
            self.validation.append((example.predicted, int(reached)))
            self._learn_names(example.x)
            self.pipeline.learn_one(self._dense(example.x), reached, w=weight)
            self.examples += 1

    def report(self, top: int = 10, version: int = 0) -> OutcomeReport:
        pairs = list(self.validation)
        weights = self.pipeline["LogisticRegression"]._weights
        ranked = sorted(((str(k), float(v)) for k, v in weights.items() if v), key=lambda p: (-abs(p[1]), p[0]))
        return OutcomeReport(
            outcome=self.outcome,
            status="trained" if self.trained else "training",
            labelled_sessions=self.labelled,
            positive_sessions=self.positives,
            base_rate=self.base_rate,
            auc=auc(pairs),
            validated=len(pairs),
            calibration=tuple(calibration(pairs)),
            top_features=tuple(ranked[:top]),
            version=version,
        )

    # --- persistence: plain JSON, so the state is readable and needs no pickle to load ---------------

    def state(self) -> dict[str, Any]:
        scaler = self.pipeline["StandardScaler"]
        lr = self.pipeline["LogisticRegression"]
        return {
            "format": STATE_FORMAT,
            "outcome": self.outcome,
            "labelled": self.labelled,
            "positives": self.positives,
            "examples": self.examples,
            "min_sessions": self.settings.min_sessions,
            "vocabulary": list(self.vocabulary),
            "scaler": {
                "counts": dict(scaler.counts),
                "means": dict(scaler.means),
                "vars": dict(scaler.vars),
            },
            "weights": {str(k): float(v) for k, v in lr._weights.items()},
            "intercept": float(lr.intercept),
            "iterations": int(lr.optimizer.n_iterations),
            "validation": [[p, y] for p, y in self.validation],
        }

    @classmethod
    def from_state(cls, data: Mapping[str, Any], settings: ModelSettings | None = None) -> OutcomeModel:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown model state format {data.get('format')!r}")
        model = cls(str(data["outcome"]), settings or ModelSettings(min_sessions=int(data.get("min_sessions", 200))))
        model.labelled = int(data["labelled"])
        model.positives = int(data["positives"])
        model.examples = int(data["examples"])
        model.vocabulary = dict.fromkeys(str(name) for name in data["vocabulary"])
        scaler = model.pipeline["StandardScaler"]
        scaler.counts = Counter({k: int(v) for k, v in data["scaler"]["counts"].items()})
        scaler.means = defaultdict(float, {k: float(v) for k, v in data["scaler"]["means"].items()})
        scaler.vars = defaultdict(float, {k: float(v) for k, v in data["scaler"]["vars"].items()})
        lr = model.pipeline["LogisticRegression"]
        for name, weight in data["weights"].items():
            lr._weights[name] = float(weight)
        lr.intercept = float(data["intercept"])
        lr.optimizer.n_iterations = int(data["iterations"])
        model.validation.extend((float(p), int(y)) for p, y in data["validation"])
        return model


def auc(pairs: Iterable[tuple[float, int]]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    ordered = sorted(pairs)
    positives = sum(y for _, y in ordered)
    negatives = len(ordered) - positives
    if not positives or not negatives:
        return None
    rank_sum = 0.0
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their average
        rank_sum += average_rank * sum(y for _, y in ordered[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def calibration(pairs: Iterable[tuple[float, int]], bins: int = 10) -> list[Calibration]:
    """Per decile of predicted probability: how many, the mean prediction and the observed rate."""
    sums = [[0, 0.0, 0] for _ in range(bins)]
    for p, y in pairs:
        b = min(bins - 1, max(0, math.floor(p * bins)))
        sums[b][0] += 1
        sums[b][1] += p
        sums[b][2] += y
    return [
        Calibration(i / bins, (i + 1) / bins, int(n), float(total) / n, float(hits) / n)
        for i, (n, total, hits) in enumerate(sums)
        if n
    ]
