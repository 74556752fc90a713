"""What the desk shows, over gRPC too: the routing rule behind an engagement, the user's earlier cues, the
longest wait per queue in live now, and the outcome an associate records at wrap-up (stored, in the funnel).

Real server on port 0, real SDK (device and associate), raw stubs where the SDK has no call; manual clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, associate_pb2, associate_pb2_grpc
from cuepoint_server.clock import ManualClock

from .conftest import StartServer

HELP = """
scenarios:
  - id: sync-help
    trigger: {event: sync_failed}
    cue: {message: "Sync trouble? I can help.", channel: chat, ttl: 2m, queue: support}
routing:
  queues:
    - id: support
    - id: vip
      outcomes:
        - {id: fixed, label: "Fixed", success: true}
        - {id: gave_up, label: "Gave up"}
  rules:
    - when: {attribute: app.version, version_lt: "4.0"}
      queue: support
    - name: vips to the vip desk
      scenarios: [sync-help]
      when: {all: [{attribute: user.tier, equals: vip}, {attribute: device.os, equals: iOS}]}
      queue: vip
      priority: 5
"""


async def phone(server: object, device_id: str, tier: str) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,  # type: ignore[attr-defined]
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS", os_version="17.4", device_model="iPhone15,2"),
        user=cuepoint.User(user_id=f"user-{device_id}", tier=tier),
        consent=cuepoint.Consent.FULL,
    )


async def fail(client: cuepoint.Client) -> cuepoint.Cue:
    await client.track("sync_failed", reason="timeout")
    await client.flush()
    return await client.next_cue(timeout=5)


async def live(server: object) -> admin_pb2.ListLiveSessionsResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:  # type: ignore[attr-defined]
        return await admin_pb2_grpc.AdminServiceStub(channel).ListLiveSessions(admin_pb2.ListLiveSessionsRequest())


async def test_the_routing_rule_earlier_cues_and_longest_wait_reach_grpc(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(HELP)
    client = await phone(server, "vip-1", "vip")
    await client.decline(await fail(client))
    await client.close()
    clock.advance(3600)  # a new session: the decline is remembered for the session only
    client = await phone(server, "vip-1", "vip")
    engagement = await client.accept(await fail(client))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)

    # Nobody serves the vip queue yet: live now says how long its engagement has waited.
    clock.advance(42)
    queues = {q.queue: q for q in (await live(server)).queues}
    assert queues["vip"].waiting == 1
    assert queues["vip"].longest_wait.ToTimedelta().total_seconds() == pytest.approx(42, abs=0.01)
    assert not queues.get("support") or queues["support"].longest_wait.ToNanoseconds() == 0

    associate = await cuepoint.connect_associate(server.address, associate_id="vera", queues=["vip"])
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.queue == "vip"
    rule = assigned.context.routing_rule
    assert rule is not None
    # The second rule, by its name and where it is written; the first (app version) did not hold.
    assert (rule.index, rule.name, rule.queue, rule.priority) == (1, "vips to the vip desk", "vip", 5)
    assert rule.file.endswith("s0.yaml") and rule.line > 1
    held = " ".join(c.description for c in rule.conditions)
    assert "user.tier" in held and "vip" in held and "device.os" in held
    assert all(c.path.startswith("routing.rules[1].when") for c in rule.conditions)
    assert assigned.context.priority == 5
    # The earlier cue of this user, and how it ended.
    assert [(c.scenario_id, c.status) for c in assigned.context.prior_cues] == [("sync-help", "declined")]
    await associate.close()
    await client.close()


async def test_a_premium_user_falls_through_to_the_scenario_queue_with_no_rule(start_server: StartServer) -> None:
    server = await start_server(HELP)
    client = await phone(server, "std-1", "standard")
    await client.accept(await fail(client))
    associate = await cuepoint.connect_associate(server.address, associate_id="sam", queues=["support"])
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.queue == "support" and assigned.context.routing_rule is None
    assert assigned.context.prior_cues == ()
    await associate.close()
    await client.close()


async def _connect(
    server: object, outgoing: asyncio.Queue[associate_pb2.AssociateMessage]
) -> AsyncIterator[associate_pb2.AssociateEvent]:
    async def messages() -> AsyncIterator[associate_pb2.AssociateMessage]:
        while True:
            yield await outgoing.get()

    async with grpc.aio.insecure_channel(server.address) as channel:  # type: ignore[attr-defined]
        async for event in associate_pb2_grpc.AssociateServiceStub(channel).Connect(messages()):
            yield event


async def test_the_outcome_recorded_at_wrap_up_is_checked_stored_and_counted(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(HELP)
    client = await phone(server, "vip-2", "vip")
    engagement = await client.accept(await fail(client))

    # An outcome the queue does not offer: INVALID_ARGUMENT naming the field, and nothing is wrapped up.
    outgoing: asyncio.Queue[associate_pb2.AssociateMessage] = asyncio.Queue()
    sign_in = associate_pb2.SignIn(associate_id="vera", queues=["vip"])
    outgoing.put_nowait(associate_pb2.AssociateMessage(sign_in=sign_in))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with asyncio.timeout(5):
            async for event in _connect(server, outgoing):
                if event.HasField("assigned"):
                    end = associate_pb2.EndEngagement(
                        engagement_id=event.assigned.engagement_id, disposition="done", outcome="resolved"
                    )
                    outgoing.put_nowait(associate_pb2.AssociateMessage(end=end))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "end.outcome" in (refused.value.details() or "") and "fixed" in (refused.value.details() or "")

    # Back in the queue; the next associate records one of the queue's outcomes.
    associate = await cuepoint.connect_associate(server.address, associate_id="walt", queues=["vip"])
    assigned = await associate.next_engagement(timeout=5)
    await associate.end(assigned, disposition="done", notes="reset the token", outcome="fixed")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await server.core.drain()

    stored = await server.core.store.get_engagement(assigned.engagement_id)
    assert stored is not None
    assert (stored.disposition, stored.wrap_up_outcome, stored.wrap_up_success) == ("done", "fixed", True)
    async with grpc.aio.insecure_channel(server.address) as channel:
        found = await admin_pb2_grpc.AdminServiceStub(channel).GetFunnel(admin_pb2.GetFunnelRequest())
    (row,) = found.rows
    # Not resolved by disposition, but the outcome the associate recorded counts as success.
    assert (row.engaged, row.resolved, row.outcome) == (1, 0, 1)
    assert dict(row.wrap_up_outcomes) == {"fixed": 1}

    # The user's next engagement shows what was recorded on the earlier one.
    await client.close()
    clock.advance(3600)  # a new session: nothing more is offered in a session that had an engagement
    again = await phone(server, "vip-2", "vip")
    next_cue = await fail(again)
    await again.accept(next_cue)
    later = await associate.next_engagement(timeout=5)
    assert [p.wrap_up_outcome for p in later.context.prior_engagements] == ["fixed"]
    await associate.close()
    await again.close()
