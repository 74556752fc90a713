"""Several replicas on one database and one NATS (issue 14): the same guarantees as one process.

Two real `cuepoint serve` processes on loopback share the run's fresh PostgreSQL database and the local NATS
(127.0.0.1:4222, a subject prefix of their own). Without both services these tests are skipped with one line
saying why, unless CUEPOINT_REQUIRE_SERVICES=1 (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.scenarios.reloader import folder_digest
from cuepoint_server.storage import PostgresStore

from .cluster import Replica, nats_answers, run_prefix
from .conftest import no_cue, pg_url_for
from .test_e2e_webhooks import Receiver

HELP = """
id: help
trigger: {event: help}
cue: {message: "Need help?", channel: audio, upgrades: [chat], queue: support, ttl: 10m}
"""

StartCluster = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def cluster(tmp_path: Path, pg_database: str) -> AsyncIterator[StartCluster]:
    why = nats_answers()
    if why:
        if os.environ.get("CUEPOINT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{why}, but CUEPOINT_REQUIRE_SERVICES=1 requires it", pytrace=False)
        pytest.skip(f"{why}: multi-replica tests skipped")
    prefix = run_prefix()
    replicas: list[Replica] = []

    async def start(*scenario_texts: str, count: int = 2, extra: tuple[str, ...] = ()) -> list[Replica]:
        folder = tmp_path / "scenarios"
        folder.mkdir(exist_ok=True)
        for i, text in enumerate(scenario_texts):
            (folder / f"s{i}.yaml").write_text(text)
        # One schema of the run's fresh database, shared by every replica of this test.
        database = pg_url_for(pg_database, prefix)
        started = [
            Replica(name, folder, database, prefix, tmp_path / f"{name}.log", *extra)
            for name in "ABCD"[len(replicas) : len(replicas) + count]
        ]
        for replica in started:
            await replica.start()
            replicas.append(replica)
        return started

    yield start
    for replica in replicas:
        await replica.stop()


async def admin(address: str, method: str, request: object) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        return await getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request)


async def device(
    replica: Replica, device_id: str, user_id: str = "", consent: cuepoint.Consent | None = None
) -> cuepoint.Client:
    return await cuepoint.connect(
        replica.address,
        app_id="fitkit",
        device_id=device_id,
        user=cuepoint.User(user_id=user_id or f"user-{device_id}"),
        **({"consent": consent} if consent is not None else {}),
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )


async def test_a_device_on_a_reaches_an_associate_on_b(cluster: StartCluster) -> None:
    a, b = await cluster(HELP)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    # Routed by replica A to the associate whose stream replica B holds, with the full context.
    assigned = await dana.next_engagement(timeout=20)
    # The device may hear of its engagement after the associate does: compare once it has.
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=10)
    assert (assigned.engagement_id, assigned.context.device_id) == (engagement.engagement_id, "phone-a")
    # Chat both ways across the replicas.
    await engagement.send_chat("My sync keeps failing")
    await dana.send_chat(assigned, "Let's look at it")
    async with asyncio.timeout(10):
        seen_by_dana = [m.text async for m in _take(dana.messages(assigned), 2)]
        seen_by_phone = [m.text async for m in _take(engagement.messages(), 2)]
    assert seen_by_dana == seen_by_phone == ["My sync keeps failing", "Let's look at it"]
    # Dana's wrap-up on B ends the engagement owned by A; the phone hears of it.
    await dana.end(assigned, disposition="resolved", notes="across replicas")
    ended = await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=10)
    assert ended.state is cuepoint.EngagementState.ENDED
    await phone.close()
    await dana.close()


async def test_pause_on_a_stops_offers_on_b(cluster: StartCluster) -> None:
    a, b = await cluster(HELP)
    phone = await device(b, "phone-b")
    events = phone.events()
    await phone.track("help")
    cue = await phone.next_cue(timeout=10)
    await admin(a.address, "SetOffersPaused", admin_pb2.SetOffersPausedRequest(paused=True, reason="incident"))
    # Replica B learns of the switch from the bus and withdraws the cue it holds on screen.
    async with asyncio.timeout(20):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                assert (event.cue_id, event.reason) == (cue.cue_id, "paused")
                break
    status = await admin(b.address, "GetScenarios", admin_pb2.GetScenariosRequest())
    assert status.offers_paused  # type: ignore[attr-defined]
    # And offers nothing new.
    other = await device(b, "phone-b2")
    await other.track("help")
    await other.flush(timeout=10)
    explained = await admin(b.address, "ExplainDevice", admin_pb2.ExplainDeviceRequest(device_id="phone-b2"))
    assert [d.reason for d in explained.decisions] == ["paused"]  # type: ignore[attr-defined]
    await phone.close()
    await other.close()


async def _take(source: AsyncIterator[cuepoint.ChatMessage], n: int) -> AsyncIterator[cuepoint.ChatMessage]:
    count = 0
    async for item in source:
        yield item
        count += 1
        if count == n:
            return


# A window that still holds after the reconnect, so the cue stays on screen across it.
STICKY = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, queue: support, ttl: 10m}
"""


