"""Memory per idle connected device: server RSS before and after N idle device streams.

    .venv/bin/python bench/bench_memory.py [--streams 10000] [--streams-per-channel 100] [--json]

The server (``cuepoint serve``, temp SQLite file, tiny scenarios folder) runs in a subprocess; this
process opens N device streams with raw generated stubs, each sending only its Hello and reading the
Welcome, then leaves them idle. The server's VmRSS (``/proc/<pid>/status``) is read after start-up
(with a first 1% of the devices connected, so one-time lazy initialisation is not charged to devices),
at half of N and at N, each time once the numbers have settled. Reported: (RSS(N) - RSS(first)) per
added device, and the marginal slope between N/2 and N.

Streams share connections (``--streams-per-channel``, default 100), so per-connection costs (a TCP
socket and an HTTP/2 transport per phone in production) are spread out; ``--streams-per-channel 1``
measures them too (needs ~N open files, raised with setrlimit in both processes).

Baseline, same run: the bare echo server (``echo_server.py``) holding the same N idle streams.
Target: under 20 KB per idle device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from _common import (
    CLIENT_CPU,
    CUEPOINT_METHOD,
    ECHO_METHOD,
    Metric,
    ServerProcess,
    check_quiet,
    close_channels,
    cuepoint_server,
    echo_server,
    note,
    open_raw_streams,
    pin_self,
    raise_nofile,
    report,
    temp_dir,
)

TARGET_KB = 20.0

SCENARIO = """\
id: bench-help
trigger:
  event: help_me
cue:
  message: "Need a hand?"
  channel: chat
