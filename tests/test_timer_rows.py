"""Timers as rows (storage/timer_rows.py): armed with their owner, claimed once their owner is gone, fired once.

Both backends; the concurrent claims run several PostgresStores (as several replicas) on one schema.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cuepoint_server.storage import (
    OfferCommit,
    OfferGuard,
    PostgresStore,
    ReplicaRecord,
    SessionRecord,
    TimerRecord,
    WebhookRecord,
)

from .conftest import pg_url_for
from .test_storage import cue, engagement

HOLD = 30.0


def expiry(cue_id: str, owner: str, due_at: float) -> TimerRecord:
    return TimerRecord(f"cue_expiry:{cue_id}", "cue_expiry", cue_id, due_at, owner)


def withdrawn(delivery_id: str) -> WebhookRecord:
    return WebhookRecord(delivery_id, "http://crm", "cue.withdrawn", "{}", 100.0, "pending", 0, 100.0)


async def count_webhooks(store: Any, kind: str) -> int:
    rows = await store.query("SELECT COUNT(*) FROM webhook_outbox WHERE kind = ?", (kind,))
    return int(rows[0][0])


async def test_a_cue_is_stored_with_its_expiry_row_and_expires_once(store: Any) -> None:
    await store.commit_offer(OfferCommit(cues=[cue("c-1")], timers=[expiry("c-1", "replica-a", 160.0)]))
    [row] = await store.timers()
    assert (row.timer_id, row.owner, row.state, row.due_at) == ("cue_expiry:c-1", "replica-a", "armed", 160.0)
    # The owner's alarm and a claimer both try: the first writes the expiry and its webhook, the second nothing.
    first = await store.set_cue_status("c-1", "expired", 161.0, webhooks=[withdrawn("w-1")], timer=row.timer_id)
    second = await store.set_cue_status("c-1", "expired", 162.0, webhooks=[withdrawn("w-2")], timer=row.timer_id)
    assert (first, second) == (True, False)
    stored = await store.get_cue("c-1")
    assert stored is not None and (stored.status, stored.responded_at) == ("expired", 161.0)
    assert await count_webhooks(store, "cue.withdrawn") == 1
    # Armed again (a restore on another replica): a timer that fired stays done.
    await store.arm_timers([expiry("c-1", "replica-b", 500.0)])
    [row] = await store.timers()
    assert (row.state, row.owner, row.fired_at) == ("done", "replica-a", 161.0)
    # A day past their time, rows go (fired or moot: every effect is also guarded by its target's state).
    await store.purge_timers(160.0)
    assert len(await store.timers()) == 1
    await store.purge_timers(160.5)
    assert await store.timers() == []


async def test_an_expiry_of_a_cue_answered_meanwhile_is_moot(store: Any) -> None:
    await store.commit_offer(OfferCommit(cues=[cue("c-1")], timers=[expiry("c-1", "a", 160.0)]))
    await store.set_cue_status("c-1", "declined", 150.0)
    fired = await store.set_cue_status("c-1", "expired", 161.0, webhooks=[withdrawn("w-1")], timer="cue_expiry:c-1")
    assert not fired
    stored = await store.get_cue("c-1")
    assert stored is not None and stored.status == "declined"
    assert await count_webhooks(store, "cue.withdrawn") == 0
    assert [t.state for t in await store.timers()] == ["done"]


async def test_a_refused_cue_leaves_no_timer_row(store: Any) -> None:
    guard = OfferGuard("c-1", "user-1", "sess-1", 0.0, lambda _history: ("cooldown", "taken on the phone"))
    result = await store.commit_offer(OfferCommit(cues=[cue("c-1")], guards=[guard], timers=[expiry("c-1", "a", 1.0)]))
    assert "c-1" in result.refused
    assert await store.timers() == []


async def test_claims_take_due_rows_of_gone_owners_and_own_long_overdue_ones(store: Any) -> None:
    now = 1000.0
    # The registry rows are the replicas' leases: "alive" and "me" keep writing theirs (seen "later" than any
    # claim below), "dead" last wrote its row 60 s ago (beyond the ttl, `hold`), "gone" never did.
    for live in ("alive", "me"):
        await store.save_replica(ReplicaRecord(live, now, now + 1000, "", "", "", False))
    await store.save_replica(ReplicaRecord("dead", now - 100, now - 60, "", "", "", False))
    await store.arm_timers(
        [
            expiry("alive-due", "alive", now - 5),  # its owner fires it
            expiry("dead-due", "dead", now - 5),
            expiry("never-leased-due", "gone", now - 1),
            expiry("dead-later", "dead", now + 60),  # not due yet
            expiry("mine-due", "me", now - 5),  # my own alarm is on it
            expiry("mine-overdue", "me", now - 120),  # my alarm was cancelled or lost
        ]
    )
    claimed = await store.claim_timers("me", now, hold=HOLD, own_after=60.0)
    assert [t.target for t in claimed] == ["mine-overdue", "dead-due", "never-leased-due"]  # soonest first
    assert {t.claimed_by for t in claimed} == {"me"}
    # Held: another replica claiming meanwhile gets none of them; once the hold lapses, they are claimable again.
    assert await store.claim_timers("other", now + 1, hold=HOLD, own_after=60.0) == []
    again = await store.claim_timers("other", now + HOLD + 1, hold=HOLD, own_after=60.0)
    # (my own overdue one only by me: I am alive)
    assert {t.target for t in again} == {"dead-due", "never-leased-due"}
    # A fired timer is never claimed again.
    assert await store.finish_timer("cue_expiry:dead-due", now)
    assert not await store.finish_timer("cue_expiry:dead-due", now)
    later = await store.claim_timers("third", now + 10 * HOLD, hold=HOLD, own_after=60.0)
    assert "dead-due" not in {t.target for t in later}


async def test_a_callback_requeues_once(store: Any) -> None:
    waiting = replace(engagement(), state="callback_requested", callback_at=500.0, callback_number="+44")
    await store.save_engagement(waiting)
    await store.arm_timers([TimerRecord("callback:eng-1", "callback", "eng-1", 500.0, "a")])
    queued = replace(waiting, state="queued")
    hook = WebhookRecord("q-1", "http://crm", "engagement.queued", "{}", 500.0, "pending", 0, 500.0)
    assert await store.save_engagement(queued, webhooks=[hook], timer="callback:eng-1")
    assigned = replace(queued, state="assigned", associate_id="dana")
    again = replace(hook, delivery_id="q-2")
    # A second firing (the owner's late alarm) must not put the engagement back to queued.
    assert not await store.save_engagement(queued, webhooks=[again], timer="callback:eng-1")
    await store.save_engagement(assigned)
    stored = await store.get_engagement("eng-1")
    assert stored is not None and stored.state == "assigned"
    assert await count_webhooks(store, "engagement.queued") == 1


def deadline(device_id: str, owner: str, due_at: float) -> TimerRecord:
    return TimerRecord(f"device:{device_id}", "device", device_id, due_at, owner)


async def test_a_device_deadline_fires_once_per_due_time_and_is_armed_again_for_the_next(store: Any) -> None:
    """One row per device, moved as its signals move its deadline; each due time fires once: its cues commit
    with the row marked done for that time, and a second firing of it (a claimer, the owner's late alarm, a
    replica the device reconnected to) stores none of its cues."""
    await store.arm_timers([deadline("dev-1", "a", 100.0)])
    await store.arm_timers([deadline("dev-1", "a", 130.0)])  # a signal moved it
    # Fired for a time the row no longer holds: that deadline is gone, nothing is stored.
    stale = await store.commit_offer(OfferCommit(cues=[cue("c-0")], fires=[("device:dev-1", 100.0)]))
    assert stale.refused == {"c-0": ("fired_elsewhere", "its deadline fired on another replica first")}
    first = await store.commit_offer(OfferCommit(cues=[cue("c-1")], fires=[("device:dev-1", 130.0)]))
    second = await store.commit_offer(OfferCommit(cues=[cue("c-2")], fires=[("device:dev-1", 130.0)]))
    assert (first.refused, set(second.refused)) == ({}, {"c-2"})
    assert [c.cue_id for c in await store.cues_for_subject("user-1")] == ["c-1"]
    [row] = await store.timers()
    assert (row.state, row.due_at, row.fired_at) == ("done", 130.0, 130.0)
    # The device reconnects to another replica, which arms what it computes: the time that fired stays done...
    await store.arm_timers([deadline("dev-1", "b", 130.0)])
    [row] = await store.timers()
    assert (row.state, row.owner) == ("done", "a")
    # ...and the next deadline is armed again, owned by that replica, claimable once it is gone.
    await store.arm_timers([deadline("dev-1", "b", 190.0)])
    [row] = await store.timers()
    assert (row.state, row.owner, row.due_at, row.fired_at) == ("armed", "b", 190.0, None)
    claimed = await store.claim_timers("c", 200.0, hold=HOLD, own_after=60.0)
    assert [t.timer_id for t in claimed] == ["device:dev-1"]
    # A firing with nothing to offer only marks it done (for that time).
    await store.commit_offer(OfferCommit(fires=[("device:dev-1", 190.0)]))
    assert [t.state for t in await store.timers()] == ["done"]


def offer(engagement_id: str, associate_id: str, owner: str, due_at: float) -> TimerRecord:
    return TimerRecord(f"offer:{engagement_id}", "offer", f"{engagement_id}:{associate_id}", due_at, owner)


async def test_a_fallback_row_fires_once_and_a_moot_one_is_settled(store: Any) -> None:
    """The fallback's row (core/desk_timers.py): done is "offered"; the owner's alarm and a claimer both try,
    one wins. Armed again by an adopter it is re-owned while armed, and stays done once fired."""
    await store.arm_timers([TimerRecord("fallback:eng-1", "fallback", "eng-1", 100.0, "a")])
    await store.arm_timers([TimerRecord("fallback:eng-1", "fallback", "eng-1", 100.0, "b")])  # adopted by b
    [row] = await store.timers()
    assert (row.owner, row.state) == ("b", "armed")
    assert await store.finish_timer("fallback:eng-1", 101.0)
    assert not await store.finish_timer("fallback:eng-1", 102.0)
    await store.arm_timers([TimerRecord("fallback:eng-1", "fallback", "eng-1", 100.0, "c")])
    [row] = await store.timers()
    assert (row.owner, row.state, row.fired_at) == ("b", "done", 101.0)
    assert await store.get_timer("fallback:eng-1") == row
    assert await store.get_timer("fallback:eng-2") is None


async def test_an_offer_row_moves_from_associate_to_associate_and_lapses_once_per_offer(store: Any) -> None:
    """One row per engagement's offer (core/deadlines.py OFFER), its target naming the associate: ended early
    (claimed, rejected) or lapsed, it is done for that due time; offered to the next associate it is armed
    again, and a late firing of the earlier offer (a claimer's, an alarm's) marks nothing."""
    await store.arm_timers([offer("eng-1", "dana", "a", 120.0)])
    assert await store.finish_due("offer:eng-1", 120.0, 121.0)  # the owner's alarm: lapsed
    assert not await store.finish_due("offer:eng-1", 120.0, 122.0)  # a claimer of the same offer: nothing
    await store.arm_timers([offer("eng-1", "erin", "a", 150.0)])  # offered to the next one
    row = await store.get_timer("offer:eng-1")
    assert row is not None and (row.target, row.state, row.due_at, row.fired_at) == ("eng-1:erin", "armed", 150.0, None)
    # A stale firing of Dana's offer (its due time) does not touch Erin's.
    assert not await store.finish_due("offer:eng-1", 120.0, 130.0)
    assert (await store.get_timer("offer:eng-1")).state == "armed"  # type: ignore[union-attr]
    # The owner dies: its due offer is claimed once, by one replica, and lapses for that time only.
    await store.save_replica(ReplicaRecord("b", 200.0, 1000.0, "", "", "", False))
    [claimed] = await store.claim_timers("b", 200.0, hold=HOLD, own_after=60.0)
    assert (claimed.timer_id, claimed.target, claimed.due_at) == ("offer:eng-1", "eng-1:erin", 150.0)
    assert await store.finish_due("offer:eng-1", 150.0, 200.0)
    assert await store.claim_timers("c", 200.0 + 2 * HOLD, hold=HOLD, own_after=60.0) == []
    # A re-arm for the time that lapsed (a slow arming write) leaves it done.
    await store.arm_timers([offer("eng-1", "erin", "a", 150.0)])
    assert (await store.get_timer("offer:eng-1")).state == "done"  # type: ignore[union-attr]


async def test_the_latest_session_of_a_device(store: Any) -> None:
    assert await store.latest_session("dev-1") is None
    for session_id, started in (("s-1", 100.0), ("s-3", 300.0), ("s-2", 200.0)):
        await store.save_session(SessionRecord(session_id, "app", "dev-1", "u-1", started, {"plan": "pro"}, "full"))
    await store.save_session(SessionRecord("other", "app", "dev-2", "u-1", 900.0, {}, "full"))
    latest = await store.latest_session("dev-1")
    assert latest is not None and (latest.session_id, latest.context) == ("s-3", {"plan": "pro"})


async def test_replicas_claiming_at_once_each_get_different_timers(tmp_path: Path, pg_database: str) -> None:
    """Several PostgresStores (as replicas) claim a dead replica's 300 due timers at once, in small bites:
    each timer is claimed by exactly one, and each fires exactly once even when two replicas race to fire it."""
    url = pg_url_for(pg_database, str(tmp_path))
    replicas = [await PostgresStore.open(url) for _ in range(4)]
    try:
        first = replicas[0]
        now = 10_000.0
        ids = [f"c-{i:03}" for i in range(300)]
        await first.commit_offer(
            OfferCommit(cues=[cue(i) for i in ids], timers=[expiry(i, "dead", now - 1) for i in ids])
        )

        async def claim_all(s: PostgresStore, name: str) -> list[str]:
            got: list[str] = []
            while batch := await s.claim_timers(name, now, hold=HOLD, own_after=60.0, limit=7):
                got.extend(t.target for t in batch)
            return got

        claims = await asyncio.gather(*(claim_all(s, f"r{n}") for n, s in enumerate(replicas)))
        counts = Counter(t for got in claims for t in got)
        assert sorted(counts) == ids and set(counts.values()) == {1}
        assert sum(1 for got in claims if got) > 1  # they really competed

        # Every timer fired by two replicas at once (a claimer and the owner's late alarm): once each.
        async def fire(s: PostgresStore, cue_id: str, tag: str) -> bool:
            hook = withdrawn(f"{cue_id}-{tag}")
            fired: bool = await s.set_cue_status(cue_id, "expired", now, webhooks=[hook], timer=f"cue_expiry:{cue_id}")
            return fired

        results = await asyncio.gather(
            *(fire(replicas[n % 4], i, "x") for n, i in enumerate(ids)),
            *(fire(replicas[(n + 1) % 4], i, "y") for n, i in enumerate(ids)),
        )
        assert sum(results) == len(ids)
        assert await count_webhooks(first, "cue.withdrawn") == len(ids)
        assert {t.state for t in await first.timers()} == {"done"}
    finally:
        for s in replicas:
            await s.close()


# -- the desk's rows commit with the state change that arms them (issue 14) ---------------------------------


def fallback(engagement_id: str, owner: str, due_at: float) -> TimerRecord:
    return TimerRecord(f"fallback:{engagement_id}", "fallback", engagement_id, due_at, owner)


async def test_an_engagement_is_stored_with_its_fallback_row_or_neither(store: Any) -> None:
    """accept_cue arms the engagement's fallback row in its own transaction: a failed accept leaves no row, a
    refused one neither, and the row is there as soon as the engagement is."""
    from .test_storage import INTEGRITY

    bogus = WebhookRecord("q-0", "http://crm", "engagement.queued", "{}", 100.0, "bogus", 0, 100.0)
    await store.save_cue(cue("cue-1"))
    with pytest.raises(INTEGRITY):
        await store.accept_cue(
            "cue-1", 110.0, engagement(), webhooks=[bogus], owner="a", timers=[fallback("eng-1", "a", 230.0)]
        )
    assert await store.get_engagement("eng-1") is None
    assert await store.get_timer("fallback:eng-1") is None
    assert (await store.get_cue("cue-1")).status == "offered"  # type: ignore[union-attr]
    # A cue settled meanwhile: no engagement, no row.
    await store.save_cue(replace(cue("cue-2"), status="expired"))
    refused = await store.accept_cue(
        "cue-2", 110.0, replace(engagement("eng-2"), cue_id="cue-2"), owner="a", timers=[fallback("eng-2", "a", 230.0)]
    )
    assert not refused.accepted and await store.get_timer("fallback:eng-2") is None
    # Accepted: both, the row owned by the replica routing the engagement (with and without an owner row).
    assert (
        await store.accept_cue("cue-1", 111.0, engagement(), owner="a", timers=[fallback("eng-1", "a", 230.0)])
    ).accepted
    row = await store.get_timer("fallback:eng-1")
    assert row is not None and (row.owner, row.state, row.due_at) == ("a", "armed", 230.0)
    assert await store.owner_of("eng-1") == "a"
    await store.save_cue(cue("cue-3"))
    assert (await store.accept_cue("cue-3", 112.0, replace(engagement("eng-3"), cue_id="cue-3"), timers=[fallback("eng-3", "b", 240.0)])).accepted  # fmt: skip
    assert (await store.get_timer("fallback:eng-3")).owner == "b"  # type: ignore[union-attr]
    # Assigned: the row is moot, settled in the assignment's own write; the user's fallback answer is kept.
    assigned = replace(engagement(), state="assigned", assigned_at=150.0, associate_id="dana", fallback_choice="chat")
    assert await store.save_engagement(assigned, settle="fallback:eng-1")
    row = await store.get_timer("fallback:eng-1")
    assert row is not None and (row.state, row.fired_at) == ("done", 150.0)
    stored = await store.get_engagement("eng-1")
    assert stored is not None and (stored.state, stored.fallback_choice) == ("assigned", "chat")


async def test_an_offer_row_commits_with_its_slot_reservation_or_neither(store: Any) -> None:
    """A reservation for an associate who must claim the engagement arms the offer's row with the hold, in one
    transaction: a reservation that fails stores neither; one that finds no room, neither."""
    from cuepoint_server.storage import SlotClaim

    def claim(key: str, fits: Any) -> SlotClaim:
        return SlotClaim(
            key, "chat", "support", "a", (("dana", 1.0),), fits,
            timer=lambda associate_id: offer(key, associate_id, "a", 300.0),
        )  # fmt: skip

    async def fails_after_reserving(txn: Any) -> tuple[None, int]:
        result = await store._reserve_in(txn, claim("eng-1", lambda _a, held: not held), 100.0)
        assert result.associate_id == "dana" and result.timer is not None  # both written, then the commit fails
        raise RuntimeError("the transaction fails after the hold and the row were written")

    with pytest.raises(RuntimeError):
        await store._slot_transaction(fails_after_reserving)
    assert await store.slot_holds() == [] and await store.get_timer("offer:eng-1") is None
    taken = await store.reserve_slot(claim("eng-1", lambda _a, held: not held), 101.0)
    assert taken.associate_id == "dana" and taken.timer is not None
    row = await store.get_timer("offer:eng-1")
    assert row is not None and (row.target, row.state, row.due_at, row.owner) == ("eng-1:dana", "armed", 300.0, "a")
    assert [(a, k) for a, k, _ in await store.slot_holds()] == [("dana", "eng-1")]
    # Dana is full: no slot for the next engagement, and no row either.
    none = await store.reserve_slot(claim("eng-2", lambda _a, held: not held), 102.0)
    assert none.associate_id == "" and none.timer is None
    assert await store.get_timer("offer:eng-2") is None
