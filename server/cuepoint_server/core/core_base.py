"""What every part of the core shares: configuration, the registry of devices and sessions, background work.

The core is split by idea (evaluation, recovery, ingest, session lifecycle, privacy), each a class in its
own module building on this one; core/service.py puts them together as `Core`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..clock import Clock, TimerHandle
from ..engine.arbiter import Arbiter
from ..engine.engine import Engine
from ..engine.state import DeviceState
from ..storage import (
    CueRecord,
    DecisionRecord,
    OfferCommit,
    OfferGuard,
    SessionRecord,
    SignalRecord,
    SlotClaim,
    Store,
    WebhookRecord,
)
from .bus import Bus, LocalBus
from .consent import shared
from .deadlines import CUE_EXPIRY, timer
from .engagements import DeskConfig, EngagementDesk
from .group_commit import GroupCommit
from .model import CueOffer, SessionFailed
from .observers import CoreObserver
from .remembered import Remembered
from .sessions import DeviceSession, PendingCue, Unit
from .user_tokens import UserTokenKey
from .validation import Limits

__all__ = ["CoreBase", "CoreConfig", "Registry", "session_record"]

log = structlog.get_logger("cuepoint.core")


@dataclass(frozen=True, slots=True)
class CoreConfig:
    # Signals shown to the associate in the journey timeline.
    journey_limit: int = 50
    # Journey data older than this many days is deleted by purge(); None keeps it.
    retention_days: float | None = None
    # A device reconnecting within this many seconds resumes its session.
    resume_window: float = 120.0
    # Seconds an engagement may wait before the user is offered a callback or
    # chat, when its queue sets no fallback_after; None: never.
    fallback_after: float | None = None
    max_signals_per_batch: int = Limits.max_signals_per_batch
    # Live now (admin ListLiveSessions): seconds since a device's last signal before idle, then inactive.
    live_idle_after: float = 45.0
    live_inactive_after: float = 60.0
    # Refuse a Hello for a known device id without its secret (core/device_credentials.py). The server
    # turns this on whenever it runs with auth; without auth anyone may be anyone, and it is off.
    enforce_device_secrets: bool = False
    # Migration for SDKs that predate device secrets: admit devices that never presented theirs.
    device_secret_migration: bool = False
    # A user id stitches journeys, caps and decline memory across devices only when a user token verified
    # it (core/user_tokens.py); without, it is only claimed. On whenever the server runs with auth.
    enforce_user_tokens: bool = False
    # Per app id: how its backend signs user tokens (the auth file's apps.<id>.user_tokens).
    user_token_keys: Mapping[str, UserTokenKey] = field(default_factory=dict)
    # Several replicas: one whose registry row (rewritten every third of this) is this many seconds old is
    # gone: the others fire its due timer rows, adopt its engagements and free its slots (core/replicas.py).
    replica_ttl: float = 15.0


@dataclass
class Registry:
    states: dict[str, DeviceState] = field(default_factory=dict)
    sessions: dict[str, DeviceSession] = field(default_factory=dict)
    pending: dict[str, PendingCue] = field(default_factory=dict)
    # Devices gone while a `when_away` scenario may still fire for them from a timer: their last (closed)
    # session, and when their state may be evicted (core/evaluation.py, "away").
    away: dict[str, tuple[DeviceSession, float]] = field(default_factory=dict)


class CoreBase:
    """State and background work every part of the core uses."""

    def __init__(self, store: Store, engine: Engine, clock: Clock, config: CoreConfig | None = None) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.config = config or CoreConfig()
        self.arbiter = Arbiter()
        # How this replica reaches the others (core/bus.py); app.py replaces it when there are others.
        self.bus: Bus = LocalBus()
        self._reg = Registry()
        self._background: set[asyncio.Task[Any]] = set()
        # Applied signal batches of every session, committed together and acked by one task (core/ingest.py).
        self._group = GroupCommit(self._commit_round)
        self.desk = EngagementDesk(
            store,
            engine,
            clock,
            self._reg.sessions,
            self._spawn,
            DeskConfig(journey_limit=self.config.journey_limit, default_fallback_after=self.config.fallback_after),
        )
        self.router = self.desk.router
        # Timer rows the desk arms name this replica as their owner (core/deadlines.py).
        self.desk.replica = lambda: self.bus.replica_id
        self._timers: dict[str, tuple[float, TimerHandle]] = {}
        # With other replicas: the due time last written to each device's timer row (None: disarmed), so
        # the row is written only when it changes (core/evaluation.py `_store_deadline`).
        self._deadline_rows: dict[str, float | None] = {}
        # Whose memory was replayed from storage, and whose is whole (core/remembered.py).
        self._remembered = Remembered()
        # The runtime emergency switch (admin API); the policy file has its own.
        self.paused_by_admin = False
        # Why each scenario in Engine.disabled was switched off (core/operations.py).
        self.disabled_reasons: dict[str, str] = {}
        # Called with (kind, payload) for cue.offered / cue.answered / cue.withdrawn (webhooks.py).
        self.cue_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # Builds the webhook outbox rows of an event (webhooks.py), for those committed with what they report.
        self.webhook_rows: Callable[[str, dict[str, Any]], list[WebhookRecord]] | None = None
        # Called when webhook deliveries were added to or put back in the outbox (webhooks.py).
        self.outbox_wakeups: list[Callable[[], None]] = []
        # A/B variants switched off at runtime, (scenario id, variant id); loaded from storage at start.
        self.stopped_variants: set[tuple[str, str]] = set()
        # Called with every arbitration decision (simulate, metrics).
        self.decision_listeners: list[Callable[[DecisionRecord], None]] = []
        # Called as signals arrive, cues are offered and settled, engagements assigned (metrics).
        self.observers: list[CoreObserver] = []
        # Called with ("user.erased", payload) after an erasure (webhooks tell the CRM).
        self.privacy_listeners: list[Callable[[str, dict[str, Any]], None]] = []

    @property
    def offers_paused(self) -> bool:
        return self.paused_by_admin or self.engine.scenarios.policy.offers_paused

    def paused_for(self, app_id: str) -> bool:
        """Offers paused for this app's devices: everywhere, or by the app's own policy file."""
        return self.offers_paused or self.engine.scenarios.policy_for(app_id).offers_paused

    def _track(self, session: DeviceSession, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        if session.writes is None:
            session.writes = set()
        session.writes.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            writes = session.writes
            if writes is not None:
                writes.discard(finished)
                if not writes:
                    session.writes = None
            session.notify_room()

        task.add_done_callback(done)

    async def _commit_round(self, sessions: list[DeviceSession]) -> None:
        raise NotImplementedError  # core/ingest.py

    async def acked(self, session: DeviceSession) -> None:
        """Wait until every batch the session applied so far is committed and its ack is on the outbox."""
        if session.acks is not None or session.committing:
            await self._group.settled(session)

    async def settle(self, session: DeviceSession) -> None:
        """Wait until what the session did so far is stored: its batches (acked by then) and tracked writes."""
        await self.acked(session)
        if session.writes:
            await asyncio.gather(*session.writes, return_exceptions=True)

    def follow_device(self, session: DeviceSession) -> None:
        """A device's stream opened here: across replicas its engagement follows it (core/follow.py)."""

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background.failed", error=repr(task.exception()))

    # -- units of work: an evaluation's writes commit together, then what they promise is shown ----------

    def _open_unit(self, session: DeviceSession, signals: list[SignalRecord] | None = None) -> Unit:
        unit = session.unit = Unit()
        if signals:
            unit.work.signals = signals
        return unit

    def _seal_unit(self, session: DeviceSession, unit: Unit) -> None:
        unit.sealed = True
        if session.unit is unit:
            session.unit = None

    def _stage_offer(
        self,
        session: DeviceSession,
        record: CueRecord,
        offer: CueOffer,
        guard: OfferGuard | None = None,
        slot: SlotClaim | None = None,
    ) -> None:
        unit = session.unit
        if unit is None or unit.sealed:
            unit = Unit()
            self._track(session, self._commit_unit(session, unit))
        unit.work.cues.append(record)
        if guard is not None:
            unit.work.guards.append(guard)
        if slot is not None:
            unit.work.slots.append(slot)
        unit.shown.append(offer)

    def _release_cue(self, pending: PendingCue, keep_slot: bool = False) -> None:
        """A cue is answered, expired or withdrawn: the associate's slot held for it is free again, across
        replicas in storage too (unless `keep_slot`: its engagement takes the slot over)."""
        associate = pending.reserved
        pending.release()
        if associate is not None and not keep_slot:
            self.desk.release_cue_slot(associate.associate_id, pending.offer.cue_id)

    def _stage_decision(self, session: DeviceSession, record: DecisionRecord) -> None:
        unit = session.unit
        if unit is None or unit.sealed:
            self._track(session, self.store.save_decision(record))
        else:
            unit.work.decisions.append(record)

    async def _commit_unit(self, session: DeviceSession, unit: Unit) -> list[str] | None:
        """Commit the unit, then show what it offered.

        Returns the signal ids storage skipped as stored before (resends older than memory remembers),
        or None if storage failed (then the stream ends).
        """
        self._seal_unit(session, unit)
        work = unit.work
        skipped: list[str] = []
        if self.webhook_rows is not None:
            # The cue.offered webhooks commit with the cues they report: never one without the other.
            for record in work.cues:
                work.webhooks.extend(self.webhook_rows("cue.offered", _offered(record)))
                if record.explanation.get("pending_push"):
                    # Offered while the device is away: the app's push service is asked to bring it back.
                    work.webhooks.extend(self.webhook_rows("cue.pending_push", pending_push(record)))
        # Each cue's expiry is a row committed with it: any replica fires it if this one is gone by then.
        work.timers.extend(timer(CUE_EXPIRY, r.cue_id, r.expires_at, self.bus.replica_id) for r in work.cues)
        refused: Mapping[str, tuple[str, str]] = {}
        try:
            if work.cues or work.decisions or work.milestones or work.statuses or work.timers or work.fires:
                skipped, refused, slotted = await self.store.commit_offer(work)
                self._slotted(slotted)
            elif work.signals:
                # Plain signal batches stay on the writer's merged append path (the hot one).
                skipped = await self.store.append_signals(work.signals)
            elif work.batches:
                skipped = await self.store.append_journal(work.batches)
        except Exception:
            log.exception("unit.store_failed", device_id=session.device_id, cues=len(work.cues))
            for record in work.cues:
                pending = self._reg.pending.get(record.device_id)
                if pending is not None and pending.offer.cue_id == record.cue_id:
                    # Never committed, so never shown: the offer is forgotten with it.
                    del self._reg.pending[record.device_id]
                    pending.release()
                    if pending.expiry is not None:
                        pending.expiry.cancel()
            session.send(SessionFailed("could not store signals; resend them"))
            return None
        if refused:
            await self._refused(session, work, refused)
        for message in unit.shown:
            if not (isinstance(message, CueOffer) and message.cue_id in refused):
                session.send(message)
        if work.webhooks:
            for wake in self.outbox_wakeups:
                wake()
        for record in work.cues:
            if record.cue_id in refused:
                continue
            self._emit_cue("cue.offered", _offered(record))
            if record.explanation.get("pending_push"):
                self._emit_cue("cue.pending_push", pending_push(record))
            elif session.closed:
                # The stream ended while this committed: the device never got it (session.send dropped it).
                scenario = self.engine.scenarios.by_id.get(record.scenario_id)
                if scenario is not None and scenario.when_away is not None:
                    self._push_undelivered(record)
        return skipped

    def _slotted(self, slotted: Mapping[str, str]) -> None:
        """Storage gave cues on screen a slot (OfferCommit.slots): held here by the associate it chose, which
        may not be the one this replica's own view picked."""
        if not slotted:
            return
        for pending in self._reg.pending.values():
            associate_id = slotted.get(pending.offer.cue_id)
            chosen = self.router.find(associate_id) if associate_id else None
            held = pending.reserved
            if chosen is None or held is chosen or held is None:
                continue
            cue_id = pending.offer.cue_id
            channel, queue = held.held.get(cue_id, (pending.offer.channel, ""))
            pending.release()
            chosen.hold(chosen.reserved, cue_id, channel, queue)
            pending.reserved = chosen

    def _cue_webhooks(self, kind: str, payload: dict[str, Any]) -> list[WebhookRecord]:
        """The outbox rows of a cue event, for the caller to commit with the change it reports."""
        return self.webhook_rows(kind, payload) if self.webhook_rows is not None else []

    async def _set_cue_status(
        self, cue_id: str, status: str, at: float, button_id: str, kind: str, payload: dict[str, Any], timer: str = ""
    ) -> bool:
        """A cue's new status and the webhook rows of the event reporting it, in one transaction. With
        `timer` (its expiry), only once and only while still offered: False when nothing was written."""
        hooks = self._cue_webhooks(kind, payload)
        written = await self.store.set_cue_status(cue_id, status, at, button_id, webhooks=hooks, timer=timer)
        if hooks and written:
            for wake in self.outbox_wakeups:
                wake()
        return written

    def _push_undelivered(self, record: CueRecord) -> None:
        """A committed cue of a `when_away` scenario never reached its device (the stream went first): post
        cue.pending_push now, through the outbox. The cue stays pending until the device returns or it expires."""
        payload = pending_push(record)
        if self.webhook_rows is not None:
            rows = self.webhook_rows("cue.pending_push", payload)
            if rows:
                self._spawn(self._enqueue_push(rows))
        self._emit_cue("cue.pending_push", payload)

    async def _enqueue_push(self, rows: list[WebhookRecord]) -> None:
        await self.store.enqueue_webhooks(rows)
        for wake in self.outbox_wakeups:
            wake()

    async def _refused(self, session: DeviceSession, work: OfferCommit, refused: Mapping[str, tuple[str, str]]) -> None:
        """Storage refused cues: another replica offered to the same user meanwhile (caps, cooldown, min_gap,
        decline memory). The cue is never shown; the subject's memory is read again from storage, so the next
        decisions here see what the other replica did."""
        for record in work.cues:
            if record.cue_id not in refused:
                continue
            log.info(
                "cue.refused_by_store",
                device_id=record.device_id,
                cue_id=record.cue_id,
                reason=refused[record.cue_id][0],
            )
            pending = self._reg.pending.get(record.device_id)
            if pending is not None and pending.offer.cue_id == record.cue_id:
                del self._reg.pending[record.device_id]
                pending.release()
                if pending.expiry is not None:
                    pending.expiry.cancel()
            self.arbiter.forget(record.subject)
            self._remembered.forget(record.subject)
            await self._restore_memory(record.subject)

    async def _restore_memory(self, subject: str) -> None:
        raise NotImplementedError  # core/recovery.py

    def _emit_cue(self, kind: str, payload: dict[str, Any]) -> None:
        """A cue's lifecycle event (cue.offered / answered / withdrawn), once what it reports is stored."""
        for listener in self.cue_listeners:
            try:
                listener(kind, payload)
            except Exception:
                log.exception("cue.listener_failed", kind=kind)

    async def drain(self) -> None:
        """Wait for background writes; used on shutdown."""
        await self._group.idle()
        pending: set[asyncio.Future[Any]] = set(self._background)
        for session in [*self._reg.sessions.values(), *(gone for gone, _ in self._reg.away.values())]:
            pending |= session.writes or set()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def session_record(session: DeviceSession, user_id: str, started_at: float) -> SessionRecord:
    """The stored form of `session`; `user_id` is the session's identity only if its subject is the user."""
    return SessionRecord(
        session_id=session.session_id,
        app_id=session.app_id,
        device_id=session.device_id,
        user_id=user_id,
        started_at=started_at,
        # Only what the consent lets be stored (core/consent.py).
        context={k: v for k, v in session.state.context.items() if shared(k, session.consent)},
        consent=session.consent,
        identified=bool(user_id) and session.subject == f"user:{user_id}",
    )


def pending_push(record: CueRecord) -> dict[str, Any]:
    """The cue.pending_push event's data: enough for a push service to address and word a notification. The
    message is as stored (consent-redacted); `subject` is `user:<id>` for identified users, else `device:<id>`."""
    return {
        "cue_id": record.cue_id,
        "scenario_id": record.scenario_id,
        "app_id": record.app_id,
        "device_id": record.device_id,
        "subject": record.subject,
        "channel": record.channel,
        "message": record.message,
        "variant": record.variant,
        "locale": record.locale,
        "expires_at": record.expires_at,
    }


def _offered(record: CueRecord) -> dict[str, Any]:
    """The cue.offered event's data."""
    return {
        "cue_id": record.cue_id,
        "scenario_id": record.scenario_id,
        "app_id": record.app_id,
        "device_id": record.device_id,
        "session_id": record.session_id,
        "channel": record.channel,
        "message": record.message,
        "variant": record.variant,
        "expires_at": record.expires_at,
        "conditions": record.explanation.get("conditions", []),
    }
