"""Domain objects as the JSON the pages read (documented in README, "The browser desk and console")."""

from __future__ import annotations

import base64
from typing import Any

from ..core.engagement_model import context_json
from ..core.live import LiveNow, LiveSession
from ..core.model import (
    CallSignalRelay,
    ChannelChanged,
    ChatLine,
    EngagementEnded,
    EngagementOffered,
    EngagementView,
    JourneyAppended,
    JourneyItem,
    OfferWithdrawn,
    UpgradeAsk,
)
from ..core.replicas import ReplicaStatus
from ..scenarios.compiler import Routing

__all__ = ["associate_event", "engagement", "live_now", "queue_config", "replica"]


def queue_config(routing: Routing, queue: str) -> dict[str, Any]:
    spec = routing.queue(queue)
    return {
        "queue": queue,
        "dispositions": list(spec.dispositions),
        "canned_replies": list(spec.canned_replies),
        "outcomes": [{"id": o.id, "label": o.label or o.id, "success": o.success} for o in spec.wrap_up_outcomes],
        "offer_timeout": spec.offer_timeout,
    }


def engagement(view: EngagementView, routing: Routing) -> dict[str, Any]:
    return {
        "engagement_id": view.engagement_id,
        "cue_id": view.cue_id,
        "queue": view.queue,
        "state": view.state,
        "channel": view.channel,
        "created_at": view.created_at,
        "associate_id": view.associate_id,
        "associate_name": view.associate_name,
        "context": context_json(view.context),
        "queue_config": queue_config(routing, view.queue),
        # "callback": the user asked to be called back at callback_at on callback_number.
        "kind": view.kind,
        "callback_at": view.callback_at,
        "callback_number": view.callback_number,
        # The chat so far and the live journey since it was assigned: a desk that reloads shows them again.
        "transcript": [_chat(line) for line in view.transcript],
        "journey_since": [_journey(j) for j in view.journey_since],
    }


def _chat(item: ChatLine) -> dict[str, Any]:
    return {
        "type": "chat",
        "engagement_id": item.engagement_id,
        "message_id": item.message_id,
        "sender": item.sender,
        "text": item.text,
        "time": item.time,
    }


def _journey(j: JourneyItem) -> dict[str, Any]:
    return {"signal_id": j.signal_id, "time": j.time, "kind": j.kind, "name": j.name, "payload": j.payload}


def associate_event(item: object, routing: Routing, now: float) -> dict[str, Any] | None:
    """One item of an associate's outbox as a WebSocket message; None for what the desk does not show."""
    if isinstance(item, EngagementOffered):
        timeout = routing.queue(item.view.queue).offer_timeout
        return {
            "type": "offered",
            "engagement": engagement(item.view, routing),
            "expires_at": now + timeout,
            "timeout": timeout,
        }
    if isinstance(item, EngagementView):
        return {"type": "assigned", "engagement": engagement(item, routing)}
    if isinstance(item, OfferWithdrawn):
        return {"type": "offer_withdrawn", "engagement_id": item.engagement_id, "reason": item.reason}
    if isinstance(item, EngagementEnded):
        return {
            "type": "ended",
            "engagement_id": item.engagement_id,
            "disposition": item.disposition,
            "ended_by": item.ended_by,
        }
    if isinstance(item, ChatLine):
        return _chat(item)
    if isinstance(item, UpgradeAsk):
        return {
            "type": "upgrade_request",
            "engagement_id": item.engagement_id,
            "request_id": item.request_id,
            "channel": item.channel,
            "requested_by": item.requested_by,
        }
    if isinstance(item, ChannelChanged):
        return {
            "type": "channel_change",
            "engagement_id": item.engagement_id,
            "request_id": item.request_id,
            "channel": item.channel,
            "requested_by": item.requested_by,
            "accepted": item.accepted,
            "time": item.time,
        }
    if isinstance(item, CallSignalRelay):
        return {
            "type": "call_signal",
            "engagement_id": item.engagement_id,
            "kind": item.kind,
            "sender": item.sender,
            "payload": _payload(item.payload),
        }
    if isinstance(item, JourneyAppended):
        return {
            "type": "journey",
            "engagement_id": item.engagement_id,
            "items": [_journey(j) for j in item.items],
        }
    return None


def _payload(data: bytes) -> dict[str, str]:
    """SDP and ICE are text; anything else travels as base64."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _session(s: LiveSession) -> dict[str, Any]:
    cue = s.pending_cue
    return {
        "session_id": s.session_id,
        "device_id": s.device_id,
        "app_id": s.app_id,
        "status": s.status,
        "started_at": s.started_at,
        "last_signal_at": s.last_signal_at,
        "quiet_for": round(s.quiet_for, 3),
        "context": s.context,
        "segments": s.segments,
        "milestones": s.milestones,
        "pending_cue": None
        if cue is None
        else {
            "cue_id": cue.cue_id,
            "scenario_id": cue.scenario_id,
            "created_at": cue.created_at,
            "expires_at": cue.expires_at,
        },
        "engagement_id": s.engagement_id,
        "engagement_state": s.engagement_state,
        "replica_id": s.replica_id,
    }


def replica(r: ReplicaStatus) -> dict[str, Any]:
    return {
        "replica_id": r.replica_id,
        "address": r.address,
        "host": r.host,
        "started_at": r.started_at,
        "last_seen": r.last_seen,
        "scenarios_version": r.scenarios_version,
        "draining": r.draining,
        "alive": r.alive,
        "this": r.this,
    }


def live_now(live: LiveNow, *, offers_paused: bool) -> dict[str, Any]:
    sessions = sorted(live.sessions, key=lambda s: (s.started_at, s.device_id))
    counts = {status: sum(1 for s in sessions if s.status == status) for status in ("live", "idle", "inactive")}
    return {
        "now": live.now,
        "counts": counts,
        "pending_cues": sum(1 for s in sessions if s.pending_cue is not None),
        "offers_paused": offers_paused,
        # Live replicas that did not answer in time: their sessions are missing from this view.
        "unanswered_replicas": live.unanswered,
        "sessions": [_session(s) for s in sessions],
        "queues": [
            {
                "queue": q.queue,
                "waiting": q.waiting,
                "longest_wait": round(q.longest_wait, 1),
                "associates": q.associates,
                "available": q.available,
            }
            for q in live.queues
        ],
        "callbacks": [
            {
                "engagement_id": c.engagement_id,
                "queue": c.queue,
                "callback_at": c.callback_at,
                "state": c.state,
                "associate_id": c.associate_id,
            }
            for c in live.callbacks
        ],
    }
