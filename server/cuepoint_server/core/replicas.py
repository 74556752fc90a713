"""Who is in the cluster: the replicas registry (storage's `replicas` table) read and judged.

Each replica rewrites its own row on every cluster sweep (core/cluster.py), so `last_seen` is a heartbeat.
A replica is alive while its row was written within `MISSED_SWEEPS` sweeps: one late sweep (a slow
database, a long pause of its event loop) is not a death, and a SIGKILLed replica, which never says so,
counts as gone after at most that long. Work a dead replica owned (its streams' engagements, timers) is
someone else's to recover; a replica that stopped cleanly deleted its row, so it reads as gone at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..storage import ReplicaRecord

__all__ = ["MISSED_SWEEPS", "SWEEP_EVERY", "ReplicaStatus", "replica_alive", "replica_statuses", "versions_differ"]

# Seconds between two sweeps of one replica (re-read switches, write the heartbeat).
SWEEP_EVERY = 5.0
# Sweeps a replica may miss before the others count it as gone.
MISSED_SWEEPS = 3


def replica_alive(rec: ReplicaRecord | None, now: float, *, sweep_every: float = SWEEP_EVERY) -> bool:
    """Whether `rec` reported itself within the last MISSED_SWEEPS sweeps (None, never registered: no)."""
    return rec is not None and now - rec.last_seen <= sweep_every * MISSED_SWEEPS


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
    records: Iterable[ReplicaRecord], now: float, this_replica: str, *, sweep_every: float = SWEEP_EVERY
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
            alive=r.replica_id == this_replica or replica_alive(r, now, sweep_every=sweep_every),
            this=r.replica_id == this_replica,
        )
        for r in records
    ]


def versions_differ(statuses: Iterable[ReplicaStatus]) -> bool:
    """Live replicas serve different scenario sets (a reload that reached only some, or different folders)."""
    return len({s.scenarios_version for s in statuses if s.alive}) > 1
