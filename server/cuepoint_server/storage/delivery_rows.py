"""The delivery outbox: traffic for a stream another replica holds, committed before the bus says so (issue 14).

A message for a stream on another replica (an associate's event for its home, a message for a stand-in, an
invitation for a device) is a row of ``delivery_outbox`` first; the bus then carries only "row N is ready
for recipient R". The replica holding R's stream claims R's rows, in id order, by deleting them (so exactly
one holder takes each), and sends them. A wake-up the bus lost is made good by the periodic sweep, which
claims whatever waits for the recipients its replica holds; a wake-up delivered twice finds nothing the
second time. Rows no one claims (the stream went away everywhere) are dropped after a while.

``engagement_id`` and ``device_id`` say whose data a row carries, so erasing a user deletes it.

Written with ``?`` placeholders; PostgresStore turns them into ``$n``.
"""

from __future__ import annotations

__all__ = [
    "CLAIM_DELIVERIES",
    "DELIVERY_INDEX",
    "DELIVERY_RECIPIENTS",
    "ENQUEUE_DELIVERY",
    "EXPIRE_DELIVERIES",
    "delivery_table",
    "user_deliveries",
]


def delivery_table(real: str, id_column: str, blob: str) -> str:
    """The table; ``id_column`` never reuses an id once its row is deleted (receivers remember ids)."""
    return f"""CREATE TABLE IF NOT EXISTS delivery_outbox (
        {id_column},
        recipient     TEXT NOT NULL,
        engagement_id TEXT NOT NULL DEFAULT '',
        device_id     TEXT NOT NULL DEFAULT '',
        body          {blob} NOT NULL,
        created_at    {real} NOT NULL
    )"""


DELIVERY_INDEX = "CREATE INDEX IF NOT EXISTS delivery_outbox_recipient ON delivery_outbox (recipient, id)"

ENQUEUE_DELIVERY = (
    "INSERT INTO delivery_outbox (recipient, engagement_id, device_id, body, created_at) "
    "VALUES (?, ?, ?, ?, ?) RETURNING id"
)


def CLAIM_DELIVERIES(lock: str) -> str:
    """Delete and return (id, body) of a recipient's oldest rows. Params: recipient, limit.

    ``lock``: PostgreSQL's "FOR UPDATE SKIP LOCKED" (SQLite's single writer needs none). RETURNING keeps
    no order: callers sort by id.
    """
    return (
        "DELETE FROM delivery_outbox WHERE id IN (SELECT id FROM delivery_outbox WHERE recipient = ? "
        f"ORDER BY id LIMIT ? {lock}) RETURNING id, body"
    )


DELIVERY_RECIPIENTS = "SELECT DISTINCT recipient FROM delivery_outbox"

EXPIRE_DELIVERIES = "DELETE FROM delivery_outbox WHERE created_at < ?"


def user_deliveries(engagements: str, sessions: str) -> str:
    """Which rows carry a user's data: about one of their engagements or for one of their devices."""
    devices = f"SELECT device_id FROM sessions WHERE session_id IN ({sessions})"
    return f"engagement_id IN ({engagements}) OR device_id IN ({devices})"
