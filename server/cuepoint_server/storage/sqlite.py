"""SQLite (aiosqlite) store with a single batching writer.

Committing per row tops out at a few thousand rows/s, while one transaction of many rows is two orders of
magnitude faster, and aiosqlite pays a thread hop per call. So every write is queued to one writer task that
applies whatever has accumulated (up to ``max_batch`` rows) in one transaction, merging consecutive writes of
the same kind into one ``executemany``, and resolves each caller's future only once the transaction is
committed: an awaited write is durable. Batching needs no timer: ops pile up while the previous transaction
is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import structlog

from .audit_log import AUDIT_SCHEMA, AuditRecord, audit_from_row, audit_insert, audit_select
from .base import AcceptOutcome, FunnelSlice, OfferCommit, OfferResult, StoreClosedError, StoreStats
from .delivery_rows import (
    CLAIM_DELIVERIES,
    DELIVERY_INDEX,
    DELIVERY_RECIPIENTS,
    ENQUEUE_DELIVERY,
    EXPIRE_DELIVERIES,
    delivery_table,
    user_deliveries,
)
from .funnel_sql import funnel_queries
from .journal import (
    EncodedBatch,
    JournalBatch,
    Newest,
    batches_from_records,
    encode_all,
    encode_work,
    in_bodies,
    lookup_needed,
    plan,
    trimmed,
)
from .json_text import dumps as _dumps
from .offer_guard import HISTORY_WHERE, without_refused
from .predict_state import PREDICT_SCHEMA, PredictState
from .records import (
    ChannelChangeRecord,
    ChatRecord,
    CueRecord,
    DecisionRecord,
    DeviceCredentialRecord,
    EngagementRecord,
    FeedbackRecord,
    MilestoneRecord,
    ParticipationRecord,
    ReplicaRecord,
    SessionRecord,
    SignalRecord,
    SwitchRecord,
    TimerRecord,
    TransferRecord,
    WebhookRecord,
)
from .slots import SLOTS_SCHEMA, Slots, SlotTxn
from .sole_decider import SoleDecider
from .timer_rows import (
    ARM_TIMER,
    CLAIM_TIMERS,
    FIRED_ELSEWHERE,
    INSERT_DONE_TIMER,
    MARK_DUE_DONE,
    MARK_TIMER_DONE,
    PURGE_TIMERS,
    TIMER_BY_ID,
    TIMER_COLS,
    TIMER_INDEX,
    arm_row,
    done_row,
    timer_from,
    timers_table,
)

log = structlog.get_logger("cuepoint.storage")

SCHEMA_VERSION = 19

_SIGNAL_COLUMNS_SQL = ", ".join(
    ("device_id", "signal_id", "session_id", "kind", "name", "time", "received_at", "payload")
)
# Steps from version N-1 to N, applied in one transaction to databases created by older releases. A new
# database gets schema.sql, which always describes the newest version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Version 2 drops the unique (device_id, signal_id) index: SQLite cannot drop a constraint's index,
    # so the table is rebuilt, keeping rowid order.
    2: (
        """CREATE TABLE signals_v2 (
            device_id   TEXT NOT NULL,
            signal_id   TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            kind        TEXT NOT NULL CHECK (kind IN ('event', 'context')),
            name        TEXT NOT NULL,
            time        REAL NOT NULL,
            received_at REAL NOT NULL,
            payload     TEXT NOT NULL
        )""",
        f"INSERT INTO signals_v2 ({_SIGNAL_COLUMNS_SQL}) SELECT {_SIGNAL_COLUMNS_SQL} FROM signals ORDER BY rowid",
        "DROP TABLE signals",
        "ALTER TABLE signals_v2 RENAME TO signals",
        "CREATE INDEX IF NOT EXISTS signals_device_time ON signals (device_id, time)",
    ),
    # Version 3: rich cues, A/B variants and feedback (issue 17).
    3: (
        "ALTER TABLE cues ADD COLUMN variant TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE cues ADD COLUMN locale TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE cues ADD COLUMN button_id TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE IF NOT EXISTS variant_switches (
            scenario_id TEXT NOT NULL,
            variant_id  TEXT NOT NULL,
            stopped     INTEGER NOT NULL,
            reason      TEXT NOT NULL,
            time        REAL NOT NULL,
            PRIMARY KEY (scenario_id, variant_id)
        )""",
        """CREATE TABLE IF NOT EXISTS feedback (
            engagement_id TEXT PRIMARY KEY,
            cue_id        TEXT NOT NULL,
            scenario_id   TEXT NOT NULL,
            queue         TEXT NOT NULL,
            associate_id  TEXT NOT NULL,
            variant       TEXT NOT NULL,
            kind          TEXT NOT NULL CHECK (kind IN ('csat', 'nps')),
            score         INTEGER NOT NULL,
            comment       TEXT NOT NULL,
            time          REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS feedback_time ON feedback (time)",
    ),
    # Version 4 adds device credentials (core/device_credentials.py).
    4: (
        """CREATE TABLE IF NOT EXISTS device_credentials (
            device_id     TEXT PRIMARY KEY,
            app_id        TEXT NOT NULL,
            secret_sha256 BLOB NOT NULL,
            issued_at     REAL NOT NULL,
            confirmed_at  REAL
        )""",
    ),
    # Version 5: transfers and the associates who joined an engagement (conference, consult, supervisors).
    5: (
        """CREATE TABLE IF NOT EXISTS engagement_transfers (
            engagement_id     TEXT NOT NULL,
            time              REAL NOT NULL,
            from_associate_id TEXT NOT NULL,
            to_associate_id   TEXT NOT NULL,
            to_queue          TEXT NOT NULL,
            mode              TEXT NOT NULL CHECK (mode IN ('blind', 'consult')),
            note              TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS transfers_engagement ON engagement_transfers (engagement_id)",
        """CREATE TABLE IF NOT EXISTS engagement_participants (
            engagement_id TEXT NOT NULL,
            associate_id  TEXT NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('conference', 'consult', 'monitor', 'barge')),
            joined_at     REAL NOT NULL,
            left_at       REAL,
            disposition   TEXT NOT NULL,
            notes         TEXT NOT NULL,
            PRIMARY KEY (engagement_id, associate_id, role, joined_at)
        )""",
    ),
    # Version 6: whether a session's user id is its identity (verified) or only claimed. User ids stored
    # before verification existed were taken at the device's word: they count as claimed.
    6: ("ALTER TABLE sessions ADD COLUMN identified INTEGER NOT NULL DEFAULT 0",),
    # Version 7: predictive scores (labelled sessions, model states, the trainer lease; predict_state.py).
    7: PREDICT_SCHEMA,
    # Version 8: operations switches that outlast a restart, and the durable webhook outbox.
    8: (
        """CREATE TABLE IF NOT EXISTS switches (
            scope    TEXT NOT NULL CHECK (scope IN ('offers', 'scenario')),
            scope_id TEXT NOT NULL,
            is_on    INTEGER NOT NULL,
            reason   TEXT NOT NULL,
            time     REAL NOT NULL,
            PRIMARY KEY (scope, scope_id)
        )""",
        """CREATE TABLE IF NOT EXISTS webhook_outbox (
            delivery_id     TEXT PRIMARY KEY,
            url             TEXT NOT NULL,
            kind            TEXT NOT NULL,
            body            TEXT NOT NULL,
            created_at      REAL NOT NULL,
            state           TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
            attempts        INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_error      TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (state, next_attempt_at)",
    ),
    # Version 9: a (device, signal id) is stored once however long ago it was first sent: the journal
    # gets its unique index back. Duplicates that versions 2-8 let through are dropped first (the first
    # stored copy stays). Signal ids from the SDK sort by time (ULID), so each device's inserts land at
    # the end of its range of the index (bench/README.md: the cost of this index).
    9: (
        "DELETE FROM signals WHERE rowid NOT IN (SELECT MIN(rowid) FROM signals GROUP BY device_id, signal_id)",
        "CREATE UNIQUE INDEX IF NOT EXISTS signals_device_signal ON signals (device_id, signal_id)",
    ),
    # Version 10: the admin audit trail (audit_log.py).
    10: AUDIT_SCHEMA,
    # Version 11: callbacks: when the user wants to be called back, and on which number.
    11: (
        "ALTER TABLE engagements ADD COLUMN callback_at REAL",
        "ALTER TABLE engagements ADD COLUMN callback_number TEXT NOT NULL DEFAULT ''",
    ),
    # Version 12: when the associate wrapped an engagement up, for wrap-up times (reporting/handling.py).
    12: ("ALTER TABLE engagements ADD COLUMN wrapped_up_at REAL",),
    # Version 13: the outcome an associate records at wrap-up (the funnel's outcome step).
    13: (
        "ALTER TABLE engagements ADD COLUMN wrap_up_outcome TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE engagements ADD COLUMN wrap_up_success INTEGER NOT NULL DEFAULT 0",
    ),
    # Version 14: the replicas registry (who runs, what it serves, when it last reported; core/cluster.py).
    14: (
        """CREATE TABLE IF NOT EXISTS replicas (
            replica_id        TEXT PRIMARY KEY,
            started_at        REAL NOT NULL,
            last_seen         REAL NOT NULL,
            address           TEXT NOT NULL,
            host              TEXT NOT NULL,
            scenarios_version TEXT NOT NULL,
            draining          INTEGER NOT NULL
        )""",
    ),
    # Version 15: associate slots and engagement owners shared by replicas (slots.py).
    15: SLOTS_SCHEMA,
    # Version 16: timers as rows (timer_rows.py), claimable by any replica once their owner is gone.
    16: (timers_table("REAL"), TIMER_INDEX),
    # Version 17: one journal row per batch (journal.py). Each stored signal becomes a batch of one, its id
    # listed in signal_ids (none is a run), and each device's mark is its largest id; then the per-signal
    # table gives way to a view of the same name and columns. (SQLite 3.40's json_array keeps 15
    # significant digits of a migrated time: microseconds of an epoch time may round.)
    17: (
        """CREATE TABLE IF NOT EXISTS signal_batches (
            device_id   TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            first_time  REAL NOT NULL,
            last_time   REAL NOT NULL,
            received_at REAL NOT NULL,
            count       INTEGER NOT NULL,
            min_id      TEXT NOT NULL,
            max_id      TEXT NOT NULL,
            run         INTEGER NOT NULL,
            body        TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS signal_batches_device_time ON signal_batches (device_id, last_time)",
        "CREATE INDEX IF NOT EXISTS signal_batches_device_run ON signal_batches (device_id, max_id) WHERE run = 1",
        "CREATE TABLE IF NOT EXISTS signal_marks (device_id TEXT PRIMARY KEY, high TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE IF NOT EXISTS signal_ids (
            device_id TEXT NOT NULL,
            signal_id TEXT NOT NULL,
            PRIMARY KEY (device_id, signal_id)
        ) WITHOUT ROWID""",
        "INSERT INTO signal_batches (device_id, session_id, first_time, last_time, received_at, count, min_id, max_id,"
        " run, body) SELECT device_id, session_id, time, time, received_at, 1, signal_id, signal_id, 0,"
        " json_array(json_array(signal_id, kind, name, time, json(payload))) FROM signals ORDER BY rowid",
        "INSERT OR IGNORE INTO signal_ids (device_id, signal_id) SELECT device_id, signal_id FROM signals",
        "INSERT INTO signal_marks (device_id, high) SELECT device_id, MAX(signal_id) FROM signals GROUP BY device_id",
        "DROP TABLE signals",
        """CREATE VIEW IF NOT EXISTS signals AS
            SELECT b.device_id AS device_id, e.value ->> 0 AS signal_id, b.session_id AS session_id,
                e.value ->> 1 AS kind, e.value ->> 2 AS name, e.value ->> 3 AS time, b.received_at AS received_at,
                e.value -> 4 AS payload, b.rowid AS batch_seq, e.key AS position
            FROM signal_batches AS b, json_each(b.body) AS e""",
    ),
    # Version 18: the delivery outbox (delivery_rows.py): traffic between replicas, committed before it is sent.
    18: (delivery_table("REAL", "id INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"), DELIVERY_INDEX),
    # Version 19: the user's answer to an engagement's fallback that keeps it open (chat), so a replica adopting
    # it does not offer the fallback again (core/desk_timers.py).
    19: ("ALTER TABLE engagements ADD COLUMN fallback_choice TEXT NOT NULL DEFAULT ''",),
}
_BUSY_TIMEOUT_MS = 5000
# How a connection waits out another process's lock: set at open, and set again by the writer after its inline
# commits cleared it.
_WAIT_FOR_LOCKS = f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}"


# --- SQL ------------------------------------------------------------------------------------------------

_SESSION_COLS = (
    "session_id", "app_id", "device_id", "user_id", "started_at", "context", "consent", "ended_at", "identified",
)  # fmt: skip
_CUE_COLS = (
    "cue_id", "scenario_id", "app_id", "device_id", "subject", "session_id", "created_at", "expires_at",
    "channel", "message", "status", "responded_at", "explanation", "variant", "locale", "button_id",
)  # fmt: skip
_ENGAGEMENT_COLS = (
    "engagement_id", "cue_id", "app_id", "device_id", "session_id", "queue", "state", "channel", "created_at",
    "assigned_at", "ended_at", "associate_id", "disposition", "notes", "context", "subject", "scenario_id",
    "priority", "outcome", "ended_by", "callback_at", "callback_number", "wrapped_up_at", "wrap_up_outcome",
    "wrap_up_success", "fallback_choice",
)  # fmt: skip
_CHAT_COLS = ("message_id", "engagement_id", "sender", "text", "time")
_TRANSFER_COLS = ("engagement_id", "time", "from_associate_id", "to_associate_id", "to_queue", "mode", "note")
_PART_COLS = ("engagement_id", "associate_id", "role", "joined_at", "left_at", "disposition", "notes")
_CHANGE_COLS = ("engagement_id", "time", "request_id", "from_channel", "to_channel", "requested_by", "accepted")


def _upsert_sql(table: str, cols: Sequence[str], *, keep_when_null: Sequence[str] = ()) -> str:
    key = cols[0]

    def assign(col: str) -> str:
        if col in keep_when_null:
            return f"{col} = COALESCE(excluded.{col}, {table}.{col})"
        return f"{col} = excluded.{col}"

    updates = ", ".join(assign(c) for c in cols[1:])
    marks = ", ".join("?" * len(cols))
    insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})"
    return f"{insert} ON CONFLICT ({key}) DO UPDATE SET {updates}"


# Re-saving a session (e.g. to update its context) must not reopen it.
_UPSERT_SESSION = _upsert_sql("sessions", _SESSION_COLS, keep_when_null=("ended_at",))
_UPSERT_CUE = _upsert_sql("cues", _CUE_COLS)
_UPSERT_ENGAGEMENT = _upsert_sql("engagements", _ENGAGEMENT_COLS)
_END_SESSION = "UPDATE sessions SET ended_at = ? WHERE session_id = ?"
_SET_CUE_STATUS = "UPDATE cues SET status = ?, responded_at = ?, button_id = ? WHERE cue_id = ?"
_FEEDBACK_COLS = (
    "engagement_id", "cue_id", "scenario_id", "queue", "associate_id", "variant", "kind", "score", "comment", "time",
)  # fmt: skip
# One answer per engagement: a resent answer does not count twice.
_INSERT_FEEDBACK = (
    f"INSERT INTO feedback ({', '.join(_FEEDBACK_COLS)}) VALUES ({', '.join('?' * len(_FEEDBACK_COLS))}) "
    "ON CONFLICT (engagement_id) DO NOTHING"
)
_UPSERT_SWITCH = (
    "INSERT INTO variant_switches (scenario_id, variant_id, stopped, reason, time) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (scenario_id, variant_id) DO UPDATE SET stopped = excluded.stopped, reason = excluded.reason, "
    "time = excluded.time"
)


def _select(table: str, cols: Sequence[str]) -> str:
    return f"SELECT {', '.join(cols)} FROM {table}"


# --- row mapping ----------------------------------------------------------------------------------------

Row = tuple[object, ...]


def _session_row(r: SessionRecord) -> Row:
    return (
        r.session_id, r.app_id, r.device_id, r.user_id, r.started_at, _dumps(r.context), r.consent,
        r.ended_at, int(r.identified),
    )  # fmt: skip


def _session_from(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], bool(row[8]))


_DECISION_COLS = (
    "time",
    "app_id",
    "device_id",
    "subject",
    "session_id",
    "scenario_id",
    "outcome",
    "reason",
    "detail",
    "cue_id",
    "outcome_milestone",
)
_MILESTONE_COLS = ("time", "app_id", "device_id", "session_id", "milestone_id")
_INSERT_MILESTONE = f"INSERT INTO milestones ({', '.join(_MILESTONE_COLS)}) VALUES (?, ?, ?, ?, ?)"
_INSERT_CHAT = f"INSERT INTO chat_messages ({', '.join(_CHAT_COLS)}) VALUES (?, ?, ?, ?, ?)"
_INSERT_TRANSFER = f"INSERT INTO engagement_transfers ({', '.join(_TRANSFER_COLS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_UPSERT_PART = (
    f"INSERT INTO engagement_participants ({', '.join(_PART_COLS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (engagement_id, associate_id, role, joined_at) DO UPDATE SET"
    " left_at = excluded.left_at, disposition = excluded.disposition, notes = excluded.notes"
)
_INSERT_CHANGE = f"INSERT INTO channel_changes ({', '.join(_CHANGE_COLS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_DECISION = (
    f"INSERT INTO decisions ({', '.join(_DECISION_COLS)}) VALUES ({', '.join('?' * len(_DECISION_COLS))})"
)
# The guard judges times, scenarios, sessions and statuses (Arbiter.recheck): the explanation, the largest
# column and a JSON decode per stored cue, is not read (NULL here, {} in the records; see _history_cue).
_SUBJECT_HISTORY = (
    f"{_select('cues', [c if c != 'explanation' else 'NULL' for c in _CUE_COLS])} "
    f"WHERE {HISTORY_WHERE.format('?1', '?2', '?3', 'rowid')} ORDER BY created_at, rowid"
)


# A user's sessions (?1: user id) and the anonymous sessions of the same devices: the pre-sign-in history.
_USER_SESSIONS = (
    "SELECT session_id FROM sessions WHERE user_id = ?1"
    " OR (user_id = '' AND device_id IN (SELECT device_id FROM sessions WHERE user_id = ?1))"
)
# ... and their engagements, with those filed under the user's subject (?2).
_USER_ENGAGEMENTS = f"SELECT engagement_id FROM engagements WHERE subject = ?2 OR session_id IN ({_USER_SESSIONS})"
# table -> which of its rows are the user's; children of sessions and engagements come first, so a deletion
# in this order still finds every row through the parents it deletes last.
_USER_ROWS = (
    ("chat_messages", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("channel_changes", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("feedback", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("engagement_transfers", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("engagement_participants", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("signals", f"session_id IN ({_USER_SESSIONS})"),
    ("milestones", f"session_id IN ({_USER_SESSIONS})"),
    ("predict_labels", f"session_id IN ({_USER_SESSIONS})"),
    # Webhook deliveries not yet taken (or dead) that report one of the user's cues or engagements: every
    # cue and engagement event names its cue_id. Before the cues, which find them.
    (
        "webhook_outbox",
        "EXISTS (SELECT 1 FROM cues AS c WHERE (c.subject = ?2 OR c.session_id IN "
        f"({_USER_SESSIONS})) AND webhook_outbox.body LIKE '%\"' || c.cue_id || '\"%')",
    ),
    # Messages between replicas carrying the user's engagements or invitations to their devices (not exported:
    # in transit, each is also stored where it belongs).
    ("delivery_outbox", user_deliveries(_USER_ENGAGEMENTS, _USER_SESSIONS)),
    ("decisions", f"subject = ?2 OR session_id IN ({_USER_SESSIONS})"),
    ("cues", f"subject = ?2 OR session_id IN ({_USER_SESSIONS})"),
    ("engagements", f"subject = ?2 OR session_id IN ({_USER_SESSIONS})"),
    ("sessions", f"session_id IN ({_USER_SESSIONS})"),
)


_NOT_EXPORTED = ("delivery_outbox",)


def _user_queries(user_id: str, subject: str) -> list[tuple[str, str, Row]]:
    """(table, SELECT of the user's rows, parameters), in export order."""
    order = ("sessions", "signals", "milestones", "predict_labels", "cues", "decisions", "engagements")
    where = dict(_USER_ROWS)
    tables = [*order, *(t for t, _ in _USER_ROWS if t not in order and t not in _NOT_EXPORTED)]
    order_by = {"signals": " ORDER BY time, batch_seq, position"}
    return [
        (t, f"SELECT * FROM {t} WHERE {where[t]}{order_by.get(t, '')}", _user_params(where[t], user_id, subject))
        for t in tables
    ]


def _user_params(where: str, user_id: str, subject: str) -> Row:
    # sqlite3 wants exactly as many values as the highest ?N a statement uses.
    return (user_id, subject) if "?2" in where else (user_id,)


def _plain(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(columns, row, strict=True):
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


_UPSERT_OPS_SWITCH = (
    "INSERT INTO switches (scope, scope_id, is_on, reason, time) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (scope, scope_id) DO UPDATE SET is_on = excluded.is_on, reason = excluded.reason, time = excluded.time"
)
_REPLICA_COLS = ("replica_id", "started_at", "last_seen", "address", "host", "scenarios_version", "draining")
_UPSERT_REPLICA = _upsert_sql("replicas", _REPLICA_COLS)
_WEBHOOK_COLS = (
    "delivery_id", "url", "kind", "body", "created_at", "state", "attempts", "next_attempt_at", "last_error",
)  # fmt: skip
_WEBHOOK_SELECT = _select("webhook_outbox", _WEBHOOK_COLS)
_INSERT_WEBHOOK = (
    f"INSERT INTO webhook_outbox ({', '.join(_WEBHOOK_COLS)}) VALUES ({', '.join('?' * len(_WEBHOOK_COLS))}) "
    "ON CONFLICT (delivery_id) DO NOTHING"
)


# A row's values in its columns' order, read by one C call (attrgetter) rather than a generator of getattr calls:
# each offer stores a decision row, and often webhook rows.
_webhook_row: Callable[[WebhookRecord], Row] = attrgetter(*_WEBHOOK_COLS)
_decision_row: Callable[[DecisionRecord], Row] = attrgetter(*_DECISION_COLS)
_milestone_row: Callable[[MilestoneRecord], Row] = attrgetter(*_MILESTONE_COLS)
_feedback_row: Callable[[FeedbackRecord], Row] = attrgetter(*_FEEDBACK_COLS)
_transfer_row: Callable[[TransferRecord], Row] = attrgetter(*_TRANSFER_COLS)
_part_row: Callable[[ParticipationRecord], Row] = attrgetter(*_PART_COLS)


def _cue_row(r: CueRecord) -> Row:
    return (
        r.cue_id, r.scenario_id, r.app_id, r.device_id, r.subject, r.session_id, r.created_at, r.expires_at,
        r.channel, r.message, r.status, r.responded_at, _dumps(r.explanation), r.variant, r.locale, r.button_id,
    )  # fmt: skip


def _cue_from(row: sqlite3.Row) -> CueRecord:
    return CueRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        json.loads(row[12]), row[13], row[14], row[15],
    )  # fmt: skip


def _history_cue(row: sqlite3.Row) -> CueRecord:
    """A row of _SUBJECT_HISTORY: a cue without its explanation."""
    return CueRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        {}, row[13], row[14], row[15],
    )  # fmt: skip


def _engagement_row(r: EngagementRecord) -> Row:
    return (
        r.engagement_id, r.cue_id, r.app_id, r.device_id, r.session_id, r.queue, r.state, r.channel,
        r.created_at, r.assigned_at, r.ended_at, r.associate_id, r.disposition, r.notes, _dumps(r.context),
        r.subject, r.scenario_id, r.priority, r.outcome, r.ended_by, r.callback_at, r.callback_number,
        r.wrapped_up_at, r.wrap_up_outcome, int(r.wrap_up_success), r.fallback_choice,
    )  # fmt: skip


def _engagement_from(row: sqlite3.Row) -> EngagementRecord:
    return EngagementRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        row[12], row[13], json.loads(row[14]), row[15], row[16], row[17], row[18], row[19], row[20], row[21],
        row[22], row[23], bool(row[24]), row[25],
    )  # fmt: skip


