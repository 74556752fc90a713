"""What every part of the engagement desk shares: its state, lookups and delivery to either side.

The desk is split by idea (routing, conversation, calls, wrap-up), each a class in its own module
that builds on this one; core/engagements.py puts them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..clock import Clock, TimerHandle
from ..engine.engine import Engine
from ..storage import EngagementRecord, SignalRecord, Store, WebhookRecord
from .engagement_model import TRANSCRIPT_KEPT, Engagement, EngagementEvent, context_json
from .errors import InvalidInput, NotFound, PermissionDenied
from .model import EngagementEnded, EngagementUpdate, JourneyAppended, JourneyItem, SupervisedSnapshot, milestone_item
from .queue_wait import REFRESH, HandleTimes, estimate, material, staffed
from .routing import Router
from .sessions import AssociateSession, DeviceSession

__all__ = ["DeskBase", "DeskConfig"]

log = structlog.get_logger("cuepoint.core.engagements")


@dataclass(frozen=True, slots=True)
class DeskConfig:
    journey_limit: int = 50
    prior_limit: int = 10
    # Used when a queue does not set its own fallback_after; None: never.
    default_fallback_after: float | None = None


class DeskBase:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        clock: Clock,
        sessions: Mapping[str, DeviceSession],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        config: DeskConfig | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.config = config or DeskConfig()
        self.router = Router()
        # Queues' channel limits come from the routing table being served (it changes on reload).
        self.router.queue_limits = lambda queue: self.engine.scenarios.routing.channel_limits.get(queue, {})
        self.listeners: list[EngagementEvent] = []
        # Builds the webhook outbox rows of an event (webhooks.py): committed with the change they report.
        self.webhook_rows: Callable[[str, dict[str, Any]], list[WebhookRecord]] | None = None
        # Called once outbox rows are committed, so delivery starts at once (webhooks.py).
        self.outbox_wakeups: list[Callable[[], None]] = []
        self._sessions = sessions
        self._spawn = spawn
        self._engagements: dict[str, Engagement] = {}
        # This replica's id, the owner named on the timer rows the desk arms (set by the core: its bus's id).
        self.replica: Callable[[], str] = lambda: ""
        self._active_by_device: dict[str, str] = {}
        self._awaiting_outcome: dict[str, list[Engagement]] = {}
        # Associates whose connection dropped, by id, with the timer that signs each out (desk_resume.py).
        self._detached: dict[str, tuple[AssociateSession, TimerHandle]] = {}
        # Signed-in associates who supervise queues; each sees every engagement of those queues change.
        self._supervisors: list[AssociateSession] = []
        # (engagement id, associate id) -> when they joined: the key of their stored participation row.
        self._joined_at: dict[tuple[str, str], float] = {}
        # While the user waits (core/queue_wait.py): recent handle times, and per queued engagement the
        # (position, estimate) its device was last told; queues whose line moved, announced once committed.
        self.handle_times = HandleTimes()
        self._told_wait: dict[str, tuple[int, float | None]] = {}
        self._moved: set[str] = set()
        self._saving: set[asyncio.Future[None]] = set()
        self._wait_refresh: TimerHandle | None = None
        self.router.moved = self._line_moved

    def active_for(self, device_id: str) -> str | None:
        return self._active_by_device.get(device_id)

    def get(self, engagement_id: str) -> Engagement | None:
        return self._engagements.get(engagement_id)

    def count(self) -> int:
        return len(self._engagements)

    def queues_in_use(self) -> set[str]:
        return {e.queue for e in self._engagements.values() if e.state == "queued"}

    def _followed(self, device_id: str) -> Engagement | None:
        """The device's engagement if an associate is assigned to it, and so follows its journey live."""
        engagement = self._engagements.get(self._active_by_device.get(device_id, ""))
        if engagement is None or engagement.associate is None or engagement.state != "assigned":
            return None
        return engagement

    def follows_journey(self, device_id: str) -> bool:
        """Whether an associate follows the device's journey live (`journey_stored` would show it)."""
        return self._followed(device_id) is not None

    def journey_stored(self, device_id: str, rows: Sequence[SignalRecord]) -> None:
        """Signals of a device were stored: its assigned associate sees them in the live journey."""
        engagement = self._followed(device_id)
        if engagement is None:
            return
        assert engagement.associate is not None
        # Events only: a context change may carry user attributes the consent level withholds.
        items = tuple(
            JourneyItem(r.signal_id, r.time, r.kind, r.name, dict(r.payload)) for r in rows if r.kind == "event"
        )
        if not items:
            return
        engagement.journey_since.extend(items)
        del engagement.journey_since[:-TRANSCRIPT_KEPT]
        engagement.associate.send(JourneyAppended(engagement.engagement_id, items))

    def milestone_stored(self, session_id: str, device_id: str, milestone_id: str, at: float) -> None:
        """A device reached a milestone and it was stored: its assigned associate sees it in the live journey."""
        engagement = self._followed(device_id)
        if engagement is None:
            return
        assert engagement.associate is not None
        item = milestone_item(session_id, milestone_id, at)
        engagement.journey_since.append(item)
        del engagement.journey_since[:-TRANSCRIPT_KEPT]
        engagement.associate.send(JourneyAppended(engagement.engagement_id, (item,)))

    def _of_device(self, session: DeviceSession, engagement_id: str, field_name: str) -> Engagement:
        engagement = self._engagements.get(engagement_id)
        if engagement is None or engagement.device_id != session.device_id:
            raise InvalidInput(field_name, f"no engagement {engagement_id!r} for this device")
        return engagement

    def _of_associate(self, associate: AssociateSession, engagement_id: str) -> Engagement:
        engagement = self._engagements.get(engagement_id)
        if engagement is None:
            raise NotFound(f"no engagement {engagement_id!r}")
        if engagement.associate is not associate:
            raise PermissionDenied(f"engagement {engagement_id!r} is not assigned to you")
        return engagement

    def _free(self, associate: AssociateSession, engagement_id: str, now: float) -> None:
        associate.active.discard(engagement_id)
        self._slot_released(associate.associate_id, engagement_id)
        if not associate.active:
            associate.idle_since = now

    def _slot_released(self, associate_id: str, key: str) -> None:
        """A slot is free again; across replicas it is given back in storage too (desk_shared.py)."""

    def _release_device(self, engagement: Engagement) -> None:
        if self._active_by_device.get(engagement.device_id) == engagement.engagement_id:
            del self._active_by_device[engagement.device_id]

    def _to_device(self, engagement: Engagement, message: Any) -> None:
        session = self._sessions.get(engagement.device_id)
        if session is not None:
            session.send(message)

    def _to_other(self, engagement: Engagement, party: str, message: Any) -> None:
        if party == "user":
            if engagement.associate is not None:
                engagement.associate.send(message)
        else:
            self._to_device(engagement, message)

    def _notify_device(self, engagement: Engagement) -> None:
        # A callback runs without the app: the device hears it is scheduled, and that it ended.
        if engagement.callback_at is None or engagement.state in ("callback_requested", "ended"):
            self._to_device(engagement, self._device_update(engagement))
        # Every change of state passes here, so this is where supervisors hear of it too.
        self._tell_supervisors(engagement)

    def _device_update(self, engagement: Engagement) -> EngagementUpdate:
        position, wait = 0, None
        if engagement.state == "queued":
            position, wait = self._wait_of(engagement)
            self._told_wait[engagement.engagement_id] = (position, wait)
        else:
            self._told_wait.pop(engagement.engagement_id, None)
        return EngagementUpdate(
            engagement_id=engagement.engagement_id,
            cue_id=engagement.cue_id,
            state=engagement.state,
            channel=engagement.channel,
            queue=engagement.queue,
            associate_name=engagement.associate.display_name if engagement.associate else "",
            time=self.clock.now(),
            disposition=engagement.disposition,
            queue_position=position,
            estimated_wait=wait,
            callback_at=engagement.callback_at,
        )

    # -- while the user waits: position in line and estimated wait (core/queue_wait.py) ------------------

    def _wait_of(self, engagement: Engagement) -> tuple[int, float | None]:
        line = self.router.line(engagement.queue)
        if engagement.engagement_id not in line:
            return 0, None
        position = line.index(engagement.engagement_id) + 1
        slots = staffed(engagement.queue, self.router.associates())
        return position, estimate(position, self.handle_times.average(engagement.queue), slots)

    def _handled(self, engagement: Engagement, now: float) -> None:
        """An engagement an associate took has ended: its handle time joins its queue's window."""
        if engagement.assigned_at is not None:
            self.handle_times.record(engagement.queue, now - engagement.assigned_at)

    def _line_moved(self, queue: str) -> None:
        # The line holds only engagements whose queued record is committed (they join after accept_cue);
        # one that leaves it is announced after the write that moved it commits, so a device is never told
        # a position the store does not back.
        first = not self._moved
        self._moved.add(queue)
        if first:
            self._spawn(self._announce_moves())

    async def _announce_moves(self) -> None:
        if self._saving:
            await asyncio.gather(*list(self._saving), return_exceptions=True)
        queues, self._moved = self._moved, set()
        for queue in sorted(queues):
            self._announce_line(queue)
        self._arm_wait_refresh()

    def _announce_line(self, queue: str) -> None:
        """Tell each device waiting in `queue` its position if it changed, or its estimate if it moved materially."""
        for engagement_id in self.router.line(queue):
            engagement = self._engagements.get(engagement_id)
            if engagement is None or engagement.state != "queued" or engagement.callback_at is not None:
                continue  # a callback's user is not waiting in the app
            told = self._told_wait.get(engagement_id)
            position, wait = self._wait_of(engagement)
            if told is None or told[0] != position or material(told[1], wait):
                self._to_device(engagement, self._device_update(engagement))

    def _arm_wait_refresh(self) -> None:
        if self._wait_refresh is None and self.router.lines():
            self._wait_refresh = self.clock.call_at(self.clock.now() + REFRESH, self._refresh_waits)

    def _refresh_waits(self) -> None:
        """Periodically, while anyone waits: capacity and handle times change without the line moving."""
        self._wait_refresh = None
        for queue in self.router.lines():
            self._announce_line(queue)
        self._arm_wait_refresh()

    def _tell_supervisors(self, engagement: Engagement) -> None:
        if not self._supervisors:
            return
        snapshot = SupervisedSnapshot(
            engagement_id=engagement.engagement_id,
            queue=engagement.queue,
            state=engagement.state,
            channel=engagement.channel,
            associate_id=engagement.associate.associate_id if engagement.associate else "",
            participants=engagement.participant_infos(),
            time=self.clock.now(),
        )
        for supervisor in self._supervisors:
            if engagement.queue in supervisor.supervised_queues and supervisor.serves(engagement.app_id):
                supervisor.send(snapshot)

    def _dismiss_participants(self, engagement: Engagement, ended_by: str, now: float) -> None:
        """The engagement ended: everyone who joined it is told, and freed."""
        for associate, _role in list(engagement.participants.values()):
            self._free(associate, engagement.engagement_id, now)
            associate.send(EngagementEnded(engagement.engagement_id, engagement.disposition, ended_by))
        engagement.participants.clear()

    def _save(self, engagement: Engagement, *events: str, settle: str = "") -> None:
        """Store the engagement in the background, with the webhook rows of `events` (see _persist)."""
        self._spawn(_awaited(self._persist(engagement, *events, settle=settle)))

    def _persist(self, engagement: Engagement, *events: str, settle: str = "") -> asyncio.Future[None]:
        """Save the engagement's row as it is now, and the outbox rows of the lifecycle `events` it reports,
        in one transaction: a crash cannot keep the change and lose its webhook. Both are built now, so a
        later change does not leak into this write. Await the result, or spawn it; the write is registered
        at once, so position announcements made meanwhile wait for it (_announce_moves)."""
        rows = [row for kind in events for row in self._webhooks(kind, self._payload(kind, engagement))]
        # `settle`: a timer row the change makes moot (storage's save_engagement), marked done with it.
        write = asyncio.ensure_future(self._write_engagement(engagement.record(), rows, settle))
        self._saving.add(write)
        write.add_done_callback(self._saving.discard)
        return write

    async def _write_engagement(self, record: EngagementRecord, rows: list[WebhookRecord], settle: str = "") -> None:
        await self.store.save_engagement(record, webhooks=rows, settle=settle)
        if rows:
            self._wake_outbox()

    def _webhooks(self, kind: str, payload: dict[str, Any]) -> list[WebhookRecord]:
        """The outbox rows of one event (none without webhooks); the caller commits them with its change."""
        return self.webhook_rows(kind, payload) if self.webhook_rows is not None else []

    def _wake_outbox(self) -> None:
        for wake in self.outbox_wakeups:
            wake()

    def _emit(self, kind: str, engagement: Engagement) -> None:
        """Tell in-process listeners (metrics); webhooks of stored events went out with their change."""
        if not self.listeners:
            return
        self._emit_payload(kind, self._payload(kind, engagement))

    @staticmethod
    def _payload(kind: str, engagement: Engagement) -> dict[str, Any]:
        return {
            "type": kind,
            "engagement_id": engagement.engagement_id,
            "state": engagement.state,
            "queue": engagement.queue,
            "channel": engagement.channel,
            "associate_id": engagement.associate.associate_id if engagement.associate else "",
            "disposition": engagement.disposition,
            "notes": engagement.notes,
            "ended_by": engagement.ended_by,
            "outcome": engagement.outcome,
            "kind": engagement.kind,
            "callback_at": engagement.callback_at,
            "callback_number": engagement.callback_number,
            "wrap_up_outcome": engagement.wrap_up_outcome,
            "cue_id": engagement.cue_id,
            "scenario_id": engagement.scenario_id,
            "device_id": engagement.device_id,
            "participants": [{"associate_id": p.associate_id, "role": p.role} for p in engagement.participant_infos()],
            "transfers": [
                {
                    "from_associate_id": t.from_associate_id,
                    "to_associate_id": t.to_associate_id,
                    "to_queue": t.to_queue,
                    "mode": t.mode,
                    "note": t.note,
                    "time": t.time,
                }
                for t in engagement.transfers
            ],
            "context": context_json(engagement.context),
        }

    def _emit_payload(self, kind: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, payload)
            except Exception:
                log.exception("engagement.listener_failed", kind=kind)


async def _awaited(write: asyncio.Future[None]) -> None:
    """A write as a coroutine, for _spawn (which logs its failure)."""
    await write
