"""Reliable delivery through server restarts: real server, real SDK, real gRPC.

The server is stopped mid-session and started again on the same port and
database; the SDK must go STALE, reconnect by itself and deliver every signal
exactly once, with its original id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import cuepoint
from cuepoint import _convert
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .conftest import StartServer

State = cuepoint.ConnectionState
Restart = Callable[[CuepointServer], Awaitable[CuepointServer]]

SYNC_FAILURE = """
id: sync-failure
priority: 100
target: {attribute: user.tier, equals: premium}
trigger:
  event: sync_failed
  count: {at_least: 3, within: 10m}
cue: {message: "Unable to sync? I can help you.", channel: audio, queue: desk}
cooldown: 30m
"""

# Reconnect fast so every test stays well under a few seconds.
FAST = {
    "reconnect_initial_backoff": 0.05,
    "reconnect_max_backoff": 0.2,
    "connect_timeout": 2.0,
    "close_timeout": 2.0,
}


@pytest.fixture
async def restart(clock: ManualClock) -> AsyncIterator[Restart]:
    """Start a new server on the stopped one's port and database (and scenarios)."""
    started: list[CuepointServer] = []

    async def again(old: CuepointServer) -> CuepointServer:
        config = dataclasses.replace(old.config, port=old.port)
        for _ in range(50):  # the port may take a moment to be free again
            try:
                server = await CuepointServer.start(config, clock=clock)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            started.append(server)
            return server
        raise AssertionError(f"could not rebind port {old.port}")

    yield again
    for server in started:
        await server.stop(0)


async def device(server: CuepointServer, device_id: str = "phone-1", **options: Any) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS"),
        user=cuepoint.User(user_id=f"user-{device_id}", tier="premium"),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(**{**FAST, **options}),
    )


class StateLog:
    """Every ConnectionState change of a client, with a way to wait for one."""

    def __init__(self, client: cuepoint.Client) -> None:
        self.seen: list[cuepoint.ConnectionState] = []
        self._changed = asyncio.Event()
        client.on_state(self._record)

    def _record(self, state: cuepoint.ConnectionState) -> None:
        self.seen.append(state)
        self._changed.set()

    async def reach(self, state: cuepoint.ConnectionState, *, count: int = 1, within: float = 5) -> None:
        async with asyncio.timeout(within):
            while self.seen.count(state) < count:
                self._changed.clear()
                await self._changed.wait()


async def stored_ids(server: CuepointServer, device_id: str) -> list[str]:
    return sorted(await server.store.recent_signal_ids(device_id, limit=10_000))