def _replica_row(rec: ReplicaRecord) -> tuple[object, ...]:
    return (
        rec.replica_id, rec.started_at, rec.last_seen, rec.address, rec.host, rec.scenarios_version, int(rec.draining),
    )  # fmt: skip


def _replica_from(row: Sequence[Any]) -> ReplicaRecord:
    return ReplicaRecord(str(row[0]), float(row[1]), float(row[2]), str(row[3]), str(row[4]), str(row[5]), bool(row[6]))


_SET_OWNER = (
    "INSERT INTO engagement_owners (engagement_id, replica, owned_at) VALUES (?, ?, ?) "
    "ON CONFLICT (engagement_id) DO UPDATE SET replica = excluded.replica, owned_at = excluded.owned_at"
)


class _SqliteTxn:
    """slots.py's view of the writer's open transaction."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._conn.execute_fetchall(sql, args))


# --- writer ---------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Statement:
    """One parametrised statement; consecutive ones with the same SQL share an executemany."""

    sql: str
    params: Row
    future: asyncio.Future[Any]

    @property
    def size(self) -> int:
        return 1


@dataclass(slots=True, eq=False)
class _AppendBatches:
    batches: list[EncodedBatch]
    future: asyncio.Future[Any]

    @property
    def size(self) -> int:
        return sum(len(b.ids) for b in self.batches)


@dataclass(slots=True, eq=False)
class _Transaction:
    """A unit of work of several statements (and reads) that commits whole or not at all; never merged."""

    work: Callable[[aiosqlite.Connection], Awaitable[tuple[Any, int]]]  # -> (result, rows written)
    future: asyncio.Future[Any]
    size: int = 1


@dataclass(slots=True, eq=False)
class _ThreadTransaction:
    """A unit of work like _Transaction, written as one plain function of the sqlite3 connection: it runs on
    the database thread without a hop per statement, and a writer batch made only of these, statements and
    appends is begun, written and committed in one hop (`_apply`)."""

    work: Callable[[sqlite3.Connection], tuple[Any, int]]  # -> (result, rows written)
    future: asyncio.Future[Any]
    size: int = 1


_Op = _Statement | _AppendBatches | _Transaction | _ThreadTransaction


@dataclass(slots=True, eq=False)
class _Checkpoint:
    """``PRAGMA wal_checkpoint(TRUNCATE)``: runs between transactions, never inside one."""

    future: asyncio.Future[Any]
    size: int = 1


class _CatchUp:
    """A copy of the WAL beside the commits has ended: the writer copies the rest between its transactions."""


_CATCH_UP = _CatchUp()


def _groups(batch: list[_Op]) -> Iterable[list[_Op]]:
    group: list[_Op] = []
    for op in batch:
        if group and not _same_kind(group[-1], op):
            yield group
            group = []
        group.append(op)
    if group:
        yield group


def _same_kind(a: _Op, b: _Op) -> bool:
    if isinstance(a, _Transaction | _ThreadTransaction) or isinstance(b, _Transaction | _ThreadTransaction):
        return False
    if isinstance(a, _Statement) and isinstance(b, _Statement):
        return a.sql == b.sql
    return isinstance(a, _AppendBatches) and isinstance(b, _AppendBatches)


# A writer batch of at most this many rows is begun, written and committed on the event loop's own thread
# (issue 13: "one writer on the event loop"). In WAL mode with synchronous = NORMAL a commit is a write to the
# WAL file, no fsync: ~20 us for a cue round's rows, while the hop to aiosqlite's thread cost a queue, a
# thread wake-up, a loop callback and the GIL handed back and forth (bench_latency.py: server CPU per cue
# round 1.74 / 1.03 -> 1.23 / 0.90 ms, README "Changes of 2026-12-06"). Larger batches (ingest bursts) still
# go to the thread, where SQLite's C code runs beside the loop on the other core.
INLINE_ROWS = 256
# The WAL is checkpointed by the writer, never by a commit on the loop: an automatic checkpoint inside a
# commit fsyncs, and stalled the loop up to ~12 ms (56 commits of 20,000 over 1 ms, against 6 without).
# After this many rows or commits, near SQLite's 1,000-page default.
CHECKPOINT_EVERY = 4000
# In two steps, so commits do not wait for the copy. First the bulk, from a connection of its own on its own
# thread while commits go on: copying ~11,000 frames and its two fsyncs took 19-27 ms, and every commit of a
# cue round queued behind it when the writer waited for it (bench_latency.py: p99 signal-to-cue 23 ms at 350
# cues/s while no loop callback took over 7 ms; 4.5 ms after). Then, between the writer's transactions, the
# few frames committed meanwhile (~2 ms for 170), so the next commit finds the WAL fully copied and starts it
# over: a WAL only ever checkpointed beside commits never restarts and grows without end. If more than this many rows
# were committed during the copy, another copy runs first (at most COPY_ROUNDS in all): at 1,000 cue rounds/s
# a 30-37 ms copy let 130-330 in, and copying those between transactions took 3.8-10.3 ms; with a second,
# shorter copy first (5-6 ms, ~50 in), 1.7-7.3 ms.
CATCH_UP_ROWS = 64
COPY_ROUNDS = 3


def _copy_wal(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A PASSIVE checkpoint on the checkpointer's own connection and thread: (busy, frames in the WAL, copied).

    PASSIVE never waits for readers or writers, so the writer's commits go on beside it."""
    ((busy, frames, copied),) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # all: no open statement
    return int(busy), int(frames), int(copied)


