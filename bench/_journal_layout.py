"""A storage-layout prototype for unbatched ingest (issue 13): what SQLite costs per one-signal message.

    .venv/bin/python bench/_journal_layout.py [--messages 20000] [--per-round 1,5,50] [--fold-every 200]

Not a benchmark of the server: a prototype of an alternative journal layout, measured beside today's, to
decide whether it is worth building. Both take the same encoded one-signal batches of 50 devices
(`journal.encode_all`, outside the measured time) in commit rounds of ``--per-round`` batches, as the group
commit sees them from 50 unbatched streams (bench_ingest.py's raw run: about 5 per round).

- today: `sqlite._write_journal` itself, in a write transaction per round, on a database made by
  `SqliteStore.open` (same schema, same pragmas): per batch, its device's mark read, a row in
  signal_batches (and its two per-device indexes) and the mark written.
- staged: the round's batches as one row of an append-only table (their bodies joined, not re-encoded;
  the marks kept in the writer's memory), folded every ``--fold-every`` rounds into one signal_batches row
  per device and session (and each device's mark), in one transaction. The fold is counted.

Why it may matter: a round of one-signal batches from K devices dirties about 2K index pages (each device's
place in both per-device indexes), and a WAL commit writes every dirty page; a staged round dirties the
tail of one table. The fold writes per device once per ``--fold-every`` rounds. What the prototype leaves
out, and a real design must answer: readers (journeys, exports, the signals view, erasure, retention) and
the resend lookup must see staged rows or fold first; a crash leaves staged rows to fold at start.
Prints CPU microseconds per message (this process, all threads) and staged/today.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from cuepoint_server.storage import SqliteStore
from cuepoint_server.storage.journal import EncodedBatch, JournalBatch, encode_all
from cuepoint_server.storage.sqlite import _INSERT_BATCH, _UPSERT_MARK, _write_journal

DEVICES = 50
_STAGING = "CREATE TABLE IF NOT EXISTS signal_staging (body TEXT NOT NULL)"


def _cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process: the WAL's page writes are mostly system time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _batches(count: int) -> list[EncodedBatch]:
    """``count`` one-signal batches, round-robin over the devices, ids ascending per device (new signals)."""
    start = time.time()
    batches = [
        JournalBatch(
            f"layout-{n % DEVICES:05d}",
            f"session-{n % DEVICES:05d}",
            start + n * 1e-4,
            [f"{n:026d}"],
            ["event"],
            ["screen_view"],
            [start + n * 1e-4],
            [{"screen": "home", "n": n}],
        )
        for n in range(count)
    ]
    return encode_all(batches)


class _Staged:
    """The staged layout: one row per round, folded into per-device rows every ``fold_every`` rounds."""

    def __init__(self, db: sqlite3.Connection, fold_every: int) -> None:
        self.db = db
        self.fold_every = fold_every
        self.rounds = 0
        self.marks: dict[str, str] = {}
        db.execute(_STAGING)

    def write(self, db: sqlite3.Connection, batches: list[EncodedBatch]) -> None:
        for b in batches:
            self.marks[b.device_id] = b.max_id
        # Each body is already JSON: joined as text, as the fold joins them again.
        rows = ",".join(
            f"[{json.dumps(b.device_id)},{json.dumps(b.session_id)},{b.received_at!r},{b.body}]" for b in batches
        )
        db.execute("INSERT INTO signal_staging (body) VALUES (?)", (f"[{rows}]",))

    def after_commit(self) -> None:
        self.rounds += 1
        if self.rounds % self.fold_every == 0:
            self.fold()

    def fold(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        per: dict[tuple[str, str], list[tuple[float, list[list[object]]]]] = defaultdict(list)
        for (body,) in db.execute("SELECT body FROM signal_staging ORDER BY rowid"):
            for device_id, session_id, received_at, signals in json.loads(body):
                per[(device_id, session_id)].append((received_at, signals))
        rows = []
        for (device_id, session_id), parts in per.items():
            signals = [s for _, part in parts for s in part]
            times = [float(s[3]) for s in signals]
            ids = [str(s[0]) for s in signals]
            body = json.dumps(signals, separators=(",", ":"))
            rows.append(
                (device_id, session_id, min(times), max(times), parts[-1][0], len(ids), min(ids), max(ids), 1, body)
            )
        db.executemany(_INSERT_BATCH, rows)
        db.executemany(_UPSERT_MARK, [(device_id, self.marks[device_id]) for device_id, _ in per])
        db.execute("DELETE FROM signal_staging")
        db.execute("COMMIT")


def _run(path: Path, batches: list[EncodedBatch], per_round: int, layout: str, fold_every: int) -> tuple[float, float]:
    """(user, system) CPU us per message of writing ``batches`` in rounds of ``per_round``, a transaction each."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA secure_delete = ON")
    staged = _Staged(db, fold_every) if layout == "staged" else None
    write: Callable[[sqlite3.Connection, list[EncodedBatch]], object] = (
        staged.write if staged is not None else _write_journal
    )
    started = _cpu()
    for at in range(0, len(batches), per_round):
        db.execute("BEGIN IMMEDIATE")
        write(db, batches[at : at + per_round])
        db.execute("COMMIT")
        if staged is not None:
            staged.after_commit()
    if staged is not None and staged.rounds % fold_every:
        staged.fold()
    user, system = (b - a for a, b in zip(started, _cpu(), strict=True))
    stored = db.execute("SELECT COALESCE(SUM(count), 0) FROM signal_batches").fetchone()[0]
    db.close()
    if stored != len(batches):
        raise RuntimeError(f"{layout}: stored {stored} of {len(batches)} signals")
    return 1e6 * user / len(batches), 1e6 * system / len(batches)


