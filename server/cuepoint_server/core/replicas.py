"""Who is in the cluster: the replicas registry (storage's `replicas` table) read and judged.

The registry row is the replica's lease: the one notion of "alive" every replica uses (timer claims,
adoption of engagements and slots, live now, `cuepoint replicas`). Each replica rewrites its row every
third of the ttl (``--replica-ttl``, default REPLICA_TTL; core/cluster.py), so `last_seen` is a heartbeat,
and it is alive while its row was written within the ttl: two late heartbeats (a slow database, a long
pause of its event loop) are not a death, and a SIGKILLed replica, which never says so, counts as gone
after at most the ttl. Work a dead replica owned (its streams' engagements, slots, timers) is then someone
else's to recover; a replica that stopped cleanly deleted its row, so it reads as gone at once. Replicas
of one deployment run with the same ttl (each judges the others by its own).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..storage import ReplicaRecord

__all__ = [
    "BEATS",
    "REPLICA_TTL",
    "SWEEP_EVERY",
    "ReplicaStatus",
    "replica_alive",
    "replica_statuses",
    "versions_differ",
]

# Seconds between two sweeps of one replica (re-read switches, adopt what gone replicas owned).
SWEEP_EVERY = 5.0
# Seconds a replica stays alive after its last heartbeat (--replica-ttl's default).
REPLICA_TTL = 15.0
# Heartbeats per ttl: a replica may miss all but one before the others count it as gone.
BEATS = 3


def replica_alive(rec: ReplicaRecord | None, now: float, *, ttl: float = REPLICA_TTL) -> bool:
    """Whether `rec` reported itself within the last `ttl` seconds (None, never registered: no)."""
    return rec is not None and now - rec.last_seen <= ttl


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the operations views show it (AdminService, the console, `cuepoint cluster`)."""

    replica_id: str
    address: str
    host: str
    started_at: float
    last_seen: float
    scenarios_version: str
    draining: bool
    alive: bool
    this: bool  # the replica answering


def replica_statuses(
    records: Iterable[ReplicaRecord], now: float, this_replica: str, *, ttl: float = REPLICA_TTL
) -> list[ReplicaStatus]:
    """The registry as seen from `this_replica` at `now`, oldest first; the answering replica is alive."""
    return [
        ReplicaStatus(
            replica_id=r.replica_id,
            address=r.address,
            host=r.host,
            started_at=r.started_at,
            last_seen=r.last_seen,
            scenarios_version=r.scenarios_version,
            draining=r.draining,
            alive=r.replica_id == this_replica or replica_alive(r, now, ttl=ttl),
            this=r.replica_id == this_replica,
        )
        for r in records
    ]


def versions_differ(statuses: Iterable[ReplicaStatus]) -> bool:
    """Live replicas serve different scenario sets (a reload that reached only some, or different folders)."""
    return len({s.scenarios_version for s in statuses if s.alive}) > 1
