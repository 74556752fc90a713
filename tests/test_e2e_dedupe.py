"""Dedupe is enforced by storage: a resend is recognised however long ago the signal was sent."""

from __future__ import annotations

from cuepoint_server.engine.state import MAX_REMEMBERED_IDS

from .conftest import StartServer
from .test_e2e_foundation import RawDevice, _raw_signal

SYNC = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
"""


async def test_a_resend_older_than_any_memory_window_is_not_stored_again(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "old-resend")
    await raw.read()  # welcome
    first = [_raw_signal(f"early-{i}", "sync_failed" if i < 2 else "tap") for i in range(100)]
    raw.send(*first, batch_id="early")
    assert len((await raw.read()).ack.signal_ids) == 100
    later = MAX_REMEMBERED_IDS + 200  # pushes every early id out of the device's in-memory window
    for b in range(0, later, 500):
        raw.send(*(_raw_signal(f"later-{i}", "tap") for i in range(b, min(b + 500, later))), batch_id=f"l{b}")
        assert (await raw.read()).HasField("ack")
    raw.send(*first, batch_id="resend")
    ack = (await raw.read()).ack
    assert sorted(ack.duplicate_ids) == sorted(s.id for s in first)  # acked again, as duplicates
    assert await server.store.count_signals("old-resend") == 100 + later  # 0 stored twice
    # Nor do they count again in the windows: two sync failures, then a third is the trigger, not a fourth.
    raw.send(_raw_signal("third", "sync_failed"), batch_id="third")
    replies = [await raw.read(), await raw.read()]
    assert [r.WhichOneof("kind") for r in replies] == ["cue", "ack"]
    await raw.close()
