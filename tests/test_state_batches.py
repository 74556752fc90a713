"""DeviceState.record_events (a run of one event, at once) leaves the state record_event one by one leaves.

The ingest path (core/ingest.py) records runs of events nothing listens to this way; windows, segments and
a later scenario reload read what it kept, so it must be the same occurrences, order, sequence numbers and
memory accounting, whatever the times (ties, going back, behind what is remembered) and the window.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cuepoint_server.engine.state import EVENT_MEMORY, MAX_REMEMBERED_IDS, DeviceState, EventOccurrence

times = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 5.0, 30.0, 31.0]), max_size=12)


def _state(before: list[float], keep: float) -> DeviceState:
    state = DeviceState("d", "app")
    for i, t in enumerate(before):
        state.record_event("e", EventOccurrence(100.0 + t, f"old-{i}", {}, state.next_seq()), keep)
    return state


def _snapshot(state: DeviceState) -> tuple[object, ...]:
    return (
        {name: list(queue) for name, queue in state.history.items()},
        state.event_count,
        state.event_bytes,
    )


@settings(max_examples=300, deadline=None)
@given(before=times, batch=times, keep=st.sampled_from([0.0, 1.0, 10.0, 3600.0]), sort=st.booleans())
def test_record_events_leaves_what_one_by_one_leaves(
    before: list[float], batch: list[float], keep: float, sort: bool
) -> None:
    if sort:
        batch = sorted(batch)  # the common case, which takes the at-once path
    at = [100.0 + t for t in batch]
    ids = [f"new-{i}" for i in range(len(at))]
    props = [{"i": i} if i % 2 else {} for i in range(len(at))]
    memory = (EVENT_MEMORY.count, EVENT_MEMORY.bytes)

    one_by_one = _state(sorted(before), keep)
    for i, t in enumerate(at):
        one_by_one.record_event("e", EventOccurrence(t, ids[i], props[i], one_by_one.next_seq()), keep)

    at_once = _state(sorted(before), keep)
    first = at_once.seq + 1
    at_once.seq += len(at)
    at_once.record_events("e", at, ids, props, range(first, first + len(at)), keep)

    assert _snapshot(at_once) == _snapshot(one_by_one)
    one_by_one.release()
    at_once.release()
    assert (EVENT_MEMORY.count, EVENT_MEMORY.bytes) == memory


@given(keep=st.sampled_from([0.0, 1.0]))
def test_without_a_window_only_the_latest_occurrence_is_kept_even_when_times_tie(keep: float) -> None:
    """keep_seconds 0 (no condition counts the event): conditions read only its latest occurrence, so a batch
    stamped with one time keeps one occurrence, not all of them; with a window every tied one stays."""
    one_by_one, at_once = DeviceState("d", "app"), DeviceState("d", "app")
    ids = [f"s-{i}" for i in range(5)]
    for i in range(5):
        one_by_one.record_event("e", EventOccurrence(100.0, ids[i], {"i": i}, one_by_one.next_seq()), keep)
    at_once.seq += 5
    at_once.record_events("e", [100.0] * 5, ids, [{"i": i} for i in range(5)], range(1, 6), keep)
    for state in (one_by_one, at_once):
        queue = state.history["e"]
        assert [o.signal_id for o in queue] == (ids if keep else ids[-1:])
        assert state.event_count == len(queue)
        assert state.last("e") is not None and state.last("e").props == {"i": 4}  # type: ignore[union-attr]
        state.release()


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.5, 1.0, 5.0]), st.integers(1, 6), st.booleans()), max_size=8
    ),
    keep=st.sampled_from([0.0, 1.0, 10.0]),
)
def test_batches_after_batches_leave_what_one_by_one_leaves(
    batches: list[tuple[float, int, bool]], keep: float
) -> None:
    """Batch after batch, ties included: with a window a batch whose times tie is forgotten whole when it falls
    out, and its size, summed when it came, is given back then (DeviceState._bulk). The string values differ in
    length, so a size given back wrong shows in event_bytes."""
    memory = (EVENT_MEMORY.count, EVENT_MEMORY.bytes)
    one_by_one, at_once = DeviceState("d", "app"), DeviceState("d", "app")
    clock, k = 100.0, 0
    for step, size, tied in batches:
        clock += step
        at = [clock] * size if tied else [clock + i / 1000 for i in range(size)]
        ids = [f"s-{k + i}" for i in range(size)]
        props = [{"text": "x" * ((k + i) % 7)} for i in range(size)]
        k += size
        for i, t in enumerate(at):
            one_by_one.record_event("e", EventOccurrence(t, ids[i], props[i], one_by_one.next_seq()), keep)
        first = at_once.seq + 1
        at_once.seq += size
        at_once.record_events("e", at, ids, props, range(first, first + size), keep)
        assert _snapshot(at_once) == _snapshot(one_by_one)
    one_by_one.release()
    at_once.release()
    assert (EVENT_MEMORY.count, EVENT_MEMORY.bytes) == memory


def test_remember_all_reports_the_ids_seen_before_in_batch_order() -> None:
    state = DeviceState("d", "app")
    assert state.remember_all(["a", "b", "c"]) == []
    assert state.remember_all(["d", "c", "a"]) == ["c", "a"]
    assert not state.remember("d")
    state.forget("d")
    assert state.remember("d")


def test_dedupe_memory_keeps_the_newest_ids_and_forgets_the_oldest_batches_whole() -> None:
    state = DeviceState("d", "app")
    batches = [[f"b{b}-{i}" for i in range(100)] for b in range(MAX_REMEMBERED_IDS // 100 + 3)]
    for ids in batches:
        assert state.remember_all(ids) == []
    # Every id of the newest MAX_REMEMBERED_IDS is still known; the oldest batches are gone, whole.
    newest = [i for ids in batches for i in ids][-MAX_REMEMBERED_IDS:]
    assert state.remember_all(newest) == newest
    assert state.remember_all(batches[0]) == []
    assert state.remember("b1-0")  # single ids are remembered and forgotten the same way
    state.forget("b1-0")
    assert state.remember_all(["b1-0", batches[-1][0]]) == [batches[-1][0]]
