from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cuepoint_server.core.replicas import replica_alive
from cuepoint_server.storage import (
    SCHEMA_VERSION,
    ChatRecord,
    CueRecord,
    DecisionRecord,
    EngagementRecord,
    JournalBatch,
    OfferCommit,
    ParticipationRecord,
    ReplicaRecord,
    SessionRecord,
    SignalRecord,
    SlotClaim,
    SlotResult,
    SqliteStore,
    Store,
    StoreClosedError,
    WebhookRecord,
)

# Constraint violations as each backend raises them.
INTEGRITY = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


DEFAULT_PAYLOAD = {"screen": "checkout", "n": 3, "ok": True, "nested": {"a": [1, 2.5]}}


def signal(
    signal_id: str,
    *,
    device_id: str = "dev-1",
    time: float = 1000.0,
    kind: str = "event",
    payload: dict[str, Any] | None = None,
) -> SignalRecord:
    return SignalRecord(
        device_id=device_id,
        signal_id=signal_id,
        session_id="sess-1",
        kind=kind,
        name="screen_view" if kind == "event" else "",
        time=time,
        received_at=time + 0.25,
        payload=DEFAULT_PAYLOAD if payload is None else payload,
    )


def cue(
    cue_id: str = "cue-1", *, subject: str = "user-1", scenario_id: str = "sc-1", created_at: float = 100.0
) -> CueRecord:
    return CueRecord(
        cue_id=cue_id,
        scenario_id=scenario_id,
        app_id="app",
        device_id="dev-1",
        subject=subject,
        session_id="sess-1",
        created_at=created_at,
        expires_at=created_at + 60,
        channel="chat",
        message="Need a hand with checkout?",
        status="offered",
        responded_at=None,
        explanation={"rule": "cart_stall", "matched": ["a", "b"], "score": 0.9},
    )


def engagement(engagement_id: str = "eng-1", *, created_at: float = 200.0) -> EngagementRecord:
    return EngagementRecord(
        engagement_id=engagement_id,
        cue_id="cue-1",
        app_id="app",
        device_id="dev-1",
        session_id="sess-1",
        queue="payments",
        state="queued",
        channel="chat",
        created_at=created_at,
        assigned_at=None,
        ended_at=None,
        associate_id="",
        disposition="",
        notes="",
        context={"cart_value": 129.5, "items": 3},
    )


SESSION = SessionRecord(
    session_id="sess-1",
    app_id="app",
    device_id="dev-1",
    user_id="user-1",
    started_at=10.5,
    context={"locale": "en-GB", "build": 42, "battery": 0.5, "wifi": True},
    consent="analytics",
)


async def test_session_round_trip_upsert_and_end(store: Any) -> None:
    await store.save_session(SESSION)
    assert await store.get_session("sess-1") == SESSION
    assert await store.get_session("missing") is None

    await store.end_session("sess-1", 99.0)
    ended = await store.get_session("sess-1")
    assert ended is not None and ended.ended_at == 99.0

    # Re-saving to update the context must not reopen the session.
    updated = replace(SESSION, context={"locale": "fr-FR"})
    await store.save_session(updated)
    got = await store.get_session("sess-1")
    assert got is not None
    assert got.context == {"locale": "fr-FR"}
    assert got.ended_at == 99.0

    await store.end_session("missing", 1.0)  # no-op, no error


async def test_signal_round_trip_preserves_types(store: Any) -> None:
    rows = [signal("s1"), signal("s2", kind="context", time=1001.0, payload={"locale": "de-DE"})]
    await store.append_signals(rows)
    assert await store.journey("dev-1") == rows
    assert await store.count_signals("dev-1") == 2
    assert await store.count_signals("other") == 0
    await store.append_signals([])


async def test_cue_round_trip_status_and_subject_queries(store: Any) -> None:
    first = cue("cue-1", created_at=100.0)
    await store.save_cue(first)
    assert await store.get_cue("cue-1") == first
    assert await store.get_cue("missing") is None

    await store.set_cue_status("cue-1", "accepted", 105.0)
    got = await store.get_cue("cue-1")
    assert got is not None and (got.status, got.responded_at) == ("accepted", 105.0)

    await store.save_cue(cue("cue-2", created_at=300.0, scenario_id="sc-2"))
    await store.save_cue(cue("cue-3", created_at=200.0))
    await store.save_cue(cue("cue-x", subject="user-2"))
    assert [c.cue_id for c in await store.cues_for_subject("user-1")] == ["cue-1", "cue-3", "cue-2"]
    assert [c.cue_id for c in await store.cues_for_subject("user-1", since=200.0)] == ["cue-3", "cue-2"]
    only_sc1 = await store.cues_for_subject("user-1", scenario_id="sc-1")
    assert [c.cue_id for c in only_sc1] == ["cue-1", "cue-3"]
    assert await store.cues_for_subject("nobody") == []

    # Upsert replaces the whole record.
    replaced = cue("cue-1", created_at=100.0)
    await store.save_cue(replaced)
    assert await store.get_cue("cue-1") == replaced