class _BatchWriter:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        max_batch: int,
        txn_guard: contextlib.AbstractAsyncContextManager[Any],
        inline: bool = False,
        checkpointer: aiosqlite.Connection | None = None,
    ) -> None:
        self._conn = conn
        self._max_batch = max_batch
        self._guard = txn_guard
        # Small batches inline: for a file database (its WAL checkpointed by `_passive_checkpoint`); an
        # in-memory one shares its connection with the reads, which run on aiosqlite's thread.
        self._inline = inline
        # Whether the connection's busy timeout is set (it waits out another process's write lock). The inline
        # path clears it and leaves it cleared, so a run of inline commits sets no PRAGMA at all (two per commit
        # were ~17 of its ~78 us of CPU); whatever may wait on a lock sets it again first (`_may_wait`).
        self._waits = True
        self._unchecked = 0  # rows and commits since the last checkpoint began
        # Copies the WAL beside the writer's commits (CATCH_UP_ROWS); None: the writer copies it all itself.
        self._checkpointer = checkpointer
        self._copying: asyncio.Task[None] | None = None
        self._copies = 0  # copies beside commits since the WAL was last fully copied
        self._queue: asyncio.Queue[_Op | _Checkpoint | _CatchUp | None] = asyncio.Queue()
        self._closed = False
        self._batches = self._ops = self._rows = self._failed = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cuepoint-sqlite-writer")

    def stats(self) -> StoreStats:
        return StoreStats(self._batches, self._ops, self._rows, self._failed)

    async def execute(self, sql: str, params: Row) -> None:
        await self._submit(_Statement(sql, params, self._new_future()))

    async def append_batches(self, batches: list[EncodedBatch]) -> list[str]:
        skipped: list[str] = await self._submit(_AppendBatches(batches, self._new_future()))
        return skipped

    async def transaction(
        self, work: Callable[[aiosqlite.Connection], Awaitable[tuple[Any, int]]], size: int = 1
    ) -> Any:
        return await self._submit(_Transaction(work, self._new_future(), max(size, 1)))

    async def thread_transaction(self, work: Callable[[sqlite3.Connection], tuple[Any, int]], size: int = 1) -> Any:
        """As `transaction`, with `work` run on the database thread as it is (no await inside)."""
        return await self._submit(_ThreadTransaction(work, self._new_future(), max(size, 1)))

    async def checkpoint(self) -> bool:
        """Checkpoint the WAL and truncate it, after everything submitted before; False if readers kept it busy."""
        result: bool = await self._submit(_Checkpoint(self._new_future()))
        return result

    async def stop(self) -> None:
        if not self._closed:
            self._closed = True
            # Queued after every accepted op, so everything already submitted is still written.
            self._queue.put_nowait(None)
        await asyncio.shield(self._task)
        await self._copied()

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op | _Checkpoint) -> Any:
        if self._closed:
            raise StoreClosedError("store is closed")
        self._queue.put_nowait(op)
        # A cancelled caller does not withdraw the op: it may already be in a transaction, and writes are
        # idempotent for retries (upserts, deduplicated signals).
        return await op.future

    async def _run(self) -> None:
        pending: list[_Op] = []
        held: _Checkpoint | _CatchUp | None = None
        try:
            stopping = False
            while not stopping:
                first = await self._queue.get()
                if first is None:
                    break
                if isinstance(first, (_Checkpoint, _CatchUp)):
                    await self._between(first)
                    continue
                pending = [first]
                size = first.size
                while size < self._max_batch and not self._queue.empty():
                    op = self._queue.get_nowait()
                    if op is None:
                        stopping = True
                        break
                    if isinstance(op, (_Checkpoint, _CatchUp)):
                        held = op  # after this batch's transaction
                        break
                    pending.append(op)
                    size += op.size
                await self._apply(pending)
                pending = []
                if self._unchecked >= CHECKPOINT_EVERY and self._copying is None:
                    await self._start_checkpoint()
                if held is not None:
                    await self._between(held)
                    held = None
        finally:
            # Only reached early if the task is cancelled (e.g. loop shutdown): nobody may wait forever.
            self._closed = True
            left: list[_Op | _Checkpoint | _CatchUp] = [*pending, *([held] if held is not None else [])]
            while not self._queue.empty():
                op = self._queue.get_nowait()
                if op is not None:
                    left.append(op)
            for op in left:
                if not isinstance(op, _CatchUp) and not op.future.done():
                    op.future.set_exception(StoreClosedError("store closed before the write was committed"))

    async def _between(self, step: _Checkpoint | _CatchUp) -> None:
        """What runs between two transactions: an explicit checkpoint, or the end of a copy (_catch_up)."""
        if isinstance(step, _Checkpoint):
            await self._checkpoint(step)
        else:
            await self._catch_up()

    async def _checkpoint(self, op: _Checkpoint) -> None:
        await self._copied()  # a copy in progress holds the checkpoint lock: TRUNCATE would find it busy
        try:
            async with self._guard:
                await self._may_wait()  # TRUNCATE waits for readers through the busy handler
                rows = list(await self._conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)"))
        except Exception as exc:
            if not op.future.done():
                op.future.set_exception(exc)
            return
        busy = bool(rows and rows[0][0])
        if busy:
            log.warning("storage.checkpoint_busy")
        if not op.future.done():
            op.future.set_result(not busy)

    async def _apply(self, batch: list[_Op]) -> None:
        applying = False
        try:
            async with self._guard:
                if not any(isinstance(op, _Transaction) for op in batch):
                    # BEGIN, every write and COMMIT at once: on the loop's thread when small (INLINE_ROWS),
                    # else in one hop to the database thread (each hop, a queue, a thread wake-up and a loop
                    # callback, cost the event loop more than the statements it ran; a cue round made five).
                    outcome: _Applied | None = None
                    if self._inline and sum(op.size for op in batch) <= INLINE_ROWS:
                        outcome = self._apply_inline(batch)  # None: another process writes
                    if outcome is None:
                        waits, self._waits = self._waits, True
                        outcome = await _in_thread(self._conn, _apply_in_thread, batch, waits)
                    written, failed = outcome
                    if failed is not None:
                        applying = True
                        raise failed
                    assert written is not None  # _apply_begun returns one or the other
                    results, rows = written
                else:
                    try:
                        await self._may_wait()
                        await self._conn.execute("BEGIN IMMEDIATE")
                        applying = True
                        results, rows = await self._write(batch)
                        applying = False
                        await self._conn.commit()
                    except BaseException:
                        await self._rollback()
                        raise
        except Exception as exc:
            if applying and len(batch) > 1:
                # One bad op must not fail the others: redo them one transaction each to find it.
                for op in batch:
                    await self._apply([op])
                return
            self._failed += len(batch)
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(exc)
            return
        self._batches += 1
        self._ops += len(batch)
        self._rows += rows
        if self._inline:
            self._unchecked += rows + 1
        for op, result in zip(batch, results, strict=True):
            if not op.future.done():
                op.future.set_result(result)

    def _apply_inline(self, batch: list[_Op]) -> _Applied | None:
        """`_apply_in_thread` on the event loop's thread, or None (nothing done) when another process holds the
        write lock: the loop must not wait out the busy timeout, so the database thread does that instead."""
        db: sqlite3.Connection = self._conn._conn
        if self._waits:
            db.execute("PRAGMA busy_timeout = 0")
            self._waits = False
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            raise
        # In WAL mode nothing after BEGIN IMMEDIATE waits for a lock: the write lock is held until COMMIT.
        return _apply_begun(db, batch)

    async def _may_wait(self) -> None:
        """Set the busy timeout again before a statement that should wait for another process's lock."""
        if not self._waits:
            await self._conn.execute(_WAIT_FOR_LOCKS)
            self._waits = True

    async def _start_checkpoint(self) -> None:
        """CHECKPOINT_EVERY rows were committed: copy the WAL, beside the commits if there is a checkpointer."""
        if self._checkpointer is None:
            await self._passive_checkpoint()
            return
        self._unchecked = 0  # from here on: what the copy may miss
        self._copies += 1
        self._copying = asyncio.get_running_loop().create_task(
            self._copy(self._checkpointer), name="cuepoint-sqlite-checkpoint"
        )

    async def _copy(self, checkpointer: aiosqlite.Connection) -> None:
        try:
            await _in_thread(checkpointer, _copy_wal)
        except Exception:
            log.warning("storage.checkpoint_failed", exc_info=True)
        if not self._closed:
            self._queue.put_nowait(_CATCH_UP)

    async def _catch_up(self) -> None:
        """A copy ended: copy what was committed meanwhile, or, if that is still much, start another copy."""
        await self._copied()
        if self._unchecked <= CATCH_UP_ROWS or self._copies >= COPY_ROUNDS:
            self._copies = 0
            await self._passive_checkpoint()
        else:
            await self._start_checkpoint()

    async def _copied(self) -> None:
        """Wait for a copy in progress (its thread cannot be interrupted; never raises)."""
        if self._copying is not None:
            copying, self._copying = self._copying, None
            await asyncio.shield(copying)

    async def _passive_checkpoint(self) -> None:
        # PASSIVE: copies what no reader still needs and never waits for readers; the WAL restarts at the
        # next commit once everything is copied.
        self._unchecked = 0
        try:
            async with self._guard:
                await self._conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")  # fetched: no open statement
        except Exception:
            log.warning("storage.checkpoint_failed", exc_info=True)

    async def _rollback(self) -> None:
        # The original error is what callers need; a failed rollback means the connection is unusable and
        # the next BEGIN will report that.
        with contextlib.suppress(Exception):
            await self._conn.rollback()

    async def _write(self, batch: list[_Op]) -> tuple[list[Any], int]:
        results: list[Any] = []
        rows = 0
        for group in _groups(batch):
            first = group[0]
            if isinstance(first, _Transaction):
                result, written = await first.work(self._conn)
                results.append(result)
                rows += written
                continue
            if isinstance(first, _ThreadTransaction):
                result, written = await _in_thread(self._conn, _run_work, first.work)
                results.append(result)
                rows += written
                continue
            if isinstance(first, _Statement):
                params = [op.params for op in group if isinstance(op, _Statement)]
                await self._conn.executemany(first.sql, params)
                results.extend([None] * len(group))
                rows += len(params)
                continue
            appends = [op for op in group if isinstance(op, _AppendBatches)]
            batches = [b for op in appends for b in op.batches]
            skipped = await _append_journal(self._conn, batches)
            # Each caller learns which of its signals were stored already (skipped as resends).
            at = 0
            for op in appends:
                results.append([i for per in skipped[at : at + len(op.batches)] for i in per])
                at += len(op.batches)
            rows += sum(len(b.ids) for b in batches) - sum(len(per) for per in skipped)
        return results, rows


