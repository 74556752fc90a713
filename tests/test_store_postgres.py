"""PostgresStore as several replicas see it: migrations at start, the per-user lock, batched journal writes.

The Store behaviour both backends share is tested in test_storage.py (run on both); these are the parts
only a shared database has.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import asyncpg
import pytest

from cuepoint_server.storage import (
    CueRecord,
    DecisionRecord,
    OfferCommit,
    OfferGuard,
    PostgresStore,
    SignalRecord,
    SlotClaim,
    SlotResult,
    TimerRecord,
    WebhookRecord,
)
from cuepoint_server.storage.postgres_schema import MIGRATIONS, PG_SCHEMA_VERSION
from cuepoint_server.storage.slots import SlotTxn

from .conftest import _pg_admin, pg_url_for


@pytest.fixture
async def fresh_database(pg_database: str) -> AsyncIterator[str]:
    """A database of its own, created empty for the test and dropped after it."""
    name = f"cuepoint_fresh_{secrets.token_hex(4)}"
    admin = await _pg_admin()
    await admin.execute(f"CREATE DATABASE {name}")
    yield pg_database.rsplit("/", 1)[0] + f"/{name}"
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.close()


async def test_replicas_starting_together_on_a_fresh_database_migrate_once(fresh_database: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(fresh_database) for _ in range(3)))
    try:
        conn = await asyncpg.connect(fresh_database)
        try:
            assert await conn.fetchval("SELECT array_agg(version) FROM cuepoint_schema") == [PG_SCHEMA_VERSION]
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            # 27 tables of the schema (the journal's signal_batches, signal_marks and signal_ids; signals is a
            # view since version 6; the delivery outbox since version 7) and cuepoint_schema, each created once
            assert tables == 28
        finally:
            await conn.close()
        # All three work on the one schema.
        await stores[0].append_signals([signal("s-1")])
        assert await stores[2].count_signals("dev-1") == 1
    finally:
        for s in stores:
            await s.close()


def signal(signal_id: str, device_id: str = "dev-1") -> SignalRecord:
    return SignalRecord(device_id, signal_id, "sess-1", "event", "tap", 1000.0, 1000.5, {"n": 1})


def offer(cue_id: str, device_id: str) -> OfferCommit:
    """One replica's offer to user-1, guarded by 'at most one cue per user' (what a cap of 1 is)."""

    def at_most_one(history: Sequence[CueRecord]) -> tuple[str, str] | None:
        return ("cap", f"{len(history)} offer(s) stored") if history else None

    cue = CueRecord(
        cue_id, "help", "fitkit", device_id, "user:user-1", f"sess-{device_id}", 100.0, 700.0, "chat", "Hi",
        "offered", None, {},
    )  # fmt: skip
    decision = DecisionRecord(
        100.0, "fitkit", device_id, "user:user-1", f"sess-{device_id}", "help", "offered", "", "", cue_id
    )
    guard = OfferGuard(cue_id, "user:user-1", f"sess-{device_id}", 0.0, at_most_one)
    return OfferCommit(signals=[signal(f"sig-{cue_id}", device_id)], cues=[cue], decisions=[decision], guards=[guard])


async def test_two_replicas_racing_for_one_user_store_one_cue(pg_database: str) -> None:
    url = pg_url_for(pg_database, f"race-{secrets.token_hex(4)}")
    a, b = await PostgresStore.open(url), await PostgresStore.open(url)
    try:
        # Ten offers at once, five through each replica's writer: the advisory lock lets one through.
        results = await asyncio.gather(
            *(store.commit_offer(offer(f"cue-{i}", f"device-{i}")) for i in range(10) for store in [(a, b)[i % 2]])
        )
        stored = await a.cues_for_subject("user:user-1")
        assert len(stored) == 1
        refused = [cue_id for r in results for cue_id in r.refused]
        assert sorted([*refused, stored[0].cue_id]) == sorted(f"cue-{i}" for i in range(10))
        # A refused cue's signals are stored all the same, and its decision says why it was not offered.
        assert await a.count_signals("device-3") == 1
        blocked = await a.decisions_for_device(
            next(d for d in (f"device-{i}" for i in range(10)) if d != stored[0].device_id)
        )
        assert [(d.outcome, d.reason, d.cue_id) for d in blocked] == [("blocked", "cap", "")]
    finally:
        await a.close()
        await b.close()


