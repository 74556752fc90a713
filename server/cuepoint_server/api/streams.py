"""What both streaming services do first: read the opening message and check its kind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from .auth import undecodable
from .errors import abort

__all__ = ["opening"]

M = TypeVar("M", bound=Message)


async def opening(
    context: Any,
    message: type[M],
    *,
    kind: str,
    deadline: float | None = None,
    requests: AsyncIterator[M] | None = None,
) -> M | None:
    """The stream's first message (a `message`), which must carry `kind`; None when the client left at once.

    A stream that sends nothing within ``deadline`` seconds ends with DEADLINE_EXCEEDED: an open stream
    costs the server memory, so nobody may hold one without saying who they are.

    Read with ``context.read()``, not from the request iterator: iterating makes grpc.aio an async generator
    that lives as long as the stream (with the event loop's weak reference to it), ~470 bytes per idle
    device; the device stream reads with ``context.read()`` throughout (api/device.py). ``requests``: read
    from that iterator instead (associate streams, whose cross-replica stand-ins have no ``read()``).
    """
    try:
        async with asyncio.timeout(deadline):
            read = await (context.read() if requests is None else anext(aiter(requests), grpc.aio.EOF))
        if read is grpc.aio.EOF:
            return None
        first: M = read
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {kind} within {deadline:g} s of opening the stream")
    except DecodeError as exc:
        await abort(context, undecodable(message.__name__, exc))
    if first.WhichOneof("kind") != kind:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be a {kind}")
    return first
