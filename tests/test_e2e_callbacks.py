"""Callbacks: the user picks a time in the fallback; it is stored, a timer that outlasts a restart queues the
engagement again then, and the associate (gRPC and the browser desk) gets it as a callback; the console
lists it. Real server (restarted on the same database), real SDK, real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

import cuepoint
from cuepoint_server.clock import ManualClock
from cuepoint_server.webhooks import WebhookConfig

from .conftest import StartServer
from .desk_cast import ADMIN, AUTH, DANA, FAY, fitkit_phone
from .test_e2e_webhooks import Receiver
from .test_http_api import client, next_event, sign_in

SCENARIO = """
routing:
  queues:
    - {id: fitkit-support, fallback_after: 2m}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: fitkit-support}
"""
HOUR = 3600.0


async def wants_a_callback(phone: cuepoint.Client, clock: ManualClock, at: float | None) -> cuepoint.Engagement:
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)  # its fallback timer is armed
    clock.advance(121)  # nobody signed in: the fallback is offered
    await engagement.wait_fallback(timeout=5)
    await engagement.choose_fallback(cuepoint.FallbackOption.CALLBACK, "+1 555 0100", callback_at=at)
    return engagement


async def console_callbacks(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/api/console/live") as response:
        assert response.status == 200
        callbacks: list[dict[str, Any]] = (await response.json())["callbacks"]
        return callbacks


async def test_a_callback_is_stored_queued_again_at_its_time_after_a_restart_and_shown_as_one(
    start_server: StartServer, clock: ManualClock, tmp_path: Any
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    db = tmp_path / "callbacks.db"
    receiver = Receiver()
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01, events=("engagement.callback_scheduled",))
    options: dict[str, Any] = {"scenarios": folder, "db": db, "auth": AUTH, "http_port": 0, "webhooks": (hook,)}
    server = await start_server(**options)
    at = clock.now() + HOUR
    first = await fitkit_phone(server, "phone-1")
    engagement = await wants_a_callback(first, clock, at)
    update = await engagement.wait_for(cuepoint.EngagementState.CALLBACK_REQUESTED, timeout=5)
    assert update.callback_at == pytest.approx(at)  # the device is told when
    second = await fitkit_phone(server, "phone-2")
    other = await wants_a_callback(second, clock, at + 60)
    await other.wait_for(cuepoint.EngagementState.CALLBACK_REQUESTED, timeout=5)
    stored = await server.store.get_engagement(engagement.engagement_id)
    assert stored is not None
    assert (stored.state, stored.callback_at, stored.callback_number) == ("callback_requested", at, "+1 555 0100")
    await receiver.wait_for("engagement.callback_scheduled")
    scheduled = next(e["data"] for e in receiver.events() if e["data"]["engagement_id"] == engagement.engagement_id)
    assert (scheduled["kind"], scheduled["callback_at"], scheduled["callback_number"]) == (
        "callback",
        at,
        "+1 555 0100",
    )
    for phone in (first, second):
        await phone.close()
    await server.stop(0.5)

    # Restarted: the callbacks come back from storage, waiting for their time.
    clock.advance(HOUR / 2)
    server = await start_server(**options)
    async with client() as admin_http, client() as fay_http:
        await sign_in(admin_http, server, "/api/console/session", token=ADMIN)
        waiting = await console_callbacks(admin_http, str(server.http_url))
        assert [(c["engagement_id"], c["state"], c["callback_at"]) for c in waiting] == [
            (engagement.engagement_id, "callback_requested", at),
            (other.engagement_id, "callback_requested", at + 60),
        ]
        dana = await cuepoint.connect_associate(
            server.address,
            associate_id="dana",
            queues=["fitkit-support"],
            config=cuepoint.AssociateConfig(token=DANA),
        )
        await sign_in(fay_http, server, "/api/desk/session", token=FAY)
        async with fay_http.ws_connect(f"{server.http_url}/api/desk/ws") as fay:
            await next_event(fay, "signed_in")
            clock.advance(HOUR / 2 + 61)  # both fall due: one for each associate
            assigned = await dana.next_engagement(timeout=5)
            assert assigned.kind is cuepoint.EngagementKind.CALLBACK
            assert assigned.callback_number == "+1 555 0100"
            shown = (await next_event(fay, "offered"))["engagement"]
            assert (shown["kind"], shown["callback_number"]) == ("callback", "+1 555 0100")
            times = {engagement.engagement_id: at, other.engagement_id: at + 60}
            assert {assigned.engagement_id, shown["engagement_id"]} == set(times)
            assert assigned.callback_at == pytest.approx(times[assigned.engagement_id])
            assert shown["callback_at"] == pytest.approx(times[shown["engagement_id"]])
            now_shown = await console_callbacks(admin_http, str(server.http_url))
            assert {(c["engagement_id"], c["state"]) for c in now_shown} == {
                (assigned.engagement_id, "assigned"),
                (shown["engagement_id"], "queued"),  # offered to Fay, to claim
            }
        await dana.end(assigned, disposition="called_back", notes="rang at the chosen time")
        async with asyncio.timeout(5):
            while (done := await server.store.get_engagement(assigned.engagement_id)) is None or done.state != "ended":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert done.disposition == "called_back" and done.callback_at == times[assigned.engagement_id]
        await dana.close()


async def test_a_callback_more_than_30_days_ahead_is_invalid_argument(
    start_server: StartServer, clock: ManualClock, tmp_path: Any
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    server = await start_server(scenarios=folder, auth=AUTH)
    phone = await fitkit_phone(server, "phone-3")
    await wants_a_callback(phone, clock, clock.now() + 31 * 86400)
    async with asyncio.timeout(5):
        while phone.failure is None:  # noqa: ASYNC110 - set by the SDK's stream task
            await asyncio.sleep(0.02)
    assert "fallback_choice.callback_at" in str(phone.failure)
    await phone.close()
