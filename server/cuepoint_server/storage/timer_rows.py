"""Timers as rows: the SQL both backends share (SqliteStore, PostgresStore).

A deadline that must outlive the replica that armed it (a cue's expiry, a callback's time, a device's next
deadline, a queued engagement's fallback, an associate's offer timeout) is a row of
``timers``. The replica that armed it fires it from memory at its time; any replica may claim it once it is
due and its owner is gone (its row in the replicas registry was not written within the ttl, the one notion
of a live replica: core/replicas.py) or it is long overdue. Claiming
only says "I am working on it" for ``hold`` seconds (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so two replicas
never pick the same row at once). Exactly once comes from the effect's own transaction: it first marks the
row done where it is still armed and writes nothing when another firing got there first. So a claim that
outlives its holder, or a claim racing the owner's own alarm, can neither lose nor double an effect.

Written with ``?`` placeholders; PostgresStore turns them into ``$n``.
"""

from __future__ import annotations

from typing import Any

from .records import TimerRecord

__all__ = [
    "ARM_TIMER",
    "CLAIM_TIMERS",
    "FIRED_ELSEWHERE",
    "INSERT_DONE_TIMER",
    "MARK_DUE_DONE",
    "MARK_TIMER_DONE",
    "PURGE_TIMERS",
    "TIMER_BY_ID",
    "TIMER_COLS",
    "TIMER_INDEX",
    "arm_row",
    "timer_from",
    "timers_table",
]

TIMER_COLS = ("timer_id", "kind", "target", "due_at", "owner", "state", "claimed_by", "claimed_until", "fired_at")


def timers_table(real: str) -> str:
    """The table, with ``real`` the dialect's float type (REAL / DOUBLE PRECISION)."""
    return f"""CREATE TABLE IF NOT EXISTS timers (
        timer_id      TEXT PRIMARY KEY,
        kind          TEXT NOT NULL,
        target        TEXT NOT NULL,
        due_at        {real} NOT NULL,
        owner         TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('armed', 'done')),
        claimed_by    TEXT NOT NULL DEFAULT '',
        claimed_until {real} NOT NULL DEFAULT 0,
        fired_at      {real}
    )"""


TIMER_INDEX = "CREATE INDEX IF NOT EXISTS timers_due ON timers (state, due_at)"

# Kinds whose one row carries a target's successive deadlines (a device's next idle, dwell or absence time; an
# engagement's offer to one associate after another, its target naming the associate): fired, it is armed again
# for the next due time, never for the one it fired at.
REPEATING = ("device", "offer")

# Arming again (the same deadline moved, or re-owned by the replica that now holds the device) updates the
# armed row; a row already done stays done: a deadline that fired never fires again. A repeating row that
# fired is armed again only for another due time.
ARM_TIMER = (
    "INSERT INTO timers (timer_id, kind, target, due_at, owner, state, claimed_by, claimed_until, fired_at) "
    "VALUES (?, ?, ?, ?, ?, 'armed', '', 0, NULL) "
    "ON CONFLICT (timer_id) DO UPDATE SET due_at = excluded.due_at, target = excluded.target, owner = excluded.owner, "
    "state = 'armed', "
    "fired_at = CASE WHEN timers.state = 'armed' THEN timers.fired_at END "
    "WHERE timers.state = 'armed' OR (timers.kind IN ("
    + ", ".join(f"'{k}'" for k in REPEATING)
    + ") AND timers.due_at <> excluded.due_at)"
)


def CLAIM_TIMERS(lock: str) -> str:
    """Due armed rows not held by a live owner (nor by another claim), soonest first, marked as claimed.

    Params: holder, claimed_until, now, now, holder, own_before, alive_since, limit. ``lock``: PostgreSQL's
    "FOR UPDATE OF t SKIP LOCKED" (SQLite's single writer needs none).
    """
    return (
        f"UPDATE timers SET claimed_by = ?, claimed_until = ? WHERE timer_id IN ("
        "SELECT t.timer_id FROM timers t WHERE t.state = 'armed' AND t.due_at <= ? AND t.claimed_until < ? "
        "AND CASE WHEN t.owner = ? THEN t.due_at <= ? ELSE NOT EXISTS ("
        "SELECT 1 FROM replicas r WHERE r.replica_id = t.owner AND r.last_seen >= ?) END "
        f"ORDER BY t.due_at LIMIT ? {lock}) RETURNING {', '.join(TIMER_COLS)}"
    )


MARK_TIMER_DONE = "UPDATE timers SET state = 'done', fired_at = ? WHERE timer_id = ? AND state = 'armed'"
# Why a commit firing a repeating timer (OfferCommit.fires) stored none of its cues: another firing was first.
FIRED_ELSEWHERE = ("fired_elsewhere", "its deadline fired on another replica first")
# A repeating timer fires for one due time: a row moved meanwhile (or fired for it already) is not this firing's.
MARK_DUE_DONE = "UPDATE timers SET state = 'done', fired_at = ? WHERE timer_id = ? AND state = 'armed' AND due_at = ?"
TIMER_BY_ID = f"SELECT {', '.join(TIMER_COLS)} FROM timers WHERE timer_id = ?"
# A deadline fired that was never stored as a row (armed by an older version): it is done from now on.
INSERT_DONE_TIMER = (
    "INSERT INTO timers (timer_id, kind, target, due_at, owner, state, claimed_by, claimed_until, fired_at) "
    "VALUES (?, ?, ?, ?, '', 'done', '', 0, ?) ON CONFLICT (timer_id) DO NOTHING"
)
# Rows long past their time, fired or not: by then an armed one is moot (its cue answered, its callback called
# off) or fired by a restore, and every effect is also guarded by its target's state (a cue still offered, a
# callback still requested), so a row armed again after its purge cannot repeat an effect.
PURGE_TIMERS = "DELETE FROM timers WHERE due_at < ?"


def arm_row(rec: TimerRecord) -> tuple[Any, ...]:
    return (rec.timer_id, rec.kind, rec.target, float(rec.due_at), rec.owner)


def done_row(timer_id: str, at: float) -> tuple[Any, ...]:
    kind, _, target = timer_id.partition(":")
    return (timer_id, kind, target, float(at), float(at))


def timer_from(row: Any) -> TimerRecord:
    values = dict(zip(TIMER_COLS, tuple(row), strict=True))
    fired = values["fired_at"]
    return TimerRecord(
        timer_id=str(values["timer_id"]),
        kind=str(values["kind"]),
        target=str(values["target"]),
        due_at=float(values["due_at"]),
        owner=str(values["owner"]),
        state=str(values["state"]),
        claimed_by=str(values["claimed_by"]),
        claimed_until=float(values["claimed_until"]),
        fired_at=None if fired is None else float(fired),
    )
