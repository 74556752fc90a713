"""Issue 3 end to end: every condition kind and arbitration rule, real server and SDK, manual clock."""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .conftest import StartServer, no_cue, phone


def scenario(
    sid: str,
    trigger: str,
    *,
    extra: str = "",
    target: str = "",
    cue: str = "channel: chat",
    priority: int = 0,
) -> str:
    lines = [
        f"id: {sid}",
        f"priority: {priority}",
        f"trigger: {trigger}",
        f"cue: {{message: 'Help from {sid}', {cue}}}",
    ]
    if target:
        lines.append(f"target: {target}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


async def explain(server: CuepointServer, device_id: str) -> admin_pb2.ExplainDeviceResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await admin_pb2_grpc.AdminServiceStub(channel).ExplainDevice(
            admin_pb2.ExplainDeviceRequest(device_id=device_id)
        )


async def reasons(server: CuepointServer, device_id: str) -> list[tuple[str, str]]:
    await server.core.drain()
    found = await explain(server, device_id)
    return [
        (d.scenario_id, d.reason if d.outcome == admin_pb2.DECISION_OUTCOME_BLOCKED else "offered")
        for d in found.decisions
    ]


async def send(client: cuepoint.Client, *events: str | tuple[str, dict[str, object]]) -> None:
    for event in events:
        name, props = (event, {}) if isinstance(event, str) else event
        await client.track(name, **props)  # type: ignore[arg-type]
    await client.flush()


async def cue_of(client: cuepoint.Client) -> cuepoint.Cue:
    return await client.next_cue(timeout=5)


async def withdrawal(events: object) -> cuepoint.CueWithdrawal:
    async with asyncio.timeout(5):
        async for event in events:  # type: ignore[attr-defined]
            if isinstance(event, cuepoint.CueWithdrawal):
                return event
    raise AssertionError("no withdrawal")


# -- conditions -------------------------------------------------------------------


async def test_context_attributes_semver_regex_in_ranges(start_server: StartServer) -> None:
    target = (
        "{all: [{attribute: app.version, version_lt: '4.3'}, {attribute: device.os, matches: '(?i)^ios'},"
        " {attribute: location.country, in: [US, FR]}, {attribute: device.locale, matches: '^en'},"
        " {attribute: attributes.cart_value, gte: 100, lt: 500}]}"
    )
    server = await start_server(scenario("ctx", "{event: help}", target=target))

    async def device(device_id: str, version: str, cart: int) -> cuepoint.Client:
        return await cuepoint.connect(
            server.address,
            app_id="shop",
            device_id=device_id,
            context=cuepoint.Context(
                app_version=version,
                os="iOS",
                locale="en_US",
                location=cuepoint.Location(country="FR"),
                attributes={"cart_value": cart},
            ),
        )

    yes, old_enough, too_big = (
        await device("a", "4.2.9", 120),
        await device("b", "4.10", 120),
        await device("c", "4.2", 900),
    )
    for client in (yes, old_enough, too_big):
        await send(client, "help")
    assert (await cue_of(yes)).scenario_id == "ctx"
    assert await no_cue(old_enough) and await no_cue(too_big)
    for client in (yes, old_enough, too_big):
        await client.close()


async def test_rate_streak_and_aggregate(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        scenario("rate", "{event: error_shown, rate: {at_least: 1, per: 1m, within: 3m}}"),
        scenario("streak", "{event: sync_failed, streak: {at_least: 3, broken_by: sync_succeeded}}"),
        scenario(
            "slow",
            "{event: sync_completed, aggregate: {fn: avg, property: duration_ms, within: 10m, gt: 30000}}",
        ),
    )
    client = await phone(server)
    await send(client, "error_shown", "error_shown")  # 2 in 3 minutes: 0.67 per minute
    assert await no_cue(client)
    await send(client, "error_shown")
    assert (await cue_of(client)).scenario_id == "rate"

    other = await phone(server, "phone-2", user_id="user-2")
    await send(other, "sync_failed", "sync_failed", "sync_succeeded", "sync_failed", "sync_failed")
    assert await no_cue(other)  # the success broke the streak
    await send(other, "sync_failed")
    assert (await cue_of(other)).scenario_id == "streak"

    third = await phone(server, "phone-3", user_id="user-3")
    await send(third, ("sync_completed", {"duration_ms": 20_000}), ("sync_completed", {"duration_ms": 35_000}))
    assert await no_cue(third)  # average 27.5 s
    await send(third, ("sync_completed", {"duration_ms": 45_000}))
    assert (await cue_of(third)).scenario_id == "slow"  # average 33.3 s
    for c in (client, other, third):
        await c.close()


async def test_idle_fires_from_a_timer_exactly_once(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        scenario(
            "idle-checkout",
            "{all: [{event: screen_viewed, where: {screen: {equals: checkout}}}, {idle: 45s}]}",
            extra="after_decline: 0s",
        )
    )
    client = await phone(server)
    await send(client, ("screen_viewed", {"screen": "checkout"}))
    clock.advance(30)
    assert await no_cue(client)
    clock.advance(16)  # no signal arrives: the server's timer fires
    cue = await cue_of(client)
    assert cue.scenario_id == "idle-checkout"
    await client.decline(cue)
    clock.advance(300)  # the same idle period never fires twice
    assert await no_cue(client)
    await send(client, ("screen_viewed", {"screen": "checkout"}))  # a new idle period starts
    clock.advance(46)
    assert (await cue_of(client)).scenario_id == "idle-checkout"
    await client.close()


async def test_absence_and_dwell(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        scenario("stalled", "{event: checkout_reached, not_followed_by: {event: thank_you_viewed, within: 45s}}"),
        scenario("pricing", "{dwell: {screen: pricing, at_least: 30s}}"),
    )
    done = await phone(server, "done", user_id="u-done")
    stalled = await phone(server, "stalled", user_id="u-stalled")
    await send(done, "checkout_reached")
    await send(stalled, "checkout_reached")
    clock.advance(10)
    await send(done, "thank_you_viewed")
    clock.advance(40)
    assert (await cue_of(stalled)).scenario_id == "stalled"
    assert await no_cue(done)

    reader = await phone(server, "reader", user_id="u-reader")
    moved_on = await phone(server, "moved", user_id="u-moved")
    await send(reader, ("screen_viewed", {"screen": "pricing"}))
    await send(moved_on, ("screen_viewed", {"screen": "pricing"}))
    clock.advance(10)
    await send(moved_on, ("screen_viewed", {"screen": "home"}))
    clock.advance(25)
    assert (await cue_of(reader)).scenario_id == "pricing"
    assert await no_cue(moved_on)
    for c in (done, stalled, reader, moved_on):
        await c.close()


INSURANCE = """
milestones:
  - {id: quote-started, when: {event: quote_started}}
  - {id: payment-page, when: {event: screen_viewed, where: {screen: {equals: payment}}}}
  - {id: purchased, when: {event: purchase_completed}}
scenarios:
  - id: checkout-stall
    trigger: {all: [{milestone: payment-page}, {not: {milestone: purchased}}, {idle: 45s}]}
    outcome: purchased
    cue: {message: "Questions about your policy?", channel: chat}
"""


async def test_milestones_and_outcome(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(INSURANCE)
    stuck = await phone(server, "stuck", user_id="u1")
    bought = await phone(server, "bought", user_id="u2")
    for client in (stuck, bought):
        await send(client, "quote_started", ("screen_viewed", {"screen": "payment"}))
    await send(bought, "purchase_completed")
    clock.advance(46)
    cue = await cue_of(stuck)
    assert cue.scenario_id == "checkout-stall"
    assert await no_cue(bought)

    # Reaching the outcome withdraws the pending offer.
    events = stuck.events()
    await send(stuck, "purchase_completed")
    gone = await withdrawal(events)
    assert (gone.cue_id, gone.reason) == (cue.cue_id, "outcome_achieved")
    assert (await explain(server, "stuck")).milestones == ["payment-page", "purchased", "quote-started"]
    await stuck.close()
    await bought.close()


async def test_segments_are_reusable_and_part_of_the_context(start_server: StartServer) -> None:
    server = await start_server(
        """
segments:
  - id: premium-ios
    when: {all: [{attribute: user.tier, equals: premium}, {attribute: device.os, equals: iOS}]}
scenarios:
  - id: vip-help
    target: {segment: premium-ios}
    trigger: {event: help}
    cue: {message: hi, channel: audio}
"""
    )
    associate = await cuepoint.connect_associate(server.address, associate_id="a")
    vip = await phone(server, "vip")
    free = await phone(server, "free", tier="free", user_id="u-free")
    await send(vip, "help")
    await send(free, "help")
    await vip.accept(await cue_of(vip))
    assert await no_cue(free)
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.context.segments == ("premium-ios",)
    assert list((await explain(server, "vip")).segments) == ["premium-ios"]
    assert list((await explain(server, "free")).segments) == []
    for c in (vip, free):
        await c.close()
    await associate.close()


async def test_cost_per_signal_ignores_scenarios_that_do_not_listen(start_server: StartServer) -> None:
    unrelated = "\n".join(
        f"- id: other-{i}\n  trigger: {{event: other_{i}, count: {{at_least: 2, within: 1m}}}}\n"
        f"  cue: {{message: hi, channel: chat}}"
        for i in range(1000)
    )
    server = await start_server(unrelated + "\n" + "- " + scenario("mine", "{event: mine}").replace("\n", "\n  "))
    client = await phone(server)
    before = server.core.engine.evaluations
    await send(client, "mine")
    assert (await cue_of(client)).scenario_id == "mine"
    assert server.core.engine.evaluations - before == 1
    await client.close()


# -- arbitration ------------------------------------------------------------------


async def test_per_scenario_caps(start_server: StartServer) -> None:
    server = await start_server(scenario("capped", "{event: help}", extra="caps: {per_session: 1}"))
    client = await phone(server)
    await send(client, "help")
    await client.dismiss(await cue_of(client))
    await send(client, "help")
    assert await no_cue(client)
    assert await reasons(server, "phone-1") == [("capped", "offered"), ("capped", "cap")]
    await client.close()


async def test_global_min_gap_and_daily_cap(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        "policy: {min_gap: 30s, caps: {per_day: 2}}\n",
        scenario("a", "{event: a}"),
        scenario("b", "{event: b}"),
        scenario("c", "{event: c}"),
    )
    client = await phone(server)
    await send(client, "a")
    await client.dismiss(await cue_of(client))
    await send(client, "b")
    assert await no_cue(client)
    clock.advance(31)
    await send(client, "b")
    await client.dismiss(await cue_of(client))
    clock.advance(60)
    await send(client, "c")
    assert await no_cue(client)
    assert [r for _, r in await reasons(server, "phone-1")] == ["offered", "min_gap", "offered", "cap"]
    await client.close()


async def test_decline_memory_never_and_duration(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        scenario("never-again", "{event: x}", extra="after_decline: never", priority=10),
        scenario("ten-minutes", "{event: y}", extra="after_decline: 10m"),
    )
    client = await phone(server)
    await send(client, "x")
    await client.decline(await cue_of(client))
    await send(client, "y")
    await client.decline(await cue_of(client))
    await client.close()

    # A new session (or a reinstall: same user, new device): memory is per user, on the server.
    again = await phone(server, "reinstalled")
    await send(again, "x", "y")
    assert await no_cue(again)
    clock.advance(11 * 60)
    await send(again, "x", "y")
    assert (await cue_of(again)).scenario_id == "ten-minutes"
    assert ("never-again", "declined") in await reasons(server, "reinstalled")
    await again.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", ["offered", "engaged", "engaged"]),
        # Without the session rule, only the active engagement suppresses offers.
        ("policy: {after_engagement: none}\n", ["offered", "engagement_active", "offered"]),
    ],
)
async def test_engagements_suppress_offers(start_server: StartServer, policy: str, expected: list[str]) -> None:
    server = await start_server(policy or "policy: {}\n", scenario("help", "{event: help}"))
    associate = await cuepoint.connect_associate(server.address, associate_id="a")
    client = await phone(server)
    await send(client, "help")
    engagement = await client.accept(await cue_of(client))
    assigned = await associate.next_engagement(timeout=5)
    await send(client, "help")  # while the engagement is active
    assert await no_cue(client)
    await associate.end(assigned)
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await send(client, "help")  # after it, same session
    assert [r for _, r in await reasons(server, "phone-1")] == expected
    await client.close()
    await associate.close()


