"""The opening write's lost status (grpc/grpc#36066): a server refusing a call at once can have its status
overwritten on the client by a local INTERNAL "Internal error from Core" when the client's first write fails
after the status arrived. The handshake writes the opening again on a new call, so the refusal still reads as
a refusal. grpc's race cannot be timed from a test against a real server, so these calls are stand-ins."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

import cuepoint
from cuepoint._transport import BidiStream, handshake
from cuepoint.v1 import associate_pb2


def lost_status() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Internal error from Core",
        debug_error_string='Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)',
    )


def refused() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="not your queue"
    )


class Call:
    """A stream-stream call whose first write fails with ``error`` (or succeeds), then reads ``reply``."""

    def __init__(self, error: grpc.aio.AioRpcError | None, reply: Any = None) -> None:
        self.error = error
        self.reply = reply
        self.written: list[Any] = []
        self.cancelled = False

    async def write(self, message: Any) -> None:
        if self.error is not None:
            raise self.error
        self.written.append(message)

    async def read(self) -> Any:
        return self.reply

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def stream_of(calls: list[Call]) -> tuple[BidiStream[Any, Any], list[Call]]:
    started: list[Call] = []

    def start() -> Call:
        call = calls[len(started)]
        started.append(call)
        return call

    return BidiStream(object(), start(), start), started


SIGN_IN = associate_pb2.AssociateMessage(sign_in=associate_pb2.SignIn(associate_id="dana"))
SIGNED_IN = associate_pb2.AssociateEvent(signed_in=associate_pb2.SignedIn())


async def test_an_opening_whose_status_was_lost_is_written_again_on_a_new_call() -> None:
    stream, started = stream_of([Call(lost_status()), Call(None, SIGNED_IN)])
    reply = await handshake(stream, SIGN_IN, expect="signed_in", target="t", within=5)
    assert reply == SIGNED_IN.signed_in
    assert len(started) == 2 and started[0].cancelled and started[1].written == [SIGN_IN]


async def test_the_refusal_behind_a_lost_status_reaches_the_caller() -> None:
    stream, started = stream_of([Call(lost_status()), Call(refused())])
    with pytest.raises(cuepoint.Rejected) as info:
        await handshake(stream, SIGN_IN, expect="signed_in", target="t", within=5)
    assert info.value.code == "PERMISSION_DENIED"
    assert len(started) == 2


async def test_retries_are_bounded_and_other_failures_are_not_retried() -> None:
    stream, started = stream_of([Call(lost_status()) for _ in range(5)])
    with pytest.raises(cuepoint.ConnectionLost):
        await handshake(stream, SIGN_IN, expect="signed_in", target="t", within=5)
    assert len(started) == 3  # the first call and two more
    unavailable = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="connection refused"
    )
    stream, started = stream_of([Call(unavailable), Call(None, SIGNED_IN)])
    with pytest.raises(cuepoint.ConnectionLost):
        await handshake(stream, SIGN_IN, expect="signed_in", target="t", within=5)
    assert len(started) == 1  # a dead server is the reconnect loop's business, not this
