"""Device deadlines (idle, dwell, absence) are timer rows across replicas (issue 14, "Timers are rows").

Two real `cuepoint serve` processes on the run's PostgreSQL and the local NATS (tests/cluster.py, the fixtures
of test_e2e_cluster.py). The replica holding a device fires its deadline from memory, as alone; the deadline is
also its row, so when that replica is SIGKILLed another claims it once due and fires it, exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cuepoint_server.storage import PostgresStore, TimerRecord

from .conftest import no_cue
from .test_e2e_cluster import StartCluster, cluster, device  # noqa: F401 - `cluster` is a fixture
from .test_e2e_webhooks import Receiver

# Fires only once the device has been quiet for 6 s: time enough to kill its replica first. A device gone
# by then still gets the cue, waiting for it, with a push (when_away).
IDLE_AWAY = """
id: nudge
trigger: {idle: 6s}
cue:
  message: "Still there?"
  channel: chat
  ttl: 10m
  when_away: {fallback: webhook, ttl: 1h}
"""

HOOKS = ("--webhook-secret", "whsec-test", "--replica-ttl", "1")


def events(receiver: Receiver, kind: str, device_id: str) -> dict[str, dict[str, Any]]:
    """Distinct events of `kind` for the device, by event id (a delivery retried after a crash repeats its id)."""
    return {e["id"]: e["data"] for e in receiver.events() if e["type"] == kind and e["data"]["device_id"] == device_id}


async def stored(database: str, device_id: str) -> tuple[list[str], list[TimerRecord]]:
    """The device's cues (ids) and every timer row, as committed."""
    async with await PostgresStore.open(database) as store:
        cues = [str(r[0]) for r in await store.query("SELECT cue_id FROM cues WHERE device_id = ?", (device_id,))]
        return cues, await store.timers()


async def test_an_idle_deadline_armed_on_a_fires_once_on_b_after_a_is_killed(cluster: StartCluster) -> None:  # noqa: F811
    receiver = Receiver()
    try:
        a, b = await cluster(IDLE_AWAY, extra=("--webhook", receiver.url, *HOOKS))
        phone = await device(a, "phone-a")
        await phone.track("browse")
        await phone.flush(timeout=10)
        # SIGKILL before the 6 s are up: A's alarm dies with it and the device is connected nowhere.
        await a.kill()
        await phone.close()
        # B claims the row once A's lease lapsed and it fell due, rebuilds the device from storage and fires
        # the scenario for it away: the cue waits for the device, and the app is asked to push it.
        async with asyncio.timeout(30):
            while not events(receiver, "cue.pending_push", "phone-a"):  # noqa: ASYNC110 - the receiver's thread
                await asyncio.sleep(0.05)
        [push] = events(receiver, "cue.pending_push", "phone-a").values()
        cues, timers = await stored(a.database, "phone-a")
        assert cues == [push["cue_id"]]
        [row] = [t for t in timers if t.timer_id == "device:phone-a"]
        assert row.state == "done" and row.claimed_by not in ("", row.owner)  # fired by B's claim, not by A
        # The device reconnects to B: it gets that cue, and nothing fires a second time.
        back = await device(b, "phone-a")
        cue = await back.next_cue(timeout=10)
        assert cue.cue_id == push["cue_id"]
        assert await no_cue(back)
        assert (await stored(a.database, "phone-a"))[0] == [push["cue_id"]]
        assert len(events(receiver, "cue.pending_push", "phone-a")) == 1
        await back.close()
    finally:
        receiver.server.shutdown()


# Its cue expires soon after it is shown: its expiry row, claimed by B once A is gone, tells the test that B's
# claims ran (they take every due row of A's, soonest first, the device's deadline with them).
IDLE_SHORT = """
id: nudge
trigger: {idle: 2s}
cue:
  message: "Still there?"
  channel: chat
  ttl: 3s
  when_away: {fallback: webhook, ttl: 1h}
"""


async def test_an_idle_deadline_a_fired_before_dying_is_not_fired_again_on_b(cluster: StartCluster) -> None:  # noqa: F811
    receiver = Receiver()
    try:
        a, b = await cluster(IDLE_SHORT, extra=("--webhook", receiver.url, *HOOKS))
        phone = await device(a, "phone-a")
        await phone.track("browse")
        await phone.flush(timeout=10)
        first = await phone.next_cue(timeout=20)  # fired by A, live
        await phone.dismiss(first)
        await phone.flush(timeout=10)
        await a.kill()
        await phone.close()
        # Once B claimed A's due rows (the dismissed cue's expiry among them), the deadline A fired is behind.
        async with asyncio.timeout(30):
            while True:
                _, timers = await stored(a.database, "phone-a")
                expiry = [t for t in timers if t.timer_id == f"cue_expiry:{first.cue_id}"]
                if expiry and expiry[0].state == "done":
                    break
                await asyncio.sleep(0.1)
        assert expiry[0].claimed_by not in ("", expiry[0].owner)
        [row] = [t for t in timers if t.timer_id == "device:phone-a"]
        assert row.state == "done" and row.claimed_by == ""  # fired by A's own alarm, never claimed
        back = await device(b, "phone-a")
        assert await no_cue(back)
        assert (await stored(a.database, "phone-a"))[0] == [first.cue_id]
        assert events(receiver, "cue.pending_push", "phone-a") == {}
        await back.close()
    finally:
        receiver.server.shutdown()
