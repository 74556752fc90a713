"""Live now across replicas: one replica's view as bus message items, and the merge of every replica's.

Device streams live in the memory of the replica holding them, so the cluster's live view is gathered by
asking the others over the bus (Cluster.ask_replicas) rather than read from storage: only the holder knows
when a device last spoke, what is on its screen and its segments. Each answer is a list of tagged items
(a session, a queue's load, a scheduled callback) so a big answer travels in several bus messages.

Merging: a session appears once (a device moving between replicas may briefly be on two: the one heard
from last wins); a queue's waiting engagements are summed, since each engagement waits on the replica that
owns it, but its associates are not: every replica sees every associate (api/associate_links.py opens a
stand-in on each), so the largest count is taken, a replica that has not heard of a sign-in yet reporting
fewer; callbacks appear once per engagement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .live import LiveNow, LivePendingCue, LiveSession, QueueLoad, ScheduledCallback

__all__ = ["LIVE", "live_items", "merge_live"]

# The question Cluster.ask_replicas sends for the live view.
LIVE = "live"


def live_items(live: LiveNow) -> list[dict[str, Any]]:
    """`live` as JSON-able items: {"session": ...}, {"queue": ...}, {"callback": ...}."""
    return [
        *({"session": dataclasses.asdict(s)} for s in live.sessions),
        *({"queue": dataclasses.asdict(q)} for q in live.queues),
        *({"callback": dataclasses.asdict(c)} for c in live.callbacks),
    ]


def _session(data: Mapping[str, Any]) -> LiveSession:
    cue = data.get("pending_cue")
    fields = {**data, "pending_cue": LivePendingCue(**cue) if cue else None}
    return LiveSession(**fields)


def merge_live(here: LiveNow, answers: Mapping[str, Sequence[Mapping[str, Any]]], unanswered: list[str]) -> LiveNow:
    """This replica's view `here` with the other replicas' `answers` (items by replica id)."""
    sessions = {s.session_id: s for s in here.sessions}
    queues = {q.queue: q for q in here.queues}
    callbacks = {c.engagement_id: c for c in here.callbacks}
    for items in answers.values():
        for item in items:
            if "session" in item:
                session = _session(item["session"])
                known = sessions.get(session.session_id)
                if known is None or (session.last_signal_at or 0.0) > (known.last_signal_at or 0.0):
                    sessions[session.session_id] = session
            elif "queue" in item:
                load = QueueLoad(**item["queue"])
                seen = queues.get(load.queue)
                queues[load.queue] = load if seen is None else _add(seen, load)
            elif "callback" in item:
                callback = ScheduledCallback(**item["callback"])
                callbacks.setdefault(callback.engagement_id, callback)
    return LiveNow(
        here.now,
        sorted(sessions.values(), key=lambda s: (s.started_at, s.device_id)),
        [queues[name] for name in sorted(queues)],
        sorted(callbacks.values(), key=lambda c: (c.callback_at, c.engagement_id)),
        unanswered=sorted(unanswered),
    )


def _add(a: QueueLoad, b: QueueLoad) -> QueueLoad:
    return QueueLoad(
        queue=a.queue,
        waiting=a.waiting + b.waiting,
        associates=max(a.associates, b.associates),
        available=max(a.available, b.available),
        longest_wait=max(a.longest_wait, b.longest_wait),
    )
