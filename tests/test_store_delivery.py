"""The delivery outbox (storage/delivery_rows.py): rows for a stream another replica holds, taken once, in order.

Both backends; the concurrent claims run several PostgresStores (as several replicas) on one schema.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cuepoint_server.storage import PostgresStore

from .conftest import pg_url_for
from .test_storage import SESSION, engagement


async def test_rows_are_taken_by_recipient_in_id_order_and_only_once(store: Any) -> None:
    ids = [await store.enqueue_delivery("link:x", f"line {n}".encode(), 100.0 + n) for n in range(5)]
    other = await store.enqueue_delivery("stand-in:x:r2", b"for another stream", 100.0)
    assert ids == sorted(ids) and len(set(ids)) == 5 and other not in ids
    assert sorted(await store.delivery_recipients()) == ["link:x", "stand-in:x:r2"]
    taken = await store.claim_deliveries("link:x", limit=3)
    assert taken == [(ids[n], f"line {n}".encode()) for n in range(3)]
    assert await store.claim_deliveries("link:x") == [(ids[n], f"line {n}".encode()) for n in (3, 4)]
    # A second claim (a repeated wake-up) finds nothing: each row is sent once.
    assert await store.claim_deliveries("link:x") == []
    assert await store.delivery_recipients() == ["stand-in:x:r2"]
    # An id is never given again once its row is gone (receivers remember the ids they delivered).
    again = await store.enqueue_delivery("link:x", b"later", 200.0)
    assert again > max([*ids, other])


async def test_rows_nobody_took_expire(store: Any) -> None:
    await store.enqueue_delivery("device:gone", b"old", 100.0)
    kept = await store.enqueue_delivery("device:here", b"new", 300.0)
    assert await store.expire_deliveries(200.0) == 1
    assert await store.claim_deliveries("device:gone") == []
    assert await store.claim_deliveries("device:here") == [(kept, b"new")]


async def test_erasing_a_user_deletes_the_rows_carrying_their_data(store: Any) -> None:
    await store.save_session(SESSION)  # user-1 on dev-1
    await store.save_engagement(engagement("eng-1"))  # in sess-1
    await store.enqueue_delivery("link:x", b"chat line", 100.0, engagement_id="eng-1")
    await store.enqueue_delivery("device:dev-1", b"invitation", 100.0, device_id="dev-1")
    other = await store.enqueue_delivery("link:x", b"someone else", 100.0, engagement_id="eng-2", device_id="dev-2")
    presence = await store.enqueue_delivery("stand-in:x:r2", b"presence", 100.0)
    deleted = await store.erase_user("user-1")
    assert deleted["delivery_outbox"] == 2
    assert await store.claim_deliveries("link:x") == [(other, b"someone else")]
    assert await store.claim_deliveries("device:dev-1") == []
    assert await store.claim_deliveries("stand-in:x:r2") == [(presence, b"presence")]
    # In transit only: an export never lists them.
    assert "delivery_outbox" not in await store.export_user("user-1")


async def test_replicas_claiming_at_once_each_take_different_rows(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend != "postgres":
        pytest.skip("one SQLite process has one writer: claims cannot overlap")
    url = pg_url_for(request.getfixturevalue("pg_database"), str(tmp_path))
    stores = [await PostgresStore.open(url) for _ in range(3)]
    try:
        ids = [await stores[0].enqueue_delivery("link:x", str(n).encode(), 100.0) for n in range(60)]
        batches = await asyncio.gather(*(s.claim_deliveries("link:x", limit=7) for s in stores * 5))
        # Rows another claim held locked were skipped, not waited for: what is left, a last claim takes.
        batches.append(await stores[0].claim_deliveries("link:x", limit=100))
        taken = [row for batch in batches for row, _ in batch]
        # Every row exactly once across the claimers, each batch in id order.
        assert sorted(taken) == ids
        assert all(batch == sorted(batch) for batch in batches)
    finally:
        for s in stores:
            await s.close()
