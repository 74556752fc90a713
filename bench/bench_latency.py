"""Signal-to-cue latency at many concurrent device streams, beside the bare echo round trip.

    .venv/bin/python bench/bench_latency.py [--streams 1000] [--rate 0.25,0.5,1] [--seconds 5] [--json]

The server (``cuepoint serve``, temp SQLite file, default log level) runs in a subprocess; this process
opens ``--streams`` device streams with raw generated stubs (no SDK, so SDK batching/linger plays no
part: each trigger is sent as its own one-signal SignalBatch the moment it is made). The scenarios folder
holds one scenario, ``trigger: {event: help_me}`` with ``cooldown: 0s`` and ``after_decline: 0s`` (so a
declined cue may be offered again at once).

Every device, after a random start offset: sends ``help_me``, waits for the cue, answers it with a
decline (the server offers no new cue while one is pending, see ``Core._busy``), thinks (100 ms plus
an exponentially distributed time, ``1/--rate`` s in all on average), and repeats. Latency is measured in this process
from just before the trigger is written to when the cue is read off the stream; also shown: the
trigger's ack (sent after the signal is committed to SQLite). Offered load = streams x rate triggers/s;
the default runs 0.25, 0.5 and 1 trigger/s per device (250, 500, 1,000 cues/s at 1,000 streams), since
whether a latency target holds depends on the load as much as on the number of streams.

Baseline, same run and concurrency: the bare echo (``echo_server.py``) driven by the identical device
loop, where the "cue" is the ack of the one-signal batch (a pure round trip).
Target: p99 signal-to-cue under 10 ms at 1,000 streams.

``--prototype``: each Cuepoint run is followed by the same load against ``prototype_server.py``, a cue server
that does only what a cue round must (validate, dedupe, store the trigger and the cue in one commit, send
the cue with its ack, store the decline): how low p99 and the CPU per round can go in Python with gRPC and
SQLite on the server's one core, and so how much of Cuepoint's own work a target leaves room for.

``--prototype-work 0,160,320`` (us): after each Cuepoint run, the prototype once per value with that much CPU added
to its cue round on its event loop: the p99 the floor has with work of Cuepoint's size, so how much work per
round the target leaves. ``--split-work``: the same with the work in a core process behind a gRPC front
(``prototype_split.py``), the design that takes the work off the streams' loop.

Each Cuepoint server serves its metrics (``--metrics-port 0``): the write transactions its store committed
over the measured window, per cue round, are shown (2 if no two rounds shared a commit; fewer as the store's
writer merges the rounds queued together).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _common import (
    BENCH_LIMITS,
    CLIENT_CPU,
    CUEPOINT_METHOD,
    ECHO_METHOD,
    PERF_GROUPS,
    TRANSACTIONS_TOTAL,
    BatchEncoder,
    CpuMeter,
    Metric,
    PerfByObject,
    PySpy,
    ServerProcess,
    check_quiet,
    close_channels,
    cuepoint_server,
    decline_bytes,
    echo_server,
    find_perf,
    find_py_spy,
    note,
    open_raw_streams,
    percentile,
    pin_self,
    proc_cpu_seconds,
    raise_nofile,
    report,
    scrape_counters,
    set_server_loop,
    temp_dir,
)
from _cue_round import SCENARIO, cue_rounds
from prototype_server import PROTOTYPE_METHOD, prototype_server
from prototype_split import SPLIT_METHOD, split_server

TARGET_P99_MS = 10.0
# The write transactions the Cuepoint server's store committed (served with --metrics-port 0).
_TRANSACTIONS = {"transactions": TRANSACTIONS_TOTAL}


@dataclass
class LatencyResult:
    label: str
    streams: int
    rate: float
    seconds: float
    samples: list[float] = field(default_factory=list)  # trigger -> cue (or echo ack), seconds
    ack_samples: list[float] = field(default_factory=list)  # trigger -> its ack (Cuepoint only)
    timeouts: int = 0
    failures: int = 0
    server_cpu_pct: float = 0.0
    server_loop_pct: float = 0.0  # the server's event-loop thread alone (CpuMeter.loop)
    client_cpu_pct: float = 0.0
    profile: PySpy | None = None
    perf: PerfByObject | None = None  # --perf: the server's CPU by shared object over the measured window
    # The server's child processes (prototype_split.py's core), % of one core (None: it has none).
    child_cpu_pct: float | None = None
    # Cuepoint only: the write transactions its store committed over the measured window (None: not served).
    transactions: float | None = None

    def stats(self, samples: list[float] | None = None) -> dict[str, float]:
        values = sorted(self.samples if samples is None else samples)
        return {
            "count": len(values),
            "p50_ms": 1000 * percentile(values, 50),
            "p90_ms": 1000 * percentile(values, 90),
            "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * values[-1] if values else float("nan"),
        }

    def ms_per_round(self, pct: float) -> float:
        """A CPU share over the measured window (% of one core) as ms per round done."""
        return 10 * pct / max(1e-9, len(self.samples) / self.seconds)

    def transactions_per_round(self) -> float | None:
        """Write transactions per round done in the measured window: two unmerged (the trigger's commit with its
        cue, the decline's), fewer when the store's writer merges rounds into one transaction."""
        if self.transactions is None or not self.samples:
            return None
        return self.transactions / len(self.samples)

    def row(self, what: str = "cue", ack: bool = False) -> list[str]:
        s = self.stats(self.ack_samples if ack else None)
        rate = s["count"] / self.seconds if self.seconds else 0.0
        return [
            f"{self.label} ({what})",
            str(self.streams),
            f"{self.rate:g}",
            f"{rate:,.0f}",
            str(int(s["count"])),
            f"{s['p50_ms']:.2f}",
            f"{s['p90_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"{s['max_ms']:.1f}",
            str(self.timeouts),
            f"{self.server_cpu_pct:.0f}%",
            f"{self.server_loop_pct:.0f}%",
            f"{self.client_cpu_pct:.0f}%",
        ]


HEADERS = [
    "run", "streams", "rate/dev", "done/s", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms",
    "timeouts", "server cpu", "server loop", "client cpu",
]  # fmt: skip


async def measure(
    server: ServerProcess,
    method: str,
    *,
    label: str,
    streams: int,
    rate: float,
    seconds: float,
    warmup: float,
    streams_per_channel: int,
    answer_kind: str,
    seed: int,
    spy: tuple[str, Path] | None = None,
    perf: tuple[str, Path] | None = None,
) -> LatencyResult:
    """Run the device loop on ``streams`` streams; ``answer_kind`` is what ends a round (cue or ack)."""
    rng = random.Random(seed)
    # Nobody answers a cue and asks for help again within 100 ms; the rest of the mean interval is
    # exponential (Poisson-like arrivals), so the mean round interval stays 1/rate.
    think = min(0.1, 0.5 / rate)
    encoder = BatchEncoder(1, event="help_me", props={"screen": "sync"})
    device_ids = [f"lat-{label[:4].strip().lower()}-{i:05d}" for i in range(streams)]
    note(f"  {label}: opening {streams} streams ...")
    # As the Python SDK does: a cue may carry the ack of the batch that fired it (one message, not two).
    channels, calls = await open_raw_streams(
        server.address, method, device_ids, streams_per_channel=streams_per_channel, accepts_cue_ack=True
    )
    # Let the server finish what the hellos started (session rows, restored memory) before the load.
    await asyncio.sleep(1.0)
    # The load generator's own pauses are not the server's latency: its 1,000 streams' objects (channels,
    # calls, tasks) move out of its collector's sight, or a full collection of them (measured: up to 2 s on a
    # busy machine, 5 per run) stalls every device loop at once, for the echo and Cuepoint alike.
    gc.collect()
    gc.freeze()
    result = LatencyResult(label, streams, rate, seconds)
    loop = asyncio.get_running_loop()
    window = {"start": float("inf"), "end": float("inf")}
    stopping = asyncio.Event()

    async def device(call: Any, device_rng: random.Random) -> None:
        waiting: dict[str, Any] = {"future": None}
        sent_at: dict[int, float] = {}

        async def read() -> None:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                now = time.perf_counter()
                kind = message.WhichOneof("kind")
                ack = message.ack if kind == "ack" else message.cue_ack if message.HasField("cue_ack") else None
                if ack is not None:
                    batch_no = int(ack.batch_id)
                    started = sent_at.pop(batch_no, None)
                    if started is not None and window["start"] <= started <= window["end"]:
                        result.ack_samples.append(now - started)
                if kind == answer_kind:
                    future = waiting["future"]
                    if future is not None and not future.done():
                        future.set_result((message, now))

        reader = asyncio.create_task(read())
        try:
            await asyncio.sleep(device_rng.uniform(0, 1 / rate))
            for round_no in range(1, 1_000_000):
                if stopping.is_set():
                    break
                future = loop.create_future()
                waiting["future"] = future
                started = time.perf_counter()
                if answer_kind == "cue":
                    sent_at[round_no] = started
                await call.write(encoder.encode(round_no, round_no))
                try:
                    message, received = await asyncio.wait_for(future, 5.0)
                except TimeoutError:
                    result.timeouts += 1
                    continue
                if window["start"] <= started <= window["end"]:
                    result.samples.append(received - started)
                if answer_kind == "cue":
                    await call.write(decline_bytes(message.cue.cue_id))
                else:
                    # The echo answers nothing to a cue response, but gets the same upstream traffic.
                    await call.write(decline_bytes(f"echo-{round_no}"))
                await asyncio.sleep(think + device_rng.expovariate(1 / (1 / rate - think)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result.failures += 1
            if result.failures == 1:
                note(f"  {label}: a device failed: {exc!r}")
        finally:
            reader.cancel()

    tasks = [asyncio.create_task(device(call, random.Random(rng.random()))) for call in calls]
    try:
        now = time.perf_counter()
        window["start"], window["end"] = now + warmup, now + warmup + seconds
        await asyncio.sleep(warmup)
        meter = CpuMeter(server.pid)
        children = _children(server.pid)
        children_before, children_since = sum(map(proc_cpu_seconds, children)), time.perf_counter()
        committed = await scrape_counters(server, _TRANSACTIONS)
        profiler = PySpy(spy[0], server.pid, seconds, spy[1]) if spy else None
        by_object = PerfByObject(perf[0], server.pid, seconds, perf[1]) if perf else None
        await asyncio.sleep(seconds)
        result.server_cpu_pct, result.client_cpu_pct = meter.read()
        result.server_loop_pct = meter.loop()
        if children:
            spent = sum(map(proc_cpu_seconds, children)) - children_before
            result.child_cpu_pct = 100 * spent / (time.perf_counter() - children_since)
        if committed is not None:
            after = await scrape_counters(server, _TRANSACTIONS)
            if after is not None:
                result.transactions = after["transactions"] - committed["transactions"]
        if profiler is not None:
            await profiler.wait()
            result.profile = profiler
        if by_object is not None:
            await by_object.wait()
            result.perf = by_object
        stopping.set()
        # Let rounds in progress finish (bounded), so late cues are counted, not dropped.
        await asyncio.wait(tasks, timeout=5.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_channels(channels, calls)
        gc.unfreeze()
    return result


def _children(pid: int) -> list[int]:
    """The processes ``pid``'s main thread started (prototype_split.py's core), still running."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


