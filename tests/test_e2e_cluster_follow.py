"""The engagement follows its device between replicas (issue 14).

Two real `cuepoint serve` processes on the run's PostgreSQL and the local NATS (tests/cluster.py, the fixtures of
test_e2e_cluster.py). The device reaches them through a small TCP proxy standing for a load balancer: switching
it drops the device's connection, and the SDK's reconnect (same client, same engagement handle) lands on the
other replica, while the first one stays up (or was SIGKILLed). The device must go on acting on its engagement
there, and hear of it: the engagement moved with it (its owner row names the new replica).
"""

from __future__ import annotations

import asyncio

import pytest

import cuepoint
from cuepoint_server.storage import PostgresStore

from .cluster import Balancer, Replica, balancer
from .test_e2e_cluster import StartCluster, _take, cluster
from .test_e2e_cluster_desk_timers import logged
from .test_e2e_cluster_routing import _sees

__all__ = ["cluster"]  # the fixture, shared with tests/test_e2e_cluster.py

CHAT = """
routing:
  queues:
    - {id: support}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""

# Nobody signs in: the fallback is offered 1 s after the engagement was created, chat among its options.
FALLBACK = """
routing:
  queues:
    - {id: support, fallback_after: 1s, fallback: [callback, chat, cancel]}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: audio, upgrades: [chat], queue: support, ttl: 10m}
"""


async def phone_at(proxy: Balancer) -> cuepoint.Client:
    return await cuepoint.connect(
        proxy.address,
        app_id="fitkit",
        device_id="phone-1",
        user=cuepoint.User(user_id="user-1"),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )


async def move(phone: cuepoint.Client, proxy: Balancer, replica: Replica) -> None:
    """Point the balancer at `replica`, dropping the device's connection; return once it reconnected there."""
    states = phone.states()
    current = await anext(states)
    proxy.to(replica)
    async with asyncio.timeout(20):
        if current is cuepoint.ConnectionState.CONNECTED:
            assert await anext(states) is cuepoint.ConnectionState.STALE
        assert await anext(states) is cuepoint.ConnectionState.CONNECTED


async def owned_by(database: str, engagement_id: str, replica_id: str = "", *, not_: str = "") -> str:
    """Wait until the engagement's owner row names `replica_id` (or anyone but `not_`); that owner."""
    async with await PostgresStore.open(database) as store, asyncio.timeout(30):
        while True:
            owner = await store.owner_of(engagement_id)
            if owner and (owner == replica_id or (not replica_id and owner != not_)):
                return owner
            await asyncio.sleep(0.05)


async def replica_ids(database: str) -> dict[str, str]:
    """Replica id by the address it serves on."""
    async with await PostgresStore.open(database) as store:
        return {r.address.rsplit(":", 1)[-1]: r.replica_id for r in await store.replicas()}


async def texts(engagement: cuepoint.Engagement, n: int) -> list[str]:
    async with asyncio.timeout(20):
        return [m.text async for m in _take(engagement.messages(), n)]


@pytest.mark.parametrize("home", ["A", "B"])
async def test_an_assigned_engagement_follows_its_device_to_the_other_live_replica(
    cluster: StartCluster, home: str
) -> None:
    a, b = await cluster(CHAT)
    ids = await replica_ids(a.database)
    # The associate's stream is on `home`; the engagement is A's (the device's first replica) either way.
    dana = await cuepoint.connect_associate(
        (a if home == "A" else b).address, associate_id="dana", display_name="Dana", queues=["support"]
    )
    await _sees(a, "support", 1)
    async with balancer(a) as proxy:
        phone = await phone_at(proxy)
        await phone.track("help")
        engagement = await phone.accept(await phone.next_cue(timeout=10))
        assigned = await dana.next_engagement(timeout=20)
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=10)
        assert await owned_by(a.database, assigned.engagement_id) == ids[str(a.port)]
        await engagement.send_chat("before the move")
        await dana.send_chat(assigned, "hello from Dana")
        assert await texts(engagement, 2) == ["before the move", "hello from Dana"]

        # The device's connection moves to B; A stays up. The engagement follows it there.
        await move(phone, proxy, b)
        await owned_by(a.database, assigned.engagement_id, ids[str(b.port)])
        await engagement.send_chat("after the move")
        await dana.send_chat(assigned, "still here")
        async with asyncio.timeout(20):
            seen_by_dana = [m.text async for m in _take(dana.messages(assigned), 4)]
        assert seen_by_dana == ["before the move", "hello from Dana", "after the move", "still here"]
        assert await texts(engagement, 4) == seen_by_dana
        async with await PostgresStore.open(a.database) as store:
            # Dana's slot moved with it: held once, by B.
            holds = [h for h in await store.slot_holds() if h[1] == assigned.engagement_id]
            assert holds == [("dana", assigned.engagement_id, ids[str(b.port)])]
            stored = [c.text for c in await store.chat_transcript(assigned.engagement_id)]
            assert stored == seen_by_dana

        # Ending works where it is now; each line reached the device once.
        await dana.end(assigned, disposition="resolved", notes="followed")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=20)
        assert [m.text for m in engagement.transcript] == seen_by_dana
        # Assigned once, never again for the move.
        assert logged([a, b], "engagement.assigned", assigned.engagement_id) == 1
        assert logged([a], "engagement.handed_over", assigned.engagement_id) == 1
        await phone.close()
    await dana.close()