def _run_work(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], tuple[Any, int]]) -> tuple[Any, int]:
    return work(db)


# ((results, rows written), None) once committed, or (None, the error) once rolled back.
_Applied = tuple[tuple[list[Any], int] | None, Exception | None]


def _apply_in_thread(db: sqlite3.Connection, batch: list[_Op], waits: bool) -> _Applied:
    """On the database thread: one writer batch (no _Transaction in it) begun, written and committed.

    ((results, rows), None) once committed; (None, error) if a write failed (rolled back: the writer then
    retries the ops one by one, as `_apply` does). BEGIN or COMMIT failing raises (nothing was written).
    ``waits``: whether the busy timeout is set; if not (the inline path cleared it), it is set first."""
    if not waits:
        db.execute(_WAIT_FOR_LOCKS)
    db.execute("BEGIN IMMEDIATE")
    return _apply_begun(db, batch)


def _apply_begun(db: sqlite3.Connection, batch: list[_Op]) -> _Applied:
    try:
        written = _write_in_thread(db, batch)
    except Exception as exc:
        _rollback_in_thread(db)
        return None, exc
    except BaseException:
        _rollback_in_thread(db)
        raise
    try:
        db.execute("COMMIT")
    except BaseException:
        _rollback_in_thread(db)
        raise
    return written, None


def _rollback_in_thread(db: sqlite3.Connection) -> None:
    # As _BatchWriter._rollback: the original error is what callers need.
    with contextlib.suppress(Exception):
        db.rollback()


def _write_in_thread(db: sqlite3.Connection, batch: list[_Op]) -> tuple[list[Any], int]:
    """_BatchWriter._write for a batch of statements, appends and thread transactions, in the calling thread."""
    results: list[Any] = []
    rows = 0
    for group in _groups(batch):
        first = group[0]
        if isinstance(first, _ThreadTransaction):
            result, written = first.work(db)
            results.append(result)
            rows += written
            continue
        if isinstance(first, _Statement):
            params = [op.params for op in group if isinstance(op, _Statement)]
            db.executemany(first.sql, params)
            results.extend([None] * len(group))
            rows += len(params)
            continue
        appends = [op for op in group if isinstance(op, _AppendBatches)]
        batches = [b for op in appends for b in op.batches]
        skipped = _write_journal(db, batches)
        at = 0
        for op in appends:
            results.append([i for per in skipped[at : at + len(op.batches)] for i in per])
            at += len(op.batches)
        rows += sum(len(b.ids) for b in batches) - sum(len(per) for per in skipped)
    return results, rows


# --- the journal (journal.py decides; these statements read and write) ------------------------------------


def _write_offer(
    db: sqlite3.Connection, batches: list[EncodedBatch], steps: list[tuple[str, list[Row]]]
) -> list[list[str]]:
    skipped = _write_journal(db, batches) if batches else []
    for sql, rows in steps:
        db.executemany(sql, rows)
    return skipped


async def _in_thread(conn: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(sqlite3_connection, *args)`` on aiosqlite's thread, in the open transaction: one hop."""
    return await conn._execute(fn, conn._conn, *args)  # type: ignore[no-untyped-call]


_INSERT_BATCH = (
    "INSERT INTO signal_batches (device_id, session_id, first_time, last_time, received_at, count, min_id, max_id,"
    " run, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_MARK = (
    "INSERT INTO signal_marks (device_id, high) VALUES (?, ?)"
    " ON CONFLICT (device_id) DO UPDATE SET high = excluded.high"
)
_INSERT_EXACT = "INSERT INTO signal_ids (device_id, signal_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
# The run that could hold id ?2: runs of a device cover disjoint id ranges, so it is the first ending at or
# after it (run = 1 spelled out so the partial index serves it).
_RUN_FOR_ID = (
    "SELECT rowid, min_id, max_id, body FROM signal_batches WHERE device_id = ? AND run = 1 AND max_id >= ?"
    " ORDER BY max_id LIMIT 1"
)
# What the readers fetch of a stored batch (journal.BatchRow), from signal_batches AS b.
_BATCH_COLS = "b.rowid, b.device_id, b.session_id, b.received_at, b.last_time, b.body"


async def _append_journal(conn: aiosqlite.Connection, batches: list[EncodedBatch]) -> list[list[str]]:
    """Dedupe and store batches inside the writer's transaction, in one hop to the database thread (each
    aiosqlite call is a thread hop, which is what made earlier designs slow): the ids skipped per batch."""
    if not batches:
        return []
    # aiosqlite runs the function on its connection's own thread, after everything queued before it.
    skipped: list[list[str]] = await _in_thread(conn, _write_journal, batches)
    return skipped


def _write_journal(db: sqlite3.Connection, batches: list[EncodedBatch]) -> list[list[str]]:
    highs: dict[str, str] = {}
    for device_id in {b.device_id for b in batches}:
        row = db.execute("SELECT high FROM signal_marks WHERE device_id = ?", (device_id,)).fetchone()
        if row is not None:
            highs[device_id] = str(row[0])
    need = lookup_needed(batches, highs)
    known = {d: _stored_ids(db, d, ids) for d, ids in need.items()}
    decided = plan(batches, highs, known)
    db.executemany(
        _INSERT_BATCH,
        [
            (b.device_id, b.session_id, b.first_time, b.last_time, b.received_at, len(b.ids), b.min_id, b.max_id,
             int(run), b.body)
            for b, run in decided.stored
        ],
    )  # fmt: skip
    db.executemany(_UPSERT_MARK, list(decided.marks.items()))
    if decided.exact:
        db.executemany(_INSERT_EXACT, decided.exact)
    return decided.skipped


def _stored_ids(db: sqlite3.Connection, device_id: str, ids: set[str]) -> set[str]:
    """Which of ``ids`` the device stored: in signal_ids, or inside the run that covers them."""
    found: set[str] = set()
    ordered = sorted(ids)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start : start + 500]
        sql = f"SELECT signal_id FROM signal_ids WHERE device_id = ? AND signal_id IN ({', '.join('?' * len(chunk))})"
        found.update(str(r[0]) for r in db.execute(sql, (device_id, *chunk)))
    bodies: dict[int, str] = {}
    covered: tuple[str, str] | None = None
    for signal_id in ordered:
        if covered is not None and covered[0] <= signal_id <= covered[1]:
            continue  # inside the run fetched for an earlier id
        row = db.execute(_RUN_FOR_ID, (device_id, signal_id)).fetchone()
        if row is None:
            break  # no run ends at or after this id, nor after any larger one
        bodies[int(row[0])] = str(row[3])
        covered = (str(row[1]), str(row[2]))
    return found | in_bodies(bodies.values(), ids)