async def _run_on(server: ServerProcess, method: str, label: str, answer_kind: str, **load: Any) -> LatencyResult:
    """Start ``server``, run one load against it (``measure``), stop it; the errors it logged count as failures."""
    await server.start()
    try:
        result = await measure(server, method, label=label, answer_kind=answer_kind, **load)
        result.failures += server.errors_in_log()
        return result
    finally:
        await server.stop()


def keep_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_scenarios(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "help.yaml").write_text(textwrap.dedent(SCENARIO))
    return folder


async def run(args: argparse.Namespace) -> None:
    rates = [float(r) for r in str(args.rate).split(",") if r]
    py_spy = find_py_spy(args.py_spy or None) if args.py_spy is not False else None
    if args.py_spy is not False and not py_spy:
        note("py-spy not found; running without the profile")
    perf_exe = find_perf() if args.perf else None
    if args.perf and not perf_exe:
        note("perf not found; running without the CPU by shared object")
    results: list[LatencyResult] = []
    protos: list[LatencyResult] = []  # --prototype: one per Cuepoint run, right after it
    # --prototype-work, --split-work: per design and amount of work (us per round), one run per Cuepoint run.
    works = [("one process", float(w)) for w in str(args.prototype_work).split(",") if w]
    works += [("split", float(w)) for w in str(args.split_work).split(",") if w]
    swept: dict[tuple[str, float], list[LatencyResult]] = {key: [] for key in works}
    common = {
        "streams": args.streams,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "streams_per_channel": args.streams_per_channel,
    }
    with temp_dir("latency") as tmp_text:
        tmp = Path(tmp_text)
        # Interleaved rounds: each Cuepoint run right after the echo run at the same load.
        for round_no in range(1, args.rounds + 1):
            for i, rate in enumerate(rates):
                seed = 100 * round_no + i
                what = f"{args.streams} streams, {rate:g}/s per device"

                servers = ("echo", "cuepoint", "prototype")
                perf = {n: (perf_exe, tmp / f"perf-{n}-{round_no}-{i}.data") for n in servers} if perf_exe else {}

                runs = dict(rate=rate, seed=seed, **common)
                note(f"latency round {round_no}/{args.rounds}: bare echo, {what} ...")
                echo = echo_server(log_dir=tmp, loop=args.server_loop)
                results.append(await _run_on(echo, ECHO_METHOD, "bare echo", "ack", perf=perf.get("echo"), **runs))
                note(f"latency round {round_no}/{args.rounds}: Cuepoint, {what} ...")
                server = cuepoint_server(
                    write_scenarios(tmp / "scenarios"),
                    tmp / f"lat-{round_no}-{i}.db",
                    log_dir=tmp,
                    limits=BENCH_LIMITS,
                    extra=("--event-loop", args.server_loop, "--metrics-port", "0"),
                )
                spy = (py_spy, tmp / f"spy-{round_no}-{i}.txt") if py_spy and round_no == 1 else None
                results.append(
                    await _run_on(
                        server, CUEPOINT_METHOD, "Cuepoint", "cue", spy=spy, perf=perf.get("cuepoint"), **runs
                    )
                )
                if args.prototype:
                    note(f"latency round {round_no}/{args.rounds}: prototype, {what} ...")
                    proto = prototype_server(tmp)
                    protos.append(
                        await _run_on(proto, PROTOTYPE_METHOD, "prototype", "cue", perf=perf.get("prototype"), **runs)
                    )
                for design, work in works:
                    label = f"prototype, {design}, +{work:g} us"
                    note(f"latency round {round_no}/{args.rounds}: {label} per round, {what} ...")
                    if design == "split":
                        swept[design, work].append(
                            await _run_on(split_server(tmp, work_us=work), SPLIT_METHOD, label, "cue", **runs)
                        )
                    else:
                        proto = prototype_server(tmp, work_us=work)
                        swept[design, work].append(await _run_on(proto, PROTOTYPE_METHOD, label, "cue", **runs))
        # The same server work without gRPC, in this process: what bounds cues/s on the server's one core.
        in_process: dict[str, Any] = {}
        if args.in_process:
            note("latency: cue rounds in process (no gRPC) ...")
            await cue_rounds(tmp / "warm", 200)
            in_process = await cue_rounds(tmp / "cue-rounds", args.in_process)

    rows: list[list[str]] = []
    metrics: list[Metric] = []
    sections: list[tuple[str, list[str], list[list[str]]]] = []
    profiles: dict[str, Any] = {}
    for n, r in enumerate(results):
        if r.profile is None:
            continue
        if args.py_spy_raw:
            # The folded stacks themselves (flamegraph input), for reading callers beyond the tables.
            keep_text(Path(args.py_spy_raw) / f"latency-{n}-{r.streams}x{r.rate:g}.txt", r.profile.raw)
        total, top = r.profile.top(args.top)
        key = f"{r.label}, {r.streams} streams x {r.rate:g}/s"
        profiles[key] = {
            "samples": total,
            "self": top,
            "inclusive_cuepoint": r.profile.top_inclusive(args.top),
        }
        sections.append(
            (
                f"py-spy, server process during '{key}' ({total} samples): self time",
                ["function", "self", "inclusive"],
                [[f, f"{s:.1f}%", f"{i:.1f}%"] for f, s, i in top],
            )
        )
        sections.append(
            (
                f"py-spy, server process during '{key}': Cuepoint functions by inclusive time",
                ["function", "inclusive"],
                [[f, f"{i:.1f}%"] for f, i in profiles[key]["inclusive_cuepoint"]],
            )
        )
    pairs = list(zip(results[::2], results[1::2], strict=True))
    for n, (base, cue) in enumerate(pairs):
        rows.append(base.row("ack = round trip"))
        rows.append(cue.row("cue"))
        rows.append(cue.row("ack, after commit", ack=True))
        if protos:
            rows.append(protos[n].row("cue"))
    if perf_exe:
        sections.append(_perf_section([*results, *protos]))
    if works:
        sections.append(_sweep_section(swept, rates))
    parts = []
    for rate in rates:
        at_rate = [(b, c) for b, c in pairs if c.rate == rate]
        cue_p99 = [c.stats()["p99_ms"] for _, c in at_rate]
        cue_p50 = [c.stats()["p50_ms"] for _, c in at_rate]
        echo_p99 = [b.stats()["p99_ms"] for b, _ in at_rate]
        ratio = [c.stats()["p99_ms"] / b.stats()["p99_ms"] for b, c in at_rate]
        clean = all(c.timeouts == 0 and c.failures == 0 for _, c in at_rate)
        streams = at_rate[0][1].streams
        load = f"{streams} streams x {rate:g}/s"
        p99 = statistics.median(cue_p99)
        ok = p99 < TARGET_P99_MS and clean
        echo_p50 = statistics.median([b.stats()["p50_ms"] for b, _ in at_rate])
        metrics.append(Metric(f"signal-to-cue p50, {load}", statistics.median(cue_p50), "ms", baseline=echo_p50))
        metrics.append(
            Metric(
                f"signal-to-cue p99, {load} (median of {len(at_rate)})",
                p99,
                "ms",
                baseline=statistics.median(echo_p99),
                target=f"< {TARGET_P99_MS:g} ms",
                met=ok,
                ratio=statistics.median(ratio),
            )
        )
        cpu_ms = [c.ms_per_round(c.server_cpu_pct) for _, c in at_rate]
        echo_cpu_ms = [b.ms_per_round(b.server_cpu_pct) for b, _ in at_rate]
        loop_ms = [c.ms_per_round(c.server_loop_pct) for _, c in at_rate]
        echo_loop_ms = [b.ms_per_round(b.server_loop_pct) for b, _ in at_rate]
        metrics.append(
            Metric(
                f"server CPU per cue round, {load}",
                statistics.median(cpu_ms),
                "ms",
                baseline=statistics.median(echo_cpu_ms),
            )
        )
        metrics.append(
            Metric(
                f"server event-loop thread CPU per cue round, {load}",
                statistics.median(loop_ms),
                "ms",
                baseline=statistics.median(echo_loop_ms),
            )
        )
        per_round = [t for _, c in at_rate if (t := c.transactions_per_round()) is not None]
        if per_round:
            metrics.append(Metric(f"write transactions per cue round, {load}", statistics.median(per_round), ""))
        proto_part = ""
        at_rate_protos = [p for p in protos if p.rate == rate]
        if at_rate_protos:
            proto_p99 = [p.stats()["p99_ms"] for p in at_rate_protos]
            proto_cpu_ms = [p.ms_per_round(p.server_cpu_pct) for p in at_rate_protos]
            proto_loop_ms = [p.ms_per_round(p.server_loop_pct) for p in at_rate_protos]
            metrics.append(
                Metric(
                    f"prototype's signal-to-cue p99, {load} (median of {len(at_rate_protos)})",
                    statistics.median(proto_p99),
                    "ms",
                    baseline=statistics.median(echo_p99),
                    target=f"(< {TARGET_P99_MS:g} ms)",
                    met=statistics.median(proto_p99) < TARGET_P99_MS,
                )
            )
            metrics.append(
                Metric(
                    f"prototype's server CPU per cue round, {load}",
                    statistics.median(proto_cpu_ms),
                    "ms",
                    baseline=statistics.median(echo_cpu_ms),
                )
            )
            metrics.append(
                Metric(
                    f"prototype's event-loop thread CPU per cue round, {load}",
                    statistics.median(proto_loop_ms),
                    "ms",
                    baseline=statistics.median(echo_loop_ms),
                )
            )
            proto_part = (
                f"; prototype p99 {statistics.median(proto_p99):.2f} ms "
                f"(rounds {', '.join(f'{v:.1f}' for v in proto_p99)}), "
                f"{statistics.median(proto_cpu_ms):.2f} ms per round "
                f"({statistics.median(proto_loop_ms):.2f} on its loop's thread)"
            )
        parts.append(
            f"{streams * rate:,.0f} triggers/s ({load}): p50 {statistics.median(cue_p50):.2f} ms, p99 {p99:.2f} ms "
            f"(rounds {', '.join(f'{v:.1f}' for v in cue_p99)}) [echo p99 {statistics.median(echo_p99):.2f} ms; "
            f"ratio min {min(ratio):.1f}x median {statistics.median(ratio):.1f}x] "
            f"{'met' if ok else 'NOT MET'}; server CPU {statistics.median(cpu_ms):.2f} ms per round, "
            f"{statistics.median(loop_ms):.2f} on its loop's thread (echo {statistics.median(echo_cpu_ms):.2f}, "
            f"{statistics.median(echo_loop_ms):.2f})"
            + (f", {statistics.median(per_round):.2f} write transactions per round" if per_round else "")
            + proto_part
        )
    if in_process:
        metrics.append(
            Metric(
                "server CPU per cue round in process (no gRPC), event-loop thread",
                in_process["loop_cpu_ms_per_round"],
                "ms",
            )
        )
        sections.append(
            (
                f"cue rounds in process (bench/_cue_round.py: trigger decoded, evaluated, committed, cue and ack "
                f"serialized, decline committed; no gRPC; {in_process['rounds']:,} rounds, "
                f"{in_process['concurrent']} devices per tick)",
                [
                    "CPU ms/round, all threads",
                    "CPU ms/round, event-loop thread",
                    "wall ms/round",
                    "write transactions/round",
                ],
                [
                    [
                        f"{in_process['cpu_ms_per_round']:.3f}",
                        f"{in_process['loop_cpu_ms_per_round']:.3f}",
                        f"{in_process['wall_ms_per_round']:.3f}",
                        f"{in_process['transactions_per_round']:.2f}",
                    ]
                ],
            )
        )
        parts.append(f"in process (no gRPC) {in_process['loop_cpu_ms_per_round']:.2f} ms of loop CPU per cue round")
    summary = f"signal-to-cue latency, target p99 < {TARGET_P99_MS:g} ms: " + "; ".join(parts)
    report(
        "bench_latency",
        as_json=args.json,
        sections=[
            (
                f"signal-to-cue latency, raw stubs, {args.rounds} interleaved round(s), {args.streams} streams "
                f"({args.streams_per_channel} per connection), {args.seconds:g} s measured after "
                f"{args.warmup:g} s warm-up; rate = triggers/s per device",
                HEADERS,
                rows,
            ),
            *sections,
        ],
        metrics=metrics,
        summary=summary,
        details={
            "runs": [
                {
                    "label": r.label,
                    "streams": r.streams,
                    "rate": r.rate,
                    "answer": r.stats(),
                    "ack": r.stats(r.ack_samples),
                    "timeouts": r.timeouts,
                    "failures": r.failures,
                    "server_cpu_pct": r.server_cpu_pct,
                    "server_loop_pct": r.server_loop_pct,
                    "client_cpu_pct": r.client_cpu_pct,
                    "child_cpu_pct": r.child_cpu_pct,
                }
                for r in [*results, *protos, *(r for runs in swept.values() for r in runs)]
            ],
            "client": "raw generated stubs, one SignalBatch per trigger (no SDK)",
            "in_process": in_process,
            "profiles": profiles,
        },
    )


