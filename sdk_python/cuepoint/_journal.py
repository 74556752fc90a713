"""The optional on-disk outbox: unacked signals that survive an app restart.

One SQLite file (stdlib ``sqlite3``), one table; a row per unacked signal
holding the serialized ``cuepoint.v1.Signal`` (so its id and device time
travel with it), keyed by app, device and signal id, ordered by insertion::

    outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, app_id, device_id, signal_id, time REAL, payload BLOB)

It also keeps the install's device secret (issued by the server on the first connection and presented in
every Hello): ``device_secret(app_id, device_id, secret)``, written at once, outside the outbox batching.

Writes are buffered and applied by :meth:`Journal.commit` in one transaction;
the client calls it once per event-loop pass, so a burst of ``track()`` calls
costs one commit. WAL with ``synchronous=NORMAL``: a commit survives the app
being killed, while an OS crash or power loss may roll back the last ones.
Deletes (acks) are the cheap side to lose: a signal deleted too late is only
resent, and the server acks the resend as a duplicate.

Synchronous on purpose: each commit is a WAL append without fsync, cheaper
than handing it to a thread. Not thread-safe; one client drives it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable

__all__ = ["Journal", "JournalError"]

log = logging.getLogger("cuepoint")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    signal_id TEXT NOT NULL,
    time REAL NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (app_id, device_id, signal_id)
)
"""
_SECRET_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_secret (
    app_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    secret TEXT NOT NULL,
    PRIMARY KEY (app_id, device_id)
)
"""


class JournalError(Exception):
    """The outbox file could not be opened or read."""


class Journal:
    """Unacked signals of one ``(app_id, device_id)`` in a SQLite file."""

    def __init__(self, path: str, app_id: str, device_id: str) -> None:
        self.path = path
        self._key = (app_id, device_id)
        self._adds: list[tuple[str, float, bytes]] = []
        self._removes: set[str] = set()
        try:
            # Autocommit mode; commit() opens its own transaction.
            self._conn: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = 2000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.execute(_SECRET_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the outbox {path!r}: {exc}") from exc

    @property
    def buffered(self) -> int:
        """Writes waiting for :meth:`commit`."""
        return len(self._adds) + len(self._removes)

    def load(self, *, not_before: float) -> list[tuple[str, bytes]]:
        """Signals left by earlier runs, oldest first, as (signal_id, payload).

        Rows timed before ``not_before`` are deleted instead: the server would
        reject them, and one rejected signal ends the whole session.
        """
        conn = self._connection()
        try:
            expired = conn.execute(
                "DELETE FROM outbox WHERE app_id = ? AND device_id = ? AND time < ?", (*self._key, not_before)
            ).rowcount
            rows = conn.execute(
                "SELECT signal_id, payload FROM outbox WHERE app_id = ? AND device_id = ? ORDER BY seq", self._key
            ).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the outbox {self.path!r}: {exc}") from exc
        if expired > 0:
            log.warning("cuepoint: dropped %d journaled signal(s) too old to send", expired)
        return [(str(signal_id), bytes(payload)) for signal_id, payload in rows]

    def add(self, signal_id: str, time: float, payload: bytes) -> None:
        self._adds.append((signal_id, time, payload))

    def remove(self, signal_ids: Iterable[str]) -> None:
        self._removes.update(signal_ids)

    def commit(self) -> bool:
        """Apply buffered adds, then removes, in one transaction. False (and logged) on failure.

        A failed commit is not retried: the signals are still in memory and
        are sent as usual; only their survival of an app restart is lost.
        """
        if (not self._adds and not self._removes) or self._conn is None:
            return True
        adds, removes = self._adds, self._removes
        self._adds, self._removes = [], set()
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (app_id, device_id, signal_id, time, payload) VALUES (?, ?, ?, ?, ?)",
                [(*self._key, signal_id, time, payload) for signal_id, time, payload in adds],
            )
            conn.executemany(
                "DELETE FROM outbox WHERE app_id = ? AND device_id = ? AND signal_id = ?",
                [(*self._key, signal_id) for signal_id in removes],
            )
            conn.execute("COMMIT")
        except sqlite3.Error:
            log.warning("cuepoint: could not write the outbox %s", self.path, exc_info=True)
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return False
        return True

    def device_secret(self) -> str | None:
        """The device secret stored for this app and device, if any."""
        try:
            row = (
                self._connection()
                .execute("SELECT secret FROM device_secret WHERE app_id = ? AND device_id = ?", self._key)
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the outbox {self.path!r}: {exc}") from exc
        return str(row[0]) if row else None

    def save_device_secret(self, secret: str) -> bool:
        """Keep the secret the server issued, committed at once (losing it locks the install out)."""
        try:
            self._connection().execute(
                "INSERT INTO device_secret (app_id, device_id, secret) VALUES (?, ?, ?) "
                "ON CONFLICT (app_id, device_id) DO UPDATE SET secret = excluded.secret",
                (*self._key, secret),
            )
        except (sqlite3.Error, JournalError):
            log.warning("cuepoint: could not keep the device secret in %s", self.path, exc_info=True)
            return False
        return True

    def count(self) -> int:
        """Rows stored for this app and device (committed writes only)."""
        row = (
            self._connection()
            .execute("SELECT COUNT(*) FROM outbox WHERE app_id = ? AND device_id = ?", self._key)
            .fetchone()
        )
        return int(row[0])

    def close(self) -> None:
        """Commit what is buffered and close the file. Idempotent."""
        if self._conn is None:
            return
        self.commit()
        self._conn.close()
        self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"the outbox {self.path!r} is closed")
        return self._conn
