"""SQLite's writer on the event loop's thread (issue 13): small commits run inline, yet another process holding
the write lock never stalls the loop, and the WAL is still checkpointed (by the writer, between transactions)."""

from __future__ import annotations

import asyncio
import sqlite3
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


async def test_the_wal_is_checkpointed_though_commits_never_do_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 50)
    path = tmp_path / "c.db"
    async with await SqliteStore.open(path) as store:
        for n in range(600):
            await store.save_milestone(milestone(n))  # one small commit each, on the loop's thread
        await asyncio.sleep(0.1)  # the last checkpoint, on aiosqlite's thread after the last commit
        assert await count_milestones(store) == 600
        # Frames in the WAL now: the log restarts after each checkpoint, so far fewer than one per commit.
        probe = sqlite3.connect(path, isolation_level=None)
        try:
            _busy, frames, _done = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            probe.close()
        assert 0 <= frames < 300
