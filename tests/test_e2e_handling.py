"""Handling times per queue and associate (issue 18, item 6), from real engagements.

Real server on port 0 with a hand-driven clock, real SDK devices and associates; the figures read through
AdminService.GetHandlingTimes and `cuepoint report --handling` must match what the clock says happened.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .conftest import StartServer, db_option, phone
from .test_e2e_engagements import associate, eventually

DESK = """
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need help?", channel: chat, queue: support}
  - id: billing-help
    trigger: {event: billing}
    cue: {message: "A billing question?", channel: chat, queue: billing}
"""


async def ask(server: object, device_id: str, event: str = "help") -> tuple[cuepoint.Client, cuepoint.Engagement]:
    client = await phone(server, device_id, user_id=f"{device_id}-user")  # type: ignore[arg-type]
    await client.track(event)
    await client.flush(timeout=5)
    engagement = await client.accept(await client.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    return client, engagement


async def report(server: CuepointServer, *more: str) -> str:
    """`cuepoint report --handling` over the server's database, as a user runs it."""
    where = db_option(server)
    args = [sys.executable, "-m", "cuepoint_server.cli", "report", *where, "--since", "all", "--handling", *more]
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, check=True)
    return done.stdout


def seconds(d: object) -> float:
    return d.seconds + d.nanos / 1e9  # type: ignore[attr-defined]


async def test_handle_and_wrap_up_times_per_queue_and_associate(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(DESK)
    ann = await associate(server, "ann")

    # 1. Ann talks for 60 s and ends it with her wrap-up: handle 60 s, wrap-up 0 s.
    c1, e1 = await ask(server, "p1")
    a1 = await ann.next_engagement(timeout=5)
    clock.advance(60)
    await ann.end(a1, disposition="resolved")
    await e1.wait_for(cuepoint.EngagementState.ENDED, timeout=5)

    # 2. The user leaves after 180 s; Ann wraps up 30 s later: handle 180 s, wrap-up 30 s.
    c2, e2 = await ask(server, "p2")
    a2 = await ann.next_engagement(timeout=5)
    clock.advance(180)
    await e2.end()
    await e2.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    clock.advance(30)
    await ann.end(a2, disposition="abandoned")

    async def wrapped() -> bool:
        stored = await server.store.get_engagement(e2.engagement_id)
        return stored is not None and stored.disposition == "abandoned"

    await eventually(wrapped)

    # 3. The user leaves after 40 s and Ann has not wrapped up yet: handle 40 s, awaiting wrap-up.
    c3, e3 = await ask(server, "p3")
    await ann.next_engagement(timeout=5)
    clock.advance(40)
    await e3.end()
    await e3.wait_for(cuepoint.EngagementState.ENDED, timeout=5)

    # 4. Billing: nobody there for 20 s (wait 20 s), then Bob talks for 120 s.
    c4, e4 = await ask(server, "p4", "billing")
    clock.advance(20)
    bob = await associate(server, "bob", queues=["billing"])
    a4 = await bob.next_engagement(timeout=5)
    clock.advance(120)
    await bob.end(a4, disposition="resolved")
    await e4.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await server.core.drain()

    async with grpc.aio.insecure_channel(server.address) as channel:
        got = await admin_pb2_grpc.AdminServiceStub(channel).GetHandlingTimes(admin_pb2.GetHandlingTimesRequest())
    figures = {
        (f.queue, f.associate_id): (
            f.engagements,
            round(seconds(f.average_handle), 2),
            seconds(f.median_handle),
            seconds(f.average_wrap_up),
            seconds(f.median_wrap_up),
            f.awaiting_wrap_up,
            seconds(f.average_wait),
        )
        for f in (*got.queues, *got.associates)
    }
    ann_figures = (3, round((60 + 180 + 40) / 3, 2), 60.0, 15.0, 15.0, 1, 0.0)
    bob_figures = (1, 120.0, 120.0, 0.0, 0.0, 0, 20.0)
    assert figures == {
        ("support", ""): ann_figures,
        ("", "ann"): ann_figures,
        ("billing", ""): bob_figures,
        ("", "bob"): bob_figures,
    }

    # The command line reads the same from the database file.
    doc = json.loads(await report(server, "--json"))
    assert [(q["queue"], q["engagements"], q["median_handle"], q["awaiting_wrap_up"]) for q in doc["queues"]] == [
        ("billing", 1, 120.0, 0),
        ("support", 3, 60.0, 1),
    ]
    assert [(a["associate_id"], a["average_wrap_up"], a["average_wait"]) for a in doc["associates"]] == [
        ("ann", 15.0, 0.0),
        ("bob", 0.0, 20.0),
    ]
    table = await report(server)
    assert "support" in table and "1:33" in table  # the average handle, 93 s
    for c in (c1, c2, c3, c4, ann, bob):
        await c.close()


async def test_bad_range_is_invalid_argument(start_server: StartServer) -> None:
    server = await start_server(DESK)
    request = admin_pb2.GetHandlingTimesRequest()
    request.start.FromSeconds(2_000_000_000)
    request.end.FromSeconds(1_000_000_000)
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await admin_pb2_grpc.AdminServiceStub(channel).GetHandlingTimes(request)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "end" in (raised.value.details() or "")
