"""Leaving refused cues out of an offer commit: shared by both backends, so they refuse alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .base import OfferCommit

__all__ = ["HISTORY_WHERE", "without_refused"]

# The stored cues a guard reads (parameters: subject, since, session id); the arbiter's memory replays the
# same: everything recent, the session's, and every decline and accept (decline memory, after_engagement).
HISTORY_WHERE = "subject = {0} AND (created_at >= {1} OR session_id = {2} OR status IN ('declined', 'accepted'))"


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
