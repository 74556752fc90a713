"""Everything the engine knows about one device, in one place."""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import NamedTuple, TypeGuard, cast

__all__ = ["EVENT_MEMORY", "DeviceState", "EventMemory", "EventOccurrence", "Scalar", "Score"]

Scalar = str | int | float | bool

# Hard cap per event name so a flood cannot grow memory without bound; windows
# needing more occurrences than this are saturated, which only ever errs
# towards "at least N" being true.
MAX_OCCURRENCES_PER_EVENT = 2048
MAX_REMEMBERED_IDS = 4096


@dataclass(slots=True)
class EventMemory:
    """Remembered event occurrences: limits per device and for the whole process, and what they hold now.

    Windows keep occurrences in memory; a device sending large properties, or many devices at once, must
    not grow the server without bound. Past a limit the device's oldest occurrences are dropped, never the
    one just recorded, and ``dropped`` counts them (metrics.py exports it). Sizes are estimates of what an
    occurrence costs in Python (tuple, id, property dict and strings), not exact.
    """

    device_count: int = 4096
    device_bytes: int = 1 << 20
    total_count: int = 4_000_000
    total_bytes: int = 512 << 20
    count: int = 0
    bytes: int = 0
    dropped: int = 0


# One per process: every DeviceState accounts its occurrences here.
EVENT_MEMORY = EventMemory()


# Whether a value is a string, in C (property values are exactly str, int, float or bool).
_IS_STR = cast("Callable[[object], TypeGuard[str]]", str.__instancecheck__)


def occurrence_size(props: Mapping[str, Scalar]) -> int:
    """Estimated bytes an occurrence holds: ~200 for the tuple, id and deque slot, plus its properties."""
    if not props:
        return 200
    return 300 + 80 * len(props) + sum(map(len, filter(_IS_STR, props.values())))


def occurrences_size(props: Sequence[Mapping[str, Scalar]]) -> int:
    """The sum of occurrence_size over `props`, a column at a time.

    The string values' lengths by one comprehension with an exact class test: half the cost of the C
    chain/filter pipeline it replaced (0.62 -> 0.26 us per signal of two properties), whose per-value
    ``str.__instancecheck__`` call was the expensive part. Counted twice per event a full window
    keeps (in, and out again).
    """
    filled = sum(map(bool, props))
    if not filled:
        return 200 * len(props)
    strings = sum([len(v) for values in props for v in values.values() if v.__class__ is str])
    return 200 * (len(props) - filled) + 300 * filled + 80 * sum(map(len, props)) + strings


_TIME = operator.itemgetter(0)  # EventOccurrence.time, read in C
_SIGNAL_ID = operator.itemgetter(1)  # EventOccurrence.signal_id, read in C
_PROPS = operator.itemgetter(2)  # EventOccurrence.props, read in C

# Seconds a signal's corrected time may fall behind the previous one of its event and still count as
# sent after it (batches' skew corrections differ by the SDK's linger and network jitter).
REORDER_TOLERANCE = 1.0


# A NamedTuple: one per event signal on the ingest path, where a frozen dataclass's __init__ costs
# several times more.
class EventOccurrence(NamedTuple):
    time: float
    signal_id: str
    props: Mapping[str, Scalar]
    # Arrival order on this device. "In a row" and "followed by" use it:
    # skew-corrected times of different batches can tie or cross by
    # microseconds, the order the device sent them in cannot.
    seq: int = 0


class Score(NamedTuple):
    """An outcome's predicted probability for this device now (predict/ computes it)."""

    probability: float
    # False while the outcome's model has too few labelled sessions: the probability is the base rate.
    trained: bool
    # Shadow outcomes are scored and shown but never hold in conditions.
    shadow: bool
    # The features that moved the score most, (name, weight x standardised value); computed on demand.
    explain: Callable[[], list[tuple[str, float]]]


