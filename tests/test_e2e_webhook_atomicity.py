"""Each lifecycle webhook's outbox row commits in the same transaction as the change it reports.

A row written after its change commits, in a separate write, is lost by a crash in between. Here the
separate path (`Store.enqueue_webhooks`) fails, as if the process had died right after each change: an event
still arrives only if its row was part of the change's own transaction. Real server, real SDK, a real
HTTP receiver; then the database shows each row next to the state it reports.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.storage import SqliteStore, WebhookRecord
from cuepoint_server.webhooks import WebhookConfig

from .conftest import phone
from .test_e2e_webhooks import Receiver

SCENARIO = """
routing:
  queues:
    - {id: default}
    - {id: billing}
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: hi, channel: chat, feedback: {kind: csat}}
    engagement_outcome: {event: sync_succeeded, within: 10m}
"""

LIFECYCLE = (
    "cue.offered",
    "cue.answered",
    "cue.withdrawn",
    "engagement.queued",
    "engagement.assigned",
    "engagement.transferred",
    "engagement.ended",
    "engagement.wrapped_up",
    "engagement.outcome",
    "feedback.received",
)


async def test_every_lifecycle_webhook_is_stored_with_its_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def written_apart(self: SqliteStore, rows: Sequence[WebhookRecord]) -> None:
        raise RuntimeError("an outbox row written apart from its change: a crash in between would lose it")

    monkeypatch.setattr(SqliteStore, "enqueue_webhooks", written_apart)
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    receiver = Receiver()
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01)
    db = tmp_path / "db.sqlite"
    server = await CuepointServer.start(
        ServerConfig(port=0, db=str(db), scenarios=str(folder), webhooks=(hook,)), clock=ManualClock()
    )
    try:
        # A cue withdrawn (the pause), a cue declined.
        gone = await phone(server, "phone-0", user_id="u-0")
        await gone.track("help")
        withdrawn = await gone.next_cue(timeout=5)
        await server.core.set_offers_paused(True, "incident")
        await server.core.set_offers_paused(False, "")
        client = await phone(server)
        await client.track("help")
        await client.decline(await client.next_cue(timeout=5))
        # Accepted, queued, assigned, transferred to another queue, assigned again, wrapped up, rated, outcome.
        other = await phone(server, "phone-2", user_id="user-2")
        await other.track("help")
        engagement = await other.accept(await other.next_cue(timeout=5))
        dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["default"])
        erin = await cuepoint.connect_associate(server.address, associate_id="erin", queues=["billing"])
        first = await dana.next_engagement(timeout=5)
        await dana.transfer(first, to_queue="billing")
        second = await erin.next_engagement(timeout=5)
        await erin.end(second, disposition="resolved", notes="atomic")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        await other.give_feedback(await other.next_feedback_request(timeout=5), 5)
        await other.track("sync_succeeded")
        await other.flush()
        await receiver.wait_for(*LIFECYCLE)
        for c in (gone, client, other):
            await c.close()
        for a in (dana, erin):
            await a.close()
    finally:
        await server.stop(0.5)
        receiver.server.shutdown()

    events = receiver.events()
    assert len({e["id"] for e in events}) == len(events)
    by_type = {e["type"]: e["data"] for e in events}
    assert by_type["cue.withdrawn"]["cue_id"] == withdrawn.cue_id
    assert by_type["engagement.transferred"]["transfers"][0]["to_queue"] == "billing"
    assert by_type["engagement.wrapped_up"]["notes"] == "atomic"
    assert by_type["feedback.received"]["score"] == 5
    # What each event reports is on file as it says (the rows left the outbox once delivered).
    with sqlite3.connect(db) as conn:
        (state, disposition, outcome) = conn.execute(
            "SELECT state, disposition, outcome FROM engagements WHERE engagement_id = ?",
            (by_type["engagement.wrapped_up"]["engagement_id"],),
        ).fetchone()
        assert (state, disposition, outcome) == ("ended", "resolved", "achieved")
        (status,) = conn.execute("SELECT status FROM cues WHERE cue_id = ?", (withdrawn.cue_id,)).fetchone()
        assert status == "withdrawn"
        assert conn.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0] == 0
    assert json.loads(json.dumps(by_type["engagement.outcome"]))["outcome"] == "achieved"
