"""Reliable delivery without a server: backoff, retry classes, the disk journal, resend order, cue dedupe."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint import _convert, _grpc_errors
from cuepoint._batcher import SignalBatcher
from cuepoint._journal import Journal
from cuepoint._reconnect import Backoff, is_retryable, is_throttled
from cuepoint.config import DEFAULT_CHANNEL_OPTIONS, merge_channel_options
from cuepoint.v1 import device_pb2

State = cuepoint.ConnectionState


def make_client(**config: object) -> cuepoint.Client:
    return cuepoint.Client(
        "127.0.0.1:1",
        app_id="fitkit",
        device_id="dev-1",
        config=cuepoint.ClientConfig(**config),  # type: ignore[arg-type]
    )


# --- public surface and config ----------------------------------------------------------


def test_connection_state_is_exported() -> None:
    assert "ConnectionState" in cuepoint.__all__ and "StateCallback" in cuepoint.__all__
    assert [s.name for s in cuepoint.ConnectionState] == ["CONNECTING", "CONNECTED", "STALE", "CLOSED"]
    client = make_client()
    assert client.state is State.CONNECTING and client.last_error is None


def test_reconnect_config_defaults_and_validation() -> None:
    config = cuepoint.ClientConfig()
    assert config.reconnect is True
    assert (config.reconnect_initial_backoff, config.reconnect_max_backoff) == (0.2, 30.0)
    assert config.reconnect_max_attempts is None and config.outbox_path is None
    for bad in (
        {"reconnect_initial_backoff": 0},
        {"reconnect_initial_backoff": 1.0, "reconnect_max_backoff": 0.5},
        {"reconnect_max_attempts": 0},
        {"reconnect_max_attempts": True},
        {"outbox_path": ""},
    ):
        with pytest.raises(ValueError):
            cuepoint.ClientConfig(**bad)


def test_keepalive_defaults_merge_with_user_options_user_wins() -> None:
    options = dict(cuepoint.ClientConfig().grpc_options())
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    user = (("grpc.keepalive_time_ms", 60_000), ("grpc.max_receive_message_length", 1024))
    merged = cuepoint.ClientConfig(channel_options=user).grpc_options()
    assert dict(merged)["grpc.keepalive_time_ms"] == 60_000
    assert [key for key, _ in merged].count("grpc.keepalive_time_ms") == 1
    assert dict(merged)["grpc.max_receive_message_length"] == 1024
    assert merge_channel_options(DEFAULT_CHANNEL_OPTIONS, ()) == DEFAULT_CHANNEL_OPTIONS
    assert dict(cuepoint.AssociateConfig().grpc_options())["grpc.keepalive_time_ms"] == 20_000


# --- backoff and what is retryable --------------------------------------------------------------


def test_backoff_full_jitter_stays_within_the_exponential_cap() -> None:
    backoff = Backoff(0.2, 30.0, random.Random(7).uniform)
    assert [backoff.cap(n) for n in range(10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    for attempt in range(200):
        for _ in range(20):
            delay = backoff.delay(attempt)
            assert 0.0 <= delay <= backoff.cap(attempt)
    assert backoff.cap(10_000) == 30.0  # no overflow however long the outage
    # Seeded: the same schedule every run; and it is jittered, not a fixed ladder.
    first = [Backoff(0.2, 30.0, random.Random(1).uniform).delay(n) for n in range(8)]
    again = [Backoff(0.2, 30.0, random.Random(1).uniform).delay(n) for n in range(8)]
    assert first == again and len(set(first)) == len(first)


def test_throttled_backoff_waits_at_least_half_the_cap() -> None:
    backoff = Backoff(0.2, 30.0, random.Random(3).uniform)
    for attempt in range(12):
        for _ in range(20):
            assert backoff.cap(attempt) / 2 <= backoff.delay(attempt, throttled=True) <= backoff.cap(attempt)
    lowest = Backoff(1.0, 8.0, lambda low, high: low)
    assert [lowest.delay(n) for n in range(5)] == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert [lowest.delay(n, throttled=True) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


@pytest.mark.parametrize(
    ("code", "retry"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.CANCELLED, True),
        (grpc.StatusCode.ABORTED, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.OK, True),  # the server ended the stream without a goodbye
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.UNAUTHENTICATED, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.UNIMPLEMENTED, False),
    ],
)
def test_which_failures_are_retried(code: grpc.StatusCode, retry: bool) -> None:
    error = _grpc_errors.from_status(code, "details")
    assert is_retryable(error) is retry
    assert is_throttled(error) is (code is grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_local_failures_are_classified_too() -> None:
    assert is_retryable(cuepoint.TimedOut("no Welcome within 10s"))
    assert is_retryable(cuepoint.ConnectionLost("the server ended the session stream"))
    assert not is_retryable(cuepoint.ServerError("expected Welcome as the first server message, got ack"))
    assert not is_retryable(cuepoint.CuepointError("unexpected error handling a server message"))


# --- resend order -------------------------------------------------------------------------------


def test_resend_order_is_sent_but_unacked_first_then_queued_with_the_same_ids() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=3, linger=0.0)
    for i in range(5):
        b.add(f"s{i}", f"p{i}", now=0.0)
    assert [i for i, _ in b.take_batch()] == ["s0", "s1", "s2"]  # in flight when the stream breaks
    b.add("s5", "p5", now=0.0)  # tracked while disconnected
    b.ack(["s1"])  # the one ack that made it
    assert b.requeue_in_flight() == 2
    resent = [i for batch in (b.take_batch(), b.take_batch()) for i, _ in batch]
    assert resent == ["s0", "s2", "s3", "s4", "s5"]
    assert [p for _, p in b.pending_items()] == ["p0", "p2", "p3", "p4", "p5"]
    # A second break before any ack: same order again.
    b.requeue_in_flight()
    assert [i for i, _ in b.take_batch()] == ["s0", "s2", "s3"]
    assert b.drop(["s0", "s2", "s3", "s4", "s5"]) == 5
    assert b.acked_through(b.last_seq)


def test_throttling_halves_batches_and_acks_restore_them() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=100, linger=0.0)
    b.limit_batch(40)
    b.throttle()
    b.throttle()
    assert b.max_batch == 10
    b.limit_batch(40)  # a new Welcome keeps the throttling
    assert b.max_batch == 10
    for i in range(12):
        b.add(f"s{i}", "p", now=0.0)
    assert len(b.take_batch()) == 10
    b.relax()
    assert b.max_batch == 20
    b.relax()
    b.relax()
    assert b.max_batch == 40
    for _ in range(10):
        b.throttle()
    assert b.max_batch == 1


# --- the disk journal ----------------------------------------------------------------------------


def test_journal_round_trip_across_two_runs(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite")
    now = time.time()
    run1 = Journal(path, "fitkit", "dev-1")
    for i in range(5):
        run1.add(f"s{i}", now + i, f"payload-{i}".encode())
    run1.remove(["s1"])
    assert run1.buffered == 6
    assert run1.commit() and run1.buffered == 0
    run1.add("s5", now, b"never committed")
    other = Journal(path, "fitkit", "dev-2")  # another install sharing the file sees none of it
    other.add("x", now, b"x")
    other.close()
    run1.close()  # commits what is buffered

    run2 = Journal(path, "fitkit", "dev-1")
    loaded = run2.load(not_before=now - 1)
    assert loaded == [(f"s{i}", f"payload-{i}".encode()) for i in (0, 2, 3, 4)] + [("s5", b"never committed")]
    run2.add("s0", now, b"re-added: ignored")  # ids are unique per device
    run2.remove(["s0", "s2", "unknown"])
    run2.commit()
    assert run2.count() == 3
    # Too old for the server: deleted on load rather than resent.
    assert [i for i, _ in run2.load(not_before=now + 3.5)] == ["s4"]
    assert run2.count() == 1
    run2.close()
    run2.close()  # idempotent
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_client_journals_tracked_signals_and_the_next_run_resends_them_first(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite")
    run1 = make_client(outbox_path=path)
    ids = [await run1.track("sync_failed", n=i) for i in range(3)]
    ids.append(await run1.set_context(app_version="4.3.0"))
    await asyncio.sleep(0)  # one commit for the whole burst, on the next loop pass
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT signal_id FROM outbox ORDER BY seq")] == ids
    await run1.close()  # never connected: the signals stay journaled

    run2 = make_client(outbox_path=path)
    fresh = await run2.track("app_opened")
    order = [signal_id for signal_id, _ in run2._batcher.pending_items()]
    assert order == [*ids, fresh]  # the earlier run's first, original ids
    resent = [signal for _, signal in run2._batcher.take_batch()]
    assert [s.id for s in resent] == order
    assert resent[0].event.name == "sync_failed" and resent[3].context.context.app_version == "4.3.0"
    # Acked ones leave the journal (as the reader does on a SignalAck).
    ack = device_pb2.ServerMessage(ack=device_pb2.SignalAck(batch_id="b", signal_ids=ids[:2], duplicate_ids=ids[:1]))
    run2._dispatch(ack)
    await asyncio.sleep(0)
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT signal_id FROM outbox ORDER BY seq")] == [*ids[2:], fresh]
    await run2.close()


async def test_unusable_outbox_path_degrades_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(outbox_path=str(tmp_path / "missing-dir" / "outbox.sqlite"))
    await client.track("app_opened")
    assert client.pending_signals == 1
    assert "outbox disabled" in caplog.text
    await client.close()


# --- cue dedupe and the state machine --------------------------------------------------------


class FakeStream:
    def __init__(self) -> None:
        self.sent: list[device_pb2.DeviceMessage] = []
        self.closed = False

    async def write(self, message: device_pb2.DeviceMessage) -> None:
        self.sent.append(message)

    async def done_writing(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


def cue_message(cue_id: str) -> device_pb2.ServerMessage:
    return device_pb2.ServerMessage(cue=_convert.cue_to_proto(cuepoint.Cue(cue_id=cue_id, message="Help?")))


def opened(client: cuepoint.Client, stream: FakeStream) -> None:
    """Pretend the handshake happened (no reader or sender tasks)."""
    client._state = "open"
    client._stream = stream  # type: ignore[assignment]
    client._set_state(State.CONNECTED)


async def test_a_cue_delivered_again_is_surfaced_once() -> None:
    client = make_client()
    stream = FakeStream()
    opened(client, stream)
    seen: list[str] = []
    client.on_cue(lambda cue: seen.append(cue.cue_id))
    events = client.events()
    client._dispatch(cue_message("cue-1"))
    client._dispatch(cue_message("cue-1"))  # re-offered on a new session
    client._dispatch(cue_message("cue-2"))
    assert seen == ["cue-1", "cue-2"]
    assert [(await client.next_cue(timeout=1)).cue_id for _ in range(2)] == ["cue-1", "cue-2"]
    with pytest.raises(cuepoint.TimedOut):
        await client.next_cue(timeout=0.01)
    assert [getattr(await anext(events), "cue_id", None) for _ in range(2)] == ["cue-1", "cue-2"]

    # Answered, then re-offered: the server never got the answer, so it goes out again.
    await client.decline("cue-1")
    assert [m.cue_response.cue_id for m in stream.sent] == ["cue-1"]
    client._dispatch(cue_message("cue-1"))
    await asyncio.sleep(0)
    assert [m.cue_response.cue_id for m in stream.sent] == ["cue-1", "cue-1"]
    assert stream.sent[0] == stream.sent[1]  # same response, same time
    assert seen == ["cue-1", "cue-2"]
    await client.close()


async def test_answer_while_stale_is_recorded_then_sent_on_the_re_offer() -> None:
    client = make_client()
    opened(client, FakeStream())
    client._dispatch(cue_message("cue-1"))
    cue = await client.next_cue(timeout=1)
    client._stream = None
    client._set_state(State.STALE)
    await client.decline(cue)  # returns at once: nothing to write to
    with pytest.raises(cuepoint.Rejected):
        await client.decline(cue)
    again = FakeStream()
    opened(client, again)
    client._dispatch(cue_message("cue-1"))
    await asyncio.sleep(0)
    assert [m.cue_response.cue_id for m in again.sent] == ["cue-1"]
    await client.close()


async def test_retryable_failure_goes_stale_and_keeps_waiters_non_retryable_closes() -> None:
    client = make_client(reconnect_initial_backoff=0.01, reconnect_max_backoff=0.02)
    stream = FakeStream()
    opened(client, stream)
    states = client.states()
    assert await anext(states) is State.CONNECTED
    await client.track("screen_viewed")
    flushing = asyncio.ensure_future(client.flush(timeout=5))
    await asyncio.sleep(0)

    client._fail(cuepoint.ConnectionLost("UNAVAILABLE: gone", code="UNAVAILABLE"), stream)  # type: ignore[arg-type]
    assert await anext(states) is State.STALE
    assert client.is_open and client.failure is None and not flushing.done()
    assert client._stream is None and client.last_error is not None
    await client.track("while_stale")  # still buffering
    assert client.pending_signals == 2
    # Late news from the old stream is ignored.
    client._fail(cuepoint.InvalidSignal("late", code="INVALID_ARGUMENT"), stream)  # type: ignore[arg-type]
    assert client.state is State.STALE and client.failure is None
    await asyncio.sleep(0.05)
    assert stream.closed  # the broken stream's channel was released
    assert client.state is State.STALE  # 127.0.0.1:1 refuses: still trying

    # A non-retryable error ends the client (here reported while no reconnect attempt runs).
    reconnector = client._reconnector
    assert reconnector is not None
    reconnector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reconnector
    client._fail(cuepoint.Rejected("PERMISSION_DENIED: no", code="PERMISSION_DENIED"))
    assert client.state is State.CLOSED and isinstance(client.failure, cuepoint.Rejected)
    assert [s async for s in states] == [State.CLOSED]
    with pytest.raises(cuepoint.Rejected):
        await flushing
    await client.close()


async def test_state_callbacks_sync_and_async_and_unsubscribe() -> None:
    client = make_client()
    sync_seen: list[cuepoint.ConnectionState] = []
    async_seen: list[cuepoint.ConnectionState] = []

    async def record(state: cuepoint.ConnectionState) -> None:
        async_seen.append(state)

    def broken(state: cuepoint.ConnectionState) -> None:
        raise RuntimeError("app bug")

    client.on_state(sync_seen.append)
    client.on_state(record)
    client.on_state(broken)  # logged, never raised into the SDK
    opened(client, FakeStream())
    await asyncio.sleep(0)  # async callbacks run as tasks
    stop = client.on_state(lambda s: sync_seen.append(s))
    stop()
    await client.close()
    await asyncio.sleep(0)
    assert sync_seen == async_seen == [State.CONNECTED, State.CLOSED]
    assert [s async for s in client.states()] == [State.CLOSED]


def test_a_local_transport_failure_is_a_lost_connection_not_a_server_error() -> None:
    import grpc

    from cuepoint._grpc_errors import from_status

    assert isinstance(from_status(grpc.StatusCode.INTERNAL, "Internal error from Core"), cuepoint.ConnectionLost)
    assert isinstance(from_status(grpc.StatusCode.INTERNAL, "internal error"), cuepoint.ServerError)


def test_a_stream_reset_by_the_server_is_a_lost_connection_not_a_server_error() -> None:
    """What the client's C core reports when a server (grpc's ph2_server) resets its streams at shutdown."""
    import grpc

    from cuepoint._grpc_errors import from_status
    from cuepoint._reconnect import is_retryable

    reset = from_status(grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))")
    assert isinstance(reset, cuepoint.ConnectionLost) and is_retryable(reset)
    # An INTERNAL the server's own code sends still ends the client: it would fail the same way again.
    refused = from_status(grpc.StatusCode.INTERNAL, "Stream removed by the handler")
    assert isinstance(refused, cuepoint.ServerError) and not is_retryable(refused)