# --- store ----------------------------------------------------------------------------------------------


async def _configure(conn: aiosqlite.Connection, *, read_only: bool) -> None:
    # busy_timeout first so the journal-mode switch waits for other processes instead of failing.
    await conn.execute(_WAIT_FOR_LOCKS)
    await conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode survives application crashes; only an OS crash/power loss can drop the last commits.
    await conn.execute("PRAGMA synchronous = NORMAL")
    await conn.execute("PRAGMA foreign_keys = ON")
    # Deleted content is overwritten with zeros, so an erased user's strings do not linger in free pages (some
    # builds default to this, e.g. Debian's; stock SQLite does not).
    await conn.execute("PRAGMA secure_delete = ON")
    if read_only:
        await conn.execute("PRAGMA query_only = ON")


async def _ensure_schema(conn: aiosqlite.Connection) -> None:
    version = await _user_version(conn)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"database schema version {version} is newer than supported ({SCHEMA_VERSION})")
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        package = importlib.resources.files(__name__.rpartition(".")[0])
        script = package.joinpath("schema.sql").read_text(encoding="utf-8")
        # One transaction so a crash never leaves a half-created schema marked as current. Statements use
        # IF NOT EXISTS, so two processes racing here both succeed.
        try:
            bump = f"PRAGMA user_version = {SCHEMA_VERSION};"
            await conn.executescript(f"BEGIN IMMEDIATE;\n{script}\n{bump}\nCOMMIT;")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.rollback()
            raise
        return
    await _migrate(conn)


async def _user_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def _migration_step(conn: aiosqlite.Connection, statement: str) -> None:
    """One migration statement. Adding a column that is already there is done (SQLite has no ADD COLUMN IF NOT
    EXISTS): so is every CREATE ... IF NOT EXISTS, and a step may meet a table created by a newer schema.sql."""
    try:
        await conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if not (statement.startswith("ALTER TABLE") and "duplicate column name" in str(exc)):
            raise


