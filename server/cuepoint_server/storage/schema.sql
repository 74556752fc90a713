-- Cuepoint storage schema, version 17 (tracked in PRAGMA user_version by sqlite.py).
-- Never edit a released version in place: add a migration step that moves user_version forward.
-- Dict-valued fields are stored as compact JSON TEXT so they stay queryable with SQLite's json functions.
-- No foreign keys between tables on purpose: ingesting a signal or an engagement must never be refused
-- because a related row is late or was pruned; referential checks belong to the service layer.

-- identified (version 6) is 1 when user_id is the session's identity (verified by a user token, or taken at
-- its word without auth), so its journey stitches with the user's other sessions; 0: the id is only claimed.
CREATE TABLE IF NOT EXISTS sessions (
    session_id  TEXT PRIMARY KEY,
    app_id      TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    context     TEXT NOT NULL,
    consent     TEXT NOT NULL,
    identified  INTEGER NOT NULL DEFAULT 0
);

-- The signal journal (version 17; storage/journal.py): one row per batch of signals, not one per signal.
-- body holds the batch's signals as a compact JSON array [[id, kind, name, time, payload], ...]; the other
-- columns index it. A rowid table: the rowid gives arrival order (equal times keep the order they came in).
-- run = 1: every id sorted above the device's high-water mark when stored, so one device's runs cover
-- disjoint [min_id, max_id] ranges and a resent id is found with one seek on signal_batches_device_run.
CREATE TABLE IF NOT EXISTS signal_batches (
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
);
CREATE INDEX IF NOT EXISTS signal_batches_device_time ON signal_batches (device_id, last_time);
CREATE INDEX IF NOT EXISTS signal_batches_device_run ON signal_batches (device_id, max_id) WHERE run = 1;
-- Each device's high-water mark: the largest signal id it ever stored (never lowered, kept on erasure:
-- ids are random and hold nothing of the user).
CREATE TABLE IF NOT EXISTS signal_marks (
    device_id TEXT PRIMARY KEY,
    high      TEXT NOT NULL
) WITHOUT ROWID;
-- The ids of every stored batch that was not a run (resends mixed with new ids, ids out of order).
CREATE TABLE IF NOT EXISTS signal_ids (
    device_id TEXT NOT NULL,
    signal_id TEXT NOT NULL,
    PRIMARY KEY (device_id, signal_id)
) WITHOUT ROWID;
-- One row per signal, as the journal looked before version 17 (exports, reports, ad-hoc queries); ordered
-- by arrival: (batch_seq, position).
CREATE VIEW IF NOT EXISTS signals AS
    SELECT b.device_id AS device_id, e.value ->> 0 AS signal_id, b.session_id AS session_id,
        e.value ->> 1 AS kind, e.value ->> 2 AS name, e.value ->> 3 AS time, b.received_at AS received_at,
        e.value -> 4 AS payload, b.rowid AS batch_seq, e.key AS position
    FROM signal_batches AS b, json_each(b.body) AS e;

-- variant: the A/B variant shown ('' without variants); locale: the locale its text was chosen for
-- ('' = default); button_id: the button the user pressed to answer ('' = none).
CREATE TABLE IF NOT EXISTS cues (
    cue_id       TEXT PRIMARY KEY,
    scenario_id  TEXT NOT NULL,
    app_id       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    subject      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    channel      TEXT NOT NULL,
    message      TEXT NOT NULL,
    status       TEXT NOT NULL,
    responded_at REAL,
    explanation  TEXT NOT NULL,
    variant      TEXT NOT NULL DEFAULT '',
    locale       TEXT NOT NULL DEFAULT '',
    button_id    TEXT NOT NULL DEFAULT ''
);
-- Frequency caps and cooldowns look up a subject's recent cues per scenario.
CREATE INDEX IF NOT EXISTS cues_subject_scenario_created ON cues (subject, scenario_id, created_at);

