"""PostgreSQL (asyncpg) store: the same `Store` as sqlite.py, for several replicas sharing one database.

Writes go through one writer task per process on a dedicated connection, like SqliteStore's: whatever has
accumulated is applied in one transaction, consecutive writes of one kind merged into one statement (the
journal: one ``INSERT ... SELECT FROM unnest(...)`` for every queued signal), and each caller's future is
resolved once the transaction committed. That keeps this process's writes in the order they were made
(what the core relies on, as with SQLite) and the round trips per signal far below one. Reads use a small
pool and see everything committed, by any replica.

Per-user decisions: `commit_offer` takes a transaction-scoped advisory lock on each guarded subject before
reading its stored cues (`OfferGuard`), so two replicas deciding for one user at once take turns, and the
second sees the first's cue. The locks of every such commit in a batch are taken by the batch's BEGIN, in
one round trip, sorted, before anything else of the transaction; the read is a later statement (its
snapshot is taken once the locks are held). An op that may wait for row locks (a slot's, a firing timer's)
is a batch's only locking op, so two replicas' writers never wait on each other's locks in a cycle.

Round trips are what a decision costs here (one PostgreSQL process serves every replica's decisions, one
after another on each writer's connection): an offer's journal rows, cues, decisions, milestones, webhook
rows and timers are one statement (data-modifying CTEs over unnested arrays), a guarded offer is BEGIN with
its locks, the history read, that statement and COMMIT. `round_trips` counts them (bench/, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import asyncpg
import structlog

from .audit_log import AuditRecord, audit_from_row
from .base import AcceptOutcome, FunnelSlice, OfferCommit, OfferResult, StoreClosedError, StoreStats
from .delivery_rows import (
    CLAIM_DELIVERIES,
    DELIVERY_RECIPIENTS,
    ENQUEUE_DELIVERY,
    EXPIRE_DELIVERIES,
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
    plan,
    trimmed,
)
from .json_text import dumps as _dumps
from .offer_guard import HISTORY_WHERE, without_refused
from .postgres_schema import migrate
from .records import (
    ChannelChangeRecord,
    ChatRecord,
    CueRecord,
    DecisionRecord,
    DeviceCredentialRecord,
    EngagementRecord,
    FeedbackRecord,
    LabelRecord,
    MilestoneRecord,
    ModelRecord,
    ParticipationRecord,
    ReplicaRecord,
    SessionRecord,
    SignalRecord,
    SwitchRecord,
    TimerRecord,
    TransferRecord,
    WebhookRecord,
)
from .slots import Slots, SlotTxn
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
    arm_row,
    done_row,
    timer_from,
)

__all__ = ["PostgresStore", "is_postgres_url"]

log = structlog.get_logger("cuepoint.storage")

Row = tuple[Any, ...]


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


# --- SQL ------------------------------------------------------------------------------------------------


def _marks(n: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + n))


def _upsert(table: str, cols: Sequence[str], *, keep_when_null: Sequence[str] = ()) -> str:
    def assign(col: str) -> str:
        if col in keep_when_null:
            return f"{col} = COALESCE(excluded.{col}, {table}.{col})"
        return f"{col} = excluded.{col}"

    updates = ", ".join(assign(c) for c in cols[1:])
    insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({_marks(len(cols))})"
    return f"{insert} ON CONFLICT ({cols[0]}) DO UPDATE SET {updates}"


def _insert(table: str, cols: Sequence[str], tail: str = "") -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({_marks(len(cols))}){tail}"


def _select(table: str, cols: Sequence[str]) -> str:
    return f"SELECT {', '.join(cols)} FROM {table}"


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
    "priority", "outcome", "ended_by", "callback_at", "callback_number",
    "wrapped_up_at", "wrap_up_outcome", "wrap_up_success", "fallback_choice",
)  # fmt: skip
_CHAT_COLS = ("message_id", "engagement_id", "sender", "text", "time")
_TRANSFER_COLS = ("engagement_id", "time", "from_associate_id", "to_associate_id", "to_queue", "mode", "note")
_PART_COLS = ("engagement_id", "associate_id", "role", "joined_at", "left_at", "disposition", "notes")
_CHANGE_COLS = ("engagement_id", "time", "request_id", "from_channel", "to_channel", "requested_by", "accepted")
_DECISION_COLS = (
    "time", "app_id", "device_id", "subject", "session_id", "scenario_id", "outcome", "reason", "detail", "cue_id",
    "outcome_milestone",
)  # fmt: skip
_MILESTONE_COLS = ("time", "app_id", "device_id", "session_id", "milestone_id")
_FEEDBACK_COLS = (
    "engagement_id", "cue_id", "scenario_id", "queue", "associate_id", "variant", "kind", "score", "comment", "time",
)  # fmt: skip
_WEBHOOK_COLS = (
    "delivery_id", "url", "kind", "body", "created_at", "state", "attempts", "next_attempt_at", "last_error",
)  # fmt: skip

_UPSERT_SESSION = _upsert("sessions", _SESSION_COLS, keep_when_null=("ended_at",))
_UPSERT_CUE = _upsert("cues", _CUE_COLS)
_UPSERT_ENGAGEMENT = _upsert("engagements", _ENGAGEMENT_COLS)
# The engagement's row and a timer it makes moot (save_engagement's ``settle``): params at, timer id, the row.
_SETTLE_AND_UPSERT_ENGAGEMENT = (
    "WITH settled AS (UPDATE timers SET state = 'done', fired_at = $1 WHERE timer_id = $2 AND state = 'armed') "
    + re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + 2}", _UPSERT_ENGAGEMENT)
)
_END_SESSION = "UPDATE sessions SET ended_at = $1 WHERE session_id = $2"
_SET_CUE_STATUS = "UPDATE cues SET status = $1, responded_at = $2, button_id = $3 WHERE cue_id = $4"
_INSERT_FEEDBACK = _insert("feedback", _FEEDBACK_COLS, " ON CONFLICT (engagement_id) DO NOTHING")
_UPSERT_VARIANT = (
    "INSERT INTO variant_switches (scenario_id, variant_id, stopped, reason, time) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (scenario_id, variant_id) DO UPDATE SET stopped = excluded.stopped, reason = excluded.reason, "
    "time = excluded.time"
)
_UPSERT_OPS_SWITCH = (
    "INSERT INTO switches (scope, scope_id, is_on, reason, time) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (scope, scope_id) DO UPDATE SET is_on = excluded.is_on, reason = excluded.reason, time = excluded.time"
)
_REPLICA_COLS = ("replica_id", "started_at", "last_seen", "address", "host", "scenarios_version", "draining")
_UPSERT_REPLICA = _upsert("replicas", _REPLICA_COLS)
_INSERT_WEBHOOK = _insert("webhook_outbox", _WEBHOOK_COLS, " ON CONFLICT (delivery_id) DO NOTHING")
_INSERT_MILESTONE = _insert("milestones", _MILESTONE_COLS)
_INSERT_CHAT = _insert("chat_messages", _CHAT_COLS, " ON CONFLICT (message_id) DO NOTHING")
_INSERT_TRANSFER = _insert("engagement_transfers", _TRANSFER_COLS)
_UPSERT_PART = _insert(
    "engagement_participants",
    _PART_COLS,
    " ON CONFLICT (engagement_id, associate_id, role, joined_at) DO UPDATE SET"
    " left_at = excluded.left_at, disposition = excluded.disposition, notes = excluded.notes",
)
_INSERT_CHANGE = _insert("channel_changes", _CHANGE_COLS)
_INSERT_DECISION = _insert("decisions", _DECISION_COLS)

# The journal (journal.py). The common case in one statement for every queued batch: per device, when its
# batches' smallest id sorts above its stored mark, the mark moves to their largest id and they are stored as
# runs; the devices that took this path come back. The mark's row stays locked (ON CONFLICT DO UPDATE locks
# it even when its WHERE is false) until commit, so two replicas storing for one device take turns; marks are
# taken in device order, so they never wait on each other in a cycle. Ids compare bytewise (COLLATE "C"),
# as Python compares them.
_BATCH_COLUMNS = "device_id, session_id, first_time, last_time, received_at, count, min_id, max_id, run, body"
_BATCH_TYPES = ("text", "text", "float8", "float8", "float8", "int4", "text", "text", "bool", "text")
_UNNEST_BATCHES = f"unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_BATCH_TYPES))})"
_RUNS_CTES = (
    f"b AS (SELECT * FROM {_UNNEST_BATCHES} WITH ORDINALITY AS b({_BATCH_COLUMNS}, ord)), "
    'd AS (SELECT device_id, min(min_id COLLATE "C") AS lo, max(max_id COLLATE "C") AS hi FROM b GROUP BY device_id), '
    "m AS (INSERT INTO signal_marks AS m (device_id, high) SELECT device_id, hi FROM d ORDER BY device_id "
    "ON CONFLICT (device_id) DO UPDATE SET high = excluded.high "
    "WHERE m.high < (SELECT lo FROM d WHERE d.device_id = excluded.device_id) RETURNING m.device_id), "
    f"ins AS (INSERT INTO signal_batches ({_BATCH_COLUMNS}) SELECT {_BATCH_COLUMNS} FROM b "
    "WHERE b.device_id IN (SELECT device_id FROM m) ORDER BY ord)"
)
_RUNS_STORED = "SELECT array_agg(device_id) FROM m"
_APPEND_RUNS = f"WITH {_RUNS_CTES} {_RUNS_STORED}"
# The other path, for the devices left: one statement locks their marks (creating empty ones) and reads them
# with what is stored of their batches' ids (exact ids, and for each id the run that could hold it: runs of a
# device cover disjoint id ranges, so the first ending at or after it); one more writes what journal.py
# decided. Ids above a mark find nothing, so all of them are looked up: no trip in between. Each id is an
# index probe (LATERAL; ids in the index's collation, or the planner scans the whole table); each run's body
# comes back once, however many ids it may hold.
_LOOKUP = (
    "WITH m AS (INSERT INTO signal_marks AS m (device_id, high) SELECT d, '' FROM unnest($1::text[]) AS d "
    "ORDER BY d ON CONFLICT (device_id) DO UPDATE SET high = m.high RETURNING m.device_id, m.high), "
    'x AS (SELECT device_id, signal_id COLLATE "C" AS signal_id FROM unnest($2::text[], $3::text[]) '
    "AS x(device_id, signal_id)) "
    "SELECT 'mark', device_id, high FROM m "
    "UNION ALL SELECT 'id', s.device_id, s.signal_id FROM x CROSS JOIN LATERAL (SELECT device_id, signal_id "
    "FROM signal_ids AS s WHERE s.device_id = x.device_id AND s.signal_id = x.signal_id) AS s "
    "UNION ALL SELECT 'run', device_id, body FROM signal_batches WHERE seq IN (SELECT r.seq FROM x "
    "CROSS JOIN LATERAL (SELECT s.seq FROM signal_batches AS s WHERE s.device_id = x.device_id AND s.run "
    "AND s.max_id >= x.signal_id ORDER BY s.max_id LIMIT 1) AS r)"
)
_WRITE_DECIDED = (
    f"WITH ins AS (INSERT INTO signal_batches ({_BATCH_COLUMNS}) SELECT * FROM {_UNNEST_BATCHES}), "
    "mk AS (INSERT INTO signal_marks AS m (device_id, high) SELECT * FROM unnest($11::text[], $12::text[]) "
    "ON CONFLICT (device_id) DO UPDATE SET high = excluded.high), "
    "ex AS (INSERT INTO signal_ids (device_id, signal_id) SELECT * FROM unnest($13::text[], $14::text[]) "
    "ON CONFLICT DO NOTHING) "
    "SELECT 1"
)

_SAVE_MODEL = (
    "INSERT INTO predict_models (outcome, version, epoch, cursor, state, saved_at) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (outcome) DO UPDATE SET version = excluded.version, epoch = excluded.epoch, "
    "cursor = excluded.cursor, state = excluded.state, saved_at = excluded.saved_at "
    "WHERE excluded.epoch >= predict_models.epoch AND excluded.version > predict_models.version"
)
_TAKE_LEASE = (
    "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, $3) "
    "ON CONFLICT (name) DO UPDATE SET "
    "epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END, "
    "holder = excluded.holder, expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at < $4"
)


def _literal(text: str) -> str:
    """``text`` as an escape-string literal: backslashes and quotes doubled, so nothing in it is SQL, whatever
    standard_conforming_strings says (PostgreSQL text holds no NUL)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _lock_subjects(subjects: Sequence[str]) -> str:
    """One statement taking each subject's transaction-scoped advisory lock, in sorted order (the select
    list is evaluated left to right): every replica takes them in one order, so none waits in a cycle."""
    calls = ", ".join(f"pg_advisory_xact_lock(hashtextextended({_literal(s)}, 0))" for s in sorted(set(subjects)))
    return f"SELECT {calls}"


