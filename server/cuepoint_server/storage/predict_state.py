"""Storage for predictive scores: labelled sessions waiting to be learned, model states, the trainer lease.

Designed for several processes sharing one database: any process appends labelled sessions; the one
holding the `predict-trainer` lease learns them in id order and saves each model together with the id of
the last labelled session it learned (its cursor), so a session is learned exactly once even when the
trainer changes hands. The lease's epoch grows with every change of holder, and a model row is only
overwritten by a save of the same or a newer epoch: a trainer that lost its lease cannot undo the work
of the next one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from .json_text import dumps as _dumps
from .records import LabelRecord, ModelRecord

__all__ = ["PREDICT_SCHEMA", "PredictState"]

# Applied by schema.sql for new databases and as a migration step for older ones (see sqlite.py).
PREDICT_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS predict_labels (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        outcome    TEXT NOT NULL,
        session_id TEXT NOT NULL,
        reached    INTEGER NOT NULL,
        examples   TEXT NOT NULL,
        time       REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS predict_labels_session ON predict_labels (session_id)",
    """CREATE TABLE IF NOT EXISTS predict_models (
        outcome  TEXT PRIMARY KEY,
        version  INTEGER NOT NULL,
        epoch    INTEGER NOT NULL,
        cursor   INTEGER NOT NULL,
        state    TEXT NOT NULL,
        saved_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        epoch      INTEGER NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_user_started ON sessions (user_id, started_at)",
    "CREATE INDEX IF NOT EXISTS sessions_device_started ON sessions (device_id, started_at)",
)


_SAVE_MODEL = (
    "INSERT INTO predict_models (outcome, version, epoch, cursor, state, saved_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (outcome) DO UPDATE SET version = excluded.version, epoch = excluded.epoch, "
    "cursor = excluded.cursor, state = excluded.state, saved_at = excluded.saved_at "
    "WHERE excluded.epoch >= predict_models.epoch AND excluded.version > predict_models.version"
)
# Taken when free or expired; renewed by its holder without changing the epoch.
_TAKE_LEASE = (
    "INSERT INTO leases (name, holder, epoch, expires_at) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (name) DO UPDATE SET "
    "epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END, "
    "holder = excluded.holder, expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at < ?"
)


class PredictState:
    """Mixed into SqliteStore; uses its single writer (`_execute`) and its reader (`_fetch`)."""

    async def _execute(self, sql: str, params: tuple[object, ...]) -> None:
        raise NotImplementedError

    async def _fetch(self, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        raise NotImplementedError

    async def save_label(
        self, outcome: str, session_id: str, reached: bool, examples: Sequence[tuple[Mapping[str, float], float]],
        time: float,
    ) -> None:  # fmt: skip
        """A session labelled for an outcome, with its scoring moments (features, prediction then)."""
        encoded = _dumps([[dict(x), p] for x, p in examples])
        sql = "INSERT INTO predict_labels (outcome, session_id, reached, examples, time) VALUES (?, ?, ?, ?, ?)"
        await self._execute(sql, (outcome, session_id, int(reached), encoded, time))

    async def labels_after(self, cursor: int, *, limit: int = 500) -> list[LabelRecord]:
        """Labelled sessions with an id above `cursor`, in id order."""
        sql = (
            "SELECT id, outcome, session_id, reached, examples, time FROM predict_labels "
            "WHERE id > ? ORDER BY id LIMIT ?"
        )
        return [
            LabelRecord(
                int(r[0]), str(r[1]), str(r[2]), bool(r[3]), [(dict(x), float(p)) for x, p in json.loads(r[4])], r[5]
            )
            for r in await self._fetch(sql, (cursor, limit))
        ]

    async def prune_labels(self, up_to: int) -> None:
        """Drop labelled sessions every model has learned."""
        await self._execute("DELETE FROM predict_labels WHERE id <= ?", (up_to,))

    async def save_model(self, record: ModelRecord) -> None:
        """Save a model state; ignored when a newer version or a later trainer's epoch is stored."""
        row = (record.outcome, record.version, record.epoch, record.cursor, _dumps(record.state), record.saved_at)
        await self._execute(_SAVE_MODEL, row)

    async def models(self) -> list[ModelRecord]:
        sql = "SELECT outcome, version, epoch, cursor, state, saved_at FROM predict_models ORDER BY outcome"
        return [
            ModelRecord(str(r[0]), int(r[1]), int(r[2]), int(r[3]), json.loads(r[4]), float(r[5]))
            for r in await self._fetch(sql, ())
        ]

    async def take_lease(self, name: str, holder: str, now: float, ttl: float) -> int | None:
        """Take or renew a lease; returns its epoch when `holder` holds it now, else None."""
        await self._execute(_TAKE_LEASE, (name, holder, now + ttl, now))
        rows = await self._fetch("SELECT holder, epoch FROM leases WHERE name = ?", (name,))
        return int(rows[0][1]) if rows and rows[0][0] == holder else None

    async def release_lease(self, name: str, holder: str) -> None:
        """Let a lease go at once. The row stays: the next holder's epoch must still be a later one."""
        await self._execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", (name, holder))

    async def subject_history(self, user_id: str, device_id: str, before: float) -> tuple[int, dict[str, int]]:
        """Earlier sessions of a user (else of a device), and in how many of them each milestone was reached."""
        column, key = ("user_id", user_id) if user_id else ("device_id", device_id)
        earlier = f"SELECT session_id FROM sessions WHERE {column} = ? AND started_at < ?"
        count = await self._fetch(f"SELECT COUNT(*) FROM ({earlier})", (key, before))
        reached: Any = await self._fetch(
            f"SELECT milestone_id, COUNT(DISTINCT session_id) FROM milestones WHERE session_id IN ({earlier}) "
            "GROUP BY milestone_id",
            (key, before),
        )
        return int(count[0][0]), {str(r[0]): int(r[1]) for r in reached}
