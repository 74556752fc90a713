"""Group commit (issue 13): batches of many streams are stored in one write, and each stream is acked after it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from cuepoint_server.engine.state import MAX_REMEMBERED_IDS
from cuepoint_server.storage import JournalBatch

from .conftest import StartServer
from .test_e2e_foundation import RawDevice, _raw_signal
from .test_e2e_stream_ends import SYNC


class _Gate:
    """Wraps the store's append: records which devices each call carries, and holds the first one until
    released, so batches of other streams pile up behind it."""

    def __init__(self, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        original = server.store.append_journal

        async def gated(batches: Sequence[JournalBatch]) -> list[str]:
            self.calls.append(sorted({b.device_id for b in batches}))
            if len(self.calls) == 1:
                self.held.set()
                await self.release.wait()
            skipped: list[str] = await original(batches)
            return skipped

        monkeypatch.setattr(server.store, "append_journal", gated)


async def _queued(server: Any, *device_ids: str) -> None:
    """Until each device's last batch is applied and waits for a commit."""
    for _ in range(500):
        sessions = server.core._reg.sessions
        if all(d in sessions and sessions[d].acks is not None for d in device_ids):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{device_ids} never queued a batch")


async def _ack(device: RawDevice) -> tuple[str, list[str], list[str]]:
    while True:
        message = await device.read()
        if message.HasField("ack"):
            return message.ack.batch_id, list(message.ack.signal_ids), list(message.ack.duplicate_ids)


async def test_batches_of_several_streams_are_stored_in_one_write_and_each_stream_gets_its_acks(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(SYNC)
    gate = _Gate(server, monkeypatch)
    a, b, c = (RawDevice(server.address, name) for name in ("a", "b", "c"))
    for device in (a, b, c):
        await device.read()  # welcome
    a.send(_raw_signal("a-1", "tap"), batch_id="a1")
    await gate.held.wait()  # a's commit is in flight
    b.send(_raw_signal("b-1", "tap"), _raw_signal("b-2", "tap"), batch_id="b1")
    c.send(_raw_signal("c-1", "tap"), batch_id="c1")
    await _queued(server, "b", "c")
    gate.release.set()
    assert await _ack(a) == ("a1", ["a-1"], [])
    assert await _ack(b) == ("b1", ["b-1", "b-2"], [])
    assert await _ack(c) == ("c1", ["c-1"], [])
    assert gate.calls == [["a"], ["b", "c"]]  # b's and c's batches: one write, one transaction
    for device in (a, b, c):
        await device.close()


async def test_a_resend_storage_skips_for_one_device_is_not_a_duplicate_for_another_with_the_same_id(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage reports skipped resends by signal id; two devices' batches with the same id in one write
    would make one device's fresh signal look like the other's resend."""
    server = await start_server(SYNC)
    old = RawDevice(server.address, "old")
    await old.read()
    # More ids than the server keeps in memory: "x-0" is then known to storage only.
    per_batch = 500
    for start in range(0, MAX_REMEMBERED_IDS + per_batch, per_batch):
        old.send(*(_raw_signal(f"x-{i}", "tap") for i in range(start, start + per_batch)), batch_id=f"o{start}")
        await _ack(old)
    gate = _Gate(server, monkeypatch)
    first, new = RawDevice(server.address, "first"), RawDevice(server.address, "new")
    for device in (first, new):
        await device.read()
    first.send(_raw_signal("f-1", "tap"), batch_id="f1")
    await gate.held.wait()
    old.send(_raw_signal("x-0", "tap"), batch_id="resend")  # a resend storage skips
    new.send(_raw_signal("x-0", "tap"), batch_id="n1")  # the same id, new to this device
    await _queued(server, "old", "new")
    gate.release.set()
    assert await _ack(first) == ("f1", ["f-1"], [])
    assert await _ack(old) == ("resend", ["x-0"], ["x-0"])
    assert await _ack(new) == ("n1", ["x-0"], [])
    assert [r.signal_id for r in await server.store.journey("new", limit=10)] == ["x-0"]
    for device in (first, old, new):
        await device.close()
