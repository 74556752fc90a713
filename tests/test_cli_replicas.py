"""`cuepoint replicas` judges who is alive by the --replica-ttl the replicas run with, not only the default."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cuepoint_server.storage import ReplicaRecord, SqliteStore


def _states(db: Path, *extra: str) -> tuple[int, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "replicas", "--db", str(db), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, {row["replica_id"]: row["state"] for row in rows}


async def test_replicas_uses_the_ttl_it_is_given(tmp_path: Path) -> None:
    db = tmp_path / "cuepoint.db"
    now = time.time()
    async with await SqliteStore.open(str(db)) as store:
        # Replicas run with --replica-ttl 60: one heard from 30 s ago is alive, one 90 s ago is gone.
        for replica_id, ago in (("r-recent", 30.0), ("r-old", 90.0)):
            await store.save_replica(ReplicaRecord(replica_id, now - 200, now - ago, "h:1", "h/1", "abc", False))
    code, states = _states(db)
    assert code == 0 and states == {"r-recent": "gone", "r-old": "gone"}  # the default ttl, 15 s
    code, states = _states(db, "--replica-ttl", "60")
    assert code == 0 and states == {"r-recent": "serving", "r-old": "gone"}
    code, _ = _states(db, "--replica-ttl", "0")
    assert code == 2
