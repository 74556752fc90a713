"""Routing across replicas (issue 14): an associate's room is judged from what every replica holds.

Two real `cuepoint serve` processes share the run's fresh PostgreSQL database and the local NATS (the fixture
of tests/test_e2e_cluster.py); without both these tests are skipped with one line saying why, unless
CUEPOINT_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio

import asyncpg

import cuepoint
from cuepoint.v1 import admin_pb2
from cuepoint_server.storage import PostgresStore

from .cluster import Replica
from .conftest import no_cue
from .test_e2e_cluster import StartCluster, admin, cluster, device

__all__ = ["cluster"]  # the fixture, shared with tests/test_e2e_cluster.py

# A cue is offered only while someone can take its engagement, and holds their slot while on screen.
REQUIRED = """
policy: {require_capacity: true}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need help?", channel: audio, queue: support, ttl: 10m}
    cooldown: 0s
"""


async def _sees(replica: Replica, queue: str, associates: int) -> None:
    """Wait until `replica` has `associates` associates in `queue` (its stand-ins of other replicas' streams)."""
    async with asyncio.timeout(30):
        while True:
            live = await admin(replica.address, "ListLiveSessions", admin_pb2.ListLiveSessionsRequest())
            loads = {q.queue: q.associates for q in live.queues}  # type: ignore[attr-defined]
            if loads.get(queue, 0) >= associates:
                return
            await asyncio.sleep(0.1)


async def _decisions(replica: Replica, device_id: str) -> list[str]:
    explained = await admin(replica.address, "ExplainDevice", admin_pb2.ExplainDeviceRequest(device_id=device_id))
    return [d.reason or d.outcome for d in explained.decisions]  # type: ignore[attr-defined]


async def _holds(database: str) -> list[tuple[str, str]]:
    async with await PostgresStore.open(database) as store:
        return [(who, key) for who, key, _ in await store.slot_holds()]


async def test_a_cue_on_screen_on_a_holds_the_associates_slot_on_every_replica(cluster: StartCluster) -> None:
    a, b = await cluster(REQUIRED)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"], capacity=1)
    await _sees(a, "support", 1)
    phone = await device(a, "phone-a")
    await phone.track("help")
    cue = await phone.next_cue(timeout=10)
    # The cue on screen holds Dana's one slot in storage, not only in A's memory.
    assert await _holds(a.database) == [("dana", cue.cue_id)]
    # So B, where Dana's own stream is and where nothing of hers is held, offers nothing: she has no room.
    tablet = await device(b, "tablet-b")
    await tablet.track("help")
    await tablet.flush(timeout=10)
    assert await no_cue(tablet)
    assert await _decisions(b, "tablet-b") == ["no_capacity"]
    # Accepted: the engagement takes the cue's slot over (never free in between) and reaches Dana.
    engagement = await phone.accept(cue)
    assigned = await dana.next_engagement(timeout=20)
    assert assigned.engagement_id == engagement.engagement_id
    assert await _holds(a.database) == [("dana", engagement.engagement_id)]
    # Once she is done, B offers again.
    await dana.end(assigned, disposition="resolved")
    async with asyncio.timeout(30):
        while await _holds(a.database):  # noqa: ASYNC110 - the release is stored once the end reaches A
            await asyncio.sleep(0.05)
    await tablet.track("help")
    again = await tablet.next_cue(timeout=10)
    assert await _holds(a.database) == [("dana", again.cue_id)]
    for client in (phone, tablet):
        await client.close()
    await dana.close()


async def test_an_engagement_routed_by_a_leaves_no_room_for_a_cue_on_b(cluster: StartCluster) -> None:
    a, b = await cluster(REQUIRED)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"], capacity=1)
    await _sees(a, "support", 1)
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    await dana.next_engagement(timeout=20)
    assert await _holds(a.database) == [("dana", engagement.engagement_id)]
    # B's own view of Dana holds nothing (A routed her engagement): whether the queue has room is judged
    # from storage, where her slot is taken.
    tablet = await device(b, "tablet-b")
    await tablet.track("help")
    await tablet.flush(timeout=10)
    assert await no_cue(tablet)
    assert await _decisions(b, "tablet-b") == ["no_capacity"]
    for client in (phone, tablet):
        await client.close()
    await dana.close()


TWO_QUEUES = """
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need help?", channel: chat, queue: support, ttl: 10m}
  - id: billing
    trigger: {event: billing}
    cue: {message: "A billing question?", channel: chat, queue: billing, ttl: 10m}
"""


async def test_a_named_transfer_on_a_finds_the_associate_full_on_b(cluster: StartCluster) -> None:
    a, b = await cluster(TWO_QUEUES)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["billing"], capacity=1)
    ann = await cuepoint.connect_associate(a.address, associate_id="ann", queues=["support"], capacity=1)
    await _sees(a, "billing", 1)
    # B gives Dana her one engagement; A gives Ann hers.
    tablet = await device(b, "tablet-b")
    await tablet.track("billing")
    on_b = await tablet.accept(await tablet.next_cue(timeout=10))
    assert (await dana.next_engagement(timeout=20)).engagement_id == on_b.engagement_id
    phone = await device(a, "phone-a")
    await phone.track("help")
    on_a = await phone.accept(await phone.next_cue(timeout=10))
    held = await ann.next_engagement(timeout=20)
    assert held.engagement_id == on_a.engagement_id
    # A's stand-in of Dana holds nothing, but storage knows her slot is taken on B: the transfer is refused,
    # naming the field, and nothing moved.
    await ann.transfer(held, to_associate="dana")
    async with asyncio.timeout(20):
        while ann.failure is None:  # noqa: ASYNC110 - set by the SDK's stream task
            await asyncio.sleep(0.05)
    assert "transfer.to_associate_id" in str(ann.failure) and "not available" in str(ann.failure)
    # (Ann's stream ended with the error, which gives her slot back: only Dana's are asked about.)
    assert [(who, key) for who, key in await _holds(a.database) if who == "dana"] == [("dana", on_b.engagement_id)]
    assert list(dana.active) == [on_b.engagement_id]
    for client in (phone, tablet):
        await client.close()
    await ann.close()
    await dana.close()