async def test_the_journal_is_one_round_trip_per_batch(pg_database: str) -> None:
    store = await PostgresStore.open(pg_url_for(pg_database, f"rt-{secrets.token_hex(4)}"))
    try:
        before = store.round_trips
        skipped = await store.append_signals([signal(f"s-{i}") for i in range(1000)])
        assert skipped == [] and store.round_trips - before == 1
        # New ids above the device's mark: the same single statement.
        before = store.round_trips
        assert await store.append_signals([signal(f"t-{i}") for i in range(10)]) == []
        assert store.round_trips - before == 1
        # A resend of stored signals is recognised within the same transaction: the one statement finds the
        # device's mark above them, then one lookup and one write.
        before = store.round_trips
        skipped = await store.append_signals([signal("s-5"), signal("new-1"), signal("s-7")])
        assert skipped == ["s-5", "s-7"] and store.round_trips - before == 3
        assert await store.count_signals("dev-1") == 1011
    finally:
        await store.close()


async def test_two_replicas_storing_one_device_s_batch_at_once_store_it_once(pg_database: str) -> None:
    url = pg_url_for(pg_database, f"race-{secrets.token_hex(4)}")
    a, b = await PostgresStore.open(url), await PostgresStore.open(url)
    try:
        for round_ in range(5):
            rows = [signal(f"r{round_}-{i:03d}") for i in range(100)]
            first, second = await asyncio.gather(a.append_signals(rows), b.append_signals(rows))
            # The device's mark row is locked by the first; the second then finds every id stored.
            assert sorted([len(first), len(second)]) == [0, 100]
        assert await a.count_signals("dev-1") == 500
    finally:
        await a.close()
        await b.close()