async def test_engagement_round_trip_and_upsert(store: Any) -> None:
    queued = engagement("eng-1", created_at=200.0)
    await store.save_engagement(queued)
    assert await store.get_engagement("eng-1") == queued
    assert await store.get_engagement("missing") is None

    assigned = replace(queued, state="assigned", assigned_at=210.0, associate_id="a-7")
    await store.save_engagement(assigned)
    await store.save_engagement(engagement("eng-0", created_at=150.0))
    assert await store.get_engagement("eng-1") == assigned
    assert [e.engagement_id for e in await store.engagements_for_device("dev-1")] == ["eng-0", "eng-1"]
    assert await store.engagements_for_device("other") == []


async def test_the_journal_stores_each_device_signal_once_however_old(store: Any) -> None:
    assert await store.append_signals([signal("a"), signal("b", time=1001.0)]) == []
    # The same id on another device is another signal; "a" on dev-1 is a resend, skipped and reported.
    assert await store.append_signals([signal("c", time=1002.0), signal("a"), signal("a", device_id="dev-2")]) == ["a"]
    await store.append_signals([signal(f"later-{i}", time=2000.0 + i) for i in range(5000)])
    assert await store.append_signals([signal("b", time=1001.0), signal("d", time=9000.0)]) == ["b"]
    ids = [s.signal_id for s in await store.journey("dev-1", limit=10_000)]
    assert len(ids) == len(set(ids)) == 5004
    assert await store.recent_signal_ids("dev-2", limit=10) == ["a"]
    # Concurrent callers share one transaction and each hears of its own resends only.
    first, second = await asyncio.gather(
        store.append_signals([signal("e", time=9001.0), signal("c", time=1002.0)]),
        store.append_signals([signal("f", time=9002.0), signal("a", device_id="dev-2")]),
    )
    assert (first, second) == (["c"], ["a"])


async def test_version_8_duplicates_are_dropped_when_the_unique_index_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "v8.db"
    old_schema = (Path(__file__).parent / "data" / "schema_v1.sql").read_text()
    with sqlite3.connect(path) as raw:  # a version 8 journal (no unique key), with a duplicate it allowed
        raw.executescript(old_schema)
        raw.execute("DROP TABLE signals")
        raw.execute(
            "CREATE TABLE signals (device_id TEXT NOT NULL, signal_id TEXT NOT NULL, session_id TEXT NOT NULL,"
            " kind TEXT NOT NULL, name TEXT NOT NULL, time REAL NOT NULL, received_at REAL NOT NULL,"
            " payload TEXT NOT NULL)"
        )
        raw.executemany(
            "INSERT INTO signals VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [("dev-1", i, "sess-1", "event", "screen_view", 1000.0, 1000.0, "{}") for i in ("a", "b", "a")],
        )
        raw.execute("PRAGMA user_version = 8")
    async with await SqliteStore.open(path) as s:
        assert [x.signal_id for x in await s.journey("dev-1")] == ["a", "b"]
        assert await s.append_signals([signal("a")]) == ["a"]


async def test_version_1_database_is_migrated_keeping_its_signals(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    old_schema = (Path(__file__).parent / "data" / "schema_v1.sql").read_text()
    with sqlite3.connect(path) as raw:
        raw.executescript(old_schema)
        raw.execute("PRAGMA user_version = 1")
        raw.executemany(
            "INSERT INTO signals VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [("dev-1", f"old-{i}", "sess-1", "event", "sync_failed", 1000.0 + i, 1000.0, "{}") for i in range(3)],
        )
    async with await SqliteStore.open(path) as s:
        assert [x.signal_id for x in await s.journey("dev-1")] == ["old-0", "old-1", "old-2"]
        await s.append_signals([signal("new", time=1010.0)])
        assert await s.recent_signal_ids("dev-1", limit=2) == ["old-2", "new"]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1] for r in raw.execute("PRAGMA index_list(signal_batches)")}
        # Version 17 stores a row per batch (journal.py); the per-signal table became a view.
        assert indexes == {"signal_batches_device_time", "signal_batches_device_run"}
        kinds = dict(raw.execute("SELECT name, type FROM sqlite_master WHERE name IN ('signals', 'signal_ids')"))
        assert kinds == {"signals": "view", "signal_ids": "table"}
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"predict_labels", "predict_models", "leases"} <= tables  # version 3
        assert "replicas" in tables  # version 14
    # Opening again is a no-op.
    async with await SqliteStore.open(path) as s:
        assert await s.count_signals("dev-1") == 4


