"""Live now across replicas: a replica's view survives the bus (JSON) and views merge without double counting.

The end-to-end case (two real replicas, ListLiveSessions on either) is in test_e2e_cluster.py; these pin the
merge rules it cannot reach cheaply: a session on two replicas at once, queues seen from both sides.
"""

from __future__ import annotations

import json

from cuepoint_server.core.live import LiveNow, LivePendingCue, LiveSession, QueueLoad, ScheduledCallback
from cuepoint_server.core.live_cluster import live_items, merge_live


def session(session_id: str, device_id: str, replica: str, last: float | None) -> LiveSession:
    return LiveSession(
        session_id, device_id, "fitkit", "live", 100.0, last, 1.0, {"device.os": "iOS", "n": 2, "ok": True},
        ["new"], ["m1"], LivePendingCue("cue-1", "help", 101.0, 700.0) if device_id == "d-b" else None,
        "", "", replica,
    )  # fmt: skip


def over_the_bus(live: LiveNow) -> list[dict[str, object]]:
    return [dict(item) for item in json.loads(json.dumps(live_items(live)))]


def test_views_of_two_replicas_merge_into_one_without_double_counting() -> None:
    here = LiveNow(
        500.0,
        [session("s-a", "d-a", "A", 200.0), session("s-moving", "d-m", "A", 150.0)],
        [QueueLoad("support", waiting=1, associates=2, available=1, longest_wait=30.0)],
        [ScheduledCallback("e-1", "support", 900.0, "callback_requested", "")],
    )
    there = LiveNow(
        499.0,
        [session("s-b", "d-b", "B", 300.0), session("s-moving", "d-m", "B", 400.0)],
        [
            QueueLoad("support", waiting=2, associates=2, available=2, longest_wait=90.0),
            QueueLoad("sales", waiting=0, associates=1, available=1),
        ],
        [
            ScheduledCallback("e-1", "support", 900.0, "callback_requested", ""),
            ScheduledCallback("e-2", "sales", 950.0, "queued", ""),
        ],
    )
    merged = merge_live(here, {"B": over_the_bus(there)}, ["C"])
    assert merged.now == 500.0 and merged.unanswered == ["C"]
    # One row per session: the moving device counts once, as the replica that heard from it last has it.
    rows = {s.session_id: s for s in merged.sessions}
    assert set(rows) == {"s-a", "s-b", "s-moving"}
    assert rows["s-moving"].replica_id == "B"
    assert rows["s-b"] == session("s-b", "d-b", "B", 300.0)  # every field, the pending cue too, survives JSON
    # Waiting engagements are each replica's own: summed; associates are seen by both: not summed.
    loads = {q.queue: q for q in merged.queues}
    assert loads["support"] == QueueLoad("support", waiting=3, associates=2, available=2, longest_wait=90.0)
    assert loads["sales"].waiting == 0
    assert [c.engagement_id for c in merged.callbacks] == ["e-1", "e-2"]
