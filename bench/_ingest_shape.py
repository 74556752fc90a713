"""Core.ingest in process with exactly the load of bench_ingest.py, so its per-signal figure compares.

Not a benchmark itself: bench_eval.py prints it beside its scenario-count tables. Same batch shapes and
bytes (``_common.encoder``: rows or columns, 100 signals of ``screen_view`` with two properties), the
same listening scenario (``bench_ingest.SCENARIO``), 50 devices with 4 batches in flight each, a file
SQLite store like ``cuepoint serve``'s, and each message decoded and converted as the device servicer
does (``DeviceMessage.FromString`` + ``convert.batch_from_*``). What it leaves out is gRPC and the
rate limiter, so the gap between this figure and bench_ingest.py's "server us/sig" is what the network
side costs. Reported in CPU microseconds per signal (this process, all threads: the event loop and the
SQLite thread), the unit bench_ingest.py uses for the server process.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from _common import encoder
from bench_ingest import SCENARIO, write_scenarios

from cuepoint.v1 import device_pb2
from cuepoint_server.api import convert
from cuepoint_server.clock import SystemClock
from cuepoint_server.core.model import Hello
from cuepoint_server.core.service import Core
from cuepoint_server.engine.engine import Engine
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.storage import SqliteStore

DEVICES = 50
IN_FLIGHT = 4


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def ingest_like_bench_ingest(tmp: Path, shape: str, batch: int, signals: int) -> dict[str, Any]:
    """CPU and wall microseconds per signal of decode + convert + Core.ingest + commit + ack."""
    scenarios = ScenarioSet.load(str(write_scenarios(tmp / f"shape-{shape}-scenarios", SCENARIO)))
    store = await SqliteStore.open(str(tmp / f"shape-{shape}-{batch}.db"))
    core = Core(store, Engine(scenarios), SystemClock())
    from_message = device_pb2.DeviceMessage.FromString
    to_batch = convert.batch_from_columns if shape == "columns" else convert.batch_from_proto
    try:
        sessions = [
            await core.open_session(
                Hello(
                    app_id="bench",
                    device_id=f"shape-{i:05d}",
                    context={"app.version": "4.2.0", "device.os": "iOS", "device.os_version": "17.4"},
                    consent="full",
                )
            )
            for i in range(DEVICES)
        ]
        batches = encoder(shape, batch)
        per_round = DEVICES * IN_FLIGHT
        rounds = max(1, signals // (batch * per_round))
        # Encoded up front: the load generator's cost is not the server's.
        payloads = [
            [batches.encode(r * per_round + k, (r * per_round + k) * batch) for k in range(per_round)]
            for r in range(rounds)
        ]
        cpu0, wall0 = _cpu(), time.perf_counter()
        for payload in payloads:
            for k, raw in enumerate(payload):
                message = from_message(raw)
                incoming = to_batch(getattr(message, "signal_columns" if shape == "columns" else "signals"))
                core.ingest(sessions[k % DEVICES], incoming)
            for session in sessions:
                await core.settle(session)  # committed and acked (core/group_commit.py)
        cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
        total = rounds * per_round * batch
        acked = 0
        for session in sessions:
            while not session.outbox.empty():
                acked += len(getattr(session.outbox.get_nowait(), "signal_ids", ()))
        if acked != total:
            raise RuntimeError(f"acked {acked} of {total} signals")
        return {
            "shape": shape,
            "batch": batch,
            "signals": total,
            "cpu_us_per_signal": 1e6 * cpu / total,
            "wall_us_per_signal": 1e6 * wall / total,
        }
    finally:
        await core.drain()
        await store.close()
