"""kill -9 aimed at each window where a promise is shown: the cue arriving, just after an accept, while an
engagement is routed, during a resend. Counted in the database afterwards.

The server is a real process (`cuepoint serve`) on a file database; the real SDK reconnects by itself,
resends what was not acked and re-sends an answer to a cue the server offers again. A few rounds per
window keep CI time modest; each round aims at a different moment of the window.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import cuepoint

from .test_e2e_crash import SCENARIO, ServerProcess, free_port

ROUNDS = 4
CONFIG = cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    proc = ServerProcess(folder, tmp_path / "crash.db", free_port())
    yield proc
    await proc.stop()


def counts(db: Path, device_prefix: str) -> dict[str, int]:
    """The invariants, counted: each must be 0 (or equal) whatever the moment of the kill."""
    with sqlite3.connect(db) as conn:

        def one(sql: str) -> int:
            return int(conn.execute(sql, (f"{device_prefix}%",)).fetchone()[0])

        return {
            "signals stored twice": one(
                "SELECT COUNT(*) - COUNT(DISTINCT device_id || '/' || signal_id) FROM signals WHERE device_id LIKE ?"
            ),
            "second cues for one qualification": one(
                "SELECT COUNT(*) - COUNT(DISTINCT device_id || scenario_id) FROM cues WHERE device_id LIKE ?"
            ),
            "accepted cues without an engagement": one(
                "SELECT COUNT(*) FROM cues AS c WHERE c.device_id LIKE ? AND c.status = 'accepted' "
                "AND NOT EXISTS (SELECT 1 FROM engagements AS e WHERE e.cue_id = c.cue_id)"
            ),
            "engagements per cue beyond one": one(
                "SELECT COUNT(*) - COUNT(DISTINCT cue_id) FROM engagements WHERE device_id LIKE ?"
            ),
            "accepted cues": one("SELECT COUNT(*) FROM cues WHERE device_id LIKE ? AND status = 'accepted'"),
            "engagements": one("SELECT COUNT(*) FROM engagements WHERE device_id LIKE ?"),
        }


async def qualify(client: cuepoint.Client) -> None:
    for _ in range(3):
        await client.track("sync_failed")


async def test_kill_at_cue_receipt_brings_back_the_same_cue(server: ServerProcess, tmp_path: Path) -> None:
    await server.start()
    for r in range(ROUNDS):
        client = await cuepoint.connect(server.address, app_id="fitkit", device_id=f"rx-{r}", config=CONFIG)
        seen: list[str] = []
        arrived = asyncio.get_running_loop().create_future()

        def on_cue(cue: cuepoint.Cue, arrived: asyncio.Future[str] = arrived, seen: list[str] = seen) -> None:
            seen.append(cue.cue_id)
            if not arrived.done():
                arrived.set_result(cue.cue_id)

        client.on_cue(on_cue)
        await qualify(client)
        first = await asyncio.wait_for(arrived, 10)
        await asyncio.sleep(r * 0.002)  # 0, 2, 4, 6 ms after the cue reached the device
        await server.kill()
        await server.start()
        await client.track("tap")
        await client.flush(timeout=30)  # reconnected, and everything acked
        # The device sees no second cue, and the one it holds is known to the server: answering it works.
        engagement = await client.accept(first)
        await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=10)
        assert seen == [first]
        await client.close()
    await server.stop()
    found = counts(tmp_path / "crash.db", "rx-")
    assert found["second cues for one qualification"] == 0
    assert found["signals stored twice"] == 0
    assert found["accepted cues without an engagement"] == 0
    assert found["accepted cues"] == found["engagements"] == ROUNDS


async def test_kill_just_after_an_accept_loses_no_engagement(server: ServerProcess, tmp_path: Path) -> None:
    await server.start()
    # Where the accept's commits happen, measured from the moment the SDK wrote it (then 1-30 ms in all).
    delays = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.02)
    for r, delay in enumerate(delays):
        client = await cuepoint.connect(server.address, app_id="fitkit", device_id=f"acc-{r}", config=CONFIG)
        await qualify(client)
        await client.flush(timeout=10)
        cue = await client.next_cue(timeout=10)
        engagement = await client.accept(cue)
        await asyncio.sleep(delay)
        await server.kill()
        await server.start()
        # Whether the accept was committed or not, the device ends up with its engagement: the restored cue
        # makes the SDK send its answer again, or the restored engagement is sent to the reconnected device.
        update = await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=30)
        assert update.cue_id == cue.cue_id
        await client.close()
    await server.stop()
    found = counts(tmp_path / "crash.db", "acc-")
    assert found["accepted cues without an engagement"] == 0
    assert found["engagements per cue beyond one"] == 0
    assert found["second cues for one qualification"] == 0
    assert found["accepted cues"] == found["engagements"] == len(delays)


async def test_kill_while_an_engagement_is_routed(server: ServerProcess, tmp_path: Path) -> None:
    await server.start()
    rng = random.Random(11)
    for r in range(ROUNDS):
        associate = await cuepoint.connect_associate(server.address, associate_id=f"dana-{r}")
        client = await cuepoint.connect(server.address, app_id="fitkit", device_id=f"route-{r}", config=CONFIG)
        await qualify(client)
        await client.flush(timeout=10)
        engagement = await client.accept(await client.next_cue(timeout=10))
        await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=10)
        await asyncio.sleep(rng.uniform(0.0, 0.010))  # assignment to dana is under way
        await server.kill()
        await associate.close()
        await server.start()
        # Restored from storage and routed again: the next associate gets it, the device hears of it.
        again = await cuepoint.connect_associate(server.address, associate_id=f"dana-{r}")
        assigned = await again.next_engagement(timeout=20)
        assert assigned.engagement_id == engagement.engagement_id
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=20)
        await again.end(assigned)
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=20)
        await again.close()
        await client.close()
    await server.stop()
    found = counts(tmp_path / "crash.db", "route-")
    assert found["accepted cues without an engagement"] == 0
    assert found["engagements per cue beyond one"] == 0
    assert found["accepted cues"] == found["engagements"] == ROUNDS
    with sqlite3.connect(tmp_path / "crash.db") as db:
        ended = db.execute("SELECT COUNT(*) FROM engagements WHERE device_id LIKE 'route-%' AND state = 'ended'")
        assert ended.fetchone()[0] == ROUNDS  # each one reached an associate and was wrapped up: 0 lost


async def test_kill_during_a_resend_stores_each_signal_once(server: ServerProcess, tmp_path: Path) -> None:
    await server.start()
    client = await cuepoint.connect(server.address, app_id="fitkit", device_id="resend-1", config=CONFIG)
    tracked: list[str] = []

    async def load(n: int) -> None:
        for i in range(n):
            tracked.append(await client.track("tap", n=i))
            if i % 50 == 0:
                await asyncio.sleep(0)

    loader = asyncio.create_task(load(4000))
    await asyncio.sleep(0.05)
    await server.kill()  # mid-load: the SDK holds a backlog to resend
    await loader
    for delay in (0.0, 0.02, 0.05):
        await server.start()
        await asyncio.sleep(delay)  # the reconnect's resend is in flight
        await server.kill()
    await server.start()
    await client.flush(timeout=60)
    await client.close()
    await server.stop()
    with sqlite3.connect(tmp_path / "crash.db") as db:
        stored = [row[0] for row in db.execute("SELECT signal_id FROM signals WHERE device_id = 'resend-1'")]
    assert len(stored) == len(set(stored)) == len(tracked)  # 0 stored twice
    assert set(tracked) == set(stored)  # 0 acknowledged (indeed 0 tracked) signals lost


async def test_an_older_versions_accept_without_engagement_is_repaired_at_start(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Before the accept and its engagement shared a transaction, a crash between them left an accepted cue
    with no engagement that blocked its session for good. A start repairs what such a version left."""
    db = tmp_path / "crash.db"
    await server.start()
    clients = []
    cues = []
    for name in ("old-within-ttl", "old-expired"):
        client = await cuepoint.connect(server.address, app_id="fitkit", device_id=name, config=CONFIG)
        await qualify(client)
        await client.flush(timeout=10)
        cue = await client.next_cue(timeout=10)
        engagement = await client.accept(cue)
        await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=10)
        clients.append((client, engagement))
        cues.append(cue.cue_id)
    await server.kill()
    with sqlite3.connect(db) as conn:  # what the older version left behind
        conn.execute("DELETE FROM engagements WHERE device_id LIKE 'old-%'")
        conn.execute("UPDATE cues SET expires_at = 1 WHERE device_id = 'old-expired'")
    assert counts(db, "old-")["accepted cues without an engagement"] == 2
    await server.start()
    # The cue still within its ttl is offered again; the SDK, still holding the answer, sends it again and
    # this time the engagement commits with it.
    async with asyncio.timeout(30):
        while True:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT COUNT(*) FROM engagements WHERE cue_id = ?", (cues[0],)).fetchone()
            if row[0] == 1:
                break
            await asyncio.sleep(0.1)
    with sqlite3.connect(db) as conn:
        statuses = dict(conn.execute("SELECT device_id, status FROM cues WHERE device_id LIKE 'old-%'").fetchall())
    assert statuses == {"old-within-ttl": "accepted", "old-expired": "lost"}
    found = counts(db, "old-")
    assert found["accepted cues without an engagement"] == 0
    assert found["engagements per cue beyond one"] == 0
    for client, _ in clients:
        await client.close()
    await server.stop()
