"""A closable async queue: the shape behind every SDK iterator.

asyncio.Queue (before 3.13) cannot be closed, and the SDK needs "items
buffered before the failure are still delivered, then the failure is raised"
for every consumer. Also lets the cue inbox drop offers the server withdrew.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from .errors import ClientClosed, CuepointError, TimedOut

T = TypeVar("T")


class InboxClosed(Exception):
    """Raised by :meth:`Inbox.get` after a clean close once the buffer is drained."""


class Inbox(Generic[T]):
    def __init__(self, maxlen: int | None = None) -> None:
        # With maxlen the oldest items are dropped: a stale cue nobody read is
        # worth less than a fresh one.
        self._items: deque[T] = deque(maxlen=maxlen)
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if self._closed:
            return
        self._items.append(item)
        self._wake()

    def discard(self, predicate: Callable[[T], bool]) -> int:
        """Drop buffered items matching ``predicate``; returns how many."""
        kept = [item for item in self._items if not predicate(item)]
        dropped = len(self._items) - len(kept)
        self._items.clear()
        self._items.extend(kept)
        return dropped

    def close(self, error: BaseException | None = None) -> None:
        """No more items; consumers drain what is buffered, then get ``error`` (or the end)."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._wake()

    async def get(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise InboxClosed
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def __aiter__(self) -> Inbox[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except InboxClosed:
            raise StopAsyncIteration from None

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


# `timeout` carries the public API's next_cue(timeout=...) through to asyncio.timeout.
async def get_within(inbox: Inbox[T], timeout: float | None, what: str) -> T:  # noqa: ASYNC109
    """``inbox.get()`` with SDK errors: TimedOut on timeout, ClientClosed after a clean close."""
    try:
        async with asyncio.timeout(timeout):
            return await inbox.get()
    except CuepointError:
        # Also a failure that is itself a TimedOut: it must not be re-labelled below.
        raise
    except TimeoutError as exc:
        raise TimedOut(f"no {what} within {timeout}s") from exc
    except InboxClosed:
        raise ClientClosed(f"no more {what}s: the client is closed") from None


async def drain(inbox: Inbox[T], registry: weakref.WeakSet[Inbox[T]]) -> AsyncIterator[T]:
    """Iterate a subscriber inbox, unsubscribing it from ``registry`` when done.

    An async generator so that leaving the loop early (break) unsubscribes via
    ``finally``; a WeakSet registry covers iterators that are never started.
    """
    try:
        while True:
            try:
                item = await inbox.get()
            except InboxClosed:
                return
            yield item
    finally:
        registry.discard(inbox)
