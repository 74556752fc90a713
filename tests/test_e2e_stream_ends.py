"""Streams end cleanly: acks before any rejection, a deadline for the Hello, timestamps checked."""

from __future__ import annotations

import asyncio

import grpc

from cuepoint.v1 import associate_pb2, associate_pb2_grpc, device_pb2, device_pb2_grpc
from cuepoint_server.api.limits import RateLimits

from .conftest import StartServer
from .test_e2e_foundation import RawDevice, _raw_signal

SYNC = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
"""


async def test_a_rate_limited_stream_acks_everything_it_stored_first(start_server: StartServer) -> None:
    server = await start_server(SYNC, rate_limits=RateLimits(device_rate=1, device_burst=2_000))
    flood = RawDevice(server.address, "flooder")
    await flood.read()  # welcome (the Hello took one token)
    # Sent without waiting for acks. A batch passes while the device's bucket has a token left, into debt:
    # 19 batches of 100 leave 99, a batch of 500 passes and leaves a debt of 401 (401 s at 1/s), and the
    # last batch is refused. It is the last message on purpose: grpc.aio's client reports INTERNAL
    # "Internal error from Core" instead of the server's status when one of its own writes fails because
    # the server has already ended the stream (grpc/grpc#36066), so a client still writing when the
    # rejection arrives would see that instead.
    for b in range(19):
        flood.send(*(_raw_signal(f"s-{b}-{i}", "tap") for i in range(100)), batch_id=f"b{b}")
    flood.send(*(_raw_signal(f"s-19-{i}", "tap") for i in range(500)), batch_id="b19")
    flood.send(_raw_signal("s-20-0", "tap"), batch_id="b20")
    acked: set[str] = set()
    status = None
    while status is None:
        try:
            message = await flood.read()
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
            break
        if message.HasField("ack"):
            acked.update(message.ack.signal_ids)
    assert status is grpc.StatusCode.RESOURCE_EXHAUSTED
    stored = {r.signal_id for r in await server.store.journey("flooder", limit=10_000)}
    assert len(stored) == 2_400 and acked == stored  # every stored signal acked, nothing acked that was not stored
    await flood.close()


async def test_a_stream_without_a_hello_ends_with_deadline_exceeded(start_server: StartServer) -> None:
    server = await start_server(SYNC, hello_timeout=0.3)
    async with grpc.aio.insecure_channel(server.address) as channel:
        silent: asyncio.Queue[device_pb2.DeviceMessage] = asyncio.Queue()

        async def nothing():  # type: ignore[no-untyped-def]
            yield await silent.get()  # never: the client opens the stream and says nothing

        call = device_pb2_grpc.DeviceServiceStub(channel).Connect(nothing())
        try:
            await asyncio.wait_for(call.read(), 10)
            raise AssertionError("the stream must end")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "hello" in (exc.details() or "")
    assert server.core.stats()["sessions"] == 0


async def test_an_associate_stream_without_a_sign_in_ends_with_deadline_exceeded(start_server: StartServer) -> None:
    server = await start_server(SYNC, hello_timeout=0.3)
    async with grpc.aio.insecure_channel(server.address) as channel:
        silent: asyncio.Queue[associate_pb2.AssociateMessage] = asyncio.Queue()

        async def nothing():  # type: ignore[no-untyped-def]
            yield await silent.get()  # never: the desk opens the stream and never signs in

        call = associate_pb2_grpc.AssociateServiceStub(channel).Connect(nothing())
        try:
            await asyncio.wait_for(call.read(), 10)
            raise AssertionError("the stream must end")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "sign_in" in (exc.details() or "")


async def test_negative_nanos_are_invalid_argument_naming_the_field(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    raw = RawDevice(server.address, "phone-nanos")
    await raw.read()
    signal = _raw_signal("n-1", "tap")
    signal.time.nanos = -1
    raw.send(_raw_signal("ok-1", "tap"), signal, batch_id="b1")
    try:
        await raw.read()
        raise AssertionError("the batch must be refused")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "signals.signals[1].time.nanos" in (exc.details() or "")
    assert await server.store.count_signals("phone-nanos") == 0  # nothing of the refused batch applied
    await raw.close()