async def test_concurrent_callers_are_batched(store: Any) -> None:
    before = store.stats

    async def caller(n: int) -> None:
        await store.append_signals(
            [signal(f"c{n}-{i}", device_id=f"dev-{n % 7}", time=float(n * 10 + i)) for i in range(5)]
        )

    await asyncio.gather(*(caller(n) for n in range(200)))
    after = store.stats
    assert after.ops - before.ops == 200
    assert after.rows - before.rows == 1000
    assert after.batches - before.batches < 200 // 4
    assert sum([await store.count_signals(f"dev-{d}") for d in range(7)]) == 1000


async def test_small_max_batch_splits_transactions(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "db.sqlite", max_batch=10) as s:
        await asyncio.gather(*(s.append_signals([signal(f"x{n}-{i}") for i in range(5)]) for n in range(20)))
        assert s.stats.batches >= 10
        assert await s.count_signals("dev-1") == 100


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "persist.db")
    s = await SqliteStore.open(path)
    await s.save_session(SESSION)
    await s.append_signals([signal("p1"), signal("p2", time=1001.0)])
    await s.save_cue(cue())
    await s.save_engagement(engagement())
    await s.close()
    await s.close()  # idempotent

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.get_session("sess-1") == SESSION
        assert [x.signal_id for x in await reopened.journey("dev-1")] == ["p1", "p2"]
        assert await reopened.recent_signal_ids("dev-1", limit=10) == ["p1", "p2"]
        assert await reopened.get_cue("cue-1") == cue()
        assert await reopened.get_engagement("eng-1") == engagement()
    finally:
        await reopened.close()


async def test_close_drains_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "drain.db"
    s = await SqliteStore.open(path)
    writes = [asyncio.ensure_future(s.append_signals([signal(f"d{i}")])) for i in range(50)]
    await asyncio.sleep(0)  # let the writes enqueue before close is requested
    await s.close()
    assert all(w.done() and w.exception() is None for w in writes)
    with pytest.raises(StoreClosedError):
        await s.append_signals([signal("late")])

    async with await SqliteStore.open(path) as again:
        assert await again.count_signals("dev-1") == 50


async def test_unserialisable_payload_fails_only_its_caller(store: Any) -> None:
    with pytest.raises(TypeError):
        await store.append_signals([signal("bad", payload={"when": object()})])
    with pytest.raises(ValueError):
        await store.append_signals([signal("nan", payload={"x": float("nan")})])
    await store.append_signals([signal("good")])
    assert [s.signal_id for s in await store.journey("dev-1")] == ["good"]
    assert [s.signal_id for s in await store.journey("dev-1")] == ["good"]
    assert store.stats.failed_ops == 0  # rejected before reaching the writer


async def test_failing_statement_in_a_batch_fails_only_its_caller(store: Any) -> None:
    with pytest.raises(ValueError, match="kind"):  # checked before the writer, as the schema can not
        await store.append_signals([signal("bad", kind="bogus")])
    # A chat's sender is constrained in the schema, so this fails inside the shared transaction.
    good = [store.append_signals([signal(f"g{i}", time=1000.0 + i)]) for i in range(10)]
    bad = store.save_chat(ChatRecord("m-1", "eng-1", "bogus", "hi", 1000.0))
    results = await asyncio.gather(*good[:5], bad, *good[5:], return_exceptions=True)
    assert isinstance(results[5], INTEGRITY)
    assert [r for i, r in enumerate(results) if i != 5] == [[]] * 10
    assert [s.signal_id for s in await store.journey("dev-1")] == [f"g{i}" for i in range(10)]
    assert store.stats.failed_ops == 1

    # The writer keeps going afterwards.
    await store.save_cue(cue())
    assert await store.get_cue("cue-1") == cue()


async def test_journey_limit_order_and_since(store: Any) -> None:
    # Inserted out of time order, with a tie at t=1003 broken by arrival.
    times = [1005.0, 1001.0, 1003.0, 1000.0, 1004.0, 1002.0, 1003.0]
    await store.append_signals([signal(f"j{i}", time=t) for i, t in enumerate(times)])
    await store.append_signals([signal("other-device", device_id="dev-9")])

    everything = await store.journey("dev-1")
    assert [s.time for s in everything] == sorted(times)
    assert [s.signal_id for s in everything if s.time == 1003.0] == ["j2", "j6"]

    latest = await store.journey("dev-1", limit=3)
    assert [s.signal_id for s in latest] == ["j6", "j4", "j0"]
    assert [s.time for s in await store.journey("dev-1", since=1003.5)] == [1004.0, 1005.0]
    assert [s.time for s in await store.journey("dev-1", since=1001.0, limit=2)] == [1004.0, 1005.0]
    assert await store.journey("dev-1", limit=0) == []
    with pytest.raises(ValueError):
        await store.journey("dev-1", limit=-1)


