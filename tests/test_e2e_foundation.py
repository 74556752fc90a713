"""Signals in, cue out, engagement to an associate: real server, real SDK, real gRPC."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import cuepoint
from cuepoint.v1 import common_pb2, device_pb2, device_pb2_grpc
from cuepoint_server.clock import ManualClock
from cuepoint_server.scenarios.loader import ScenarioError

from .conftest import ROOT, SHIPPED, StartServer, no_cue, phone

SYNC_FAILURE = """
id: sync-failure
priority: 100
target: {attribute: user.tier, equals: premium}
trigger:
  event: sync_failed
  count: {at_least: 3, within: 10m}
cue: {message: "Unable to sync? I can help you.", channel: audio, upgrades: [screen_share]}
cooldown: 30m
"""


async def fail_sync(client: cuepoint.Client, times: int = 3) -> list[str]:
    ids = [await client.track("sync_failed", reason="timeout") for _ in range(times)]
    await client.flush()
    return ids


async def test_fitkit_flow_with_shipped_scenarios(start_server: StartServer) -> None:
    server = await start_server(scenarios=SHIPPED)
    associate = await cuepoint.connect_associate(
        server.address, associate_id="dana", display_name="Dana", queues=["fitkit-support"]
    )
    client = await phone(server)
    slow_ok = await client.track("sync_completed", duration_ms=12_000)
    failures = await fail_sync(client)

    cue = await client.next_cue(timeout=5)
    assert cue.message == "Unable to sync? I can help you."
    assert cue.channel is cuepoint.Channel.AUDIO
    assert cue.scenario_id == "fitkit-sync-failure"
    assert cuepoint.Channel.SCREEN_SHARE in cue.allowed_upgrades

    engagement = await client.accept(cue)
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert engagement.associate_name == "Dana"

    assigned = await associate.next_engagement(timeout=5)
    ctx = assigned.context
    assert (ctx.context.device_model, ctx.context.os, ctx.context.app_version) == (
        "iPhone15,2",
        "iOS",
        "4.2.0",
    )
    assert ctx.user is not None and ctx.user.tier == "premium" and ctx.user_id == "user-1"
    journey = {entry.signal_id: entry for entry in ctx.journey}
    assert journey[slow_ok].properties["duration_ms"] == 12_000
    assert [journey[i].name for i in failures] == ["sync_failed"] * 3
    assert ctx.trigger is not None and ctx.trigger.scenario_id == "fitkit-sync-failure"
    assert sorted(ctx.trigger.signal_ids) == sorted(failures)
    assert any("count(sync_failed) >= 3 within 10m (observed 3)" in c.description for c in ctx.trigger.conditions)
    assert "iPhone15,2" in assigned.describe()

    await associate.end(assigned, disposition="resolved", notes="token refreshed")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    stored = await server.store.get_engagement(assigned.engagement_id)
    assert stored is not None and (stored.state, stored.disposition) == ("ended", "resolved")
    stored_cue = await server.store.get_cue(cue.cue_id)
    assert stored_cue is not None and stored_cue.status == "accepted"
    await client.close()
    await associate.close()


async def test_two_failures_do_not_fire(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server)
    await fail_sync(client, 2)
    assert await no_cue(client)
    await fail_sync(client, 1)  # the third one does: the negative above could have failed
    assert (await client.next_cue(timeout=5)).scenario_id == "sync-failure"
    await client.close()


async def test_non_premium_user_does_not_fire(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server, tier="free")
    await fail_sync(client, 5)
    assert await no_cue(client)
    await client.close()


async def test_failures_spread_over_eleven_minutes_do_not_fire(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server)
    for i in range(3):  # at 0, 5.5 and 11 minutes
        if i:
            clock.advance(5.5 * 60)
        await fail_sync(client, 1)
    assert await no_cue(client)
    # Two failures are still inside the window; one more makes three in 10 min.
    await fail_sync(client, 1)
    assert (await client.next_cue(timeout=5)).scenario_id == "sync-failure"
    await client.close()


async def test_only_the_highest_priority_cue_is_sent(start_server: StartServer) -> None:
    low = SYNC_FAILURE.replace("id: sync-failure", "id: a-low").replace("priority: 100", "priority: 10")
    tie = SYNC_FAILURE.replace("id: sync-failure", "id: z-tie")
    server = await start_server(low, SYNC_FAILURE, tie)
    client = await phone(server)
    await fail_sync(client)
    cue = await client.next_cue(timeout=5)
    # Equal priority (100) is broken by id: "sync-failure" sorts before "z-tie".
    assert cue.scenario_id == "sync-failure"
    assert await no_cue(client)
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None
    assert {b["scenario_id"]: b["reason"] for b in stored.explanation["blocked"]} == {
        "z-tie": "priority",
        "a-low": "priority",
    }
    await client.close()


async def test_cooldown_follows_the_user(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(SYNC_FAILURE)
    first = await phone(server, "phone-a")
    await fail_sync(first)
    await first.decline(await first.next_cue(timeout=5))
    await fail_sync(first)
    assert await no_cue(first)

    # Same user on another device (or after a reinstall): still cooling down.
    second = await phone(server, "phone-b")
    await fail_sync(second)
    assert await no_cue(second)

    clock.advance(31 * 60)
    await fail_sync(second)
    assert (await second.next_cue(timeout=5)).scenario_id == "sync-failure"
    await first.close()
    await second.close()


async def test_cue_expires_and_is_withdrawn(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(
        SYNC_FAILURE.replace("upgrades: [screen_share]}", "upgrades: [screen_share], ttl: 30s}")
    )
    client = await phone(server)
    events = client.events()
    await fail_sync(client)
    cue = await client.next_cue(timeout=5)
    clock.advance(31)
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                assert (event.cue_id, event.reason) == (cue.cue_id, "expired")
                break
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None and stored.status == "expired"
    await client.close()


async def test_engagement_waits_in_queue_until_an_associate_signs_in(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server)
    await fail_sync(client)
    engagement = await client.accept(await client.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    assert engagement.state is cuepoint.EngagementState.QUEUED

    associate = await cuepoint.connect_associate(server.address, associate_id="late", display_name="Late Lee")
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.engagement_id == engagement.engagement_id
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert engagement.associate_name == "Late Lee"
    await client.close()
    await associate.close()


async def test_user_attributes_are_redacted_without_full_consent(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    associate = await cuepoint.connect_associate(server.address, associate_id="dana")
    client = await phone(server, consent=cuepoint.Consent.ESSENTIAL)
    await fail_sync(client)
    await client.accept(await client.next_cue(timeout=5))
    ctx = (await associate.next_engagement(timeout=5)).context
    assert "user.first_name" in ctx.redacted_fields
    assert ctx.user is None or "first_name" not in ctx.user.attributes
    await client.close()
    await associate.close()


def _raw_signal(signal_id: str, name: str) -> common_pb2.Signal:
    signal = common_pb2.Signal(id=signal_id, event=common_pb2.Event(name=name))
    signal.time.GetCurrentTime()
    return signal


class RawDevice:
    """A device speaking the generated stubs directly, as another-language SDK would."""

    def __init__(self, address: str, device_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.outgoing: asyncio.Queue[device_pb2.DeviceMessage | None] = asyncio.Queue()
        self.outgoing.put_nowait(
            device_pb2.DeviceMessage(
                hello=device_pb2.Hello(
                    app_id="fitkit",
                    device_id=device_id,
                    user=common_pb2.UserIdentity(user_id="raw", tier="premium"),
                )
            )
        )
        self.call = device_pb2_grpc.DeviceServiceStub(self.channel).Connect(self._requests())

    async def _requests(self):  # type: ignore[no-untyped-def]
        while (message := await self.outgoing.get()) is not None:
            yield message

    def send(self, *signals: common_pb2.Signal, batch_id: str = "b") -> None:
        batch = device_pb2.SignalBatch(batch_id=batch_id, signals=signals)
        batch.sent_at.GetCurrentTime()
        self.outgoing.put_nowait(device_pb2.DeviceMessage(signals=batch))

    async def read(self) -> device_pb2.ServerMessage:
        async with asyncio.timeout(5):
            message = await self.call.read()
        assert message is not grpc.aio.EOF
        return message  # type: ignore[no-any-return]

    async def refused(self, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
        """The stream's end with ``code`` (the next read fails with it); its details, for the field they name."""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.read()
        assert info.value.code() is code
        return info.value.details() or ""

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        await self.channel.close()


