"""Engagements: from an accepted cue to a human associate and back.

The desk is the sum of its parts, each one idea in its own module: routing (desk_routing.py),
conversation (desk_conversation.py), call signalling (desk_calls.py), wrap-up with the outcome
(desk_wrapup.py), more than one associate on an engagement (desk_participants.py), transfers
(desk_transfer.py), callbacks (desk_callbacks.py), feedback (desk_feedback.py), an associate's
connection dropping for a moment (desk_resume.py), a device's (desk_reconnect.py), an engagement following
its device to another replica (desk_handover.py), over shared state and delivery (desk_base.py).
Knows nothing of gRPC.
"""

from __future__ import annotations

from .desk_base import DeskConfig
from .desk_callbacks import Callbacks
from .desk_calls import Calls
from .desk_handover import HandOver
from .desk_reconnect import Reconnect
from .desk_transfer import Transfers
from .engagement_model import Engagement, EngagementEvent, context_from_json, context_json

__all__ = ["DeskConfig", "Engagement", "EngagementDesk", "EngagementEvent", "context_from_json", "context_json"]


class EngagementDesk(HandOver, Reconnect, Transfers, Callbacks, Calls):
    """Routing, conversation, calls, wrap-up, participants, transfers, callbacks, feedback, resuming
    associates and reconnecting devices of every engagement here."""
