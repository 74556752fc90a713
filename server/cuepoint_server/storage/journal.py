"""The signal journal: one stored row per batch of signals, and durable dedupe designed with it.

A row per signal cost most of the journal's write time (an index entry per signal for the unique
(device, id) key alone: bench/README.md). So a batch is stored as one row: its index columns (device,
session, first and last signal time, count, smallest and largest id) and its signals as one compact JSON
array ``[[id, kind, name, time, payload], ...]`` (encoded once per batch by the C encoder; SQLite's json
functions and PostgreSQL's read it, so the ``signals`` view shows one row per signal as before).

Dedupe stays exact for any id however old, and is enforced inside the write transaction, by what is stored:

* ``signal_marks`` keeps each device's high-water mark: the largest id it ever stored.
* A batch whose ids all sort above the mark (the SDK's ids are ULIDs, which increase) is new by
  construction: it is stored as a *run* and the mark moves to its largest id. So runs of one device cover
  disjoint id ranges, and "was id x stored in a run" is one index seek: the run with the smallest
  largest-id >= x, if x is in it. That is the common case: one mark read and write per batch, no per-signal index.
* Any other batch (a resend, ids out of order, a client with random ids) has its ids <= the mark checked
  against that run lookup and against ``signal_ids``, the exact ids of every batch that was not a run; what
  is new is stored as such a batch and its ids go to ``signal_ids``.

This module is backend-free: it encodes batches and decides, from the marks and the ids found stored,
which signals to store and how. sqlite.py and postgres.py run the reads and writes in their transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby, repeat
from operator import itemgetter
from typing import Any, NamedTuple

from .json_text import dumps as _dumps
from .records import SignalRecord

__all__ = [
    "BatchRow",
    "EncodedBatch",
    "JournalBatch",
    "Newest",
    "Plan",
    "batch_records",
    "batches_from_records",
    "decode_body",
    "encode",
    "encode_all",
    "encode_work",
    "in_bodies",
    "journal_batches",
    "lookup_needed",
    "plan",
    "records_of",
    "trimmed",
]

_KINDS = frozenset(("event", "context"))
_FLOAT = {float}


class JournalBatch(NamedTuple):
    """Signals of one device and session received together, as columns (what `Store.append_batch` takes).

    ``times`` are already corrected for the device's clock; ``payloads`` are event properties or, for a
    context signal, ``{"set": ..., "clear": [...]}`` as consent lets it be stored.
    """

    device_id: str
    session_id: str
    received_at: float
    ids: Sequence[str]
    kinds: Sequence[str]  # "event" | "context"
    names: Sequence[str]  # event name, "" for a context update
    times: Sequence[float]
    payloads: Sequence[Mapping[str, Any]]


@dataclass(slots=True, eq=False)
class EncodedBatch:
    """A batch ready for the writer: encoded in the caller's task, so a bad value raises to its caller.

    Its signals are held as columns (``ids``, ``kinds``, ``names``, ``times``, ``payloads``): every step from
    the ingested records to the body is a C loop (zip, min, max), with no Python code per signal.
    """

    device_id: str
    session_id: str
    received_at: float
    ids: Sequence[str]
    kinds: Sequence[str]
    names: Sequence[str]
    times: Sequence[float]
    payloads: Sequence[Mapping[str, Any]]
    body: str
    first_time: float
    last_time: float
    min_id: str
    max_id: str
    distinct: bool  # no id twice within the batch

    def without(self, kept: Sequence[int]) -> EncodedBatch:
        """The same batch with only the signals at positions ``kept`` (some were stored before)."""
        return _encoded(
            self.device_id,
            self.session_id,
            self.received_at,
            [self.ids[i] for i in kept],
            [self.kinds[i] for i in kept],
            [self.names[i] for i in kept],
            [self.times[i] for i in kept],
            [self.payloads[i] for i in kept],
        )


def _encoded(
    device_id: str,
    session_id: str,
    received_at: float,
    ids: Sequence[str],
    kinds: Sequence[str],
    names: Sequence[str],
    times: Sequence[float],
    payloads: Sequence[Mapping[str, Any]],
) -> EncodedBatch:
    if not _KINDS.issuperset(kinds):
        raise ValueError(f"signal kind must be event or context, not {sorted(set(kinds) - _KINDS)}")
    if None in payloads:
        payloads = [{} if p is None else p for p in payloads]
    if set(map(type, times)) != _FLOAT:
        times = list(map(float, times))  # stored as JSON numbers with a fraction, as the view reads them
    return EncodedBatch(
        device_id,
        session_id,
        received_at,
        ids,
        kinds,
        names,
        times,
        payloads,
        _dumps(list(zip(ids, kinds, names, times, payloads, strict=True))),
        min(times),
        max(times),
        min(ids),
        max(ids),
        len(set(ids)) == len(ids),
    )


def encode(batch: JournalBatch) -> EncodedBatch | None:
    """None for an empty batch."""
    if not batch.ids:
        return None
    return _encoded(
        batch.device_id, batch.session_id, batch.received_at, batch.ids, batch.kinds, batch.names, batch.times,
        batch.payloads,
    )  # fmt: skip


# What makes consecutive records one batch: (device_id, session_id, received_at), read in C.
_BATCH_KEY = itemgetter(0, 2, 6)


def journal_batches(rows: Sequence[SignalRecord]) -> list[JournalBatch]:
    """Records grouped into batches: one per run of consecutive records of one device, session and receipt
    time (what one ingested batch is). Grouped and turned into columns by C loops (groupby, zip)."""
    out: list[JournalBatch] = []
    for (device_id, session_id, received_at), group in groupby(rows, _BATCH_KEY):
        _, ids, _, kinds, names, times, _, payloads = zip(*group, strict=True)
        out.append(JournalBatch(device_id, session_id, float(received_at), ids, kinds, names, times, payloads))
    return out


def batches_from_records(rows: Sequence[SignalRecord]) -> list[EncodedBatch]:
    """`journal_batches`, encoded."""
    return [_encoded(*batch) for batch in journal_batches(rows)]


def encode_all(batches: Iterable[JournalBatch]) -> list[EncodedBatch]:
    """``batches`` encoded, in order, the empty ones left out."""
    return [encoded for batch in batches if (encoded := encode(batch)) is not None]


def encode_work(signals: Sequence[SignalRecord], batches: Iterable[JournalBatch]) -> list[EncodedBatch]:
    """What an evaluation's commit appends (OfferCommit.signals and .batches), encoded: its records grouped
    into batches, then its whole batches."""
    return batches_from_records(signals) + encode_all(batches)


def batch_records(batch: JournalBatch) -> list[SignalRecord]:
    """A batch's signals as records, one object each (for what reads signals one at a time)."""
    device_id, session_id, received_at, ids, kinds, names, times, payloads = batch
    # tuple.__new__ straight from the columns: a SignalRecord each without a Python-level call each.
    return list(
        map(
            tuple.__new__,
            repeat(SignalRecord),
            zip(repeat(device_id), ids, repeat(session_id), kinds, names, times, repeat(received_at), payloads),
        )
    )