HELP = """
id: help
trigger: {event: help}
cue: {message: "Need help?", channel: chat, queue: support, ttl: 10m}
"""


async def test_an_assigned_engagement_adopted_from_a_killed_replica_goes_back_to_its_associate(
    cluster: StartCluster,
) -> None:
    a, b = await cluster(HELP, extra=("--replica-ttl", "1"))
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"], capacity=1)
    await _sees(a, "support", 1)
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    assert (await dana.next_engagement(timeout=20)).engagement_id == engagement.engagement_id
    # Erin signs in later, so once Dana's slot is freed (now), Erin is the longest idle of the two.
    erin = await cuepoint.connect_associate(b.address, associate_id="erin", queues=["support"], capacity=1)
    async with await PostgresStore.open(a.database) as store:
        owner = await store.owner_of(engagement.engagement_id)
        # A dies with the engagement it routed: B adopts it and offers it back to Dana, still signed in on B,
        # rather than to whoever is longest idle.
        await a.kill()
        again = await dana.next_engagement(timeout=60)
        assert again.engagement_id == engagement.engagement_id
        assert await store.owner_of(engagement.engagement_id) not in ("", owner)
        async with asyncio.timeout(20):
            while True:  # stored just after Dana is sent it
                record = await store.get_engagement(engagement.engagement_id)
                if record is not None and record.state == "assigned":
                    break
                await asyncio.sleep(0.05)
        assert record.associate_id == "dana"
        assert [(who, key) for who, key, _ in await store.slot_holds()] == [("dana", engagement.engagement_id)]
    assert not erin.active
    await phone.close()
    await dana.close()
    await erin.close()


# Dana takes billing, Erin support; a device on A asks for support with require_capacity.
JOINED = """
policy: {require_capacity: true}
scenarios:
  - id: billing
    trigger: {event: billing}
    cue: {message: "A billing question?", channel: chat, queue: billing, ttl: 10m}
    cooldown: 0s
  - id: help
    trigger: {event: help}
    cue: {message: "Need help?", channel: chat, queue: support, ttl: 10m}
    cooldown: 0s
"""


