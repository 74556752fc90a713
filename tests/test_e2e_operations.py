"""Contact-center operations end to end: transfer, conference, supervisors, and what each may not do.

Real server on port 0, real SDK clients for the device, the associates and the supervisor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, associate_pb2, associate_pb2_grpc, common_pb2

from .conftest import StartServer, phone
from .test_e2e_engagements import HELP, ask_for_help, associate, eventually

T = TypeVar("T")


async def first(items: AsyncIterator[T], matching: Callable[[T], bool], within: float = 5.0) -> T:
    """The first item of a live feed that matches."""
    async with asyncio.timeout(within):
        async for item in items:
            if matching(item):
                return item
    raise AssertionError("the feed ended before a matching item arrived")


async def test_blind_transfer_to_an_associate_carries_context_transcript_and_channel(
    start_server: StartServer,
) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    await engagement.send_chat("My sync keeps failing")
    await dana.send_chat(assigned, "Let me get a specialist")
    erin = await associate(server, "erin", queues=["billing"])

    dana_events = dana.events()
    await dana.transfer(assigned, to_associate="erin", note="needs billing access")

    # Erin gets it with the context, the journey, the transcript so far and the transfer on record.
    taken = await erin.next_engagement(timeout=5)
    assert taken.engagement_id == assigned.engagement_id
    assert taken.context.context.app_version == assigned.context.context.app_version == "4.2.0"
    assert [e.signal_id for e in taken.context.journey] == [e.signal_id for e in assigned.context.journey]
    assert [(m.sender, m.text) for m in taken.transcript] == [
        (cuepoint.Party.USER, "My sync keeps failing"),
        (cuepoint.Party.ASSOCIATE, "Let me get a specialist"),
    ]
    assert [(t.from_associate_id, t.to_associate_id, t.mode, t.note) for t in taken.transfers] == [
        ("dana", "erin", cuepoint.TransferMode.BLIND, "needs billing access")
    ]
    assert taken.channel is assigned.channel is cuepoint.Channel.AUDIO
    # Dana's part ended as a transfer.
    ended = await first(dana_events, lambda e: isinstance(e, cuepoint.EngagementEnded))
    assert isinstance(ended, cuepoint.EngagementEnded) and ended.disposition == "transferred"
    assert assigned.engagement_id not in dana.active

    # The device sees who it talks to now.
    update = await first(
        engagement.updates(), lambda u: u.state is cuepoint.EngagementState.ASSIGNED and u.associate_name == "Erin"
    )
    assert update.engagement_id == engagement.engagement_id

    # The conversation goes on with Erin; the transcript in storage is one.
    await erin.send_chat(taken, "Hi, Erin from billing here")
    line = await first(engagement.messages(), lambda m: m.text == "Hi, Erin from billing here")
    assert (line.sender, line.sender_id, line.sender_name) == (cuepoint.Party.ASSOCIATE, "erin", "Erin")
    transfers = await server.store.transfers_for(assigned.engagement_id)
    assert [(t.from_associate_id, t.to_associate_id, t.to_queue, t.mode) for t in transfers] == [
        ("dana", "erin", "", "blind")
    ]
    stored = await server.store.get_engagement(assigned.engagement_id)
    assert stored is not None and stored.associate_id == "erin" and stored.state == "assigned"
    await erin.end(taken, disposition="resolved")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    for c in (client, dana, erin):
        await c.close()


async def test_blind_transfer_to_a_queue_routes_there_and_not_back(start_server: StartServer) -> None:
    server = await start_server(HELP)
    # Dana serves both queues: the transfer must not bring the engagement straight back to her.
    dana = await associate(server, "dana", queues=["support", "billing"], capacity=2)
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    await dana.transfer(assigned, to_queue="billing")
    await first(engagement.updates(), lambda u: u.state is cuepoint.EngagementState.QUEUED and u.queue == "billing")
    bob = await associate(server, "bob", queues=["billing"])
    taken = await bob.next_engagement(timeout=5)
    assert taken.engagement_id == assigned.engagement_id and taken.queue == "billing"
    assert [(t.to_queue, t.to_associate_id) for t in taken.transfers] == [("billing", "")]
    for c in (client, dana, bob):
        await c.close()


async def test_consult_then_complete_the_transfer(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    erin = await associate(server, "erin", queues=["billing"])
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    await engagement.send_chat("Can I get a refund?")
    await first(dana.messages(assigned), lambda m: m.text == "Can I get a refund?")

    await dana.transfer(assigned, to_associate="erin", mode=cuepoint.TransferMode.CONSULT, note="refund question")
    consult = await erin.next_joined(timeout=5)
    assert consult.role is cuepoint.ParticipantRole.CONSULT
    assert [m.text for m in consult.transcript] == ["Can I get a refund?"]
    # The consult talks to the associates only: whispers never reach the device.
    await erin.whisper(consult, "Yes, I can take it")
    heard = await first(dana.messages(assigned), lambda m: m.whisper)
    assert (heard.text, heard.sender_id) == ("Yes, I can take it", "erin")
    await dana.complete_transfer(assigned)
    owned = await erin.next_engagement(timeout=5)
    assert owned.engagement_id == assigned.engagement_id and owned.role is cuepoint.ParticipantRole.OWNER
    assert [(t.mode, t.note) for t in owned.transfers] == [(cuepoint.TransferMode.CONSULT, "refund question")]
    await first(
        engagement.updates(), lambda u: u.state is cuepoint.EngagementState.ASSIGNED and u.associate_name == "Erin"
    )
    await erin.send_chat(owned, "Refund issued")
    seen = [m async for m in _until(engagement.messages(), lambda m: m.text == "Refund issued")]
    assert "Yes, I can take it" not in [m.text for m in seen]
    for c in (client, dana, erin):
        await c.close()


async def test_conference_both_see_the_chat_and_each_wraps_up_their_part(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    erin = await associate(server, "erin", queues=["billing"])
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    await dana.add_participant(assigned, "erin")
    joined = await erin.next_joined(timeout=5)
    assert joined.role is cuepoint.ParticipantRole.CONFERENCE
    assert joined.context.context.device_model == "iPhone15,2"

    await engagement.send_chat("Hello both")
    for side in (dana.messages(assigned), erin.messages(joined)):
        await first(side, lambda m: m.text == "Hello both")
    await erin.send_chat(joined, "Erin here too")
    from_erin = await first(engagement.messages(), lambda m: m.text == "Erin here too")
    assert from_erin.sender_name == "Erin"
    await first(dana.messages(assigned), lambda m: m.text == "Erin here too")

    # Erin wraps up her part; the engagement goes on with Dana.
    erin_events = erin.events()
    await erin.leave(joined, disposition="advised", notes="explained the plan")
    left = await first(erin_events, lambda e: isinstance(e, cuepoint.EngagementEnded))
    assert isinstance(left, cuepoint.EngagementEnded) and left.disposition == "advised"
    await server.core.drain()
    parts = await server.store.participations_for(assigned.engagement_id)
    assert [(p.associate_id, p.role, p.disposition, p.left_at is not None) for p in parts] == [
        ("erin", "conference", "advised", True)
    ]
    stored = await server.store.get_engagement(assigned.engagement_id)
    assert stored is not None and stored.state == "assigned" and stored.associate_id == "dana"
    await dana.end(assigned, disposition="resolved")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    for c in (client, dana, erin):
        await c.close()


async def test_supervisor_sees_queues_live_monitors_whispers_and_barges_in(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    sup = await associate(server, "sam", queues=["supervisors"], supervised_queues=["support"])
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)

    snapshot = await first(
        sup.supervised(), lambda s: s.engagement_id == assigned.engagement_id and s.associate_id == "dana"
    )
    assert snapshot.queue == "support" and snapshot.state is cuepoint.EngagementState.ASSIGNED

    await sup.monitor(assigned.engagement_id)
    watched = await sup.next_joined(timeout=5)
    assert watched.role is cuepoint.ParticipantRole.MONITOR and watched.engagement_id == assigned.engagement_id
    await engagement.send_chat("Still broken")
    await first(sup.messages(watched), lambda m: m.text == "Still broken")

    # A whisper reaches Dana, not the user.
    await sup.whisper(watched, "Offer the premium fix")
    whispered = await first(dana.messages(assigned), lambda m: m.whisper)
    assert (whispered.text, whispered.sender_id) == ("Offer the premium fix", "sam")

    # Barge in: the user is told, and sees the supervisor's messages.
    await sup.barge(assigned.engagement_id)
    await first(engagement.messages(), lambda m: m.sender is cuepoint.Party.SYSTEM and "Sam" in m.text)
    barged = await sup.next_joined(timeout=5)
    assert barged.role is cuepoint.ParticipantRole.BARGE
    await sup.send_chat(barged, "I'm Dana's supervisor")
    seen = [m async for m in _until(engagement.messages(), lambda m: m.text == "I'm Dana's supervisor")]
    assert "Offer the premium fix" not in [m.text for m in seen]

    # Every supervision step is on record, in order.
    await server.core.drain()
    parts = await server.store.participations_for(assigned.engagement_id)
    assert [(p.associate_id, p.role) for p in parts] == [("sam", "monitor"), ("sam", "barge")]
    # Subscribed before the wrap-up is sent, so the supervisor's EngagementEnded cannot arrive unseen.
    sup_events = sup.events()
    await dana.end(assigned, disposition="resolved")
    ended = await first(
        sup_events, lambda e: isinstance(e, cuepoint.EngagementEnded) and e.engagement_id == assigned.engagement_id
    )
    assert isinstance(ended, cuepoint.EngagementEnded)
    for c in (client, dana, sup):
        await c.close()


async def test_supervision_is_in_the_audit_trail_allowed_or_refused(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    sam = await associate(server, "sam", queues=["supervisors"], supervised_queues=["support"])
    client = await phone(server)
    await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    target = f"engagement:{assigned.engagement_id}"

    await sam.monitor(assigned.engagement_id)
    watched = await sam.next_joined(timeout=5)
    await sam.whisper(watched, "Offer the premium fix")
    await first(dana.messages(assigned), lambda m: m.whisper)
    await sam.barge(assigned.engagement_id)
    await sam.next_joined(timeout=5)
    # A supervisor of another queue is refused, and the attempt is on record too.
    vic = associate_pb2.SignIn(associate_id="vic", queues=["other"], supervised_queues=["other"])
    refused = await _refused(
        server,
        vic,
        associate_pb2.AssociateMessage(whisper=associate_pb2.Whisper(engagement_id=assigned.engagement_id, text="x")),
    )
    assert refused is grpc.StatusCode.PERMISSION_DENIED

    async with grpc.aio.insecure_channel(server.address) as channel:
        listed = await admin_pb2_grpc.AdminServiceStub(channel).ListAuditEntries(
            admin_pb2.ListAuditEntriesRequest(limit=50)
        )
    entries = [
        (e.actor, e.action, e.target, e.outcome, json.loads(e.after_json))
        for e in reversed(listed.entries)  # newest first on the wire
        if e.action.startswith("engagement.")
    ]
    ok, denied = admin_pb2.AUDIT_OUTCOME_OK, admin_pb2.AUDIT_OUTCOME_DENIED
    assert entries == [
        ("associate:sam", "engagement.monitor", target, ok, {"queue": "support"}),
        ("associate:sam", "engagement.whisper", target, ok, {"queue": "support", "as": "monitor", "chars": 21}),
        ("associate:sam", "engagement.barge", target, ok, {"queue": "support"}),
        ("associate:vic", "engagement.whisper", target, denied, {}),
    ]
    # The whisper's words are not kept in the trail.
    assert all("premium" not in e.after_json + e.detail for e in listed.entries)
    for c in (client, dana, sam):
        await c.close()


async def _until(items: AsyncIterator[T], last: Callable[[T], bool], within: float = 5.0) -> AsyncIterator[T]:
    async with asyncio.timeout(within):
        async for item in items:
            yield item
            if last(item):
                return


# -- what each may not do: a clear status, and nothing changes ---------------------------------


async def _refused(server: Any, sign_in: associate_pb2.SignIn, then: associate_pb2.AssociateMessage) -> grpc.StatusCode:
    async def messages() -> AsyncIterator[associate_pb2.AssociateMessage]:
        yield associate_pb2.AssociateMessage(sign_in=sign_in)
        yield then
        await asyncio.sleep(5)

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = associate_pb2_grpc.AssociateServiceStub(channel).Connect(messages())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
        return raised.value.code()


@pytest.mark.parametrize(
    ("sign_in", "message"),
    [
        pytest.param(
            associate_pb2.SignIn(associate_id="mallory", queues=["other"]),
            lambda e: associate_pb2.AssociateMessage(
                transfer=associate_pb2.TransferEngagement(engagement_id=e, to_queue="other")
            ),
            id="transfer-someone-elses",
        ),
        pytest.param(
            associate_pb2.SignIn(associate_id="mallory", queues=["other"]),
            lambda e: associate_pb2.AssociateMessage(
                add_participant=associate_pb2.AddParticipant(engagement_id=e, associate_id="mallory")
            ),
            id="join-someone-elses",
        ),
        pytest.param(
            associate_pb2.SignIn(associate_id="vic", queues=["other"], supervised_queues=["other"]),
            lambda e: associate_pb2.AssociateMessage(monitor=associate_pb2.MonitorEngagement(engagement_id=e)),
            id="monitor-another-queue",
        ),
        pytest.param(
            associate_pb2.SignIn(associate_id="vic", queues=["other"], supervised_queues=["other"]),
            lambda e: associate_pb2.AssociateMessage(whisper=associate_pb2.Whisper(engagement_id=e, text="psst")),
            id="whisper-another-queue",
        ),
        pytest.param(
            associate_pb2.SignIn(associate_id="vic", queues=["other"], supervised_queues=["other"]),
            lambda e: associate_pb2.AssociateMessage(barge=associate_pb2.BargeIn(engagement_id=e)),
            id="barge-another-queue",
        ),
    ],
)
async def test_operations_on_engagements_that_are_not_yours_are_refused(
    start_server: StartServer, sign_in: associate_pb2.SignIn, message: Callable[[str], Any]
) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)

    assert await _refused(server, sign_in, message(assigned.engagement_id)) is grpc.StatusCode.PERMISSION_DENIED

    await server.core.drain()
    stored = await server.store.get_engagement(assigned.engagement_id)
    assert stored is not None and (stored.state, stored.associate_id, stored.queue) == ("assigned", "dana", "support")
    assert await server.store.transfers_for(assigned.engagement_id) == []
    assert await server.store.participations_for(assigned.engagement_id) == []
    # Dana and the user carry on.
    await dana.send_chat(assigned, "Still here")
    await first(engagement.messages(), lambda m: m.text == "Still here")
    await client.close()
    await dana.close()


async def test_malformed_transfers_name_the_field(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana_pb = associate_pb2.SignIn(associate_id="dana", queues=["support"])
    client = await phone(server)
    # Dana's own engagement, over raw stubs so the SDK's local checks do not stop the bad message first.
    queue: asyncio.Queue[associate_pb2.AssociateMessage] = asyncio.Queue()

    async def messages() -> AsyncIterator[associate_pb2.AssociateMessage]:
        yield associate_pb2.AssociateMessage(sign_in=dana_pb)
        while True:
            yield await queue.get()

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = associate_pb2_grpc.AssociateServiceStub(channel).Connect(messages())
        await ask_for_help(client)
        async with asyncio.timeout(5):
            async for event in call:
                if event.WhichOneof("kind") == "assigned":
                    engagement_id = event.assigned.engagement_id
                    break
        both = associate_pb2.TransferEngagement(engagement_id=engagement_id, to_associate_id="x", to_queue="y")
        await queue.put(associate_pb2.AssociateMessage(transfer=both))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "transfer.to_queue" in (raised.value.details() or "")

    async def unchanged() -> bool:
        stored = await server.store.get_engagement(engagement_id)
        # Dana's stream ended, so the engagement went back to its queue: not transferred anywhere.
        return stored is not None and stored.queue == "support"

    await eventually(unchanged)
    assert await server.store.transfers_for(engagement_id) == []
    await client.close()


# -- associate-initiated engagement --------------------------------------------------------


async def test_an_associate_invites_a_struggling_device_and_gets_the_engagement(start_server: StartServer) -> None:
    server = await start_server(HELP)
    # Erin has been idle longer: without the invitation, routing would pick her.
    erin = await associate(server, "erin")
    dana = await associate(server, "dana")
    client = await phone(server)
    await client.track("checkout_error")
    await client.flush()

    result = await dana.invite(
        "phone-1", cuepoint.Channel.CHAT, "Need a hand with checkout?", reason="three checkout errors in live now"
    )
    assert result.invited and result.blocked_reason == ""
    cue = await client.next_cue(timeout=5)
    assert (cue.cue_id, cue.message, cue.channel) == (
        result.cue_id,
        "Need a hand with checkout?",
        cuepoint.Channel.CHAT,
    )

    engagement = await client.accept(cue)
    taken = await dana.next_engagement(timeout=5)
    assert (
        taken.engagement_id == (await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)).engagement_id
    )
    assert taken.context.trigger is not None
    assert [(c.path, c.description) for c in taken.context.trigger.conditions] == [
        ("invitation", "Dana invited the user: three checkout errors in live now")
    ]
    assert not erin.active
    await server.core.drain()
    stored = await server.store.get_cue(result.cue_id)
    assert stored is not None and stored.scenario_id == "@invitation"
    assert (
        stored.explanation["invited_by"] == "dana"
        and stored.explanation["reason"] == "three checkout errors in live now"
    )
    for c in (client, dana, erin):
        await c.close()


async def test_invitations_face_the_same_policy(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    # A cue is already on screen: one thing at a time.
    await client.track("help")
    await client.flush()
    cue = await client.next_cue(timeout=5)
    busy = await dana.invite("phone-1", cuepoint.Channel.CHAT, "Hello?", reason="test")
    assert (busy.invited, busy.blocked_reason) == (False, "cue_pending")

    # Declined once: not invited again this session.
    await client.decline(cue)
    other = await phone(server, "phone-2", user_id="user-2")
    first_try = await dana.invite("phone-2", cuepoint.Channel.CHAT, "Hello?", reason="test")
    assert first_try.invited
    invited = await other.next_cue(timeout=5)
    await other.decline(invited)
    # The decline travels on the device's stream, the next invitation on the associate's: wait until the
    # server has taken the answer (stored after it is settled in memory), or the cue still counts as pending.
    for _ in range(250):
        stored = await server.store.get_cue(invited.cue_id)
        if stored is not None and stored.status == "declined":
            break
        await asyncio.sleep(0.02)
    again = await dana.invite("phone-2", cuepoint.Channel.CHAT, "Hello again?", reason="test")
    assert (again.invited, again.blocked_reason) == (False, "declined")

    # The emergency pause stops people's cues as it stops scenarios'.
    server.core.paused_by_admin = True
    third = await phone(server, "phone-3", user_id="user-3")
    paused = await dana.invite("phone-3", cuepoint.Channel.CHAT, "Hello?", reason="test")
    assert (paused.invited, paused.blocked_reason) == (False, "paused")
    assert await no_cue_within(third)

    await server.core.drain()
    decisions = await server.store.decisions_for_device("phone-2")
    assert [(d.scenario_id, d.outcome, d.reason) for d in decisions if d.scenario_id == "@invitation"] == [
        ("@invitation", "offered", "invited"),
        ("@invitation", "blocked", "declined"),
    ]
    for c in (client, other, third, dana):
        await c.close()


async def no_cue_within(client: cuepoint.Client) -> bool:
    try:
        await client.next_cue(timeout=0.2)
    except cuepoint.TimedOut:
        return True
    return False


async def test_inviting_a_device_that_is_not_connected_names_the_field(start_server: StartServer) -> None:
    server = await start_server(HELP)
    refused = await _refused(
        server,
        associate_pb2.SignIn(associate_id="dana", queues=["support"]),
        associate_pb2.AssociateMessage(
            invite=associate_pb2.InviteDevice(
                device_id="ghost", channel=common_pb2.CHANNEL_CHAT, message="Hi", reason="r"
            )
        ),
    )
    assert refused is grpc.StatusCode.INVALID_ARGUMENT