async def test_version_5_journal_is_migrated_to_batches(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute("CREATE TABLE cuepoint_schema (version INTEGER NOT NULL)")
        for step in (1, 2, 3, 4, 5):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        await conn.execute("INSERT INTO cuepoint_schema (version) VALUES (5)")
        await conn.executemany(
            "INSERT INTO signals (device_id, signal_id, session_id, kind, name, time, received_at, payload)"
            " VALUES ($1, $2, 'sess-1', 'event', 'tap', $3, 1000.0, $4)",
            [("dev-1", "b", 1000.25, '{"x": 1}'), ("dev-1", "a", 1001.5, "{}"), ("dev-2", "a", 1002.0, "{}")],
        )
    finally:
        await conn.close()
    store = await PostgresStore.open(fresh_database)
    try:
        got = [(s.signal_id, s.time, dict(s.payload)) for s in await store.journey("dev-1")]
        assert got == [("b", 1000.25, {"x": 1}), ("a", 1001.5, {})]
        # Migrated ids still dedupe (listed exactly); new ones above the mark are runs.
        assert await store.append_signals([signal("a"), signal("c"), signal("0")]) == ["a"]
        assert await store.count_signals("dev-1") == 4 and await store.count_signals("dev-2") == 1
    finally:
        await store.close()


@pytest.mark.parametrize("capacity", [1, 3])
async def test_replicas_reserving_one_associate_at_once_never_exceed_capacity(pg_database: str, capacity: int) -> None:
    url = pg_url_for(pg_database, f"slots-{secrets.token_hex(4)}")
    replicas = [await PostgresStore.open(url) for _ in range(4)]
    try:

        def ask(n: int) -> SlotClaim:
            # Dana has been idle longest, so every replica asks for her first; Eli is the next in line.
            return SlotClaim(
                f"eng-{n}", "chat", "support", f"replica-{n % 4}", (("dana", 1.0), ("eli", 2.0)),
                lambda _associate_id, held: len(held) < capacity,
            )  # fmt: skip

        async def reserve(n: int) -> str:
            # Skipped while another replica held the row: asked again, as the desk does, until decided.
            while True:
                result = await replicas[n % 4].reserve_slot(ask(n), 10.0)
                if result.associate_id or not result.contended:
                    return result.associate_id
                await asyncio.sleep(0.01)

        winners = await asyncio.gather(*(reserve(n) for n in range(24)))
        assert sorted(w for w in winners if w) == ["dana"] * capacity + ["eli"] * capacity
        holds = await replicas[0].slot_holds()
        assert sorted(a for a, _, _ in holds) == ["dana"] * capacity + ["eli"] * capacity
        # Each winner holds exactly the slot it was told it won.
        assert sorted((a, k) for a, k, _ in holds) == sorted((w, f"eng-{n}") for n, w in enumerate(winners) if w)
    finally:
        for store in replicas:
            await store.close()


def _cue_needing_dana(n: int) -> OfferCommit:
    """A cue whose engagement needs Dana's one slot while on screen (require_capacity)."""
    device = f"dev-{n}"
    cue = CueRecord(
        f"cue-{n}",
        "help",
        "fitkit",
        device,
        f"user:u-{n}",
        f"sess-{n}",
        100.0,
        700.0,
        "chat",
        "Hi",
        "offered",
        None,
        {},
    )
    decision = DecisionRecord(
        100.0, "fitkit", device, f"user:u-{n}", f"sess-{n}", "help", "offered", "", "", f"cue-{n}"
    )
    claim = SlotClaim(
        f"cue-{n}", "chat", "support", "replica-a", (("dana", 1.0),), lambda _associate_id, held: not held,
        detail="no associate available in queue support",
    )  # fmt: skip
    return OfferCommit(cues=[cue], decisions=[decision], slots=[claim])


async def _waiting_out_a_lock(store: PostgresStore, watcher: asyncpg.Connection, commit: asyncio.Task[Any]) -> None:
    """Until `commit` is between two looks at a row another transaction holds (its read of the holds that
    takes no lock is its last statement, in a transaction left open), or done."""
    async with asyncio.timeout(30):
        while not commit.done():
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query LIKE 'SELECT associate_id, hold_key, channel, queue FROM associate_holds%'"
            )
            if waiting:
                return
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("taken", [False, True])
async def test_a_cue_s_commit_waits_out_a_row_another_replica_holds_instead_of_calling_it_full(
    pg_database: str, taken: bool
) -> None:
    url = pg_url_for(pg_database, f"locked-{secrets.token_hex(4)}")
    store = await PostgresStore.open(url)
    # Long enough for this test to act, however loaded the machine: the bound is not what is tested here.
    store.locked_wait = 60.0
    other = await asyncpg.connect(url)  # another replica, deciding for Dana
    watcher = await asyncpg.connect(url)
    try:
        await other.execute("INSERT INTO associate_slots (associate_id, idle_since) VALUES ('dana', 1.0)")
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT 1 FROM associate_slots WHERE associate_id = 'dana' FOR UPDATE")
        if taken:
            await other.execute(
                "INSERT INTO associate_holds VALUES ('eng-x', 'dana', 'chat', 'support', 'replica-b', 50.0)"
            )
        commit = asyncio.create_task(store.commit_offer(_cue_needing_dana(1)))
        # Dana's row is locked, but by what is committed she is free: not "no capacity", the commit waits.
        await _waiting_out_a_lock(store, watcher, commit)
        assert not commit.done()
        await transaction.commit()
        result = await commit
        holds = [(a, k) for a, k, _ in await store.slot_holds()]
        if taken:
            # The other replica took her one slot: it won, the cue has no room.
            assert result.refused == {"cue-1": ("no_capacity", "no associate available in queue support")}
            assert holds == [("dana", "eng-x")]
        else:
            assert result.refused == {} and result.slotted == {"cue-1": "dana"}
            assert holds == [("dana", "cue-1")]
    finally:
        await other.close()
        await watcher.close()
        await store.close()


