"""Storage for the admin audit trail: who did what, when, and what changed (append-only).

One row per admin action (an AdminService call, allowed or denied; a scenario reload; a console switch).
Rows are never updated; `EraseUser` does not touch them (an erasure must itself stay on record), so they
hold no personal data: the core records an erased or exported user only as a digest of the id.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUDIT_SCHEMA", "AuditRecord", "audit_insert", "audit_select"]

# Applied by schema.sql for new databases and as a migration step for older ones (see sqlite.py).
AUDIT_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        time    REAL NOT NULL,
        actor   TEXT NOT NULL,
        roles   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
        detail  TEXT NOT NULL,
        before  TEXT NOT NULL,
        after   TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (time)",
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: float
    # Who: "admin:<name>" for an admin token, "system:<reason>" for the server itself, "anonymous" without auth.
    actor: str
    # What: the RPC or action, e.g. "SetOffersPaused", "scenarios.reload".
    action: str
    target: str = ""
    outcome: str = "ok"  # ok | denied | failed
    detail: str = ""
    roles: tuple[str, ...] = ()
    before: Mapping[str, Any] = field(default_factory=dict)
    after: Mapping[str, Any] = field(default_factory=dict)
    id: int = 0  # assigned by the store


_COLS = "id, time, actor, roles, action, target, outcome, detail, before, after"


def audit_insert(rec: AuditRecord) -> tuple[str, tuple[object, ...]]:
    sql = (
        "INSERT INTO audit_log (time, actor, roles, action, target, outcome, detail, before, after) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    params = (
        rec.time,
        rec.actor,
        ",".join(rec.roles),
        rec.action,
        rec.target,
        rec.outcome,
        rec.detail,
        json.dumps(dict(rec.before), sort_keys=True, default=str),
        json.dumps(dict(rec.after), sort_keys=True, default=str),
    )
    return sql, params


def audit_select(
    *, since: float | None = None, actor: str = "", action: str = "", limit: int = 100
) -> tuple[str, tuple[object, ...]]:
    """The newest `limit` entries matching, newest first."""
    where: list[str] = ["1 = 1"]
    params: list[object] = []
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    if actor:
        where.append("actor = ?")
        params.append(actor)
    if action:
        where.append("action = ?")
        params.append(action)
    sql = f"SELECT {_COLS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    return sql, (*params, limit)


def audit_from_row(row: sqlite3.Row | tuple[Any, ...]) -> AuditRecord:
    id_, time, actor, roles, action, target, outcome, detail, before, after = tuple(row)
    return AuditRecord(
        time=time,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        detail=detail,
        roles=tuple(r for r in str(roles).split(",") if r),
        before=json.loads(before),
        after=json.loads(after),
        id=id_,
    )