async def _fresh_database(path: Path) -> None:
    """The server's own schema and pragmas: made by SqliteStore.open."""
    store = await SqliteStore.open(str(path))
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="one-signal batches per run (default 20000)")
    parser.add_argument("--per-round", default="1,5,50", help="batches per commit round (default 1,5,50)")
    parser.add_argument("--fold-every", type=int, default=200, help="staged rounds per fold (default 200)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the median is shown")
    parser.add_argument("--layout", choices=("today", "staged"), help="run only this layout (for callgrind)")
    args = parser.parse_args()
    batches = _batches(args.messages)
    print(f"{sys.argv[0]}: SQLite {sqlite3.sqlite_version}, {args.messages} one-signal batches of {DEVICES} devices")
    print("CPU microseconds per message, user + system (median of --repeat runs, interleaved)")
    print("batches/round  today (user + sys)  staged (user + sys)  staged/today")
    with tempfile.TemporaryDirectory() as tmp:
        for per_round in (int(k) for k in args.per_round.split(",")):
            results: dict[str, list[tuple[float, float]]] = {"today": [], "staged": []}
            if args.layout is not None:
                path = Path(tmp) / f"{args.layout}-{per_round}.db"
                asyncio.run(_fresh_database(path))
                user, system = _run(path, batches, per_round, args.layout, args.fold_every)
                print(f"{per_round:>13}  {args.layout}: {user + system:.1f} ({user:.1f} + {system:.1f})")
                continue
            for attempt in range(args.repeat):
                for layout in results:
                    path = Path(tmp) / f"{layout}-{per_round}-{attempt}.db"
                    asyncio.run(_fresh_database(path))
                    results[layout].append(_run(path, batches, per_round, layout, args.fold_every))
            (tu, ts), (su, ss) = (sorted(v, key=sum)[len(v) // 2] for v in results.values())
            today, staged = f"{tu + ts:.1f} ({tu:.1f} + {ts:.1f})", f"{su + ss:.1f} ({su:.1f} + {ss:.1f})"
            print(f"{per_round:>13}  {today:>18}  {staged:>19}  {(su + ss) / (tu + ts):>11.2f}x")


if __name__ == "__main__":
    main()