cooldown: 0s
"""


@dataclass
class MemoryResult:
    label: str
    streams: int
    rss_start_kb: int
    rss_first_kb: int
    rss_half_kb: int
    rss_full_kb: int
    first: int
    half: int
    connect_seconds: float
    heap: dict[str, Any] | None = None  # tracemalloc growth from 1% to N (--tracemalloc runs only)

    @property
    def per_device_kb(self) -> float:
        return (self.rss_full_kb - self.rss_first_kb) / (self.streams - self.first)

    @property
    def marginal_kb(self) -> float:
        return (self.rss_full_kb - self.rss_half_kb) / (self.streams - self.half)

    def row(self) -> list[str]:
        return [
            self.label,
            f"{self.streams:,}",
            f"{self.rss_start_kb / 1024:.1f}",
            f"{self.rss_first_kb / 1024:.1f}",
            f"{self.rss_half_kb / 1024:.1f}",
            f"{self.rss_full_kb / 1024:.1f}",
            f"{self.per_device_kb:.1f}",
            f"{self.marginal_kb:.1f}",
            f"{self.connect_seconds:.1f}",
        ]


HEADERS = [
    "server", "streams", "RSS start MiB", "RSS 1% MiB", "RSS N/2 MiB", "RSS N MiB", "KB/device",
    "KB/device N/2..N", "connect s",
]  # fmt: skip


async def settled_rss(server: ServerProcess, *, quiet: float = 1.0, limit: float = 20.0) -> int:
    """VmRSS once it has stopped moving (changed < 0.5% over ``quiet`` seconds), bounded by ``limit``."""
    deadline = time.monotonic() + limit
    last = server.rss_kb()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = server.rss_kb()
        if abs(now - last) <= 0.005 * last:
            return now
        last = now
    return last


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


async def heap_growth(server: ServerProcess, out: Path, limit: float = 120.0) -> dict[str, Any]:
    """Ask a traced server (SIGUSR1) for its heap growth since its first snapshot; wait for the file."""
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        doc = _read_json(out)
        if doc is not None:
            return doc
    raise RuntimeError(f"no tracemalloc report from {server.name} within {limit:.0f} s")


async def hold_idle(
    server: ServerProcess,
    method: str,
    *,
    label: str,
    streams: int,
    streams_per_channel: int,
    traced: Path | None = None,
) -> MemoryResult:
    first = max(1, streams // 100)
    half = streams // 2
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = []
    rss_start = await settled_rss(server)
    started = time.perf_counter()
    try:
        rss_points: list[int] = []
        done = 0
        for upto in (first, half, streams):
            ids = [f"idle-{i:06d}" for i in range(done, upto)]
            chans, opened = await open_raw_streams(
                server.address, method, ids, streams_per_channel=streams_per_channel, concurrency=500
            )
            channels += chans
            calls += opened
            done = upto
            note(f"  {label}: {done:,} idle streams open, RSS {server.rss_kb() / 1024:.1f} MiB")
            rss_points.append(await settled_rss(server))
            if traced is not None and upto == first:
                os.kill(server.pid, signal.SIGUSR1)  # the traced server's reference snapshot
                await asyncio.sleep(2.0)
        connect_seconds = time.perf_counter() - started
        heap = await heap_growth(server, traced) if traced is not None else None
        # Still all there? An idle stream the server dropped would read EOF / an error here.
        alive = sum(1 for call in calls if not call.done())
        if alive != streams:
            raise RuntimeError(f"only {alive} of {streams} streams still open")
    finally:
        await close_channels(channels, calls)
    rss_first, rss_half, rss_full = rss_points
    result = MemoryResult(label, streams, rss_start, rss_first, rss_half, rss_full, first, half, connect_seconds)
    result.heap = heap
    return result


async def run(args: argparse.Namespace) -> None:
    results: list[MemoryResult] = []
    with temp_dir("memory") as tmp_text:
        tmp = Path(tmp_text)
        note(f"memory: bare echo, {args.streams:,} idle streams ...")
        echo = await echo_server(log_dir=tmp).start()
        try:
            results.append(
                await hold_idle(
                    echo,
                    ECHO_METHOD,
                    label="bare echo",
                    streams=args.streams,
                    streams_per_channel=args.streams_per_channel,
                )
            )
        finally:
            await echo.stop()
        note(f"memory: Cuepoint, {args.streams:,} idle device streams ...")
        folder = tmp / "scenarios"
        folder.mkdir()
        (folder / "help.yaml").write_text(textwrap.dedent(SCENARIO))
        server = await cuepoint_server(folder, tmp / "memory.db", log_dir=tmp).start()
        try:
            results.append(
                await hold_idle(
                    server,
                    CUEPOINT_METHOD,
                    label="Cuepoint",
                    streams=args.streams,
                    streams_per_channel=args.streams_per_channel,
                )
            )
        finally:
            await server.stop()
        traced: list[MemoryResult] = []
        if args.tracemalloc:
            # Separate runs: tracemalloc's own bookkeeping inflates RSS, so these only explain it.
            note(f"memory: bare echo under tracemalloc, {args.streams:,} idle streams ...")
            out = tmp / "echo-heap.json"
            echo = await echo_server(log_dir=tmp, traced=out).start()
            try:
                traced.append(
                    await hold_idle(echo, ECHO_METHOD, label="bare echo", streams=args.streams,
                                    streams_per_channel=args.streams_per_channel, traced=out)
                )  # fmt: skip
            finally:
                await echo.stop()
            note(f"memory: Cuepoint under tracemalloc, {args.streams:,} idle device streams ...")
            out = tmp / "cuepoint-heap.json"
            server = await cuepoint_server(folder, tmp / "memory-traced.db", log_dir=tmp, traced=out).start()
            try:
                traced.append(
                    await hold_idle(server, CUEPOINT_METHOD, label="Cuepoint", streams=args.streams,
                                    streams_per_channel=args.streams_per_channel, traced=out)
                )  # fmt: skip
            finally:
                await server.stop()
    echo_r, cue_r = results
    heap_sections: list[tuple[str, list[str], list[list[str]]]] = []
    for plain, t in zip(results, traced, strict=False):
        if t.heap is None:
            continue
        added = t.streams - t.first
        heap_kb = t.heap["traced_diff"] / 1024 / added
        heap_sections.append(
            (
                f"{t.label}: Python heap growth per idle device (tracemalloc, 1% -> N): {heap_kb:.1f} KB of "
                f"the {plain.per_device_kb:.1f} KB RSS per device; "
                f"{t.heap['blocks_diff'] / added:.0f} blocks per device. By allocating line:",
                ["allocated at", "bytes/device", "blocks/device"],
                [
                    [e["where"], f"{e['size_diff'] / added:,.0f}", f"{e['count_diff'] / added:.1f}"]
                    for e in t.heap["by_line"][: args.top]
                ],
            )
        )
    met = cue_r.per_device_kb < TARGET_KB and cue_r.marginal_kb < TARGET_KB
    metrics = [
        Metric(
            f"memory per idle device, {args.streams:,} streams",
            cue_r.per_device_kb,
            "KB",
            baseline=echo_r.per_device_kb,
            target=f"< {TARGET_KB:g} KB",
            met=met,
        ),
        Metric("memory per idle device, marginal N/2..N", cue_r.marginal_kb, "KB", baseline=echo_r.marginal_kb),
    ]
    summary = (
        f"memory: {cue_r.per_device_kb:.1f} KB per idle device at {args.streams:,} streams "
        f"(marginal {cue_r.marginal_kb:.1f} KB; bare echo {echo_r.per_device_kb:.1f} KB); "
        f"target < {TARGET_KB:g} KB: {'MET' if met else 'NOT MET'}"
    )
    report(
        "bench_memory",
        as_json=args.json,
        sections=[
            (
                f"server RSS with N idle device streams (raw stubs, hello only, {args.streams_per_channel} "
                "streams per connection); KB = 1024 bytes",
                HEADERS,
                [r.row() for r in results],
            ),
            *heap_sections,
        ],
        metrics=metrics,
        summary=summary,
        details={
            "runs": [
                {k: v for k, v in vars(r).items() if k != "heap"}
                | {"per_device_kb": r.per_device_kb, "marginal_kb": r.marginal_kb}
                for r in results
            ],
            "streams_per_channel": args.streams_per_channel,
            "tracemalloc": [{"label": t.label, **(t.heap or {})} for t in traced],
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000, help="idle device streams (default 10000)")
    parser.add_argument(
        "--streams-per-channel", type=int, default=100, help="streams sharing one connection (default 100)"
    )
    parser.add_argument("--quick", action="store_true", help="2,000 streams")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="extra runs under tracemalloc: where the Python heap grows"
    )
    parser.add_argument("--top", type=int, default=20, help="lines shown per --tracemalloc table (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams = min(args.streams, 2000)
    if args.streams < 200:
        parser.error("--streams must be at least 200")
    # Raised here, before the servers start: they inherit the limit.
    raise_nofile(args.streams // max(1, args.streams_per_channel) * 4 + 4096)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_memory: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
