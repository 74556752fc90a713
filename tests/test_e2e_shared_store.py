"""Two servers on one database (issue 14): per-user decisions hold when one user's devices are on both.

Each server decides from its own memory of the user; the offer commit checks the user's stored cues again
under the user's lock (PostgreSQL: a transaction-scoped advisory lock) and refuses a cue another server's
offer has made too many. Runs on both backends: on SQLite the two servers share one file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import cuepoint

from .conftest import StartServer, no_cue, phone

HELP = """
id: help
trigger: {event: stuck}
cue: {message: "Need a hand?", channel: chat, ttl: 10m}
cooldown: 1h
caps: {per_day: 1}
"""


async def test_one_user_on_two_servers_gets_one_cue(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a = await start_server(HELP, db=db)
    b = await start_server(HELP, db=db)
    # Both devices are connected before anything is offered: B's memory of user-1 is empty.
    tablet = await phone(b, "tablet-1")
    mobile = await phone(a, "phone-1")
    await mobile.track("stuck")
    await mobile.flush(timeout=5)
    cue = await mobile.next_cue(timeout=5)
    assert cue.scenario_id == "help"

    await tablet.track("stuck")
    await tablet.flush(timeout=5)
    assert await no_cue(tablet)  # B offered from its memory; the commit saw A's cue and refused
    stored = await b.store.cues_for_subject("user:user-1")
    assert [c.cue_id for c in stored] == [cue.cue_id]
    decisions = await b.store.decisions_for_device("tablet-1")
    assert [(d.outcome, d.reason, d.cue_id) for d in decisions] == [("blocked", "cooldown", "")]

    # B read the user's memory again after the refusal: the next signal is blocked before any commit.
    await tablet.track("stuck")
    await tablet.flush(timeout=5)
    assert await no_cue(tablet)
    assert [d.reason for d in await b.store.decisions_for_device("tablet-1")] == ["cooldown", "cooldown"]
    await tablet.close()
    await mobile.close()


async def test_a_decline_on_one_server_is_remembered_by_the_other(start_server: StartServer, tmp_path: Path) -> None:
    text = HELP.replace("cooldown: 1h\ncaps: {per_day: 1}", "after_decline: never")
    db = tmp_path / "shared.db"
    a = await start_server(text, db=db)
    b = await start_server(text, db=db)
    tablet = await phone(b, "tablet-1")
    mobile = await phone(a, "phone-1")
    await mobile.track("stuck")
    await mobile.flush(timeout=5)
    await mobile.decline(await mobile.next_cue(timeout=5))
    # A decline is a response, not a signal: flush() does not wait for it, so wait until A has stored it.
    for _ in range(500):
        if [c.status for c in await a.store.cues_for_subject("user:user-1")] == ["declined"]:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("server A never stored the decline")
    await a.core.drain()

    await tablet.track("stuck")
    await tablet.flush(timeout=5)
    assert await no_cue(tablet)
    assert [d.reason for d in await b.store.decisions_for_device("tablet-1")] == ["declined"]
    await tablet.close()
    await mobile.close()


async def test_an_identity_merge_counts_on_the_other_server(start_server: StartServer, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a = await start_server(HELP, db=db)
    b = await start_server(HELP, db=db)
    tablet = await phone(b, "tablet-1")  # user-1, signed in on B
    anonymous = await cuepoint.connect(a.address, app_id="fitkit", device_id="phone-1", consent=cuepoint.Consent.FULL)
    await anonymous.track("stuck")
    await anonymous.flush(timeout=5)
    await anonymous.next_cue(timeout=5)  # offered to device:phone-1
    await anonymous.set_context(user=cuepoint.User(user_id="user-1"))  # signs in: the cue is now user-1's
    await anonymous.flush(timeout=5)
    await a.core.drain()

    assert [c.device_id for c in await b.store.cues_for_subject("user:user-1")] == ["phone-1"]
    await tablet.track("stuck")
    await tablet.flush(timeout=5)
    assert await no_cue(tablet)
    assert [d.reason for d in await b.store.decisions_for_device("tablet-1")] == ["cooldown"]
    await tablet.close()
    await anonymous.close()
