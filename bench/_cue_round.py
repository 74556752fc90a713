"""The server's CPU per cue round without gRPC: trigger -> evaluate -> commit -> cue + ack -> decline -> commit.

    .venv/bin/python bench/_cue_round.py [--rounds 3000] [--profile] [--top 30]

bench_latency.py prints it beside the network runs (it is what bounds cues/s on one core: at 1,000 cues/s
a round may cost at most 1 ms of the server's one Python thread, and far less for a low p99). In process,
the same work as the latency benchmark's server side: the help_me scenario, a file SQLite store, the
server's info-level JSON logging (to /dev/null), its metrics observers; each trigger decoded from the
same bytes (``DeviceMessage.FromString`` + ``convert.batch_from_proto``), each ack and cue serialized as
the stream writer does; ``--concurrent`` devices per tick, so the store's group commit sees what it
sees at ~1,000 cues/s. Left out: gRPC reads and writes and the rate limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from _common import BatchEncoder

from cuepoint.v1 import device_pb2
from cuepoint_server.api import convert
from cuepoint_server.api.device import _to_proto
from cuepoint_server.clock import SystemClock
from cuepoint_server.core.model import CueOffer, Hello
from cuepoint_server.core.service import Core
from cuepoint_server.engine.engine import Engine
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.logs import configure_logging
from cuepoint_server.metrics import Metrics
from cuepoint_server.storage import SqliteStore

# The latency benchmark's scenario too (bench_latency.py imports it): both measure one cue round.
SCENARIO = """\
id: bench-help
name: "Bench: the user asks for help"
trigger:
  event: help_me
cue:
  message: "Need a hand?"
  channel: chat
  ttl: 2m
cooldown: 0s
after_decline: 0s
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def cue_rounds(tmp: Path, rounds: int, devices: int = 200, concurrent: int = 8) -> dict[str, Any]:
    """CPU and wall milliseconds per cue round (process CPU: the loop and the SQLite thread)."""
    folder, sink_file = _prepare(tmp)
    with sink_file as sink:
        # As `cuepoint serve` configures it: loggers cached on first use (so the sink outlives every run).
        configure_logging(os.environ.get("CUE_ROUND_LOG", "info"), json=True, file=sink, cache=True)
        store = await SqliteStore.open(str(tmp / "cue-round.db"), decider=True)  # as `cuepoint serve` opens it
        core = Core(store, Engine(ScenarioSet.load(str(folder))), SystemClock())
        metrics = Metrics(core)
        try:
            sessions = [
                await core.open_session(
                    Hello(
                        app_id="bench",
                        device_id=f"round-{i:05d}",
                        context={"app.version": "4.2.0", "device.os": "iOS", "user.tier": "free"},
                        consent="full",
                    )
                )
                for i in range(devices)
            ]
            for session in sessions:
                while not session.outbox.empty():
                    session.outbox.get_nowait()
            trigger = BatchEncoder(1, event="help_me", props={"screen": "sync"})
            from_message = device_pb2.DeviceMessage.FromString
            done = 0
            cues = 0
            committed = store.stats.batches
            cpu0, wall0, loop0 = _cpu(), time.perf_counter(), time.thread_time()
            while done < rounds:
                tick = [sessions[(done + k) % devices] for k in range(concurrent)]
                for k, session in enumerate(tick):
                    raw = trigger.encode(done + k, done + k)
                    core.ingest(session, convert.batch_from_proto(from_message(raw).signals))
                await _settle(core, tick)
                answers = []
                for session in tick:
                    while not session.outbox.empty():
                        item = session.outbox.get_nowait()
                        _to_proto(item).SerializeToString()
                        if isinstance(item, CueOffer):
                            answers.append((session, item.cue_id))
                cues += len(answers)
                for session, cue_id in answers:
                    await core.respond(session, cue_id, "declined")
                await _settle(core, tick)
                done += concurrent
            cpu, wall, loop_cpu = _cpu() - cpu0, time.perf_counter() - wall0, time.thread_time() - loop0
            committed = store.stats.batches - committed
            if cues != done:
                raise RuntimeError(f"{cues} cues for {done} triggers: the scenario did not fire every round")
            return {
                "rounds": done,
                "cpu_ms_per_round": 1e3 * cpu / done,
                # The event loop's thread alone: what one core must fit (SQLite's thread runs beside it).
                "loop_cpu_ms_per_round": 1e3 * loop_cpu / done,
                "wall_ms_per_round": 1e3 * wall / done,
                # Two per round unmerged (the trigger's commit with its cue, the decline's); the store's writer
                # merges what is queued together, so more devices per tick commit in fewer.
                "transactions_per_round": committed / done,
                "devices": devices,
                "concurrent": concurrent,
            }
        finally:
            await metrics.close()
            await core.drain()
            await store.close()
            configure_logging("info", json=True)


# Where the server's log lines go (written and thrown away, as a cost): one sink for the process's life.
_SINK: TextIO = open(os.devnull, "w")


def _prepare(tmp: Path) -> tuple[Path, contextlib.nullcontext[TextIO]]:
    """The scenarios folder, and where the server's log lines go."""
    folder = tmp / "cue-round-scenarios"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "help.yaml").write_text(SCENARIO)
    return folder, contextlib.nullcontext(_SINK)  # not closed: cached loggers keep writing to it


async def _settle(core: Any, sessions: list[Any]) -> None:
    """Until each session's batches are committed and acked, and its other writes are done."""
    for session in sessions:
        await core.settle(session)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="cProfile the rounds (times inflated; shares count)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cuepoint-bench-cue-round-") as tmp:
        asyncio.run(cue_rounds(Path(tmp), 200))  # warm-up: imports, first-use caches
        # CPU time of this thread, not wall time: waiting for the GIL (SQLite's thread) is not work.
        profiler = cProfile.Profile(time.thread_time) if args.profile else None
        if profiler is not None:
            profiler.enable()
        result = asyncio.run(cue_rounds(Path(tmp) / "run", args.rounds, concurrent=args.concurrent))
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
    print(
        f"cue round in process: {result['cpu_ms_per_round']:.3f} ms CPU ({result['loop_cpu_ms_per_round']:.3f} on the "
        f"event loop's thread), {result['wall_ms_per_round']:.3f} ms wall "
        f"per round, {result['transactions_per_round']:.2f} write transactions per round "
        f"({result['rounds']} rounds, {result['concurrent']} devices per tick)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
