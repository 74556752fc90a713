"""Sortable unique ids for signals and batches (ULID layout).

Ids sort by creation time so the server can store and page signals in id
order, and they are unique per device without coordination, which is what
makes a resent signal recognisable as a duplicate.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_RANDOM_BITS = 80


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


class IdGenerator:
    """26-character ids: 48 bits of milliseconds, then 80 random bits.

    Within one millisecond (or if the clock steps back) the random part is
    incremented instead of redrawn, so ids from one generator strictly increase.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self) -> str:
        ms = max(int(self._clock() * 1000), 0) & ((1 << 48) - 1)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_rand += 1
            if self._last_rand >> _RANDOM_BITS:
                # 2**80 ids in one millisecond: borrow the next millisecond.
                ms, self._last_rand = ms + 1, 0
        else:
            self._last_rand = secrets.randbits(_RANDOM_BITS)
        self._last_ms = ms
        return _encode(ms, 10) + _encode(self._last_rand, 16)