@dataclass(slots=True)
class DeviceState:
    device_id: str
    app_id: str
    context: dict[str, Scalar] = field(default_factory=dict)
    history: dict[str, deque[EventOccurrence]] = field(default_factory=dict)
    last_signal_at: float = 0.0
    seq: int = 0
    # Milestones reached in the current session, with when.
    milestones: dict[str, float] = field(default_factory=dict)
    # Per time-driven scenario, the episode (idle period, absent follow-up,
    # screen visit) it last fired for: each fires once per episode.
    fired_episodes: dict[str, tuple[object, ...]] = field(default_factory=dict)
    # Outcome id -> its current score; None until an outcome is scored for this device (most devices never).
    scores: dict[str, Score] | None = None
    # Per windowed condition (count, rate, streak, aggregate), the matching occurrences found so far
    # (scenarios/compiler.py), so evaluating at every signal costs only what is new. None until used.
    windows: dict[int, object] | None = None
    # While the engine evaluates candidates (Engine.check): results of conditions shared across scenarios
    # (scenarios/compiler.Sharing), by node, so each is computed once per pass. None outside a pass.
    memo: dict[int, bool] | None = None
    # The ids remembered for dedupe (remember), and the same ids in the order they came, a chunk per call:
    # a batch's ids are added and later forgotten by one set operation each (C loops), where an ordered
    # dict took a Python-level step per id to forget the oldest (issue 13: 0.68 -> 0.11 us per signal).
    # Both made on the first id: an idle device holds neither (an empty deque alone is ~760 bytes).
    _seen: set[str] | frozenset[str] = frozenset()
    _seen_chunks: deque[Sequence[str]] | None = None
    _seen_held: int = 0  # ids in _seen_chunks
    # What this device's occurrences hold (EventMemory): their number and estimated bytes.
    event_count: int = 0
    event_bytes: int = 0
    # Per event name, what its last bulk record (record_events) added: (the first of those occurrences, their
    # number, their estimated bytes). When exactly those are forgotten together (a batch whose times tie, when
    # the next one comes), their size is known and not summed again (`_discard_first`). None until used.
    _bulk: dict[str, tuple[EventOccurrence, int, int]] | None = None

    def new_session(self) -> None:
        self.milestones.clear()
        self.fired_episodes.clear()

    def remember(self, signal_id: str) -> bool:
        """Record an id; False when it was already seen (a resend)."""
        if signal_id in self._seen:
            return False
        self._hold((signal_id,))
        return True

    def remember_all(self, ids: Sequence[str]) -> list[str]:
        """remember() for a batch of distinct ids at once, by set operations: the ids already seen, in order."""
        seen = self._seen
        if seen.isdisjoint(ids):
            duplicates: list[str] = []
            fresh = ids
        else:
            duplicates = [i for i in ids if i in seen]
            fresh = [i for i in ids if i not in seen]
        if fresh:
            self._hold(tuple(fresh))  # a copy: the caller's list is not ours to keep
        return duplicates

    def _hold(self, fresh: Sequence[str]) -> None:
        """Remember ids none of which is remembered now. The newest MAX_REMEMBERED_IDS ids at least are kept:
        older chunks are forgotten whole, oldest first."""
        chunks = self._seen_chunks
        if chunks is None:
            self._seen, chunks = set(), deque()
            self._seen_chunks = chunks
        self._seen.update(fresh)  # type: ignore[union-attr]  # a set from the first id on
        chunks.append(fresh)
        self._seen_held += len(fresh)
        while self._seen_held - len(chunks[0]) >= MAX_REMEMBERED_IDS:
            old = chunks.popleft()
            self._seen_held -= len(old)
            # An id of `old` forgotten and remembered again since sits in a newer chunk too: dropped here a
            # little early, which only sends a resend of it to storage's exact dedupe.
            self._seen.difference_update(old)  # type: ignore[union-attr]

    def forget(self, signal_id: str) -> None:
        """Undo remember() for a signal that could not be stored, so a resend counts."""
        if self._seen_chunks is not None:
            self._seen.discard(signal_id)  # type: ignore[union-attr]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def record_event(self, name: str, occurrence: EventOccurrence, keep_seconds: float) -> None:
        queue = self.history.get(name)
        if queue is None:
            queue = self.history[name] = deque()
        if queue and occurrence.time <= queue[-1].time and occurrence.signal_id in map(_SIGNAL_ID, queue):
            # A resend of a signal still in the window, older than the ids remembered for dedupe (storage
            # skips storing it again): it must not count twice. Only late arrivals and tied times pay for this
            # scan (a C loop: a batch stamped with one time scans up to its window's length per signal).
            return
        if queue and queue[-1].time - REORDER_TOLERANCE <= occurrence.time < queue[-1].time:
            # Skew correction jitter between batches (each batch's sent_at moves its times), not a late
            # arrival: the device sent this after the previous one, so it stays last, at that time.
            occurrence = occurrence._replace(time=queue[-1].time)
        if queue and occurrence.time < queue[-1].time:
            # Late arrivals (offline buffers) are inserted in time order so
            # windows stay correct; rare, so the O(n) insert is acceptable. A new
            # deque, so windows built on the old order know to start again.
            items = sorted((*queue, occurrence), key=lambda o: o.time)
            queue = self.history[name] = deque(items)
            if self._bulk:
                self._bulk.pop(name, None)  # an occurrence may now sit among a bulk record's
        else:
            queue.append(occurrence)
        self._account(1, occurrence_size(occurrence.props))
        self._trim(name, queue, queue[-1].time - keep_seconds, occurrence, keep_seconds > 0)

    def _trim(
        self, name: str, queue: deque[EventOccurrence], horizon: float, newest: EventOccurrence, window: bool = True
    ) -> None:
        """After an append: drop what fell out of the window or over the cap, then keep memory in bounds.

        Without a ``window`` (no condition counts the event: keep_seconds 0) only the latest stays."""
        # Always keep the latest occurrence: "last sync took > 30 s" needs it. The queue is in time order, so
        # what fell out is a prefix (found by bisection); hard cap per event name: windows needing more are
        # saturated, which errs towards "at least N".
        last = len(queue) - 1
        if not window:
            old = last
        else:
            old = bisect_left(queue, horizon, 0, last, key=_TIME) if last and queue[0].time < horizon else 0
        over = max(0, len(queue) - old - MAX_OCCURRENCES_PER_EVENT)
        if old + over:
            self._discard_first(name, queue, old + over)
            EVENT_MEMORY.dropped += over
        memory = EVENT_MEMORY
        if (
            self.event_count > memory.device_count
            or self.event_bytes > memory.device_bytes
            or memory.count > memory.total_count
            or memory.bytes > memory.total_bytes
        ):
            self._shed(newest)

    def record_events(
        self,
        name: str,
        times: Sequence[float],
        ids: Sequence[str],
        props: Sequence[Mapping[str, Scalar]],
        seqs: Sequence[int],
        keep_seconds: float,
    ) -> None:
        """record_event() for several occurrences of one event, given as columns, in arrival order.

        The ``i``-th has sequence number ``seqs[i]``. Ends in the state the calls one by one leave, but
        builds an occurrence only for what the window keeps: with ``keep_seconds`` 0 (no condition counts
        this event), the latest one. Times that go back, or a first one not after what is remembered,
        take the one-by-one path (late arrivals and skew jitter are handled there).
        """
        n = len(times)
        queue = self.history.get(name)

        def one_by_one() -> None:
            for i in range(n):
                self.record_event(name, EventOccurrence(times[i], ids[i], props[i], seqs[i]), keep_seconds)

        if n < 2 or (queue and times[0] <= queue[-1].time) or not all(map(operator.le, times, times[1:])):
            one_by_one()
            return
        if queue is None:
            queue = self.history[name] = deque()
        elif len(set(times)) < n:
            # Tied times: one by one, a remembered occurrence with one of these ids would be a resend (see
            # record_event). Ids in a batch are distinct and new to memory, so only the queue can hold one.
            if not set(map(_SIGNAL_ID, queue)).isdisjoint(ids):
                one_by_one()
                return
        horizon = times[-1] - keep_seconds
        # Nothing before `start` outlives the batch (each call would trim it again: times only grow), and
        # past the cap only the latest are kept. Without a window only the latest at all, tied times too: a
        # batch stamped with one time kept all of its signals (0.77 against 0.17 us per signal, issue 13).
        in_window = bisect_left(times, horizon) if keep_seconds > 0 else n - 1
        start = min(max(in_window, n - MAX_OCCURRENCES_PER_EVENT), n - 1)
        EVENT_MEMORY.dropped += start - in_window
        kept = props[start:]
        # tuple.__new__ from the columns: an occurrence each without a Python-level call each.
        columns = zip(times[start:], ids[start:], kept, seqs[start:], strict=True)
        fresh = list(map(tuple.__new__, repeat(EventOccurrence), columns))
        queue.extend(fresh)
        size = occurrences_size(kept)
        self._account(n - start, size)
        self._trim(name, queue, horizon, queue[-1], keep_seconds > 0)
        if self._bulk is None:
            self._bulk = {}
        self._bulk[name] = (fresh[0], len(fresh), size)

    def _account(self, count: int, size: int) -> None:
        self.event_count += count
        self.event_bytes += size
        EVENT_MEMORY.count += count
        EVENT_MEMORY.bytes += size

    def _discard_first(self, name: str, queue: deque[EventOccurrence], count: int) -> None:
        """Forget the queue's `count` oldest occurrences (in place: windows keep reading the same deque)."""
        bulks = self._bulk
        if bulks and (bulk := bulks.get(name)) is not None and queue[0] is bulk[0]:
            del bulks[name]
            if count == bulk[1]:
                # Exactly the occurrences of the event's last bulk record: occurrences are only appended and
                # forgotten oldest first (a late arrival's reordering drops the record), so with its first
                # still first they are the `count` oldest, and their size was summed when they came.
                if count * 4 >= len(queue):  # most of it: keep the rest, copied in C
                    rest = list(islice(queue, count, None))
                    queue.clear()
                    queue.extend(rest)
                else:
                    for _ in repeat(None, count):
                        queue.popleft()
                self._account(-count, -bulk[2])
                return
        if count == 1:
            self._account(-1, -occurrence_size(queue.popleft().props))
            return
        if count == len(queue) - 1:
            newest = queue.pop()
            gone = list(queue)
            queue.clear()
            queue.append(newest)
        else:
            gone = [queue.popleft() for _ in range(count)]
        self._account(-count, -occurrences_size(list(map(_PROPS, gone))))

    def _discard(self, queue: deque[EventOccurrence], *, dropped: bool = False) -> None:
        gone = queue.popleft()
        self._account(-1, -occurrence_size(gone.props))
        if dropped:
            EVENT_MEMORY.dropped += 1

    def _shed(self, keep: EventOccurrence) -> None:
        """Over a limit: drop this device's oldest occurrences (never ``keep``, the newest) until under it."""
        memory = EVENT_MEMORY
        while (
            self.event_count > memory.device_count
            or self.event_bytes > memory.device_bytes
            or memory.count > memory.total_count
            or memory.bytes > memory.total_bytes
        ):
            oldest: deque[EventOccurrence] | None = None
            for queue in self.history.values():
                if queue and queue[0] is not keep and (oldest is None or queue[0].time < oldest[0].time):
                    oldest = queue
            if oldest is None:
                return  # only the newest is left: kept whatever it costs
            self._discard(oldest, dropped=True)
        for name in [n for n, q in self.history.items() if not q]:
            del self.history[name]
        self._bulk = None  # a bulk record's first may be gone (rare: over a memory limit)

    def release(self) -> None:
        """Forget every occurrence (erasure, or the state is evicted): give their memory back."""
        self.history.clear()
        self._bulk = None
        self._account(-self.event_count, -self.event_bytes)

    def last(self, name: str) -> EventOccurrence | None:
        queue = self.history.get(name)
        return queue[-1] if queue else None

    def occurrences(self, name: str, since: float) -> list[EventOccurrence]:
        queue = self.history.get(name)
        if not queue:
            return []
        return [o for o in queue if o.time > since]
