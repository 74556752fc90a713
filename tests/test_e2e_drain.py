"""Draining: SIGTERM and max connection age move devices to another server with their session intact.

A rolling restart (or a scale-out) must not lose or repeat anything: the draining server stops taking new
streams and sends GOAWAY, the SDK reconnects (here to the next address of its target, as it would through a
load balancer), resumes its session and resends what was not acked; the server de-duplicates.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer

from .conftest import StartServer
from .test_e2e_crash import ServerProcess, free_port

SCENARIO = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
cooldown: 1h
"""

QUICK = cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3)


async def test_max_connection_age_reconnects_streams_into_the_same_session(start_server: StartServer) -> None:
    server: CuepointServer = await start_server(SCENARIO, max_connection_age=0.5, max_connection_age_grace=0.2)
    client = await cuepoint.connect(server.address, app_id="fitkit", device_id="aged", config=QUICK)
    states: list[cuepoint.ConnectionState] = []
    back = asyncio.Event()

    def seen(state: cuepoint.ConnectionState) -> None:
        states.append(state)
        if state is cuepoint.ConnectionState.CONNECTED:
            back.set()

    client.on_state(seen)
    cues: list[str] = []
    client.on_cue(lambda cue: cues.append(cue.cue_id))
    session = client.session_id
    await client.track("sync_failed")
    await client.track("sync_failed")
    await client.flush(timeout=10)
    # The server ends the aged connection; the SDK comes back by itself.
    await asyncio.wait_for(back.wait(), 20)
    assert cuepoint.ConnectionState.STALE in states or cuepoint.ConnectionState.CONNECTING in states
    assert client.session_id == session  # resumed, not a new session
    await client.track("sync_failed")
    await client.flush(timeout=10)
    cue = await client.next_cue(timeout=10)
    # The window kept both failures from before the reconnect and counted none twice: one cue, at the third.
    assert cues == [cue.cue_id]
    await client.close()


@pytest.fixture
def scenarios(tmp_path: Path) -> Path:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    return folder


async def test_sigterm_drains_and_the_device_resumes_on_the_next_server(scenarios: Path, tmp_path: Path) -> None:
    db = tmp_path / "drain.db"
    first, second = ServerProcess(scenarios, db, free_port()), ServerProcess(scenarios, db, free_port())
    # One target, two addresses: what a load balancer in front of two replicas looks like to the SDK.
    target = f"ipv4:{first.address},{second.address}"
    await first.start()
    try:
        client = await cuepoint.connect(target, app_id="fitkit", device_id="drained", config=QUICK)
        cues: list[str] = []
        client.on_cue(lambda cue: cues.append(cue.cue_id))
        session = client.session_id
        for _ in range(3):
            await client.track("sync_failed")
        await client.flush(timeout=10)
        offered = await client.next_cue(timeout=10)
        tracked = [await client.track("tap", n=i) for i in range(200)]
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)  # drain: GOAWAY, streams get their grace, writes flushed
        tracked += [await client.track("tap", n=i) for i in range(200, 400)]
        assert await asyncio.wait_for(first.process.wait(), 20) == 0
        await second.start()
        tracked += [await client.track("tap", n=i) for i in range(400, 500)]
        await client.flush(timeout=30)
        assert client.session_id == session
        # The cue on screen before the drain is the same cue after it, shown once; answering it works.
        engagement = await client.accept(offered)
        assert engagement.cue_id == offered.cue_id
        await client.close()
    finally:
        await first.stop()
        await second.stop()
    rows = sqlite3.connect(db).execute("SELECT signal_id FROM signals WHERE device_id = 'drained'").fetchall()
    stored = [r[0] for r in rows]
    assert len(stored) == len(set(stored)) == len(tracked) + 3
    assert cues == [offered.cue_id]


# grpc's newer HTTP/2 server (GRPC_EXPERIMENTS=ph2_server; bench_memory's option: fewer bytes per idle stream)
# resets the streams it still holds when it stops (RST_STREAM, which the client's grpc reports as INTERNAL
# "Stream removed"), where the default server ends them with UNAVAILABLE. Either way the SDK must reconnect
# and resume its session with nothing lost or repeated.
@pytest.mark.parametrize(("experiments", "code"), [("", "UNAVAILABLE"), ("ph2_server", "INTERNAL")])
async def test_a_server_restarted_under_an_idle_device_resumes_its_session(
    scenarios: Path, tmp_path: Path, experiments: str, code: str
) -> None:
    db = tmp_path / "restart.db"
    env = {"GRPC_EXPERIMENTS": experiments}  # set even when empty: the case must not inherit this process's
    first, second = (
        ServerProcess(scenarios, db, free_port(), env=env),
        ServerProcess(scenarios, db, free_port(), env=env),
    )
    await first.start()
    try:
        client = await cuepoint.connect(
            f"ipv4:{first.address},{second.address}", app_id="fitkit", device_id="idle", config=QUICK
        )
        lost: list[cuepoint.CuepointError | None] = []
        client.on_state(
            lambda state: lost.append(client.last_error) if state is cuepoint.ConnectionState.STALE else None
        )
        session = client.session_id
        tracked = [await client.track("tap", n=i) for i in range(50)]
        await client.flush(timeout=10)  # all acked: the stream is idle when the server stops
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.process.wait(), 20) == 0
        tracked += [await client.track("tap", n=i) for i in range(50, 80)]  # buffered while no server is up
        await second.start()
        tracked += [await client.track("tap", n=i) for i in range(80, 100)]
        await client.flush(timeout=30)
        assert client.session_id == session
        assert client.state is cuepoint.ConnectionState.CONNECTED
        # The stream really ended the way this case is about (the first loss; later ones are refused connects).
        assert lost and isinstance(lost[0], cuepoint.ConnectionLost) and lost[0].code == code
        await client.close()
    finally:
        await first.stop()
        await second.stop()
    rows = sqlite3.connect(db).execute("SELECT signal_id FROM signals WHERE device_id = 'idle'").fetchall()
    stored = [r[0] for r in rows]
    assert len(stored) == len(set(stored)) == len(tracked)
    assert set(stored) == set(tracked)
