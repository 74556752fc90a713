"""Predictive scores end to end: real server on port 0, real SDK, real gRPC.

The seed action map, worded as the reference product's: the visitor reached the payment page, not the
thank-you page, and has been idle 45 s: offer chat; route to the closers with priority +50 when
P(purchase) >= 0.2, otherwise to a bot.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from pathlib import Path

import grpc

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock
from cuepoint_server.predict.model import Example, ModelSettings, OutcomeModel
from cuepoint_server.predict.synthetic import sessions
from cuepoint_server.storage import ModelRecord

from .conftest import OpenStore, StartServer, db_option, no_cue
from .test_e2e_engagements import associate, eventually

ACTION_MAP = """
milestones:
  - {id: payment, when: {event: screen_viewed, where: {screen: {equals: payment}}}}
  - {id: purchased, when: {event: screen_viewed, where: {screen: {equals: thank_you}}}}
outcomes:
  - {id: purchased, milestone: purchased, within: session, score: true, min_sessions: 100}
scenarios:
  - id: checkout-stall
    trigger: {all: [{milestone: payment}, {not: {milestone: purchased}}, {idle: 45s}]}
    outcome: purchased
    cue: {message: "Any questions? I can help you finish.", channel: chat, queue: sales}
routing:
  queues:
    - id: sales-bot
      bot:
        name: Shop assistant
        greeting: "Hi! I can answer the usual questions."
        choices:
          - {label: Shipping costs, reply: "Shipping is free above 50 EUR."}
          - {label: Talk to a person, handover: true}
        handover_queue: sales
  rules:
    - {when: {score: purchased, gte: 0.2}, queue: Sales_Closers_Tier2, priority: 50}
    - {when: {not: {score: purchased, gte: 0.2}}, queue: sales-bot}
"""


async def _pretrained(open_store_at: OpenStore, db: Path) -> OutcomeModel:
    """The server's earlier history, as a stored model: 3,000 synthetic shop sessions learned online."""
    model = OutcomeModel("purchased", ModelSettings(min_sessions=100))
    waiting: deque[tuple[Example, bool]] = deque()
    for s in sessions(3000):
        waiting.append((Example(s.x, model.predict(s.x)), s.converted))
        if len(waiting) > 50:
            example, converted = waiting.popleft()
            model.learn([example], converted)
    store = await open_store_at(db)
    await store.save_model(ModelRecord("purchased", 1, 1, 0, model.state(), 0.0))
    await store.close()
    return model


async def _shopper(
    server: CuepointServer, device_id: str, os: str, events: list[tuple[str, dict[str, str]]]
) -> cuepoint.Client:
    client = await cuepoint.connect(
        server.address,
        app_id="shop",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os=os),
        user=cuepoint.User(user_id=f"user-{device_id}"),
        consent=cuepoint.Consent.FULL,
    )
    for name, props in events:
        await client.track(name, **props)
    await client.flush()
    return client


async def test_seed_action_map_routes_by_purchase_probability(
    start_server: StartServer, clock: ManualClock, tmp_path: Path, open_store_at: OpenStore
) -> None:
    db = tmp_path / "shop.db"
    await _pretrained(open_store_at, db)
    server = await start_server(ACTION_MAP, db=db)
    closer = await associate(server, "closer", queues=["Sales_Closers_Tier2"])
    human = await associate(server, "human", queues=["sales"])

    likely = await _shopper(
        server,
        "likely",
        "iOS",
        [("add_to_cart", {}), ("add_to_cart", {}), ("add_to_cart", {}), ("screen_viewed", {"screen": "payment"})],
    )
    unlikely = await _shopper(
        server,
        "unlikely",
        "Android",
        [*[("search", {})] * 5, ("screen_viewed", {"screen": "payment"})],
    )
    # Scores move as signals arrive: the device view shows them before anything is offered.
    high = server.core.device_view("likely").scores["purchased"]
    low = server.core.device_view("unlikely").scores["purchased"]
    assert high["status"] == low["status"] == "trained"
    assert high["probability"] >= 0.2 > low["probability"], (high, low)
    assert high["top_features"] and low["top_features"]

    clock.advance(46)  # idle 45 s on the payment page, no thank-you page: the cue
    to_likely = await likely.next_cue(timeout=5)
    to_unlikely = await unlikely.next_cue(timeout=5)
    await likely.accept(to_likely)
    unlikely_engagement = await unlikely.accept(to_unlikely)

    # P(purchase) >= 0.2: the closers, priority +50, with the score and its reasons in the context.
    got = await closer.next_engagement(timeout=5)
    assert (got.context.device_id, got.queue, got.context.priority) == ("likely", "Sales_Closers_Tier2", 50)
    [score] = got.context.scores
    assert score.outcome == "purchased" and score.probability >= 0.2 and score.status == "trained"
    assert score.top_features and all(isinstance(v, float) for _, v in score.top_features)
    assert any(line.startswith("Score:   P(purchased)") for line in got.describe().splitlines())

    # Below 0.2: the built-in bot takes it at once (no associate in its queue), greets, answers a choice.
    update = await unlikely_engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert update.associate_name == "Shop assistant"
    messages = unlikely_engagement.messages()
    greeting = await asyncio.wait_for(anext(messages), 5)
    choices = await asyncio.wait_for(anext(messages), 5)
    assert greeting.text.startswith("Hi!") and "1. Shipping costs" in choices.text
    await unlikely_engagement.send_chat("1")
    await asyncio.wait_for(anext(messages), 5)  # our own line
    assert (await asyncio.wait_for(anext(messages), 5)).text == "Shipping is free above 50 EUR."
    # Asking for a person hands over to the human queue.
    await unlikely_engagement.send_chat("can I talk to an agent please")
    taken = await human.next_engagement(timeout=5)
    assert (taken.context.device_id, taken.queue) == ("unlikely", "sales")
    assert taken.context.scores[0].probability < 0.2
    stored = await server.store.chat_transcript(unlikely_engagement.engagement_id)
    assert [r.text for r in stored][:2] == [
        "Hi! I can answer the usual questions.",
        "1. Shipping costs\n2. Talk to a person",
    ]

    # ExplainDevice and the model report over the admin API.
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        explained = await admin.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="likely"))
        assert explained.scores[0].outcome == "purchased" and explained.scores[0].probability >= 0.2
        assert explained.scores[0].status == common_pb2.SCORE_STATUS_TRAINED
        report = await admin.GetModelReport(admin_pb2.GetModelReportRequest())
        [outcome] = report.outcomes
        assert outcome.labelled_sessions == 3000 - 50 and outcome.has_auc and outcome.auc > 0.8
        assert report.training and outcome.version == 1 and len(outcome.calibration) >= 5
    for c in (likely, unlikely):
        await c.close()
    await closer.close()
    await human.close()


