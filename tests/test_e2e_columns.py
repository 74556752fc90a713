"""Columnar signal batches (SignalColumns, issue 13 item 1): same meaning as the row form, errors name the column.

Real server on port 0; the real SDK (which sends its batches of events by column) and raw generated stubs.
"""

from __future__ import annotations

import time

import pytest

from cuepoint import _convert
from cuepoint.v1 import device_pb2
from cuepoint_server.api.convert import batch_from_columns

from .conftest import StartServer, phone
from .test_e2e_foundation import SYNC_FAILURE, RawDevice


def columns(
    ids: list[str],
    names: list[str],
    props: list[dict[str, object]] | None = None,
    *,
    batch_id: str = "c",
    shaped: bool = False,
) -> device_pb2.DeviceMessage:
    now = time.time()
    rows = [
        _convert.EventRow(i, now, n, p)  # type: ignore[arg-type]
        for i, n, p in zip(ids, names, props or [{}] * len(ids), strict=True)
    ]
    return _convert.signal_columns(batch_id, now, rows, shaped=shaped)


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
    three = [_convert.EventRow(f"x{i}", 1.0, "a", {"k": "v"}) for i in range(3)]
    message = _convert.signals_message("b", time.time(), three)
    assert message.WhichOneof("kind") == "signal_columns"
    assert list(message.signal_columns.strings) == ["a", "k", "v"]
    # One or two events go as Signal messages, which cost less than a string table and nine columns.
    message = _convert.signals_message("b", time.time(), three[:2])
    assert message.WhichOneof("kind") == "signals"
    assert [(s.id, s.event.name) for s in message.signals.signals] == [("x0", "a"), ("x1", "a")]


async def test_the_sdk_gives_a_uniform_batchs_keys_once_to_a_server_that_reads_them(start_server: StartServer) -> None:
    # Events with the same properties throughout (an app's usual batch): the server's Welcome says it reads
    # SignalColumns.shape_keys, so the SDK sends the keys and types once instead of once per property.
    server = await start_server(SYNC_FAILURE)
    client = await phone(server, "shaped-phone")
    assert client._shaped
    props = [{"screen": f"s{i}", "n": i, "on": i % 2 == 0} for i in range(6)]
    ids = [await client.track("screen_view", **p) for p in props]  # type: ignore[arg-type]
    await client.flush(timeout=10)
    journey = await server.store.journey("shaped-phone")
    assert [(s.signal_id, dict(s.payload)) for s in journey] == list(zip(ids, props, strict=True))
    assert [type(v) for s in journey for v in s.payload.values()] == [type(v) for p in props for v in p.values()]
    await client.close()


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


async def test_events_with_the_same_mixed_type_properties_are_stored_as_sent(start_server: StartServer) -> None:
    """Every event with the same keys and types in the same order (what the SDK's batches usually hold): the
    server takes each property's values as a stride of its type's column (api/convert.py); two of one type
    per event must not be swapped, nor a string taken for an int."""
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "mixed-columns")
    assert (await raw.read()).HasField("welcome")
    props: list[dict[str, object]] = [
        {"screen": f"s{i}", "n": i, "ratio": i / 4, "from": f"f{i}", "on": i % 2 == 0, "m": -i} for i in range(5)
    ]
    raw.outgoing.put_nowait(columns([f"m-{i}" for i in range(5)], ["mixed"] * 5, props, batch_id="m"))
    ack = await raw.read()
    while not ack.HasField("ack"):
        ack = await raw.read()
    assert list(ack.ack.signal_ids) == [f"m-{i}" for i in range(5)]
    journey = await server.store.journey("mixed-columns")
    assert [dict(s.payload) for s in journey] == props
    assert [type(v) for s in journey for v in s.payload.values()] == [type(v) for p in props for v in p.values()]
    await raw.close()


