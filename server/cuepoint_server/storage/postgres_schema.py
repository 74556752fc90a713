"""The PostgreSQL schema as versioned migrations, applied at start under an advisory lock.

Version N's statements move a database from N-1 to N, in one transaction; `cuepoint_schema` holds the
version reached. Replicas starting together take `pg_advisory_lock` first, so one migrates and the others
find the work done. Never edit a released step in place: add the next one.

The tables mirror schema.sql (SQLite) column for column, so both backends read and write the same records:
REAL is DOUBLE PRECISION, BLOB is BYTEA, JSON stays compact text (the funnel casts it to jsonb where it
reads it). Tables SQLite orders by rowid (arrival order for equal times) get an identity column ``seq``.
"""

from __future__ import annotations

import asyncpg
import structlog

from .delivery_rows import DELIVERY_INDEX, delivery_table
from .slots import SLOTS_SCHEMA_PG
from .timer_rows import TIMER_INDEX, timers_table

__all__ = ["PG_SCHEMA_VERSION", "migrate"]

log = structlog.get_logger("cuepoint.storage")

_SEQ = "seq BIGINT GENERATED ALWAYS AS IDENTITY"

_V1: tuple[str, ...] = (
    """CREATE TABLE sessions (
        session_id  TEXT PRIMARY KEY,
        app_id      TEXT NOT NULL,
        device_id   TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        started_at  DOUBLE PRECISION NOT NULL,
        ended_at    DOUBLE PRECISION,
        context     TEXT NOT NULL,
        consent     TEXT NOT NULL,
        identified  INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX sessions_user_started ON sessions (user_id, started_at)",
    "CREATE INDEX sessions_device_started ON sessions (device_id, started_at)",
    f"""CREATE TABLE signals (
        {_SEQ},
        device_id   TEXT NOT NULL,
        signal_id   TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('event', 'context')),
        name        TEXT NOT NULL,
        time        DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        payload     TEXT NOT NULL
    )""",
    "CREATE INDEX signals_device_time ON signals (device_id, time, seq)",
    "CREATE UNIQUE INDEX signals_device_signal ON signals (device_id, signal_id)",
    "CREATE INDEX signals_session ON signals (session_id)",
    "CREATE INDEX signals_time ON signals (time)",
    f"""CREATE TABLE cues (
        {_SEQ},
        cue_id       TEXT PRIMARY KEY,
        scenario_id  TEXT NOT NULL,
        app_id       TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        subject      TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL,
        channel      TEXT NOT NULL,
        message      TEXT NOT NULL,
        status       TEXT NOT NULL,
        responded_at DOUBLE PRECISION,
        explanation  TEXT NOT NULL,
        variant      TEXT NOT NULL DEFAULT '',
        locale       TEXT NOT NULL DEFAULT '',
        button_id    TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX cues_subject_scenario_created ON cues (subject, scenario_id, created_at)",
    "CREATE INDEX cues_subject_created ON cues (subject, created_at)",
    "CREATE INDEX cues_scenario_created ON cues (scenario_id, created_at)",
    "CREATE INDEX cues_session ON cues (session_id)",
    "CREATE INDEX cues_device_offered ON cues (device_id, created_at) WHERE status = 'offered'",
    f"""CREATE TABLE engagements (
        {_SEQ},
        engagement_id TEXT PRIMARY KEY,
        cue_id        TEXT NOT NULL,
        app_id        TEXT NOT NULL,
        device_id     TEXT NOT NULL,
        session_id    TEXT NOT NULL,
        queue         TEXT NOT NULL,
        state         TEXT NOT NULL,
        channel       TEXT NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL,
        assigned_at   DOUBLE PRECISION,
        ended_at      DOUBLE PRECISION,
        associate_id  TEXT NOT NULL,
        disposition   TEXT NOT NULL,
        notes         TEXT NOT NULL,
        context       TEXT NOT NULL,
        subject       TEXT NOT NULL DEFAULT '',
        scenario_id   TEXT NOT NULL DEFAULT '',
        priority      INTEGER NOT NULL DEFAULT 0,
        outcome       TEXT NOT NULL DEFAULT '',
        ended_by      TEXT NOT NULL DEFAULT '',
        callback_at     DOUBLE PRECISION,
        callback_number TEXT NOT NULL DEFAULT '',
        wrapped_up_at   DOUBLE PRECISION
    )""",
    "CREATE INDEX engagements_subject_created ON engagements (subject, created_at)",
    "CREATE INDEX engagements_device_created ON engagements (device_id, created_at)",
    "CREATE INDEX engagements_cue ON engagements (cue_id)",
    "CREATE INDEX engagements_open ON engagements (created_at)"
    " WHERE state IN ('queued', 'assigned', 'callback_requested')",
    f"""CREATE TABLE chat_messages (
        {_SEQ},
        message_id    TEXT PRIMARY KEY,
        engagement_id TEXT NOT NULL,
        sender        TEXT NOT NULL CHECK (sender IN ('user', 'associate', 'system')),
        text          TEXT NOT NULL,
        time          DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX chat_engagement_time ON chat_messages (engagement_id, time)",
    f"""CREATE TABLE engagement_transfers (
        {_SEQ},
        engagement_id     TEXT NOT NULL,
        time              DOUBLE PRECISION NOT NULL,
        from_associate_id TEXT NOT NULL,
        to_associate_id   TEXT NOT NULL,
        to_queue          TEXT NOT NULL,
        mode              TEXT NOT NULL CHECK (mode IN ('blind', 'consult')),
        note              TEXT NOT NULL
    )""",
    "CREATE INDEX transfers_engagement ON engagement_transfers (engagement_id)",
    f"""CREATE TABLE engagement_participants (
        {_SEQ},
        engagement_id TEXT NOT NULL,
        associate_id  TEXT NOT NULL,
        role          TEXT NOT NULL CHECK (role IN ('conference', 'consult', 'monitor', 'barge')),
        joined_at     DOUBLE PRECISION NOT NULL,
        left_at       DOUBLE PRECISION,
        disposition   TEXT NOT NULL,
        notes         TEXT NOT NULL,
        PRIMARY KEY (engagement_id, associate_id, role, joined_at)
    )""",
    f"""CREATE TABLE channel_changes (
        {_SEQ},
        engagement_id TEXT NOT NULL,
        time          DOUBLE PRECISION NOT NULL,
        request_id    TEXT NOT NULL,
        from_channel  TEXT NOT NULL,
        to_channel    TEXT NOT NULL,
        requested_by  TEXT NOT NULL,
        accepted      INTEGER NOT NULL
    )""",
    "CREATE INDEX channel_changes_engagement ON channel_changes (engagement_id, time)",
    f"""CREATE TABLE decisions (
        {_SEQ},
        time        DOUBLE PRECISION NOT NULL,
        app_id      TEXT NOT NULL,
        device_id   TEXT NOT NULL,
        subject     TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        scenario_id TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('offered', 'blocked')),
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        cue_id      TEXT NOT NULL,
        outcome_milestone TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX decisions_device_time ON decisions (device_id, time)",
    "CREATE INDEX decisions_scenario_time ON decisions (scenario_id, time)",
    "CREATE INDEX decisions_cue ON decisions (cue_id) WHERE cue_id != ''",
    "CREATE INDEX decisions_time ON decisions (time)",
    """CREATE TABLE milestones (
        time         DOUBLE PRECISION NOT NULL,
        app_id       TEXT NOT NULL,
        device_id    TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        milestone_id TEXT NOT NULL
    )""",
    "CREATE INDEX milestones_session ON milestones (session_id, milestone_id, time)",
    """CREATE TABLE variant_switches (
        scenario_id TEXT NOT NULL,
        variant_id  TEXT NOT NULL,
        stopped     INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        time        DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scenario_id, variant_id)
    )""",
    """CREATE TABLE feedback (
        engagement_id TEXT PRIMARY KEY,
        cue_id        TEXT NOT NULL,
        scenario_id   TEXT NOT NULL,
        queue         TEXT NOT NULL,
        associate_id  TEXT NOT NULL,
        variant       TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('csat', 'nps')),
        score         INTEGER NOT NULL,
        comment       TEXT NOT NULL,
        time          DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX feedback_time ON feedback (time)",
    """CREATE TABLE device_credentials (
        device_id     TEXT PRIMARY KEY,
        app_id        TEXT NOT NULL,
        secret_sha256 BYTEA NOT NULL,
        issued_at     DOUBLE PRECISION NOT NULL,
        confirmed_at  DOUBLE PRECISION
    )""",
    """CREATE TABLE predict_labels (
        id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        outcome    TEXT NOT NULL,
        session_id TEXT NOT NULL,
        reached    INTEGER NOT NULL,
        examples   TEXT NOT NULL,
        time       DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX predict_labels_session ON predict_labels (session_id)",
    """CREATE TABLE predict_models (
        outcome  TEXT PRIMARY KEY,
        version  BIGINT NOT NULL,
        epoch    BIGINT NOT NULL,
        cursor   BIGINT NOT NULL,
        state    TEXT NOT NULL,
        saved_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        epoch      BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE switches (
        scope    TEXT NOT NULL CHECK (scope IN ('offers', 'scenario')),
        scope_id TEXT NOT NULL,
        is_on    INTEGER NOT NULL,
        reason   TEXT NOT NULL,
        time     DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, scope_id)
    )""",
    f"""CREATE TABLE webhook_outbox (
        {_SEQ},
        delivery_id     TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        kind            TEXT NOT NULL,
        body            TEXT NOT NULL,
        created_at      DOUBLE PRECISION NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
        attempts        INTEGER NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error      TEXT NOT NULL
    )""",
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)",
    """CREATE TABLE audit_log (
        id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        time    DOUBLE PRECISION NOT NULL,
        actor   TEXT NOT NULL,
        roles   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
        detail  TEXT NOT NULL,
        before  TEXT NOT NULL,
        after   TEXT NOT NULL
    )""",
    "CREATE INDEX audit_log_time ON audit_log (time)",
)

