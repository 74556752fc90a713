"""The server stays up: random DeviceMessage sequences and raw bytes over real gRPC.

Each example opens a device stream on one long-lived server and sends a random
sequence of frames: well-formed messages with random oneofs, ids, unicode
strings, enum numbers and timestamps (huge, negative, out of range), and raw
byte strings that may not even parse. Properties:

- the server ends every such stream with OK, INVALID_ARGUMENT or
  RESOURCE_EXHAUSTED: never UNKNOWN/INTERNAL (an unhandled exception) nor
  CANCELLED (the reader died on something it did not expect);
- afterwards a separate, well-behaved SDK client still connects, tracks and
  gets its acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import structlog
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import cuepoint
from cuepoint.v1 import common_pb2, device_pb2
from cuepoint_server.app import CuepointServer, ServerConfig

from .conftest import SHIPPED

T = TypeVar("T")

pytestmark = pytest.mark.timeout(90)

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Server log events that mean a stream ended on something the server did not expect.
UNEXPECTED = {"device.read_failed", "background.failed", "signals.store_failed"}


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def mostly(valid: st.SearchStrategy[T], wild: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`valid` three times in four, so sequences get past the first check often enough."""
    return st.integers(0, 3).flatmap(lambda i: wild if i == 0 else valid)


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Mostly short; sometimes long enough to cross the server's string limits.
TEXT = st.one_of(st.text(max_size=12), st.text(max_size=80), st.text(min_size=1000, max_size=1100))
NAME = mostly(st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True), TEXT)
ID = mostly(st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True), TEXT)
CONTEXT_KEY = st.one_of(
    st.sampled_from(["app.version", "device.os", "location.city", "user.tier", "user.id", "attributes.plan"]), TEXT
)


@st.composite
def timestamps(draw: st.DrawFn) -> common_pb2.Signal:
    import google.protobuf.timestamp_pb2 as ts

    choice = draw(st.sampled_from(["now", "now", "near", "any"]))
    stamp = ts.Timestamp()
    if choice == "now":
        stamp.GetCurrentTime()
    elif choice == "near":
        stamp.GetCurrentTime()
        stamp.seconds += draw(st.integers(min_value=-10 * 86400, max_value=10 * 86400))
    else:
        stamp.seconds = draw(INT64)
        stamp.nanos = draw(INT32)
    return stamp  # type: ignore[return-value]


def values() -> st.SearchStrategy[common_pb2.AttributeValue]:
    return st.one_of(
        st.builds(common_pb2.AttributeValue, string_value=st.text(max_size=20)),
        st.builds(common_pb2.AttributeValue, int_value=st.integers(-1000, 1000)),
        st.builds(common_pb2.AttributeValue, string_value=TEXT),
        st.builds(common_pb2.AttributeValue, int_value=INT64),
        st.builds(common_pb2.AttributeValue, double_value=st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(common_pb2.AttributeValue, bool_value=st.booleans()),
        st.just(common_pb2.AttributeValue()),  # no kind set
    )


ATTRS = st.dictionaries(mostly(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), TEXT), values(), max_size=4)


@st.composite
def contexts(draw: st.DrawFn) -> common_pb2.Context:
    ctx = common_pb2.Context(
        app_version=draw(mostly(st.sampled_from(["", "4.2.0", "4.10.1-beta"]), TEXT)),
        os=draw(st.sampled_from(["", "iOS", "Android"])),
        location=common_pb2.Location(city=draw(mostly(st.sampled_from(["", "Lyon"]), TEXT))),
    )
    for key, value in draw(ATTRS).items():
        ctx.attributes[key].CopyFrom(value)
    return ctx


@st.composite
def users(draw: st.DrawFn) -> common_pb2.UserIdentity:
    user = common_pb2.UserIdentity(
        user_id=draw(mostly(st.just("fuzz-user"), TEXT)), tier=draw(st.sampled_from(["", "premium", "free"]))
    )
    for key, value in draw(ATTRS).items():
        user.attributes[key].CopyFrom(value)
    return user


@st.composite
def hellos(draw: st.DrawFn) -> device_pb2.DeviceMessage:
    hello = device_pb2.Hello(
        app_id=draw(mostly(st.sampled_from(["fitkit", "otherapp"]), TEXT)),
        device_id=draw(mostly(st.from_regex(r"fuzz-[a-z0-9]{1,8}", fullmatch=True), TEXT)),
        context=draw(contexts()),
        consent=common_pb2.Consent(level=draw(mostly(st.integers(0, 3), INT32))),  # type: ignore[arg-type]
        sdk_version=draw(TEXT),
    )
    if draw(st.booleans()):
        hello.user.CopyFrom(draw(users()))
    return device_pb2.DeviceMessage(hello=hello)


