"""The admin audit trail: every admin action, allowed or denied, recorded durably before it is answered.

Admin actions arrive through AdminService (api/admin_roles.py records each call with the caller, its roles
and the outcome, and the handler adds the target and the before/after), through scenario reloads (the
server itself, `system:<reason>`), and the console. The trail holds no personal data: a user id an admin
exported or erased is kept only as `user-sha256:<digest>` (`user_ref`), so an erasure stays on record
without keeping the erased id, and an auditor who knows an id can still find its entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import structlog

from ..clock import Clock
from ..storage.audit_log import AuditRecord
from ..storage.base import Store

__all__ = ["AuditRecord", "AuditTrail", "user_ref"]

log = structlog.get_logger("cuepoint.audit")


def user_ref(user_id: str) -> str:
    """How the trail names a user: a digest, so no erased id outlives its erasure here."""
    return "user-sha256:" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]


class AuditTrail:
    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def record(
        self,
        actor: str,
        action: str,
        *,
        target: str = "",
        outcome: str = "ok",
        detail: str = "",
        roles: tuple[str, ...] = (),
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one entry; returns once it is committed."""
        rec = AuditRecord(
            time=self.clock.now(),
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail=detail,
            roles=roles,
            before=dict(before or {}),
            after=dict(after or {}),
        )
        await self.store.append_audit(rec)
        log.info("audit.recorded", actor=actor, action=action, target=target, outcome=outcome)
        return rec

    async def entries(
        self, *, since: float | None = None, actor: str = "", action: str = "", limit: int = 100
    ) -> list[AuditRecord]:
        return await self.store.audit_entries(since=since, actor=actor, action=action, limit=limit)
