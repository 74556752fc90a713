"""Reporting and observability end to end: funnels, holdout groups, `cuepoint report`, live now,
Prometheus metrics and per-stream log context. Real server, real SDK, manual clock."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import textwrap
import urllib.error
import urllib.request
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.cli import main
from cuepoint_server.clock import ManualClock
from cuepoint_server.engine.holdout import in_holdout
from cuepoint_server.logs import configure_logging
from cuepoint_server.scenarios.loader import ScenarioError, load_text

from .conftest import StartServer, db_option, no_cue

FUNNEL = """
milestones:
  - {id: synced, when: {event: sync_succeeded}}
scenarios:
  - id: sync-help
    priority: 10
    trigger: {event: sync_failed}
    outcome: synced
    cooldown: 1h
    cue: {message: "Sync trouble? I can help.", channel: chat, ttl: 2m, queue: support}
  - id: crash-help
    priority: 100
    trigger: {event: sync_failed, where: {reason: {equals: crash}}}
    cooldown: 1h
    cue: {message: "The app crashed? I can help.", channel: chat, ttl: 2m, queue: support}
"""

IPHONE, PIXEL = "iPhone15,2", "Pixel 8"
STAGES = (
    "qualified", "offered", "accepted", "declined", "dismissed", "ignored", "withdrawn", "pending", "engaged",
    "resolved", "outcome", "qualified_sessions",
)  # fmt: skip


async def device(
    server: CuepointServer, device_id: str, *, model: str = IPHONE, user_id: str | None = None
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(
            app_version="4.2.0", os="iOS" if model == IPHONE else "Android", os_version="17.4", device_model=model
        ),
        user=cuepoint.User(user_id=user_id or f"user-{device_id}", tier="premium"),
        consent=cuepoint.Consent.FULL,
    )


async def send(client: cuepoint.Client, name: str, **props: str) -> None:
    await client.track(name, **props)
    await client.flush()


async def withdrawal(events: AsyncIterator[object]) -> cuepoint.CueWithdrawal:
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                return event
    raise AssertionError("no withdrawal")


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


async def get_funnel(server: CuepointServer, **fields: Any) -> list[admin_pb2.FunnelRow]:
    await server.core.drain()
    async with grpc.aio.insecure_channel(server.address) as channel:
        found = await admin_pb2_grpc.AdminServiceStub(channel).GetFunnel(admin_pb2.GetFunnelRequest(**fields))
    return list(found.rows)


async def live(server: CuepointServer) -> admin_pb2.ListLiveSessionsResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await admin_pb2_grpc.AdminServiceStub(channel).ListLiveSessions(admin_pb2.ListLiveSessionsRequest())


def stages(row: admin_pb2.FunnelRow) -> dict[str, Any]:
    """The row as plain values, zeros left out, so expectations stay short."""
    counts = {name: getattr(row, name) for name in STAGES if getattr(row, name)}
    out: dict[str, Any] = {**counts, "blocked": {b.reason: b.count for b in row.blocked}}
    assert row.blocked_total == sum(out["blocked"].values())
    for name in ("treated", "holdout"):
        group = getattr(row, name)
        out[name] = (group.sessions, group.outcome_reached, group.converted)
    return out


async def run_population(server: CuepointServer, clock: ManualClock) -> float:
    """Five phones, each a different path through the funnel; returns a time before the last decision."""
    associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])

    # p1: accepts, the associate resolves it and records the outcome (the queue's default outcomes).
    p1 = await device(server, "p1")
    await send(p1, "sync_failed", reason="timeout")
    engagement = await p1.accept(await p1.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    await associate.end(await associate.next_engagement(timeout=5), disposition="resolved", outcome="resolved")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)

    # p2: declines.
    p2 = await device(server, "p2")
    await send(p2, "sync_failed", reason="timeout")
    await p2.decline(await p2.next_cue(timeout=5))

    # p4: a crash: the higher-priority crash-help wins (sync-help: priority); dismissed.
    p4 = await device(server, "p4", model=PIXEL)
    await send(p4, "sync_failed", reason="crash")
    crash_cue = await p4.next_cue(timeout=5)
    assert crash_cue.scenario_id == "crash-help"
    await p4.dismiss(crash_cue)

    # p5: offered, then syncs by itself: the outcome milestone withdraws the cue.
    p5 = await device(server, "p5")
    events = p5.events()
    await send(p5, "sync_failed", reason="timeout")
    await p5.next_cue(timeout=5)
    await send(p5, "sync_succeeded")
    assert (await withdrawal(events)).reason == "outcome_achieved"

    # p3: ignores the cue until it expires, fails again within the cooldown.
    p3 = await device(server, "p3", model=PIXEL)
    events = p3.events()
    await send(p3, "sync_failed", reason="timeout")
    await p3.next_cue(timeout=5)
    clock.advance(121)
    assert (await withdrawal(events)).reason == "expired"
    before_last = clock.now()
    clock.advance(1)
    await send(p3, "sync_failed", reason="timeout")
    assert await no_cue(p3)

    for client in (p1, p2, p3, p4, p5):
        await client.close()
    await associate.close()
    return before_last


async def test_funnel_counts_every_stage_per_reason_and_device_model(
    start_server: StartServer, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(FUNNEL)
    before_last = await run_population(server, clock)

    rows = await get_funnel(server)
    assert [r.scenario_id for r in rows] == ["crash-help", "sync-help"]
    crash, sync = (stages(r) for r in rows)
    assert sync == {
        "qualified": 6,  # p1, p2, p5, p3 offered; p4 priority; p3 cooldown
        "blocked": {"cooldown": 1, "priority": 1},
        "offered": 4,
        "accepted": 1,
        "declined": 1,
        "withdrawn": 1,
        "ignored": 1,
        "engaged": 1,
        "resolved": 1,
        "outcome": 1,  # p1's associate recorded "resolved", a success outcome
        "qualified_sessions": 5,
        # p5 reached the outcome milestone; p1's engagement was resolved.
        "treated": (5, 1, 2),
        "holdout": (0, 0, 0),
    }
    assert crash == {
        "qualified": 1,
        "blocked": {},
        "offered": 1,
        "dismissed": 1,
        "qualified_sessions": 1,
        "treated": (1, 0, 0),
        "holdout": (0, 0, 0),
    }
    assert rows[1].treated.conversion_rate == pytest.approx(0.4)
    assert dict(rows[1].wrap_up_outcomes) == {"resolved": 1} and not rows[0].wrap_up_outcomes

    by_model = await get_funnel(server, group_by=["device.model"])
    found = {(r.scenario_id, r.group["device.model"]): stages(r) for r in by_model}
    assert sorted(found) == [("crash-help", PIXEL), ("sync-help", PIXEL), ("sync-help", IPHONE)]
    assert found["sync-help", IPHONE] == {
        "qualified": 3,
        "blocked": {},
        "offered": 3,
        "accepted": 1,
        "declined": 1,
        "withdrawn": 1,
        "engaged": 1,
        "resolved": 1,
        "outcome": 1,
        "qualified_sessions": 3,
        "treated": (3, 1, 2),
        "holdout": (0, 0, 0),
    }
    assert found["sync-help", PIXEL] == {
        "qualified": 3,
        "blocked": {"cooldown": 1, "priority": 1},
        "offered": 1,
        "ignored": 1,
        "qualified_sessions": 2,
        "treated": (2, 0, 0),
        "holdout": (0, 0, 0),
    }

    # The time range: the cohort of decisions before the cooldown one; nothing after everything.
    earlier = await get_funnel(server, scenario_id="sync-help", end=ts(before_last))
    assert [stages(r)["qualified"] for r in earlier] == [5]
    assert stages(earlier[0])["blocked"] == {"priority": 1}
    assert await get_funnel(server, start=ts(clock.now() + 1)) == []

    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin_pb2_grpc.AdminServiceStub(channel).GetFunnel(admin_pb2.GetFunnelRequest(group_by=["user.id"]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot group by user.id" in (bad.value.details() or "")

    # `cuepoint report` reads the same database file with the same queries, next to the running server.
    db = server.config.db

    async def report(*argv: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cuepoint_server.cli", "report", *db_option(server), *argv, stdout=PIPE, stderr=PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    document = json.loads(await report("--since", "all", "--by", "device.model", "--json"))
    reported = {(r["scenario_id"], r["group"]["device.model"]): r for r in document["rows"]}
    pixel = reported["sync-help", PIXEL]
    assert (pixel["qualified"], pixel["blocked"], pixel["offered"], pixel["ignored"]) == (
        3,
        {"cooldown": 1, "priority": 1},
        1,
        1,
    )
    assert reported["sync-help", IPHONE]["treated"] == {
        "sessions": 3,
        "outcome_reached": 1,
        "converted": 2,
        "conversion_rate": pytest.approx(2 / 3, abs=1e-6),
    }

    table = await report("--since", "7d", "--scenario", "sync-help")
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("scenario"))
    assert header.split()[:13] == [
        "scenario", "qualified", "blocked", "offered", "accepted", "declined", "dismissed", "ignored",
        "withdrawn", "pending", "engaged", "resolved", "outcome",
    ]  # fmt: skip
    row = next(line for line in lines if line.startswith("sync-help"))
    assert row.split()[:14] == ["sync-help", "6", "2", "4", "1", "1", "0", "1", "1", "0", "1", "1", "1", "5"]
    assert "  sync-help: resolved 1" in table  # outcomes recorded at wrap-up
    assert "2/5 40.0%" in row
    assert "  sync-help: cooldown 1, priority 1" in table

    # main() in a thread: it runs its own event loop.
    assert await asyncio.to_thread(main, ["report", "--db", str(Path(db).with_name("missing.db"))]) == 2
    assert "no database" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["report", *db_option(server), "--by", "user.tier"]) == 2
    assert "cannot group by user.tier" in capsys.readouterr().err


HOLDOUT = """
milestones:
  - {id: done, when: {event: task_done}}