async def test_a_device_resumes_on_b_after_a_drains(cluster: StartCluster) -> None:
    a, b = await cluster(STICKY)
    # One target, both replicas: what a load balancer in front of them looks like to the SDK.
    client = await cuepoint.connect(
        f"ipv4:{a.address},{b.address}",
        app_id="fitkit",
        device_id="roamer",
        config=cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.3),
    )
    cues: list[str] = []
    client.on_cue(lambda cue: cues.append(cue.cue_id))
    session = client.session_id
    for _ in range(3):
        await client.track("sync_failed")
    offered = await client.next_cue(timeout=10)
    assert await a.drain() == 0  # SIGTERM: GOAWAY, grace, every write flushed
    await client.track("after-drain")
    await client.flush(timeout=30)
    # Resumed on B from the shared database: the same session, the same cue on screen (shown once), and
    # answering it there works.
    assert client.session_id == session
    engagement = await client.accept(offered)
    assert engagement.cue_id == offered.cue_id
    assert cues == [offered.cue_id]
    await client.close()


async def test_replicas_register_themselves_and_a_drained_one_leaves(cluster: StartCluster) -> None:
    a, b = await cluster(HELP)
    store = await PostgresStore.open(a.database)
    try:
        rows = {r.address: r for r in await store.replicas()}
        assert set(rows) == {a.address, b.address}
        assert len({r.replica_id for r in rows.values()}) == 2
        # The same folder: the same scenario set version on both.
        assert {len(r.scenarios_version) for r in rows.values()} == {12}
        assert rows[a.address].scenarios_version == rows[b.address].scenarios_version
        assert not any(r.draining for r in rows.values())
        assert await a.drain() == 0
        assert [r.address for r in await store.replicas()] == [b.address]
    finally:
        await store.close()


CAPPED = """
id: help
trigger: {event: stuck}
cue: {message: "Need a hand?", channel: chat, ttl: 10m}
caps: {per_day: 1}
"""


async def test_two_devices_of_one_user_on_a_and_b_consume_a_cap_once(cluster: StartCluster) -> None:
    a, b = await cluster(CAPPED)
    users = [f"racer-{i}" for i in range(6)]
    # Full consent: the user id is the subject of per-user policy (otherwise each device is its own).
    full = cuepoint.Consent.FULL
    pairs = [
        (await device(a, f"{user}-phone", user, full), await device(b, f"{user}-tablet", user, full)) for user in users
    ]
    # Every device qualifies at once, each user's phone on A and tablet on B: both replicas decide from a
    # memory of the user with no offer in it, so each user's two offers race to commit.
    everyone = [d for pair in pairs for d in pair]
    await asyncio.gather(*(d.track("stuck") for d in everyone))
    await asyncio.gather(*(d.flush(timeout=15) for d in everyone))
    store = await PostgresStore.open(a.database)
    try:
        for user in users:
            assert len(await store.cues_for_subject(f"user:{user}")) == 1, user
            decisions = [
                (d.outcome, d.reason)
                for device_id in (f"{user}-phone", f"{user}-tablet")
                for d in await store.decisions_for_device(device_id)
            ]
            assert sorted(decisions) == [("blocked", "cap"), ("offered", "")], user
    finally:
        await store.close()
    # Exactly one of each user's devices has the cue on screen.
    for phone, tablet in pairs:
        assert sorted([await no_cue(phone), await no_cue(tablet)]) == [False, True]
    # The funnel reads the shared database: either replica counts both replicas' decisions.
    for replica in (a, b):
        funnel = await admin(replica.address, "GetFunnel", admin_pb2.GetFunnelRequest())
        (row,) = funnel.rows  # type: ignore[attr-defined]
        assert (row.qualified, row.offered, row.blocked_total) == (12, 6, 6)
    for d in everyone:
        await d.close()


