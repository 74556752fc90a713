"""Whether one server process is, and has been since it opened, the only one deciding offers on a SQLite file.

Several servers may share one SQLite file (tests/test_e2e_shared_store.py). Each decides from its own memory,
so an offer's commit reads the subject's stored cues again (storage/base.py, OfferGuard). A server that knows
no other server has written since it opened may skip that read for a subject whose memory it holds whole
(core/remembered.py): the read can then only agree. It was ~8% of a cue round's instructions and ~15% of its
event-loop CPU in process (issue 13, 2026-12-07).

How a server knows, with nothing to clean up after a crash:

1. It holds a POSIX read lock on ``<db>-deciders`` for as long as it runs (the kernel drops it with the
   process). At open, after taking its own, it asks (F_GETLK) whether any other process holds one: if so,
   another server is running, and it never claims to be alone. Servers in one process (tests run several)
   share one descriptor per file, counted here: POSIX locks belong to the process, so F_GETLK cannot see
   them, and closing any descriptor of the file would drop the lock of every other.
2. At open it also adds one to a counter row in the database, in its own transaction, and keeps the value.
   Inside each offer commit (under SQLite's write lock) it reads the row again: a different value means
   another server opened after it, whose offers its memory may lack, even if that server has since stopped.

Either finding is final for the life of the store. Order of the steps (lock, count, ask) makes any two
servers see each other: the later one to lock either finds the earlier's lock, or counts after it and is
seen by its counter. Stores opened by tools (``cuepoint report``, exports) do not take part: they decide
nothing, and the server opens its store as the decider (``SqliteStore.open(decider=True)``).

Only on Linux (where the layout of ``struct flock`` below is known); elsewhere a server never claims to be
alone and every offer reads, as before. The lock needs a file system with POSIX locks, as SQLite's WAL mode
itself does (it does not work on network file systems).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import sys

import aiosqlite

__all__ = ["SoleDecider"]

# Lock file path -> [descriptor, stores of this process holding it].
_HELD: dict[str, list[int]] = {}

LOCK_SUFFIX = "-deciders"
_TABLE = "CREATE TABLE IF NOT EXISTS deciders (id INTEGER PRIMARY KEY CHECK (id = 1), opened INTEGER NOT NULL)"
_COUNT = (
    "INSERT INTO deciders (id, opened) VALUES (1, 1)"
    " ON CONFLICT (id) DO UPDATE SET opened = opened + 1 RETURNING opened"
)
_READ = "SELECT opened FROM deciders WHERE id = 1"
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (32 bytes).
_FLOCK = "@hhqqi4x"


class SoleDecider:
    """This process's claim to be the only server deciding offers on its database (see the module's text)."""

    __slots__ = ("_alone", "_lock", "_opened")

    def __init__(self, lock: str | None, opened: int, alone: bool) -> None:
        self._lock = lock
        self._opened = opened
        self._alone = alone

    @classmethod
    async def join(cls, conn: aiosqlite.Connection, location: str) -> SoleDecider:
        """Take part as a deciding server; ``conn`` is the store's writer, outside any transaction."""
        private = location in ("", ":memory:")  # nobody else can open it
        lock = None if private else _hold(location)
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.execute(_TABLE)
                row = await (await conn.execute(_COUNT)).fetchone()
                await conn.execute("COMMIT")
            except BaseException:
                await conn.rollback()
                raise
        except BaseException:
            _release(lock)
            raise
        assert row is not None
        if private:
            alone = True
        elif lock is None:
            alone = False  # no lock, so no way to tell
        else:
            held = _HELD[lock]
            alone = held[1] == 1 and not _others_hold(held[0])
        return cls(lock, int(row[0]), alone)

    def alone(self, db: sqlite3.Connection) -> bool:
        """Whether no other server has opened the database since this one did; inside the writer's transaction."""
        if self._alone:
            row = db.execute(_READ).fetchone()
            if row is None or int(row[0]) != self._opened:
                self._alone = False  # for good: what that server wrote may be missing from this one's memory
        return self._alone

    def close(self) -> None:
        _release(self._lock)
        self._lock = None


def _hold(database: str) -> str | None:
    """This process's read lock on the database's lock file, shared by its stores; the key to release it, or None."""
    # One lock file per database file, however its servers name it (a symlink, a relative path).
    path = os.path.realpath(database) + LOCK_SUFFIX
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
        return path
    if sys.platform != "linux":
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    _HELD[path] = [fd, 1]
    return path


def _release(path: str | None) -> None:
    held = None if path is None else _HELD.get(path)
    if path is None or held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[path]
        os.close(held[0])


def _others_hold(fd: int) -> bool:
    """Whether another process holds a lock on the file (F_GETLK ignores this process's own locks)."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return True  # cannot tell: assume someone
    return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
