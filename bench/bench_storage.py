"""Journey write throughput of SqliteStore and PostgresStore, and PostgreSQL round trips per batch and decision.

Run: .venv/bin/python bench/bench_storage.py [--database postgresql://USER@HOST/DB] [--no-postgres]

Signals come in runs of 100 per device (device 0's first 100, then device 1's, ...), as the SDK's batches
arrive. The journal stores one row per batch (storage/journal.py): the single-row scenarios are the worst
case (a batch of one), the 100-signal batches the SDK-shaped one. To compare with an older commit in the same
run, point PYTHONPATH at a `git archive` of it: ``PYTHONPATH=/tmp/old/server .venv/bin/python
bench/bench_storage.py`` (features the old store lacks are left out).

Each scenario writes to a fresh store (SQLite: a WAL file in a temporary directory; PostgreSQL: a fresh
schema in a database created for the run on the local server, or in --database) and counts a row only once
its append has returned, i.e. once it is committed. The PostgreSQL tables add the round trips the store
sent per batch; then both backends commit offer decisions (commit_offer with its per-user guard: lock,
history read, cue, decision, signals) and the PostgreSQL round trips per decision are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

import cuepoint_server.storage as storage
from cuepoint_server.storage import (
    CueRecord,
    DecisionRecord,
    OfferCommit,
    SignalRecord,
    SqliteStore,
)

# Absent from commits before PostgreSQL and per-user guards: a baseline run leaves those parts out.
PostgresStore: Any = getattr(storage, "PostgresStore", None)
OfferGuard: Any = getattr(storage, "OfferGuard", None)

PAYLOAD = {"screen": "checkout", "cart_value": 129.5, "items": 3, "promo": False}


def make_rows(prefix: str, n: int) -> list[SignalRecord]:
    now = time.time()
    # Ids as the SDK makes them (ULID: they sort by time) unless the scenario asks for random ones (uuid4,
    # what a careless client might send): the journal's unique (device, id) index costs more for those.
    random_ids = "random ids" in prefix
    return [
        SignalRecord(
            device_id=f"dev-{(i // 100) % 50}",
            signal_id=uuid.uuid4().hex if random_ids else f"{int(now * 1000) + i:013d}{i:013d}",
            session_id="sess",
            kind="event",
            name="screen_view",
            time=now + i * 1e-3,
            received_at=now,
            payload=PAYLOAD,
        )
        for i in range(n)
    ]


async def one_per_call(store: Any, rows: list[SignalRecord]) -> None:
    for row in rows:
        await store.append_signals([row])


def batches_of(size: int) -> Callable[[Any, list[SignalRecord]], Awaitable[None]]:
    async def run(store: Any, rows: list[SignalRecord]) -> None:
        for start in range(0, len(rows), size):
            await store.append_signals(rows[start : start + size])

    return run


def concurrent_singles(callers: int) -> Callable[[Any, list[SignalRecord]], Awaitable[None]]:
    async def run(store: Any, rows: list[SignalRecord]) -> None:
        # Waves of `callers` simultaneous single-row appends: the writer has to do the batching.
        for start in range(0, len(rows), callers):
            await asyncio.gather(*(store.append_signals([r]) for r in rows[start : start + callers]))

    return run


def concurrent_batches(devices: int, size: int) -> Callable[[Any, list[SignalRecord]], Awaitable[None]]:
    async def run(store: Any, rows: list[SignalRecord]) -> None:
        # Many devices' batches at once, as a busy server sends them: the writer merges them.
        for start in range(0, len(rows), devices * size):
            wave = rows[start : start + devices * size]
            await asyncio.gather(*(store.append_signals(wave[i : i + size]) for i in range(0, len(wave), size)))

    return run


SCENARIOS: list[tuple[str, int, Callable[[Any, list[SignalRecord]], Awaitable[None]]]] = [
    ("1 row per awaited append", 2_000, one_per_call),
    ("batches of 100", 50_000, batches_of(100)),
    ("batches of 1000", 200_000, batches_of(1000)),
    ("batches of 1000, random ids", 200_000, batches_of(1000)),
    ("1000 concurrent 1-row callers", 50_000, concurrent_singles(1000)),
    ("50 devices x 100-signal batches", 200_000, concurrent_batches(50, 100)),
    ("same, random ids", 200_000, concurrent_batches(50, 100)),
]


async def measure(
    open_store: Callable[[str], Awaitable[Any]],
    name: str,
    n: int,
    scenario: Callable[[Any, list[SignalRecord]], Awaitable[None]],
) -> tuple[str, int, float, int, int]:
    rows = make_rows(name, n)
    store = await open_store(name)
    try:
        trips = getattr(store, "round_trips", 0)
        started = time.perf_counter()
        await scenario(store, rows)
        elapsed = time.perf_counter() - started
        trips = getattr(store, "round_trips", 0) - trips
        assert await store.count_signals("dev-0") == sum(1 for r in rows if r.device_id == "dev-0")
        return name, n, elapsed, store.stats.batches, trips
    finally:
        await store.close()


def decision(i: int, user: int) -> OfferCommit:
    """One evaluation that offers a cue: 10 signals, the cue, its decision, guarded by a cap of one per day."""

    def cap(history: Sequence[CueRecord]) -> tuple[str, str] | None:
        return ("cap", "offered already") if history else None

    device, subject, session = f"dev-{i}", f"user:bench-{user}", f"sess-{i}"
    now = time.time()
    cue_id = uuid.uuid4().hex
    signals = [SignalRecord(device, uuid.uuid4().hex, session, "event", "tap", now, now, PAYLOAD) for _ in range(10)]
    cue = CueRecord(cue_id, "help", "fitkit", device, subject, session, now, now + 600, "chat", "Hi", "offered",
                    None, {"scenario_id": "help"})  # fmt: skip
    made = DecisionRecord(now, "fitkit", device, subject, session, "help", "offered", "", "", cue_id)
    guard = OfferGuard(cue_id, subject, session, now - 86400, cap)
    return OfferCommit(signals=signals, cues=[cue], decisions=[made], guards=[guard])


async def decisions(open_store: Callable[[str], Awaitable[Any]], name: str, n: int, concurrency: int) -> str:
    store = await open_store(name)
    try:
        trips = getattr(store, "round_trips", 0)
        latencies: list[float] = []
        refused = 0

        async def one(i: int) -> None:
            nonlocal refused
            started = time.perf_counter()
            result = await store.commit_offer(decision(i, i))
            latencies.append(time.perf_counter() - started)
            refused += len(result.refused)

        started = time.perf_counter()
        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, min(start + concurrency, n))))
        elapsed = time.perf_counter() - started
        trips = getattr(store, "round_trips", 0) - trips
        assert refused == 0
        q = statistics.quantiles(latencies, n=100)
        per = f"{trips / n:>8.1f}" if hasattr(store, "round_trips") else f"{'-':>8}"
        return f"{name:<44} {n:>6} {n / elapsed:>10,.0f} {q[49] * 1e3:>8.2f} {q[98] * 1e3:>8.2f} {per}"
    finally:
        await store.close()


async def run(args: argparse.Namespace) -> None:
    header = f"{'scenario':<32} {'rows':>8} {'seconds':>8} {'rows/s':>10} {'us/row':>7} {'txns':>7} {'rows/txn':>9}"
    with tempfile.TemporaryDirectory(prefix="cuepoint-bench-") as tmp:

        async def sqlite(name: str) -> Any:
            return await SqliteStore.open(str(Path(tmp) / f"{abs(hash(name))}.db"))

        print("SQLite")
        print(header)
        for name, n, scenario in SCENARIOS:
            label, rows, elapsed, txns, _ = await measure(sqlite, name, n, scenario)
            rate, per_txn = rows / elapsed, rows / txns
            print(f"{label:<32} {rows:>8} {elapsed:>8.2f} {rate:>10,.0f} {1e6 / rate:>7.2f} {txns:>7} {per_txn:>9.1f}")

        database, drop = args.database, None
        args.postgres = args.postgres and PostgresStore is not None
        if args.postgres and not database:
            database, drop = await _create_database()

        async def postgres(name: str) -> Any:
            return await PostgresStore.open(f"{database}?search_path=b_{secrets.token_hex(4)}")

        try:
            if args.postgres:
                print("\nPostgreSQL (asyncpg; round trips: requests sent and waited for, BEGIN/COMMIT included)")
                print(f"{header} {'trips':>7} {'rows/trip':>9}")
                for name, n, scenario in SCENARIOS:
                    label, rows, elapsed, txns, trips = await measure(postgres, name, n, scenario)
                    rate, per_txn = rows / elapsed, rows / txns
                    print(
                        f"{label:<32} {rows:>8} {elapsed:>8.2f} {rate:>10,.0f} {1e6 / rate:>7.2f}"
                        f" {txns:>7} {per_txn:>9.1f}"
                        f" {trips:>7} {rows / trips:>9.1f}"
                    )
                print("\nsignal batches (50 signals each): PostgreSQL round trips per batch")
                for label, scenario in (("one device at a time", batches_of(50)),
                                        ("1000 devices at once", concurrent_batches(1000, 50))):  # fmt: skip
                    _, rows, elapsed, _, trips = await measure(postgres, label, 50_000, scenario)
                    print(
                        f"  {label:<30} {trips / (rows / 50):>6.2f} round trips per batch, {rows / elapsed:,.0f} rows/s"
                    )
            if OfferGuard is None:
                return
            print("\noffer decisions: commit_offer with its per-user guard (10 signals, cue, decision)")
            print(f"{'backend, callers':<44} {'n':>6} {'decided/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'trips':>8}")
            for backend, opener in (("SQLite", sqlite), *((("PostgreSQL", postgres),) if args.postgres else ())):
                for concurrency in (1, 50):
                    print(await decisions(opener, f"{backend}, {concurrency} at once", 2000, concurrency))
        finally:
            if drop is not None:
                await drop()


async def _create_database() -> tuple[str, Callable[[], Awaitable[None]]]:
    name = f"cuepoint_bench_{secrets.token_hex(4)}"
    for user in ("postgres", "root"):
        try:
            admin = await asyncpg.connect(host="127.0.0.1", port=5432, user=user, database="postgres")
            break
        except (OSError, asyncpg.PostgresError):
            continue
    else:
        raise SystemExit("no PostgreSQL at 127.0.0.1:5432 (pass --database URL, or --no-postgres)")
    await admin.execute(f"CREATE DATABASE {name}")

    async def drop() -> None:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()

    return f"postgresql://{user}@127.0.0.1:5432/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="", help="PostgreSQL URL (default: a database created for the run)")
    parser.add_argument("--no-postgres", dest="postgres", action="store_false", help="SQLite only")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