async def _replicas_cli(database: str) -> tuple[int, str]:
    """`cuepoint replicas --database URL`: its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cuepoint_server.cli", "replicas", "--database", database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    return int(process.returncode or 0), out.decode()


async def _scenarios(replica: Replica) -> admin_pb2.GetScenariosResponse:
    status = await admin(replica.address, "GetScenarios", admin_pb2.GetScenariosRequest())
    assert isinstance(status, admin_pb2.GetScenariosResponse)
    return status


async def _versions_once(replica: Replica, want: dict[str, str]) -> admin_pb2.GetScenariosResponse:
    """GetScenarios once the registry shows `want` (address -> version): a reload is applied in the background."""
    async with asyncio.timeout(20):
        while True:
            status = await _scenarios(replica)
            if {r.address: r.scenarios_version for r in status.replicas} == want:
                return status
            await asyncio.sleep(0.1)


async def test_live_now_and_scenario_versions_cover_every_replica(cluster: StartCluster, tmp_path: Path) -> None:
    a, b = await cluster(HELP)
    on_a, on_b = await device(a, "live-a"), await device(b, "live-b")
    for client in (on_a, on_b):
        await client.track("browse")
        await client.flush(timeout=10)
    status = await _scenarios(a)
    ids = {r.address: r.replica_id for r in status.replicas}
    assert set(ids) == {a.address, b.address} and all(r.alive for r in status.replicas)
    # Live now asked of either replica shows the sessions of both, each with the replica holding it.
    for replica in (a, b):
        live = await admin(replica.address, "ListLiveSessions", admin_pb2.ListLiveSessionsRequest())
        assert isinstance(live, admin_pb2.ListLiveSessionsResponse)
        held = {s.device_id: s.replica_id for s in live.sessions}
        assert held == {"live-a": ids[a.address], "live-b": ids[b.address]}
        assert list(live.unanswered_replicas) == []

    # Each replica loads the folder on its own: a change reloaded on A only shows A new, B old, and the
    # disagreement; once B reloads too, both agree.
    folder = tmp_path / "scenarios"
    old = folder_digest(folder)[:12]
    assert not status.versions_differ
    assert {r.scenarios_version for r in status.replicas} == {old}
    (folder / "s0.yaml").write_text(HELP.replace("Need help?", "Can we help?"))
    new = folder_digest(folder)[:12]
    assert new != old
    a.reload()
    status = await _versions_once(b, {a.address: new, b.address: old})
    assert status.versions_differ
    code, out = await _replicas_cli(a.database)
    assert code == 1 and "different scenario versions" in out
    b.reload()
    status = await _versions_once(a, {a.address: new, b.address: new})
    assert not status.versions_differ
    code, out = await _replicas_cli(a.database)
    assert code == 0 and out.count(f"scenarios {new}  serving") == 2
    await on_a.close()
    await on_b.close()


async def settled(engagement: cuepoint.Engagement) -> str:
    """How routing decided an accepted engagement: "assigned", or "waiting" once it is told its place in line."""
    async with asyncio.timeout(20):
        async for update in engagement.updates():
            if update.state is cuepoint.EngagementState.ASSIGNED:
                return "assigned"
            if update.state is cuepoint.EngagementState.QUEUED and update.queue_position > 0:
                return "waiting"
    raise AssertionError("the engagement's updates ended undecided")


async def test_two_replicas_race_for_one_longest_idle_associate_and_one_wins(cluster: StartCluster) -> None:
    a, b = await cluster(HELP)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"], capacity=1)
    # Replica A reaches Dana (its stand-in of her stream is up): one engagement there and back.
    probe = await device(a, "probe")
    await probe.track("help")
    await probe.accept(await probe.next_cue(timeout=10))
    await dana.end(await dana.next_engagement(timeout=20), disposition="resolved")
    # Two devices, one on each replica, accept at the same moment; Dana has room for one.
    phones = [await device(a, "phone-a"), await device(b, "phone-b")]
    cues = []
    for phone in phones:
        await phone.track("help")
        cues.append(await phone.next_cue(timeout=10))
    engagements = await asyncio.gather(*(p.accept(c) for p, c in zip(phones, cues, strict=True)))
    # One is assigned; the other is told its place in line (a second assignment would exceed her capacity).
    outcomes = await asyncio.gather(*(settled(e) for e in engagements))
    assert sorted(outcomes) == ["assigned", "waiting"]
    winner, loser = engagements if outcomes[0] == "assigned" else engagements[::-1]
    first = await dana.next_engagement(timeout=20)
    assert first.engagement_id == winner.engagement_id
    assert list(dana.active) == [winner.engagement_id]
    # Dana's slot is the one reservation in storage, held by the winner's replica.
    async with await PostgresStore.open(a.database) as store:
        assert [(who, key) for who, key, _ in await store.slot_holds()] == [("dana", winner.engagement_id)]
    # Once she is done, the engagement that waited on the other replica is hers: never two at once.
    await dana.end(first, disposition="resolved")
    second = await dana.next_engagement(timeout=20)
    assert second.engagement_id == loser.engagement_id
    await loser.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=10)
    assert list(dana.active) == [loser.engagement_id]
    for client in (*phones, probe):
        await client.close()
    await dana.close()


async def test_an_engagement_queued_first_reaches_an_associate_signing_in_on_the_other_replica(
    cluster: StartCluster,
) -> None:
    a, b = await cluster(HELP)
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    # Nobody is signed in anywhere: it waits in line on A.
    assert await settled(engagement) == "waiting"
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"])
    assigned = await dana.next_engagement(timeout=20)
    assert (assigned.engagement_id, assigned.context.device_id) == (engagement.engagement_id, "phone-a")
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=10)
    await phone.close()
    await dana.close()


async def test_a_replica_starting_takes_only_the_engagements_of_replicas_that_are_gone(cluster: StartCluster) -> None:
    a, _ = await cluster(HELP)
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    assert await settled(engagement) == "waiting"
    async with await PostgresStore.open(a.database) as store:
        owner = await store.owner_of(engagement.engagement_id)
        assert owner
        # A third replica starting while A lives leaves A's engagement to A.
        (c,) = await cluster(HELP, count=1)
        assert await store.owner_of(engagement.engagement_id) == owner
        # A drained (its lease let go): another replica adopts the engagement and routes it to Dana.
        await phone.close()
        assert await a.drain() == 0
        dana = await cuepoint.connect_associate(c.address, associate_id="dana", queues=["support"])
        assigned = await dana.next_engagement(timeout=30)
        assert assigned.engagement_id == engagement.engagement_id
        assert await store.owner_of(engagement.engagement_id) not in ("", owner)
    await dana.close()


# A cue that expires soon after it is shown: its expiry is a timer row armed by the replica that offered it.
EXPIRING = """
id: help
trigger: {event: help}
cue: {message: "Need help?", channel: audio, queue: support, ttl: 3s}
"""


async def test_a_timer_armed_on_a_fires_once_after_a_is_killed(cluster: StartCluster) -> None:
    receiver = Receiver()
    hooks = ("--webhook", receiver.url, "--webhook-secret", "whsec-test", "--replica-ttl", "1")
    try:
        a, _b = await cluster(EXPIRING, extra=hooks)
        phone = await device(a, "phone-a")
        await phone.track("help")
        cue = await phone.next_cue(timeout=10)
        # SIGKILL before the cue's 3 s are up: A's alarm for it dies with A; its timer row stays.
        await a.kill()

        def withdrawals() -> set[str]:
            # Distinct events (a delivery retried after a crash has the same event id).
            return {
                e["id"] for e in receiver.events() if e["type"] == "cue.withdrawn" and e["data"]["cue_id"] == cue.cue_id
            }

        # B claims the row once A's lease lapsed and the cue fell due, and fires it: the cue expires, reported once.
        async with asyncio.timeout(30):
            while not withdrawals():  # noqa: ASYNC110 - filled by the receiver's thread
                await asyncio.sleep(0.05)
        [event] = [e for e in receiver.events() if e["id"] in withdrawals()]
        assert (event["data"]["status"], event["data"]["reason"]) == ("expired", "expired")
        # A comes back (a new replica): the device reconnects to it and finds the cue settled; nothing fires again.
        await a.start()
        await phone.track("help")
        await phone.flush(timeout=30)
        second = await phone.next_cue(timeout=10)
        assert second.cue_id != cue.cue_id
        # Its cue.offered arriving shows A's outbox works; the first cue's expiry was still reported once.
        async with asyncio.timeout(30):
            while not any(  # noqa: ASYNC110 - filled by the receiver's thread
                e["type"] == "cue.offered" and e["data"]["cue_id"] == second.cue_id for e in receiver.events()
            ):
                await asyncio.sleep(0.05)
        assert len(withdrawals()) == 1
        store = await PostgresStore.open(a.database)
        try:
            stored = await store.get_cue(cue.cue_id)
            assert stored is not None and stored.status == "expired"
            [row] = [t for t in await store.timers() if t.target == cue.cue_id]
            assert row.state == "done" and row.claimed_by != row.owner  # fired by B's claim, not by A
        finally:
            await store.close()
        await phone.close()
    finally:
        receiver.server.shutdown()


CALLBACKS = """
routing:
  queues:
    - {id: support, fallback_after: 1s}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need a hand?", channel: chat, queue: support, ttl: 10m}