@pytest.mark.parametrize(
    ("props", "uniform"),
    [
        ([{"screen": f"s{i}", "n": i, "ratio": i / 4, "from": f"f{i}", "on": i % 2 == 0} for i in range(4)], True),
        ([{"a": "x"}, {"a": "x"}, {"a": "y"}], True),  # one string column, values repeated
        ([{}, {}, {}], False),
        ([{"n": 1}, {"n": 2.5}, {"n": 3}], False),  # one key, two types: property by property
        ([{"a": 1, "b": 2}, {"b": 2, "a": 1}, {"a": 1, "b": 2}], False),  # same keys, another order
        ([{"a": 1}, {}, {"a": 1, "b": True}], False),
    ],
)
@pytest.mark.parametrize("shaped", [False, True])
def test_the_sdks_two_column_encoders_send_the_same_events(
    props: list[dict[str, object]], uniform: bool, shaped: bool
) -> None:
    """The SDK encodes a batch whose events share keys, order and types a column per key (_uniform_columns),
    with the keys and types given once if the server reads shape_keys (``shaped``), any other batch property by
    property: what the server decodes is what was tracked, types included."""
    message = columns([f"e{i}" for i in range(len(props))], ["ev"] * len(props), props, shaped=shaped)
    assert bool(message.signal_columns.shape_keys) == (uniform and shaped)
    assert bool(message.signal_columns.prop_keys) == (not (uniform and shaped) and any(props))
    decoded = batch_from_columns(message.signal_columns)
    assert [dict(p) for p in decoded.props] == props
    assert [[type(v) for v in p.values()] for p in decoded.props] == [[type(v) for v in p.values()] for p in props]
    assert [list(p) for p in decoded.props] == [list(p) for p in props]  # key order too


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


def _short_mixed_column() -> device_pb2.DeviceMessage:
    # Every event with a string then an int: one int missing must not shift the others.
    message = columns(["a", "b", "c"], ["ok"] * 3, [{"s": "x", "n": 1}, {"s": "y", "n": 2}, {"s": "z", "n": 3}])
    del message.signal_columns.int_values[2]
    return message


def _bad_value() -> device_pb2.DeviceMessage:
    return columns(["a", "b", "c"], ["ok", "ok", "ok"], [{}, {}, {"x": float("nan")}])


def _repeated_id() -> device_pb2.DeviceMessage:
    return columns(["a", "b", "a"], ["ok", "ok", "ok"])


def _repeated_key() -> device_pb2.DeviceMessage:
    # Every signal with the same keys, one of them twice (the shape whose dicts api/convert.py builds at once).
    message = columns(["a", "b"], ["ok", "ok"], [{"n": 1, "m": 2}, {"n": 3, "m": 4}])
    keys = message.signal_columns.prop_keys
    keys[1], keys[3] = keys[0], keys[2]
    return message


def _long_string() -> device_pb2.DeviceMessage:
    return columns(["a", "b"], ["ok", "ok"], [{"s": "x"}, {"s": "y" * 1025}])


def _bad_key() -> device_pb2.DeviceMessage:
    return columns(["a", "b"], ["ok", "ok"], [{"fine": 1}, {"not fine": 2}])


def _shaped(props: list[dict[str, object]]) -> device_pb2.DeviceMessage:
    message = columns([f"s{i}" for i in range(len(props))], ["ok"] * len(props), props, shaped=True)
    assert message.signal_columns.shape_keys
    return message


def _shape_and_counts() -> device_pb2.DeviceMessage:
    message = _shaped([{"n": 1}, {"n": 2}])
    message.signal_columns.prop_counts.extend([1, 1])
    return message


def _shape_types_short() -> device_pb2.DeviceMessage:
    message = _shaped([{"n": 1, "s": "x"}, {"n": 2, "s": "y"}])
    del message.signal_columns.shape_types[1]
    return message


def _shape_key_twice() -> device_pb2.DeviceMessage:
    message = _shaped([{"n": 1, "m": 2}, {"n": 3, "m": 4}])
    keys = message.signal_columns.shape_keys
    keys[1] = keys[0]
    return message


def _shape_bad_type() -> device_pb2.DeviceMessage:
    message = _shaped([{"n": 1, "s": "x"}, {"n": 2, "s": "y"}])
    message.signal_columns.shape_types[1] = device_pb2.PROPERTY_TYPE_UNSPECIFIED
    return message


def _shape_short_values() -> device_pb2.DeviceMessage:
    message = _shaped([{"s": "x", "n": 1}, {"s": "y", "n": 2}, {"s": "z", "n": 3}])
    del message.signal_columns.int_values[2]
    return message


