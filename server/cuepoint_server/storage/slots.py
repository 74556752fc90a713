"""Associate slots shared by every replica: who holds what, who is longest idle, who owns each engagement.

Several replicas route to the same associates (api/associate_links.py gives each replica a stand-in of
every associate), so "does this associate have room" and "who has been idle longest" cannot be answered
from one replica's memory. `associate_slots` holds one row per associate (their idle-since time, the
longest-idle order); `associate_holds` one row per slot held (an offer or an engagement), with the
replica that holds it. A reservation locks the candidates' rows one at a time, longest idle first
(PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so two replicas racing for one associate never both get them:
the second skips the row and tries the next), reads every hold of that associate, asks the caller's
`fits` (the associate's channel and queue limits stay in core) and inserts the hold, in one transaction.
A cue's commit does not take a skipped row for a full associate (`_wait_out_locked`). A conference or
consult joining stores its slot with its participation row (`join_holding`).
SQLite's single writer makes the same steps serial.

`engagement_owners` names the replica that routes each open engagement and since when (rows of finished
engagements are pruned on each adoption sweep; a replica firing a gone replica's callback takes it over); a replica is
alive while its row in the replicas registry (`replicas`, core/replicas.py) was written since
``alive_since``. Recovery adopts only the engagements of replicas that are gone (or of none named), and
drops the holds of the gone ones. A claim or hold made since ``alive_since`` is never taken for a gone
replica's: a replica routes (recovery) a moment before its first registry row is written.

Statements are written with ``?`` placeholders; the PostgreSQL store turns them into ``$n``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

from .base import SlotClaim, SlotResult
from .records import EngagementRecord, ParticipationRecord
from .timer_rows import ARM_TIMER, MARK_DUE_DONE, arm_row

__all__ = [
    "OPEN_STATES",
    "SLOTS_SCHEMA",
    "SLOTS_SCHEMA_PG",
    "SlotTxn",
    "Slots",
]

OPEN_STATES = "('queued', 'assigned', 'callback_requested')"


def _tables(real: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS associate_slots (
            associate_id TEXT PRIMARY KEY,
            idle_since   {real} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS associate_holds (
            hold_key     TEXT NOT NULL,
            associate_id TEXT NOT NULL,
            channel      TEXT NOT NULL,
            queue        TEXT NOT NULL,
            replica      TEXT NOT NULL,
            held_at      {real} NOT NULL,
            PRIMARY KEY (hold_key, associate_id)
        )""",
        "CREATE INDEX IF NOT EXISTS associate_holds_associate ON associate_holds (associate_id)",
        "CREATE INDEX IF NOT EXISTS associate_holds_replica ON associate_holds (replica)",
        f"""CREATE TABLE IF NOT EXISTS engagement_owners (
            engagement_id TEXT PRIMARY KEY,
            replica       TEXT NOT NULL,
            owned_at      {real} NOT NULL
        )""",
    )


# SQLite (a migration step and schema.sql) and PostgreSQL (a migration step).
SLOTS_SCHEMA: tuple[str, ...] = _tables("REAL")
SLOTS_SCHEMA_PG: tuple[str, ...] = _tables("DOUBLE PRECISION")


class SlotTxn(Protocol):
    """One open transaction of either backend, with ``?`` placeholders."""

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...


def _marks(n: int) -> str:
    return ", ".join("?" * n)


_HOLD = (
    "INSERT INTO associate_holds (hold_key, associate_id, channel, queue, replica, held_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hold_key, associate_id) DO NOTHING"
)
# An associate with nothing held any more became idle now: the longest-idle order across replicas.
_IDLE_IF_FREE = (
    "UPDATE associate_slots SET idle_since = ? WHERE associate_id = ? AND NOT EXISTS "
    "(SELECT 1 FROM associate_holds h WHERE h.associate_id = associate_slots.associate_id)"
)
_OWN = (
    "INSERT INTO engagement_owners (engagement_id, replica, owned_at) VALUES (?, ?, ?) ON CONFLICT "
    "(engagement_id) DO UPDATE SET replica = excluded.replica, owned_at = excluded.owned_at"
)
# A participation row (records.py), as sqlite.py and postgres.py write it, for a joining that holds a slot.
_JOIN = (
    "INSERT INTO engagement_participants (engagement_id, associate_id, role, joined_at, left_at, disposition, notes) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (engagement_id, associate_id, role, joined_at) DO UPDATE SET "
    "left_at = excluded.left_at, disposition = excluded.disposition, notes = excluded.notes"
)
# PostgreSQL, one statement for two: the hold given back, and the associate idle from now if it was their
# last (the NOT EXISTS sees the statement's snapshot, the deleted hold included, so that one is left out).
_RELEASE_ONE_STATEMENT = (
    "WITH d AS (DELETE FROM associate_holds WHERE hold_key = ? AND associate_id = ?) "
    "UPDATE associate_slots SET idle_since = ? WHERE associate_id = ? AND NOT EXISTS "
    "(SELECT 1 FROM associate_holds h WHERE h.associate_id = associate_slots.associate_id AND h.hold_key <> ?)"
)
# A replica alive: its registry row written since alive_since.
_LIVE = "SELECT 1 FROM replicas r WHERE r.replica_id = {col} AND r.last_seen >= ?"


