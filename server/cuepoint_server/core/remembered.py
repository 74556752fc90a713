"""Which subjects' arbiter memory this process has replayed from storage, and which it holds whole.

The arbiter decides from memory (caps, cooldowns, decline memory); an offer's commit reads the subject's
stored cues again (storage/base.py, OfferGuard) because memory may lack what storage has: another process's
offers, or history still being replayed (an identity merge, a device's first session since a restart). A
store that knows no other process writes to it may skip that read for a subject whose memory is *whole*:
replayed in full, with nothing forgotten or merged in part since, so every stored cue of the subject is in
it (and memory only ever holds more: offers not yet committed).
"""

from __future__ import annotations

__all__ = ["Remembered"]


class Remembered:
    """Subjects replayed (or being replayed) from storage, and those whose memory is whole."""

    __slots__ = ("_last", "_partial", "_started", "_whole")

    def __init__(self) -> None:
        # Subject -> the token of its replay. A replay that ends after its subject was forgotten (and perhaps
        # begun again) holds a stale token: what it read may predate offers remembered, then forgotten.
        self._started: dict[str, int] = {}
        self._last = 0
        self._whole: set[str] = set()
        # Memory merged from a subject that was not whole: not whole until forgotten and replayed again.
        self._partial: set[str] = set()

    def begin(self, subject: str) -> int | None:
        """Start replaying the subject: a token for `replayed`, or None if it was replayed (or is) already."""
        if subject in self._started:
            return None
        self._last += 1
        self._started[subject] = self._last
        return self._last

    def replayed(self, subject: str, token: int) -> None:
        """The replay `begin` started has put every stored cue of the subject in memory."""
        if self._started.get(subject) == token and subject not in self._partial:
            self._whole.add(subject)

    def forget(self, subject: str) -> None:
        """The arbiter forgot the subject (evicted, erased, refused by storage): replayed again when needed."""
        self._started.pop(subject, None)
        self._whole.discard(subject)
        self._partial.discard(subject)

    def merged(self, source: str, target: str) -> None:
        """The source's memory was merged into the target's (an identity): whole only if both were."""
        if source not in self._whole:
            self._partial.add(target)
            self._whole.discard(target)

    def whole(self, subject: str) -> bool:
        return subject in self._whole
