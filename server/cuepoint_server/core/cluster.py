"""Being one replica of several: hear what the others changed, and catch up on what the bus lost.

Every fact lives in storage; the bus (core/bus.py) only says "look again". So each replica re-reads on
a message and also on a periodic sweep: a message lost while NATS or a replica was away delays a change by
at most one sweep, never loses it.

Each replica also keeps its row in the replicas registry (core/replicas.py): written at join, on every
sweep (the heartbeat), when what it reports changes (a scenario reload, draining), deleted when it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import structlog

from ..storage import ReplicaRecord
from .bus import OPS
from .operations import Operations
from .replicas import SWEEP_EVERY, ReplicaStatus, replica_alive, replica_statuses

__all__ = ["Cluster"]

log = structlog.get_logger("cuepoint.core")


class Cluster(Operations):
    _sweeper: asyncio.Task[None] | None = None
    # What this replica reports in the registry (the app sets the scenarios version, see app.py).
    replica_address: str = ""
    scenarios_version: str = ""
    draining: bool = False
    sweep_every: float = SWEEP_EVERY
    _joined_at: float | None = None

    async def join_cluster(self, address: str = "", sweep_every: float = SWEEP_EVERY) -> None:
        """Register in the replicas table and listen to the other replicas.

        Alone (LocalBus) there is no one to hear and no one to judge a heartbeat: the row is written at
        join and on changes only, so one process on SQLite writes nothing periodically.
        """
        self.replica_address = address
        self.sweep_every = sweep_every
        self._joined_at = self.clock.now()
        # Rows of replicas gone for an hour say nothing useful any more (a stopped one deletes its own).
        await self.store.forget_replicas_seen_before(self._joined_at - 3600)
        await self.heartbeat()
        if not self.bus.shared:
            return
        await self.bus.subscribe(OPS, "", self._on_ops)
        self._sweeper = asyncio.create_task(self._sweep(sweep_every), name="cuepoint-cluster-sweep")

    async def leave_cluster(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.bus.shared:
            await self.bus.unsubscribe(OPS, "")
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
        return replica_statuses(records, self.clock.now(), self.bus.replica_id, sweep_every=self.sweep_every)

    async def live_replicas(self) -> set[str]:
        """Ids of the replicas alive now (this one included once joined)."""
        now = self.clock.now()
        alive = {
            r.replica_id for r in await self.store.replicas() if replica_alive(r, now, sweep_every=self.sweep_every)
        }
        return alive | ({self.bus.replica_id} if self._joined_at is not None else set())

    async def _on_ops(self, _key: str, body: dict[str, Any]) -> None:
        if body.get("replica") == self.bus.replica_id:
            return  # this replica applied it before announcing it
        if body.get("kind") == "switches":
            await self.sync_switches()

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self._heartbeat_quietly()
            try:
                await self.sync_switches()
            except Exception:
                log.warning("cluster.sweep_failed", exc_info=True)
