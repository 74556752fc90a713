"""While the user waits (issue 17, item 5): a queued engagement tells its device its position in line and an
estimated wait, from the queue's recent handle times and staffing, and again as the line moves.
Real server, real SDK, a hand-driven clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import cuepoint
from cuepoint_server.clock import ManualClock

from .conftest import StartServer, phone

SCENARIO = """
scenarios:
  - id: sync-help
    trigger: {event: sync_failed}
    cue: {message: "Sync trouble?", channel: chat, queue: support}
"""


async def accepted(client: cuepoint.Client) -> cuepoint.Engagement:
    await client.track("sync_failed")
    await client.flush()
    return await client.accept(await client.next_cue(timeout=5))


async def told(engagement: cuepoint.Engagement, position: int) -> cuepoint.EngagementUpdate:
    """The first update that puts the engagement at `position` in line."""
    async with asyncio.timeout(5):
        async for update in engagement.updates():
            if update.state is cuepoint.EngagementState.QUEUED and update.queue_position == position:
                return update
    raise AssertionError(f"never told position {position}")


async def test_queued_devices_see_their_position_and_wait_move_as_the_associate_works(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(SCENARIO)
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])

    # No history yet: dana is busy, the next one waits first in line with no estimate to give.
    first = await accepted(await phone(server, "phone-0", user_id="u0"))
    await first.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    busy = await dana.next_engagement(timeout=5)
    waiting = await accepted(await phone(server, "phone-x", user_id="ux"))
    update = await told(waiting, 1)
    assert (update.estimated_wait, waiting.queue_position, waiting.estimated_wait) == (None, 1, None)

    # Dana's first engagement took two minutes: that is the queue's history now.
    clock.advance(120)
    await dana.end(busy, disposition="resolved")
    await waiting.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert waiting.queue_position is None
    busy = await dana.next_engagement(timeout=5)

    # Three devices queue behind her, one second apart (the line is served oldest first).
    lined: list[cuepoint.Engagement] = []
    seen: list[list[tuple[int, float | None]]] = []
    for n in (1, 2, 3):
        clock.advance(1)
        engagement = await accepted(await phone(server, f"phone-{n}", user_id=f"u{n}"))
        log: list[tuple[int, float | None]] = []
        engagement.on_queue_update(lambda u, log=log: log.append((u.queue_position, u.estimated_wait)))
        await told(engagement, n)
        lined.append(engagement)
        seen.append(log)
    # position x average handle time (120 s) / one staffed slot
    assert [(e.queue_position, e.estimated_wait) for e in lined] == [(1, 120.0), (2, 240.0), (3, 360.0)]

    # She finishes the next in a minute (history 120 s, 60 s: 90 s on average) and takes phone-1: the rest move up.
    clock.advance(57)
    await dana.end(busy, disposition="resolved")
    await lined[0].wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    await told(lined[1], 1)
    await told(lined[2], 2)
    assert [(e.queue_position, e.estimated_wait) for e in lined[1:]] == [(1, 90.0), (2, 180.0)]
    assert lined[0].queue_position is None and lined[0].estimated_wait is None

    taken = await dana.next_engagement(timeout=5)
    assert taken.engagement_id == lined[0].engagement_id
    clock.advance(30)  # history 120, 60, 30: 70 s on average
    await dana.end(taken, disposition="resolved")
    await lined[1].wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    update = await told(lined[2], 1)
    assert update.estimated_wait == pytest.approx(70.0)

    # A second associate staffs the queue: the periodic re-estimate halves the wait (two slots), phone-3 is
    # told without moving in line. She is busy (signed in, not taking work yet), so nobody moves.
    await cuepoint.connect_associate(
        server.address, associate_id="eve", queues=["support"], capacity=2, presence=cuepoint.Presence.BUSY
    )
    clock.advance(20)
    async with asyncio.timeout(5):
        async for update in lined[2].updates():
            if update.estimated_wait == pytest.approx(70.0 / 3):
                break
    assert lined[2].queue_position == 1

    # Each device's callback heard every move once, in order, and nothing twice.
    assert [p for p, _ in seen[0]] == [1]
    assert [p for p, _ in seen[1]] == [2, 1]
    assert seen[2] == [(3, 360.0), (2, 180.0), (1, pytest.approx(70.0)), (1, pytest.approx(70.0 / 3))]


async def test_the_estimate_starts_from_stored_handle_times_after_a_restart(
    start_server: StartServer, clock: ManualClock, tmp_path: Path
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    options: dict[str, Any] = {"scenarios": folder, "db": tmp_path / "wait.db"}
    server = await start_server(**options)
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])
    first = await accepted(await phone(server, "phone-0", user_id="u0"))
    handled = await dana.next_engagement(timeout=5)
    clock.advance(90)  # the queue's only finished engagement took 90 s
    await dana.end(handled, disposition="resolved")
    await first.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    await dana.close()
    await server.stop(0.5)

    # A new process: nothing finished since it started, yet the estimate has its history.
    server = await start_server(**options)
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])
    busy = await accepted(await phone(server, "phone-1", user_id="u1"))
    await busy.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    waiting = await accepted(await phone(server, "phone-2", user_id="u2"))
    update = await told(waiting, 1)
    assert update.estimated_wait == pytest.approx(90)  # 1 in line x 90 s / 1 slot
    await dana.close()