async def test_suppressed_while_a_cue_is_on_screen_and_withdrawn_when_condition_clears(
    start_server: StartServer,
) -> None:
    server = await start_server(
        scenario("sync", "{event: sync_failed, streak: {at_least: 2, broken_by: sync_succeeded}}", priority=5),
        scenario("other", "{event: other}"),
    )
    client = await phone(server)
    events = client.events()
    await send(client, "sync_failed", "sync_failed")
    cue = await cue_of(client)
    await send(client, "other")
    assert await no_cue(client)
    await send(client, "sync_succeeded")
    gone = await withdrawal(events)
    assert (gone.cue_id, gone.reason) == (cue.cue_id, "condition_cleared")
    assert [r for _, r in await reasons(server, "phone-1")] == ["offered", "cue_pending"]
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None and stored.status == "withdrawn"
    await client.close()


def _next(weekday: int, hour: int, after: float) -> float:
    paris = ZoneInfo("Europe/Paris")
    day = dt.datetime.fromtimestamp(after, paris).replace(hour=hour, minute=0, second=0, microsecond=0)
    day += dt.timedelta(days=1)
    while day.weekday() != weekday:
        day += dt.timedelta(days=1)
    return day.timestamp()


async def test_business_hours_and_campaign_dates(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        scenario(
            "office",
            "{event: help}",
            extra="schedule: {timezone: Europe/Paris, hours: [{days: [mon, tue, wed, thu, fri], from: '09:00', to: '17:00'}]}",
        ),
        scenario("ended-campaign", "{event: promo}", extra="schedule: {end: 2020-01-01T00:00:00Z}"),
    )
    client = await phone(server)
    clock.set(_next(5, 12, clock.now()))  # a Saturday, noon in Paris
    await send(client, "help", "promo")
    assert await no_cue(client)
    clock.set(_next(0, 10, clock.now()))  # the Monday after, 10:00 in Paris
    await send(client, "help")
    assert (await cue_of(client)).scenario_id == "office"
    assert [r for _, r in await reasons(server, "phone-1")] == ["schedule", "schedule", "offered"]
    await client.close()