"""


async def test_a_callback_armed_on_a_is_queued_once_by_b_after_a_is_killed(cluster: StartCluster) -> None:
    receiver = Receiver()
    hooks = ("--webhook", receiver.url, "--webhook-secret", "whsec-test", "--replica-ttl", "1")
    try:
        a, b = await cluster(CALLBACKS, extra=hooks)
        phone = await device(a, "phone-a")
        await phone.track("help")
        engagement = await phone.accept(await phone.next_cue(timeout=10))
        await engagement.wait_fallback(timeout=20)  # nobody signed in anywhere
        await engagement.choose_fallback(cuepoint.FallbackOption.CALLBACK, "+1 555 0100", callback_at=time.time() + 3)
        await engagement.wait_for(cuepoint.EngagementState.CALLBACK_REQUESTED, timeout=10)
        # A dies before the callback's time: B claims its row, takes the engagement over and queues it.
        await a.kill()
        dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
        called = await dana.next_engagement(timeout=30)
        assert (called.engagement_id, called.kind) == (engagement.engagement_id, cuepoint.EngagementKind.CALLBACK)
        assert called.callback_number == "+1 555 0100"

        def queued() -> set[str]:
            return {
                e["id"]
                for e in receiver.events()
                if e["type"] == "engagement.queued" and e["data"]["engagement_id"] == engagement.engagement_id
            }

        # Queued twice in all: when accepted, and once when the callback fell due (by B, not also by A).
        async with asyncio.timeout(30):
            while len(queued()) < 2:  # noqa: ASYNC110 - filled by the receiver's thread
                await asyncio.sleep(0.05)
        store = await PostgresStore.open(b.args[b.args.index("--database") + 1])
        try:
            # (its fallback, offered by A before it died, is a row of its own: core/desk_timers.py)
            [row] = [t for t in await store.timers() if t.timer_id == f"callback:{engagement.engagement_id}"]
            assert (row.kind, row.state) == ("callback", "done") and row.claimed_by != row.owner
            [fallback] = [t for t in await store.timers() if t.timer_id == f"fallback:{engagement.engagement_id}"]
            assert (fallback.state, fallback.claimed_by) == ("done", "")  # fired by A's own alarm
        finally:
            await store.close()
        assert len(queued()) == 2
        await dana.close()
        await phone.close()
    finally:
        receiver.server.shutdown()
