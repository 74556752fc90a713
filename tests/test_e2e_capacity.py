"""Capacity you can count on (issue 12, item 3): the routed queue and skills, and a slot held per cue.

Real server on port 0, real SDK (devices and associates) over gRPC.
"""

from __future__ import annotations

import asyncio

import pytest

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
    # The device hears of its engagement on its own stream, in no fixed order with the associate's: read its
    # id once the device has it, not the moment the associate does.
    on_device = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert assigned.engagement_id == on_device.engagement_id == engagement.engagement_id
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
    # The decline travels on the first device's stream, the second's signal on its own: wait until the server
    # has taken the answer and, where slots are shared in storage (PostgreSQL), given back the one it held, or
    # the second user's offer may be judged while it is still held.
    for _ in range(250):
        stored = await server.store.get_cue(cue.cue_id)
        held = [key for _, key, _ in await server.store.slot_holds()]
        if stored is not None and stored.status == "declined" and cue.cue_id not in held:
            break
        await asyncio.sleep(0.02)
    await fail(second)
    engagement = await second.accept(await second.next_cue(timeout=5))
    taken = await dana.next_engagement(timeout=5)
    # The device may hear of its engagement after Dana does: compare once it has.
    assigned = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert taken.engagement_id == assigned.engagement_id
    for c in (first, second, dana):
        await c.close()


# -- capacity per channel (issue 18, item 6) ----------------------------------------------------

CHANNELS = """
scenarios:
  - id: chat-help
    trigger: {event: chat_help}
    cue: {message: "Chat with us?", channel: chat, queue: support, ttl: 10m}
  - id: call-help
    trigger: {event: call_help}
    cue: {message: "Call us?", channel: audio, queue: support, ttl: 10m}
"""


async def ask(server: object, n: int, event: str) -> tuple[cuepoint.Client, cuepoint.Engagement]:
    client = await phone(server, f"phone-{event}-{n}", user_id=f"user-{event}-{n}")  # type: ignore[arg-type]
    await client.track(event)
    await client.flush(timeout=10)
    engagement = await client.accept(await client.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    return client, engagement


async def test_three_chats_or_one_call_routing_honours_each_channel(start_server: StartServer) -> None:
    server = await start_server(CHANNELS)
    ann = await cuepoint.connect_associate(
        server.address,
        associate_id="ann",
        queues=["support"],
        channel_capacity={cuepoint.Channel.CHAT: 3, cuepoint.Channel.AUDIO: 1},
    )
    chats = [await ask(server, i, "chat_help") for i in range(4)]
    taken = [await ann.next_engagement(timeout=5) for _ in range(3)]
    assert {t.engagement_id for t in taken} == {e.engagement_id for _, e in chats[:3]}
    assert all(t.channel is cuepoint.Channel.CHAT for t in taken)
    call = await ask(server, 0, "call_help")
    # Neither a fourth chat nor a call reaches her while three chats are held: both wait in line.
    with pytest.raises(cuepoint.TimedOut):
        await ann.next_engagement(timeout=0.3)
    for _, waiting in (chats[3], call):
        stored = await server.store.get_engagement(waiting.engagement_id)
        assert stored is not None and (stored.state, stored.associate_id) == ("queued", "")

    # One chat ends: the fourth chat (first in line) fits; the call still does not join chats.
    await ann.end(taken[0], disposition="resolved")
    fourth = await ann.next_engagement(timeout=5)
    assert fourth.engagement_id == chats[3][1].engagement_id
    with pytest.raises(cuepoint.TimedOut):
        await ann.next_engagement(timeout=0.3)
    # Down to one chat: two slots are free, yet a call is taken alone.
    for t in taken[1:]:
        await ann.end(t, disposition="resolved")
    with pytest.raises(cuepoint.TimedOut):
        await ann.next_engagement(timeout=0.3)
    stored_call = await server.store.get_engagement(call[1].engagement_id)
    assert stored_call is not None and stored_call.state == "queued"
    # Every chat done: the call comes.
    await ann.end(fourth, disposition="resolved")
    on_call = await ann.next_engagement(timeout=5)
    assert (on_call.engagement_id, on_call.channel) == (call[1].engagement_id, cuepoint.Channel.AUDIO)
    for c in (*(c for c, _ in chats), call[0], ann):
        await c.close()


UPGRADABLE = """
scenarios:
  - id: chat-help
    trigger: {event: chat_help}
    cue: {message: "Chat with us?", channel: chat, upgrades: [audio], queue: support, ttl: 10m}
"""


async def test_a_chat_upgraded_to_a_call_counts_as_a_call(start_server: StartServer) -> None:
    server = await start_server(UPGRADABLE)
    ann = await cuepoint.connect_associate(
        server.address,
        associate_id="ann",
        queues=["support"],
        channel_capacity={cuepoint.Channel.CHAT: 3, cuepoint.Channel.AUDIO: 1},
    )
    first_client, first = await ask(server, 0, "chat_help")
    taken = await ann.next_engagement(timeout=5)
    requested = asyncio.ensure_future(ann.request_upgrade(taken, cuepoint.Channel.AUDIO, timeout=5))
    async with asyncio.timeout(5):
        request = await anext(aiter(first.upgrade_requests()))
    await first.respond_upgrade(request, True)
    assert (await requested).accepted
    # On a call now: another chat waits, though two chat slots look free.
    second_client, second = await ask(server, 1, "chat_help")
    with pytest.raises(cuepoint.TimedOut):
        await ann.next_engagement(timeout=0.3)
    await ann.end(taken, disposition="resolved")
    assert (await ann.next_engagement(timeout=5)).engagement_id == second.engagement_id
    for c in (first_client, second_client, ann):
        await c.close()


QUEUE_LIMITS = """
policy: {require_capacity: true}
routing:
  queues:
    - {id: support, channel_capacity: {audio: 1}}
scenarios:
  - id: chat-help
    trigger: {event: chat_help}
    cue: {message: "Chat with us?", channel: chat, queue: support, ttl: 10m}
  - id: call-help
    trigger: {event: call_help}
    cue: {message: "Call us?", channel: audio, queue: support, ttl: 10m}
"""


async def test_a_queues_channel_limit_and_require_capacity(start_server: StartServer) -> None:
    server = await start_server(QUEUE_LIMITS)
    # Capacity 3, no limits of her own: the queue says a call of it is taken alone.
    ann = await cuepoint.connect_associate(server.address, associate_id="ann", queues=["support"], capacity=3)
    chat_client, _ = await ask(server, 0, "chat_help")
    await ann.next_engagement(timeout=5)

    caller = await phone(server, "phone-caller", user_id="user-caller")
    await caller.track("call_help")
    await caller.flush(timeout=10)
    assert await no_cue(caller)  # a call would not fit beside the chat: not offered at all
    decisions = await server.store.decisions_for_device("phone-caller", limit=5)
    assert (decisions[-1].scenario_id, decisions[-1].reason) == ("call-help", "no_capacity")
    # Another chat still fits (two of three slots).
    second_chat, _ = await ask(server, 1, "chat_help")
    await ann.next_engagement(timeout=5)
    for c in (chat_client, caller, second_chat, ann):
        await c.close()


async def test_bad_channel_limits_name_the_field(start_server: StartServer) -> None:
    server = await start_server(CHANNELS)
    with pytest.raises(cuepoint.InvalidSignal) as local:
        await cuepoint.connect_associate(
            server.address, associate_id="ann", channel_capacity={cuepoint.Channel.CHAT: 0}
        )
    assert local.value.field == "sign_in.channel_capacity"
