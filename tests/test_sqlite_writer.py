"""SQLite's writer on the event loop's thread (issue 13): small commits run inline, yet another process holding
the write lock never stalls the loop, and the WAL is still checkpointed (its bulk beside the commits, the rest
between transactions)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from cuepoint_server.storage import SqliteStore
from cuepoint_server.storage import sqlite as sqlite_store
from cuepoint_server.storage.records import MilestoneRecord


def milestone(n: int) -> MilestoneRecord:
    return MilestoneRecord(time=1000.0 + n, app_id="app", device_id="dev-1", session_id=f"s-{n}", milestone_id="m")


async def count_milestones(store: SqliteStore) -> int:
    rows = await store._fetch("SELECT count(*) FROM milestones", ())
    return int(rows[0][0])


async def settled(store: SqliteStore) -> None:
    """Wait until no copy of the WAL is in flight or queued: a chain of copies ends in the writer's catch-up."""
    writer = store._writer
    async with asyncio.timeout(10):
        while writer._copying is not None or not writer._queue.empty():  # noqa: ASYNC110 - the writer's own state
            await asyncio.sleep(0.01)


def wal_frames(path: Path) -> int:
    """Frames in the WAL now (what PASSIVE reports as its size); -1 if a checkpoint holds it."""
    probe = sqlite3.connect(path, isolation_level=None)
    try:
        _busy, frames, _done = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        probe.close()
    return int(frames)


async def test_a_write_waits_for_another_process_s_lock_without_stalling_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with await SqliteStore.open(path) as store:
        await store.save_milestone(milestone(0))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing (an operator's tool, say)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        write = asyncio.create_task(store.save_milestone(milestone(1)))
        await asyncio.sleep(0.5)
        assert not write.done()  # it waits for the lock (on the database thread) ...
        assert ticks >= 10  # ... while the loop goes on (an inline wait would have blocked it the whole time)
        other.execute("COMMIT")
        other.close()
        await asyncio.wait_for(write, 5)
        ticker.cancel()
        assert await count_milestones(store) == 2


async def test_inline_commits_set_no_busy_timeout_and_the_thread_s_write_still_waits(tmp_path: Path) -> None:
    """The inline path clears the busy timeout once and leaves it cleared (two PRAGMAs per commit were ~17 of its
    ~78 us of CPU); a write that falls back to the database thread sets it again, so it still waits out the lock."""
    path = tmp_path / "c.db"
    async with await SqliteStore.open(path) as store:
        await store.save_milestone(milestone(0))
        statements: list[str] = []
        store._writer._conn._conn.set_trace_callback(statements.append)
        for n in range(1, 4):
            await store.save_milestone(milestone(n))
        assert sum(s.startswith("BEGIN IMMEDIATE") for s in statements) == 3  # three commits, on the loop
        assert not [s for s in statements if "busy_timeout" in s]
        statements.clear()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.save_milestone(milestone(4)))
        await asyncio.sleep(0.3)
        assert not write.done()  # waiting for the lock on the database thread, not refused at once
        other.execute("COMMIT")
        other.close()
        await asyncio.wait_for(write, 5)
        assert f"PRAGMA busy_timeout = {sqlite_store._BUSY_TIMEOUT_MS}" in statements
        assert await count_milestones(store) == 5


async def test_the_wal_is_checkpointed_though_commits_never_do_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 50)
    path = tmp_path / "c.db"
    async with await SqliteStore.open(path) as store:
        for n in range(600):
            await store.save_milestone(milestone(n))  # one small commit each, on the loop's thread
        await settled(store)
        await store.save_milestone(milestone(600))  # the WAL, fully copied, starts over
        assert await count_milestones(store) == 601
        # Never checkpointed, 601 commits would leave ~1,300 frames; restarted, it holds the last few commits.
        assert 0 <= wal_frames(path) < 200


async def test_commits_go_on_while_the_wal_is_copied_and_the_wal_still_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bulk of a checkpoint runs beside the writer's commits (it took 19-27 ms, and every cue round's commit
    queued behind it); only what was committed meanwhile is copied between transactions."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 50)
    release = threading.Event()
    started = threading.Event()
    copies: list[tuple[int, int, int]] = []
    real_copy = sqlite_store._copy_wal

    def slow_copy(conn: sqlite3.Connection) -> tuple[int, int, int]:
        started.set()
        release.wait(10)  # a copy as slow as we like: commits must not wait for it
        result = real_copy(conn)
        copies.append(result)
        return result

    monkeypatch.setattr(sqlite_store, "_copy_wal", slow_copy)
    path = tmp_path / "c.db"
    async with await SqliteStore.open(path) as store:
        n = 0
        while n < 30:  # 2 per commit (its row and the commit): a copy starts after 25
            await store.save_milestone(milestone(n))
            n += 1
        assert await asyncio.to_thread(started.wait, 5), "no copy started after CHECKPOINT_EVERY rows"
        for _ in range(40):  # while the copy is held: each commit still completes
            await asyncio.wait_for(store.save_milestone(milestone(n)), 5)
            n += 1
        assert not copies  # still held
        release.set()
        for _ in range(300):  # the copy ends; the writer copies the rest between its transactions
            await store.save_milestone(milestone(n))
            n += 1
        await settled(store)  # the last copy, and the writer's catch-up after it
        await store.save_milestone(milestone(n))  # the WAL, fully copied, starts over
        n += 1
        assert await count_milestones(store) == n
        assert copies and all(busy == 0 for busy, _frames, _copied in copies)
        assert 0 <= wal_frames(path) < 200  # it restarted: ~370 commits would have left ~800 frames