@st.composite
def signals(draw: st.DrawFn) -> common_pb2.Signal:
    signal = common_pb2.Signal(id=draw(ID))
    if draw(st.booleans()):
        signal.time.CopyFrom(draw(timestamps()))
    kind = draw(st.sampled_from(["event", "event", "event", "context", "none"]))
    if kind == "event":
        signal.event.name = draw(st.one_of(st.sampled_from(["sync_failed", "sync_completed"]), NAME))
        for key, value in draw(ATTRS).items():
            signal.event.properties[key].CopyFrom(value)
    elif kind == "context":
        signal.context.context.CopyFrom(draw(contexts()))
        if draw(st.booleans()):
            signal.context.user.CopyFrom(draw(users()))
        signal.context.clear_keys.extend(draw(st.lists(CONTEXT_KEY, max_size=3)))
    return signal


@st.composite
def batches(draw: st.DrawFn) -> device_pb2.DeviceMessage:
    batch = device_pb2.SignalBatch(batch_id=draw(ID), signals=draw(st.lists(signals(), max_size=6)))
    if draw(st.booleans()):
        batch.sent_at.CopyFrom(draw(timestamps()))
    return device_pb2.DeviceMessage(signals=batch)


@st.composite
def responses(draw: st.DrawFn) -> device_pb2.DeviceMessage:
    response = device_pb2.CueResponse(
        cue_id=draw(ID),
        kind=draw(mostly(st.integers(1, 4), INT32)),  # type: ignore[arg-type]
    )
    if draw(st.booleans()):
        response.time.CopyFrom(draw(timestamps()))
    return device_pb2.DeviceMessage(cue_response=response)


MARK = "MARKER"


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """A well-formed message made undecodable: invalid UTF-8 in a string field, or cut short."""
    hello = draw(hellos())
    hello.hello.context.app_version = MARK
    batch = draw(batches())
    batch.signals.signals.add(id=MARK).event.name = "sync_failed"
    data = draw(st.sampled_from([hello, batch])).SerializeToString()
    if draw(st.booleans()):
        bad = draw(st.sampled_from([b"MAR\xffER", b"\xc3\x28KER", b"MA\xed\xa0\x80ER"]))  # stray, cut, surrogate
        return data.replace(MARK.encode(), bad, 1)
    return data[: draw(st.integers(1, max(1, len(data) - 1)))]


FRAME = st.one_of(
    corrupted(),
    hellos().map(lambda m: m.SerializeToString()),
    batches().map(lambda m: m.SerializeToString()),
    batches().map(lambda m: m.SerializeToString()),
    responses().map(lambda m: m.SerializeToString()),
    st.just(device_pb2.DeviceMessage().SerializeToString()),  # no kind at all
    st.binary(max_size=64),  # anything, mostly undecodable
)
# Most sequences start with a well-formed hello so the post-hello paths get exercised.
SEQUENCES = st.tuples(
    mostly(hellos().map(lambda m: m.SerializeToString()), st.one_of(corrupted(), FRAME)),
    st.lists(mostly(batches().map(lambda m: m.SerializeToString()), FRAME), max_size=6),
).map(lambda t: [t[0], *t[1]])


def _explicit() -> dict[str, list[bytes]]:
    """Hostile shapes every run covers, whatever the random draw."""
    hello = device_pb2.DeviceMessage(
        hello=device_pb2.Hello(
            app_id="fitkit",
            device_id="fuzz-explicit",
            user=common_pb2.UserIdentity(user_id="fuzz-user", tier="premium"),
            consent=common_pb2.Consent(level=common_pb2.CONSENT_LEVEL_FULL),
        )
    ).SerializeToString()
    batch = device_pb2.DeviceMessage(
        signals=device_pb2.SignalBatch(
            batch_id="b", signals=[common_pb2.Signal(id=MARK, event=common_pb2.Event(name="sync_failed"))]
        )
    )
    data = batch.SerializeToString()
    huge = device_pb2.DeviceMessage()
    huge.CopyFrom(batch)
    huge.signals.signals[0].time.seconds = 2**62
    huge.signals.sent_at.seconds = -(2**62)
    return {
        "bad UTF-8 after hello": [hello, data.replace(MARK.encode(), b"MAR\xffER")],
        "bad UTF-8 hello": [hello.replace(b"fitkit", b"fitk\xffT")],
        "truncated after hello": [hello, data[:-3]],
        "garbage first": [b"\xff\xff\xff\xff"],
        "garbage after hello": [hello, b"\x0e\x04gF7"],
        "unknown response kind": [
            hello,
            device_pb2.DeviceMessage(
                cue_response=device_pb2.CueResponse(cue_id="c", kind=12345)  # type: ignore[arg-type]
            ).SerializeToString(),
        ],
        "absurd times": [hello, huge.SerializeToString()],
        "second hello": [hello, hello],
        "empty messages": [hello, b"", b""],
    }


