"""One trainer at a time: stores labelled sessions, learns them in order, saves and reloads model states.

Every process stores the sessions it labels (`submit`). The process holding the `predict-trainer` lease
learns the stored ones in id order and saves each model with its version and cursor (the last labelled
session learned) in one row; processes without the lease reload a model whenever a newer version is
stored. With one process it always holds the lease and learns within moments of a label arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from ..storage.records import LabelRecord, ModelRecord
from .model import Example, ModelSettings, OutcomeModel
from .registry import LabelledSession, Predictor

__all__ = ["LEASE", "Trainer", "TrainerConfig"]

log = structlog.get_logger("cuepoint.predict")

LEASE = "predict-trainer"


class TrainerStore(Protocol):
    async def save_label(self, outcome: str, session_id: str, reached: bool, examples: Any, time: float) -> None: ...
    async def labels_after(self, cursor: int, *, limit: int = 500) -> list[LabelRecord]: ...
    async def prune_labels(self, up_to: int) -> None: ...
    async def save_model(self, record: ModelRecord) -> None: ...
    async def models(self) -> list[ModelRecord]: ...
    async def take_lease(self, name: str, holder: str, now: float, ttl: float) -> int | None: ...
    async def release_lease(self, name: str, holder: str) -> None: ...


class TrainerConfig:
    def __init__(self, *, poll: float = 5.0, lease_ttl: float = 30.0, save_every: float = 2.0) -> None:
        # Seconds between looks for labels stored by other processes (local ones wake the trainer at once).
        self.poll = poll
        self.lease_ttl = lease_ttl
        # Least seconds between two saves of the model states while learning.
        self.save_every = save_every


class Trainer:
    def __init__(self, store: TrainerStore, predictor: Predictor, config: TrainerConfig | None = None) -> None:
        self.store = store
        self.predictor = predictor
        self.config = config or TrainerConfig()
        self.holder = uuid.uuid4().hex
        self.epoch: int | None = None
        self.versions: dict[str, int] = {}
        self.cursors: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._dirty: set[str] = set()
        self._saved_at = 0.0
        self._lease_until = 0.0

    @property
    def training(self) -> bool:
        return self.epoch is not None

    async def start(self) -> None:
        await self.reload()
        self.predictor.labelled = self.submit
        await self._renew()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cuepoint-predict-trainer")

    async def stop(self) -> None:
        """Store what is pending, learn it and save (when holding the lease), then let the lease go."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.training:
            await self._learn_stored()
            await self._save(force=True)
            await self.store.release_lease(LEASE, self.holder)
            self.epoch = None

    def submit(self, session: LabelledSession) -> None:
        """A session was labelled here: store it (any process may), then wake the trainer."""
        examples = [(dict(e.x), e.predicted) for e in session.examples]
        task = asyncio.ensure_future(
            self.store.save_label(session.outcome, session.session_id, session.reached, examples, session.time)
        )
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("predict.label_store_failed", error=repr(task.exception()))
        self._wake.set()

    async def reload(self) -> None:
        """Load the stored model states of the configured outcomes that are newer than what we hold."""
        specs = {o.id: o for o in self.predictor.outcomes}
        for record in await self.store.models():
            spec = specs.get(record.outcome)
            if spec is None or record.version <= self.versions.get(record.outcome, 0):
                continue
            try:
                model = OutcomeModel.from_state(record.state, ModelSettings(min_sessions=spec.min_sessions))
            except (KeyError, TypeError, ValueError):
                log.exception("predict.model_unreadable", outcome=record.outcome, version=record.version)
                continue
            self.predictor.models[record.outcome] = model
            self.versions[record.outcome] = record.version
            self.cursors[record.outcome] = record.cursor
            log.info("predict.model_loaded", outcome=record.outcome, version=record.version)

    async def _run(self) -> None:
        while True:
            timeout = self.config.poll
            if self._dirty:
                # Learned but not yet saved (saves are spaced by save_every): come back when it is due.
                timeout = min(timeout, max(0.0, self._saved_at + self.config.save_every - time.time()))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that comes as the event is
            # set (a label write finishing as stop() cancels), and stop() then waited for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._renew()
                if self.training:
                    await self._learn_stored()
                    await self._save()
                else:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("predict.trainer_failed")

    async def _renew(self) -> None:
        now = time.time()
        if self.training and now < self._lease_until - self.config.lease_ttl / 2:
            return
        epoch = await self.store.take_lease(LEASE, self.holder, now, self.config.lease_ttl)
        if epoch != self.epoch:
            log.info("predict.trainer_lease", held=epoch is not None, epoch=epoch)
            if epoch is not None:
                # Newly the trainer: start from what the previous one saved.
                await self.reload()
        self.epoch = epoch
        self._lease_until = now + self.config.lease_ttl if epoch is not None else 0.0

    async def _learn_stored(self) -> None:
        if not self.predictor.outcomes:
            return
        while True:
            start = min(self.cursors.get(o.id, 0) for o in self.predictor.outcomes)
            labels = await self.store.labels_after(start, limit=500)
            if not labels:
                return
            for label in labels:
                if label.id <= self.cursors.get(label.outcome, 0):
                    continue
                if label.outcome in self.predictor.models:
                    examples = tuple(Example(x, p) for x, p in label.examples)
                    self.predictor.learn(LabelledSession(label.outcome, label.session_id, label.reached, examples, 0))
                    self.cursors[label.outcome] = label.id
                    self._dirty.add(label.outcome)
            # Outcomes without labels in this page move past it too, so the page start advances.
            last = labels[-1].id
            for outcome in self.predictor.outcomes:
                if self.cursors.get(outcome.id, 0) < last:
                    self.cursors[outcome.id] = last
                    self._dirty.add(outcome.id)

    async def _save(self, *, force: bool = False) -> None:
        now = time.time()
        if not self._dirty or self.epoch is None or (not force and now - self._saved_at < self.config.save_every):
            return  # what is left is saved on a later round (at most `poll` seconds away) or at stop
        for outcome in sorted(self._dirty):
            model = self.predictor.models.get(outcome)
            if model is None:
                continue
            version = self.versions[outcome] = self.versions.get(outcome, 0) + 1
            record = ModelRecord(outcome, version, self.epoch, self.cursors.get(outcome, 0), model.state(), now)
            # The version is taken before the write: a save cancelled while its write still lands (stop())
            # must not leave the next save reusing its number, which storage would refuse as not newer.
            await self.store.save_model(record)
        self._dirty.clear()
        self._saved_at = now
        learned = [self.cursors.get(o.id, 0) for o in self.predictor.outcomes]
        if learned and min(learned) > 0:
            await self.store.prune_labels(min(learned))

    def report_versions(self) -> Mapping[str, int]:
        return dict(self.versions)
