"""When to send signals, and which are still unacked. No I/O, no clock of its own.

The client's sender task asks :meth:`SignalBatcher.due` / ``time_until_due``
and takes batches; the reader task feeds acks back. Keeping this pure (time
is passed in) lets the tests drive every flushing rule deterministically.

Every signal stays here, keyed by its id, from ``add`` until acked, whether
still queued or already sent. That is the buffer a reconnect resends from
(:meth:`requeue_in_flight`), with the same ids so the server can de-dup.

``add`` runs once per ``track()``, the SDK's hottest call (issue 13), so an
entry is a tuple built in C and carries no "sent" flag: the queue is always
the newest entries in seq order (see `ack`), so an entry is sent exactly when
its seq is below the queue head's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar

from .errors import BufferFull

T = TypeVar("T")


class _Pending(NamedTuple):
    seq: int
    payload: Any
    queued_at: float


# _Pending from a (seq, payload, queued_at) tuple without the NamedTuple's Python-level __new__ (~0.3 us a signal).
_pending = partial(tuple.__new__, _Pending)


class SignalBatcher(Generic[T]):
    """Queues signals, cuts batches, tracks acks.

    Each added signal gets a sequence number; ``acked_through(n)`` answers
    "has everything added up to n been acked?", which is what ``flush()``
    waits on without being starved by signals tracked after it was called.
    """

    def __init__(self, max_batch: int, linger: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._configured_max = max_batch
        self._max_batch = max_batch
        self._halvings = 0  # throttle(): batches are cut at max_batch >> halvings
        self._linger = linger
        # Insertion order == seq order; deleting acked entries keeps it.
        self._pending: dict[str, _Pending] = {}
        self._queue: deque[str] = deque()
        self._seq = 0
        self._flush_through = 0

    @property
    def max_batch(self) -> int:
        """Signals per batch now: the configured/server cap, halved once per unrelaxed ``throttle()``."""
        return max(1, self._max_batch >> self._halvings)

    def limit_batch(self, server_max: int) -> None:
        """Apply the server's cap (0 or less means "no cap")."""
        self._max_batch = min(self._configured_max, server_max) if server_max > 0 else self._configured_max

    def throttle(self) -> None:
        """The server refused for load (RESOURCE_EXHAUSTED): cut smaller batches.

        A rate limiter charges per signal, and a batch larger than its burst
        would be refused forever; halving until one fits lets the backlog drain.
        """
        if self.max_batch > 1:
            self._halvings += 1

    def relax(self) -> None:
        """A batch was acked: double the batch size again, up to the cap."""
        if self._halvings:
            self._halvings -= 1

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def pending_count(self) -> int:
        """Signals not yet acked, queued or in flight."""
        return len(self._pending)

    @property
    def queued_count(self) -> int:
        return len(self._queue)

    @property
    def in_flight_count(self) -> int:
        return len(self._pending) - len(self._queue)

    def unacked_ids(self) -> list[str]:
        return list(self._pending)

    def pending_items(self) -> list[tuple[str, T]]:
        """Every unacked signal, queued or in flight, oldest first."""
        return [(signal_id, entry.payload) for signal_id, entry in self._pending.items()]

    def add(self, signal_id: str, payload: T, now: float, limit: int | None = None) -> int:
        """Queue a signal; with ``limit``, raise BufferFull (nothing queued) when that many are unacked already."""
        pending = self._pending
        if limit is not None and len(pending) >= limit:
            raise BufferFull(f"{limit} signals are already waiting for acks")
        if signal_id in pending:
            raise ValueError(f"signal id {signal_id!r} is already pending")
        seq = self._seq = self._seq + 1
        pending[signal_id] = _pending((seq, payload, now))
        self._queue.append(signal_id)
        return seq

    def request_flush(self) -> int:
        """Make everything queued so far due now; returns the seq to wait for."""
        self._flush_through = self._seq
        return self._seq

    def due(self, now: float) -> bool:
        return self.time_until_due(now) == 0.0

    def time_until_due(self, now: float) -> float | None:
        """Seconds until the next batch should go out; ``None`` when nothing is queued."""
        if not self._queue:
            return None
        head = self._pending[self._queue[0]]
        if len(self._queue) >= self.max_batch or head.seq <= self._flush_through:
            return 0.0
        return max(0.0, self._linger - (now - head.queued_at))

    def take_batch(self) -> list[tuple[str, T]]:
        """Up to ``max_batch`` queued signals, oldest first, now counted as in flight."""
        queue, pending = self._queue, self._pending
        take = queue.popleft
        ids = [take() for _ in range(min(len(queue), self.max_batch))]
        return [(signal_id, pending[signal_id].payload) for signal_id in ids]

    def ack(self, signal_ids: Iterable[str]) -> int:
        """Forget acked signals; unknown ids (already acked, or another session's) are ignored."""
        removed = 0
        pop = self._pending.pop
        # The queue is the newest entries (add appends to both; take_batch and requeue_in_flight keep it so; an
        # acked entry leaves both): an entry is still queued when its seq is at least the head's.
        queue = self._queue
        head = self._pending[queue[0]].seq if queue else None
        for signal_id in signal_ids:
            entry = pop(signal_id, None)
            if entry is None:
                continue
            removed += 1
            if head is not None and entry.seq >= head:
                # Only after requeue_in_flight can an ack overtake a resend.
                queue.remove(signal_id)
        return removed

    def drop(self, signal_ids: Iterable[str]) -> int:
        """Give up on signals that will never be sent (e.g. too old); for waiters they count as acked."""
        return self.ack(signal_ids)

    def acked_through(self, seq: int) -> bool:
        """True when every signal with sequence number <= ``seq`` has been acked."""
        oldest = next(iter(self._pending.values()), None)
        return oldest is None or oldest.seq > seq

    def requeue_in_flight(self) -> int:
        """Put sent-but-unacked signals back in front of the queue, in their original order.

        For resending on a new stream; returns how many were requeued.
        """
        requeued = len(self._pending) - len(self._queue)
        self._queue = deque(self._pending)
        return requeued