async def test_a_cue_s_commit_finds_a_locked_associate_full_by_what_is_committed_without_waiting(
    pg_database: str,
) -> None:
    url = pg_url_for(pg_database, f"locked-full-{secrets.token_hex(4)}")
    store = await PostgresStore.open(url)
    store.locked_wait = 60.0
    other = await asyncpg.connect(url)
    try:
        await other.execute("INSERT INTO associate_slots (associate_id, idle_since) VALUES ('dana', 1.0)")
        await other.execute(
            "INSERT INTO associate_holds VALUES ('eng-x', 'dana', 'chat', 'support', 'replica-b', 50.0)"
        )
        async with other.transaction():
            await other.execute("SELECT 1 FROM associate_slots WHERE associate_id = 'dana' FOR UPDATE")
            # Her one slot is taken (committed): refused while the other transaction still holds her row.
            async with asyncio.timeout(30):
                result = await store.commit_offer(_cue_needing_dana(2))
            assert result.refused == {"cue-2": ("no_capacity", "no associate available in queue support")}
    finally:
        await other.close()
        await store.close()


async def test_cues_racing_for_one_associate_s_slot_in_their_commits_offer_one(pg_database: str) -> None:
    url = pg_url_for(pg_database, f"cue-slots-{secrets.token_hex(4)}")
    replicas = [await PostgresStore.open(url) for _ in range(4)]
    try:

        def cue_for(n: int) -> OfferCommit:
            # Ten users on four replicas, each cue needing Dana's one slot while on screen (require_capacity).
            device = f"dev-{n}"
            cue = CueRecord(
                f"cue-{n}", "help", "fitkit", device, f"user:u-{n}", f"sess-{n}", 100.0, 700.0, "audio", "Hi",
                "offered", None, {},
            )  # fmt: skip
            decision = DecisionRecord(
                100.0, "fitkit", device, f"user:u-{n}", f"sess-{n}", "help", "offered", "", "", f"cue-{n}"
            )
            claim = SlotClaim(
                f"cue-{n}", "audio", "support", f"replica-{n % 4}", (("dana", 1.0),),
                lambda _associate_id, held: not held, detail="no associate available in queue support",
            )  # fmt: skip
            return OfferCommit(cues=[cue], decisions=[decision], slots=[claim])

        results = await asyncio.gather(*(replicas[n % 4].commit_offer(cue_for(n)) for n in range(10)))
        offered = [n for n, r in enumerate(results) if f"cue-{n}" not in r.refused]
        assert len(offered) == 1
        [n] = offered
        assert results[n].slotted == {f"cue-{n}": "dana"}
        assert [(a, k) for a, k, _ in await replicas[0].slot_holds()] == [("dana", f"cue-{n}")]
        # The others were refused for want of room (or of the row another replica held): stored as blocked.
        for m, result in enumerate(results):
            if m != n:
                assert result.refused == {f"cue-{m}": ("no_capacity", "no associate available in queue support")}
                assert await replicas[0].get_cue(f"cue-{m}") is None
                [decision] = await replicas[0].decisions_for_device(f"dev-{m}")
                assert (decision.outcome, decision.reason) == ("blocked", "no_capacity")
        # The engagement its accept starts takes the cue's slot over in one transaction.
        taken = SlotClaim(
            "eng-1", "audio", "support", "replica-0", (("dana", 1.0),), lambda _a, held: not held, replaces=f"cue-{n}"
        )
        assert (await replicas[1].reserve_slot(taken, 200.0)).associate_id == "dana"
        assert [(a, k) for a, k, _ in await replicas[0].slot_holds()] == [("dana", "eng-1")]
    finally:
        for store in replicas:
            await store.close()


