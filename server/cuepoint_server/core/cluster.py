"""Being one replica of several: hear what the others changed, and catch up on what the bus lost.

Every fact lives in storage; the bus (core/bus.py) only says "look again". So each replica re-reads on
a message and also on a periodic sweep: a message lost while NATS or a replica was away delays a change by
at most one sweep, never loses it.

Each replica also keeps its row in the replicas registry (core/replicas.py), which is its lease: written at
join, every third of ``--replica-ttl`` (the heartbeat), when what it reports changes (a scenario reload,
draining), deleted when it leaves.

What only a replica's memory holds (its streams: live now) is asked for over the bus (`ask_replicas`):
every live replica in the registry is expected to answer within ANSWER_WAIT, and the caller learns which
did not, rather than showing a partial view as whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..storage import ReplicaRecord
from .bus import OPS, ROOM
from .delivery import Delivery
from .replicas import BEATS, SWEEP_EVERY, ReplicaStatus, replica_alive, replica_statuses
from .timer_claims import TimerClaims

__all__ = ["ANSWER_WAIT", "Answerer", "Cluster"]

log = structlog.get_logger("cuepoint.core")

# Topics: a question to every replica (broadcast), and the answers for one replica (key: its id).
ASK, ANSWER = "ask", "answer"
# Seconds a question waits for the other live replicas' answers.
ANSWER_WAIT = 2.0
# Items per answer message: well below NATS's default 1 MB payload limit for any item we send.
ANSWER_PART = 200

# A question's answer on this replica: JSON-able items (sent in parts of ANSWER_PART).
Answerer = Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]]


@dataclass(slots=True)
class _Asking:
    expected: set[str]
    parts: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def complete(self) -> set[str]:
        return {r for r, total in self.totals.items() if len(self.parts.get(r, {})) == total}


class Cluster(TimerClaims):
    _sweeper: asyncio.Task[None] | None = None
    _beater: asyncio.Task[None] | None = None
    # What this replica reports in the registry (the app sets the scenarios version, see app.py).
    replica_address: str = ""
    scenarios_version: str = ""
    draining: bool = False
    sweep_every: float = SWEEP_EVERY
    _joined_at: float | None = None
    _asking: dict[str, _Asking]  # questions waiting for answers, by request id (set at join)
    # Traffic for streams on other replicas, stored first (core/delivery.py); None alone (app.py sets it).
    delivery: Delivery | None = None

    async def join_cluster(self, address: str = "", sweep_every: float = SWEEP_EVERY) -> None:
        """Register in the replicas table and listen to the other replicas.

        Alone (LocalBus) there is no one to hear, but the heartbeat still runs (one small upsert per sweep),
        so the registry tells the truth about a single server too (`cuepoint replicas`).
        """
        self.replica_address = address
        self.sweep_every = sweep_every
        self._joined_at = self.clock.now()
        self._asking = {}
        # Rows of replicas gone for an hour say nothing useful any more (a stopped one deletes its own).
        await self.store.forget_replicas_seen_before(self._joined_at - 3600)
        await self.heartbeat()
        if self.bus.shared:
            # Timer rows of replicas that died are fired here (core/timer_claims.py).
            await self.start_timer_claims()
            await self.bus.subscribe(OPS, "", self._on_ops)
            await self.bus.subscribe(ASK, "", self._on_ask)
            await self.bus.subscribe(ANSWER, self.bus.replica_id, self._on_answer)
            await self.bus.subscribe(ROOM, "", self._on_room)
        self._sweeper = asyncio.create_task(self._sweep(sweep_every), name="cuepoint-cluster-sweep")
        self._beater = asyncio.create_task(self._beat(), name="cuepoint-cluster-heartbeat")

    async def leave_cluster(self) -> None:
        await self.stop_timer_claims()
        for task in (self._sweeper, self._beater):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._beater = None
        if self.bus.shared:
            await self.bus.unsubscribe(OPS, "")
            await self.bus.unsubscribe(ASK, "")
            await self.bus.unsubscribe(ANSWER, self.bus.replica_id)
            await self.bus.unsubscribe(ROOM, "")
            # Slots given back, then the row deleted: the others adopt what this replica still owned.
            await self.desk.stop_slots()
        if self._joined_at is not None:
            self._joined_at = None
            try:
                await self.store.forget_replica(self.bus.replica_id)
            except Exception:  # the others count it gone after a few missed sweeps anyway
                log.warning("cluster.leave_failed", exc_info=True)

    async def heartbeat(self) -> None:
        """Write this replica's registry row as it is now (no-op before join_cluster and after leaving)."""
        if self._joined_at is None:
            return
        await self.store.save_replica(
            ReplicaRecord(
                replica_id=self.bus.replica_id,
                started_at=self._joined_at,
                last_seen=self.clock.now(),
                address=self.replica_address,
                host=f"{socket.gethostname()} pid {os.getpid()}",
                scenarios_version=self.scenarios_version,
                draining=self.draining,
            )
        )

    async def report_scenarios_version(self, version: str) -> None:
        """The scenario set this replica serves changed (start-up, a reload): tell the registry now."""
        self.scenarios_version = version
        await self._heartbeat_quietly()

    async def start_draining(self) -> None:
        """Stopping: the registry says so until the row is deleted at leave_cluster."""
        self.draining = True
        await self._heartbeat_quietly()

    async def _heartbeat_quietly(self) -> None:
        try:
            await self.heartbeat()
        except Exception:  # the next sweep writes it again
            log.warning("cluster.heartbeat_failed", exc_info=True)

    async def replicas_status(self) -> list[ReplicaStatus]:
        """Every registered replica with whether it is alive, as this replica sees it now."""
        records = await self.store.replicas()
        return replica_statuses(records, self.clock.now(), self.bus.replica_id, ttl=self.config.replica_ttl)

    async def live_replicas(self) -> set[str]:
        """Ids of the replicas alive now (this one included once joined)."""
        now = self.clock.now()
        alive = {
            r.replica_id for r in await self.store.replicas() if replica_alive(r, now, ttl=self.config.replica_ttl)
        }
        return alive | ({self.bus.replica_id} if self._joined_at is not None else set())

    def answerers(self) -> dict[str, Answerer]:
        """The questions this replica answers for the others (core/service.py: live now)."""
        return {}

    async def ask_replicas(
        self, question: str, args: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
        """Every other live replica's answer to `question` (items by replica id), and the live replicas
        that did not answer within ANSWER_WAIT (their part is missing). Alone: nothing to ask."""
        if not self.bus.shared or self._joined_at is None:
            return {}, []
        expected = await self.live_replicas() - {self.bus.replica_id}
        if not expected:
            return {}, []
        request = uuid.uuid4().hex
        asking = self._asking[request] = _Asking(expected)
        try:
            await self.bus.publish(
                ASK, "", {"question": question, "args": args or {}, "request": request, "reply_to": self.bus.replica_id}
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_WAIT):
                    await asking.done.wait()
        except Exception:  # the bus is down: every replica counts as unanswered
            log.warning("cluster.ask_failed", question=question, exc_info=True)
        finally:
            del self._asking[request]
        complete = asking.complete()
        answers = {r: [item for n in sorted(asking.parts[r]) for item in asking.parts[r][n]] for r in complete}
        return answers, sorted(expected - complete)

    async def _on_ask(self, _key: str, body: dict[str, Any]) -> None:
        answerer = self.answerers().get(str(body.get("question")))
        if body.get("replica") == self.bus.replica_id or answerer is None:
            return
        items = await answerer(dict(body.get("args") or {}))
        parts = [items[i : i + ANSWER_PART] for i in range(0, len(items), ANSWER_PART)] or [[]]
        for n, part in enumerate(parts):
            reply = {"request": body.get("request"), "part": n, "parts": len(parts), "items": part}
            await self.bus.publish(ANSWER, str(body.get("reply_to")), reply)

    async def _on_answer(self, _key: str, body: dict[str, Any]) -> None:
        asking = self._asking.get(str(body.get("request")))
        if asking is None:
            return  # too late: the question was given up on
        replica = str(body.get("replica"))
        asking.parts.setdefault(replica, {})[int(body["part"])] = list(body["items"])
        asking.totals[replica] = int(body["parts"])
        if asking.expected <= asking.complete():
            asking.done.set()

    async def _beat(self) -> None:
        """The heartbeat: this replica's registry row, rewritten BEATS times per ttl (core/replicas.py)."""
        while True:
            await asyncio.sleep(self.config.replica_ttl / BEATS)
            await self._heartbeat_quietly()

    async def _on_room(self, _key: str, body: dict[str, Any]) -> None:
        if body.get("replica") != self.bus.replica_id:
            self.desk.room_for(str(body.get("associate_id", "")))

    async def _on_ops(self, _key: str, body: dict[str, Any]) -> None:
        if body.get("replica") == self.bus.replica_id:
            return  # this replica applied it before announcing it
        if body.get("kind") == "switches":
            await self.sync_switches()

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if not self.bus.shared:
                continue  # alone, every switch was set here
            steps = [self.sync_switches, self.adopt_orphans]
            if self.delivery is not None:
                steps.append(self.delivery.sweep)  # what the bus lost on the way (core/delivery.py)
            for step in steps:
                try:
                    await step()
                except Exception:
                    log.warning("cluster.sweep_failed", step=step.__name__, exc_info=True)
            # A replica gone silent had its engagements adopted above; slots given back and lines tried again.
            self.desk.sweep_slots()
