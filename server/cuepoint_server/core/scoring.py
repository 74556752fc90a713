"""Predictive scores in the core: when sessions open, batches arrive, timers fire and sessions end.

The work is in predict/; this is where the core feeds it. Nothing here runs unless the loaded files
declare an outcome to score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..predict.model import OutcomeReport
from ..predict.registry import Predictor
from ..predict.trainer import Trainer, TrainerConfig
from ..storage import SignalRecord
from .core_base import CoreBase
from .sessions import DeviceSession

__all__ = ["Scoring"]


class Scoring(CoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.predictor = Predictor()
        self.predictor.configure(self.engine.scenarios.outcomes)
        self.trainer: Trainer | None = None

    def _predictor(self) -> Predictor:
        return self.predictor

    async def start_training(self, config: TrainerConfig | None = None) -> None:
        """Load the stored models and train from stored labels, when holding the trainer lease (app.py)."""
        self.trainer = Trainer(self.store, self._predictor(), config)
        await self.trainer.start()

    async def stop_training(self) -> None:
        if self.trainer is not None:
            await self.trainer.stop()

    def _outcomes_swapped(self) -> None:
        self._predictor().configure(self.engine.scenarios.outcomes)
        if self.trainer is not None:
            # An outcome added by the reload may have a stored model (declared before, or by another process).
            self._spawn(self.trainer.reload())

    async def _start_scoring(self, session: DeviceSession) -> None:
        predictor = self._predictor()
        if not predictor.active:
            return
        # Earlier sessions of the user when the session is the user's (identified), else of the device.
        user_id = session.subject.removeprefix("user:") if session.subject.startswith("user:") else ""
        sessions, milestones = await self.store.subject_history(user_id, session.device_id, session.started_at)
        predictor.session_opened(session.state, session.session_id, session.started_at, sessions, milestones)

    def _score_batch(self, session: DeviceSession, rows: Callable[[], Sequence[SignalRecord]], now: float) -> list[str]:
        """Rescore after a batch (`rows` gives its records: made only if an outcome is scored); the returned
        pseudo-events wake scenarios with score conditions."""
        predictor = self._predictor()
        return predictor.observe(session.state, rows(), now) if predictor.active else []

    def _score_now(self, session: DeviceSession, now: float) -> None:
        predictor = self._predictor()
        if predictor.active:
            predictor.refresh(session.state, now)

    def _stop_scoring(self, session: DeviceSession) -> None:
        predictor = self._predictor()
        if not predictor.active:
            return
        if session.consent == "none":
            # Without consent nothing of the session outlives it, not even as a training example.
            predictor.forget(session.device_id)
        else:
            predictor.session_ended(session.device_id, session.session_id, self.clock.now())

    def model_reports(self) -> list[OutcomeReport]:
        versions = self.trainer.report_versions() if self.trainer is not None else {}
        return self._predictor().reports(versions)