def slow_acks(server: CuepointServer, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """Store signals at once but hold their ack back: what a crash between commit and ack looks like."""
    original = server.store.append_journal

    async def append_then_wait(batches: Any) -> None:
        await original(batches)
        await asyncio.sleep(delay)

    monkeypatch.setattr(server.store, "append_journal", append_then_wait)


async def until(condition: Callable[[], Awaitable[bool]], within: float = 5) -> None:
    for _ in range(int(within / 0.02)):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {within}s")


async def test_restart_mid_stream_goes_stale_reconnects_and_stores_each_signal_once(
    start_server: StartServer, restart: Restart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = await start_server()
    client = await device(server)
    states = StateLog(client)
    first_session = client.session_id
    acked = [await client.track("screen_viewed", n=i) for i in range(5)]
    await client.flush(timeout=5)

    # Sent and stored, but the server goes down before acking them.
    slow_acks(server, monkeypatch, 0.5)
    in_flight = [await client.track("sync_failed", n=i) for i in range(5)]

    async def stored_before_ack() -> bool:
        return await server.store.count_signals("phone-1") == 10

    await until(stored_before_ack)
    assert client.pending_signals == 5
    await server.stop(0)
    await states.reach(State.STALE)
    assert client.state is State.STALE and client.is_open and client.failure is None
    assert isinstance(client.last_error, cuepoint.ConnectionLost)

    # Tracked while disconnected: buffered.
    offline = [await client.track("screen_viewed", n=i) for i in range(5)]
    assert client.pending_signals == 10

    again = await restart(server)
    await client.flush(timeout=10)
    assert client.state is State.CONNECTED and client.pending_signals == 0
    assert client.session_id == first_session  # the server resumed the dropped session
    assert states.seen[:2] == [State.STALE, State.CONNECTED]
    # The resent five were acked as duplicates, not stored twice.
    assert await again.store.count_signals("phone-1") == 15
    assert await stored_ids(again, "phone-1") == sorted(acked + in_flight + offline)
    await client.close()
    assert client.state is State.CLOSED and states.seen[-1] is State.CLOSED


async def test_signals_tracked_while_down_arrive_after_restart_and_flush_waits_across(
    start_server: StartServer, restart: Restart
) -> None:
    server = await start_server()
    client = await device(server, "offline-phone")
    states = client.states()
    assert await anext(states) is State.CONNECTED
    await server.stop(0)
    assert await anext(states) is State.STALE

    ids = [await client.track("sync_failed", attempt=i) for i in range(3)]
    ids.append(await client.set_context(app_version="4.3.0"))
    flushing = asyncio.create_task(client.flush(timeout=10))  # started while down: keeps waiting
    await asyncio.sleep(0.3)
    assert not flushing.done()

    again = await restart(server)
    await flushing
    assert await anext(states) is State.CONNECTED
    assert await stored_ids(again, "offline-phone") == sorted(ids)
    # The new session's Hello carried the context as it is now.
    session = await again.store.get_session(client.session_id)
    assert session is not None and session.context["app.version"] == "4.3.0"
    await client.close()
    assert [state async for state in states] == [State.CLOSED]


async def test_outbox_survives_an_app_restart(start_server: StartServer, restart: Restart, tmp_path: Path) -> None:
    outbox = str(tmp_path / "outbox.sqlite")
    server = await start_server()
    first = await device(server, "journaled", outbox_path=outbox, close_timeout=0.3)
    delivered = await first.track("app_opened")
    await first.flush(timeout=5)

    await server.stop(0)
    lost = [await first.track("sync_failed", n=i) for i in range(3)]
    lost.append(await first.set_context(locale="fr_FR"))
    await first.close()  # the app is killed: nothing acked these four
    with sqlite3.connect(outbox) as db:
        rows = db.execute("SELECT signal_id FROM outbox WHERE device_id = 'journaled' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == lost  # acked signals were removed, the rest kept in order

    again = await restart(server)
    assert await again.store.count_signals("journaled") == 1
    second = await device(again, "journaled", outbox_path=outbox)
    assert second.pending_signals == 4  # loaded from the journal before anything new
    fresh = await second.track("app_resumed")
    await second.flush(timeout=5)
    assert await stored_ids(again, "journaled") == sorted([delivered, *lost, fresh])
    sql = "SELECT signal_id FROM signals WHERE device_id = ? ORDER BY batch_seq, position"  # arrival order
    rows = await again.store.query(sql, ("journaled",))
    assert [r[0] for r in rows] == [delivered, *lost, fresh]  # the old run's first, with their original ids
    await second.close()
    with sqlite3.connect(outbox) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


async def test_pending_cue_is_not_surfaced_twice_and_an_answer_given_offline_is_delivered(
    start_server: StartServer, restart: Restart, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await device(server, "cued")
    states = StateLog(client)
    surfaced: list[str] = []
    client.on_cue(lambda cue: surfaced.append(cue.cue_id))
    for _ in range(3):
        await client.track("sync_failed")
    await client.flush(timeout=5)
    cue = await client.next_cue(timeout=5)

    caplog.set_level(logging.DEBUG, logger="cuepoint")
    await server.stop(0)
    await states.reach(State.STALE)
    again = await restart(server)
    await states.reach(State.CONNECTED)
    await client.track("screen_viewed")
    await client.flush(timeout=5)
    # The server re-offered the pending cue on the new session; the app saw it once.
    assert "dropping repeated cue" in caplog.text
    assert surfaced == [cue.cue_id]
    with pytest.raises(cuepoint.TimedOut):
        await client.next_cue(timeout=0.2)

    # Answered while the link is down: recorded, and sent again when the server re-offers the cue.
    await again.stop(0)
    await states.reach(State.STALE, count=2)
    engagement = await client.accept(cue)
    third = await restart(again)
    update = await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    assert update.cue_id == cue.cue_id
    stored = await third.store.get_cue(cue.cue_id)
    assert stored is not None and stored.status == "accepted"
    assert surfaced == [cue.cue_id]
    await client.close()


async def test_invalid_argument_fails_without_reconnecting(start_server: StartServer) -> None:
    server = await start_server()
    client = await device(server, "bad-phone")
    states = StateLog(client)
    await client.track("screen_viewed")
    await client.flush(timeout=5)
    # The SDK validates locally, so slip a malformed signal past it to get the server's INVALID_ARGUMENT.
    bad = _convert.event_signal("bad-1", client.server_time or 0.0, "Not A Valid Name", {})
    client._enqueue("bad-1", bad)
    with pytest.raises(cuepoint.InvalidSignal) as info:
        await client.flush(timeout=5)
    assert info.value.code == "INVALID_ARGUMENT"
    assert client.state is State.CLOSED and client.failure is info.value
    assert states.seen == [State.CLOSED]  # never STALE
    await asyncio.sleep(0.3)  # no reconnect attempt happens later either
    rows = await server.store.query("SELECT COUNT(*) FROM sessions WHERE device_id = ?", ("bad-phone",))
    assert rows[0][0] == 1
    with pytest.raises(cuepoint.ClientClosed):
        await client.track("screen_viewed")
    await client.close()


async def test_giving_up_after_max_attempts(start_server: StartServer) -> None:
    server = await start_server()
    client = await device(server, "given-up", reconnect_max_attempts=3, reconnect_max_backoff=0.05)
    states = StateLog(client)
    await client.track("screen_viewed")
    await server.stop(0)
    await states.reach(State.CLOSED)
    assert states.seen == [State.STALE, State.CLOSED]
    assert isinstance(client.failure, cuepoint.ConnectionLost)
    assert "gave up after 3 reconnect attempt(s)" in str(client.failure)
    with pytest.raises(cuepoint.ClientClosed):
        await client.flush(timeout=1)
    await client.close()


async def test_without_reconnect_the_client_fails_fast(start_server: StartServer) -> None:
    server = await start_server()
    client = await device(server, "fail-fast", reconnect=False)
    await client.track("screen_viewed")
    await server.stop(0)
    async with asyncio.timeout(5):
        async for state in client.states():
            assert state is not State.STALE
    assert isinstance(client.failure, cuepoint.ConnectionLost)
    await client.close()
