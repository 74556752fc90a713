"""Leaving refused cues out of an offer commit: shared by both backends, so they refuse alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .base import OfferCommit

__all__ = ["HISTORY_WHERE", "without_refused"]

# The stored cues a guard reads (parameters: subject, since, session id; then the column that orders cues
# of one time: SQLite's rowid, PostgreSQL's seq). What the arbiter's recheck can tell apart: everything
# recent (cooldown, min_gap and the caps look back at most `since`), the session's (per-session caps,
# after_engagement: an accept counts only in its own session), and per scenario the latest decline
# (decline memory keeps only that one). Older declines and accepts of other sessions change nothing, and
# reading every one of them made each offer cost what the subject ever declined.
# Each scenario's latest decline is one descending walk of the (subject, scenario_id, created_at) index that
# stops at the first decline: 2,000 stored declines cost SQLite 1.6 ms a read this way, 6.8 ms with a window
# function (ROW_NUMBER) over them.
HISTORY_WHERE = (
    "subject = {0} AND (created_at >= {1} OR session_id = {2} OR {3} IN ("
    "SELECT (SELECT d.{3} FROM cues AS d WHERE d.subject = {0} AND d.scenario_id = s.scenario_id"
    " AND d.status = 'declined' ORDER BY d.created_at DESC, d.{3} DESC LIMIT 1)"
    " FROM (SELECT DISTINCT scenario_id FROM cues WHERE subject = {0}) AS s))"
)


def without_refused(work: OfferCommit, refused: Mapping[str, tuple[str, str]]) -> OfferCommit:
    """The commit less the refused cues and their webhook rows; their "offered" decisions become blocked."""
    if not refused:
        return work
    decisions = []
    for d in work.decisions:
        reason = refused.get(d.cue_id) if d.cue_id else None
        if reason is not None and d.outcome == "offered":
            d = dataclasses.replace(d, outcome="blocked", reason=reason[0], detail=reason[1], cue_id="")
        decisions.append(d)
    # Every cue event names its cue id in its body (the same convention erase_user relies on).
    webhooks = [w for w in work.webhooks if not any(f'"{cue_id}"' in w.body for cue_id in refused)]
    return dataclasses.replace(
        work,
        cues=[c for c in work.cues if c.cue_id not in refused],
        decisions=decisions,
        webhooks=webhooks,
        guards=[],
        timers=[t for t in work.timers if t.target not in refused],
    )