async def test_sessions_are_labelled_and_learned_by_the_server(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(ACTION_MAP.replace("min_sessions: 100", "min_sessions: 3"), db=tmp_path / "s.db")
    for i in range(4):
        screens = ["payment", "thank_you"] if i % 2 == 0 else ["payment"]
        client = await _shopper(server, f"d{i}", "iOS", [("screen_viewed", {"screen": s}) for s in screens])
        await client.close()

    def learned() -> int:
        return server.core.model_reports()[0].labelled_sessions

    async def four() -> bool:
        return learned() == 4

    await eventually(four)
    report = server.core.model_reports()[0]
    assert (report.positive_sessions, report.status) == (2, "trained")
    assert report.base_rate == (2 + 1) / (4 + 2)

    # The trainer saves what it learned; `cuepoint model report` reads it from the database.
    async def saved() -> bool:
        return any(m.state["labelled"] == 4 for m in await server.store.models())

    await eventually(saved)
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cuepoint_server.cli", "model", "report", *db_option(server),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await done.communicate()
    assert done.returncode == 0
    text = out.decode()
    assert "outcome purchased" in text and "4 labelled sessions, 2 reached, base rate 0.500" in text, text


async def test_simulate_shows_the_score_at_each_cue(tmp_path: Path) -> None:
    from cuepoint_server.engine.scenario_set import ScenarioSet
    from cuepoint_server.simulate import parse_trace, render_text, simulate

    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "shop.yaml").write_text(ACTION_MAP.replace("min_sessions: 100", "min_sessions: 5"))
    hello = '{"app_id": "shop", "consent": "full", "context": {"device.os": "iOS", "user.id": "%s"}}'
    trace = "\n".join(
        [
            f'{{"t": 0, "device": "d1", "hello": {hello % "u1"}}}',
            '{"t": 1, "device": "d1", "event": "screen_viewed", "props": {"screen": "payment"}}',
            '{"t": 2, "device": "d1", "event": "screen_viewed", "props": {"screen": "thank_you"}}',
            '{"t": 3, "device": "d1", "close": true}',
            f'{{"t": 10, "device": "d2", "hello": {hello % "u2"}}}',
            '{"t": 11, "device": "d2", "event": "screen_viewed", "props": {"screen": "payment"}}',
            '{"t": 60}',
        ]
    )
    text = render_text(await simulate(ScenarioSet.load(str(folder)), parse_trace(trace)))
    # One labelled session (reached) under the Beta(1, 1) prior: (1 + 1) / (1 + 2), still training.
    assert "d2 CUE checkout-stall chat" in text
    assert "    score purchased 0.667 (training)" in text, text


async def test_a_bot_queue_is_capacity_without_any_associate(start_server: StartServer) -> None:
    server = await start_server(
        """
policy: {require_capacity: true}
scenarios:
  - id: ask-bot
    trigger: {event: help}
    cue: {message: "Questions?", channel: chat, queue: sales-bot}
  - id: ask-human
    priority: -1
    trigger: {event: help_human}
    cue: {message: "Talk to us?", channel: chat, queue: sales}
routing:
  queues:
    - id: sales-bot
      bot: {greeting: "Hello from the bot.", handover_queue: sales}
"""
    )
    client = await _shopper(server, "d1", "iOS", [("help_human", {})])
    # Nobody in `sales`: blocked for capacity. The bot queue always has someone.
    assert await no_cue(client)
    decisions = await server.store.decisions_for_device("d1")
    assert [(d.scenario_id, d.reason) for d in decisions] == [("ask-human", "no_capacity")]
    await client.track("help")
    await client.flush()
    engagement = await client.accept(await client.next_cue(timeout=5))
    update = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert update.associate_name == "Assistant"
    first = await asyncio.wait_for(anext(engagement.messages()), 5)
    assert first.text == "Hello from the bot."
    await client.close()
