"""Being one replica of several: hear what the others changed, and catch up on what the bus lost.

Every fact lives in storage; the bus (core/bus.py) only says "look again". So each replica re-reads on
a message and also on a periodic sweep: a message lost while NATS or a replica was away delays a change by
at most one sweep, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from .bus import OPS
from .operations import Operations

__all__ = ["Cluster"]

log = structlog.get_logger("cuepoint.core")


class Cluster(Operations):
    _sweeper: asyncio.Task[None] | None = None

    async def join_cluster(self, sweep_every: float = 5.0) -> None:
        """Listen to the other replicas (a no-op alone: LocalBus has no others)."""
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

    async def _on_ops(self, _key: str, body: dict[str, Any]) -> None:
        if body.get("replica") == self.bus.replica_id:
            return  # this replica applied it before announcing it
        if body.get("kind") == "switches":
            await self.sync_switches()

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.sync_switches()
            except Exception:
                log.warning("cluster.sweep_failed", exc_info=True)