async def test_a_queued_engagement_with_its_fallback_offered_follows_its_device(cluster: StartCluster) -> None:
    a, b = await cluster(FALLBACK)
    ids = await replica_ids(a.database)
    async with balancer(a) as proxy:
        phone = await phone_at(proxy)
        await phone.track("help")
        engagement = await phone.accept(await phone.next_cue(timeout=10))
        offer = await engagement.wait_fallback(timeout=20)  # by A, nobody being signed in
        assert cuepoint.FallbackOption.CHAT in offer.options
        changes = engagement.channel_changes()
        await move(phone, proxy, b)
        # At once, as the device is back (on B): the choice waits there for the engagement, not refused.
        await engagement.choose_fallback(cuepoint.FallbackOption.CHAT)
        async with asyncio.timeout(20):
            change = await anext(changes)
        assert (change.channel, change.accepted) == (cuepoint.Channel.CHAT, True)
        assert await owned_by(a.database, offer.engagement_id) == ids[str(b.port)]
        assert phone.failure is None and phone.is_open
        assert engagement.state is cuepoint.EngagementState.QUEUED
        await engagement.end()
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=20)
        # Offered once (by A): B took the offer as it stood.
        assert logged([a, b], "engagement.fallback_offered", offer.engagement_id) == 1
        await phone.close()


async def test_a_device_reconnecting_to_b_after_a_died_brings_its_engagement_at_once(cluster: StartCluster) -> None:
    # B's own cluster sweep is too rare to adopt anything in this test: only the device's reconnect does.
    [a] = await cluster(CHAT, count=1, extra=("--replica-ttl", "1"))
    [b] = await cluster(CHAT, count=1, extra=("--replica-ttl", "1", "--test-sweep-every", "120"))
    ids = await replica_ids(a.database)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
    await _sees(a, "support", 1)
    async with balancer(a) as proxy:
        phone = await phone_at(proxy)
        await phone.track("help")
        engagement = await phone.accept(await phone.next_cue(timeout=10))
        assigned = await dana.next_engagement(timeout=20)
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=10)
        await a.kill()
        await move(phone, proxy, b)
        # B adopts it as the device arrives (once A's registry row is stale) and gives it back to Dana.
        assert await owned_by(a.database, assigned.engagement_id, not_=ids[str(a.port)]) == ids[str(b.port)]
        again = await dana.next_engagement(timeout=30)
        assert again.engagement_id == assigned.engagement_id
        await engagement.send_chat("are you there?")
        async with asyncio.timeout(20):
            seen_by_dana = [m.text async for m in _take(dana.messages(again), 1)]
        assert seen_by_dana[-1] == "are you there?"
        await dana.send_chat(again, "yes")
        async with asyncio.timeout(20):
            while "yes" not in [m.text for m in engagement.transcript]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await engagement.end()
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=20)
        assert [m.text for m in engagement.transcript].count("yes") == 1
        await phone.close()
    await dana.close()


OFFERS = """
routing:
  queues:
    - {id: support, offer_timeout: 60s}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""


async def test_an_offer_standing_follows_its_device_and_the_claim_finds_it_with_wakeups_lost(
    cluster: StartCluster,
) -> None:
    # Every third wake-up of the delivery outbox lost, every other one repeated, on every replica: the hand-over
    # request and its answer are rows, not bus messages. Dana's stream is on C; the engagement starts on A.
    a, b, c = await cluster(OFFERS, count=3, extra=("--test-delivery-faults", "drop=3,replay"))
    ids = await replica_ids(a.database)
    dana = await cuepoint.connect_associate(
        c.address, associate_id="dana", display_name="Dana", queues=["support"], manual_claim=True
    )
    await _sees(a, "support", 1)
    await _sees(b, "support", 1)
    async with balancer(a) as proxy:
        phone = await phone_at(proxy)
        await phone.track("help")
        engagement = await phone.accept(await phone.next_cue(timeout=10))
        offered = await dana.next_offer(timeout=30)  # by A, through its stand-in of Dana's stream
        assert offered.engagement_id == engagement.engagement_id
        await move(phone, proxy, b)
        await owned_by(a.database, offered.engagement_id, ids[str(b.port)])
        # Dana's claim goes where the offer came from (A), which passes it on to B: the offer stood there.
        taken = await dana.claim(offered, timeout=30)
        assert taken.engagement_id == offered.engagement_id
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=30)
        await engagement.send_chat("hi Dana")
        await dana.send_chat(taken, "hi")
        await dana.send_chat(taken, "how can I help?")
        async with asyncio.timeout(30):
            seen_by_dana = [m.text async for m in _take(dana.messages(taken), 3)]
        assert sorted(seen_by_dana) == sorted(["hi Dana", "hi", "how can I help?"])
        assert await texts(engagement, 3) == seen_by_dana
        async with await PostgresStore.open(a.database) as store:
            holds = [h for h in await store.slot_holds() if h[1] == offered.engagement_id]
            assert holds == [("dana", offered.engagement_id, ids[str(b.port)])]
        await dana.end(taken, disposition="resolved", notes="followed")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=30)
        assert [m.text for m in engagement.transcript] == seen_by_dana
        assert logged([a, b, c], "engagement.assigned", offered.engagement_id) == 1
        assert logged([a], "engagement.handed_over", offered.engagement_id) == 1
        await phone.close()
    await dana.close()
