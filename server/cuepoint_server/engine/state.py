"""Everything the engine knows about one device, in one place."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["DeviceState", "EventOccurrence", "Scalar", "Score"]

Scalar = str | int | float | bool

# Hard cap per event name so a flood cannot grow memory without bound; windows
# needing more occurrences than this are saturated, which only ever errs
# towards "at least N" being true.
MAX_OCCURRENCES_PER_EVENT = 2048
MAX_REMEMBERED_IDS = 4096
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
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def new_session(self) -> None:
        self.milestones.clear()
        self.fired_episodes.clear()

    def remember(self, signal_id: str) -> bool:
        """Record an id; False when it was already seen (a resend)."""
        if signal_id in self._seen:
            return False
        self._seen[signal_id] = None
        if len(self._seen) > MAX_REMEMBERED_IDS:
            self._seen.popitem(last=False)
        return True

    def forget(self, signal_id: str) -> None:
        """Undo remember() for a signal that could not be stored, so a resend counts."""
        self._seen.pop(signal_id, None)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def record_event(self, name: str, occurrence: EventOccurrence, keep_seconds: float) -> None:
        queue = self.history.get(name)
        if queue is None:
            queue = self.history[name] = deque(maxlen=MAX_OCCURRENCES_PER_EVENT)
        if queue and occurrence.time <= queue[-1].time and any(o.signal_id == occurrence.signal_id for o in queue):
            # A resend of a signal still in the window, older than the ids remembered for dedupe (storage
            # skips storing it again): it must not count twice. Only late arrivals pay for this scan.
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
            queue = self.history[name] = deque(items, maxlen=MAX_OCCURRENCES_PER_EVENT)
        else:
            queue.append(occurrence)
        horizon = queue[-1].time - keep_seconds
        # Always keep the latest occurrence: "last sync took > 30 s" needs it.
        while len(queue) > 1 and queue[0].time < horizon:
            queue.popleft()

    def last(self, name: str) -> EventOccurrence | None:
        queue = self.history.get(name)
        return queue[-1] if queue else None

    def occurrences(self, name: str, since: float) -> list[EventOccurrence]:
        queue = self.history.get(name)
        if not queue:
            return []
        return [o for o in queue if o.time > since]