-- callback_at / callback_number: a callback the user chose, queued again at callback_at (epoch seconds).
CREATE TABLE IF NOT EXISTS engagements (
    engagement_id TEXT PRIMARY KEY,
    cue_id        TEXT NOT NULL,
    app_id        TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    queue         TEXT NOT NULL,
    state         TEXT NOT NULL,
    channel       TEXT NOT NULL,
    created_at    REAL NOT NULL,
    assigned_at   REAL,
    ended_at      REAL,
    associate_id  TEXT NOT NULL,
    disposition   TEXT NOT NULL,
    notes         TEXT NOT NULL,
    context       TEXT NOT NULL,
    subject       TEXT NOT NULL DEFAULT '',
    scenario_id   TEXT NOT NULL DEFAULT '',
    priority      INTEGER NOT NULL DEFAULT 0,
    -- "", pending, achieved or not_achieved: did the scenario's success event follow?
    outcome       TEXT NOT NULL DEFAULT '',
    -- wrapped_up_at: when the associate wrapped it up, with the end or later (the user left first), or NULL
    ended_by      TEXT NOT NULL DEFAULT '',
    callback_at     REAL,
    callback_number TEXT NOT NULL DEFAULT '',
    wrapped_up_at   REAL,
    -- The outcome the associate recorded at wrap-up, and whether the queue counts it as success.
    wrap_up_outcome TEXT NOT NULL DEFAULT '',
    wrap_up_success INTEGER NOT NULL DEFAULT 0,
    -- The user's answer to the fallback that keeps it open ("chat"), '' when none: never offered again.
    fallback_choice TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS engagements_subject_created ON engagements (subject, created_at);

-- Chat relayed through the server, both directions.
CREATE TABLE IF NOT EXISTS chat_messages (
    message_id    TEXT PRIMARY KEY,
    engagement_id TEXT NOT NULL,
    sender        TEXT NOT NULL CHECK (sender IN ('user', 'associate', 'system')),
    text          TEXT NOT NULL,
    time          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_engagement_time ON chat_messages (engagement_id, time);

-- Transfers of an engagement between associates or queues (blind or after a consult).
CREATE TABLE IF NOT EXISTS engagement_transfers (
    engagement_id     TEXT NOT NULL,
    time              REAL NOT NULL,
    from_associate_id TEXT NOT NULL,
    to_associate_id   TEXT NOT NULL,
    to_queue          TEXT NOT NULL,
    mode              TEXT NOT NULL CHECK (mode IN ('blind', 'consult')),
    note              TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_engagement ON engagement_transfers (engagement_id);

-- Associates who joined an engagement besides its owner: conference, consult, supervisors
-- monitoring or barging in (an audit of who saw what), with their own wrap-up of their part.
CREATE TABLE IF NOT EXISTS engagement_participants (
    engagement_id TEXT NOT NULL,
    associate_id  TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('conference', 'consult', 'monitor', 'barge')),
    joined_at     REAL NOT NULL,
    left_at       REAL,
    disposition   TEXT NOT NULL,
    notes         TEXT NOT NULL,
    PRIMARY KEY (engagement_id, associate_id, role, joined_at)
);

-- Every channel change asked for, granted or refused.
CREATE TABLE IF NOT EXISTS channel_changes (
    engagement_id TEXT NOT NULL,
    time          REAL NOT NULL,
    request_id    TEXT NOT NULL,
    from_channel  TEXT NOT NULL,
    to_channel    TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    accepted      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS channel_changes_engagement ON channel_changes (engagement_id, time);
CREATE INDEX IF NOT EXISTS engagements_device_created ON engagements (device_id, created_at);
CREATE INDEX IF NOT EXISTS engagements_cue ON engagements (cue_id);

-- Every arbitration outcome for a scenario that qualified: offered, or blocked
-- with a reason. Answers "why did this device not get a cue?" and feeds funnels.
CREATE TABLE IF NOT EXISTS decisions (
    time        REAL NOT NULL,
    app_id      TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    subject     TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('offered', 'blocked')),
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    cue_id      TEXT NOT NULL,
    -- The scenario's outcome milestone at decision time ('' if none): what counts as conversion in funnels.
    outcome_milestone TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS decisions_device_time ON decisions (device_id, time);
CREATE INDEX IF NOT EXISTS decisions_scenario_time ON decisions (scenario_id, time);
CREATE INDEX IF NOT EXISTS decisions_cue ON decisions (cue_id) WHERE cue_id != '';

-- Milestones reached, once per session each: funnels count conversions (the scenario's
-- outcome milestone) for offered and held-out sessions alike.
CREATE TABLE IF NOT EXISTS milestones (
    time         REAL NOT NULL,
    app_id       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    milestone_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS milestones_session ON milestones (session_id, milestone_id, time);
-- Funnels read a scenario's cues over a time range, and a session's cues.
CREATE INDEX IF NOT EXISTS cues_scenario_created ON cues (scenario_id, created_at);
CREATE INDEX IF NOT EXISTS cues_session ON cues (session_id);

-- A/B variants stopped at runtime (AdminService.SetVariantStopped): their users see the control.
CREATE TABLE IF NOT EXISTS variant_switches (
    scenario_id TEXT NOT NULL,
    variant_id  TEXT NOT NULL,
    stopped     INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    time        REAL NOT NULL,
    PRIMARY KEY (scenario_id, variant_id)
);

-- Satisfaction ratings asked for when an engagement ended (CSAT 1-5 or NPS 0-10), one per engagement.
-- Scenario, queue, associate and variant are copied from the engagement so reports need no joins.
CREATE TABLE IF NOT EXISTS feedback (
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
);
CREATE INDEX IF NOT EXISTS feedback_time ON feedback (time);

-- One credential per device id (version 4): the SHA-256 of the secret issued on the device's first
-- connection, never the secret itself. confirmed_at: when the install first presented it, which tells an
-- SDK that keeps its secret from one that predates device credentials (migration mode).
CREATE TABLE IF NOT EXISTS device_credentials (
    device_id     TEXT PRIMARY KEY,
    app_id        TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    issued_at     REAL NOT NULL,
    confirmed_at  REAL
);

-- Predictive scores (predict_state.py holds the same statements as the version 7 migration).
-- Labelled sessions waiting to be learned, in id order: features and prediction at each scoring moment.
CREATE TABLE IF NOT EXISTS predict_labels (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    outcome    TEXT NOT NULL,
    session_id TEXT NOT NULL,
    reached    INTEGER NOT NULL,
    examples   TEXT NOT NULL,
    time       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS predict_labels_session ON predict_labels (session_id);
-- One row per outcome: the learned state (JSON), its version, the trainer epoch that saved it, and the id of
-- the last labelled session it learned.
CREATE TABLE IF NOT EXISTS predict_models (
    outcome  TEXT PRIMARY KEY,
    version  INTEGER NOT NULL,
    epoch    INTEGER NOT NULL,
    cursor   INTEGER NOT NULL,
    state    TEXT NOT NULL,
    saved_at REAL NOT NULL
);
-- Who may do a singleton job (the model trainer) across processes; epoch grows with each new holder.
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
-- Earlier sessions of a user or device (features of predictive scores).
CREATE INDEX IF NOT EXISTS sessions_user_started ON sessions (user_id, started_at);
CREATE INDEX IF NOT EXISTS sessions_device_started ON sessions (device_id, started_at);
-- Operations switches set through AdminService (version 8), so they outlast a restart. scope 'offers'
-- (scope_id ''): is_on 0 = offers paused; scope 'scenario' (scope_id: its id): is_on 0 = disabled.
CREATE TABLE IF NOT EXISTS switches (
    scope    TEXT NOT NULL CHECK (scope IN ('offers', 'scenario')),
    scope_id TEXT NOT NULL,
    is_on    INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    time     REAL NOT NULL,
    PRIMARY KEY (scope, scope_id)
);

-- The durable webhook outbox (version 8): one row per delivery, written when the event happens, deleted
-- once the receiver took it; after the last attempt (or a 4xx) it stays as 'dead' for AdminService to
-- list and redeliver.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    delivery_id     TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (state, next_attempt_at);

-- The admin audit trail (version 10): one row per admin action, append-only; who (actor, roles), what
-- (action, target), the outcome and the state before and after (JSON). No personal data (audit_log.py).
CREATE TABLE IF NOT EXISTS audit_log (
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
);
CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (time);

-- The replicas registry (version 14): one row per running replica, rewritten on its every cluster sweep
-- (last_seen is the heartbeat), deleted when it stops cleanly; alive = seen within a few sweeps.
CREATE TABLE IF NOT EXISTS replicas (
    replica_id        TEXT PRIMARY KEY,
    started_at        REAL NOT NULL,
    last_seen         REAL NOT NULL,
    address           TEXT NOT NULL,
    host              TEXT NOT NULL,
    scenarios_version TEXT NOT NULL,
    draining          INTEGER NOT NULL
);

-- Associate slots shared by replicas (version 15; slots.py holds the same statements): one row per
-- associate with the time they became idle (longest-idle order), one per slot held (an offer or an
-- engagement) with the replica holding it, and the replica routing each open engagement.
CREATE TABLE IF NOT EXISTS associate_slots (
    associate_id TEXT PRIMARY KEY,
    idle_since   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS associate_holds (
    hold_key     TEXT NOT NULL,
    associate_id TEXT NOT NULL,
    channel      TEXT NOT NULL,
    queue        TEXT NOT NULL,
    replica      TEXT NOT NULL,
    held_at      REAL NOT NULL,
    PRIMARY KEY (hold_key, associate_id)
);
CREATE INDEX IF NOT EXISTS associate_holds_associate ON associate_holds (associate_id);
CREATE INDEX IF NOT EXISTS associate_holds_replica ON associate_holds (replica);
CREATE TABLE IF NOT EXISTS engagement_owners (
    engagement_id TEXT PRIMARY KEY,
    replica       TEXT NOT NULL,
    owned_at      REAL NOT NULL
);

-- Timers as rows (version 16, timer_rows.py): deadlines that must outlive the replica that armed them (a
-- cue's expiry, a callback's time). Fired once: the effect's transaction marks the row done where armed.
CREATE TABLE IF NOT EXISTS timers (
    timer_id      TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    target        TEXT NOT NULL,
    due_at        REAL NOT NULL,
    owner         TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('armed', 'done')),
    claimed_by    TEXT NOT NULL DEFAULT '',
    claimed_until REAL NOT NULL DEFAULT 0,
    fired_at      REAL
);
CREATE INDEX IF NOT EXISTS timers_due ON timers (state, due_at);

-- The delivery outbox (delivery_rows.py): traffic for a stream another replica holds. AUTOINCREMENT: an id
-- is never used twice, since receivers remember the ids they delivered.
CREATE TABLE IF NOT EXISTS delivery_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient     TEXT NOT NULL,
    engagement_id TEXT NOT NULL DEFAULT '',
    device_id     TEXT NOT NULL DEFAULT '',
    body          BLOB NOT NULL,
    created_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_outbox_recipient ON delivery_outbox (recipient, id);