# Version -> the statements that reach it from the version before.
# Version 2: the outcome an associate records at wrap-up (the funnel's outcome step).
_V2 = (
    "ALTER TABLE engagements ADD COLUMN IF NOT EXISTS wrap_up_outcome TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE engagements ADD COLUMN IF NOT EXISTS wrap_up_success INTEGER NOT NULL DEFAULT 0",
)
# Version 3: the replicas registry (who runs, what it serves, when it last reported; core/cluster.py).
_V3 = (
    """CREATE TABLE IF NOT EXISTS replicas (
        replica_id        TEXT PRIMARY KEY,
        started_at        DOUBLE PRECISION NOT NULL,
        last_seen         DOUBLE PRECISION NOT NULL,
        address           TEXT NOT NULL,
        host              TEXT NOT NULL,
        scenarios_version TEXT NOT NULL,
        draining          INTEGER NOT NULL
    )""",
)
# Version 4: associate slots and engagement owners shared by replicas (slots.py).
# Version 5: timers as rows (timer_rows.py), claimed with FOR UPDATE SKIP LOCKED once their owner is gone.
_V5 = (timers_table("DOUBLE PRECISION"), TIMER_INDEX)
# Version 6: one journal row per batch (journal.py; SQLite's version 17). Each stored signal becomes a batch
# of one, its id listed in signal_ids (none is a run), and each device's mark is its largest id; the
# per-signal table gives way to a view of the same name and columns. Ids compare bytewise (COLLATE "C"), as
# Python compares them, whatever the database's collation.
_V6 = (
    f"""CREATE TABLE signal_batches (
        {_SEQ} PRIMARY KEY,
        device_id   TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        first_time  DOUBLE PRECISION NOT NULL,
        last_time   DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        count       INTEGER NOT NULL,
        min_id      TEXT COLLATE "C" NOT NULL,
        max_id      TEXT COLLATE "C" NOT NULL,
        run         BOOLEAN NOT NULL,
        body        TEXT NOT NULL
    )""",
    "CREATE INDEX signal_batches_device_time ON signal_batches (device_id, last_time, seq)",
    "CREATE INDEX signal_batches_device_run ON signal_batches (device_id, max_id) WHERE run",
    "CREATE INDEX signal_batches_session ON signal_batches (session_id)",
    "CREATE INDEX signal_batches_time ON signal_batches (last_time)",
    'CREATE TABLE signal_marks (device_id TEXT PRIMARY KEY, high TEXT COLLATE "C" NOT NULL)',
    """CREATE TABLE signal_ids (
        device_id TEXT NOT NULL,
        signal_id TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (device_id, signal_id)
    )""",
    "INSERT INTO signal_batches (device_id, session_id, first_time, last_time, received_at, count, min_id, max_id,"
    " run, body) SELECT device_id, session_id, time, time, received_at, 1, signal_id, signal_id, false,"
    " json_build_array(json_build_array(signal_id, kind, name, time, payload::json))::text FROM signals ORDER BY seq",
    "INSERT INTO signal_ids (device_id, signal_id) SELECT device_id, signal_id FROM signals ON CONFLICT DO NOTHING",
    'INSERT INTO signal_marks (device_id, high) SELECT device_id, max(signal_id COLLATE "C") FROM signals'
    " GROUP BY device_id",
    "DROP TABLE signals",
    """CREATE VIEW signals AS
        SELECT b.device_id, e.value ->> 0 AS signal_id, b.session_id, e.value ->> 1 AS kind, e.value ->> 2 AS name,
            (e.value ->> 3)::double precision AS time, b.received_at, (e.value -> 4)::text AS payload,
            b.seq AS batch_seq, e.position - 1 AS position
        FROM signal_batches AS b
            CROSS JOIN LATERAL json_array_elements(b.body::json) WITH ORDINALITY AS e(value, position)""",
)

