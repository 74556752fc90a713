"""Group commit: every session's applied batches stored together by one task, then acked.

A stream handler applies a batch synchronously (core/ingest.py) and queues it here; one task takes what
every session has queued, stores it in one write (one transaction on the store's writer), and puts each
batch's ack on its session's outbox, from where the stream's writer sends the round's acks together
(api/device.py). One task commits for all streams, however many batches they send; while its commit is
in flight the handlers read on and the next round's batches queue up. `settled` waits for a session's
acks (a stream's end).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

import structlog

from .sessions import DeviceSession, PendingAck

__all__ = ["GroupCommit"]

log = structlog.get_logger("cuepoint.core")


class GroupCommit:
    """The sessions with batches waiting for a commit, oldest first, and the one task that commits them.

    A session is queued exactly while ``session.acks`` (its batches not yet taken) is not None. A round
    (``commit``, core/ingest.py) takes what it can from each queued session, counts it in
    ``session.committing`` until acked, and `requeue`s sessions with batches left for the next round.
    """

    __slots__ = ("_commit", "_context", "_queued", "_task")

    def __init__(self, commit: Callable[[list[DeviceSession]], Awaitable[None]]) -> None:
        self._commit = commit
        self._queued: list[DeviceSession] = []
        self._task: asyncio.Task[None] | None = None
        # The task runs in a context of its own, not in the first caller's (its structlog binding names
        # one device, and the task commits for all).
        self._context = contextvars.Context()

    def put(self, session: DeviceSession, pending: PendingAck) -> None:
        """Queue an applied batch for the next round; start the task if it is not running."""
        if session.acks is None:
            session.acks = [pending]
            self._queued.append(session)
        else:
            session.acks.append(pending)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), context=self._context)

    def requeue(self, sessions: list[DeviceSession]) -> None:
        """Sessions a round left batches of (set back in ``session.acks``): first in the next round."""
        if sessions:
            self._queued[:0] = sessions

    async def _run(self) -> None:
        try:
            while self._queued:
                sessions, self._queued = self._queued, []
                try:
                    await self._commit(sessions)
                except Exception:
                    # The round handles storage failures itself; this is a bug. Nobody may wait forever.
                    log.exception("acks.round_failed", sessions=len(sessions))
                    for session in sessions:
                        session.committing = 0
                        self.wake(session)
        finally:
            self._task = None

    @staticmethod
    def wake(session: DeviceSession) -> None:
        """Resolve whoever waits in `settled`, if nothing of the session waits for a commit any more."""
        waiters = session.ack_waiters
        if waiters is not None and session.acks is None and not session.committing:
            session.ack_waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    @staticmethod
    async def settled(session: DeviceSession) -> None:
        """Wait until every batch the session applied so far is committed and its ack is on the outbox."""
        while session.acks is not None or session.committing:
            waiter = asyncio.get_running_loop().create_future()
            if session.ack_waiters is None:
                session.ack_waiters = [waiter]
            else:
                session.ack_waiters.append(waiter)
            await waiter

    async def idle(self) -> None:
        """Wait until nothing is queued or being committed (shutdown)."""
        while self._task is not None:
            await asyncio.shield(self._task)