async def test_emergency_switch(start_server: StartServer) -> None:
    server = await start_server(scenario("help", "{event: help}"))
    client = await phone(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert (await admin.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=True, reason="test"))).paused
        await send(client, "help")
        assert await no_cue(client)
        assert not (await admin.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=False))).paused
        await send(client, "help")
        assert (await cue_of(client)).scenario_id == "help"
    assert [r for _, r in await reasons(server, "phone-1")] == ["paused", "offered"]
    await client.close()


async def test_offer_only_when_the_queue_can_take_it(start_server: StartServer) -> None:
    server = await start_server(
        "policy: {require_capacity: true}\n",
        scenario("help", "{event: help}", cue="channel: audio, queue: support"),
    )
    client = await phone(server)
    await send(client, "help")
    assert await no_cue(client)
    associate = await cuepoint.connect_associate(server.address, associate_id="a", queues=["support"])
    await send(client, "help")
    assert (await cue_of(client)).scenario_id == "help"
    assert [r for _, r in await reasons(server, "phone-1")] == ["no_capacity", "offered"]
    await client.close()
    await associate.close()


async def test_admin_lists_served_scenarios(start_server: StartServer) -> None:
    server = await start_server(scenario("help", "{event: help}"), scenario("idle", "{idle: 1m}"))
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).GetScenarios(admin_pb2.GetScenariosRequest())
    assert {(s.id, s.time_driven) for s in reply.scenarios} == {("help", False), ("idle", True)}
    assert reply.version >= 1 and reply.last_error == ""


