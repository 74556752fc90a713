"""The SDK's signal ids: ULID layout, strictly increasing, equal to the plain base32 encoding (issue 13 made
the encoder table-driven and incremental; this pins it to the definition)."""

from __future__ import annotations

import secrets

from cuepoint._ids import _ALPHABET, IdGenerator


def reference(ms: int, rand: int) -> str:
    """Crockford base32 of the 128-bit value, 26 characters, most significant first (the ULID definition)."""
    value, chars = (ms << 80) | rand, []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ids_are_the_ulid_encoding_of_their_time_and_random_part() -> None:
    clock = Clock(1_764_000_000.123)
    ids = IdGenerator(clock)
    for step in range(3000):
        if step % 7 == 0:
            clock.now += 0.001 * (1 + secrets.randbelow(5))  # a new millisecond: a new random part
        made = ids()
        assert made == reference(ids._last_ms, ids._last_rand)
        assert len(made) == 26 and set(made) <= set(_ALPHABET)


def test_ids_strictly_increase_within_a_millisecond_across_every_carry_and_when_the_clock_steps_back() -> None:
    clock = Clock(1_764_000_000.5)
    # Near each carry of the random part: the low 10 bits, the low 20, and the whole 80 (borrows a millisecond).
    for start in (1020, (1 << 20) - 3, (1 << 80) - 3):
        ids = IdGenerator(clock)
        ids._last_rand, ids._last_ms = start - 1, int(clock.now * 1000)
        previous = reference(ids._last_ms, ids._last_rand)
        ids._head = reference(ids._last_ms, ids._last_rand)[:24]
        for _ in range(6):
            made = ids()
            assert made > previous
            assert made == reference(ids._last_ms, ids._last_rand)
            previous = made
    clock.now -= 10  # the clock steps back: still increasing
    for _ in range(5):
        made = ids()
        assert made > previous
        previous = made