SWEEP_HEADERS = [
    "design", "work us/round", "rate/dev", "p50 ms", "p99 ms", "p99 rounds", "loop ms/round", "server ms/round",
    "core ms/round", "client cpu",
]  # fmt: skip


def _sweep_section(
    swept: dict[tuple[str, float], list[LatencyResult]], rates: list[float]
) -> tuple[str, list[str], list[list[str]]]:
    """--prototype-work, --split-work: the floor's latency with each added amount of work per round, median over
    rounds."""
    rows = []
    for rate in rates:
        for (design, work), runs in swept.items():
            at_rate = [r for r in runs if r.rate == rate]
            if not at_rate:
                continue
            p99 = [r.stats()["p99_ms"] for r in at_rate]
            rows.append(
                [
                    design,
                    f"{work:g}",
                    f"{rate:g}",
                    f"{statistics.median(r.stats()['p50_ms'] for r in at_rate):.2f}",
                    f"{statistics.median(p99):.2f}",
                    ", ".join(f"{v:.1f}" for v in p99),
                    f"{statistics.median(r.ms_per_round(r.server_loop_pct) for r in at_rate):.2f}",
                    f"{statistics.median(r.ms_per_round(r.server_cpu_pct) for r in at_rate):.2f}",
                    (
                        f"{statistics.median(r.ms_per_round(r.child_cpu_pct or 0.0) for r in at_rate):.2f}"
                        if design == "split"
                        else "-"
                    ),
                    f"{statistics.median(r.client_cpu_pct for r in at_rate):.0f}%",
                ]
            )
    return (
        "the prototype's cue round with work added (CPU spent in the interpreter per round, half at the trigger and "
        "half at the answer): on its one event loop (--prototype-work), or in a core process of its own behind a "
        "gRPC front (--split-work, prototype_split.py; loop and server CPU are the front's, core CPU the core "
        "process's); median over rounds",
        SWEEP_HEADERS,
        rows,
    )


