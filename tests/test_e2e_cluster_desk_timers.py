"""The desk's deadlines are timer rows across replicas (issue 14, "Timers are rows"): a queue's fallback and an
associate's offer timeout fire once even when the replica that armed them is SIGKILLed.

Two real `cuepoint serve` processes on the run's PostgreSQL and the local NATS (tests/cluster.py, the fixtures of
test_e2e_cluster.py). "Once" is read from what is committed (the timer row) and from the replicas' own JSON logs,
where each firing that marked its row done logs one event.

Each test runs both ways a surviving replica comes to fire a killed one's row (the hidden `--test-sweep-every`
sets B's cluster sweep): "adopted", B's sweep adopts A's engagement well before the row falls due and B's own
alarm fires it; "claimed", B sweeps too rarely to adopt it in time, so its timer claims take A's due row
(adopting the engagement on the way) and fire it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

import cuepoint
from cuepoint_server.storage import PostgresStore, TimerRecord

from .cluster import Balancer, Replica, balancer
from .test_e2e_cluster import StartCluster, cluster
from .test_e2e_cluster_routing import _sees

__all__ = ["cluster"]  # the fixture, shared with tests/test_e2e_cluster.py

TTL = ("--replica-ttl", "1")
# B's cluster sweep: every 0.5 s (it adopts A's engagement about 1 s after A dies), or every 120 s (not in time).
SWEEPS = {"adopted": "0.5", "claimed": "120"}
WAYS = pytest.mark.parametrize("way", sorted(SWEEPS))


async def replicas(cluster: StartCluster, scenarios: str, way: str) -> tuple[Replica, Replica]:
    [a] = await cluster(scenarios, count=1, extra=TTL)
    [b] = await cluster(scenarios, count=1, extra=(*TTL, "--test-sweep-every", SWEEPS[way]))
    return a, b


# Nobody signs in: the engagement waits in line and its fallback falls due 5 s after it was created, time enough
# to SIGKILL the replica holding it first.
FALLBACK = """
routing:
  queues:
    - {id: support, fallback_after: 5s, fallback: [callback, cancel]}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""

