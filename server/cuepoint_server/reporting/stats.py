"""The statistics the funnel puts beside conversion rates: an interval and a test against the control.

Plain formulas with the standard library, because the numbers are small and the choices must be
visible: a 95% Wilson score interval (well-behaved near 0 and 1 and for small samples, unlike the
normal approximation) and the two-sided two-proportion z-test with a pooled variance.
"""

from __future__ import annotations

import math

__all__ = ["Z95", "two_proportion_test", "wilson_interval"]

# The standard normal quantile for a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes / trials; (0, 0) without trials."""
    if trials <= 0:
        return 0.0, 0.0
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(p-value, difference x1/n1 - x2/n2) of the two-sided z-test; (1, 0) when a group is empty."""
    if n1 <= 0 or n2 <= 0:
        return 1.0, 0.0
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        # Both groups all-converted or none converted: no evidence of a difference.
        return 1.0, p1 - p2
    z = (p1 - p2) / se
    return math.erfc(abs(z) / math.sqrt(2)), p1 - p2
