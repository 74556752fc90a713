"""Sortable unique ids for signals and batches (ULID layout).

Ids sort by creation time so the server can store and page signals in id
order, and they are unique per device without coordination, which is what
makes a resent signal recognisable as a duplicate.

Every tracked event takes one id, so this is on the SDK's hottest path: ten
bits become two characters by one table lookup, and within one millisecond
(where the random part only counts up) only the last two characters are
encoded again (issue 13: 3.5 -> under 0.5 us per id).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_RANDOM_BITS = 80
# Every 10-bit value as its two characters.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_LOW = 1023


def _encode_ms(ms: int) -> str:
    """48 bits as 10 characters (the top two bits of the first are zero)."""
    p = _PAIRS
    return p[ms >> 40] + p[(ms >> 30) & _LOW] + p[(ms >> 20) & _LOW] + p[(ms >> 10) & _LOW] + p[ms & _LOW]


def _encode_high(rand: int) -> str:
    """The upper 70 of the 80 random bits as 14 characters (the last two come from `_PAIRS[rand & 1023]`)."""
    p = _PAIRS
    return (
        p[rand >> 70]
        + p[(rand >> 60) & _LOW]
        + p[(rand >> 50) & _LOW]
        + p[(rand >> 40) & _LOW]
        + p[(rand >> 30) & _LOW]
        + p[(rand >> 20) & _LOW]
        + p[(rand >> 10) & _LOW]
    )


class IdGenerator:
    """26-character ids: 48 bits of milliseconds, then 80 random bits.

    Within one millisecond (or if the clock steps back) the random part is
    incremented instead of redrawn, so ids from one generator strictly increase.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last_ms = -1
        self._last_rand = 0
        # The id's first 24 characters as last encoded: the milliseconds and all but the random part's low 10 bits.
        self._head = ""

    def __call__(self) -> str:
        ms = max(int(self._clock() * 1000), 0) & ((1 << 48) - 1)
        if ms <= self._last_ms:
            rand = self._last_rand + 1
            if rand & _LOW:
                # No carry out of the low 10 bits: the head stands, two characters change.
                self._last_rand = rand
                return self._head + _PAIRS[rand & _LOW]
            ms = self._last_ms
            if rand >> _RANDOM_BITS:
                # 2**80 ids in one millisecond: borrow the next millisecond.
                ms, rand = ms + 1, 0
        else:
            rand = secrets.randbits(_RANDOM_BITS)
        self._last_ms, self._last_rand = ms, rand
        self._head = _encode_ms(ms) + _encode_high(rand)
        return self._head + _PAIRS[rand & _LOW]
