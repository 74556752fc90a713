"""Deterministic holdout (control group) assignment.

A subject (``user:<id>``, else ``device:<id>``) is held out of a scenario when a stable
hash of scenario id and subject, read as a number in [0, 1), falls below the scenario's
holdout share. Same subject, same scenario: same answer, on every server and restart;
a different scenario draws independently.
"""

from __future__ import annotations

import hashlib

__all__ = ["holdout_draw", "in_holdout"]


def holdout_draw(subject: str, scenario_id: str) -> float:
    """The subject's position in [0, 1) for this scenario: the first 8 bytes of SHA-256."""
    digest = hashlib.sha256(f"{scenario_id}\x00{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_holdout(subject: str, scenario_id: str, share: float) -> bool:
    return share > 0 and holdout_draw(subject, scenario_id) < share