# Offers wait 5 s for a claim; the engagement's replica is SIGKILLed while the offer stands.
OFFERS = """
routing:
  queues:
    - {id: support, offer_timeout: 5s}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""


def logged(replicas: list[Replica], event: str, engagement_id: str) -> int:
    """How many times the replicas logged `event` for the engagement (their --log-json lines)."""
    count = 0
    for replica in replicas:
        for line in replica.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == event:
                    count += entry.get("engagement_id") == engagement_id
    return count


async def row(database: str, timer_id: str) -> TimerRecord | None:
    async with await PostgresStore.open(database) as store:
        return await store.get_timer(timer_id)


@WAYS
async def test_a_fallback_armed_on_a_is_offered_once_after_a_is_killed(cluster: StartCluster, way: str) -> None:
    a, b = await replicas(cluster, FALLBACK, way)
    # Through a load balancer: connected to A, reconnecting to B once A dies.
    async with balancer(a) as proxy:
        await _fallback_offered_once_after_a_is_killed(a, b, proxy, way)


async def _fallback_offered_once_after_a_is_killed(a: Replica, b: Replica, proxy: Balancer, way: str) -> None:
    phone = await cuepoint.connect(
        proxy.address,
        app_id="fitkit",
        device_id="phone-a",
        user=cuepoint.User(user_id="user-a"),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=10)
    async with await PostgresStore.open(a.database) as store:
        first_owner = await store.owner_of(engagement.engagement_id)
        async with asyncio.timeout(20):
            # Armed once A's reservation found nobody free (its slot line), just after the engagement was queued.
            while (armed := await store.get_timer(f"fallback:{engagement.engagement_id}")) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    assert armed.state == "armed" and armed.owner == first_owner  # A's, as A routes the engagement
    # SIGKILL before the 5 s are up: A's alarm dies with it; the row stays, owned by A.
    await a.kill()
    if way == "claimed":
        # The device stays away until B's claim fired the row: reconnecting to B, it would bring its engagement
        # there at once (core/follow.py), and B's own alarm would fire it.
        async with asyncio.timeout(60):
            key = f"fallback:{engagement.engagement_id}"
            while (claimed := await row(b.database, key)) is None or claimed.state != "done":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    proxy.to(b)
    # B fires it once (adopting the engagement or claiming the row, whichever comes first); the device, back
    # on B, is offered the fallback and can answer it there.
    offer = await engagement.wait_fallback(timeout=60)
    assert set(offer.options) == {cuepoint.FallbackOption.CALLBACK, cuepoint.FallbackOption.CANCEL}
    fired = await row(b.database, f"fallback:{engagement.engagement_id}")
    assert fired is not None and fired.state == "done"
    if way == "adopted":  # re-owned by B when it adopted the engagement, fired by B's own alarm
        assert fired.owner not in ("", first_owner) and fired.claimed_by == ""
    else:  # still A's, fired by B's claim
        assert fired.owner == first_owner and fired.claimed_by not in ("", first_owner)
    assert logged([a, b], "engagement.fallback_offered", engagement.engagement_id) == 1
    assert logged([a], "engagement.fallback_offered", engagement.engagement_id) == 0
    await engagement.choose_fallback(cuepoint.FallbackOption.CANCEL)
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=10)
    # Nothing fired twice: no replica offered it again, before or after it was answered.
    assert logged([a, b], "engagement.fallback_offered", engagement.engagement_id) == 1
    assert logged([a, b], "engagement.fallback_offered_before", engagement.engagement_id) == 0
    await phone.close()


@WAYS
async def test_an_offer_made_by_a_lapses_once_after_a_is_killed_and_goes_to_the_next_associate(
    cluster: StartCluster, way: str
) -> None:
    a, b = await replicas(cluster, OFFERS, way)
    dana = await cuepoint.connect_associate(
        b.address, associate_id="dana", queues=["support"], capacity=1, manual_claim=True
    )
    await _sees(a, "support", 1)
    phone = await cuepoint.connect(
        a.address,
        app_id="fitkit",
        device_id="phone-a",
        user=cuepoint.User(user_id="user-a"),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    offered = await dana.next_offer(timeout=20)  # by A, through its stand-in of Dana's stream
    assert offered.engagement_id == engagement.engagement_id
    key = f"offer:{engagement.engagement_id}"
    async with asyncio.timeout(20):
        while (armed := await row(a.database, key)) is None:  # noqa: ASYNC110 - armed in A's slot line
            await asyncio.sleep(0.05)
    assert (armed.state, armed.target) == ("armed", f"{engagement.engagement_id}:dana")
    erin = await cuepoint.connect_associate(
        b.address, associate_id="erin", queues=["support"], capacity=1, manual_claim=True
    )
    # A dies with Dana's offer standing; she never claims it. Once its 5 s are up it lapses, once, on B, and
    # the engagement is offered to Erin there.
    await a.kill()
    again = await erin.next_offer(timeout=60)
    assert again.engagement_id == engagement.engagement_id
    async with asyncio.timeout(20):
        while engagement.engagement_id in dana.offers_pending:  # noqa: ASYNC110 - told "timeout" on her stream
            await asyncio.sleep(0.05)
    assert logged([a, b], "engagement.offer_lapsed", engagement.engagement_id) == 1
    # Adopted in time, B kept Dana's offer standing until its time; claimed, B lapsed it as it adopted it.
    assert logged([b], "engagement.offer_kept", engagement.engagement_id) == (1 if way == "adopted" else 0)
    moved = await row(b.database, key)
    assert moved is not None and (moved.state, moved.target) == ("armed", f"{engagement.engagement_id}:erin")
    # Erin takes it on B.
    taken = await erin.claim(again, timeout=20)
    assert taken.engagement_id == engagement.engagement_id
    assert logged([a, b], "engagement.offer_lapsed", engagement.engagement_id) == 1
    await erin.close()
    await dana.close()
    await phone.close()


# The fallback falls due 2 s after the engagement was created; the user may go on as a chat.
CHAT_FALLBACK = """
routing:
  queues:
    - {id: support, fallback_after: 2s, fallback: [chat, cancel]}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: audio, queue: support, ttl: 10m}