def decode_body(body: str) -> list[list[Any]]:
    """[[id, kind, name, time, payload], ...] of a stored batch."""
    signals: list[list[Any]] = json.loads(body)
    return signals


def records_of(device_id: str, session_id: str, received_at: float, body: str) -> list[SignalRecord]:
    return [
        SignalRecord(device_id, s[0], session_id, s[1], s[2], float(s[3]), received_at, s[4]) for s in decode_body(body)
    ]


# --- deciding what to store -------------------------------------------------------------------------------


def _fast_devices(batches: Sequence[EncodedBatch], highs: Mapping[str, str]) -> dict[str, bool]:
    """Per device: True when each of its batches, in order, sorts above the mark left by the ones before."""
    running: dict[str, str] = {}
    fast: dict[str, bool] = {}
    for b in batches:
        d = b.device_id
        if fast.get(d) is False:
            continue
        mark = running.get(d, highs.get(d))
        ok = b.distinct and (mark is None or b.min_id > mark)
        fast[d] = ok
        if ok:
            running[d] = b.max_id
    return fast


def lookup_needed(batches: Sequence[EncodedBatch], highs: Mapping[str, str]) -> dict[str, set[str]]:
    """Ids that may have been stored before this transaction (at or below their device's stored mark), of
    devices whose batches are not all new by their mark: the ids the backend must look up."""
    fast = _fast_devices(batches, highs)
    need: dict[str, set[str]] = {}
    for b in batches:
        high = highs.get(b.device_id)
        if fast[b.device_id] or high is None:
            continue
        ids = [i for i in b.ids if i <= high]
        if ids:
            need.setdefault(b.device_id, set()).update(ids)
    return need