class Slots:
    """Mixed into both stores; each gives `_slot_transaction` (one transaction on its writer)."""

    # PostgreSQL: "FOR UPDATE SKIP LOCKED"; SQLite: "" (its writer is serial anyway).
    _SKIP_LOCKED = ""
    # PostgreSQL: a transaction-scoped advisory lock serialising adoption across replicas; SQLite: none.
    _ADOPT_LOCK = ""
    # PostgreSQL: "FOR UPDATE" (waiting: a joining takes its slot whatever the count, it only orders itself
    # after a reservation deciding for the associate); SQLite: "".
    _LOCK_ROW = ""
    # Seconds a cue's commit waits out candidates' rows another replica's transaction holds, while what is
    # committed says one of them has room (reserve_offer_slots). Such transactions last milliseconds; the
    # bound keeps a stuck one from holding this replica's writer.
    locked_wait = 0.5
    # PostgreSQL: writes in CTEs, so steps that need no read in between are one statement (one round trip).
    _ONE_STATEMENT = False

    async def _slot_transaction(self, work: Callable[[SlotTxn], Awaitable[tuple[Any, int]]]) -> Any:
        raise NotImplementedError

    async def reserve_slot(self, claim: SlotClaim, now: float) -> SlotResult:
        if not claim.candidates and not claim.replaces:
            return SlotResult("", False)

        async def run(txn: SlotTxn) -> tuple[SlotResult, int]:
            result = await self._reserve_in(txn, claim, now)
            return result, 1 if result.associate_id else 0

        result: SlotResult = await self._slot_transaction(run)
        return result

    async def _reserve_in(self, txn: SlotTxn, claim: SlotClaim, now: float) -> SlotResult:
        """The reservation's steps in the caller's open transaction (reserve_slot's, or an offer's commit)."""
        ids = list(dict.fromkeys(a for a, _ in claim.candidates))
        delete = "DELETE FROM associate_holds WHERE hold_key = ?"
        if not ids:
            if claim.replaces:
                await txn.execute(delete, claim.replaces)
            return SlotResult("", False)
        values = ", ".join("(?, ?)" for _ in claim.candidates)
        seeds = [v for associate_id, idle_since in claim.candidates for v in (associate_id, float(idle_since))]
        seed = f"INSERT INTO associate_slots (associate_id, idle_since) VALUES {values} ON CONFLICT DO NOTHING"
        # This key's holds (a retry finds its own), less the one taken over (`replaces`, deleted first).
        mine = "SELECT associate_id FROM associate_holds WHERE hold_key = ? AND hold_key <> ?"
        if self._ONE_STATEMENT:
            # The hold taken over is counted for nobody while this transaction decides; the seeded rows are
            # locked in a later statement, which sees them.
            before = await txn.fetch(f"WITH r AS ({delete}), s AS ({seed}) {mine}", claim.replaces, *seeds,
                                     claim.key, claim.replaces)  # fmt: skip
        else:
            if claim.replaces:
                await txn.execute(delete, claim.replaces)
            await txn.execute(seed, *seeds)
            before = await txn.fetch(mine, claim.key, claim.replaces)
        for (associate_id,) in before:
            if associate_id in ids:
                # Reserved before (a retry): the timer it comes with is armed (again) with this answer.
                row = claim.timer(str(associate_id)) if claim.timer is not None else None
                if row is not None:
                    await txn.execute(ARM_TIMER, *arm_row(row))
                return SlotResult(str(associate_id), False, row)
        tried: list[str] = []
        while len(tried) < len(ids):
            # The longest idle candidate not tried yet, and not being decided for by another replica, with the
            # slots they hold. That read may predate the lock (a statement's snapshot is taken before it waits
            # for nothing and locks the row): a reservation committed in between is missed here, and caught
            # below by the read that comes with the insert, taken once the row was ours.
            left = [a for a in ids if a not in tried]
            rows = await txn.fetch(
                "SELECT a.associate_id, h.hold_key, h.channel, h.queue FROM (SELECT associate_id FROM associate_slots "
                f"WHERE associate_id IN ({_marks(len(left))}) ORDER BY idle_since, associate_id LIMIT 1 "
                f"{self._SKIP_LOCKED}) AS a LEFT JOIN associate_holds h ON h.associate_id = a.associate_id",
                *left,
            )
            if not rows:
                return SlotResult("", True)  # the rest are locked: worth asking again
            associate_id = str(rows[0][0])
            tried.append(associate_id)
            held = {str(key): (str(channel), str(queue)) for _, key, channel, queue in rows if key is not None}
            if not claim.fits(associate_id, held):
                continue
            hold = (claim.key, associate_id, claim.channel, claim.queue, claim.replica, float(now))
            # The offer's timeout row (SlotClaim.timer) rides with the hold: both committed, or neither.
            row = claim.timer(associate_id) if claim.timer is not None else None
            arm = arm_row(row) if row is not None else ()
            others = "SELECT hold_key, channel, queue FROM associate_holds WHERE associate_id = ? AND hold_key <> ?"
            if self._ONE_STATEMENT:
                timer = f", t AS ({ARM_TIMER})" if row is not None else ""
                found = await txn.fetch(f"WITH i AS ({_HOLD}){timer} {others}", *hold, *arm, associate_id, claim.key)
            else:
                await txn.execute(_HOLD, *hold)
                if row is not None:
                    await txn.execute(ARM_TIMER, *arm)
                found = await txn.fetch(others, associate_id, claim.key)
            confirmed = {str(key): (str(channel), str(queue)) for key, channel, queue in found}
            if confirmed == held or claim.fits(associate_id, confirmed):
                return SlotResult(associate_id, False, row)
            # Full after all (a reservation committed just before the row was ours): the hold goes, and the
            # timer armed with it is done for its due time (the next candidate's arms it again).
            await txn.execute(
                "DELETE FROM associate_holds WHERE hold_key = ? AND associate_id = ?", claim.key, associate_id
            )
            if row is not None:
                await txn.execute(MARK_DUE_DONE, float(now), row.timer_id, float(row.due_at))
        return SlotResult("", False)

    async def reserve_offer_slots(
        self, txn: SlotTxn, claims: Sequence[SlotClaim], refused: dict[str, tuple[str, str]], now: float
    ) -> dict[str, str]:
        """An offer's commit: a slot for each cue not refused yet, or the cue refused (`no_capacity`): a cue on
        screen holds its engagement's slot on every replica, and one no associate anywhere has room for is
        not offered. A candidate another replica is deciding for at this very moment is waited out
        (`_wait_out_locked`) when it may have room, not counted as full."""
        slotted: dict[str, str] = {}
        for claim in claims:
            if claim.key in refused:
                continue
            result = await self._reserve_in(txn, claim, now)
            if result.contended:
                result = await self._wait_out_locked(txn, claim, now)
            if result.associate_id:
                slotted[claim.key] = result.associate_id
            else:
                refused[claim.key] = ("no_capacity", claim.detail)
        return slotted

    async def _wait_out_locked(self, txn: SlotTxn, claim: SlotClaim, now: float) -> SlotResult:
        """`claim`'s candidates left untried were all locked by other replicas' transactions (SKIP LOCKED
        skipped them). Counted from what is committed (a read that takes no lock): when none of them has
        room, the cue has none; when one may, its row is asked for again shortly, until free or `locked_wait`
        is spent. The reservation itself stays SKIP LOCKED, so two replicas racing for one associate: one
        wins, the other then reads the winner's hold and finds them full. Polling, never waiting on a row
        lock: two commits each holding a row the other wants cannot deadlock."""
        ids = list(dict.fromkeys(a for a, _ in claim.candidates))
        pause, spent = 0.005, 0.0
        while True:
            rows = await txn.fetch(
                f"SELECT associate_id, hold_key, channel, queue FROM associate_holds "
                f"WHERE associate_id IN ({_marks(len(ids))})",
                *ids,
            )
            held: dict[str, dict[str, tuple[str, str]]] = {a: {} for a in ids}
            for associate_id, key, channel, queue in rows:
                held[str(associate_id)][str(key)] = (str(channel), str(queue))
            if not any(claim.fits(a, held[a]) for a in ids):
                return SlotResult("", False)
            if spent >= self.locked_wait:
                return SlotResult("", True)
            await asyncio.sleep(pause)
            spent += pause
            pause = min(pause * 2, 0.05)
            result = await self._reserve_in(txn, claim, now)
            if not result.contended:
                return result

    async def join_holding(self, rec: ParticipationRecord, channel: str, queue: str, replica: str) -> None:
        """A conference or consult joining (core/desk_participants.py): the participation row and the slot it
        takes of the associate, for `replica`, in one transaction. The joining is not refused for want of room
        (alone it is not either); the associate's row is locked first, so a reservation deciding for them
        right now commits before (and this hold counts against it) or after (and it counts this hold)."""

        async def run(txn: SlotTxn) -> tuple[None, int]:
            await txn.execute(
                "INSERT INTO associate_slots (associate_id, idle_since) VALUES (?, ?) "
                "ON CONFLICT (associate_id) DO NOTHING",
                rec.associate_id,
                float(rec.joined_at),
            )
            if self._LOCK_ROW:
                await txn.fetch(
                    f"SELECT 1 FROM associate_slots WHERE associate_id = ? {self._LOCK_ROW}", rec.associate_id
                )
            left_at = None if rec.left_at is None else float(rec.left_at)
            await txn.execute(
                _JOIN, rec.engagement_id, rec.associate_id, rec.role, float(rec.joined_at), left_at,
                rec.disposition, rec.notes,
            )  # fmt: skip
            await txn.execute(_HOLD, rec.engagement_id, rec.associate_id, channel, queue, replica, float(rec.joined_at))
            return None, 1

        await self._slot_transaction(run)

    async def hold_slot(self, key: str, associate_id: str, channel: str, queue: str, replica: str, now: float) -> None:
        async def run(txn: SlotTxn) -> tuple[None, int]:
            await txn.execute(
                "INSERT INTO associate_slots (associate_id, idle_since) VALUES (?, ?) "
                "ON CONFLICT (associate_id) DO NOTHING",
                associate_id,
                float(now),
            )
            await txn.execute(_HOLD, key, associate_id, channel, queue, replica, float(now))
            return None, 1

        await self._slot_transaction(run)

    async def release_slot(self, key: str, associate_id: str, now: float) -> None:
        if self._ONE_STATEMENT:
            await self._slot_statement(_RELEASE_ONE_STATEMENT, key, associate_id, float(now), associate_id, key)
            return

        async def run(txn: SlotTxn) -> tuple[None, int]:
            await txn.execute("DELETE FROM associate_holds WHERE hold_key = ? AND associate_id = ?", key, associate_id)
            await txn.execute(_IDLE_IF_FREE, float(now), associate_id)
            return None, 1

        await self._slot_transaction(run)

    async def prune_slots(self, replica: str, keep: Collection[tuple[str, str]], now: float) -> list[str]:
        async def run(txn: SlotTxn) -> tuple[list[str], int]:
            rows = await txn.fetch("SELECT hold_key, associate_id FROM associate_holds WHERE replica = ?", replica)
            gone = [(str(k), str(a)) for k, a in rows if (str(k), str(a)) not in keep]
            for key, associate_id in gone:
                await txn.execute(
                    "DELETE FROM associate_holds WHERE hold_key = ? AND associate_id = ?", key, associate_id
                )
            freed = sorted({a for _, a in gone})
            for associate_id in freed:
                await txn.execute(_IDLE_IF_FREE, float(now), associate_id)
            return freed, len(gone)

        freed: list[str] = await self._slot_transaction(run)
        return freed

    async def adopt_engagements(self, replica: str, alive_since: float, now: float) -> tuple[list[str], list[str]]:
        async def run(txn: SlotTxn) -> tuple[tuple[list[str], list[str]], int]:
            if self._ADOPT_LOCK:
                await txn.execute(self._ADOPT_LOCK)
            rows = await txn.fetch(
                "SELECT e.engagement_id FROM engagements e "
                "LEFT JOIN engagement_owners o ON o.engagement_id = e.engagement_id "
                f"WHERE e.state IN {OPEN_STATES} AND (o.replica IS NULL OR (o.replica <> ? AND o.owned_at < ? "
                f"AND NOT EXISTS ({_LIVE.format(col='o.replica')}))) ORDER BY e.created_at",
                replica,
                float(alive_since),
                float(alive_since),
            )
            adopted = [str(r[0]) for r in rows]
            for engagement_id in adopted:
                await txn.execute(_OWN, engagement_id, replica, float(now))
            # Owners of engagements that are over say nothing any more: the table stays as small as what is open.
            await txn.execute(
                "DELETE FROM engagement_owners WHERE NOT EXISTS (SELECT 1 FROM engagements e WHERE "
                f"e.engagement_id = engagement_owners.engagement_id AND e.state IN {OPEN_STATES})"
            )
            # Slots held by replicas that are gone are free: their engagements wait again, here or elsewhere.
            stale = await txn.fetch(
                "SELECT DISTINCT associate_id FROM associate_holds h WHERE h.replica <> ? AND h.held_at < ? "
                f"AND NOT EXISTS ({_LIVE.format(col='h.replica')})",
                replica,
                float(alive_since),
                float(alive_since),
            )
            freed = sorted(str(r[0]) for r in stale)
            if freed:
                await txn.execute(
                    "DELETE FROM associate_holds WHERE replica <> ? AND held_at < ? "
                    f"AND NOT EXISTS ({_LIVE.format(col='associate_holds.replica')})",
                    replica,
                    float(alive_since),
                    float(alive_since),
                )
                for associate_id in freed:
                    await txn.execute(_IDLE_IF_FREE, float(now), associate_id)
            return (adopted, freed), len(adopted) + len(freed)

        result: tuple[list[str], list[str]] = await self._slot_transaction(run)
        return result

    async def take_over(self, engagement_id: str, replica: str, now: float) -> None:
        """`replica` routes `engagement_id` from now on (it fired the callback of one whose owner is gone)."""

        async def run(txn: SlotTxn) -> tuple[None, int]:
            await txn.execute(_OWN, engagement_id, replica, float(now))
            return None, 1

        await self._slot_transaction(run)

    async def hand_over(self, record: EngagementRecord, from_replica: str, to_replica: str, now: float) -> bool:
        """The engagement follows its device to `to_replica` (core/follow.py), in one transaction, only while
        `from_replica` still owns it: its row as `from_replica` holds it now, its owner row, the slots it
        holds and its armed timer rows (fallback, offer: core/deadlines.py) all become `to_replica`'s.
        False (nothing written) when another replica owns it by now (it took `from_replica` for gone)."""
        engagement_id = record.engagement_id
        upsert, row = self._engagement_upsert(record)

        async def run(txn: SlotTxn) -> tuple[bool, int]:
            owner = await txn.fetch(
                f"SELECT replica FROM engagement_owners WHERE engagement_id = ? {self._LOCK_ROW}", engagement_id
            )
            if not owner or str(owner[0][0]) != from_replica:
                return False, 0
            await txn.execute(upsert, *row)
            await txn.execute(_OWN, engagement_id, to_replica, float(now))
            await txn.execute(
                "UPDATE associate_holds SET replica = ? WHERE hold_key = ? AND replica = ?",
                to_replica,
                engagement_id,
                from_replica,
            )
            await txn.execute(
                "UPDATE timers SET owner = ? WHERE timer_id IN (?, ?) AND state = 'armed'",
                to_replica,
                f"fallback:{engagement_id}",
                f"offer:{engagement_id}",
            )
            return True, 4

        moved: bool = await self._slot_transaction(run)
        return moved

    def _engagement_upsert(self, record: EngagementRecord) -> tuple[str, Sequence[Any]]:
        """The backend's statement saving an engagement row, and its parameters."""
        raise NotImplementedError

    async def owner_of(self, engagement_id: str) -> str:
        """The replica routing an engagement ("" when none is named)."""
        rows = await self._slot_read("SELECT replica FROM engagement_owners WHERE engagement_id = ?", engagement_id)
        return str(rows[0][0]) if rows else ""

    async def slot_holds(self) -> list[tuple[str, str, str]]:
        """(associate id, hold key, replica) of every slot held, for tests and diagnostics."""
        rows = await self._slot_read(
            "SELECT associate_id, hold_key, replica FROM associate_holds ORDER BY associate_id, hold_key"
        )
        return [(str(a), str(k), str(r)) for a, k, r in rows]

    async def _slot_read(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def _slot_statement(self, sql: str, *args: Any) -> None:
        """One statement as a locking op of its own (PostgreSQL, `_ONE_STATEMENT`)."""
        raise NotImplementedError