async def _migrate(conn: aiosqlite.Connection) -> None:
    """Move an older database forward, one version per step, all in one transaction."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = await _user_version(conn)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                await _migration_step(conn, statement)
        await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await conn.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.rollback()
        raise
    log.info("storage.migrated", from_version=version, to_version=SCHEMA_VERSION)


class SqliteStore(PredictState, Slots):
    """Durable store for sessions, signals, cues and engagements. Create with ``await SqliteStore.open()``."""

    def __init__(
        self,
        writer_conn: aiosqlite.Connection,
        reader_conn: aiosqlite.Connection | None,
        max_batch: int,
        checkpoint_conn: aiosqlite.Connection | None = None,
        decider: SoleDecider | None = None,
    ) -> None:
        self._writer_conn = writer_conn
        # Opened by a server that decides offers: whether it is the only one on this file (sole_decider.py).
        self._decider = decider
        self._reader_conn = reader_conn
        self._checkpoint_conn = checkpoint_conn
        # With a single connection a read could run between the writer's BEGIN and COMMIT and see
        # uncommitted rows, so reads and write transactions take turns on this lock.
        self._shared_lock: asyncio.Lock | None = asyncio.Lock() if reader_conn is None else None
        guard: contextlib.AbstractAsyncContextManager[Any] = self._shared_lock or contextlib.nullcontext()
        self._writer = _BatchWriter(
            writer_conn, max_batch, guard, inline=reader_conn is not None, checkpointer=checkpoint_conn
        )
        self._closing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, max_batch: int = 1000, decider: bool = False) -> SqliteStore:
        """Open (creating if needed) the database at ``path``; ``":memory:"`` is a private in-memory one.

        ``decider``: a server that decides offers opens it so, and may then skip an offer guard's read while
        no other server shares the file (storage/sole_decider.py); tools that only read or repair do not.
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        location = os.fspath(path)
        # Autocommit mode: the writer issues BEGIN/COMMIT itself, and reads never hold a snapshot open.
        writer = await aiosqlite.connect(location, isolation_level=None, check_same_thread=False)
        reader: aiosqlite.Connection | None = None
        checkpointer: aiosqlite.Connection | None = None
        sole: SoleDecider | None = None
        try:
            await _configure(writer, read_only=False)
            await _ensure_schema(writer)
            if decider:
                sole = await SoleDecider.join(writer, location)
            # An in-memory database is private to its connection, so it has to share the writer's.
            if location not in (":memory:", ""):
                # The writer checkpoints, not its commits (_BatchWriter._start_checkpoint and _catch_up), the
                # bulk of each checkpoint from this connection of its own, on its own thread.
                await writer.execute("PRAGMA wal_autocheckpoint = 0")
                reader = await aiosqlite.connect(location, isolation_level=None)
                await _configure(reader, read_only=True)
                checkpointer = await aiosqlite.connect(location, isolation_level=None, check_same_thread=False)
                await _configure(checkpointer, read_only=False)
        except BaseException:
            for conn in (checkpointer, reader):
                if conn is not None:
                    await conn.close()
            await writer.close()
            if sole is not None:
                sole.close()
            raise
        return cls(writer, reader, max_batch, checkpointer, sole)

    async def close(self) -> None:
        """Commit everything already submitted, then close. Safe to call more than once."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        try:
            await self._writer.stop()
        finally:
            for conn in (self._checkpoint_conn, self._reader_conn):
                if conn is not None:
                    await conn.close()
            await self._writer_conn.close()
            if self._decider is not None:
                self._decider.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def stats(self) -> StoreStats:
        return self._writer.stats()

    # Writes. Records are encoded here, in the caller's task, so a bad value (e.g. a payload that is not
    # JSON-serialisable) raises straight to its caller and never reaches a shared transaction.

    async def save_session(self, rec: SessionRecord) -> None:
        await self._writer.execute(_UPSERT_SESSION, _session_row(rec))

    async def end_session(self, session_id: str, ended_at: float) -> None:
        """Record the end time; a no-op for an unknown session."""
        await self._writer.execute(_END_SESSION, (ended_at, session_id))

    async def append_signals(self, rows: Sequence[SignalRecord]) -> list[str]:
        """Append signals to the journal (one stored batch per run of one device and session); returns, once
        committed, the ids skipped as already stored.

        A (device, signal id) is stored once, however long ago it was first sent: checked against the
        device's high-water mark and stored ids in the same transaction (journal.py). The core's in-memory
        window of recent ids only saves the trip for the common resend.
        """
        if not rows:
            return []
        skipped: list[str] = await self._writer.append_batches(batches_from_records(rows))
        return skipped

    async def append_batch(self, batch: JournalBatch) -> list[str]:
        """Append one batch as one journal row; returns, once committed, the ids skipped as already stored."""
        return await self.append_journal((batch,))

    async def append_journal(self, batches: Sequence[JournalBatch]) -> list[str]:
        """Batches as one journal row each, in one transaction; once committed, the ids skipped as stored."""
        encoded = encode_all(batches)
        if not encoded:
            return []
        skipped: list[str] = await self._writer.append_batches(encoded)
        return skipped

    async def commit_offer(self, work: OfferCommit) -> OfferResult:
        """Signals, cues, cue statuses, decisions, milestones and cue.offered webhook rows of one evaluation,
        in one transaction; guarded cues are checked against the subject's stored cues first (the single
        writer is the lock). A guard whose subject this process remembers whole is not read while no other
        server shares the file (sole_decider.py): the read could only agree with the arbiter's memory."""
        batches = encode_work(work.signals, work.batches)
        encoded_cues = {r.cue_id: _cue_row(r) for r in work.cues}
        statuses: list[Row] = [(status, at, "", cue_id) for cue_id, status, at in work.statuses]
        milestones = list(map(_milestone_row, work.milestones))
        guards = list(work.guards)
        fires = [(float(due), timer_id, float(due)) for timer_id, due in work.fires]
        if not (
            batches or statuses or milestones or work.cues or work.decisions or work.webhooks or work.timers or fires
        ):
            return OfferResult([], {})
        signals = sum(len(b.ids) for b in batches)
        now = max((c.created_at for c in work.cues), default=0.0)

        def checked(db: sqlite3.Connection) -> dict[str, tuple[str, str]]:
            """The timers fired and the guards checked, on the database thread (OfferGuard.check only reads the
            history it is given, so it may run there)."""
            refused: dict[str, tuple[str, str]] = {}
            for fire in fires:
                if db.execute(MARK_DUE_DONE, fire).rowcount < 1:
                    refused.update((c.cue_id, FIRED_ELSEWHERE) for c in work.cues)
            alone: bool | None = None  # asked once per commit, and only if a guard could be skipped
            for guard in guards:
                if guard.memory_whole:
                    if alone is None:
                        alone = self._decider is not None and self._decider.alone(db)
                    if alone:
                        continue  # memory holds every stored cue of the subject: the read can only agree
                found = db.execute(_SUBJECT_HISTORY, (guard.subject, guard.since, guard.session_id)).fetchall()
                reason = guard.check([_history_cue(r) for r in found])
                if reason is not None:
                    refused[guard.cue_id] = reason
            return refused

        def steps_of(kept: OfferCommit) -> list[tuple[str, list[Row]]]:
            return [
                (sql, rows)
                for sql, rows in (
                    (_SET_CUE_STATUS, statuses),
                    (_UPSERT_CUE, [encoded_cues[c.cue_id] for c in kept.cues]),
                    (_INSERT_DECISION, [_decision_row(r) for r in kept.decisions]),
                    (_INSERT_MILESTONE, milestones),
                    (_INSERT_WEBHOOK, [_webhook_row(r) for r in kept.webhooks]),
                    (ARM_TIMER, [arm_row(t) for t in kept.timers]),
                )
                if rows
            ]

        def run_in_thread(db: sqlite3.Connection) -> tuple[OfferResult, int]:
            # No slots to reserve: the whole unit is plain statements, written in the writer batch's one hop.
            refused = checked(db)
            steps = steps_of(without_refused(work, refused))
            skipped = [i for per in _write_offer(db, batches, steps) for i in per]
            return OfferResult(skipped, refused, {}), signals + sum(len(rows) for _, rows in steps)

        async def run(conn: aiosqlite.Connection) -> tuple[OfferResult, int]:
            refused = await _in_thread(conn, checked)
            slotted = await self.reserve_offer_slots(_SqliteTxn(conn), work.slots, refused, now)
            steps = steps_of(without_refused(work, refused))
            # Every write of the evaluation in one call on the connection's thread (the journal's dedupe and
            # insert included): a hop per statement cost more of the event loop than the statements themselves.
            skipped = [i for per in await _in_thread(conn, _write_offer, batches, steps) for i in per]
            return OfferResult(skipped, refused, slotted), signals + sum(len(rows) for _, rows in steps)

        size = signals + len(work.cues) + len(work.decisions) + len(statuses) + len(milestones)
        result: OfferResult
        if work.slots:
            result = await self._writer.transaction(run, size)
        else:
            result = await self._writer.thread_transaction(run_in_thread, size)
        return result

    async def merge_subject(self, source: str, target: str) -> None:
        """The source subject's cues now count for the target (an anonymous device identified as a user)."""
        if source != target:
            await self._writer.execute("UPDATE cues SET subject = ? WHERE subject = ?", (target, source))

    async def accept_cue(
        self,
        cue_id: str,
        responded_at: float,
        engagement: EngagementRecord,
        button_id: str = "",
        *,
        webhooks: Sequence[WebhookRecord] = (),
        owner: str = "",
        timers: Sequence[TimerRecord] = (),
    ) -> AcceptOutcome:
        """The cue becomes accepted and its engagement is stored, together with the webhook rows reporting
        both and its deadline rows; idempotent by cue id (a repeat writes nothing, its webhook rows neither)."""
        row = _engagement_row(engagement)
        hooks = [_webhook_row(r) for r in webhooks]
        by_cue = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE cue_id = ? ORDER BY created_at, rowid LIMIT 1"

        async def run(conn: aiosqlite.Connection) -> tuple[AcceptOutcome, int]:
            found = list(await conn.execute_fetchall("SELECT status FROM cues WHERE cue_id = ?", (cue_id,)))
            status = str(found[0][0]) if found else ""
            if status not in ("offered", "accepted"):
                return AcceptOutcome(False, status, None), 0
            existing = list(await conn.execute_fetchall(by_cue, (cue_id,)))
            if existing:
                # Accepted before (a resent accept, a replay): the stored engagement stands.
                return AcceptOutcome(False, "accepted", _engagement_from(existing[0])), 0
            await conn.execute(_SET_CUE_STATUS, ("accepted", responded_at, button_id, cue_id))
            await conn.execute(_UPSERT_ENGAGEMENT, row)
            if owner:
                await conn.execute(_SET_OWNER, (engagement.engagement_id, owner, float(responded_at)))
            if timers:
                await conn.executemany(ARM_TIMER, [arm_row(t) for t in timers])
            if hooks:
                await conn.executemany(_INSERT_WEBHOOK, hooks)
            return AcceptOutcome(True, "accepted", engagement), 2 + len(hooks) + len(timers)

        outcome: AcceptOutcome = await self._writer.transaction(run, 2 + len(hooks))
        return outcome

    async def save_cue(self, rec: CueRecord) -> None:
        await self._writer.execute(_UPSERT_CUE, _cue_row(rec))

    async def set_cue_status(
        self,
        cue_id: str,
        status: str,
        responded_at: float,
        button_id: str = "",
        *,
        webhooks: Sequence[WebhookRecord] = (),
        timer: str = "",
    ) -> bool:
        """Update a cue's status (and the button that answered it); a no-op for an unknown cue.

        With ``timer`` (the deadline this fires, e.g. its expiry): only a cue still offered changes, and only
        if the timer had not fired yet; the timer is marked done in the same transaction. False: nothing was
        written but perhaps the timer's row (fired elsewhere before, or the cue was settled meanwhile).
        """
        params = (status, responded_at, button_id, cue_id)
        if timer:
            return await self._fire(timer, responded_at, _SET_CUE_STATUS + " AND status = 'offered'", params, webhooks)
        await self._with_outbox(_SET_CUE_STATUS, params, webhooks)
        return True

    async def _fire(self, timer: str, at: float, sql: str, params: Row, webhooks: Sequence[WebhookRecord]) -> bool:
        """Fire `timer` once: mark it done and apply the effect (`sql` and its webhook rows) in one transaction;
        a timer already done writes nothing (timer_rows.py)."""
        hooks = [_webhook_row(r) for r in webhooks]

        async def run(conn: aiosqlite.Connection) -> tuple[bool, int]:
            marked = await conn.execute(MARK_TIMER_DONE, (at, timer))
            if marked.rowcount < 1:
                inserted = await conn.execute(INSERT_DONE_TIMER, done_row(timer, at))
                if inserted.rowcount < 1:
                    return False, 0
            cursor = await conn.execute(sql, params)
            if cursor.rowcount < 1:
                return False, 1
            if hooks:
                await conn.executemany(_INSERT_WEBHOOK, hooks)
            return True, 2 + len(hooks)

        fired: bool = await self._writer.transaction(run, 2 + len(hooks))
        return fired

    # -- timers as rows (timer_rows.py) --------------------------------------------------------------

    async def arm_timers(self, rows: Sequence[TimerRecord]) -> None:
        """Store deadlines (or move armed ones, or hand them to another owner); a done one stays done."""
        for row in rows:
            await self._writer.execute(ARM_TIMER, arm_row(row))

    async def claim_timers(
        self, holder: str, now: float, *, hold: float, own_after: float, limit: int = 100
    ) -> list[TimerRecord]:
        """Due armed timers whose owner is gone (or `holder`'s own, `own_after` seconds overdue), not
        claimed by another within its hold: now claimed by `holder` for `hold` seconds. One process, one
        writer: a claim needs no row lock here."""
        sql = CLAIM_TIMERS("")
        params = (holder, now + hold, now, now, holder, now - own_after, now - hold, limit)

        async def run(conn: aiosqlite.Connection) -> tuple[list[TimerRecord], int]:
            rows = [timer_from(r) for r in await conn.execute_fetchall(sql, params)]
            return sorted(rows, key=lambda t: (t.due_at, t.timer_id)), len(rows)

        claimed: list[TimerRecord] = await self._writer.transaction(run)
        return claimed

    async def finish_timer(self, timer_id: str, at: float) -> bool:
        """Mark a timer done with no effect (its effect was moot); True if this call did."""
        return await self._mark_done(MARK_TIMER_DONE, (at, timer_id), timer_id, at)

    async def finish_due(self, timer_id: str, due_at: float, at: float) -> bool:
        """Mark a timer done for that due time only; True if this call did."""
        return await self._mark_done(MARK_DUE_DONE, (at, timer_id, due_at), timer_id, at)

    async def _mark_done(self, mark: str, params: tuple[Any, ...], timer_id: str, at: float) -> bool:
        """`mark` the armed row done, or store the timer as done when no row matched; True if this call did."""

        async def run(conn: aiosqlite.Connection) -> tuple[bool, int]:
            marked = await conn.execute(mark, params)
            if marked.rowcount < 1:
                inserted = await conn.execute(INSERT_DONE_TIMER, done_row(timer_id, at))
                return inserted.rowcount > 0, 1
            return True, 1

        done: bool = await self._writer.transaction(run)
        return done

    async def get_timer(self, timer_id: str) -> TimerRecord | None:
        rows = await self._fetch(TIMER_BY_ID, (timer_id,))
        return timer_from(rows[0]) if rows else None

    async def timers(self) -> list[TimerRecord]:
        """Every stored timer (tests, diagnostics)."""
        return [timer_from(r) for r in await self._fetch(f"SELECT {', '.join(TIMER_COLS)} FROM timers", ())]

    async def purge_timers(self, due_before: float) -> None:
        await self._writer.execute(PURGE_TIMERS, (due_before,))

    # -- the delivery outbox (delivery_rows.py) ---------------------------------------------------------

    async def enqueue_delivery(
        self, recipient: str, body: bytes, now: float, *, engagement_id: str = "", device_id: str = ""
    ) -> int:
        params = (recipient, engagement_id, device_id, body, now)

        async def run(conn: aiosqlite.Connection) -> tuple[int, int]:
            rows = list(await conn.execute_fetchall(ENQUEUE_DELIVERY, params))
            return int(rows[0][0]), 1

        row_id: int = await self._writer.transaction(run)
        return row_id

    async def claim_deliveries(self, recipient: str, *, limit: int = 500) -> list[tuple[int, bytes]]:
        sql = CLAIM_DELIVERIES("")

        async def run(conn: aiosqlite.Connection) -> tuple[list[tuple[int, bytes]], int]:
            rows = sorted((int(r[0]), bytes(r[1])) for r in await conn.execute_fetchall(sql, (recipient, limit)))
            return rows, len(rows)

        claimed: list[tuple[int, bytes]] = await self._writer.transaction(run)
        return claimed

    async def delivery_recipients(self) -> list[str]:
        return [str(r[0]) for r in await self._fetch(DELIVERY_RECIPIENTS, ())]

    async def expire_deliveries(self, before: float) -> int:
        async def run(conn: aiosqlite.Connection) -> tuple[int, int]:
            cursor = await conn.execute(EXPIRE_DELIVERIES, (before,))
            return max(cursor.rowcount, 0), max(cursor.rowcount, 0)

        expired: int = await self._writer.transaction(run)
        return expired

    async def save_feedback(self, rec: FeedbackRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None:
        """Store a rating; a second answer for the same engagement is ignored, and so are its webhook rows."""
        await self._with_outbox(
            _INSERT_FEEDBACK, _feedback_row(rec), webhooks, only_if_written=True
        )

    async def _with_outbox(
        self, sql: str, params: Row, webhooks: Sequence[WebhookRecord], *, only_if_written: bool = False
    ) -> None:
        """One state change and the outbox rows reporting it, in one transaction: both durable or neither.

        Without rows it stays a plain statement, merged with others into the writer's batches.
        ``only_if_written``: the rows are added only when the statement changed a row (not a repeat).
        """
        if not webhooks:
            await self._writer.execute(sql, params)
            return
        hooks = [_webhook_row(r) for r in webhooks]

        def run(db: sqlite3.Connection) -> tuple[None, int]:
            cursor = db.execute(sql, params)
            if only_if_written and cursor.rowcount < 1:
                return None, 0
            db.executemany(_INSERT_WEBHOOK, hooks)
            return None, 1 + len(hooks)

        await self._writer.thread_transaction(run, 1 + len(hooks))

    async def set_variant_stopped(
        self, scenario_id: str, variant_id: str, stopped: bool, reason: str, at: float
    ) -> None:
        await self._writer.execute(_UPSERT_SWITCH, (scenario_id, variant_id, int(stopped), reason, at))

    # -- operations switches and the webhook outbox ------------------------------------------------

    async def save_switch(self, rec: SwitchRecord) -> None:
        """Set an operations switch (the runtime pause, a scenario's enable/disable); durable when awaited."""
        await self._writer.execute(_UPSERT_OPS_SWITCH, (rec.scope, rec.scope_id, int(rec.on), rec.reason, rec.time))

    async def switches(self) -> list[SwitchRecord]:
        rows = await self._fetch(
            "SELECT scope, scope_id, is_on, reason, time FROM switches ORDER BY scope, scope_id", ()
        )
        return [SwitchRecord(str(r[0]), str(r[1]), bool(r[2]), str(r[3]), float(r[4])) for r in rows]

    # -- the replicas registry ---------------------------------------------------------------------------

    async def save_replica(self, rec: ReplicaRecord) -> None:
        await self._writer.execute(_UPSERT_REPLICA, _replica_row(rec))

    async def replicas(self) -> list[ReplicaRecord]:
        rows = await self._fetch(f"SELECT {', '.join(_REPLICA_COLS)} FROM replicas ORDER BY started_at, replica_id", ())
        return [_replica_from(r) for r in rows]

    async def forget_replica(self, replica_id: str) -> None:
        await self._writer.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    async def forget_replicas_seen_before(self, before: float) -> None:
        await self._writer.execute("DELETE FROM replicas WHERE last_seen < ?", (before,))

    async def enqueue_webhooks(self, rows: Sequence[WebhookRecord]) -> None:
        """Add deliveries to the outbox; returns once they are committed (idempotent by delivery id)."""
        for rec in rows:
            await self._writer.execute(_INSERT_WEBHOOK, _webhook_row(rec))

    async def due_webhooks(self, now: float, *, limit: int = 100) -> list[WebhookRecord]:
        """Pending deliveries whose next attempt is due, oldest first."""
        due = "state = 'pending' AND next_attempt_at <= ?"
        sql = f"{_WEBHOOK_SELECT} WHERE {due} ORDER BY next_attempt_at, rowid LIMIT ?"
        return [WebhookRecord(*r) for r in await self._fetch(sql, (now, limit))]

    async def next_webhook_due(self) -> float | None:
        rows = await self._fetch("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = 'pending'", ())
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def webhook_attempted(
        self, delivery_id: str, *, delivered: bool, attempts: int, next_attempt_at: float, error: str, dead: bool
    ) -> None:
        """After an attempt: delivered rows leave the outbox; failed ones wait for their next try or are dead."""
        if delivered:
            await self._writer.execute("DELETE FROM webhook_outbox WHERE delivery_id = ?", (delivery_id,))
            return
        state = "dead" if dead else "pending"
        sql = (
            "UPDATE webhook_outbox SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ? "
            "WHERE delivery_id = ?"
        )
        await self._writer.execute(sql, (state, attempts, next_attempt_at, error, delivery_id))

    async def dead_webhooks(self, *, limit: int = 100) -> list[WebhookRecord]:
        """The dead-letter list: deliveries that ran out of attempts or were refused, newest first."""
        sql = f"{_WEBHOOK_SELECT} WHERE state = 'dead' ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return [WebhookRecord(*r) for r in await self._fetch(sql, (limit,))]

    async def redeliver_webhook(self, delivery_id: str, now: float) -> bool:
        """Put a delivery (dead, or pending later) back to be tried now, with fresh attempts; False if unknown."""
        found = await self._fetch("SELECT 1 FROM webhook_outbox WHERE delivery_id = ?", (delivery_id,))
        if not found:
            return False
        sql = "UPDATE webhook_outbox SET state = 'pending', attempts = 0, next_attempt_at = ? WHERE delivery_id = ?"
        await self._writer.execute(sql, (now, delivery_id))
        return True

    async def save_engagement(
        self, rec: EngagementRecord, *, webhooks: Sequence[WebhookRecord] = (), timer: str = "", settle: str = ""
    ) -> bool:
        """Upsert the engagement with its webhook rows; with ``timer``, only if that timer had not fired yet
        (it is marked done in the same transaction). ``settle``: a timer the change makes moot, marked done
        with it. False: nothing was written."""
        if timer:
            return await self._fire(timer, self._fired_at(rec), _UPSERT_ENGAGEMENT, _engagement_row(rec), webhooks)
        if settle:
            hooks = [_webhook_row(r) for r in webhooks]
            at = float(rec.assigned_at or rec.created_at)

            async def run(conn: aiosqlite.Connection) -> tuple[None, int]:
                await conn.execute(_UPSERT_ENGAGEMENT, _engagement_row(rec))
                await conn.execute(MARK_TIMER_DONE, (at, settle))
                if hooks:
                    await conn.executemany(_INSERT_WEBHOOK, hooks)
                return None, 2 + len(hooks)

            await self._writer.transaction(run, 2 + len(hooks))
            return True
        await self._with_outbox(_UPSERT_ENGAGEMENT, _engagement_row(rec), webhooks)
        return True

    @staticmethod
    def _fired_at(rec: EngagementRecord) -> float:
        return float(rec.callback_at or rec.created_at)

    async def save_chat(self, rec: ChatRecord) -> None:
        await self._writer.execute(_INSERT_CHAT, (rec.message_id, rec.engagement_id, rec.sender, rec.text, rec.time))

    async def save_transfer(self, rec: TransferRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None:
        await self._with_outbox(_INSERT_TRANSFER, _transfer_row(rec), webhooks)

    async def save_participation(self, rec: ParticipationRecord) -> None:
        # One row per joining, completed in place when the associate leaves.
        await self._writer.execute(_UPSERT_PART, _part_row(rec))

    async def transfers_for(self, engagement_id: str) -> list[TransferRecord]:
        sql = f"{_select('engagement_transfers', _TRANSFER_COLS)} WHERE engagement_id = ? ORDER BY time, rowid"
        return [TransferRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def participations_for(self, engagement_id: str) -> list[ParticipationRecord]:
        sql = f"{_select('engagement_participants', _PART_COLS)} WHERE engagement_id = ? ORDER BY joined_at, rowid"
        return [ParticipationRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def save_channel_change(self, rec: ChannelChangeRecord) -> None:
        row = (rec.engagement_id, rec.time, rec.request_id, rec.from_channel, rec.to_channel, rec.requested_by)
        await self._writer.execute(_INSERT_CHANGE, (*row, int(rec.accepted)))

    async def save_decision(self, rec: DecisionRecord) -> None:
        await self._writer.execute(_INSERT_DECISION, _decision_row(rec))

    async def save_milestone(self, rec: MilestoneRecord) -> None:
        await self._writer.execute(_INSERT_MILESTONE, _milestone_row(rec))

    # Reads bypass the write queue. They run in autocommit mode, so each sees everything committed so far,
    # which includes every write whose coroutine has returned.

    async def _execute(self, sql: str, params: Row) -> None:
        await self._writer.execute(sql, params)

    async def _fetch(self, sql: str, params: Row) -> list[sqlite3.Row]:
        if self._closing is not None:
            raise StoreClosedError("store is closed")
        if self._reader_conn is not None:
            return list(await self._reader_conn.execute_fetchall(sql, params))
        assert self._shared_lock is not None
        async with self._shared_lock:
            return list(await self._writer_conn.execute_fetchall(sql, params))

    async def _slot_transaction(self, work: Callable[[SlotTxn], Awaitable[tuple[Any, int]]]) -> Any:
        async def run(conn: aiosqlite.Connection) -> tuple[Any, int]:
            result: tuple[Any, int] = await work(_SqliteTxn(conn))
            return result

        return await self._writer.transaction(run)

    def _engagement_upsert(self, record: EngagementRecord) -> tuple[str, Sequence[Any]]:
        return _UPSERT_ENGAGEMENT, _engagement_row(record)

    async def _slot_read(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._fetch(sql, args))

    # -- recovery after a restart --------------------------------------------------------------------

    async def open_cue(self, device_id: str) -> CueRecord | None:
        """The device's newest cue still on offer (status offered), if any."""
        sql = (
            f"{_select('cues', _CUE_COLS)} WHERE device_id = ? AND status = 'offered' "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1"
        )
        rows = await self._fetch(sql, (device_id,))
        return _cue_from(rows[0]) if rows else None

    async def cues_for_session(self, session_id: str) -> list[CueRecord]:
        sql = f"{_select('cues', _CUE_COLS)} WHERE session_id = ? ORDER BY created_at, rowid"
        return [_cue_from(r) for r in await self._fetch(sql, (session_id,))]

    async def recent_handle_times(self, per_queue: int) -> list[tuple[str, float]]:
        sql = """
            SELECT queue, ended_at - assigned_at FROM (
                SELECT queue, assigned_at, ended_at,
                    ROW_NUMBER() OVER (PARTITION BY queue ORDER BY ended_at DESC) AS n
                FROM engagements
                WHERE state = 'ended' AND assigned_at IS NOT NULL AND ended_at IS NOT NULL
            ) AS recent WHERE n <= ? ORDER BY queue, ended_at"""
        return [(str(r[0]), float(r[1])) for r in await self._fetch(sql, (per_queue,))]

    async def repair_unfinished_accepts(self, now: float) -> tuple[int, int]:
        orphan = "status = 'accepted' AND NOT EXISTS (SELECT 1 FROM engagements AS e WHERE e.cue_id = cues.cue_id)"

        async def run(conn: aiosqlite.Connection) -> tuple[tuple[int, int], int]:
            again = await conn.execute(
                f"UPDATE cues SET status = 'offered', responded_at = NULL, button_id = '' "
                f"WHERE {orphan} AND expires_at > ?",
                (now,),
            )
            lost = await conn.execute(f"UPDATE cues SET status = 'lost' WHERE {orphan}")
            counts = (max(again.rowcount, 0), max(lost.rowcount, 0))
            return counts, sum(counts)

        repaired: tuple[int, int] = await self._writer.transaction(run)
        return repaired

    async def open_engagements(self) -> list[EngagementRecord]:
        """Engagements not finished when the process stopped (queued, assigned, or a callback still to
        make), oldest first."""
        sql = (
            f"{_select('engagements', _ENGAGEMENT_COLS)} "
            "WHERE state IN ('queued', 'assigned', 'callback_requested') "
            "ORDER BY created_at, rowid"
        )
        return [_engagement_from(r) for r in await self._fetch(sql, ())]

    async def recent_signal_ids(self, device_id: str, *, limit: int) -> list[str]:
        return [r.signal_id for r in await self._newest("b.device_id = ?", (device_id,), limit)]

    # -- privacy ------------------------------------------------------------------------------------

    async def forget_session_journey(self, session_id: str) -> None:
        """Drop a session's signals (consent none: nothing persists beyond the session)."""
        await self._writer.execute("DELETE FROM signal_batches WHERE session_id = ?", (session_id,))

    async def forget_unconsented(self, *, ended_before: float) -> None:
        """Drop journeys of consent-none sessions that ended (or were left open) before a time."""
        sessions = "SELECT session_id FROM sessions WHERE consent = 'none' AND COALESCE(ended_at, started_at) < ?"
        await self._writer.execute(f"DELETE FROM signal_batches WHERE session_id IN ({sessions})", (ended_before,))

    async def purge_journey(self, older_than: float) -> int:
        """Retention: delete signals and decisions older than ``older_than`` (epoch seconds).

        Whole batches go when their newest signal is older; a batch with signals on both sides keeps only
        the newer ones (rewritten in place). Returns the signals deleted.
        """

        async def run(conn: aiosqlite.Connection) -> tuple[int, int]:
            rows = await conn.execute_fetchall(
                "SELECT COALESCE(SUM(count), 0) FROM signal_batches WHERE last_time < ?", (older_than,)
            )
            removed = int(next(iter(rows))[0])
            await conn.execute("DELETE FROM signal_batches WHERE last_time < ?", (older_than,))
            straddling = await conn.execute_fetchall(
                "SELECT rowid, body FROM signal_batches WHERE first_time < ?", (older_than,)
            )
            for rowid, body in straddling:
                cut = trimmed(str(body), older_than)
                if cut is not None:
                    kept, dropped, first = cut
                    await conn.execute(
                        "UPDATE signal_batches SET body = ?, count = count - ?, first_time = ? WHERE rowid = ?",
                        (kept, dropped, first, rowid),
                    )
                    removed += dropped
            await conn.execute("DELETE FROM decisions WHERE time < ?", (older_than,))
            return removed, removed

        removed: int = await self._writer.transaction(run)
        return removed

    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        """Everything stored about one user, as plain data (right of access)."""
        subject = f"user:{user_id}"
        out: dict[str, list[dict[str, Any]]] = {}
        for table, sql, params in _user_queries(user_id, subject):
            columns = [str(c[1]) for c in await self._fetch(f"PRAGMA table_info({table})", ())]
            out[table] = [_plain(columns, r) for r in await self._fetch(sql, params)]
        return out

    async def erase_user(self, user_id: str) -> dict[str, int]:
        """Delete everything stored about one user (right to erasure); returns rows deleted per table.

        That is the user's sessions with their journeys, cues, decisions and engagements (with chat, channel
        changes, transfers, participants and feedback), and the anonymous sessions of the same devices: what
        the device did before the user signed in. One transaction. Deleted content is overwritten
        (``secure_delete``); ``checkpoint()`` then empties the WAL of it. "signals" counts signals, deleted
        as the journal rows (batches) holding them.
        """
        subject = f"user:{user_id}"

        async def run(conn: aiosqlite.Connection) -> tuple[dict[str, int], int]:
            counts: dict[str, int] = {}
            for table, where in _USER_ROWS:
                params = _user_params(where, user_id, subject)
                if table == "signals":
                    found = await conn.execute_fetchall(
                        f"SELECT COALESCE(SUM(count), 0) FROM signal_batches WHERE {where}", params
                    )
                    counts[table] = int(next(iter(found))[0])
                    await conn.execute(f"DELETE FROM signal_batches WHERE {where}", params)
                    continue
                cursor = await conn.execute(f"DELETE FROM {table} WHERE {where}", params)
                counts[table] = max(cursor.rowcount, 0)
            return counts, sum(counts.values())

        counts: dict[str, int] = await self._writer.transaction(run, len(_USER_ROWS))
        return counts

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it (after an erasure: no erased page survives
        there). False if a reader kept it from completing within the busy timeout."""
        return bool(await self._writer.checkpoint())

    # -- device credentials -------------------------------------------------------------------------

    async def device_credential(self, device_id: str) -> DeviceCredentialRecord | None:
        cols = "device_id, app_id, secret_sha256, issued_at, confirmed_at"
        rows = await self._fetch(f"SELECT {cols} FROM device_credentials WHERE device_id = ?", (device_id,))
        return DeviceCredentialRecord(*rows[0]) if rows else None

    async def issue_device_credential(self, rec: DeviceCredentialRecord) -> bool:
        """Store ``rec`` unless the device already has a credential; True if ``rec`` is the one stored.

        Two first connections racing for one device id: the writer applies one insert, the other is ignored.
        """
        await self._writer.execute(
            "INSERT INTO device_credentials (device_id, app_id, secret_sha256, issued_at, confirmed_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO NOTHING",
            (rec.device_id, rec.app_id, rec.secret_sha256, rec.issued_at, rec.confirmed_at),
        )
        stored = await self.device_credential(rec.device_id)
        return stored is not None and stored.secret_sha256 == rec.secret_sha256

    async def confirm_device_credential(self, device_id: str, at: float) -> None:
        await self._writer.execute(
            "UPDATE device_credentials SET confirmed_at = ? WHERE device_id = ? AND confirmed_at IS NULL",
            (at, device_id),
        )

    async def forget_device_credential(self, device_id: str) -> bool:
        """Delete the device's credential (operator path for a lost secret); False if it had none."""
        existed = await self.device_credential(device_id) is not None
        await self._writer.execute("DELETE FROM device_credentials WHERE device_id = ?", (device_id,))
        return existed

    # -- the admin audit trail ------------------------------------------------------------------------

    async def append_audit(self, rec: AuditRecord) -> None:
        sql, params = audit_insert(rec)
        await self._writer.execute(sql, params)

    async def audit_entries(
        self, *, since: float | None = None, actor: str = "", action: str = "", limit: int = 100
    ) -> list[AuditRecord]:
        sql, params = audit_select(since=since, actor=actor, action=action, limit=limit)
        return [audit_from_row(row) for row in await self._fetch(sql, params)]

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """A read-only ad-hoc query (reports, reporting/funnel.py); sees everything committed."""
        return await self._fetch(sql, tuple(params))

    async def journey(self, device_id: str, *, limit: int = 100, since: float | None = None) -> list[SignalRecord]:
        """The device's most recent ``limit`` signals (time >= ``since``), oldest first."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        return await self._newest("b.device_id = ?", (device_id,), limit, since)

    async def _newest(
        self, where: str, params: Row, limit: int, since: float | None = None, join: str = ""
    ) -> list[SignalRecord]:
        """The newest ``limit`` signals of the batches matching ``where`` (alias b), oldest first: batches are
        read newest last_time first, a page at a time, until no older one can change the answer."""
        newest = Newest(limit, since)
        if since is not None:
            where, params = f"{where} AND b.last_time >= ?", (*params, since)
        order = "ORDER BY b.last_time DESC, b.rowid DESC"
        sql = f"SELECT {_BATCH_COLS} FROM signal_batches AS b{join} WHERE {where} {order}"
        page, offset = 16, 0
        while not newest.done:
            rows = await self._fetch(f"{sql} LIMIT ? OFFSET ?", (*params, page, offset))
            newest.feed([(int(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]), str(r[5])) for r in rows])
            if len(rows) < page:
                break
            offset += page
            page = min(page * 2, 512)
        return newest.result()

    async def count_signals(self, device_id: str) -> int:
        rows = await self._fetch("SELECT COALESCE(SUM(count), 0) FROM signal_batches WHERE device_id = ?", (device_id,))
        return int(rows[0][0])

    async def get_session(self, session_id: str) -> SessionRecord | None:
        rows = await self._fetch(f"{_select('sessions', _SESSION_COLS)} WHERE session_id = ?", (session_id,))
        return _session_from(rows[0]) if rows else None

    async def latest_session(self, device_id: str) -> SessionRecord | None:
        sql = f"{_select('sessions', _SESSION_COLS)} WHERE device_id = ? ORDER BY started_at DESC LIMIT 1"
        rows = await self._fetch(sql, (device_id,))
        return _session_from(rows[0]) if rows else None

    async def stopped_variants(self) -> set[tuple[str, str]]:
        """(scenario_id, variant_id) of every variant switched off at runtime."""
        rows = await self._fetch("SELECT scenario_id, variant_id FROM variant_switches WHERE stopped = 1", ())
        return {(str(r[0]), str(r[1])) for r in rows}

    async def get_feedback(self, engagement_id: str) -> FeedbackRecord | None:
        sql = f"{_select('feedback', _FEEDBACK_COLS)} WHERE engagement_id = ?"
        rows = await self._fetch(sql, (engagement_id,))
        return FeedbackRecord(*rows[0]) if rows else None

    async def get_cue(self, cue_id: str) -> CueRecord | None:
        rows = await self._fetch(f"{_select('cues', _CUE_COLS)} WHERE cue_id = ?", (cue_id,))
        return _cue_from(rows[0]) if rows else None

    async def cues_for_subject(
        self, subject: str, *, since: float | None = None, scenario_id: str | None = None
    ) -> list[CueRecord]:
        """The subject's cues created at or after ``since`` (optionally for one scenario), oldest first."""
        where, params = "subject = ?", list[object]([subject])
        if scenario_id is not None:
            where, params = where + " AND scenario_id = ?", [*params, scenario_id]
        if since is not None:
            where, params = where + " AND created_at >= ?", [*params, since]
        sql = f"{_select('cues', _CUE_COLS)} WHERE {where} ORDER BY created_at, rowid"
        return [_cue_from(r) for r in await self._fetch(sql, tuple(params))]

    async def decisions_for_device(
        self, device_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[DecisionRecord]:
        """The device's most recent arbitration decisions, oldest first."""
        where, params = "device_id = ?", list[object]([device_id])
        if since is not None:
            where, params = where + " AND time >= ?", [*params, since]
        sql = f"{_select('decisions', _DECISION_COLS)} WHERE {where} ORDER BY time DESC, rowid DESC LIMIT ?"
        rows = await self._fetch(sql, (*params, limit))
        return [DecisionRecord(*r) for r in reversed(rows)]

    async def get_engagement(self, engagement_id: str) -> EngagementRecord | None:
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE engagement_id = ?"
        rows = await self._fetch(sql, (engagement_id,))
        return _engagement_from(rows[0]) if rows else None

    async def engagement_for_cue(self, cue_id: str) -> EngagementRecord | None:
        """The engagement an accepted cue started, if any."""
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE cue_id = ? ORDER BY created_at, rowid LIMIT 1"
        rows = await self._fetch(sql, (cue_id,))
        return _engagement_from(rows[0]) if rows else None

    async def funnel_counts(self, cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
        return [
            (kind, [tuple(r) for r in await self._fetch(sql, tuple(params))])
            for kind, sql, params in funnel_queries(cut)
        ]

    async def engagements_for_subject(self, subject: str, *, limit: int = 20) -> list[EngagementRecord]:
        """The subject's (user's, else device's) most recent engagements, newest first."""
        sql = (
            f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE subject = ? ORDER BY created_at DESC, rowid DESC LIMIT ?"
        )
        return [_engagement_from(r) for r in await self._fetch(sql, (subject, limit))]

    async def chat_transcript(self, engagement_id: str) -> list[ChatRecord]:
        sql = f"{_select('chat_messages', _CHAT_COLS)} WHERE engagement_id = ? ORDER BY time, rowid"
        return [ChatRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def channel_changes(self, engagement_id: str) -> list[ChannelChangeRecord]:
        sql = f"{_select('channel_changes', _CHANGE_COLS)} WHERE engagement_id = ? ORDER BY time, rowid"
        return [
            ChannelChangeRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
            for r in await self._fetch(sql, (engagement_id,))
        ]

    async def journey_for_user(self, user_id: str, *, limit: int = 100) -> list[SignalRecord]:
        """The user's most recent signals across all their devices and sessions, oldest first."""
        join = " JOIN sessions AS x ON x.session_id = b.session_id"
        return await self._newest("x.user_id = ? AND x.identified = 1", (user_id,), limit, join=join)

    async def engagements_for_device(self, device_id: str) -> list[EngagementRecord]:
        """The device's engagements, oldest first."""
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE device_id = ? ORDER BY created_at, rowid"
        return [_engagement_from(r) for r in await self._fetch(sql, (device_id,))]


def read_funnel_counts(path: str | os.PathLike[str], cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The funnel's counts straight from a database file, read-only (``cuepoint report``, no server needed)."""
    # mode=ro: never create or change anything, even the schema.
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [(kind, conn.execute(sql, tuple(params)).fetchall()) for kind, sql, params in funnel_queries(cut)]
    finally:
        conn.close()
