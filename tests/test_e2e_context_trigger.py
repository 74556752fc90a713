"""Context is a trigger, and why-not covers every scenario (issue 12, items 2 and 4).

Real server on port 0 (hand-driven clock), real SDK over gRPC, the real AdminService.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.clock import ManualClock
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.simulate import parse_trace, simulate

from .conftest import StartServer, no_cue, phone

SEGMENT_ONLY = """
segments:
  - {id: premium-ios, when: {all: [{attribute: user.tier, equals: premium}, {attribute: device.os, equals: iOS}]}}
scenarios:
  - id: welcome-premium
    trigger: {segment: premium-ios}
    cue: {message: "Welcome to premium", channel: chat}
    cooldown: 1d
"""

FAILURES = """
id: sync-help
target: {attribute: user.tier, equals: premium}
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 1h}
cooldown: 1h
"""


async def next_withdrawal(events: AsyncIterator[object]) -> cuepoint.CueWithdrawal:
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                return event
    raise AssertionError("the event stream ended")


async def fail(client: cuepoint.Client, times: int = 3) -> None:
    for _ in range(times):
        await client.track("sync_failed")
    await client.flush(timeout=10)


async def test_segment_entry_fires_a_segment_only_trigger(start_server: StartServer) -> None:
    server = await start_server(SEGMENT_ONLY)
    client = await phone(server, tier="basic")
    assert await no_cue(client)
    await client.set_context(user=cuepoint.User(user_id="user-1", tier="premium"))
    await client.flush(timeout=10)
    cue = await client.next_cue(timeout=5)
    assert cue.scenario_id == "welcome-premium"
    await client.close()
    # Already in the segment at hello: the hello itself is the entry.
    other = await phone(server, "phone-2", user_id="user-2")
    assert (await other.next_cue(timeout=5)).scenario_id == "welcome-premium"
    await other.close()


async def test_a_cue_is_withdrawn_when_its_target_stops_holding(start_server: StartServer) -> None:
    server = await start_server(FAILURES)
    client = await phone(server)
    events = client.events()
    await fail(client)
    cue = await client.next_cue(timeout=5)
    await client.set_context(user=cuepoint.User(user_id="user-1", tier="basic"))
    await client.flush(timeout=10)
    withdrawn = await next_withdrawal(events)
    assert (withdrawn.cue_id, withdrawn.reason) == (cue.cue_id, "condition_cleared")
    await client.close()


async def test_a_cue_is_withdrawn_when_its_count_window_expires(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(FAILURES)
    client = await phone(server)
    events = client.events()
    await fail(client)
    cue = await client.next_cue(timeout=5)
    clock.advance(599)  # the first failure is still inside the 10m window
    assert await no_cue(client)
    clock.advance(2)  # no signal arrives: a timer at the window's edge re-checks the count (2 < 3)
    withdrawn = await next_withdrawal(events)
    assert (withdrawn.cue_id, withdrawn.reason) == (cue.cue_id, "condition_cleared")
    await client.close()


async def test_explain_device_says_why_not_for_every_scenario(start_server: StartServer) -> None:
    server = await start_server(FAILURES, SEGMENT_ONLY.replace("welcome-premium", "welcome").replace("iOS", "Android"))
    client = await phone(server)
    await fail(client, 2)
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        answer = await admin.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="phone-1"))
    by_id = {s.scenario_id: s for s in answer.scenarios}
    sync = by_id["sync-help"]
    assert sync.status == admin_pb2.SCENARIO_CHECK_STATUS_NOT_QUALIFIED
    checks = {c.path: c for c in sync.conditions}
    assert checks["target"].holds and checks["target"].observed == "is 'premium'"
    assert not checks["trigger"].holds
    assert checks["trigger"].expected == "count(sync_failed) >= 3 within 10m"
    assert checks["trigger"].observed == "observed 2"
    welcome = by_id["welcome"]
    assert welcome.status == admin_pb2.SCENARIO_CHECK_STATUS_NOT_QUALIFIED
    os_check = next(c for c in welcome.conditions if "device.os" in c.expected)
    assert (os_check.expected, os_check.observed, os_check.holds) == ("device.os = 'Android'", "is 'iOS'", False)
    # Qualified, then blocked: the arbiter's reason.
    await fail(client, 1)
    await client.next_cue(timeout=5)
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        answer = await admin.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="phone-1"))
    sync = next(s for s in answer.scenarios if s.scenario_id == "sync-help")
    # Its own rules come first: offered a moment ago, so its cooldown blocks it.
    assert (sync.status, sync.reason) == (admin_pb2.SCENARIO_CHECK_STATUS_BLOCKED, "cooldown")
    assert all(c.holds for c in sync.conditions)
    await client.close()


async def test_cuepoint_explain_prints_each_condition(start_server: StartServer) -> None:
    server = await start_server(FAILURES)
    client = await phone(server)
    await fail(client, 2)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cuepoint_server.cli", "explain", "phone-1", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "sync-help: NOT QUALIFIED" in done.stdout
    assert "yes target: user.tier = 'premium' (observed: is 'premium')" in done.stdout
    assert "NO  trigger: count(sync_failed) >= 3 within 10m (observed: observed 2)" in done.stdout
    await client.close()


async def test_simulate_why_names_the_failing_conditions(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(FAILURES)
    trace = parse_trace(
        '{"t": 0, "device": "d1", "hello": {"app_id": "fitkit", "context": {"user.tier": "basic"}}}\n'
        '{"t": 10, "device": "d1", "event": "sync_failed"}\n'
    )
    outcomes = await simulate(ScenarioSet.load(str(tmp_path)), trace, why=True)
    (why,) = [o for o in outcomes if o.kind == "not_qualified"]
    assert why.data["scenario"] == "sync-help"
    assert why.data["failing"] == [
        ["target", "user.tier = 'premium'", "is 'basic'"],
        ["trigger", "count(sync_failed) >= 3 within 10m", "observed 1"],
    ]
    assert why.text().splitlines()[1] == "    no target: user.tier = 'premium' (observed: is 'basic')"
