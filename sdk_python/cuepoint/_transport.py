"""One bidirectional gRPC stream with SDK-shaped failures.

Wraps a grpc.aio stream-stream call in reader/writer style so the clients
never touch grpc: every failure surfaces as a ``CuepointError`` (mapped in
``_grpc_errors``), and writes are serialised because grpc allows only one
outstanding write per call while the SDK writes from several tasks.

Each stream owns its channel. That keeps close() simple and gives a future
reconnect a single thing to replace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

import grpc
import grpc.aio

from . import _grpc_errors
from .errors import ConnectionLost, CuepointError, ServerError, TimedOut

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Given a channel, returns the stub's stream-stream method (e.g. Stub(ch).Connect).
MethodFactory = Callable[[Any], Any]


class BidiStream(Generic[Req, Resp]):
    def __init__(self, channel: Any, call: Any, start: Callable[[], Any] | None = None) -> None:
        self._channel = channel
        self._call = call
        # Starts the call again on the same channel (restart); None: this stream cannot.
        self._start = start
        self._write_lock = asyncio.Lock()

    @classmethod
    def open(
        cls,
        target: str,
        method: MethodFactory,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
    ) -> BidiStream[Req, Resp]:
        """Start the call; connection problems show up on the first write or read."""
        if credentials is not None:
            channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        else:
            channel = grpc.aio.insecure_channel(target, options=list(options))
        def start() -> Any:
            return method(channel)(metadata=tuple(metadata) or None)

        return cls(channel, start(), start)

    def restart(self) -> bool:
        """Replace the call with a new one on the same channel, before anything was exchanged on it; False if
        this stream cannot."""
        if self._start is None:
            return False
        self._call.cancel()
        self._call = self._start()
        return True

    async def write(self, message: Req) -> None:
        async with self._write_lock:
            try:
                await self._call.write(message)
            except grpc.RpcError as exc:
                raise _grpc_errors.from_rpc_error(exc) from exc
            except asyncio.InvalidStateError as exc:
                # grpc raises this when the call already finished; the status says why.
                raise await self._final_error() from exc

    async def read(self) -> Resp | None:
        """The next message, or ``None`` once the server has closed the stream cleanly."""
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise _grpc_errors.from_rpc_error(exc) from exc
        if message is grpc.aio.EOF:
            return None
        return cast(Resp, message)

    async def done_writing(self) -> None:
        """Half-close: tell the server no more messages are coming. Best effort."""
        async with self._write_lock:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._call.done_writing()

    async def close(self) -> None:
        """Cancel the call if still running and release the channel. Idempotent."""
        self._call.cancel()
        await self._channel.close()

    async def _final_error(self) -> CuepointError:
        if not self._call.done():
            return ConnectionLost("the stream is closed for writing")
        return _grpc_errors.from_status(
            await self._call.code(), await self._call.details(), await self._call.trailing_metadata()
        )


async def handshake(stream: BidiStream[Req, Resp], opening: Req, *, expect: str, target: str, within: float) -> Any:
    """Send the opening message and return the server's first reply, which must be `expect`.

    Both clients open this way (Hello -> Welcome, SignIn -> SignedIn); the
    reply's `kind` oneof names what came back.
    """
    try:
        async with asyncio.timeout(within):
            for attempt in range(_OPENING_RETRIES + 1):
                try:
                    await stream.write(opening)
                    break
                except ConnectionLost as exc:
                    if attempt == _OPENING_RETRIES or not _status_lost(exc) or not stream.restart():
                        raise
            first = await stream.read()
    except CuepointError:
        raise
    except TimeoutError as exc:
        raise TimedOut(f"no {expect} from {target} within {within}s") from exc
    if first is None:
        raise ConnectionLost(f"the server closed the stream before {expect}")
    kind = first.WhichOneof("kind")  # type: ignore[attr-defined]
    if kind != expect:
        raise ServerError(f"expected {expect} as the first server message, got {kind}")
    return getattr(first, expect)


# grpc.aio (grpc/grpc#36066): when the server ends a call before the client's first write gets out (an
# interceptor refusing the credentials, say), that write can fail after the server's status arrived and
# overwrite it with a local INTERNAL "Internal error from Core", so a refusal (PERMISSION_DENIED) would read
# as a lost connection. Seen once in CI (an associate token refused). The opening message is written again on
# a new call, where the status is seldom lost twice; nothing was exchanged on the first.
_OPENING_RETRIES = 2


def _status_lost(error: ConnectionLost) -> bool:
    return error.code == "INTERNAL" and error.details == _grpc_errors.LOCAL_TRANSPORT_FAILURE
