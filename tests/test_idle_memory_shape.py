"""What an idle device stream holds (one task, no buffers), and that the on-demand writer keeps order.

The memory target (bench/bench_memory.py) depends on an idle device costing the grpc.aio handler task
and nothing that waits: no second task, no asyncio.Queue, no Event. Server messages go out from a
writer task that exists only while something is queued (api/device.py, _Writer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from cuepoint_server.app import CuepointServer
from cuepoint_server.core.model import SessionFailed, Withdrawal
from cuepoint_server.core.sessions import DeviceSession

from .conftest import StartServer
from .test_e2e_foundation import RawDevice, _raw_signal

SYNC = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
cooldown: 1h
"""

STREAM_TASKS = ("_Writer._drain", "DeviceServicer.Connect", "DeviceServicer._write")


def _stream_tasks() -> list[str]:
    names = []
    for task in asyncio.all_tasks():
        name = getattr(task.get_coro(), "__qualname__", "")
        if name in STREAM_TASKS:
            names.append(name)
    return names


async def _eventually(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def _session(server: CuepointServer, device_id: str) -> DeviceSession:
    await _eventually(lambda: device_id in server.core._reg.sessions)
    return server.core._reg.sessions[device_id]


async def test_an_idle_device_holds_no_writer_task_and_no_buffers(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    devices = [RawDevice(server.address, f"idle-{i}") for i in range(3)]
    for device in devices:
        assert (await device.read()).HasField("welcome")
    devices[0].send(_raw_signal("s-1", "tap"), batch_id="b1")
    assert list((await devices[0].read()).ack.signal_ids) == ["s-1"]
    await asyncio.sleep(0.05)
    assert _stream_tasks() == []
    for i in range(3):
        session = await _session(server, f"idle-{i}")
        assert session.outbox.empty() and session.outbox.qsize() == 0
        assert session.outbox._items is None and session._room is None
    for device in devices:
        await device.close()


async def test_server_messages_keep_send_order_across_writer_restarts(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "ordered")
    assert (await raw.read()).HasField("welcome")
    session = await _session(server, "ordered")
    sent = []
    for burst in range(5):
        for i in range(20):
            cue_id = f"c{burst}-{i}"
            session.send(Withdrawal(cue_id, "test"))
            sent.append(cue_id)
        await asyncio.sleep(0.01 if burst % 2 else 0)  # sometimes the writer drains and exits in between
    received = [(await raw.read()).withdrawal.cue_id for _ in sent]
    assert received == sent
    await raw.close()


async def test_session_failed_ends_the_stream_unavailable_after_what_was_queued(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "failing")
    assert (await raw.read()).HasField("welcome")
    session = await _session(server, "failing")
    session.send(Withdrawal("before", "test"))
    session.send(SessionFailed("could not store signals; resend them"))
    session.send(Withdrawal("after", "test"))
    assert (await raw.read()).withdrawal.cue_id == "before"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw.read()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "could not store signals; resend them"
    await _eventually(lambda: "failing" not in server.core._reg.sessions)
    assert _stream_tasks() == []
    await raw.close()


async def test_half_close_acks_what_was_sent_then_ends_ok(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "leaving")
    assert (await raw.read()).HasField("welcome")
    raw.send(_raw_signal("s-1", "tap"), _raw_signal("s-2", "tap"), batch_id="b1")
    raw.send(_raw_signal("s-3", "tap"), batch_id="b2")
    raw.outgoing.put_nowait(None)  # half-close
    acked = []
    async with asyncio.timeout(5):
        while (message := await raw.call.read()) is not grpc.aio.EOF:
            acked += list(message.ack.signal_ids)
    assert acked == ["s-1", "s-2", "s-3"]
    assert await raw.call.code() is grpc.StatusCode.OK
    await raw.close()


async def test_a_device_that_goes_away_closes_its_session(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "gone")
    assert (await raw.read()).HasField("welcome")
    session = await _session(server, "gone")
    raw.call.cancel()
    await _eventually(lambda: session.closed)
    assert "gone" not in server.core._reg.sessions
    assert session.outbox.listener is None
    await raw.close()
