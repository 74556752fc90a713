"""Operations switches that last (issue 12, item 7): the runtime pause and per-scenario enable/disable.

Both go through AdminService, are stored before they take effect, survive a restart, and withdraw what is
already on screen. Real server on port 0, real SDK, real gRPC; the restart reopens the same database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc

from .conftest import StartServer, no_cue, phone

HELP = """
id: help
trigger: {event: help}
cue: {message: "Need help?", channel: chat}
"""
SALES = """
id: sales
priority: 10
trigger: {event: pricing}
cue: {message: "Questions about pricing?", channel: chat}
"""


async def withdrawal(client: cuepoint.Client, events: object) -> cuepoint.CueWithdrawal:
    async with asyncio.timeout(5):
        async for event in events:  # type: ignore[attr-defined]
            if isinstance(event, cuepoint.CueWithdrawal):
                return event
    raise AssertionError("stream ended without a withdrawal")


async def admin_call(address: str, method: str, request: object) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        return await getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request)


async def test_pause_withdraws_cues_on_screen_and_outlasts_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "ops.db"
    server = await start_server(HELP, db=db)
    client = await phone(server)
    events = client.events()
    await client.track("help")
    cue = await client.next_cue(timeout=5)
    reply = await admin_call(
        server.address, "SetOffersPaused", admin_pb2.SetOffersPausedRequest(paused=True, reason="incident 4711")
    )
    assert reply.paused  # type: ignore[attr-defined]
    gone = await withdrawal(client, events)
    assert (gone.cue_id, gone.reason) == (cue.cue_id, "paused")
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None and stored.status == "withdrawn"
    await client.close()
    await server.stop(0.5)

    again = await start_server(HELP, db=db)
    scenarios = await admin_call(again.address, "GetScenarios", admin_pb2.GetScenariosRequest())
    assert scenarios.offers_paused  # type: ignore[attr-defined]
    client = await phone(again, "phone-2", user_id="user-2")
    await client.track("help")
    await client.flush()
    assert await no_cue(client)
    explained = await admin_call(again.address, "ExplainDevice", admin_pb2.ExplainDeviceRequest(device_id="phone-2"))
    assert [d.reason for d in explained.decisions] == ["paused"]  # type: ignore[attr-defined]

    await admin_call(again.address, "SetOffersPaused", admin_pb2.SetOffersPausedRequest(paused=False))
    await client.track("help")
    assert (await client.next_cue(timeout=5)).scenario_id == "help"
    await client.close()


async def test_one_scenario_is_switched_off_and_on_and_that_outlasts_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    db = tmp_path / "ops.db"
    server = await start_server(HELP, SALES, db=db)
    client = await phone(server)
    events = client.events()
    await client.track("help")
    cue = await client.next_cue(timeout=5)
    reply = await admin_call(
        server.address,
        "SetScenarioEnabled",
        admin_pb2.SetScenarioEnabledRequest(scenario_id="help", enabled=False, reason="wrong copy"),
    )
    assert not reply.enabled  # type: ignore[attr-defined]
    gone = await withdrawal(client, events)
    assert (gone.cue_id, gone.reason) == (cue.cue_id, "scenario_disabled")
    # The other scenario is untouched.
    await client.track("pricing")
    assert (await client.next_cue(timeout=5)).scenario_id == "sales"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin_call(server.address, "SetScenarioEnabled", admin_pb2.SetScenarioEnabledRequest(scenario_id="nope"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert (info.value.details() or "").startswith("scenario_id:")
    await client.close()
    await server.stop(0.5)

    again = await start_server(HELP, SALES, db=db)
    listed = await admin_call(again.address, "GetScenarios", admin_pb2.GetScenariosRequest())
    info_by_id = {s.id: s for s in listed.scenarios}  # type: ignore[attr-defined]
    assert not info_by_id["help"].enabled and info_by_id["help"].disabled_by_admin
    assert info_by_id["help"].disabled_reason == "wrong copy"
    assert info_by_id["sales"].enabled
    client = await phone(again, "phone-2", user_id="user-2")
    await client.track("help")
    await client.flush()
    assert await no_cue(client)

    await admin_call(
        again.address, "SetScenarioEnabled", admin_pb2.SetScenarioEnabledRequest(scenario_id="help", enabled=True)
    )
    await client.track("help")
    assert (await client.next_cue(timeout=5)).scenario_id == "help"
    await client.close()
