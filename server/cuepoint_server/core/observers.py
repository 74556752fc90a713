"""Hooks the core calls as things happen, for metrics (metrics.py) and the like.

Subclass CoreObserver, override what you need, and append an instance to
``Core.observers``. Arbitration decisions (offered, blocked and why) have their
own hook, ``Core.decision_listeners``, and engagements theirs,
``Core.desk.listeners`` (engagement.queued / assigned / transferred / ended / wrapped_up / outcome). Observers are
called synchronously on the event loop, in the middle of the core's work: keep
them cheap, and never raise.
"""

from __future__ import annotations

__all__ = ["CoreObserver"]


class CoreObserver:
    def signals_received(self, fresh: int, duplicates: int) -> None:
        """A batch was accepted: `fresh` new signals, `duplicates` resent ones (acked again, not counted)."""

    def cue_offered(self, scenario_id: str, latency: float) -> None:
        """A cue was handed to the device's stream, `latency` seconds (core clock) after the signal
        batch, or the timer, that made its scenario qualify."""

    def cue_settled(self, scenario_id: str, status: str) -> None:
        """A pending cue ended: accepted, declined, dismissed, expired or withdrawn."""
