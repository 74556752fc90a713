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
    requests: AsyncIterator[M], context: Any, *, kind: str, type_name: str, deadline: float | None = None
) -> M | None:
    """The stream's first message, which must carry `kind`; None when the client left at once.

    A stream that sends nothing within ``deadline`` seconds ends with DEADLINE_EXCEEDED: an open stream
    costs the server memory, so nobody may hold one without saying who they are.
    """
    try:
        async with asyncio.timeout(deadline):
            first = await anext(aiter(requests))
    except StopAsyncIteration:
        return None
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {kind} within {deadline:g} s of opening the stream")
    except DecodeError as exc:
        await abort(context, undecodable(type_name, exc))
    if first.WhichOneof("kind") != kind:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be a {kind}")
    return first
