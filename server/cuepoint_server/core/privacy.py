"""Privacy operations on stored journeys: export, erasure and retention."""

from __future__ import annotations

from typing import Any

import structlog

from .core_base import CoreBase
from .errors import InvalidInput

__all__ = ["Privacy"]

log = structlog.get_logger("cuepoint.core")


class Privacy(CoreBase):
    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        if not user_id:
            raise InvalidInput("user_id", "required")
        return await self.store.export_user(user_id)

    async def erase_user(self, user_id: str) -> dict[str, int]:
        """Delete a user's data from storage and from memory (caps, declines, windows)."""
        if not user_id:
            raise InvalidInput("user_id", "required")
        await self.drain()
        deleted = await self.store.erase_user(user_id)
        self.arbiter.forget(f"user:{user_id}")
        for state in self._reg.states.values():
            if state.context.get("user.id") == user_id:
                state.history.clear()
        log.warning("user.erased", rows=sum(deleted.values()))
        return deleted

    async def purge(self) -> int:
        """Retention: delete journey data older than the configured number of days."""
        if self.config.retention_days is None:
            return 0
        removed = await self.store.purge_journey(self.clock.now() - self.config.retention_days * 86400)
        log.info("journey.purged", signals=removed)
        return removed