async def test_round_trips_per_decision_are_pinned(pg_database: str) -> None:
    """Counts, not time: a statement added to a decision's path fails here (README "PostgreSQL backend")."""
    store = await PostgresStore.open(pg_url_for(pg_database, f"trips-{secrets.token_hex(4)}"))

    async def trips(work: Awaitable[object]) -> int:
        before = store.round_trips
        await work
        return store.round_trips - before

    def guarded(n: int, *, timer: bool = True, webhook: bool = True) -> OfferCommit:
        work = offer(f"cue-{n}", f"device-{n}")
        work.guards = [dataclasses.replace(work.guards[0], subject=f"user:u-{n}")]
        work.cues = [dataclasses.replace(work.cues[0], subject=f"user:u-{n}")]
        if timer:
            work.timers = [TimerRecord(f"cue_expiry:cue-{n}", "cue_expiry", f"cue-{n}", 700.0, "replica-a")]
        if webhook:
            body = f'{{"cue_id": "cue-{n}"}}'
            work.webhooks = [WebhookRecord(f"wh-{n}", "http://x", "cue.offered", body, 100.0, "pending", 0, 100.0)]
        return work

    def claim(key: str, *candidates: str, replaces: str = "") -> SlotClaim:
        return SlotClaim(
            key, "chat", "support", "replica-a", tuple((a, 1.0) for a in candidates),
            lambda _a, held: len(held) < 1, replaces=replaces, detail="full",
        )  # fmt: skip

    try:
        # A guarded offer (signals, cue, decision, expiry timer, webhook row): BEGIN with the user's lock, the
        # user's stored cues, every write in one statement, COMMIT. It was 9.
        assert await trips(store.commit_offer(guarded(1))) == 4
        # Without a guard: BEGIN, the writes, COMMIT.
        plain = guarded(2)
        plain.guards = []
        assert await trips(store.commit_offer(plain)) == 3
        # Eight guarded offers at once share one transaction: one BEGIN taking the eight users' locks, two
        # statements each, one COMMIT.
        before = store.round_trips
        results = await asyncio.gather(*(store.commit_offer(guarded(n)) for n in range(10, 18)))
        assert all(not r.refused for r in results)
        assert store.round_trips - before <= 2 + 2 * 8
        # A reservation: BEGIN, (seed + this key's holds), (lock the longest idle + their holds), (the hold +
        # the holds read once the row was ours), COMMIT. It was 7.
        assert await trips(store.reserve_slot(claim("eng-1", "dana"), 10.0)) == 5
        # A candidate found full costs one statement more; the next one takes the slot.
        assert await trips(store.reserve_slot(claim("eng-2", "dana", "eli"), 11.0)) == 6
        # A cue's slot reserved in its commit: the guarded offer's four, and the reservation's three statements.
        slotted = guarded(3)
        slotted.slots = [claim("cue-3", "fay")]
        assert await trips(store.commit_offer(slotted)) == 4 + 3
        # An accepted cue's engagement taking its slot over: the delete rides with the seeding statement.
        assert await trips(store.reserve_slot(claim("eng-3", "fay", replaces="cue-3"), 12.0)) == 5
        assert [(a, k) for a, k, _ in await store.slot_holds()] == [
            ("dana", "eng-1"),
            ("eli", "eng-2"),
            ("fay", "eng-3"),
        ]
        # Giving a slot back: one statement, no BEGIN/COMMIT. It was 4.
        assert await trips(store.release_slot("eng-1", "dana", 13.0)) == 1
        assert [a for a, _, _ in await store.slot_holds()] == ["eli", "fay"]
        # An accepted cue's engagement with its owner row and its fallback row (issue 14: armed in the accept's
        # transaction, riding in the owner's statement): the same count as without the row.
        from .test_storage import cue as stored_cue
        from .test_storage import engagement as stored_engagement

        for n, rows in ((1, ()), (2, (TimerRecord("fallback:eng-a2", "fallback", "eng-a2", 400.0, "replica-a"),))):
            await store.save_cue(dataclasses.replace(stored_cue(f"cue-a{n}"), status="offered"))
            record = dataclasses.replace(stored_engagement(f"eng-a{n}"), cue_id=f"cue-a{n}")
            accept = store.accept_cue(f"cue-a{n}", 300.0, record, owner="replica-a", timers=rows)
            # BEGIN, the cue's lock, its engagement if any, the status, the engagement, owner (+ row), COMMIT.
            assert await trips(accept) == 7
        assert (await store.get_timer("fallback:eng-a2")).state == "armed"  # type: ignore[union-attr]
        # An assignment settling that row: one statement either way (the row marked in a CTE).
        assigned = dataclasses.replace(record, state="assigned", assigned_at=301.0, associate_id="dana")
        assert await trips(store.save_engagement(assigned, settle="fallback:eng-a2")) == 1
        assert (await store.get_timer("fallback:eng-a2")).state == "done"  # type: ignore[union-attr]
        # A reservation that arms an offer's row with the hold: the row rides in the hold's statement.
        offered = dataclasses.replace(
            claim("eng-4", "gus"), timer=lambda a: TimerRecord("offer:eng-4", "offer", f"eng-4:{a}", 500.0, "replica-a")
        )
        assert await trips(store.reserve_slot(offered, 14.0)) == 5
        assert (await store.get_timer("offer:eng-4")).target == "eng-4:gus"  # type: ignore[union-attr]
        # Everything the one statements wrote is there.
        assert (await store.get_cue("cue-1")) is not None and len(await store.cues_for_subject("user:u-12")) == 1
        assert {t.timer_id for t in await store.timers()} >= {"cue_expiry:cue-1", "cue_expiry:cue-3"}
        assert await store.count_signals("device-1") == 1
    finally:
        await store.close()