def _perf_section(runs: list[LatencyResult]) -> tuple[str, list[str], list[list[str]]]:
    """--perf: each server's CPU per round by shared object, the median over its rounds (by label and rate)."""
    keys: list[tuple[str, float]] = []
    per_round: dict[tuple[str, float], list[dict[str, float]]] = {}
    for r in runs:
        if r.perf is None or not r.samples:
            continue
        key = (r.label, r.rate)
        if key not in per_round:
            keys.append(key)
        per_round.setdefault(key, []).append({g: 1e3 * v / len(r.samples) for g, v in r.perf.by_group().items()})
    groups = [name for name, _ in PERF_GROUPS] + ["other"]
    rows = [[group, *(f"{statistics.median(d[group] for d in per_round[k]):.3f}" for k in keys)] for group in groups]
    rows.append(["all", *(f"{statistics.median(sum(d.values()) for d in per_round[k]):.3f}" for k in keys)])
    return (
        "server CPU per round by shared object, ms (perf record -e cpu-clock of the measured window; median over "
        "rounds)",
        ["part", *(f"{label} x{rate:g}/s" for label, rate in keys)],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent device streams (default 1000)")
    parser.add_argument(
        "--rate",
        default="0.25,0.5,1",
        help="triggers/s per device; comma-separated, one run each (default 0.25,0.5,1)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before measuring (default 1.5)")
    parser.add_argument("--streams-per-channel", type=int, default=1, help="streams sharing one connection (default 1)")
    parser.add_argument(
        "--in-process", type=int, default=3000, metavar="N", help="also N cue rounds in process, no gRPC (0: skip)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved echo/Cuepoint rounds per load (default 3)")
    parser.add_argument(
        "--server-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of both servers, the echo and Cuepoint (serve --event-loop); the load generator keeps asyncio",
    )
    parser.add_argument(
        "--prototype-work",
        default="",
        metavar="US,...",
        help="after each Cuepoint run, the prototype with this much CPU (us) added per cue round on its loop, "
        "one run per value: the latency the floor has with work of Cuepoint's size",
    )
    parser.add_argument(
        "--split-work",
        default="",
        metavar="US,...",
        help="the same with the work in a core process behind a gRPC front process (prototype_split.py)",
    )
    parser.add_argument(
        "--prototype",
        action="store_true",
        help="also run issue 13's prototype shape (prototype_server.py: a cue round with nothing but its rows)",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="also each server's CPU per round by shared object (Linux perf: interpreter, kernel, gRPC, SQLite); "
        "perf's sampling adds CPU of its own, so read that run's parts, not its latencies",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs at 1 trigger/s per device")
    parser.add_argument("--py-spy", nargs="?", const="", default=False, help="profile the server with py-spy [PATH]")
    parser.add_argument("--top", type=int, default=15, help="functions shown per profile (default 15)")
    parser.add_argument("--py-spy-raw", metavar="DIR", default="", help="also keep py-spy's folded stacks in DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
        if args.rate == "0.25,0.5,1":
            args.rate = "1"
    raise_nofile(4 * args.streams + 1024)
    set_server_loop(args.server_loop)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_latency: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