# Every guard's stored cues in one read (parameters: subjects, sinces, session ids; one element per guard),
# each row tagged with its guard's position. Run after the subjects' locks were taken, in a later statement:
# its snapshot then holds every cue a replica that held one of the locks committed.
_HISTORIES = (
    f"SELECT g.i, {', '.join(f'c.{col}' for col in _CUE_COLS)} "
    "FROM unnest($1::text[], $2::float8[], $3::text[]) WITH ORDINALITY AS g(subject, since, session, i) "
    f"CROSS JOIN LATERAL (SELECT * FROM cues WHERE {HISTORY_WHERE.format('g.subject', 'g.since', 'g.session', 'seq')}"
    ") AS c ORDER BY g.i, c.created_at, c.seq"
)

# A user's sessions ($1: user id) and the anonymous sessions of the same devices: the pre-sign-in history.
_USER_SESSIONS = (
    "SELECT session_id FROM sessions WHERE user_id = $1"
    " OR (user_id = '' AND device_id IN (SELECT device_id FROM sessions WHERE user_id = $1))"
)
_USER_ENGAGEMENTS = f"SELECT engagement_id FROM engagements WHERE subject = $2 OR session_id IN ({_USER_SESSIONS})"
# table -> which of its rows are the user's (the same rows and order as sqlite.py's _USER_ROWS).
_USER_ROWS = (
    ("chat_messages", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("channel_changes", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("feedback", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("engagement_transfers", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("engagement_participants", f"engagement_id IN ({_USER_ENGAGEMENTS})"),
    ("signals", f"session_id IN ({_USER_SESSIONS})"),
    ("milestones", f"session_id IN ({_USER_SESSIONS})"),
    ("predict_labels", f"session_id IN ({_USER_SESSIONS})"),
    (
        "webhook_outbox",
        "EXISTS (SELECT 1 FROM cues AS c WHERE (c.subject = $2 OR c.session_id IN "
        f"({_USER_SESSIONS})) AND webhook_outbox.body LIKE '%\"' || c.cue_id || '\"%')",
    ),
    ("delivery_outbox", user_deliveries(_USER_ENGAGEMENTS, _USER_SESSIONS)),
    ("decisions", f"subject = $2 OR session_id IN ({_USER_SESSIONS})"),
    ("cues", f"subject = $2 OR session_id IN ({_USER_SESSIONS})"),
    ("engagements", f"subject = $2 OR session_id IN ({_USER_SESSIONS})"),
    ("sessions", f"session_id IN ({_USER_SESSIONS})"),
)
_EXPORT_ORDER = ("sessions", "signals", "milestones", "predict_labels", "cues", "decisions", "engagements")
# In transit between replicas, each also stored where it belongs: erased, not exported.
_NOT_EXPORTED = ("delivery_outbox",)


# --- row mapping ----------------------------------------------------------------------------------------


def _opt(value: float | None) -> float | None:
    return None if value is None else float(value)


def _session_row(r: SessionRecord) -> Row:
    return (
        r.session_id, r.app_id, r.device_id, r.user_id, float(r.started_at), _dumps(r.context), r.consent,
        _opt(r.ended_at), int(r.identified),
    )  # fmt: skip


def _session_from(row: Row) -> SessionRecord:
    return SessionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], bool(row[8]))


def _cue_row(r: CueRecord) -> Row:
    return (
        r.cue_id, r.scenario_id, r.app_id, r.device_id, r.subject, r.session_id, float(r.created_at),
        float(r.expires_at), r.channel, r.message, r.status, _opt(r.responded_at), _dumps(r.explanation), r.variant,
        r.locale, r.button_id,
    )  # fmt: skip


def _cue_from(row: Row) -> CueRecord:
    return CueRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        json.loads(row[12]), row[13], row[14], row[15],
    )  # fmt: skip


def _engagement_row(r: EngagementRecord) -> Row:
    return (
        r.engagement_id, r.cue_id, r.app_id, r.device_id, r.session_id, r.queue, r.state, r.channel,
        float(r.created_at), _opt(r.assigned_at), _opt(r.ended_at), r.associate_id, r.disposition, r.notes,
        _dumps(r.context), r.subject, r.scenario_id, int(r.priority), r.outcome, r.ended_by, _opt(r.callback_at),
        r.callback_number, _opt(r.wrapped_up_at), r.wrap_up_outcome, int(r.wrap_up_success), r.fallback_choice,
    )  # fmt: skip


def _engagement_from(row: Row) -> EngagementRecord:
    return EngagementRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        row[12], row[13], json.loads(row[14]), row[15], row[16], row[17], row[18], row[19], row[20], row[21],
        row[22], row[23], bool(row[24]), row[25],
    )  # fmt: skip


def _decision_row(r: DecisionRecord) -> Row:
    return (
        float(r.time), r.app_id, r.device_id, r.subject, r.session_id, r.scenario_id, r.outcome, r.reason, r.detail,
        r.cue_id, r.outcome_milestone,
    )  # fmt: skip


def _milestone_row(r: MilestoneRecord) -> Row:
    return (float(r.time), r.app_id, r.device_id, r.session_id, r.milestone_id)


def _webhook_row(r: WebhookRecord) -> Row:
    return (
        r.delivery_id, r.url, r.kind, r.body, float(r.created_at), r.state, int(r.attempts),
        float(r.next_attempt_at), r.last_error,
    )  # fmt: skip


