"""App and OS version comparison as mobile teams write versions.

Accepts 4.3, 4.3.1, v4.3.1, 4.3.1-beta.2, 4.3.1+build7. Numeric parts compare
numerically (4.10 > 4.9), missing parts count as zero (4.3 == 4.3.0), and a
pre-release sorts before its release (4.3.0-beta < 4.3.0), as in SemVer.
Build metadata is ignored.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["compare_versions", "parse_version"]

_VERSION = re.compile(r"^[vV]?(\d+(?:\.\d+)*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

VersionKey = tuple[tuple[int, ...], tuple[tuple[int, int | str], ...] | None]


@lru_cache(maxsize=4096)
def parse_version(text: str) -> VersionKey:
    match = _VERSION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a version such as 4.3 or 4.3.1-beta")
    numbers = tuple(int(p) for p in match.group(1).split("."))
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers = numbers[:-1]
    pre = None
    if match.group(2):
        # Numeric identifiers sort before alphanumeric ones, as in SemVer.
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in match.group(2).split("."))
    return numbers, pre


def _pad(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def compare_versions(left: str, right: str) -> int:
    """-1, 0 or 1; raises ValueError when either side is not a version."""
    (ln, lp), (rn, rp) = parse_version(left), parse_version(right)
    ln, rn = _pad(ln, rn)
    if ln != rn:
        return -1 if ln < rn else 1
    if lp == rp:
        return 0
    if lp is None:
        return 1
    if rp is None:
        return -1
    return -1 if lp < rp else 1