async def _held_since(database: str, who: str, key: str) -> float:
    """When `who`'s slot for `key` was taken, as stored (a slot given back and taken again is a new row)."""
    connection = await asyncpg.connect(database)
    try:
        return float(
            await connection.fetchval(
                "SELECT held_at FROM associate_holds WHERE associate_id = $1 AND hold_key = $2", who, key
            )
        )
    finally:
        await connection.close()


async def _on_b_with_erin_joining(
    a: Replica, b: Replica
) -> tuple[cuepoint.AssociateClient, cuepoint.AssociateClient, cuepoint.Client, str]:
    """Dana (billing) and Erin (support, capacity 1) signed in on B; B routes a billing engagement to Dana."""
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["billing"], capacity=2)
    erin = await cuepoint.connect_associate(b.address, associate_id="erin", queues=["support"], capacity=1)
    await _sees(a, "support", 1)
    tablet = await device(b, "tablet-b")
    await tablet.track("billing")
    engagement = await tablet.accept(await tablet.next_cue(timeout=10))
    assert (await dana.next_engagement(timeout=20)).engagement_id == engagement.engagement_id
    return dana, erin, tablet, engagement.engagement_id


async def _offered_once_free(phone: cuepoint.Client, database: str, who: str) -> None:
    async with asyncio.timeout(30):
        while any(w == who for w, _ in await _holds(database)):  # noqa: ASYNC110 - the release is stored by B
            await asyncio.sleep(0.05)
    await phone.track("help")
    await phone.next_cue(timeout=10)


async def test_a_conference_on_b_takes_the_associates_slot_on_every_replica(cluster: StartCluster) -> None:
    a, b = await cluster(JOINED)
    dana, erin, tablet, engagement_id = await _on_b_with_erin_joining(a, b)
    await dana.add_participant(engagement_id, "erin")
    assert (await erin.next_joined(timeout=20)).engagement_id == engagement_id
    # Her slot is stored with the joining, before she hears of it: A, where nothing of hers is held, sees it.
    assert ("erin", engagement_id) in await _holds(a.database)
    phone = await device(a, "phone-a")
    await phone.track("help")
    await phone.flush(timeout=10)
    assert await no_cue(phone)
    assert await _decisions(a, "phone-a") == ["no_capacity"]
    # The conference ends with the engagement: her slot is given back, and A offers again.
    await dana.end(engagement_id, disposition="resolved")
    await _offered_once_free(phone, a.database, "erin")
    for client in (phone, tablet):
        await client.close()
    await dana.close()
    await erin.close()


async def test_a_consult_on_b_holds_the_slot_through_the_handover(cluster: StartCluster) -> None:
    a, b = await cluster(JOINED)
    dana, erin, tablet, engagement_id = await _on_b_with_erin_joining(a, b)
    await dana.transfer(engagement_id, to_associate="erin", mode=cuepoint.TransferMode.CONSULT)
    assert (await erin.next_joined(timeout=20)).engagement_id == engagement_id
    # A consult counts against capacity, as alone: the cue on A finds Erin full.
    assert ("erin", engagement_id) in await _holds(a.database)
    phone = await device(a, "phone-a")
    await phone.track("help")
    await phone.flush(timeout=10)
    assert await no_cue(phone)
    # Completed: the consult's slot becomes the owner's in place (the same row), never free in between.
    since = await _held_since(a.database, "erin", engagement_id)
    await dana.complete_transfer(engagement_id)
    assert (await erin.next_engagement(timeout=20)).engagement_id == engagement_id
    await asyncio.sleep(0.3)  # a release and a new hold, as before, would have been stored by now
    assert await _held_since(a.database, "erin", engagement_id) == since
    await phone.track("help")
    await phone.flush(timeout=10)
    assert await no_cue(phone)
    assert await _decisions(a, "phone-a") == ["no_capacity", "no_capacity"]
    await erin.end(engagement_id, disposition="resolved")
    await _offered_once_free(phone, a.database, "erin")
    for client in (phone, tablet):
        await client.close()
    await dana.close()
    await erin.close()