async def test_a_hold_committed_between_the_read_and_the_row_lock_is_caught(pg_database: str) -> None:
    """The read that comes with a candidate's row lock has a snapshot taken a moment before the lock: a
    reservation committed in that moment is not in it. The read that comes with the insert is, and the
    hold goes back. Forced here: another replica's hold of Dana commits right after the first read."""
    url = pg_url_for(pg_database, f"late-{secrets.token_hex(4)}")
    store = await PostgresStore.open(url)
    other = await asyncpg.connect(url)
    try:

        class LateHold:
            def __init__(self, txn: SlotTxn) -> None:
                self.txn, self.done = txn, False

            async def execute(self, sql: str, *args: Any) -> None:
                await self.txn.execute(sql, *args)

            async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
                rows = await self.txn.fetch(sql, *args)
                if "LEFT JOIN associate_holds" in sql and not self.done:
                    self.done = True
                    await other.execute(
                        "INSERT INTO associate_holds (hold_key, associate_id, channel, queue, replica, held_at) "
                        "VALUES ('eng-b', 'dana', 'chat', 'support', 'replica-b', 1.0)"
                    )
                return rows

        claim = SlotClaim(
            "eng-a", "chat", "support", "replica-a", (("dana", 1.0), ("eli", 2.0)), lambda _a, held: not held
        )

        async def run(txn: SlotTxn) -> tuple[SlotResult, int]:
            return await store._reserve_in(LateHold(txn), claim, 10.0), 1

        result = await store._slot_transaction(run)
        # Dana looked free to the first read; the second saw replica b's hold: Eli got the slot.
        assert result.associate_id == "eli"
        assert [(a, k) for a, k, _ in await store.slot_holds()] == [("dana", "eng-b"), ("eli", "eng-a")]
    finally:
        await other.close()
        await store.close()
