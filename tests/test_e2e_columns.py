"""Columnar signal batches (SignalColumns, issue 13 item 1): same meaning as the row form, errors name the column.

Real server on port 0; the real SDK (which sends its batches of events by column) and raw generated stubs.
"""

from __future__ import annotations

import time

import grpc
import pytest

from cuepoint import _convert
from cuepoint.v1 import device_pb2

from .conftest import StartServer, phone
from .test_e2e_foundation import SYNC_FAILURE, RawDevice


def columns(
    ids: list[str], names: list[str], props: list[dict[str, object]] | None = None, *, batch_id: str = "c"
) -> device_pb2.DeviceMessage:
    now = time.time()
    rows = [
        _convert.EventRow(i, now, n, p)  # type: ignore[arg-type]
        for i, n, p in zip(ids, names, props or [{}] * len(ids), strict=True)
    ]
    return _convert.signal_columns(batch_id, now, rows)


async def test_the_sdk_sends_events_by_column_and_they_are_stored_as_tracked(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server, "col-phone")
    props = [
        {"reason": "timeout", "attempt": 3, "ratio": 0.5, "retry": True},
        {},
        {"reason": "offline", "big": -(2**62)},
    ]
    ids = [await client.track("sync_failed", **p) for p in props]  # type: ignore[arg-type]
    await client.flush(timeout=10)
    journey = await server.store.journey("col-phone")
    assert [(s.signal_id, s.name, dict(s.payload)) for s in journey] == [
        (i, "sync_failed", p) for i, p in zip(ids, props, strict=True)
    ]
    # Three sync failures of a premium user within 10 minutes: evaluated signal by signal, as rows would be.
    assert (await client.next_cue(timeout=10)).scenario_id == "sync-failure"
    await client.close()
    # What the SDK put on the wire for those events: columns, one string table for the batch.
    message = _convert.signals_message("b", time.time(), [_convert.EventRow("x1", 1.0, "a", {"k": "v"})])
    assert message.WhichOneof("kind") == "signal_columns"
    assert list(message.signal_columns.strings) == ["a", "k", "v"]


async def test_a_columnar_batch_is_acked_and_deduped_like_rows(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "raw-columns")
    assert (await raw.read()).HasField("welcome")
    batch = columns(["r-1", "r-2", "r-3"], ["sync_failed"] * 3, [{"n": 1}, {"s": "x"}, {}], batch_id="b1")
    raw.outgoing.put_nowait(batch)
    ack = await raw.read()
    while not ack.HasField("ack"):  # the cue may come before the ack
        ack = await raw.read()
    assert (ack.ack.batch_id, list(ack.ack.signal_ids)) == ("b1", ["r-1", "r-2", "r-3"])
    batch.signal_columns.batch_id = "b2"
    raw.outgoing.put_nowait(batch)  # a resend: acked as duplicates, stored once
    ack = await raw.read()
    while not ack.HasField("ack"):
        ack = await raw.read()
    assert list(ack.ack.duplicate_ids) == ["r-1", "r-2", "r-3"]
    assert await server.store.count_signals("raw-columns") == 3
    await raw.close()


def _bad_name() -> device_pb2.DeviceMessage:
    return columns(["a", "b", "c", "d"], ["ok", "ok", "ok", "Not OK!"])


def _bad_index() -> device_pb2.DeviceMessage:
    message = columns(["a", "b"], ["ok", "ok"])
    message.signal_columns.names[1] = 9
    return message


def _bad_id() -> device_pb2.DeviceMessage:
    return columns(["a", "b/c"], ["ok", "ok"])


def _short_column() -> device_pb2.DeviceMessage:
    message = columns(["a", "b"], ["ok", "ok"], [{"n": 1}, {"m": 2}])
    del message.signal_columns.int_values[1]
    return message


def _bad_value() -> device_pb2.DeviceMessage:
    return columns(["a", "b", "c"], ["ok", "ok", "ok"], [{}, {}, {"x": float("nan")}])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (_bad_name, "signal_columns.names[3]"),
        (_bad_index, "signal_columns.names[1]"),
        (_bad_id, "signal_columns.ids[1]"),
        (_short_column, "signal_columns.int_values"),
        (_bad_value, "signal_columns.properties[2]['x']"),
    ],
)
async def test_a_bad_columnar_batch_is_invalid_argument_naming_the_column(
    start_server: StartServer, make: object, field: str
) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "bad-columns")
    assert (await raw.read()).HasField("welcome")
    raw.outgoing.put_nowait(make())  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    assert await server.store.count_signals("bad-columns") == 0  # rejected whole
    await raw.close()