@pytest.mark.parametrize("missing", ["segment: nope", "milestone: nope"])
async def test_unknown_references_are_load_errors(start_server: StartServer, missing: str) -> None:
    from cuepoint_server.scenarios.loader import ScenarioError

    with pytest.raises(ScenarioError) as info:
        await start_server(scenario("s", f"{{all: [{{event: x}}, {{{missing}}}]}}"))
    (issue,) = info.value.issues
    assert issue.line == 3 and issue.field.startswith("trigger.all[1]") and "unknown" in issue.message


async def test_reload_rearms_timers_and_withdraws_removed_scenarios(
    start_server: StartServer, clock: ManualClock, tmp_path: pytest.TempPathFactory
) -> None:
    folder = tmp_path / "live"  # type: ignore[operator]
    folder.mkdir()
    (folder / "help.yaml").write_text(scenario("help", "{event: help}"))
    server = await start_server(scenarios=folder)
    assert server.reloader is not None
    client = await phone(server)
    events = client.events()
    await send(client, "help")
    cue = await cue_of(client)

    # Removing the file withdraws the offer now, not at the device's next signal.
    (folder / "help.yaml").unlink()
    (folder / "idle.yaml").write_text(scenario("idle", "{idle: 1m}"))
    await server.reloader.reload_now(reason="test")
    gone = await withdrawal(events)
    assert (gone.cue_id, gone.reason) == (cue.cue_id, "scenario_removed")
    # The new time-driven scenario's timer is armed for the connected device.
    clock.advance(61)
    assert (await cue_of(client)).scenario_id == "idle"
    await client.close()