EXPLICIT = _explicit()


async def _exchange(address: str, frames: list[bytes]) -> tuple[grpc.StatusCode | None, str]:
    """Send `frames`, half-close, drain the replies; the status the server ended the stream with.

    None when grpc's client replaced it: a write that races with the server's status gets the
    call marked INTERNAL "Internal error from Core ..." locally (grpc/aio/_call.py, _write), a
    text no server status has. The server-side checks in the test still apply to such runs.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        connect = channel.stream_stream(
            "/cuepoint.v1.DeviceService/Connect",
            request_serializer=lambda b: b,
            response_deserializer=device_pb2.ServerMessage.FromString,
        )
        call = connect()
        async with asyncio.timeout(10):
            # Explicit writes: once the server has ended the call, a write fails locally
            # (a request iterator would turn that into a client-side INTERNAL).
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for frame in frames:
                    await call.write(frame)
                await call.done_writing()
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
            code: grpc.StatusCode = await call.code()
            details: str = await call.details() or ""
            if code is grpc.StatusCode.INTERNAL and details.startswith("Internal error from Core"):
                return None, details
            return code, details


async def _well_behaved(address: str, n: int) -> None:
    client = await cuepoint.connect(
        address,
        app_id="fitkit",
        device_id=f"canary-{n}",
        context=cuepoint.Context(app_version="4.2.0", os="iOS"),
        user=cuepoint.User(user_id=f"canary-user-{n}", tier="premium"),
        consent=cuepoint.Consent.FULL,
    )
    try:
        await client.track("sync_completed", duration_ms=1200)
        await client.flush(timeout=5)
        assert client.is_open
    finally:
        await client.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[asyncio.Runner, CuepointServer]]:
    # One server for all examples, on one event loop the examples re-enter.
    runner = asyncio.Runner()
    config = ServerConfig(port=0, db=str(tmp_path / "fuzz.db"), scenarios=str(SHIPPED), watch_scenarios=False)
    server = runner.run(CuepointServer.start(config))
    try:
        yield runner, server
    finally:
        runner.run(server.stop(0.5))
        runner.close()


def _with_examples(test: Callable[..., None]) -> Callable[..., None]:
    for frames in EXPLICIT.values():
        test = example(frames=frames)(test)
    return test


def test_random_device_streams_never_take_the_server_down(
    live_server: tuple[asyncio.Runner, CuepointServer],
) -> None:
    runner, server = live_server
    counter = itertools.count()
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        # No shrinking: a failure prints the frames as drawn, and a server bug fails in seconds.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames=SEQUENCES)
    @_with_examples
    def stream(frames: list[bytes]) -> None:
        with structlog.testing.capture_logs() as events:
            code, details = runner.run(_exchange(server.address, frames))
            if code is not None:
                seen[code] = seen.get(code, 0) + 1
                assert code in ALLOWED, (code, details, frames)
            runner.run(_well_behaved(server.address, next(counter)))
        # Server side (also when the client could not see the status): no handler raised
        # (grpc logs "Unexpected [...] raised by servicer method"), no reader died on its input.
        assert not grpc_errors.records, [r.getMessage() for r in grpc_errors.records]
        unexpected = [e for e in events if e["event"] in UNEXPECTED or e["log_level"] in ("error", "critical")]
        assert not unexpected, unexpected

    grpc_errors = _ErrorRecords()
    logging.getLogger("grpc").addHandler(grpc_errors)
    try:
        stream()
    finally:
        logging.getLogger("grpc").removeHandler(grpc_errors)
    # The run exercised both the happy and the rejecting paths.
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT) and seen.get(grpc.StatusCode.OK), seen