def _shape_bad_key() -> device_pb2.DeviceMessage:
    return _shaped([{"not fine": 1}, {"not fine": 2}])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (_shape_and_counts, "signal_columns.shape_keys"),
        (_shape_types_short, "signal_columns.shape_types"),
        (_shape_key_twice, "signal_columns.shape_keys"),
        (_shape_bad_type, "signal_columns.shape_types[1]"),
        (_shape_short_values, "signal_columns.int_values"),
        (_shape_bad_key, "signal_columns.properties[0]['not fine']"),
        (_bad_name, "signal_columns.names[3]"),
        (_bad_index, "signal_columns.names[1]"),
        (_bad_id, "signal_columns.ids[1]"),
        (_short_column, "signal_columns.int_values"),
        (_short_mixed_column, "signal_columns.int_values"),
        (_bad_value, "signal_columns.properties[2]['x']"),
        (_repeated_id, "signal_columns.ids[2]"),
        (_repeated_key, "signal_columns.prop_keys[0]"),
        (_long_string, "signal_columns.properties[1]['s']"),
        (_bad_key, "signal_columns.properties[1]['not fine']"),
    ],
)
async def test_a_bad_columnar_batch_is_invalid_argument_naming_the_column(
    start_server: StartServer, make: object, field: str
) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "bad-columns")
    assert (await raw.read()).HasField("welcome")
    raw.outgoing.put_nowait(make())  # type: ignore[operator]
    assert field in await raw.refused()
    assert await server.store.count_signals("bad-columns") == 0  # rejected whole
    await raw.close()


# Nothing listens to item_viewed: only the segment's window reads it, so the server records its batches a
# column at a time (core/ingest.py) instead of signal by signal.
BROWSERS = """\
segments:
  - {id: browsers, when: {event: item_viewed, count: {at_least: 5, within: 10m}}}
  - {id: on-sale-page, when: {event: page_viewed, where: {page: {equals: sale}}}}
scenarios:
  - id: help
    trigger: {event: help_me}
    cue: {message: "Help?", channel: chat}
"""


async def test_events_nothing_listens_to_count_in_windows_once_each(start_server: StartServer) -> None:
    server = await start_server(BROWSERS)
    raw = RawDevice(server.address, "browsing")
    assert (await raw.read()).HasField("welcome")

    async def send(message: device_pb2.DeviceMessage) -> device_pb2.ServerMessage:
        raw.outgoing.put_nowait(message)
        reply = await raw.read()
        while not reply.HasField("ack"):
            reply = await raw.read()
        return reply

    first = columns(["v1", "v2", "v3"], ["item_viewed"] * 3, [{"sku": "a"}, {"sku": "b"}, {}], batch_id="b1")
    await send(first)
    assert "browsers" not in server.core.device_view("browsing").segments
    first.signal_columns.batch_id = "b2"
    await send(first)  # a resend counts nothing
    assert "browsers" not in server.core.device_view("browsing").segments
    # Mixed with an event a scenario listens to, and with a page whose last view decides a segment.
    mixed = columns(
        ["v3", "v4", "p1", "h1", "p2", "v5"],
        ["item_viewed", "item_viewed", "page_viewed", "help_me", "page_viewed", "item_viewed"],
        [{}, {}, {"page": "home"}, {}, {"page": "sale"}, {}],
        batch_id="b3",
    )
    ack = await send(mixed)
    assert list(ack.ack.duplicate_ids) == ["v3"]
    view = server.core.device_view("browsing")
    assert "browsers" in view.segments and "on-sale-page" in view.segments
    assert await server.store.count_signals("browsing") == 8
    await raw.close()


async def test_row_properties_keep_their_types_at_default_values_and_a_kindless_one_is_named(
    start_server: StartServer,
) -> None:
    """A row's property values at their defaults ("", 0, 0.0, false: a oneof member is set even then) arrive
    as themselves, not as missing nor as another type; a value with no kind set is INVALID_ARGUMENT naming the
    property, and nothing of its batch is stored."""
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "row-defaults")
    assert (await raw.read()).HasField("welcome")
    defaults: dict[str, object] = {"s": "", "i": 0, "d": 0.0, "b": False, "t": "x", "n": -5, "r": 2.5, "y": True}
    raw.send(_convert.event_signal("d-1", time.time(), "sync_failed", defaults), batch_id="d")  # type: ignore[arg-type]
    ack = await raw.read()
    while not ack.HasField("ack"):
        ack = await raw.read()
    assert list(ack.ack.signal_ids) == ["d-1"]
    (stored,) = await server.store.journey("row-defaults")
    assert dict(stored.payload) == defaults
    assert {k: type(v) for k, v in stored.payload.items()} == {k: type(v) for k, v in defaults.items()}
    kindless = _convert.event_signal("d-2", time.time(), "sync_failed", {"fine": 1, "empty": 2})
    kindless.event.properties["empty"].Clear()
    raw.send(kindless, batch_id="e")
    assert "signals.signals[0].event.properties['empty']" in await raw.refused()
    assert await server.store.count_signals("row-defaults") == 1
    await raw.close()