scenarios:
  - id: onboarding-help
    holdout: 50%
    trigger: {event: stuck}
    outcome: done
    cue: {message: "Need a hand?", channel: chat, ttl: 10m}
"""
# sha256("onboarding-help\\0user:<id>") < 0.5: fixed forever, on every server.
HELD_OUT = ["h02", "h05", "h06", "h07", "h08", "h09", "h10", "h13", "h15"]


async def test_holdout_is_a_deterministic_control_group_with_its_own_conversion(start_server: StartServer) -> None:
    server = await start_server(HOLDOUT)
    users = [f"h{i:02d}" for i in range(16)]
    assert [u for u in users if in_holdout(f"user:{u}", "onboarding-help", 0.5)] == HELD_OUT

    clients = {u: await device(server, u, user_id=u) for u in users}
    for user, client in clients.items():
        await send(client, "stuck")
        if user in HELD_OUT:
            assert await no_cue(client)
        else:
            assert (await client.next_cue(timeout=5)).scenario_id == "onboarding-help"
    # Every other user finishes the task: the outcome milestone, in both groups.
    finished = users[::2]
    for user in finished:
        await send(clients[user], "task_done")
    await server.core.drain()

    for user in HELD_OUT:
        assert await server.store.cues_for_subject(f"user:{user}") == []
        decisions = await server.store.decisions_for_device(user)
        assert [(d.outcome, d.reason) for d in decisions] == [("blocked", "holdout")]

    (row,) = await get_funnel(server)
    treated = [u for u in users if u not in HELD_OUT]
    reached_treated = len([u for u in finished if u in treated])
    reached_held = len([u for u in finished if u in HELD_OUT])
    assert stages(row) == {
        "qualified": 16,
        "blocked": {"holdout": 9},
        "offered": 7,
        "withdrawn": reached_treated,  # their cue was pulled when they reached the outcome
        "pending": 7 - reached_treated,
        "qualified_sessions": 16,
        "treated": (7, reached_treated, reached_treated),
        "holdout": (9, reached_held, reached_held),
    }
    assert row.treated.conversion_rate == pytest.approx(reached_treated / 7)
    assert row.holdout.conversion_rate == pytest.approx(reached_held / 9)

    # A held-out user stays held out in a new session.
    again = await device(server, "h02-new-phone", user_id="h02")
    await send(again, "stuck")
    assert await no_cue(again)
    await server.core.drain()
    assert [d.reason for d in await server.store.decisions_for_device("h02-new-phone")] == ["holdout"]

    async with grpc.aio.insecure_channel(server.address) as channel:
        info = await admin_pb2_grpc.AdminServiceStub(channel).GetScenarios(admin_pb2.GetScenariosRequest())
    assert [s.holdout for s in info.scenarios] == [0.5]
    for client in (*clients.values(), again):
        await client.close()


@pytest.mark.parametrize(
    ("written", "share"), [("10%", 0.1), ("12.5%", 0.125), ("0.25", 0.25), ("0", 0.0), ("100%", 1.0)]
)
def test_holdout_is_written_as_a_percentage_or_a_fraction(written: str, share: float) -> None:
    loaded = load_text(
        f"id: s\nholdout: {written}\ntrigger: {{event: e}}\ncue: {{message: hi, channel: chat}}\n", "f.yaml"
    )
    assert loaded.scenarios[0].spec.holdout == pytest.approx(share)


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("150%", "f.yaml:2: holdout: a share must be between 0% and 100% (a fraction between 0 and 1)"),
        ("half", "f.yaml:2: holdout: 'half' is not a share; write e.g. 10% or 0.1"),
        ("10", "f.yaml:2: holdout: a share must be between 0% and 100% (a fraction between 0 and 1)"),
    ],
)
def test_holdout_errors_name_the_field(written: str, problem: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_text(f"id: s\nholdout: {written}\ntrigger: {{event: e}}\ncue: {{message: hi, channel: chat}}\n", "f.yaml")
    assert [str(i) for i in info.value.issues] == [problem]


LIVE = """
segments:
  - {id: ios, when: {attribute: device.os, equals: iOS}}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Help?", channel: chat, ttl: 10m, queue: desk}
