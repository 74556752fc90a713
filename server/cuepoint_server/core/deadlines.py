"""The deadlines stored as timer rows (storage/timer_rows.py), and how each is named.

One row per deadline, named "<kind>:<target>", so arming it again (a restore, a reconnect to another replica)
moves or re-owns the same row instead of adding a second one that could fire again.
"""

from __future__ import annotations

from ..storage import TimerRecord

__all__ = [
    "CALLBACK",
    "CUE_EXPIRY",
    "DEVICE",
    "FALLBACK",
    "KEEP_TIMERS",
    "OFFER",
    "offer_of",
    "offer_timer",
    "timer",
    "timer_id",
]

CUE_EXPIRY = "cue_expiry"  # target: cue id; effect: the cue expires (cue.withdrawn) if still offered
CALLBACK = "callback"  # target: engagement id; effect: the callback queues again (engagement.queued)
# target: device id; its earliest idle, dwell or absence deadline (or pending cue's window edge), one row moved
# as the device's signals move it (storage/timer_rows.py REPEATING); effect: the device's time-driven scenarios
# evaluated at that time, their cue (if any) committed with the row marked done for that due time.
DEVICE = "device"
# target: engagement id; due `fallback_after` after it was created, armed while it waits in line with nobody
# free (core/desk_timers.py); effect: the fallback offered (the row done is that fact), if still queued.
FALLBACK = "fallback"
# id "offer:<engagement>", target "<engagement>:<associate>": the engagement's offer to a manual-claim associate,
# one row moved from one associate's offer to the next (storage/timer_rows.py REPEATING), due when the offer
# lapses; effect: the offer lapses for that due time (slot released, the associate told, the next one offered).
OFFER = "offer"
# Rows kept this long past their time (diagnostics), then purged: fired or moot by then.
KEEP_TIMERS = 86400.0


def timer_id(kind: str, target: str) -> str:
    return f"{kind}:{target}"


def timer(kind: str, target: str, due_at: float, owner: str) -> TimerRecord:
    return TimerRecord(timer_id=timer_id(kind, target), kind=kind, target=target, due_at=due_at, owner=owner)


def offer_timer(engagement_id: str, associate_id: str, due_at: float, owner: str) -> TimerRecord:
    return TimerRecord(
        timer_id=timer_id(OFFER, engagement_id),
        kind=OFFER,
        target=f"{engagement_id}:{associate_id}",
        due_at=due_at,
        owner=owner,
    )


def offer_of(target: str) -> tuple[str, str]:
    """(engagement id, associate id) of an offer row's target (engagement ids hold no colon)."""
    engagement_id, _, associate_id = target.partition(":")
    return engagement_id, associate_id