async def test_in_memory_store_reads_committed_writes() -> None:
    async with await SqliteStore.open(":memory:") as s:
        results = await asyncio.gather(
            *(s.append_signals([signal(f"m{i}", time=float(i))]) for i in range(100)),
            *(s.count_signals("dev-1") for _ in range(20)),
        )
        # One connection serves reads and writes here; reads interleaved with batches must still work.
        assert all(isinstance(c, int) and 0 <= c <= 100 for c in results[100:])
        assert await s.count_signals("dev-1") == 100
        assert len(await s.journey("dev-1", limit=1000)) == 100


async def test_variant_button_feedback_and_switches_round_trip(store: Any) -> None:
    from cuepoint_server.storage import FeedbackRecord

    await store.save_cue(replace(cue(), variant="short", locale="pt"))
    await store.set_cue_status("cue-1", "accepted", 101.0, "call")
    got = await store.get_cue("cue-1")
    assert got is not None and (got.variant, got.locale, got.button_id, got.status) == (
        "short",
        "pt",
        "call",
        "accepted",
    )
    rating = FeedbackRecord("eng-1", "cue-1", "sc-1", "payments", "dana", "short", "csat", 4, "quick", 300.0)
    await store.save_feedback(rating)
    await store.save_feedback(replace(rating, score=1))  # a resend does not overwrite the first answer
    assert await store.get_feedback("eng-1") == rating
    await store.set_variant_stopped("sc-1", "short", True, "too pushy", 400.0)
    await store.set_variant_stopped("sc-1", "long", True, "", 400.0)
    await store.set_variant_stopped("sc-1", "long", False, "back on", 401.0)
    assert await store.stopped_variants() == {("sc-1", "short")}


def journal_before_version_14(raw: sqlite3.Connection) -> None:
    """The per-signal journal table again, in place of version 17's batch rows and view."""
    raw.execute("DROP VIEW signals")
    for table in ("signal_batches", "signal_marks", "signal_ids"):
        raw.execute(f"DROP TABLE {table}")
    raw.execute(
        "CREATE TABLE signals (device_id TEXT NOT NULL, signal_id TEXT NOT NULL, session_id TEXT NOT NULL,"
        " kind TEXT NOT NULL, name TEXT NOT NULL, time REAL NOT NULL, received_at REAL NOT NULL,"
        " payload TEXT NOT NULL)"
    )