def _plain_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _plain(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(columns, row, strict=True):
        if key == "seq":
            continue  # PostgreSQL's arrival order column; SQLite's rowid is not exported either
        if isinstance(value, str) and value[:1] in "{[":
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        out[key] = value
    return out


def _count(status: str) -> int:
    """Rows a statement touched, from asyncpg's status string ("UPDATE 1", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


def _qmarks(sql: str) -> str:
    """``?`` placeholders (outside quoted literals) as ``$1, $2, ...``: ad-hoc queries written for SQLite."""
    out: list[str] = []
    n = 0
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


_ARM_TIMER = _qmarks(ARM_TIMER)
_CLAIM_TIMERS = _qmarks(CLAIM_TIMERS("FOR UPDATE OF t SKIP LOCKED"))
_MARK_TIMER_DONE = _qmarks(MARK_TIMER_DONE)
_MARK_DUE_DONE = _qmarks(MARK_DUE_DONE)
_INSERT_DONE_TIMER = _qmarks(INSERT_DONE_TIMER)
_PURGE_TIMERS = _qmarks(PURGE_TIMERS)
_TIMER_BY_ID = _qmarks(TIMER_BY_ID)
_ENQUEUE_DELIVERY = _qmarks(ENQUEUE_DELIVERY)
_CLAIM_DELIVERIES = _qmarks(CLAIM_DELIVERIES("FOR UPDATE SKIP LOCKED"))
_EXPIRE_DELIVERIES = _qmarks(EXPIRE_DELIVERIES)


# --- one statement for many rows of several kinds ------------------------------------------------------


def _unnest(sql: str, types: Sequence[str]) -> Callable[[int], str]:
    """A one-row statement (``$1``..``$n``, an INSERT's VALUES or an UPDATE's WHERE) as the same statement for
    many rows, each parameter an array (``types``: the elements' types) unnested in step; numbered from
    ``start``, so several fit one statement as data-modifying CTEs."""
    names = [f"u.p{i + 1}" for i in range(len(types))]
    rowwise = re.sub(r"\$(\d+)", lambda m: names[int(m.group(1)) - 1], sql)

    def form(start: int) -> str:
        arrays = ", ".join(f"${start + i}::{t}[]" for i, t in enumerate(types))
        source = f"unnest({arrays}) AS u({', '.join(n[2:] for n in names)})"
        if rowwise.startswith("INSERT"):
            head, values = rowwise.split(" VALUES (", 1)
            # The VALUES list's closing parenthesis (the literals in it hold none).
            depth = list(itertools.accumulate({"(": 1, ")": -1}.get(ch, 0) for ch in values))
            end = depth.index(-1)
            return f"{head} SELECT {values[:end]} FROM {source}{values[end + 1 :]}"
        head, where = rowwise.split(" WHERE ", 1)
        return f"{head} FROM {source} WHERE {where}"

    return form


_TEXT, _FLOAT, _INT = "text", "float8", "int4"
_STATUS_ROWS = _unnest(_SET_CUE_STATUS, (_TEXT, _FLOAT, _TEXT, _TEXT))
_CUE_ROWS = _unnest(_UPSERT_CUE, (*[_TEXT] * 6, _FLOAT, _FLOAT, _TEXT, _TEXT, _TEXT, _FLOAT, *[_TEXT] * 4))
_DECISION_ROWS = _unnest(_INSERT_DECISION, (_FLOAT, *[_TEXT] * 10))
_MILESTONE_ROWS = _unnest(_INSERT_MILESTONE, (_FLOAT, *[_TEXT] * 4))
_WEBHOOK_ROWS = _unnest(_INSERT_WEBHOOK, (_TEXT, _TEXT, _TEXT, _TEXT, _FLOAT, _TEXT, _INT, _FLOAT, _TEXT))
_TIMER_ROWS = _unnest(_ARM_TIMER, (_TEXT, _TEXT, _TEXT, _FLOAT, _TEXT))


@dataclass(slots=True)
class _Rows:
    """An offer commit's rows (statuses, cues, decisions, milestones, webhook rows, timers), each kind as the
    one-row statement and its rows: written by one statement when they can be (`ctes`), else one by one."""

    steps: list[tuple[str, Callable[[int], str], list[Row]]]

    def __bool__(self) -> bool:
        return any(rows for _, _, rows in self.steps)

    def ctes(self, start: int) -> tuple[list[str], list[Any]] | None:
        """The rows as data-modifying CTEs (their arrays numbered from ``start``), or None when one statement
        cannot write them: a row changed twice in one statement (two rows of one key, or a cue's status set
        beside its upsert) would be one change, which PostgreSQL picks."""
        keyed = {sql: [row[key] for row in rows] for sql, _, rows in self.steps for key in [_ROW_KEY.get(sql)]
                 if key is not None}  # fmt: skip
        if any(len(set(keys)) < len(keys) for keys in keyed.values()):
            return None
        if set(keyed.get(_SET_CUE_STATUS, ())) & set(keyed.get(_UPSERT_CUE, ())):
            return None
        ctes: list[str] = []
        params: list[Any] = []
        for _, form, rows in self.steps:
            if rows:
                ctes.append(f"w{len(ctes)} AS ({form(start + len(params))})")
                params.extend(list(column) for column in zip(*rows, strict=True))
        return ctes, params

    def rows(self) -> int:
        return sum(len(rows) for _, _, rows in self.steps)


# Which parameter of a one-row statement is the row's key, for the kinds whose rows must be distinct.
_ROW_KEY = {_SET_CUE_STATUS: 3, _UPSERT_CUE: 0, _ARM_TIMER: 0}


# --- round trips ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Counter:
    round_trips: int = 0


class _Link:
    """A connection that counts its round trips to the server (bench/: round trips per batch, per decision)."""

    __slots__ = ("conn", "counter")

    def __init__(self, conn: asyncpg.Connection, counter: _Counter) -> None:
        self.conn = conn
        self.counter = counter

    async def execute(self, sql: str, *args: Any) -> str:
        self.counter.round_trips += 1
        return await self.conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Row]) -> None:
        # asyncpg pipelines every row's Bind/Execute before one Sync: one round trip.
        self.counter.round_trips += 1
        await self.conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.counter.round_trips += 1
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.counter.round_trips += 1
        return await self.conn.fetchval(sql, *args)

    @contextlib.asynccontextmanager
    async def transaction(self, keys: Sequence[str] = ()) -> AsyncIterator[None]:
        """BEGIN ... COMMIT (ROLLBACK on an error); with ``keys``, BEGIN also takes their subjects' advisory
        locks, in sorted order, in the same round trip (one simple-protocol query, so no parameters)."""
        self.counter.round_trips += 2  # BEGIN (with the locks), then COMMIT or ROLLBACK
        if not keys:
            async with self.conn.transaction():
                yield
            return
        try:
            await self.conn.execute(f"BEGIN; {_lock_subjects(keys)}")
            yield
        except BaseException:
            if not self.conn.is_closed():
                with contextlib.suppress(Exception):
                    await self.conn.execute("ROLLBACK")
            raise
        await self.conn.execute("COMMIT")


_SET_OWNER = (
    "INSERT INTO engagement_owners (engagement_id, replica, owned_at) VALUES ($1, $2, $3) "
    "ON CONFLICT (engagement_id) DO UPDATE SET replica = excluded.replica, owned_at = excluded.owned_at"
)


def _own_and_arm(owner: bool, timers: int) -> str:
    """The owner's row (when ``owner``) and ``timers`` timer rows, one statement."""
    parts: list[str] = []
    n = 3 if owner else 0
    for i in range(timers):
        base = n + 5 * i  # each ARM_TIMER's $1..$5, renumbered after the owner's three and the rows before it

        def shift(m: re.Match[str], base: int = base) -> str:
            return f"${base + int(m.group(1))}"

        parts.append(re.sub(r"\$(\d+)", shift, _qmarks(ARM_TIMER)))
    writes = ([_SET_OWNER] if owner else []) + parts
    *first, last = writes
    return "".join(f"WITH w{i} AS ({sql}) " for i, sql in enumerate(first)) + last


def _arm_params(timers: Sequence[TimerRecord]) -> list[Any]:
    return [v for t in timers for v in arm_row(t)]


class _PgTxn:
    """slots.py's view of the writer's open transaction (``?`` placeholders)."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    async def execute(self, sql: str, *args: Any) -> None:
        await self._link.execute(_qmarks(sql), *args)

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return [tuple(r) for r in await self._link.fetch(_qmarks(sql), *args)]


# --- writer ---------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Statement:
    sql: str
    params: Row
    future: asyncio.Future[Any]
    locks: bool = False
    keys: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return 1


@dataclass(slots=True, eq=False)
class _AppendBatches:
    batches: list[EncodedBatch]
    future: asyncio.Future[Any]
    locks: bool = False
    keys: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(len(b.ids) for b in self.batches)


@dataclass(slots=True, eq=False)
class _Transaction:
    """Several statements (and reads) that commit whole or not at all; never merged with another."""

    work: Callable[[_Link], Awaitable[tuple[Any, int]]]  # -> (result, rows written)
    future: asyncio.Future[Any]
    size: int = 1
    # Takes row locks it may wait for (or advisory locks of its own): at most one such op per batch, and
    # never beside ops with `keys`, so two replicas' writers never wait on each other's locks in a cycle.
    locks: bool = False
    # Subjects whose advisory locks the batch's BEGIN takes for it, with every other op's, in sorted order and
    # before anything else of the transaction: any number of such ops share one batch (one locking round trip).
    keys: tuple[str, ...] = ()


_Op = _Statement | _AppendBatches | _Transaction


def _groups(batch: list[_Op]) -> list[list[_Op]]:
    groups: list[list[_Op]] = []
    for op in batch:
        last = groups[-1][-1] if groups else None
        same = (
            last is not None
            and not isinstance(op, _Transaction)
            and not isinstance(last, _Transaction)
            and type(op) is type(last)
            and (not isinstance(op, _Statement) or (isinstance(last, _Statement) and op.sql == last.sql))
        )
        if same:
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def _batch_columns(stored: Sequence[tuple[EncodedBatch, bool]]) -> list[list[Any]]:
    return [
        [b.device_id for b, _ in stored],
        [b.session_id for b, _ in stored],
        [b.first_time for b, _ in stored],
        [b.last_time for b, _ in stored],
        [b.received_at for b, _ in stored],
        [len(b.ids) for b, _ in stored],
        [b.min_id for b, _ in stored],
        [b.max_id for b, _ in stored],
        [run for _, run in stored],
        [b.body for b, _ in stored],
    ]


def _clean_devices(batches: Sequence[EncodedBatch]) -> set[str]:
    """Devices whose batches here are each free of repeats and each above the one before: whether they are
    new then depends on the stored mark alone, which the one-statement path checks."""
    last: dict[str, str] = {}
    dirty: set[str] = set()
    for b in batches:
        before = last.get(b.device_id)
        if not b.distinct or (before is not None and b.min_id <= before):
            dirty.add(b.device_id)
        last[b.device_id] = b.max_id
    return set(last) - dirty


async def _append_journal(link: _Link, batches: list[EncodedBatch], rows: _Rows | None = None) -> list[list[str]]:
    """Dedupe and store batches inside the writer's transaction: the ids skipped per batch.

    One statement when every device's batches sort above its mark (the SDK's increasing ids); otherwise two
    more for the devices left (resends, ids out of order, random ids): look up, then write what journal.py
    decided. ``rows`` (an offer's cues, decisions, ...) go into that first statement as more CTEs when they
    can (`_Rows.ctes`), else one statement per kind after it.
    """
    clean = _clean_devices(batches)
    fast = [b for b in batches if b.device_id in clean]
    done: set[str] = set()
    merged = rows.ctes(11 if fast else 1) if rows else None
    if fast or merged:
        ctes, params = merged or ([], [])
        if fast:
            ctes, params = [_RUNS_CTES, *ctes], [*_batch_columns([(b, True) for b in fast]), *params]
        found = await link.fetchval(
            f"WITH {', '.join(ctes)} {_RUNS_STORED if fast else 'SELECT NULL::text[]'}", *params
        )
        done = set(found or ())
    if rows and merged is None:
        for sql, _, step in rows.steps:
            if step:
                await link.executemany(sql, step)
    rest = [b for b in batches if b.device_id not in done]
    skipped: dict[int, list[str]] = {}
    if rest:
        devices = sorted({b.device_id for b in rest})
        pairs = [(b.device_id, i) for b in rest for i in b.ids]
        highs: dict[str, str] = {}
        known: dict[str, set[str]] = {}
        bodies: dict[str, list[str]] = {}
        for kind, device_id, value in await link.fetch(_LOOKUP, devices, [d for d, _ in pairs], [i for _, i in pairs]):
            if kind == "mark" and value:
                highs[device_id] = value
            elif kind == "id":
                known.setdefault(device_id, set()).add(value)
            elif kind == "run":
                bodies.setdefault(device_id, []).append(value)
        ids = {d: {i for dd, i in pairs if dd == d} for d in bodies}
        for device_id, found in bodies.items():
            known.setdefault(device_id, set()).update(in_bodies(found, ids[device_id]))
        decided = plan(rest, highs, known)
        await link.fetchval(
            _WRITE_DECIDED,
            *_batch_columns(decided.stored),
            list(decided.marks),
            list(decided.marks.values()),
            [d for d, _ in decided.exact],
            [i for _, i in decided.exact],
        )
        skipped = {id(b): per for b, per in zip(rest, decided.skipped, strict=True)}
    return [skipped.get(id(b), []) for b in batches]


class _BatchWriter:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], conn: asyncpg.Connection,
                 counter: _Counter, max_batch: int) -> None:  # fmt: skip
        self._connect = connect
        self._link = _Link(conn, counter)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._closed = False
        self._batches = self._ops = self._rows = self._failed = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cuepoint-postgres-writer")

    def stats(self) -> StoreStats:
        return StoreStats(self._batches, self._ops, self._rows, self._failed)

    async def execute(self, sql: str, params: Row, *, locks: bool = False) -> str:
        status: str = await self._submit(_Statement(sql, params, self._new_future(), locks))
        return status

    async def append_batches(self, batches: list[EncodedBatch]) -> list[str]:
        skipped: list[str] = await self._submit(_AppendBatches(batches, self._new_future()))
        return skipped

    async def transaction(
        self,
        work: Callable[[_Link], Awaitable[tuple[Any, int]]],
        size: int = 1,
        *,
        locks: bool = False,
        keys: Sequence[str] = (),
    ) -> Any:
        return await self._submit(_Transaction(work, self._new_future(), max(size, 1), locks, tuple(keys)))

    async def stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
        await asyncio.shield(self._task)

    async def close_connection(self) -> None:
        with contextlib.suppress(Exception):
            await self._link.conn.close(timeout=5)

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> Any:
        if self._closed:
            raise StoreClosedError("store is closed")
        self._queue.put_nowait(op)
        # A cancelled caller does not withdraw the op: writes are idempotent for retries.
        return await op.future

    async def _run(self) -> None:
        pending: list[_Op] = []
        carried: _Op | None = None
        try:
            stopping = False
            while not stopping:
                if carried is not None:
                    first: _Op | None = carried
                    carried = None
                else:
                    first = await self._queue.get()
                if first is None:
                    break
                pending = [first]
                size = first.size
                locking, keyed = first.locks, bool(first.keys)
                while size < self._max_batch and not self._queue.empty():
                    op = self._queue.get_nowait()
                    if op is None:
                        stopping = True
                        break
                    if (op.locks and (locking or keyed)) or (op.keys and locking):
                        carried = op  # in the next batch: one locking op, or only keyed ones, per batch
                        break
                    locking, keyed = locking or op.locks, keyed or bool(op.keys)
                    pending.append(op)
                    size += op.size
                await self._apply(pending)
                pending = []
            if carried is not None:
                await self._apply([carried])
                carried = None
        finally:
            self._closed = True
            left: list[_Op] = [*pending, *([carried] if carried is not None else [])]
            while not self._queue.empty():
                op = self._queue.get_nowait()
                if op is not None:
                    left.append(op)
            for op in left:
                if not op.future.done():
                    op.future.set_exception(StoreClosedError("store closed before the write was committed"))

    async def _apply(self, batch: list[_Op]) -> None:
        try:
            await self._reconnect_if_needed()
            groups = _groups(batch)
            keys = sorted({key for op in batch for key in op.keys})
            if len(groups) == 1 and not isinstance(batch[0], _Transaction) and not keys:
                # One statement (or one executemany) is atomic on its own: no BEGIN/COMMIT round trips.
                results, rows = await self._write(groups)
            else:
                async with self._link.transaction(keys):
                    results, rows = await self._write(groups)
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, OSError | asyncpg.InterfaceError):
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
        for op, result in zip(batch, results, strict=True):
            if not op.future.done():
                op.future.set_result(result)

    async def _reconnect_if_needed(self) -> None:
        # A restarted or failed-over server closed the connection: the next batch opens a new one.
        if self._link.conn.is_closed():
            log.warning("storage.reconnecting", backend="postgres")
            self._link.conn = await self._connect()

    async def _write(self, groups: list[list[_Op]]) -> tuple[list[Any], int]:
        results: list[Any] = []
        rows = 0
        for group in groups:
            first = group[0]
            if isinstance(first, _Transaction):
                result, written = await first.work(self._link)
                results.append(result)
                rows += written
                continue
            if isinstance(first, _Statement):
                params = [op.params for op in group if isinstance(op, _Statement)]
                if len(params) == 1:
                    results.append(await self._link.execute(first.sql, *params[0]))
                else:
                    await self._link.executemany(first.sql, params)
                    results.extend([""] * len(group))
                rows += len(params)
                continue
            appends = [op for op in group if isinstance(op, _AppendBatches)]
            batches = [b for op in appends for b in op.batches]
            skipped = await _append_journal(self._link, batches)
            # Each caller learns which of its signals were stored already (skipped as resends).
            at = 0
            for op in appends:
                results.append([i for per in skipped[at : at + len(op.batches)] for i in per])
                at += len(op.batches)
            rows += sum(len(b.ids) for b in batches) - sum(len(per) for per in skipped)
        return results, rows


# --- store ----------------------------------------------------------------------------------------------


class PostgresStore(Slots):
    """Durable store on PostgreSQL. Create with ``await PostgresStore.open("postgresql://user@host/db")``.

    A ``search_path`` query parameter in the URL puts the tables in that schema (created if missing), so
    several independent stores can share one database (the tests do).
    """

    # Two replicas reserving for one associate take turns on its row; the second skips it (slots.py).
    _SKIP_LOCKED = "FOR UPDATE SKIP LOCKED"
    _ADOPT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('cuepoint.adopt', 0))"
    _LOCK_ROW = "FOR UPDATE"
    _ONE_STATEMENT = True

    def __init__(self, dsn: str, writer: _BatchWriter, pool: asyncpg.Pool, counter: _Counter) -> None:
        self._dsn = dsn
        self._writer = writer
        self._pool = pool
        self._counter = counter
        self._closing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, *, max_batch: int = 1000, pool_size: int = 4) -> PostgresStore:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(dsn, timeout=10)

        conn = await connect()
        try:
            await migrate(conn)
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size, timeout=10)
        except BaseException:
            await conn.close()
            raise
        counter = _Counter()
        return cls(dsn, _BatchWriter(connect, conn, counter, max_batch), pool, counter)

    async def close(self) -> None:
        """Commit everything already submitted, then close. Safe to call more than once."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        try:
            await self._writer.stop()
        finally:
            await self._writer.close_connection()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def stats(self) -> StoreStats:
        return self._writer.stats()

    @property
    def round_trips(self) -> int:
        """Requests this store sent PostgreSQL and waited for (statements, BEGIN and COMMIT), since it opened."""
        return self._counter.round_trips

    # -- plumbing --------------------------------------------------------------------------------------

    async def _execute(self, sql: str, params: Row) -> None:
        await self._writer.execute(sql, params)

    async def _slot_statement(self, sql: str, *args: Any) -> None:
        """One statement of slots.py's, on its own: atomic without BEGIN/COMMIT when alone in its batch, and a
        locking op (it may wait for an associate's row) like `_slot_transaction`'s."""
        await self._writer.execute(_qmarks(sql), args, locks=True)

    async def _fetch(self, sql: str, params: Row = ()) -> list[asyncpg.Record]:
        if self._closing is not None:
            raise StoreClosedError("store is closed")
        self._counter.round_trips += 1
        async with self._pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *params)
            return rows

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """A read-only ad-hoc query (``?`` placeholders, as for SqliteStore.query); sees everything committed."""
        return [tuple(_plain_value(v) for v in r) for r in await self._fetch(_qmarks(sql), tuple(params))]

    # -- transactions the core's promises rest on --------------------------------------------------------

    async def append_signals(self, rows: Sequence[SignalRecord]) -> list[str]:
        """One journal row per run of one device and session (journal.py); the ids skipped as stored before."""
        if not rows:
            return []
        return await self._writer.append_batches(batches_from_records(rows))

    async def append_batch(self, batch: JournalBatch) -> list[str]:
        """One batch as one journal row; returns, once committed, the ids skipped as stored before."""
        return await self.append_journal((batch,))

    async def append_journal(self, batches: Sequence[JournalBatch]) -> list[str]:
        """Batches as one journal row each, in one transaction; once committed, the ids skipped as stored."""
        encoded = encode_all(batches)
        if not encoded:
            return []
        return await self._writer.append_batches(encoded)

    async def commit_offer(self, work: OfferCommit) -> OfferResult:
        """One evaluation's writes in one transaction; guarded cues re-checked under their subject's lock."""
        # Encoded here, in the caller's task, so a bad value raises to its caller, not to a shared batch.
        batches = encode_work(work.signals, work.batches)
        signals = sum(len(b.ids) for b in batches)
        statuses = [(status, float(at), "", cue_id) for cue_id, status, at in work.statuses]
        milestones = [_milestone_row(r) for r in work.milestones]
        encoded_cues = {r.cue_id: _cue_row(r) for r in work.cues}
        guards = list(work.guards)
        fires = [(float(due), timer_id, float(due)) for timer_id, due in work.fires]
        if not (
            batches or statuses or milestones or work.cues or work.decisions or work.webhooks or work.timers or fires
        ):
            return OfferResult([], {})
        now = max((c.created_at for c in work.cues), default=0.0)

        async def run(link: _Link) -> tuple[OfferResult, int]:
            refused: dict[str, tuple[str, str]] = {}
            for fire in fires:
                # Waits for a claim transaction holding the row; a firing that lost finds it done or moved.
                if _count(await link.execute(_MARK_DUE_DONE, *fire)) < 1:
                    refused.update((c.cue_id, FIRED_ELSEWHERE) for c in work.cues)
            if guards:
                # The subjects' locks were taken with this transaction's BEGIN (`keys`); this read is a later
                # statement, so a replica that held one of them has committed its cue by now, and it is seen.
                found: list[list[CueRecord]] = [[] for _ in guards]
                params = ([g.subject for g in guards], [float(g.since) for g in guards], [g.session_id for g in guards])
                for r in await link.fetch(_HISTORIES, *params):
                    found[r[0] - 1].append(_cue_from(tuple(r)[1:]))
                for guard, history in zip(guards, found, strict=True):
                    reason = guard.check(history)
                    if reason is not None:
                        refused[guard.cue_id] = reason
            slotted = await self.reserve_offer_slots(_PgTxn(link), work.slots, refused, now) if work.slots else {}
            kept = without_refused(work, refused)
            rows = _Rows(
                [
                    (_SET_CUE_STATUS, _STATUS_ROWS, statuses),
                    (_UPSERT_CUE, _CUE_ROWS, [encoded_cues[c.cue_id] for c in kept.cues]),
                    (_INSERT_DECISION, _DECISION_ROWS, [_decision_row(r) for r in kept.decisions]),
                    (_INSERT_MILESTONE, _MILESTONE_ROWS, milestones),
                    (_INSERT_WEBHOOK, _WEBHOOK_ROWS, [_webhook_row(r) for r in kept.webhooks]),
                    (_ARM_TIMER, _TIMER_ROWS, [arm_row(t) for t in kept.timers]),
                ]
            )
            # The journal and every row in one statement (the journal's resends add two).
            skipped = [i for per in await _append_journal(link, batches, rows) for i in per]
            return OfferResult(skipped, refused, slotted), signals + rows.rows()

        size = signals + len(work.cues) + len(work.decisions) + len(statuses) + len(milestones)
        # Guards alone wait only for their subjects' advisory locks, taken with BEGIN: such commits share one
        # batch. A slot's row locks or a firing's timer row make the commit a batch's one locking op.
        keys = sorted({g.subject for g in guards})
        result: OfferResult = await self._writer.transaction(run, size, locks=bool(work.slots or fires), keys=keys)
        return result

    async def merge_subject(self, source: str, target: str) -> None:
        if source == target:
            return

        async def run(link: _Link) -> tuple[None, int]:
            # Both subjects' locks were taken with BEGIN (`keys`).
            await link.execute("UPDATE cues SET subject = $1 WHERE subject = $2", target, source)
            return None, 1

        await self._writer.transaction(run, keys=(source, target))

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
        """The cue becomes accepted and its engagement is stored, with the webhook rows reporting both and its
        deadline rows; idempotent by cue id (a repeat writes nothing, its webhook rows neither). The deadline
        rows ride with the owner's row (one statement: no round trip more)."""
        row = _engagement_row(engagement)
        hooks = [_webhook_row(r) for r in webhooks]
        by_cue = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE cue_id = $1 ORDER BY created_at, seq LIMIT 1"

        async def run(link: _Link) -> tuple[AcceptOutcome, int]:
            # FOR UPDATE: two replicas accepting one cue take turns; the second finds the engagement.
            found = await link.fetch("SELECT status FROM cues WHERE cue_id = $1 FOR UPDATE", cue_id)
            status = str(found[0][0]) if found else ""
            if status not in ("offered", "accepted"):
                return AcceptOutcome(False, status, None), 0
            existing = await link.fetch(by_cue, cue_id)
            if existing:
                return AcceptOutcome(False, "accepted", _engagement_from(tuple(existing[0]))), 0
            await link.execute(_SET_CUE_STATUS, "accepted", float(responded_at), button_id, cue_id)
            await link.execute(_UPSERT_ENGAGEMENT, *row)
            owned = (engagement.engagement_id, owner, float(responded_at)) if owner else ()
            if timers:
                await link.execute(_own_and_arm(bool(owner), len(timers)), *owned, *_arm_params(timers))
            elif owner:
                await link.execute(_SET_OWNER, *owned)
            if hooks:
                await link.executemany(_INSERT_WEBHOOK, hooks)
            return AcceptOutcome(True, "accepted", engagement), 2 + len(hooks)

        outcome: AcceptOutcome = await self._writer.transaction(run, 2 + len(hooks))
        return outcome

    async def _slot_transaction(self, work: Callable[[SlotTxn], Awaitable[tuple[Any, int]]]) -> Any:
        async def run(link: _Link) -> tuple[Any, int]:
            result: tuple[Any, int] = await work(_PgTxn(link))
            return result

        # A locking transaction: at most one per batch, like commit_offer's (no two replicas' writers ever
        # wait on each other's locks in opposite orders).
        return await self._writer.transaction(run, locks=True)

    def _engagement_upsert(self, record: EngagementRecord) -> tuple[str, Sequence[Any]]:
        return _UPSERT_ENGAGEMENT, _engagement_row(record)

    async def _slot_read(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return [tuple(r) for r in await self._fetch(_qmarks(sql), args)]

    # -- single writes -----------------------------------------------------------------------------------

    async def save_session(self, rec: SessionRecord) -> None:
        await self._execute(_UPSERT_SESSION, _session_row(rec))

    async def end_session(self, session_id: str, ended_at: float) -> None:
        await self._execute(_END_SESSION, (float(ended_at), session_id))

    async def save_cue(self, rec: CueRecord) -> None:
        await self._execute(_UPSERT_CUE, _cue_row(rec))

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
        """As SqliteStore's: with ``timer``, only a cue still offered, and only once per timer."""
        params = (status, float(responded_at), button_id, cue_id)
        if timer:
            return await self._fire(timer, responded_at, _SET_CUE_STATUS + " AND status = 'offered'", params, webhooks)
        await self._with_outbox(_SET_CUE_STATUS, params, webhooks)
        return True

    async def save_engagement(
        self, rec: EngagementRecord, *, webhooks: Sequence[WebhookRecord] = (), timer: str = "", settle: str = ""
    ) -> bool:
        """As SqliteStore's: with ``timer``, written only if that timer had not fired yet; ``settle``, the
        moot timer marked done in the same statement (a CTE: no round trip more)."""
        if timer:
            at = float(rec.callback_at or rec.created_at)  # when the engagement's timer fell due
            return await self._fire(timer, at, _UPSERT_ENGAGEMENT, _engagement_row(rec), webhooks)
        if settle:
            at = float(rec.assigned_at or rec.created_at)
            await self._with_outbox(_SETTLE_AND_UPSERT_ENGAGEMENT, (at, settle, *_engagement_row(rec)), webhooks)
            return True
        await self._with_outbox(_UPSERT_ENGAGEMENT, _engagement_row(rec), webhooks)
        return True

    async def _fire(self, timer: str, at: float, sql: str, params: Row, webhooks: Sequence[WebhookRecord]) -> bool:
        """Fire `timer` once: mark its row done (it waits for a replica's claim transaction holding the row)
        and apply the effect with its webhook rows, in one transaction; a timer already done writes nothing."""
        hooks = [_webhook_row(r) for r in webhooks]

        async def run(link: _Link) -> tuple[bool, int]:
            if _count(await link.execute(_MARK_TIMER_DONE, float(at), timer)) < 1:
                if _count(await link.execute(_INSERT_DONE_TIMER, *done_row(timer, at))) < 1:
                    return False, 0
            if _count(await link.execute(sql, *params)) < 1:
                return False, 1
            if hooks:
                await link.executemany(_INSERT_WEBHOOK, hooks)
            return True, 2 + len(hooks)

        fired: bool = await self._writer.transaction(run, 2 + len(hooks))
        return fired

    # -- timers as rows (timer_rows.py) --------------------------------------------------------------

    async def arm_timers(self, rows: Sequence[TimerRecord]) -> None:
        for row in rows:
            await self._execute(_ARM_TIMER, arm_row(row))

    async def claim_timers(
        self, holder: str, now: float, *, hold: float, own_after: float, limit: int = 100
    ) -> list[TimerRecord]:
        """As SqliteStore's; rows another replica's claim (or firing) holds locked are skipped, not waited
        for (FOR UPDATE SKIP LOCKED), so replicas claiming at once each get different timers."""
        params = (
            holder, float(now + hold), float(now), float(now), holder, float(now - own_after), float(now - hold), limit
        )  # fmt: skip

        async def run(link: _Link) -> tuple[list[TimerRecord], int]:
            rows = [timer_from(tuple(r)) for r in await link.fetch(_CLAIM_TIMERS, *params)]
            return sorted(rows, key=lambda t: (t.due_at, t.timer_id)), len(rows)  # RETURNING keeps no order

        claimed: list[TimerRecord] = await self._writer.transaction(run)
        return claimed

    async def finish_timer(self, timer_id: str, at: float) -> bool:
        async def run(link: _Link) -> tuple[bool, int]:
            if _count(await link.execute(_MARK_TIMER_DONE, float(at), timer_id)) < 1:
                return _count(await link.execute(_INSERT_DONE_TIMER, *done_row(timer_id, at))) > 0, 1
            return True, 1

        done: bool = await self._writer.transaction(run)
        return done

    async def finish_due(self, timer_id: str, due_at: float, at: float) -> bool:
        async def run(link: _Link) -> tuple[bool, int]:
            if _count(await link.execute(_MARK_DUE_DONE, float(at), timer_id, float(due_at))) < 1:
                return _count(await link.execute(_INSERT_DONE_TIMER, *done_row(timer_id, at))) > 0, 1
            return True, 1

        done: bool = await self._writer.transaction(run)
        return done

    async def get_timer(self, timer_id: str) -> TimerRecord | None:
        rows = await self._fetch(_TIMER_BY_ID, (timer_id,))
        return timer_from(tuple(rows[0])) if rows else None

    async def timers(self) -> list[TimerRecord]:
        return [timer_from(tuple(r)) for r in await self._fetch(f"SELECT {', '.join(TIMER_COLS)} FROM timers")]

    async def purge_timers(self, due_before: float) -> None:
        await self._execute(_PURGE_TIMERS, (float(due_before),))

    # -- the delivery outbox (delivery_rows.py) ---------------------------------------------------------
    # One statement each, on the pool (not behind the writer's batches): a message between replicas costs
    # one round trip to store and one to claim.

    async def enqueue_delivery(
        self, recipient: str, body: bytes, now: float, *, engagement_id: str = "", device_id: str = ""
    ) -> int:
        rows = await self._fetch(_ENQUEUE_DELIVERY, (recipient, engagement_id, device_id, bytes(body), float(now)))
        return int(rows[0][0])

    async def claim_deliveries(self, recipient: str, *, limit: int = 500) -> list[tuple[int, bytes]]:
        rows = await self._fetch(_CLAIM_DELIVERIES, (recipient, limit))
        return sorted((int(r[0]), bytes(r[1])) for r in rows)

    async def delivery_recipients(self) -> list[str]:
        return [str(r[0]) for r in await self._fetch(DELIVERY_RECIPIENTS)]

    async def expire_deliveries(self, before: float) -> int:
        rows = await self._fetch(
            f"WITH d AS ({_EXPIRE_DELIVERIES} RETURNING 1) SELECT count(*) FROM d", (float(before),)
        )
        return int(rows[0][0])

    async def _with_outbox(
        self, sql: str, params: Row, webhooks: Sequence[WebhookRecord], *, only_if_written: bool = False
    ) -> None:
        """One state change and the outbox rows reporting it, in one transaction (as SqliteStore's).

        Without rows it stays a plain statement, merged with others into the writer's batches.
        ``only_if_written``: the rows are added only when the statement changed a row (not a repeat).
        """
        if not webhooks:
            await self._execute(sql, params)
            return
        hooks = [_webhook_row(r) for r in webhooks]

        async def run(link: _Link) -> tuple[None, int]:
            status = await link.execute(sql, *params)
            if only_if_written and int(status.rsplit(" ", 1)[-1]) < 1:
                return None, 0
            await link.executemany(_INSERT_WEBHOOK, hooks)
            return None, 1 + len(hooks)

        await self._writer.transaction(run, 1 + len(hooks))

    async def save_chat(self, rec: ChatRecord) -> None:
        await self._execute(_INSERT_CHAT, (rec.message_id, rec.engagement_id, rec.sender, rec.text, float(rec.time)))

    async def save_channel_change(self, rec: ChannelChangeRecord) -> None:
        row = (rec.engagement_id, float(rec.time), rec.request_id, rec.from_channel, rec.to_channel, rec.requested_by)
        await self._execute(_INSERT_CHANGE, (*row, int(rec.accepted)))

    async def save_transfer(self, rec: TransferRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None:
        row = (rec.engagement_id, float(rec.time), rec.from_associate_id, rec.to_associate_id, rec.to_queue)
        await self._with_outbox(_INSERT_TRANSFER, (*row, rec.mode, rec.note), webhooks)

    async def save_participation(self, rec: ParticipationRecord) -> None:
        row = (rec.engagement_id, rec.associate_id, rec.role, float(rec.joined_at), _opt(rec.left_at))
        await self._execute(_UPSERT_PART, (*row, rec.disposition, rec.notes))

    async def transfers_for(self, engagement_id: str) -> list[TransferRecord]:
        sql = f"{_select('engagement_transfers', _TRANSFER_COLS)} WHERE engagement_id = $1 ORDER BY time, seq"
        return [TransferRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def participations_for(self, engagement_id: str) -> list[ParticipationRecord]:
        sql = f"{_select('engagement_participants', _PART_COLS)} WHERE engagement_id = $1 ORDER BY joined_at, seq"
        return [ParticipationRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def save_decision(self, rec: DecisionRecord) -> None:
        await self._execute(_INSERT_DECISION, _decision_row(rec))

    async def save_milestone(self, rec: MilestoneRecord) -> None:
        await self._execute(_INSERT_MILESTONE, _milestone_row(rec))

    async def save_feedback(self, rec: FeedbackRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None:
        row = (rec.engagement_id, rec.cue_id, rec.scenario_id, rec.queue, rec.associate_id, rec.variant, rec.kind)
        params = (*row, int(rec.score), rec.comment, float(rec.time))
        await self._with_outbox(_INSERT_FEEDBACK, params, webhooks, only_if_written=True)

    async def set_variant_stopped(
        self, scenario_id: str, variant_id: str, stopped: bool, reason: str, at: float
    ) -> None:
        await self._execute(_UPSERT_VARIANT, (scenario_id, variant_id, int(stopped), reason, float(at)))

    # -- operations switches and the webhook outbox ----------------------------------------------------

    async def save_switch(self, rec: SwitchRecord) -> None:
        await self._execute(_UPSERT_OPS_SWITCH, (rec.scope, rec.scope_id, int(rec.on), rec.reason, float(rec.time)))

    async def switches(self) -> list[SwitchRecord]:
        rows = await self._fetch("SELECT scope, scope_id, is_on, reason, time FROM switches ORDER BY scope, scope_id")
        return [SwitchRecord(str(r[0]), str(r[1]), bool(r[2]), str(r[3]), float(r[4])) for r in rows]

    # -- the replicas registry -------------------------------------------------------------------------

    async def save_replica(self, rec: ReplicaRecord) -> None:
        row = (rec.replica_id, float(rec.started_at), float(rec.last_seen), rec.address, rec.host)
        await self._execute(_UPSERT_REPLICA, (*row, rec.scenarios_version, int(rec.draining)))

    async def replicas(self) -> list[ReplicaRecord]:
        rows = await self._fetch(f"{_select('replicas', _REPLICA_COLS)} ORDER BY started_at, replica_id")
        return [
            ReplicaRecord(str(r[0]), float(r[1]), float(r[2]), str(r[3]), str(r[4]), str(r[5]), bool(r[6]))
            for r in rows
        ]

    async def forget_replica(self, replica_id: str) -> None:
        await self._execute("DELETE FROM replicas WHERE replica_id = $1", (replica_id,))

    async def forget_replicas_seen_before(self, before: float) -> None:
        await self._execute("DELETE FROM replicas WHERE last_seen < $1", (float(before),))

    async def enqueue_webhooks(self, rows: Sequence[WebhookRecord]) -> None:
        for rec in rows:
            await self._execute(_INSERT_WEBHOOK, _webhook_row(rec))

    async def due_webhooks(self, now: float, *, limit: int = 100) -> list[WebhookRecord]:
        sql = (
            f"{_select('webhook_outbox', _WEBHOOK_COLS)} WHERE state = 'pending' AND next_attempt_at <= $1 "
            "ORDER BY next_attempt_at, seq LIMIT $2"
        )
        return [WebhookRecord(*r) for r in await self._fetch(sql, (float(now), limit))]

    async def next_webhook_due(self) -> float | None:
        rows = await self._fetch("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = 'pending'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def webhook_attempted(
        self, delivery_id: str, *, delivered: bool, attempts: int, next_attempt_at: float, error: str, dead: bool
    ) -> None:
        if delivered:
            await self._execute("DELETE FROM webhook_outbox WHERE delivery_id = $1", (delivery_id,))
            return
        sql = (
            "UPDATE webhook_outbox SET state = $1, attempts = $2, next_attempt_at = $3, last_error = $4 "
            "WHERE delivery_id = $5"
        )
        state = "dead" if dead else "pending"
        await self._execute(sql, (state, int(attempts), float(next_attempt_at), error, delivery_id))

    async def dead_webhooks(self, *, limit: int = 100) -> list[WebhookRecord]:
        dead = "state = 'dead' ORDER BY created_at DESC, seq DESC LIMIT $1"
        sql = f"{_select('webhook_outbox', _WEBHOOK_COLS)} WHERE {dead}"
        return [WebhookRecord(*r) for r in await self._fetch(sql, (limit,))]

    async def redeliver_webhook(self, delivery_id: str, now: float) -> bool:
        found = await self._fetch("SELECT 1 FROM webhook_outbox WHERE delivery_id = $1", (delivery_id,))
        if not found:
            return False
        sql = "UPDATE webhook_outbox SET state = 'pending', attempts = 0, next_attempt_at = $1 WHERE delivery_id = $2"
        await self._execute(sql, (float(now), delivery_id))
        return True

    # -- reads -------------------------------------------------------------------------------------------

    async def journey(self, device_id: str, *, limit: int = 100, since: float | None = None) -> list[SignalRecord]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        return await self._newest("b.device_id = $1", (device_id,), limit, since)

    async def _newest(
        self, where: str, params: Row, limit: int, since: float | None = None, join: str = ""
    ) -> list[SignalRecord]:
        """The newest ``limit`` signals of the batches matching ``where`` (alias b), oldest first: batches are
        read newest last_time first, a page at a time, until no older one can change the answer."""
        newest = Newest(limit, since)
        n = len(params)
        if since is not None:
            where, params, n = f"{where} AND b.last_time >= ${n + 1}", (*params, float(since)), n + 1
        sql = (
            f"SELECT b.seq, b.device_id, b.session_id, b.received_at, b.last_time, b.body FROM signal_batches AS b"
            f"{join} WHERE {where} ORDER BY b.last_time DESC, b.seq DESC LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        page, offset = 16, 0
        while not newest.done:
            rows = await self._fetch(sql, (*params, page, offset))
            newest.feed([(int(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]), str(r[5])) for r in rows])
            if len(rows) < page:
                break
            offset += page
            page = min(page * 2, 512)
        return newest.result()

    async def journey_for_user(self, user_id: str, *, limit: int = 100) -> list[SignalRecord]:
        join = " JOIN sessions AS x ON x.session_id = b.session_id"
        return await self._newest("x.user_id = $1 AND x.identified = 1", (user_id,), limit, join=join)

    async def count_signals(self, device_id: str) -> int:
        rows = await self._fetch(
            "SELECT COALESCE(SUM(count), 0) FROM signal_batches WHERE device_id = $1", (device_id,)
        )
        return int(rows[0][0])

    async def get_session(self, session_id: str) -> SessionRecord | None:
        rows = await self._fetch(f"{_select('sessions', _SESSION_COLS)} WHERE session_id = $1", (session_id,))
        return _session_from(tuple(rows[0])) if rows else None

    async def latest_session(self, device_id: str) -> SessionRecord | None:
        sql = f"{_select('sessions', _SESSION_COLS)} WHERE device_id = $1 ORDER BY started_at DESC LIMIT 1"
        rows = await self._fetch(sql, (device_id,))
        return _session_from(tuple(rows[0])) if rows else None

    async def get_cue(self, cue_id: str) -> CueRecord | None:
        rows = await self._fetch(f"{_select('cues', _CUE_COLS)} WHERE cue_id = $1", (cue_id,))
        return _cue_from(tuple(rows[0])) if rows else None

    async def cues_for_subject(
        self, subject: str, *, since: float | None = None, scenario_id: str | None = None
    ) -> list[CueRecord]:
        where, params = ["subject = $1"], list[object]([subject])
        if scenario_id is not None:
            params.append(scenario_id)
            where.append(f"scenario_id = ${len(params)}")
        if since is not None:
            params.append(float(since))
            where.append(f"created_at >= ${len(params)}")
        sql = f"{_select('cues', _CUE_COLS)} WHERE {' AND '.join(where)} ORDER BY created_at, seq"
        return [_cue_from(tuple(r)) for r in await self._fetch(sql, tuple(params))]

    async def cues_for_session(self, session_id: str) -> list[CueRecord]:
        sql = f"{_select('cues', _CUE_COLS)} WHERE session_id = $1 ORDER BY created_at, seq"
        return [_cue_from(tuple(r)) for r in await self._fetch(sql, (session_id,))]

    async def decisions_for_device(
        self, device_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[DecisionRecord]:
        if since is None:
            sql = f"{_select('decisions', _DECISION_COLS)} WHERE device_id = $1 ORDER BY time DESC, seq DESC LIMIT $2"
            rows = await self._fetch(sql, (device_id, limit))
        else:
            sql = (
                f"{_select('decisions', _DECISION_COLS)} WHERE device_id = $1 AND time >= $2 "
                "ORDER BY time DESC, seq DESC LIMIT $3"
            )
            rows = await self._fetch(sql, (device_id, float(since), limit))
        return [DecisionRecord(*r) for r in reversed(rows)]

    async def get_engagement(self, engagement_id: str) -> EngagementRecord | None:
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE engagement_id = $1"
        rows = await self._fetch(sql, (engagement_id,))
        return _engagement_from(tuple(rows[0])) if rows else None

    async def engagement_for_cue(self, cue_id: str) -> EngagementRecord | None:
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE cue_id = $1 ORDER BY created_at, seq LIMIT 1"
        rows = await self._fetch(sql, (cue_id,))
        return _engagement_from(tuple(rows[0])) if rows else None

    async def engagements_for_subject(self, subject: str, *, limit: int = 20) -> list[EngagementRecord]:
        sql = (
            f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE subject = $1 ORDER BY created_at DESC, seq DESC LIMIT $2"
        )
        return [_engagement_from(tuple(r)) for r in await self._fetch(sql, (subject, limit))]

    async def engagements_for_device(self, device_id: str) -> list[EngagementRecord]:
        sql = f"{_select('engagements', _ENGAGEMENT_COLS)} WHERE device_id = $1 ORDER BY created_at, seq"
        return [_engagement_from(tuple(r)) for r in await self._fetch(sql, (device_id,))]

    async def chat_transcript(self, engagement_id: str) -> list[ChatRecord]:
        sql = f"{_select('chat_messages', _CHAT_COLS)} WHERE engagement_id = $1 ORDER BY time, seq"
        return [ChatRecord(*r) for r in await self._fetch(sql, (engagement_id,))]

    async def get_feedback(self, engagement_id: str) -> FeedbackRecord | None:
        rows = await self._fetch(f"{_select('feedback', _FEEDBACK_COLS)} WHERE engagement_id = $1", (engagement_id,))
        return FeedbackRecord(*rows[0]) if rows else None

    async def stopped_variants(self) -> set[tuple[str, str]]:
        rows = await self._fetch("SELECT scenario_id, variant_id FROM variant_switches WHERE stopped = 1")
        return {(str(r[0]), str(r[1])) for r in rows}

    async def channel_changes(self, engagement_id: str) -> list[ChannelChangeRecord]:
        sql = f"{_select('channel_changes', _CHANGE_COLS)} WHERE engagement_id = $1 ORDER BY time, seq"
        return [
            ChannelChangeRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
            for r in await self._fetch(sql, (engagement_id,))
        ]

    async def funnel_counts(self, cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
        return [
            (kind, [tuple(_plain_value(v) for v in r) for r in await self._fetch(sql, tuple(params))])
            for kind, sql, params in funnel_queries(cut, "postgres")
        ]

    # -- recovery after a restart ----------------------------------------------------------------------

    async def open_cue(self, device_id: str) -> CueRecord | None:
        sql = (
            f"{_select('cues', _CUE_COLS)} WHERE device_id = $1 AND status = 'offered' "
            "ORDER BY created_at DESC, seq DESC LIMIT 1"
        )
        rows = await self._fetch(sql, (device_id,))
        return _cue_from(tuple(rows[0])) if rows else None

    async def recent_handle_times(self, per_queue: int) -> list[tuple[str, float]]:
        sql = """
            SELECT queue, ended_at - assigned_at FROM (
                SELECT queue, assigned_at, ended_at,
                    ROW_NUMBER() OVER (PARTITION BY queue ORDER BY ended_at DESC) AS n
                FROM engagements
                WHERE state = 'ended' AND assigned_at IS NOT NULL AND ended_at IS NOT NULL
            ) AS recent WHERE n <= $1 ORDER BY queue, ended_at"""
        return [(str(r[0]), float(r[1])) for r in await self._fetch(sql, (per_queue,))]

    async def repair_unfinished_accepts(self, now: float) -> tuple[int, int]:
        """Accepted cues without an engagement (SQLite databases of older versions; kept for parity)."""
        orphan = "status = 'accepted' AND NOT EXISTS (SELECT 1 FROM engagements AS e WHERE e.cue_id = cues.cue_id)"

        async def run(link: _Link) -> tuple[tuple[int, int], int]:
            again = await link.execute(
                f"UPDATE cues SET status = 'offered', responded_at = NULL, button_id = '' "
                f"WHERE {orphan} AND expires_at > $1",
                float(now),
            )
            lost = await link.execute(f"UPDATE cues SET status = 'lost' WHERE {orphan}")
            counts = (int(again.rsplit(" ", 1)[-1]), int(lost.rsplit(" ", 1)[-1]))
            return counts, sum(counts)

        repaired: tuple[int, int] = await self._writer.transaction(run)
        return repaired

    async def open_engagements(self) -> list[EngagementRecord]:
        sql = (
            f"{_select('engagements', _ENGAGEMENT_COLS)} "
            "WHERE state IN ('queued', 'assigned', 'callback_requested') ORDER BY created_at, seq"
        )
        return [_engagement_from(tuple(r)) for r in await self._fetch(sql)]

    async def recent_signal_ids(self, device_id: str, *, limit: int) -> list[str]:
        return [r.signal_id for r in await self._newest("b.device_id = $1", (device_id,), limit)]

    # -- privacy ---------------------------------------------------------------------------------------

    async def forget_session_journey(self, session_id: str) -> None:
        await self._execute("DELETE FROM signal_batches WHERE session_id = $1", (session_id,))

    async def forget_unconsented(self, *, ended_before: float) -> None:
        sessions = "SELECT session_id FROM sessions WHERE consent = 'none' AND COALESCE(ended_at, started_at) < $1"
        await self._execute(f"DELETE FROM signal_batches WHERE session_id IN ({sessions})", (float(ended_before),))

    async def purge_journey(self, older_than: float) -> int:
        """Retention: whole batches whose newest signal is older go; a batch with signals on both sides keeps
        the newer ones (rewritten in place). Returns the signals deleted."""
        cut = float(older_than)

        async def run(link: _Link) -> tuple[int, int]:
            removed = int(
                await link.fetchval(
                    "WITH d AS (DELETE FROM signal_batches WHERE last_time < $1 RETURNING count) "
                    "SELECT COALESCE(SUM(count), 0) FROM d",
                    cut,
                )
            )
            for row in await link.fetch("SELECT seq, body FROM signal_batches WHERE first_time < $1", cut):
                trim = trimmed(str(row[1]), cut)
                if trim is not None:
                    kept, dropped, first = trim
                    await link.execute(
                        "UPDATE signal_batches SET body = $1, count = count - $2, first_time = $3 WHERE seq = $4",
                        kept,
                        dropped,
                        first,
                        row[0],
                    )
                    removed += dropped
            await link.execute("DELETE FROM decisions WHERE time < $1", cut)
            return removed, 2

        result: int = await self._writer.transaction(run, 2)
        return result

    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        subject = f"user:{user_id}"
        where = dict(_USER_ROWS)
        tables = [*_EXPORT_ORDER, *(t for t, _ in _USER_ROWS if t not in _EXPORT_ORDER and t not in _NOT_EXPORTED)]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in tables:
            order = " ORDER BY time, batch_seq, position" if table == "signals" else ""
            params = (user_id, subject) if "$2" in where[table] else (user_id,)
            rows = await self._fetch(f"SELECT * FROM {table} WHERE {where[table]}{order}", params)
            out[table] = [_plain(list(r.keys()), tuple(r.values())) for r in rows]
        return out

    async def erase_user(self, user_id: str) -> dict[str, int]:
        subject = f"user:{user_id}"

        async def run(link: _Link) -> tuple[dict[str, int], int]:
            counts: dict[str, int] = {}  # the subject's lock was taken with BEGIN (`keys`)
            for table, where in _USER_ROWS:
                params = (user_id, subject) if "$2" in where else (user_id,)
                if table == "signals":
                    # The journal's rows are batches: count the signals they held.
                    deleted = await link.fetchval(
                        f"WITH d AS (DELETE FROM signal_batches WHERE {where} RETURNING count) "
                        "SELECT COALESCE(SUM(count), 0) FROM d",
                        *params,
                    )
                    counts[table] = int(deleted)
                    continue
                status = await link.execute(f"DELETE FROM {table} WHERE {where}", *params)
                counts[table] = int(status.rsplit(" ", 1)[-1])
            return counts, sum(counts.values())

        counts: dict[str, int] = await self._writer.transaction(run, len(_USER_ROWS), locks=True, keys=(subject,))
        return counts

    async def checkpoint(self) -> bool:
        """PostgreSQL keeps erased rows' old versions until vacuumed: vacuum the tables an erasure touches."""
        if self._closing is not None:
            raise StoreClosedError("store is closed")
        async with self._pool.acquire() as conn:
            for table, _ in _USER_ROWS:
                self._counter.round_trips += 1
                await conn.execute(f"VACUUM {'signal_batches' if table == 'signals' else table}")
        return True

    # -- device credentials ----------------------------------------------------------------------------

    async def device_credential(self, device_id: str) -> DeviceCredentialRecord | None:
        cols = "device_id, app_id, secret_sha256, issued_at, confirmed_at"
        rows = await self._fetch(f"SELECT {cols} FROM device_credentials WHERE device_id = $1", (device_id,))
        return DeviceCredentialRecord(*rows[0]) if rows else None

    async def issue_device_credential(self, rec: DeviceCredentialRecord) -> bool:
        await self._execute(
            "INSERT INTO device_credentials (device_id, app_id, secret_sha256, issued_at, confirmed_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_id) DO NOTHING",
            (rec.device_id, rec.app_id, bytes(rec.secret_sha256), float(rec.issued_at), _opt(rec.confirmed_at)),
        )
        stored = await self.device_credential(rec.device_id)
        return stored is not None and stored.secret_sha256 == rec.secret_sha256

    async def confirm_device_credential(self, device_id: str, at: float) -> None:
        await self._execute(
            "UPDATE device_credentials SET confirmed_at = $1 WHERE device_id = $2 AND confirmed_at IS NULL",
            (float(at), device_id),
        )

    async def forget_device_credential(self, device_id: str) -> bool:
        existed = await self.device_credential(device_id) is not None
        await self._execute("DELETE FROM device_credentials WHERE device_id = $1", (device_id,))
        return existed

    # -- predictive scores -----------------------------------------------------------------------------

    async def save_label(
        self, outcome: str, session_id: str, reached: bool, examples: Sequence[tuple[Mapping[str, float], float]],
        time: float,
    ) -> None:  # fmt: skip
        encoded = _dumps([[dict(x), p] for x, p in examples])
        sql = "INSERT INTO predict_labels (outcome, session_id, reached, examples, time) VALUES ($1, $2, $3, $4, $5)"
        await self._execute(sql, (outcome, session_id, int(reached), encoded, float(time)))

    async def labels_after(self, cursor: int, *, limit: int = 500) -> list[LabelRecord]:
        sql = (
            "SELECT id, outcome, session_id, reached, examples, time FROM predict_labels "
            "WHERE id > $1 ORDER BY id LIMIT $2"
        )
        return [
            LabelRecord(
                int(r[0]), str(r[1]), str(r[2]), bool(r[3]), [(dict(x), float(p)) for x, p in json.loads(r[4])], r[5]
            )
            for r in await self._fetch(sql, (int(cursor), limit))
        ]

    async def prune_labels(self, up_to: int) -> None:
        await self._execute("DELETE FROM predict_labels WHERE id <= $1", (int(up_to),))

    async def save_model(self, record: ModelRecord) -> None:
        row = (record.outcome, int(record.version), int(record.epoch), int(record.cursor), _dumps(record.state))
        await self._execute(_SAVE_MODEL, (*row, float(record.saved_at)))

    async def models(self) -> list[ModelRecord]:
        sql = "SELECT outcome, version, epoch, cursor, state, saved_at FROM predict_models ORDER BY outcome"
        return [
            ModelRecord(str(r[0]), int(r[1]), int(r[2]), int(r[3]), json.loads(r[4]), float(r[5]))
            for r in await self._fetch(sql)
        ]

    async def take_lease(self, name: str, holder: str, now: float, ttl: float) -> int | None:
        await self._execute(_TAKE_LEASE, (name, holder, float(now + ttl), float(now)))
        rows = await self._fetch("SELECT holder, epoch FROM leases WHERE name = $1", (name,))
        return int(rows[0][1]) if rows and rows[0][0] == holder else None

    async def release_lease(self, name: str, holder: str) -> None:
        await self._execute("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2", (name, holder))

    async def subject_history(self, user_id: str, device_id: str, before: float) -> tuple[int, dict[str, int]]:
        column, key = ("user_id", user_id) if user_id else ("device_id", device_id)
        earlier = f"SELECT session_id FROM sessions WHERE {column} = $1 AND started_at < $2"
        count = await self._fetch(f"SELECT COUNT(*) FROM ({earlier}) AS e", (key, float(before)))
        reached = await self._fetch(
            f"SELECT milestone_id, COUNT(DISTINCT session_id) FROM milestones WHERE session_id IN ({earlier}) "
            "GROUP BY milestone_id",
            (key, float(before)),
        )
        return int(count[0][0]), {str(r[0]): int(r[1]) for r in reached}

    # -- the admin audit trail -------------------------------------------------------------------------

    async def append_audit(self, rec: AuditRecord) -> None:
        sql = (
            "INSERT INTO audit_log (time, actor, roles, action, target, outcome, detail, before, after) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )
        params = (
            float(rec.time), rec.actor, ",".join(rec.roles), rec.action, rec.target, rec.outcome, rec.detail,
            json.dumps(dict(rec.before), sort_keys=True, default=str),
            json.dumps(dict(rec.after), sort_keys=True, default=str),
        )  # fmt: skip
        await self._execute(sql, params)

    async def audit_entries(
        self, *, since: float | None = None, actor: str = "", action: str = "", limit: int = 100
    ) -> list[AuditRecord]:
        where: list[str] = ["1 = 1"]
        params: list[object] = []
        for column, value in (("time >=", None if since is None else float(since)), ("actor =", actor or None),
                              ("action =", action or None)):  # fmt: skip
            if value is not None:
                params.append(value)
                where.append(f"{column} ${len(params)}")
        params.append(limit)
        cols = "id, time, actor, roles, action, target, outcome, detail, before, after"
        sql = f"SELECT {cols} FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ${len(params)}"
        return [audit_from_row(tuple(r)) for r in await self._fetch(sql, tuple(params))]
