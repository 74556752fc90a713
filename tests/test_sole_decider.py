"""A server alone on its SQLite file skips the offer guard's read for subjects it remembers whole (issue 13).

storage/sole_decider.py: the store of `cuepoint serve` (opened with ``decider=True``) may skip the read while no
other server has opened the file since it did; another server in another process, running or already gone,
or in this process, turns that off for good. Guards whose memory is not whole always read.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from cuepoint_server.storage import CueRecord, OfferCommit, OfferGuard, SqliteStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sole-decider check needs Linux's F_GETLK")

NOW = 1_000_000.0
SUBJECT = "user:u"

# Another server process on the same file: opens it as a decider, says so, then holds it until stdin closes.
OTHER = textwrap.dedent(
    """
    import asyncio, sys
    from cuepoint_server.storage import SqliteStore

    async def main() -> None:
        store = await SqliteStore.open(sys.argv[1], decider=True)
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await store.close()

    asyncio.run(main())
    """
)


def _offer(n: int, whole: bool, reads: list[str]) -> OfferCommit:
    cue_id = f"cue-{n}"

    def check(history: Sequence[CueRecord]) -> tuple[str, str] | None:
        reads.append(cue_id)
        return ("cap", "refused by the read")  # so whether the read ran shows in what was stored

    record = CueRecord(
        cue_id, "help", "app", "dev", SUBJECT, "s1", NOW + n, NOW + n + 60, "chat", "Hi", "offered", None, {}
    )
    guard = OfferGuard(cue_id, SUBJECT, "s1", NOW - 86_400.0, check, memory_whole=whole)
    return OfferCommit(cues=[record], guards=[guard])


async def _refused(store: SqliteStore, n: int, whole: bool) -> bool:
    reads: list[str] = []
    result = await store.commit_offer(_offer(n, whole, reads))
    assert reads == ([f"cue-{n}"] if result.refused else [])
    return bool(result.refused)


def _other_server(db: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OTHER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "open"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


async def test_alone_a_whole_memory_is_not_read_again_and_a_partial_one_is(tmp_path: Path) -> None:
    async with await SqliteStore.open(str(tmp_path / "c.db"), decider=True) as store:
        assert not await _refused(store, 1, whole=True)
        assert await _refused(store, 2, whole=False)
        assert [c.cue_id for c in await store.cues_for_subject(SUBJECT)] == ["cue-1"]


async def test_a_store_opened_by_a_tool_always_reads(tmp_path: Path) -> None:
    async with await SqliteStore.open(str(tmp_path / "c.db")) as store:
        assert await _refused(store, 1, whole=True)


async def test_a_server_that_opened_later_turns_the_skip_off_for_good(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with await SqliteStore.open(str(db), decider=True) as store:
        assert not await _refused(store, 1, whole=True)
        other = await asyncio.to_thread(_other_server, db)
        assert await _refused(store, 2, whole=True)
        await asyncio.to_thread(_stop, other)
        # Gone, but what it wrote may be missing from this server's memory.
        assert await _refused(store, 3, whole=True)


@pytest.mark.parametrize("name", ["c.db", "link.db"])  # the same path, or a symlink to the file
async def test_a_server_that_opens_beside_a_running_one_reads(tmp_path: Path, name: str) -> None:
    db = tmp_path / "c.db"
    other = await asyncio.to_thread(_other_server, db)
    (tmp_path / "link.db").symlink_to(db)
    try:
        async with await SqliteStore.open(str(tmp_path / name), decider=True) as store:
            assert await _refused(store, 1, whole=True)
    finally:
        await asyncio.to_thread(_stop, other)


async def test_two_servers_in_one_process_both_read(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    async with await SqliteStore.open(db, decider=True) as first:
        async with await SqliteStore.open(db, decider=True) as second:
            assert await _refused(second, 1, whole=True)
            assert await _refused(first, 2, whole=True)
        # The second is closed (the first still holds the process's lock); the first stays off.
        assert await _refused(first, 3, whole=True)


async def test_a_private_database_is_always_alone(tmp_path: Path) -> None:
    async with await SqliteStore.open(":memory:", decider=True) as store:
        assert not await _refused(store, 1, whole=True)
