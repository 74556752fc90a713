"""What a guarded offer reads of the subject's stored cues (storage/offer_guard.py), on both backends.

The recheck (engine/arbiter.py) can tell apart only recent cues, the session's, and each scenario's latest
decline: those are read, and nothing else, however much the subject declined before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cuepoint_server.storage import CueRecord, DecisionRecord, OfferCommit, OfferGuard

NOW = 1_000_000.0
SINCE = NOW - 86_400.0
SUBJECT = "user:u"


def cue(cue_id: str, scenario_id: str, session_id: str, at: float, status: str) -> CueRecord:
    return CueRecord(
        cue_id, scenario_id, "app", "dev", SUBJECT, session_id, at, at + 60.0, "chat", "Hi", status,
        at + 1.0 if status in ("declined", "accepted") else None, {},
    )  # fmt: skip


async def test_a_guard_reads_recent_and_session_cues_and_each_scenario_s_latest_decline(store: Any) -> None:
    old = [
        cue("a-1", "a", "s1", 1000.0, "declined"),
        cue("a-2", "a", "s2", 2000.0, "declined"),
        cue("a-acc", "a", "s2", 2500.0, "accepted"),  # another session's accept: after_engagement is per session
        cue("a-3", "a", "s3", 3000.0, "declined"),
        cue("a-3b", "a", "s4", 3000.0, "declined"),  # the same time, stored later: the latest
        cue("b-1", "b", "s1", 1500.0, "declined"),
        cue("b-old", "b", "s1", 1600.0, "expired"),
        cue("here", "c", "now", 500.0, "dismissed"),  # old, but of the current session
        cue("recent", "b", "s9", NOW - 100.0, "offered"),
    ]
    for record in old:
        await store.commit_offer(OfferCommit(cues=[record]))
    seen: list[list[str]] = []

    def check(history: Sequence[CueRecord]) -> tuple[str, str] | None:
        seen.append([c.cue_id for c in history])
        declined = [c for c in history if c.scenario_id == "a" and c.status == "declined"]
        return ("declined", "after_decline: never") if declined else None

    offered = cue("new", "a", "now", NOW, "offered")
    decision = DecisionRecord(NOW, "app", "dev", SUBJECT, "now", "a", "offered", "", "", "new")
    result = await store.commit_offer(
        OfferCommit(cues=[offered], decisions=[decision], guards=[OfferGuard("new", SUBJECT, "now", SINCE, check)])
    )
    assert seen == [["here", "b-1", "a-3b", "recent"]]
    # A decline older than any window still refuses, as the scenario's decline memory says.
    assert result.refused == {"new": ("declined", "after_decline: never")}
    assert "new" not in [c.cue_id for c in await store.cues_for_subject(SUBJECT)]
