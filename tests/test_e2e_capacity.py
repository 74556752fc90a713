"""Capacity you can count on (issue 12, item 3): the routed queue and skills, and a slot held per cue.

Real server on port 0, real SDK (devices and associates) over gRPC.
"""

from __future__ import annotations

import cuepoint

from .conftest import StartServer, no_cue, phone

POLICY = """
policy: {require_capacity: true}
routing:
  rules:
    - when: {attribute: user.tier, equals: premium}
      queue: vip
      skills: [billing]
scenarios:
  - id: sync-help
    trigger: {event: sync_failed}
    cue: {message: "Unable to sync?", channel: audio, queue: support, ttl: 10m}
    cooldown: 0s
    after_decline: 0s
"""


async def fail(client: cuepoint.Client) -> None:
    await client.track("sync_failed")
    await client.flush(timeout=10)


async def test_capacity_is_checked_where_routing_sends_the_engagement(start_server: StartServer) -> None:
    server = await start_server(POLICY)
    # Only the base queue is staffed: a premium user's engagement would wait in vip, where nobody serves.
    base = await cuepoint.connect_associate(server.address, associate_id="ann", queues=["support"], skills=["billing"])
    client = await phone(server)
    await fail(client)
    assert await no_cue(client)
    decisions = await server.store.decisions_for_device("phone-1", limit=5)
    assert (decisions[-1].reason, decisions[-1].detail) == (
        "no_capacity",
        "no associate available in queue vip with skills billing",
    )
    # In vip but without the skill: still nobody who can take it.
    unskilled = await cuepoint.connect_associate(server.address, associate_id="bob", queues=["vip"])
    await fail(client)
    assert await no_cue(client)
    # Someone in the routed queue with the skill: offered, and accepted it reaches them.
    vip = await cuepoint.connect_associate(server.address, associate_id="cy", queues=["vip"], skills=["billing"])
    await fail(client)
    engagement = await client.accept(await client.next_cue(timeout=5))
    assigned = await vip.next_engagement(timeout=5)
    assert assigned.engagement_id == engagement.engagement_id
    for c in (client, base, unskilled, vip):
        await c.close()


async def test_one_free_associate_is_never_offered_twice(start_server: StartServer) -> None:
    server = await start_server(POLICY)
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])
    first = await phone(server, "phone-1", tier="basic", user_id="user-1")
    second = await phone(server, "phone-2", tier="basic", user_id="user-2")
    await fail(first)
    cue = await first.next_cue(timeout=5)
    # Dana's one slot is held for the first cue while it is on screen.
    await fail(second)
    assert await no_cue(second)
    decisions = await server.store.decisions_for_device("phone-2", limit=5)
    assert decisions[-1].reason == "no_capacity"
    # Declined: the slot is free again, and the second user can be offered it.
    await first.decline(cue)
    await first.flush(timeout=5)
    await fail(second)
    engagement = await second.accept(await second.next_cue(timeout=5))
    assert (await dana.next_engagement(timeout=5)).engagement_id == engagement.engagement_id
    for c in (first, second, dana):
        await c.close()