async def test_version_2_database_gains_the_variant_and_feedback_columns(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    async with await SqliteStore.open(path) as s:
        await s.save_cue(cue())
    with sqlite3.connect(path) as raw:  # back to version 2's shape
        raw.execute("DROP TABLE feedback")
        raw.execute("DROP TABLE variant_switches")
        for column in ("variant", "locale", "button_id"):
            raw.execute(f"ALTER TABLE cues DROP COLUMN {column}")
        raw.execute("DROP TABLE device_credentials")  # version 4
        raw.execute("ALTER TABLE sessions DROP COLUMN identified")  # version 6
        for column in ("wrapped_up_at", "callback_number", "callback_at"):  # versions 12 and 11
            raw.execute(f"ALTER TABLE engagements DROP COLUMN {column}")
        journal_before_version_14(raw)
        raw.execute("PRAGMA user_version = 2")
    async with await SqliteStore.open(path) as s:
        got = await s.get_cue("cue-1")
        assert got is not None and (got.variant, got.button_id) == ("", "")
        assert await s.stopped_variants() == set()


async def test_replicas_registry_heartbeats_and_liveness(store: Any) -> None:
    a = ReplicaRecord("rep-a", 100.0, 100.0, "127.0.0.1:5001", "box pid 1", "aaaaaaaaaaaa", False)
    b = ReplicaRecord("rep-b", 101.0, 101.0, "127.0.0.1:5002", "box pid 2", "aaaaaaaaaaaa", False)
    await store.save_replica(a)
    await store.save_replica(b)
    # A's heartbeat (the same row, rewritten) after a reload and on draining; B stops reporting.
    a2 = replace(a, last_seen=130.0, scenarios_version="bbbbbbbbbbbb", draining=True)
    await store.save_replica(a2)
    assert await store.replicas() == [a2, b]
    alive = {r.replica_id for r in await store.replicas() if replica_alive(r, 131.0, ttl=15.0)}
    assert alive == {"rep-a"}  # B was last seen 30 s (6 sweeps) ago
    assert not replica_alive(None, 131.0)
    await store.forget_replicas_seen_before(110.0)
    assert [r.replica_id for r in await store.replicas()] == ["rep-a"]
    await store.forget_replica("rep-a")
    assert await store.replicas() == []


def decision(outcome: str = "offered", cue_id: str = "cue-1") -> DecisionRecord:
    return DecisionRecord(100.0, "app", "dev-1", "user-1", "sess-1", "sc-1", outcome, "", "", cue_id)


async def test_sqlite_store_implements_the_store_protocol(store: Any) -> None:
    assert isinstance(store, Store)


async def test_an_offer_commits_with_its_signals_and_decisions_or_not_at_all(store: Any) -> None:
    await store.commit_offer(OfferCommit(signals=[signal("s-1")], cues=[cue()], decisions=[decision()]))
    assert [r.signal_id for r in await store.journey("dev-1")] == ["s-1"]
    assert (await store.get_cue("cue-1")) is not None
    assert len(await store.decisions_for_device("dev-1")) == 1
    # One bad row (a decision outcome the schema refuses) and nothing of the unit is stored.
    broken = OfferCommit(signals=[signal("s-2")], cues=[cue("cue-2")], decisions=[decision("bogus", "cue-2")])
    with pytest.raises(INTEGRITY):
        await store.commit_offer(broken)
    assert [r.signal_id for r in await store.journey("dev-1")] == ["s-1"]
    assert await store.get_cue("cue-2") is None
    assert len(await store.decisions_for_device("dev-1")) == 1


async def test_a_failing_offer_among_concurrent_writes_fails_only_its_caller(store: Any) -> None:
    # Submitted together, so they share the writer's transaction (on SQLite begun, written and committed in
    # one call on its thread): the broken unit is rolled back and redone alone, the others still commit.
    good = [store.append_signals([signal(f"w{i}", time=1000.0 + i)]) for i in range(4)]
    offer = store.commit_offer(OfferCommit(signals=[signal("s-ok")], cues=[cue()], decisions=[decision()]))
    broken = store.commit_offer(
        OfferCommit(signals=[signal("s-bad")], cues=[cue("cue-2")], decisions=[decision("bogus", "cue-2")])
    )
    status = store.set_cue_status("cue-1", "declined", 1100.0)
    results = await asyncio.gather(*good[:2], offer, broken, status, *good[2:], return_exceptions=True)
    assert isinstance(results[3], INTEGRITY)
    assert not any(isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)
    assert sorted(r.signal_id for r in await store.journey("dev-1")) == ["s-ok", "w0", "w1", "w2", "w3"]
    stored = await store.get_cue("cue-1")
    assert stored is not None and stored.status == "declined"
    assert await store.get_cue("cue-2") is None
    assert [d.outcome for d in await store.decisions_for_device("dev-1")] == ["offered"]


async def test_accept_and_its_engagement_commit_together_once(store: Any) -> None:
    await store.save_cue(cue())
    first = await store.accept_cue("cue-1", 150.0, engagement("eng-1"))
    assert first.accepted and first.engagement is not None and first.engagement.engagement_id == "eng-1"
    # A resent accept (another engagement id) changes nothing and returns the stored engagement.
    again = await store.accept_cue("cue-1", 160.0, engagement("eng-2"))
    assert not again.accepted and again.engagement is not None and again.engagement.engagement_id == "eng-1"
    assert [e.engagement_id for e in await store.engagements_for_device("dev-1")] == ["eng-1"]
    stored = await store.get_cue("cue-1")
    assert stored is not None and stored.status == "accepted" and stored.responded_at == 150.0
    # A cue that is no longer offered (or unknown) starts nothing.
    await store.save_cue(cue("cue-3"))
    await store.set_cue_status("cue-3", "expired", 170.0)
    late = await store.accept_cue("cue-3", 171.0, replace(engagement("eng-3"), cue_id="cue-3"))
    assert not late.accepted and late.status == "expired" and late.engagement is None
    assert not (await store.accept_cue("nope", 1.0, engagement("eng-4"))).accepted
    assert await store.get_engagement("eng-3") is None and await store.get_engagement("eng-4") is None


async def test_an_offers_webhook_rows_commit_in_the_same_transaction(store: Any) -> None:
    def row(delivery_id: str, state: str = "pending") -> WebhookRecord:
        return WebhookRecord(delivery_id, "http://crm", "cue.offered", '{"cue_id": "x"}', 100.0, state, 0, 100.0)

    await store.commit_offer(OfferCommit(cues=[cue()], decisions=[decision()], webhooks=[row("d-1")]))
    assert [r.delivery_id for r in await store.due_webhooks(100.0)] == ["d-1"]
    # A webhook row the schema refuses takes the offer down with it, and the other way round.
    with pytest.raises(INTEGRITY):
        await store.commit_offer(OfferCommit(cues=[cue("cue-2")], webhooks=[row("d-2", state="bogus")]))
    assert await store.get_cue("cue-2") is None
    with pytest.raises(INTEGRITY):
        await store.commit_offer(OfferCommit(decisions=[decision("bogus", "cue-3")], webhooks=[row("d-3")]))
    assert [r.delivery_id for r in await store.due_webhooks(100.0)] == ["d-1"]


async def test_a_lifecycle_webhook_row_commits_with_its_change_or_not_at_all(store: Any) -> None:
    def row(delivery_id: str, kind: str, state: str = "pending") -> WebhookRecord:
        return WebhookRecord(delivery_id, "http://crm", kind, "{}", 100.0, state, 0, 100.0)

    await store.save_cue(cue())
    accepted = await store.accept_cue("cue-1", 110.0, engagement(), webhooks=[row("q-1", "engagement.queued")])
    assert accepted.accepted
    # A repeated accept writes nothing, its webhook rows neither.
    await store.accept_cue("cue-1", 111.0, engagement("eng-2"), webhooks=[row("q-2", "engagement.queued")])
    ended = replace(engagement(), state="ended", ended_at=300.0, disposition="resolved")
    await store.save_engagement(ended, webhooks=[row("e-1", "engagement.ended")])
    assert [r.delivery_id for r in await store.due_webhooks(200.0)] == ["q-1", "e-1"]
    # A row the schema refuses takes its change down with it.
    reopened = replace(ended, state="queued", disposition="")
    with pytest.raises(INTEGRITY):
        await store.save_engagement(reopened, webhooks=[row("e-2", "engagement.queued", state="bogus")])
    stored = await store.get_engagement("eng-1")
    assert stored is not None and (stored.state, stored.disposition) == ("ended", "resolved")
    with pytest.raises(INTEGRITY):
        await store.set_cue_status("cue-1", "withdrawn", 400.0, webhooks=[row("w-1", "cue.withdrawn", "bogus")])
    stored_cue = await store.get_cue("cue-1")
    assert stored_cue is not None and stored_cue.status == "accepted"
    assert [r.delivery_id for r in await store.due_webhooks(500.0)] == ["q-1", "e-1"]


# -- associate slots shared by replicas (storage/slots.py) ----------------------------------------------


def room_for(capacity: int) -> Any:
    """A `SlotClaim.fits` allowing `capacity` slots per associate, whatever their channel."""
    return lambda _associate_id, held: len(held) < capacity


def claim(key: str, candidates: list[tuple[str, float]], capacity: int = 1, replica: str = "r1") -> SlotClaim:
    return SlotClaim(key, "chat", "support", replica, tuple(candidates), room_for(capacity))


async def test_a_slot_goes_to_the_longest_idle_associate_with_room(store: Any) -> None:
    both = [("dana", 10.0), ("eli", 5.0)]
    # Eli has been idle longer: first engagement to Eli, the second to Dana, the third to nobody.
    assert await store.reserve_slot(claim("e1", both), 20.0) == SlotResult("eli", False)
    assert await store.reserve_slot(claim("e2", both), 21.0) == SlotResult("dana", False)
    assert await store.reserve_slot(claim("e3", both), 22.0) == SlotResult("", False)
    # Asking again for e1 (a retry) finds its slot, and takes no second one.
    assert await store.reserve_slot(claim("e1", both), 23.0) == SlotResult("eli", False)
    assert [(a, k) for a, k, _ in await store.slot_holds()] == [("dana", "e2"), ("eli", "e1")]
    # Eli frees up last: Dana, who freed up first, is now the longest idle.
    await store.release_slot("e2", "dana", 30.0)
    await store.release_slot("e1", "eli", 31.0)
    assert await store.reserve_slot(claim("e3", both), 32.0) == SlotResult("dana", False)


async def test_a_replicas_stale_slots_are_pruned_and_a_gone_replicas_engagements_adopted(store: Any) -> None:
    await store.hold_slot("e1", "dana", "chat", "support", "live", 1.0)
    await store.hold_slot("e2", "dana", "chat", "support", "live", 1.0)
    assert await store.prune_slots("live", {("e1", "dana")}, 2.0) == ["dana"]
    assert [k for _, k, _ in await store.slot_holds()] == ["e1"]
    # Engagements owned by a replica seen lately stay its own; a gone replica's are adopted, once.
    for n, owner in enumerate(("live", "gone")):
        accepted = replace(engagement(f"eng-{owner}", created_at=200.0 + n), cue_id=f"cue-{owner}")
        await store.save_cue(cue(f"cue-{owner}", created_at=100.0 + n))
        assert (await store.accept_cue(f"cue-{owner}", 101.0, accepted, owner=owner)).accepted
    for replica in ("live", "new"):
        await store.save_replica(ReplicaRecord(replica, 100.0, 110.0, "", "", "", False))
    await store.hold_slot("eng-gone", "eli", "chat", "support", "gone", 101.0)
    # Seen since 105: "live" and "new"; "gone" never was.
    adopted, freed = await store.adopt_engagements("new", 105.0, 120.0)
    assert (adopted, freed) == (["eng-gone"], ["eli"])
    assert await store.owner_of("eng-gone") == "new"
    assert await store.adopt_engagements("other", 105.0, 121.0) == ([], [])
    # Once "live" has not been seen for the window, its engagement is adopted too; "new" claimed its own
    # within the window, so it stays.
    assert await store.adopt_engagements("other", 115.0, 130.0) == (["eng-live"], ["dana"])


async def test_owners_of_finished_engagements_are_pruned_and_a_taken_over_one_is_not_adopted(store: Any) -> None:
    for name in ("done", "open", "called"):
        accepted = replace(engagement(f"eng-{name}", created_at=200.0), cue_id=f"cue-{name}")
        await store.save_cue(cue(f"cue-{name}", created_at=100.0))
        assert (await store.accept_cue(f"cue-{name}", 101.0, accepted, owner="gone")).accepted
    await store.save_replica(ReplicaRecord("live", 100.0, 110.0, "", "", "", False))
    # "live" fired the callback of "gone"'s engagement: it routes it now, so nobody adopts it as gone's.
    await store.take_over("eng-called", "live", 108.0)
    assert await store.owner_of("eng-called") == "live"
    # One engagement is over before the sweep: its owner row goes, the open one is adopted.
    done = await store.get_engagement("eng-done")
    assert await store.save_engagement(replace(done, state="ended", ended_at=102.0))
    assert await store.adopt_engagements("new", 105.0, 120.0) == (["eng-open"], [])
    assert (await store.owner_of("eng-done"), await store.owner_of("eng-open")) == ("", "new")
    assert await store.owner_of("eng-called") == "live"


async def test_a_conference_or_consult_joining_holds_the_slot_until_released_or_its_replica_is_gone(
    store: Any,
) -> None:
    # Erin joins eng-1 as a conference on replica "a": the participation row and her slot in one transaction.
    joined = ParticipationRecord("eng-1", "erin", "conference", 100.0, None, "", "")
    await store.join_holding(joined, "chat", "support", "a")
    assert await store.participations_for("eng-1") == [joined]
    assert await store.slot_holds() == [("erin", "eng-1", "a")]
    # With capacity 1 she has no room left for anything routed anywhere.
    assert await store.reserve_slot(claim("eng-2", [("erin", 1.0)]), 101.0) == SlotResult("", False)
    # Capacity 2: one more fits beside the conference.
    assert (await store.reserve_slot(claim("eng-2", [("erin", 1.0)], capacity=2), 101.0)).associate_id == "erin"
    await store.release_slot("eng-2", "erin", 102.0)
    # Her part ends (she left, or the engagement did): the slot is free again.
    await store.release_slot("eng-1", "erin", 103.0)
    assert await store.slot_holds() == []
    assert (await store.reserve_slot(claim("eng-3", [("erin", 1.0)]), 104.0)).associate_id == "erin"
    await store.release_slot("eng-3", "erin", 105.0)
    # A consult held by replica "gone" (never registered) is freed by another replica's adoption sweep,
    # like any slot of a gone replica; one held by a live replica is kept.
    await store.save_replica(ReplicaRecord("live", 100.0, 110.0, "", "", "", False))
    await store.join_holding(
        ParticipationRecord("eng-4", "erin", "consult", 106.0, None, "", ""), "chat", "support", "gone"
    )
    await store.join_holding(
        ParticipationRecord("eng-5", "fay", "consult", 106.0, None, "", ""), "chat", "support", "live"
    )
    assert await store.adopt_engagements("new", 108.0, 120.0) == ([], ["erin"])
    assert await store.slot_holds() == [("fay", "eng-5", "live")]
    # The sweep of the replica holding it keeps a participant's slot it still has (key, associate).
    assert await store.prune_slots("live", {("eng-5", "fay")}, 121.0) == []
    assert await store.prune_slots("live", (), 122.0) == ["fay"]


# --- the journal: one row per batch (storage/journal.py) --------------------------------------------------


def batch(ids: list[str], *, device_id: str = "dev-1", start: float = 1000.0) -> JournalBatch:
    n = len(ids)
    return JournalBatch(
        device_id, "sess-1", start + n, ids, ["event"] * n, ["tap"] * n, [start + i for i in range(n)], [{}] * n
    )


async def test_a_batch_is_one_journal_row_and_the_signals_view_shows_each_signal(store: Any) -> None:
    assert await store.append_batch(batch([f"{i:04d}" for i in range(100)])) == []
    assert (await store.query("SELECT COUNT(*) FROM signal_batches", ()))[0][0] == 1
    rows = await store.query("SELECT signal_id, time, payload FROM signals ORDER BY batch_seq, position", ())
    assert [(r[0], float(r[1]), r[2]) for r in rows[:2]] == [("0000", 1000.0, "{}"), ("0001", 1001.0, "{}")]
    assert len(rows) == 100 and await store.count_signals("dev-1") == 100


async def test_resends_are_found_in_runs_and_in_batches_that_were_not_runs(store: Any) -> None:
    # Increasing ids (as the SDK's): each batch is a run above the device's mark.
    for k in range(20):
        assert await store.append_batch(batch([f"b{k:02d}-{i:02d}" for i in range(10)], start=1000.0 + k * 10)) == []
    # Ids below the mark, some stored long ago, one new (out of order): the new one is stored, not a run.
    resend = ["b00-03", "b07-09", "a-new", "b19-00", "b05-05"]
    assert await store.append_batch(batch(resend, start=3000.0)) == ["b00-03", "b07-09", "b19-00", "b05-05"]
    # Random ids (no order at all) and a later resend of them, mixed with new ones.
    assert await store.append_batch(batch(["zz-9", "aa-1", "mm-5"], start=4000.0)) == []
    assert await store.append_batch(batch(["mm-5", "a-new", "zz-10", "aa-1", "b10-01"], start=5000.0)) == [
        "mm-5",
        "a-new",
        "aa-1",
        "b10-01",
    ]
    ids = [s.signal_id for s in await store.journey("dev-1", limit=1000)]
    assert len(ids) == len(set(ids)) == 200 + 1 + 3 + 1
    # Repeats within one batch, and within one transaction: stored once.
    first, second = await asyncio.gather(
        store.append_batch(batch(["zz-20", "zz-20", "zz-21"])), store.append_batch(batch(["zz-21", "zz-22"]))
    )
    assert (first, second) == (["zz-20"], ["zz-21"])
    assert await store.count_signals("dev-1") == 208


async def test_several_batches_are_appended_in_one_transaction_in_order_and_resends_reported(store: Any) -> None:
    """append_journal, the group commit's form: each batch one row, in the order given, all in one transaction;
    the ids skipped as stored before come back together, whichever batch held them."""
    before = store.stats.batches
    assert await store.append_journal([batch(["a1", "a2"]), batch(["b1"], device_id="dev-2"), batch([])]) == []
    assert store.stats.batches == before + 1
    skipped = await store.append_journal(
        [batch(["a2", "a3"], start=2000.0), batch(["b1", "b2"], device_id="dev-2", start=2000.0)]
    )
    assert sorted(skipped) == ["a2", "b1"]
    assert [s.signal_id for s in await store.journey("dev-1")] == ["a1", "a2", "a3"]
    assert [s.signal_id for s in await store.journey("dev-2")] == ["b1", "b2"]
    assert await store.append_journal([]) == []


async def test_retention_keeps_the_newer_part_of_a_batch(store: Any) -> None:
    await store.append_batch(batch(["a", "b", "c", "d"], start=1000.0))  # times 1000..1003
    await store.append_batch(batch(["e"], start=900.0))
    assert await store.purge_journey(1002.0) == 3
    assert [(s.signal_id, s.time) for s in await store.journey("dev-1")] == [("c", 1002.0), ("d", 1003.0)]
    # Trimmed signals are forgotten like deleted ones; the kept ones still dedupe.
    assert await store.append_batch(batch(["a", "c"], start=2000.0)) == ["c"]


async def test_the_newest_signals_come_from_batches_that_overlap_in_time(store: Any) -> None:
    # An offline backlog arrives after newer signals: the journey is still by time, then arrival.
    await store.append_batch(batch([f"n{i:03d}" for i in range(50)], start=2000.0))
    await store.append_batch(batch([f"o{i:03d}" for i in range(100)], start=1960.0))  # 1960..2059
    got = await store.journey("dev-1", limit=30)
    want = sorted(
        [(2000.0 + i, 0, f"n{i:03d}") for i in range(50)] + [(1960.0 + i, 1, f"o{i:03d}") for i in range(100)]
    )[-30:]
    assert [s.signal_id for s in got] == [w[2] for w in want]
    assert [s.signal_id for s in await store.journey("dev-1", since=2058.0)] == ["o098", "o099"]
    assert await store.recent_signal_ids("dev-1", limit=2) == ["o098", "o099"]
