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

Baseline, same run: the bare echo server (``echo_server.py``) holding the same N idle streams, just
before each Cuepoint run (``--rounds`` interleaved echo/Cuepoint pairs; min and median of the ratios).
Target (issue 13): Cuepoint's KB per idle device at most 1.1x the echo's of the same round, median.

``--grpc-experiments ph2_server`` runs both servers with ``GRPC_EXPERIMENTS`` set (grpc's newer HTTP/2
server, fewer bytes per stream); reported as an option beside the default, never instead of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

TARGET_RATIO = 1.1  # issue 13: within 1.1x of the echo of the same run

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


@contextmanager
def grpc_experiments(value: str) -> Iterator[None]:
    """``GRPC_EXPERIMENTS`` for the servers spawned inside (a child takes its environment at spawn)."""
    before = os.environ.get("GRPC_EXPERIMENTS")
    if value:
        os.environ["GRPC_EXPERIMENTS"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GRPC_EXPERIMENTS", None)
        else:
            os.environ["GRPC_EXPERIMENTS"] = before


async def measure(
    args: argparse.Namespace, tmp: Path, folder: Path, *, label: str, experiments: str, traced: bool = False
) -> tuple[MemoryResult, MemoryResult]:
    """One echo run, then one Cuepoint run, with the same N and ``GRPC_EXPERIMENTS``."""
    suffix = f" [{experiments}]" if experiments else ""
    out: list[MemoryResult] = []
    for name in ("bare echo", "Cuepoint"):
        heap = tmp / f"{name.split()[-1].lower()}-{time.monotonic_ns()}-heap.json" if traced else None
        how = " under tracemalloc" if traced else ""
        note(f"memory {label}: {name}{suffix}{how}, {args.streams:,} idle streams ...")
        with grpc_experiments(experiments):
            if name == "bare echo":
                server = await echo_server(log_dir=tmp, traced=heap).start()
            else:
                db = tmp / f"memory-{time.monotonic_ns()}.db"
                server = await cuepoint_server(folder, db, log_dir=tmp, traced=heap).start()
        try:
            out.append(
                await hold_idle(
                    server,
                    ECHO_METHOD if name == "bare echo" else CUEPOINT_METHOD,
                    label=name + suffix,
                    streams=args.streams,
                    streams_per_channel=args.streams_per_channel,
                    traced=heap,
                )
            )
        finally:
            await server.stop()
    return out[0], out[1]


@dataclass
class Series:
    """The rounds of one configuration (default, or a ``GRPC_EXPERIMENTS`` option)."""

    name: str
    pairs: list[tuple[MemoryResult, MemoryResult]]

    def ratios(self, marginal: bool = False) -> list[float]:
        if marginal:
            return [c.marginal_kb / e.marginal_kb for e, c in self.pairs]
        return [c.per_device_kb / e.per_device_kb for e, c in self.pairs]

    def median_pair(self) -> tuple[MemoryResult, MemoryResult]:
        """The round whose per-device ratio is the median (the lower middle one for an even count)."""
        ordered = sorted(self.pairs, key=lambda p: p[1].per_device_kb / p[0].per_device_kb)
        return ordered[(len(ordered) - 1) // 2]


def _ratio_text(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"


async def run(args: argparse.Namespace) -> None:
    series: list[Series] = []
    traced: list[MemoryResult] = []
    configs = [("default", "")] + ([(args.grpc_experiments, args.grpc_experiments)] if args.grpc_experiments else [])
    with temp_dir("memory") as tmp_text:
        tmp = Path(tmp_text)
        folder = tmp / "scenarios"
        folder.mkdir()
        (folder / "help.yaml").write_text(textwrap.dedent(SCENARIO))
        for name, _ in configs:
            series.append(Series(name, []))
        # Rounds interleave the configurations too, so a change in the machine's load hits each alike.
        for round_no in range(1, args.rounds + 1):
            for entry, (_, experiments) in zip(series, configs, strict=True):
                entry.pairs.append(
                    await measure(args, tmp, folder, label=f"round {round_no}/{args.rounds}", experiments=experiments)
                )
        if args.tracemalloc:
            # Separate runs: tracemalloc's own bookkeeping inflates RSS, so these only explain it.
            traced.extend(await measure(args, tmp, folder, label="traced", experiments="", traced=True))
    default = series[0]
    echo_r, cue_r = default.median_pair()
    heap_sections: list[tuple[str, list[str], list[list[str]]]] = []
    for plain, t in zip((echo_r, cue_r), traced, strict=False):
        if t.heap is None:
            continue
        added = t.streams - t.first
        heap_kb = t.heap["traced_diff"] / 1024 / added
        c_heap = ""
        if "malloc_in_use_diff" in t.heap:
            c_heap += f"; glibc malloc in use {t.heap['malloc_in_use_diff'] / 1024 / added:.1f} KB"
        if "sqlite_in_use_diff" in t.heap:
            c_heap += f"; SQLite's allocator {t.heap['sqlite_in_use_diff'] / 1024 / added:.2f} KB"
        heap_sections.append(
            (
                f"{t.label}: Python heap growth per idle device (tracemalloc, 1% -> N): {heap_kb:.1f} KB of "
                f"the {plain.per_device_kb:.1f} KB RSS per device; "
                f"{t.heap['blocks_diff'] / added:.0f} blocks per device{c_heap}. By allocating line:",
                ["allocated at", "bytes/device", "blocks/device"],
                [
                    [e["where"], f"{e['size_diff'] / added:,.0f}", f"{e['count_diff'] / added:.1f}"]
                    for e in t.heap["by_line"][: args.top]
                ],
            )
        )
    target = f"<= {TARGET_RATIO:g}x echo"
    metrics: list[Metric] = []
    verdicts: list[str] = []
    for entry in series:
        tag = "" if entry.name == "default" else f" [{entry.name}]"
        e, c = entry.median_pair()
        ratio = statistics.median(entry.ratios())
        met = ratio <= TARGET_RATIO
        metrics.append(
            Metric(
                f"memory per idle device, {args.streams:,} streams{tag}",
                c.per_device_kb,
                "KB",
                baseline=e.per_device_kb,
                target=target,
                met=met,
                ratio=ratio,
            )
        )
        metrics.append(
            Metric(
                f"memory per idle device, marginal N/2..N{tag}",
                c.marginal_kb,
                "KB",
                baseline=e.marginal_kb,
                ratio=statistics.median(entry.ratios(marginal=True)),
            )
        )
        verdicts.append(
            f"{entry.name}: {c.per_device_kb:.1f} KB per idle device (echo {e.per_device_kb:.1f} KB), ratio "
            f"{_ratio_text(entry.ratios())} over {len(entry.pairs)} round(s); marginal N/2..N "
            f"{_ratio_text(entry.ratios(marginal=True))}; target {target}: {'MET' if met else 'NOT MET'}"
        )
    summary = f"memory at {args.streams:,} streams, " + "\n  ".join(verdicts)
    rows = [[f"{i}", *r.row()] for entry in series for i, pair in enumerate(entry.pairs, 1) for r in pair]
    report(
        "bench_memory",
        as_json=args.json,
        sections=[
            (
                f"server RSS with N idle device streams (raw stubs, hello only, {args.streams_per_channel} "
                "streams per connection); KB = 1024 bytes; echo and Cuepoint alternate, round by round",
                ["round", *HEADERS],
                rows,
            ),
            *heap_sections,
        ],
        metrics=metrics,
        summary=summary,
        details={
            "runs": [
                {"config": entry.name, "round": i}
                | {k: v for k, v in vars(r).items() if k != "heap"}
                | {"per_device_kb": r.per_device_kb, "marginal_kb": r.marginal_kb}
                for entry in series
                for i, pair in enumerate(entry.pairs, 1)
                for r in pair
            ],
            "ratios": {entry.name: entry.ratios() for entry in series},
            "marginal_ratios": {entry.name: entry.ratios(marginal=True) for entry in series},
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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved echo/Cuepoint rounds (default 3)")
    parser.add_argument(
        "--grpc-experiments",
        default="",
        metavar="NAMES",
        help="also measure both servers with GRPC_EXPERIMENTS=NAMES (e.g. ph2_server), as an option",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams = min(args.streams, 2000)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
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
