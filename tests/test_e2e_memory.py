"""Bounded memory: closed sessions' state is freed after the resume window, event memory has limits."""

from __future__ import annotations

import asyncio

import pytest

from cuepoint_server.clock import ManualClock
from cuepoint_server.engine.state import EVENT_MEMORY

from .conftest import StartServer, phone

SYNC = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
"""

# Keeps an hour of uploads in the window, so memory, not retention, is what limits them.
UPLOADS = """
id: many-uploads
trigger: {event: upload, count: {at_least: 1000, within: 1h}}
cue: {message: "Busy?", channel: chat}
"""


async def test_closed_sessions_are_freed_and_rebuilt_from_storage(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(SYNC)
    before = EVENT_MEMORY.count
    for i in range(30):
        client = await phone(server, f"churn-{i}", user_id=f"user-{i}")
        await client.track("sync_failed")
        await client.track("sync_failed")
        await client.flush()
        await client.close()
    await asyncio.sleep(0.1)
    assert server.core.stats()["devices"] == 30  # kept while a reconnect could resume
    clock.advance(server.core.config.resume_window + 1)
    await server.core.drain()
    assert server.core.stats()["devices"] == 0  # freed
    assert EVENT_MEMORY.count == before  # and their remembered events with them
    # A device that comes back gets its windows from storage: two failures before, the third fires.
    back = await phone(server, "churn-7", user_id="user-7")
    await back.track("sync_failed")
    await back.flush()
    assert (await back.next_cue(timeout=5)).scenario_id == "sync-failure"
    await back.close()


async def test_event_memory_drops_the_oldest_past_a_device_limit(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EVENT_MEMORY, "device_bytes", 256 * 1024)
    server = await start_server(SYNC, UPLOADS)
    client = await phone(server, "heavy")
    dropped = EVENT_MEMORY.dropped
    blob = {f"part{k}": "x" * 1000 for k in range(16)}
    for i in range(40):  # 40 x 16 KB of properties against a 256 KB limit
        await client.track("upload", n=i, **blob)
    await client.flush(timeout=20)
    state = server.core._reg.states["heavy"]
    assert state.event_bytes <= 256 * 1024
    assert EVENT_MEMORY.dropped > dropped  # said so in the metric
    kept = [o.props["n"] for o in state.history["upload"]]
    assert kept[-1] == 39 and kept == sorted(kept)  # the oldest went, never the newest
    assert await server.store.count_signals("heavy") == 40  # storage keeps everything
    await client.close()