# Version 7: the delivery outbox (delivery_rows.py; SQLite's version 18): traffic between replicas, committed
# before the bus says it is there.
_V7 = (
    delivery_table("DOUBLE PRECISION", "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "BYTEA"),
    DELIVERY_INDEX,
)

# Version 8: the user's answer to an engagement's fallback that keeps it open (SQLite's version 19), so a replica
# adopting it does not offer the fallback again (core/desk_timers.py).
_V8 = ("ALTER TABLE engagements ADD COLUMN IF NOT EXISTS fallback_choice TEXT NOT NULL DEFAULT ''",)

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _V1, 2: _V2, 3: _V3, 4: SLOTS_SCHEMA_PG, 5: _V5, 6: _V6, 7: _V7, 8: _V8,
}  # fmt: skip
PG_SCHEMA_VERSION = max(MIGRATIONS)

# One key for every replica of every schema: migrations are rare and short, so serialising them all is fine.
_LOCK = "SELECT pg_advisory_lock(hashtextextended('cuepoint.schema', 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('cuepoint.schema', 0))"


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the connection's schema (the first of its search_path, created if missing) to the newest version.

    Holds a session-level advisory lock meanwhile, so replicas starting at once migrate one after the other:
    the second finds the version already current. Returns the version the database had before.
    """
    await conn.execute(_LOCK)
    try:
        if await conn.fetchval("SELECT current_schema()") is None:
            # The search_path (e.g. ?search_path=tenant_a in the URL) names a schema that does not exist yet.
            path = str(await conn.fetchval("SELECT current_setting('search_path')"))
            first = path.split(",")[0].strip().strip('"')
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(first)}")
        await conn.execute("CREATE TABLE IF NOT EXISTS cuepoint_schema (version INTEGER NOT NULL)")
        found = await conn.fetchval("SELECT max(version) FROM cuepoint_schema")
        before = int(found or 0)
        if before > PG_SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {before} is newer than supported ({PG_SCHEMA_VERSION})")
        if before < PG_SCHEMA_VERSION:
            async with conn.transaction():
                for step in range(before + 1, PG_SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        await conn.execute(statement)
                await conn.execute("DELETE FROM cuepoint_schema")
                await conn.execute("INSERT INTO cuepoint_schema (version) VALUES ($1)", PG_SCHEMA_VERSION)
            log.info("storage.migrated", backend="postgres", from_version=before, to_version=PG_SCHEMA_VERSION)
        return before
    finally:
        await conn.execute(_UNLOCK)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