@dataclass(slots=True)
class Plan:
    """What to write: batch rows (run or not), the devices' new marks, exact ids, and what each batch skipped."""

    stored: list[tuple[EncodedBatch, bool]] = field(default_factory=list)  # (batch, is a run)
    marks: dict[str, str] = field(default_factory=dict)  # device -> its new high-water mark
    exact: list[tuple[str, str]] = field(default_factory=list)  # (device, id) of batches that are not runs
    skipped: list[list[str]] = field(default_factory=list)  # per input batch, in order


def plan(batches: Sequence[EncodedBatch], highs: Mapping[str, str], known: Mapping[str, Iterable[str]]) -> Plan:
    """Decide, in order, what of ``batches`` is new. ``highs``: stored marks of their devices; ``known``:
    which of the ids `lookup_needed` named are stored (per device)."""
    out = Plan()
    marks: dict[str, str] = {}
    seen: dict[str, set[str]] = {}  # ids stored by earlier batches of this transaction, slow devices only
    stored_before = {d: set(ids) for d, ids in known.items()}
    for b in batches:
        d = b.device_id
        mark = marks.get(d, highs.get(d))
        if b.distinct and (mark is None or b.min_id > mark):
            out.stored.append((b, True))
            out.skipped.append([])
            marks[d] = b.max_id
            seen.setdefault(d, set()).update(b.ids)
            continue
        before = stored_before.get(d, set())
        now = seen.setdefault(d, set())
        kept: list[int] = []
        skipped: list[str] = []
        for pos, signal_id in enumerate(b.ids):
            if signal_id in before or signal_id in now:
                skipped.append(signal_id)
            else:
                now.add(signal_id)
                kept.append(pos)
        out.skipped.append(skipped)
        if not kept:
            continue
        part = b if len(kept) == len(b.ids) else b.without(kept)
        run = mark is None or part.min_id > mark
        out.stored.append((part, run))
        if not run:
            out.exact.extend((d, i) for i in part.ids)
        if mark is None or part.max_id > mark:
            marks[d] = part.max_id
    out.marks = marks
    return out


def in_bodies(bodies: Iterable[str], ids: Iterable[str]) -> set[str]:
    """Of ``ids``, those found in the stored batch bodies given."""
    wanted = set(ids)
    return {s[0] for body in bodies for s in decode_body(body) if s[0] in wanted}


# --- reading ------------------------------------------------------------------------------------------------

# A stored batch as the readers fetch it: (arrival seq, device, session, received_at, last_time, body).
BatchRow = tuple[int, str, str, float, float, str]


class Newest:
    """The newest ``limit`` signals (by time, then arrival) of batches fed newest-``last_time`` first.

    No later batch holds a signal newer than its own last_time, so once ``limit`` signals are strictly newer
    than the last_time of the batch fed last, the rest cannot change the answer (`done`).
    """

    def __init__(self, limit: int, since: float | None = None) -> None:
        self._limit = limit
        self._since = since
        self._found: list[tuple[float, int, int, SignalRecord]] = []
        self.done = limit <= 0

    def feed(self, rows: Sequence[BatchRow]) -> None:
        if not rows:
            self.done = True
            return
        since = self._since
        for seq, device_id, session_id, received_at, _last, body in rows:
            for pos, s in enumerate(decode_body(body)):
                at = float(s[3])
                if since is None or at >= since:
                    record = SignalRecord(device_id, s[0], session_id, s[1], s[2], at, received_at, s[4])
                    self._found.append((at, seq, pos, record))
        floor = rows[-1][4]
        if sum(1 for f in self._found if f[0] > floor) >= self._limit:
            self.done = True

    def result(self) -> list[SignalRecord]:
        """Oldest first."""
        self._found.sort(key=lambda f: (f[0], f[1], f[2]))
        return [f[3] for f in self._found[max(len(self._found) - self._limit, 0) :]]


def trimmed(body: str, older_than: float) -> tuple[str, int, float] | None:
    """Retention of a batch with signals on both sides of ``older_than``: the body of the kept ones, how many
    were dropped and the new first time; None when nothing is older."""
    signals = decode_body(body)
    kept = [s for s in signals if float(s[3]) >= older_than]
    if len(kept) == len(signals):
        return None
    first = min((float(s[3]) for s in kept), default=older_than)
    return _dumps(kept), len(signals) - len(kept), first