async def test_invalid_signal_gets_invalid_argument_and_others_keep_working(
    start_server: StartServer,
) -> None:
    server = await start_server(SYNC_FAILURE)
    good = await phone(server, "good-phone")
    raw = RawDevice(server.address, "bad-phone")
    assert (await raw.read()).HasField("welcome")
    raw.send(_raw_signal("ok-1", "sync_failed"), _raw_signal("bad-1", "Sync Failed!"))
    assert "signals.signals[1].event.name" in await raw.refused()
    # Rejected whole: the valid signal of the bad batch was not stored either.
    assert await server.store.count_signals("bad-phone") == 0
    await raw.close()

    await fail_sync(good)
    assert (await good.next_cue(timeout=5)).scenario_id == "sync-failure"
    # The SDK catches the same mistake before sending anything.
    with pytest.raises(cuepoint.InvalidSignal):
        await good.track("Sync Failed!")
    await good.close()


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (device_pb2.Hello(app_id="fitkit", device_id=""), "hello.device_id"),
        (device_pb2.Hello(app_id="Fit Kit", device_id="d"), "hello.app_id"),
        (device_pb2.Hello(app_id="fitkit", device_id="d", engaged_cue_ids=["c"] * 33), "hello.engaged_cue_ids"),
        (device_pb2.Hello(app_id="fitkit", device_id="d", engaged_cue_ids=["c", "x" * 65]), "engaged_cue_ids[1]"),
    ],
)
async def test_invalid_hello_is_rejected(start_server: StartServer, hello: device_pb2.Hello, field: str) -> None:
    server = await start_server(SYNC_FAILURE)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Connect(iter([device_pb2.DeviceMessage(hello=hello)]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


async def test_absurd_timestamp_is_rejected(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "time-traveller")
    await raw.read()
    old = _raw_signal("old-1", "sync_failed")
    old.time.FromSeconds(int(time.time()) - 30 * 86400)
    raw.send(old)
    assert "signals.signals[0].time" in await raw.refused()
    await raw.close()


async def test_resent_signals_are_acked_but_counted_once(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address, "resender")
    await raw.read()
    raw.send(_raw_signal("s-1", "sync_failed"), _raw_signal("s-2", "sync_failed"), batch_id="first")
    ack = (await raw.read()).ack
    assert (ack.batch_id, list(ack.signal_ids), list(ack.duplicate_ids)) == ("first", ["s-1", "s-2"], [])
    raw.send(_raw_signal("s-1", "sync_failed"), _raw_signal("s-2", "sync_failed"), batch_id="again")
    # Four deliveries of two signals: still two failures, so no cue before the ack.
    again = await raw.read()
    assert again.HasField("ack"), again
    assert sorted(again.ack.duplicate_ids) == ["s-1", "s-2"]
    assert await server.store.count_signals("resender") == 2
    raw.send(_raw_signal("s-3", "sync_failed"), batch_id="third")
    assert (await raw.read()).HasField("cue")
    await raw.close()


async def test_answer_to_unknown_cue_is_withdrawn_not_fatal(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    client = await phone(server)
    events = client.events()
    await client.decline("no-such-cue")
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                assert (event.cue_id, event.reason) == ("no-such-cue", "unknown")
                break
    await fail_sync(client)  # the session survived
    assert (await client.next_cue(timeout=5)).scenario_id == "sync-failure"
    await client.close()


async def test_broken_scenario_file_is_reported_with_file_line_field(start_server: StartServer) -> None:
    broken = SYNC_FAILURE.replace("count: {at_least: 3, within: 10m}", "count: {at_least: 3, within: soon}")
    with pytest.raises(ScenarioError) as info:
        await start_server(broken)
    (issue,) = info.value.issues
    assert issue.file.endswith("s0.yaml") and issue.line == 7 and issue.field == "trigger.count.within"


def test_validate_command_reports_every_problem(tmp_path: pytest.TempPathFactory) -> None:
    folder = tmp_path / "bad"  # type: ignore[operator]
    folder.mkdir()
    (folder / "a.yaml").write_text(SYNC_FAILURE.replace("channel: audio", "channel: fax"))
    (folder / "b.yaml").write_text(SYNC_FAILURE.replace("id: sync-failure", "id: other").replace("10m", "10 min"))
    done = subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "validate", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert f"{folder}/a.yaml:8: cue.channel: Input should be" in done.stdout
    assert f"{folder}/b.yaml:7: trigger.count.within: '10 min' is not a duration" in done.stdout
    assert "2 problem(s) found" in done.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "validate", str(SHIPPED)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "scenario(s) valid" in ok.stdout


async def test_health_and_reflection_are_on(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="cuepoint.v1.DeviceService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in call for s in r.list_services_response.service}
    assert {"cuepoint.v1.DeviceService", "cuepoint.v1.AssociateService"} <= names


def test_demo_runs_end_to_end() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "demo", "--scenarios", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert 'CUE from scenario fitkit-sync-failure: "Unable to sync? I can help you." (channel audio' in done.stdout
    assert "Device:  fitkit-iphone-7f3a - iPhone15,2, iOS 17.4, app fitkit 4.2.0" in done.stdout
    assert "[associate] chat from user: \"It keeps saying 'sync failed'. I'm on 4.2.0.\"" in done.stdout
    assert "[associate] channel is now screen_share" in done.stdout
    assert (
        "2 chat messages, engagement ended (resolved, recorded resolved), channel screen_share, outcome achieved"
        in done.stdout
    )
    assert "Demo complete." in done.stdout
    assert "associate desk: http://127.0.0.1:" in done.stdout and "admin console:  http://127.0.0.1:" in done.stdout
