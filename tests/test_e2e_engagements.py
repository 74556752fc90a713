"""Issue 4 end to end: routing, associates, full context, channels, wrap-up, identity."""

from __future__ import annotations

import asyncio

import cuepoint
from cuepoint_server.clock import ManualClock

from .conftest import StartServer, no_cue, phone

HELP = """
id: help
priority: 10
trigger: {event: help}
cue: {message: "Need help?", channel: audio, upgrades: [screen_share, chat], queue: support}
"""


async def ask_for_help(client: cuepoint.Client) -> cuepoint.Engagement:
    await client.track("help")
    await client.flush()
    engagement = await client.accept(await client.next_cue(timeout=5))
    # The server has created (and maybe assigned) it: clock moves now count from here.
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    return engagement


async def eventually(check: object, within: float = 5.0) -> None:
    """Poll an async check (storage is written by background tasks) within a bound."""
    async with asyncio.timeout(within):
        while not await check():  # type: ignore[operator]  # noqa: ASYNC110 - state lives in SQLite
            await asyncio.sleep(0.01)


async def associate(server: object, associate_id: str, **kwargs: object) -> cuepoint.AssociateClient:
    kwargs.setdefault("queues", ["support"])
    return await cuepoint.connect_associate(
        server.address,  # type: ignore[attr-defined]
        associate_id=associate_id,
        display_name=associate_id.title(),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_routing_rules_on_an_outcome_probability_score(start_server: StartServer) -> None:
    server = await start_server(
        HELP.replace("queue: support", "queue: sales"),
        """
routing:
  rules:
    - when: {attribute: attributes.outcome_probability, lt: 0.2}
      queue: bot
    - when: {attribute: attributes.outcome_probability, gte: 0.2}
      queue: sales_closers_tier2
      priority: 50
""",
    )
    bot = await associate(server, "bot", queues=["bot"])
    closer = await associate(server, "closer", queues=["sales_closers_tier2"])
    unlikely, likely = [
        await cuepoint.connect(
            server.address,
            app_id="shop",
            device_id=f"d-{p}",
            context=cuepoint.Context(attributes={"outcome_probability": p}),
        )
        for p in (0.1, 0.7)
    ]
    await ask_for_help(unlikely)
    await ask_for_help(likely)
    to_bot = await bot.next_engagement(timeout=5)
    to_closer = await closer.next_engagement(timeout=5)
    assert (to_bot.context.device_id, to_bot.queue, to_bot.context.priority) == ("d-0.1", "bot", 0)
    assert (to_closer.context.device_id, to_closer.queue, to_closer.context.priority) == (
        "d-0.7",
        "sales_closers_tier2",
        50,
    )
    for c in (unlikely, likely, bot, closer):
        await c.close()


async def test_priority_skills_presence_capacity_and_longest_idle(start_server: StartServer) -> None:
    server = await start_server(
        HELP,
        HELP.replace("id: help", "id: vip")
        .replace("{event: help}", "{event: vip}")
        .replace("queue: support}", "queue: support, priority: 50, skills: [spanish]}"),
    )
    plain, vip = await phone(server, "plain", user_id="u1"), await phone(server, "vip", user_id="u2")
    await ask_for_help(plain)
    await vip.track("vip")
    await vip.flush()
    await vip.accept(await vip.next_cue(timeout=5))

    # No Spanish: only the plain engagement is eligible; the VIP one waits despite its priority.
    monolingual = await associate(server, "mono")
    assert (await monolingual.next_engagement(timeout=5)).context.device_id == "plain"
    # Busy associates take nothing; becoming available drains the queue, best priority first.
    bilingual = await associate(server, "bilingual", skills=["spanish"], presence=cuepoint.Presence.BUSY, capacity=2)
    await asyncio.sleep(0.1)
    assert not bilingual.offers_pending and not bilingual.active
    await bilingual.set_presence(cuepoint.Presence.AVAILABLE)
    got = await bilingual.next_engagement(timeout=5)
    assert (got.context.device_id, got.context.priority) == ("vip", 50)
    for c in (plain, vip, monolingual, bilingual):
        await c.close()


async def test_longest_idle_associate_gets_the_next_engagement(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(HELP)
    first = await associate(server, "first")
    clock.advance(10)
    second = await associate(server, "second")
    one = await phone(server, "one", user_id="u1")
    await ask_for_help(one)
    taken = await first.next_engagement(timeout=5)  # idle the longest
    clock.advance(10)
    await first.end(taken)
    two = await phone(server, "two", user_id="u2")
    await ask_for_help(two)
    assert (await second.next_engagement(timeout=5)).context.device_id == "two"
    for c in (one, two, first, second):
        await c.close()


async def test_manual_claim_reject_and_offer_timeout(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(HELP, "routing: {queues: [{id: support, offer_timeout: 20s}]}\n")
    amy = await associate(server, "amy", manual_claim=True)
    clock.advance(1)
    ben = await associate(server, "ben", manual_claim=True)
    clock.advance(1)
    cat = await associate(server, "cat", manual_claim=True)
    client = await phone(server)
    engagement = await ask_for_help(client)

    offer = await amy.next_offer(timeout=5)  # longest idle first
    await amy.reject(offer, reason="on a call")
    offer = await ben.next_offer(timeout=5)  # rejected: the next associate
    clock.advance(21)  # ben lets it lapse: the next one again
    offer = await cat.next_offer(timeout=5)
    claimed = await cat.claim(offer)
    assert claimed.engagement_id == engagement.engagement_id
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert engagement.associate_name == "Cat"
    for c in (client, amy, ben, cat):
        await c.close()


async def test_nobody_available_offers_callback_or_chat(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(HELP, "routing: {queues: [{id: support, fallback_after: 2m}]}\n")
    caller = await phone(server, "caller", user_id="u1")
    engagement = await ask_for_help(caller)
    clock.advance(121)
    offer = await engagement.wait_fallback(timeout=5)
    assert set(offer.options) == {
        cuepoint.FallbackOption.CALLBACK,
        cuepoint.FallbackOption.CHAT,
        cuepoint.FallbackOption.CANCEL,
    }
    # Called back in an hour (tests/test_e2e_callbacks.py follows it there); meanwhile it takes nobody.
    await engagement.choose_fallback(
        cuepoint.FallbackOption.CALLBACK, phone_number="+1 555 0100", callback_at=clock.now() + 3600
    )
    update = await engagement.wait_for(cuepoint.EngagementState.CALLBACK_REQUESTED, timeout=5)
    assert update.state is cuepoint.EngagementState.CALLBACK_REQUESTED
    stored = await server.store.get_engagement(engagement.engagement_id)
    assert stored is not None and stored.state == "callback_requested" and "+1 555 0100" in stored.notes

    chatter = await phone(server, "chatter", user_id="u2")
    other = await ask_for_help(chatter)
    clock.advance(121)
    await other.wait_fallback(timeout=5)
    await other.choose_fallback(cuepoint.FallbackOption.CHAT)
    late = await associate(server, "late")
    assigned = await late.next_engagement(timeout=5)
    assert assigned.engagement_id == other.engagement_id and assigned.channel is cuepoint.Channel.CHAT
    for c in (caller, chatter, late):
        await c.close()


async def test_full_context_with_prior_engagements_and_redaction(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id="phone-1",
        context=cuepoint.Context(
            app_version="4.2.0",
            os="iOS",
            os_version="17.4",
            device_model="iPhone15,2",
            location=cuepoint.Location(country="US", city="Chicago"),
        ),
        user=cuepoint.User(user_id="u-7", tier="premium", attributes={"email": "sam@example.com"}),
        consent=cuepoint.Consent.ESSENTIAL,
    )
    first = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    await dana.end(assigned, disposition="resolved", notes="reset token")
    await first.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await client.close()

    again = await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id="phone-1",
        context=cuepoint.Context(
            app_version="4.2.1", os="iOS", device_model="iPhone15,2", location=cuepoint.Location(country="US")
        ),
        user=cuepoint.User(user_id="u-7", tier="premium", attributes={"email": "sam@example.com"}),
        consent=cuepoint.Consent.ESSENTIAL,
    )
    await ask_for_help(again)
    ctx = (await dana.next_engagement(timeout=5)).context
    assert (ctx.context.app_version, ctx.context.location.country if ctx.context.location else None) == ("4.2.1", "US")
    assert "user.email" in ctx.redacted_fields and (ctx.user is None or "email" not in ctx.user.attributes)
    assert [(p.engagement_id, p.disposition, p.notes) for p in ctx.prior_engagements] == [
        (first.engagement_id, "resolved", "reset token")
    ]
    assert ctx.trigger is not None and ctx.trigger.conditions[0].description.startswith("last help")
    assert [e.name for e in ctx.journey].count("help") == 2
    await again.close()
    await dana.close()


async def test_chat_upgrades_and_call_signalling(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)

    # Chat both ways, one ordered transcript on both sides and in storage.
    await engagement.send_chat("My sync keeps failing")
    await dana.send_chat(assigned, "Let's look at it together")
    async with asyncio.timeout(5):
        device_side = [m async for m in _take(engagement.messages(), 2)]
        associate_side = [m async for m in _take(dana.messages(assigned), 2)]
    expected = [(cuepoint.Party.USER, "My sync keeps failing"), (cuepoint.Party.ASSOCIATE, "Let's look at it together")]
    assert [(m.sender, m.text) for m in device_side] == expected
    assert [(m.sender, m.text) for m in associate_side] == expected
    stored = await server.store.chat_transcript(engagement.engagement_id)
    assert [(m.sender, m.text) for m in stored] == [("user", expected[0][1]), ("associate", expected[1][1])]

    # The associate asks for screen share; the user must consent.
    requested = asyncio.ensure_future(dana.request_upgrade(assigned, cuepoint.Channel.SCREEN_SHARE, timeout=5))
    async with asyncio.timeout(5):
        request = await anext(aiter(engagement.upgrade_requests()))
    assert request.channel is cuepoint.Channel.SCREEN_SHARE and request.requested_by is cuepoint.Party.ASSOCIATE
    await engagement.respond_upgrade(request, True)
    change = await requested
    assert change.accepted and change.channel is cuepoint.Channel.SCREEN_SHARE
    # The user asks for video, which the scenario does not allow: refused at once.
    refused = await engagement.request_upgrade(cuepoint.Channel.VIDEO, timeout=5)
    assert not refused.accepted
    await server.core.drain()
    changes = await server.store.channel_changes(engagement.engagement_id)
    assert [(c.from_channel, c.to_channel, c.requested_by, c.accepted) for c in changes] == [
        ("audio", "screen_share", "associate", True),
        ("screen_share", "video", "user", False),
    ]

    # WebRTC-style call setup: opaque payloads relayed untouched, both ways.
    await engagement.send_call_signal(cuepoint.CallSignalKind.OFFER, b"v=0\r\no=- sdp-offer")
    async with asyncio.timeout(5):
        offer = await anext(aiter(dana.call_signals(assigned)))
    assert (offer.kind, offer.payload, offer.sender) == (
        cuepoint.CallSignalKind.OFFER,
        b"v=0\r\no=- sdp-offer",
        cuepoint.Party.USER,
    )
    await dana.send_call_signal(assigned, cuepoint.CallSignalKind.ANSWER, b"sdp-answer")
    async with asyncio.timeout(5):
        answer = await anext(aiter(engagement.call_signals()))
    assert (answer.kind, answer.payload) == (cuepoint.CallSignalKind.ANSWER, b"sdp-answer")
    await client.close()
    await dana.close()


async def _take(iterator: object, n: int) -> object:
    count = 0
    async for item in iterator:  # type: ignore[attr-defined]
        yield item
        count += 1
        if count == n:
            return


async def test_wrap_up_and_outcome(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(HELP.strip() + "\nengagement_outcome: {event: sync_succeeded, within: 10m}\n")
    dana = await associate(server, "dana")
    fixed, broken = await phone(server, "fixed", user_id="u1"), await phone(server, "broken", user_id="u2")
    ends = {}
    for client in (fixed, broken):
        engagement = await ask_for_help(client)
        assigned = await dana.next_engagement(timeout=5)
        await dana.end(assigned, disposition="resolved", notes="walked through settings")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        ends[client] = engagement.engagement_id
    await fixed.track("sync_succeeded")
    await fixed.flush()
    clock.advance(11 * 60)
    await server.core.drain()
    achieved = await server.store.get_engagement(ends[fixed])
    missed = await server.store.get_engagement(ends[broken])
    assert achieved is not None and (achieved.disposition, achieved.outcome) == ("resolved", "achieved")
    assert missed is not None and missed.outcome == "not_achieved"
    for c in (fixed, broken, dana):
        await c.close()


async def test_user_ends_and_associate_still_wraps_up(start_server: StartServer) -> None:
    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    engagement = await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)
    events = dana.events()
    await engagement.end()
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, cuepoint.EngagementEnded):
                assert event.ended_by is cuepoint.Party.USER
                break
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await dana.end(assigned, disposition="abandoned", notes="user hung up")

    async def wrapped_up() -> bool:
        stored = await server.store.get_engagement(engagement.engagement_id)
        return stored is not None and (stored.state, stored.ended_by, stored.disposition) == (
            "ended",
            "user",
            "abandoned",
        )

    await eventually(wrapped_up)
    await client.close()
    await dana.close()


async def test_identified_user_stitches_journeys_and_memory(start_server: StartServer) -> None:
    server = await start_server(HELP.strip() + "\nafter_decline: never\n")
    dana = await associate(server, "dana")
    tablet = await cuepoint.connect(server.address, app_id="fitkit", device_id="tablet", consent=cuepoint.Consent.FULL)
    await tablet.track("screen_viewed", screen="settings")
    await tablet.track("help")
    await tablet.flush()
    # The app signs the user in: the tablet's anonymous history now belongs to u-9.
    await tablet.set_context(user=cuepoint.User(user_id="u-9", tier="premium"))
    await tablet.decline(await tablet.next_cue(timeout=5))
    await tablet.flush()

    phone_ = await phone(server, "phone", user_id="u-9")
    await phone_.track("help")
    await phone_.flush()
    assert await no_cue(phone_)  # the decline follows the user to the other device

    server2 = await start_server(HELP)  # a fresh server: no decline memory; check the stitched journey
    dana2 = await associate(server2, "dana")
    t2 = await cuepoint.connect(server2.address, app_id="fitkit", device_id="tablet", consent=cuepoint.Consent.FULL)
    await t2.track("screen_viewed", screen="settings")
    await t2.flush()
    await t2.set_context(user=cuepoint.User(user_id="u-9"))
    await t2.flush()
    p2 = await phone(server2, "phone", user_id="u-9")
    await ask_for_help(p2)
    ctx = (await dana2.next_engagement(timeout=5)).context
    assert {(e.name, e.properties.get("screen")) for e in ctx.journey if e.kind == "event"} >= {
        ("screen_viewed", "settings"),
        ("help", None),
    }
    for c in (tablet, phone_, t2, p2, dana, dana2):
        await c.close()


async def test_an_associate_cannot_end_someone_elses_engagement(start_server: StartServer) -> None:
    import grpc

    from cuepoint.v1 import associate_pb2, associate_pb2_grpc

    server = await start_server(HELP)
    dana = await associate(server, "dana")
    client = await phone(server)
    await ask_for_help(client)
    assigned = await dana.next_engagement(timeout=5)

    async def stored_assigned() -> bool:
        stored = await server.store.get_engagement(assigned.engagement_id)
        return stored is not None and stored.state == "assigned"

    # Stored in the background: on file before Mallory tries, so "unchanged" below means something.
    await eventually(stored_assigned)

    async def mallory() -> object:
        yield associate_pb2.AssociateMessage(sign_in=associate_pb2.SignIn(associate_id="mallory", queues=["other"]))
        yield associate_pb2.AssociateMessage(
            end=associate_pb2.EndEngagement(engagement_id=assigned.engagement_id, disposition="resolved")
        )
        await asyncio.sleep(5)

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = associate_pb2_grpc.AssociateServiceStub(channel).Connect(mallory())
        try:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
            raise AssertionError("the stream should have been refused")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await stored_assigned()
    await client.close()
    await dana.close()