"""


async def test_a_fallback_answered_on_a_is_not_offered_again_by_b_after_a_is_killed(cluster: StartCluster) -> None:
    """The user's answer (chat) is stored with the channel change: B, adopting the engagement once A is killed,
    neither offers the fallback again nor changes the channel back; an associate on B takes it as a chat."""
    a, b = await replicas(cluster, CHAT_FALLBACK, "adopted")
    phone = await cuepoint.connect(
        f"ipv4:{a.address},{b.address}",
        app_id="fitkit",
        device_id="phone-a",
        user=cuepoint.User(user_id="user-a"),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    offer = await engagement.wait_fallback(timeout=20)  # by A: nobody is signed in
    assert cuepoint.FallbackOption.CHAT in set(offer.options)
    await engagement.choose_fallback(cuepoint.FallbackOption.CHAT)
    async with await PostgresStore.open(a.database) as store, asyncio.timeout(20):
        # Stored with the change (the write the device hears of is committed within milliseconds).
        while (stored := await store.get_engagement(engagement.engagement_id)) is None or stored.channel != "chat":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await a.kill()
    async with asyncio.timeout(60):
        while logged([b], "engagement.restored", engagement.engagement_id) < 1:  # noqa: ASYNC110 - B adopts it
            await asyncio.sleep(0.1)
    # Past its due time, in B's line: an alarm that re-offered the fallback would fire before anyone takes it.
    erin = await cuepoint.connect_associate(b.address, associate_id="erin", queues=["support"], capacity=1)
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=30)
    assert logged([a, b], "engagement.fallback_offered", engagement.engagement_id) == 1  # A's, once
    assert logged([b], "engagement.fallback_offered_before", engagement.engagement_id) == 0
    assert engagement.fallback_offer is None
    assert engagement.channel == cuepoint.Channel.CHAT
    async with await PostgresStore.open(b.database) as store:
        stored = await store.get_engagement(engagement.engagement_id)
    assert stored is not None and (stored.state, stored.channel, stored.fallback_choice) == ("assigned", "chat", "chat")
    await erin.close()
    await phone.close()


# Offers wait 30 s: the associate claims A's offer right after A is killed, long before it would lapse.
LONG_OFFERS = """
routing:
  queues:
    - {id: support, offer_timeout: 30s}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""


async def test_an_offer_of_a_killed_replica_is_claimed_from_b_exactly_once(cluster: StartCluster) -> None:
    """Dana (on B) is offered A's engagement through A's stand-in of her stream; A is killed and she claims it at
    once, before anyone knows A is gone. Her claim, stored for A's stand-in, follows the engagement to B, which
    adopted it and kept her offer standing: she gets it, once."""
    a, b = await replicas(cluster, LONG_OFFERS, "adopted")
    dana = await cuepoint.connect_associate(
        b.address, associate_id="dana", queues=["support"], capacity=1, manual_claim=True
    )
    await _sees(a, "support", 1)
    phone = await cuepoint.connect(
        f"ipv4:{a.address},{b.address}",
        app_id="fitkit",
        device_id="phone-a",
        user=cuepoint.User(user_id="user-a"),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    offered = await dana.next_offer(timeout=20)  # by A, through its stand-in of Dana's stream
    assert offered.engagement_id == engagement.engagement_id
    await a.kill()
    taken = await dana.claim(offered, timeout=25)  # well within the offer's 30 s
    assert taken.engagement_id == engagement.engagement_id
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=20)
    assert logged([a, b], "engagement.assigned", engagement.engagement_id) == 1
    assert logged([a, b], "engagement.offer_lapsed", engagement.engagement_id) == 0
    async with await PostgresStore.open(b.database) as store:
        stored = await store.get_engagement(engagement.engagement_id)
        assert stored is not None and (stored.state, stored.associate_id) == ("assigned", "dana")
        row = await store.get_timer(f"offer:{engagement.engagement_id}")
        assert row is not None and row.state == "done"  # claimed: it never lapses
    await dana.close()
    await phone.close()
