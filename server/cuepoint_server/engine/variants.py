"""Deterministic A/B variant assignment.

A subject (``user:<id>``, else ``device:<id>``) draws a number in [0, 1) from a stable hash
of scenario id and subject, salted apart from the holdout's draw so the two are independent;
the draw falls into one variant's slice of the weights. Same subject, same scenario, same
weights: same variant, on every device, server and restart. A stopped variant's slice goes
to the control (the first variant), so stopping one moves nobody else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

__all__ = ["assign_variant", "variant_draw"]


def variant_draw(subject: str, scenario_id: str) -> float:
    """The subject's position in [0, 1) for this scenario's variants: the first 8 bytes of SHA-256."""
    digest = hashlib.sha256(f"variant\x00{scenario_id}\x00{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_variant(
    subject: str, scenario_id: str, weights: Sequence[tuple[str, float]], stopped: Collection[str] = ()
) -> str:
    """The variant id for this subject; ``weights`` in file order, the first being the control."""
    if not weights:
        return ""
    total = sum(w for _, w in weights)
    point = variant_draw(subject, scenario_id) * total
    chosen = weights[-1][0]
    upto = 0.0
    for variant, weight in weights:
        upto += weight
        if point < upto:
            chosen = variant
            break
    return weights[0][0] if chosen in stopped else chosen
