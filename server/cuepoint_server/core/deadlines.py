"""The deadlines stored as timer rows (storage/timer_rows.py), and how each is named.

One row per deadline, named "<kind>:<target>", so arming it again (a restore, a reconnect to another replica)
moves or re-owns the same row instead of adding a second one that could fire again.
"""

from __future__ import annotations

from ..storage import TimerRecord

__all__ = ["CALLBACK", "CUE_EXPIRY", "DEVICE", "KEEP_TIMERS", "timer", "timer_id"]

CUE_EXPIRY = "cue_expiry"  # target: cue id; effect: the cue expires (cue.withdrawn) if still offered
CALLBACK = "callback"  # target: engagement id; effect: the callback queues again (engagement.queued)
# target: device id; its earliest idle, dwell or absence deadline (or pending cue's window edge), one row moved
# as the device's signals move it (storage/timer_rows.py REPEATING); effect: the device's time-driven scenarios
# evaluated at that time, their cue (if any) committed with the row marked done for that due time.
DEVICE = "device"
# Rows kept this long past their time (diagnostics), then purged: fired or moot by then.
KEEP_TIMERS = 86400.0


def timer_id(kind: str, target: str) -> str:
    return f"{kind}:{target}"


def timer(kind: str, target: str, due_at: float, owner: str) -> TimerRecord:
    return TimerRecord(timer_id=timer_id(kind, target), kind=kind, target=target, due_at=due_at, owner=owner)
