"""Journey write throughput of SqliteStore.

Run: .venv/bin/python bench/bench_storage.py

Each scenario writes to a fresh WAL database in a temporary directory and counts a row only once its
append has returned, i.e. once it is committed.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from cuepoint_server.storage import SignalRecord, SqliteStore

PAYLOAD = {"screen": "checkout", "cart_value": 129.5, "items": 3, "promo": False}


def make_rows(prefix: str, n: int) -> list[SignalRecord]:
    now = time.time()
    # Ids as the SDK makes them (ULID: they sort by time) unless the scenario asks for random ones (uuid4,
    # what a careless client might send): the journal's unique (device, id) index costs more for those.
    random_ids = "random ids" in prefix
    return [
        SignalRecord(
            device_id=f"dev-{i % 50}",
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


async def one_per_call(store: SqliteStore, rows: list[SignalRecord]) -> None:
    for row in rows:
        await store.append_signals([row])


def batches_of(size: int) -> Callable[[SqliteStore, list[SignalRecord]], Awaitable[None]]:
    async def run(store: SqliteStore, rows: list[SignalRecord]) -> None:
        for start in range(0, len(rows), size):
            await store.append_signals(rows[start : start + size])

    return run


def concurrent_singles(callers: int) -> Callable[[SqliteStore, list[SignalRecord]], Awaitable[None]]:
    async def run(store: SqliteStore, rows: list[SignalRecord]) -> None:
        # Waves of `callers` simultaneous single-row appends: the writer has to do the batching.
        for start in range(0, len(rows), callers):
            await asyncio.gather(*(store.append_signals([r]) for r in rows[start : start + callers]))

    return run


SCENARIOS: list[tuple[str, int, Callable[[SqliteStore, list[SignalRecord]], Awaitable[None]]]] = [
    ("1 row per awaited append", 2_000, one_per_call),
    ("batches of 100", 50_000, batches_of(100)),
    ("batches of 1000", 200_000, batches_of(1000)),
    ("batches of 1000, random ids", 200_000, batches_of(1000)),
    ("1000 concurrent 1-row callers", 50_000, concurrent_singles(1000)),
]


async def measure(
    directory: Path, name: str, n: int, scenario: Callable[[SqliteStore, list[SignalRecord]], Awaitable[None]]
) -> tuple[str, int, float, int]:
    rows = make_rows(name, n)
    store = await SqliteStore.open(str(directory / f"{abs(hash(name))}.db"))
    try:
        started = time.perf_counter()
        await scenario(store, rows)
        elapsed = time.perf_counter() - started
        assert await store.count_signals("dev-0") == n // 50
        return name, n, elapsed, store.stats.batches
    finally:
        await store.close()


async def main() -> None:
    print(f"{'scenario':<32} {'rows':>8} {'seconds':>8} {'rows/s':>10} {'txns':>7} {'rows/txn':>9}")
    with tempfile.TemporaryDirectory(prefix="cuepoint-bench-") as tmp:
        for name, n, scenario in SCENARIOS:
            label, rows, elapsed, txns = await measure(Path(tmp), name, n, scenario)
            rate, per_txn = rows / elapsed, rows / txns
            print(f"{label:<32} {rows:>8} {elapsed:>8.2f} {rate:>10,.0f} {txns:>7} {per_txn:>9.1f}")


if __name__ == "__main__":
    asyncio.run(main())
