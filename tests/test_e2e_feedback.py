"""Feedback after an engagement (issue 17, item 4): asked when it ends, answered through the SDK,
reported per scenario, per queue and associate, and posted to webhooks. Real server, real SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest

import cuepoint
from cuepoint import _convert
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer
from cuepoint_server.cli import main
from cuepoint_server.storage import FeedbackRecord
from cuepoint_server.webhooks import WebhookConfig

from .conftest import StartServer, db_option, phone
from .test_e2e_webhooks import Receiver

FEEDBACK = """
routing:
  queues:
    - {id: billing, feedback: {kind: nps, question: "Would you recommend us?", comment: false}}
scenarios:
  - id: sync-help
    trigger: {event: sync_failed}
    cue: {message: "Sync trouble?", channel: chat, queue: support, feedback: {kind: csat}}
  - id: bill-help
    trigger: {event: bill_failed}
    cue: {message: "Billing trouble?", channel: chat, queue: billing}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=0)
    yield r
    r.server.shutdown()


async def engaged(client: cuepoint.Client, event: str) -> cuepoint.Engagement:
    await client.track(event)
    await client.flush()
    engagement = await client.accept(await client.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    return engagement


async def stored(server: CuepointServer, engagement_id: str) -> FeedbackRecord:
    async with asyncio.timeout(5):
        while (found := await server.store.get_feedback(engagement_id)) is None:  # noqa: ASYNC110 - polls the store
            await asyncio.sleep(0.01)
    return found


async def test_feedback_is_asked_answered_reported_and_posted(
    start_server: StartServer, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01, events=("feedback.received",))
    server = await start_server(FEEDBACK, webhooks=(hook,))
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])
    eve = await cuepoint.connect_associate(server.address, associate_id="eve", queues=["billing"])

    # The scenario asks CSAT (default question, comment allowed) when the associate wraps up.
    first = await phone(server, "phone-1", user_id="u1")
    engagement = await engaged(first, "sync_failed")
    await dana.end(await dana.next_engagement(timeout=5), disposition="resolved")
    request = await first.next_feedback_request(timeout=5)
    assert (request.engagement_id, request.kind, request.min_score, request.max_score, request.comment_allowed) == (
        engagement.engagement_id,
        cuepoint.FeedbackKind.CSAT,
        1,
        5,
        True,
    )
    assert request.question == "How satisfied are you with the help you got?"
    with pytest.raises(cuepoint.InvalidSignal):
        await first.give_feedback(request, 6)
    await first.give_feedback(request, 5, "Quick and kind")
    rating = await stored(server, request.engagement_id)
    assert (rating.kind, rating.score, rating.comment, rating.queue, rating.associate_id, rating.scenario_id) == (
        "csat",
        5,
        "Quick and kind",
        "support",
        "dana",
        "sync-help",
    )
    await first.give_feedback(request, 1)  # a second answer is ignored
    # The queue asks NPS (no comment) for a scenario that sets none.
    second = await phone(server, "phone-2", user_id="u2")
    await engaged(second, "bill_failed")
    await eve.end(await eve.next_engagement(timeout=5), disposition="resolved")
    nps = await second.next_feedback_request(timeout=5)
    assert (nps.kind, nps.question, nps.min_score, nps.max_score, nps.comment_allowed) == (
        cuepoint.FeedbackKind.NPS,
        "Would you recommend us?",
        0,
        10,
        False,
    )
    with pytest.raises(cuepoint.InvalidSignal):
        await second.give_feedback(nps, 9, "no comments here")
    await second.give_feedback(nps, 9)
    await stored(server, nps.engagement_id)

    # The user ending it is asked too.
    third = await phone(server, "phone-3", user_id="u3")
    mine = await engaged(third, "sync_failed")
    await dana.next_engagement(timeout=5)
    await mine.end()
    request3 = await third.next_feedback_request(timeout=5)
    await third.give_feedback(request3, 2)
    await stored(server, request3.engagement_id)
    assert (await server.store.get_feedback(request.engagement_id)) == rating  # unchanged by the resend

    await server.core.drain()
    async with grpc.aio.insecure_channel(server.address) as channel:
        report = await admin_pb2_grpc.AdminServiceStub(channel).GetFunnel(admin_pb2.GetFunnelRequest())
    by_scenario = {
        r.scenario_id: [
            (f.kind, f.responses, f.average_score, f.satisfied_share, f.net_promoter_score) for f in r.feedback
        ]
        for r in report.rows
    }
    assert by_scenario == {"bill-help": [("nps", 1, 9.0, 1.0, 100.0)], "sync-help": [("csat", 2, 3.5, 0.5, 0.0)]}
    assert [
        (d.queue, d.associate_id, d.summary.kind, d.summary.responses, d.summary.average_score)
        for d in report.feedback_by_desk
    ] == [("billing", "eve", "nps", 1, 9.0), ("support", "dana", "csat", 2, 3.5)]

    assert await asyncio.to_thread(main, ["report", *db_option(server), "--since", "all"]) == 0
    printed = capsys.readouterr().out
    assert "sync-help: csat 2 response(s), average 3.50, satisfied 50%" in printed
    assert "queue billing  associate eve: nps 1 response(s), average 9.0, NPS +100" in printed

    async with asyncio.timeout(10):
        while len(receiver.received) < 3:  # noqa: ASYNC110 - filled by the HTTP server's thread
            await asyncio.sleep(0.02)
    posted = sorted(
        (
            json.loads(body)["data"]
            for headers, body in receiver.received
            if headers["x-cuepoint-event"] == "feedback.received"
        ),
        key=lambda d: d["score"],
    )
    assert [(d["kind"], d["score"], d["comment"], d["queue"], d["associate_id"]) for d in posted] == [
        ("csat", 2, "", "support", "dana"),
        ("csat", 5, "Quick and kind", "support", "dana"),
        ("nps", 9, "", "billing", "eve"),
    ]

    # Past the SDK's own checks, the server refuses a score out of range, naming the field.
    await third._send_engagement(_convert.feedback_answer(request3.engagement_id, 7, ""))
    async with asyncio.timeout(5):
        async for state in third.states():
            if state is cuepoint.ConnectionState.CLOSED:
                break
    assert isinstance(third.failure, cuepoint.InvalidSignal) and third.failure.code == "INVALID_ARGUMENT"
    assert "feedback.score" in str(third.failure)
    for client in (first, second, third):
        await client.close()
    await dana.close()
    await eve.close()