"""


async def test_live_sessions_go_idle_then_inactive_and_queues_show_waiting(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(LIVE)
    a = await device(server, "a")
    await send(a, "ping")

    now = await live(server)
    (session,) = now.sessions
    assert (session.device_id, session.status) == ("a", admin_pb2.LIVE_STATUS_LIVE)
    assert list(session.segments) == ["ios"]
    assert session.context["device.model"] == IPHONE and "user.id" not in session.context
    assert not session.HasField("pending_cue")
    assert [(q.queue, q.waiting, q.associates) for q in now.queues] == [("desk", 0, 0)]

    clock.advance(45)
    b = await device(server, "b", model=PIXEL)
    await send(b, "help")
    cue = await b.next_cue(timeout=5)
    now = await live(server)
    status = {s.device_id: s.status for s in now.sessions}
    assert status == {"a": admin_pb2.LIVE_STATUS_IDLE, "b": admin_pb2.LIVE_STATUS_LIVE}
    pending = {s.device_id: s.pending_cue.cue_id for s in now.sessions if s.HasField("pending_cue")}
    assert pending == {"b": cue.cue_id} and now.pending_cues == 1
    assert [s.segments for s in now.sessions] == [["ios"], []]  # oldest session first

    clock.advance(15)
    engagement = await b.accept(cue)
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    now = await live(server)
    status = {s.device_id: s.status for s in now.sessions}
    assert status == {"a": admin_pb2.LIVE_STATUS_INACTIVE, "b": admin_pb2.LIVE_STATUS_LIVE}
    b_view = next(s for s in now.sessions if s.device_id == "b")
    assert (b_view.engagement_state, b_view.HasField("pending_cue")) == ("queued", False)
    assert [(q.queue, q.waiting) for q in now.queues] == [("desk", 1)]

    associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["desk"])
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    await send(a, "ping")
    now = await live(server)
    assert [(q.queue, q.waiting, q.associates, q.available) for q in now.queues] == [("desk", 0, 1, 0)]
    assert {s.device_id: s.status for s in now.sessions}["a"] == admin_pb2.LIVE_STATUS_LIVE
    assert next(s for s in now.sessions if s.device_id == "b").engagement_state == "assigned"
    for client in (a, b):
        await client.close()
    await associate.close()


async def scrape(port: int) -> dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_are_scraped_over_http_and_move(tmp_path: Path, clock: ManualClock) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(
        textwrap.dedent(
            """
            scenarios:
              - id: help
                priority: 10
                trigger: {event: help}
                cue: {message: "Help?", channel: chat, ttl: 10m, queue: desk}
              - id: tips
                trigger: {event: help}
                cue: {message: "Tips", channel: chat}
            """
        )
    )
    config = ServerConfig(port=0, db=str(tmp_path / "m.db"), scenarios=str(folder), metrics_port=0)
    server = await CuepointServer.start(config, clock=clock)
    try:
        assert server.metrics_port is not None and server.metrics_port > 0
        before = await scrape(server.metrics_port)
        assert before["cuepoint_signals_received_total"] == 0
        assert before["cuepoint_streams{kind=device}"] == 0

        client = await device(server, "m1")
        await client.track("help")
        await client.track("noise")
        await client.flush()
        cue = await client.next_cue(timeout=5)
        after = await scrape(server.metrics_port)
        assert after["cuepoint_signals_received_total"] == 2
        assert after["cuepoint_evaluations_total"] > before["cuepoint_evaluations_total"]
        assert after["cuepoint_cues_total{outcome=offered,scenario=help}"] == 1
        assert after["cuepoint_decisions_blocked_total{reason=priority,scenario=tips}"] == 1
        assert after["cuepoint_streams{kind=device}"] == 1
        assert after["cuepoint_pending_cues"] == 1
        assert after["cuepoint_cue_latency_seconds_count"] == 1
        # The two signals and the cue were committed by the store's writer, in at least one transaction of its own.
        assert after["cuepoint_storage_transactions_total"] > before["cuepoint_storage_transactions_total"]
        assert after["cuepoint_storage_rows_total"] >= before["cuepoint_storage_rows_total"] + 2
        assert after["cuepoint_storage_failed_writes_total"] == 0

        engagement = await client.accept(cue)
        await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
        clock.advance(30)
        waiting = await scrape(server.metrics_port)
        assert waiting["cuepoint_engagements_waiting{queue=desk}"] == 1
        assert waiting["cuepoint_cues_total{outcome=accepted,scenario=help}"] == 1
        associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["desk"])
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        served = await scrape(server.metrics_port)
        assert served["cuepoint_engagements_waiting{queue=desk}"] == 0
        assert served["cuepoint_streams{kind=associate}"] == 1
        assert served["cuepoint_engagement_queue_wait_seconds_count{queue=desk}"] == 1
        assert served["cuepoint_engagement_queue_wait_seconds_sum{queue=desk}"] == 30  # the manual clock's
        assert served["cuepoint_engagement_queue_wait_seconds_bucket{le=15.0,queue=desk}"] == 0
        assert served["cuepoint_engagement_queue_wait_seconds_bucket{le=30.0,queue=desk}"] == 1

        def missing() -> int:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/nope", timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code
            return 200

        assert await asyncio.to_thread(missing) == 404
        await client.close()
        await associate.close()
    finally:
        await server.stop(0.5)


async def test_stream_log_lines_carry_device_session_and_associate_ids(start_server: StartServer) -> None:
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("info", json=True, file=out)
    try:
        server = await start_server(LIVE)
        associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["desk"])
        client = await device(server, "logged")
        await send(client, "help")
        engagement = await client.accept(await client.next_cue(timeout=5))
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await associate.end(await associate.next_engagement(timeout=5), disposition="resolved")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        await client.close()
        await associate.close()
    finally:
        structlog.configure(**saved)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    by_event = {line["event"]: line for line in lines}
    for event in ("cue.offered", "cue.answered"):
        assert (by_event[event]["device_id"], by_event[event]["session_id"]) == ("logged", client.session_id)
    ended = by_event["engagement.ended"]
    assert ended["associate_id"] == "dana" and "session_id" not in ended


async def test_a_postgresql_server_reports_its_round_trips_in_metrics(start_server: StartServer, backend: str) -> None:
    """bench_replicas.py divides this counter by decisions and batches; SQLite has no round trips to count."""
    server = await start_server(
        """
        scenarios:
          - id: help
            trigger: {event: help}
            cue: {message: "Help?", channel: chat}
        """,
        metrics_port=0,
    )
    assert server.metrics_port is not None
    client = await device(server, "rt-1")
    before = await scrape(server.metrics_port)
    await client.track("help")
    await client.flush()
    await client.next_cue(timeout=5)
    after = await scrape(server.metrics_port)
    await client.close()
    if backend == "sqlite":
        assert "cuepoint_storage_round_trips_total" not in after
    else:
        # At least the offer's BEGIN, lock and history read, write and COMMIT.
        assert after["cuepoint_storage_round_trips_total"] - before["cuepoint_storage_round_trips_total"] >= 4
