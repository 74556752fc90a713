"""Ingest throughput: signals/s acked by the real server, beside the bare echo, in the same run.

    .venv/bin/python bench/bench_ingest.py [--streams 50] [--batch 100] [--seconds 5] [--rounds 3] [--json]

Each run starts a fresh server in a subprocess (``cuepoint serve`` with a temp SQLite file and a one-file
scenarios folder whose scenario listens to the ingested event, default log level) and drives it from this
process over loopback, with N concurrent device streams (default 50), each keeping ``--window`` messages
in flight. Every round measures, in this order (so each Cuepoint run sits right after its baseline):

* bare echo, rows: ``echo_server.py`` fed pre-encoded ``SignalBatch`` messages (the ceiling for that shape);
* Cuepoint, raw stubs, rows: the same bytes as that echo run, so only the server differs;
* bare echo, columns: the same signals as a columnar ``SignalColumns`` (the form the SDK sends);
* Cuepoint, raw stubs, columns: the same bytes again;
* Cuepoint, SDK: ``cuepoint.connect`` + ``client.track()`` + ``client.flush()``; the SDK sends columns, so
  its baseline is the columnar echo; SDK batching (``max_batch``) and validation are included;
* the same unbatched (1 signal per message): echo rows, Cuepoint raw rows, Cuepoint SDK (which sends a batch
  of one or two events as rows, ``_convert.ROWS_UP_TO``, so its baseline is the echo of rows).

``--rounds`` (default 3) interleaved rounds; the ratio of a Cuepoint run to the echo of its shape in the
same round is reported as min and median over rounds. A signal counts once the server acked it; Cuepoint
acks only after the batch is committed to SQLite. The server's rate limits are lifted above the load
(``BENCH_LIMITS``: still charged, never refusing) unless ``--default-limits``: the defaults (5,000
signals/s per device, 100,000 per app) would cap the load below the echo and measure the flood control.
Both processes' CPU is shown (100% = one core), and per acked signal. Each Cuepoint server serves its
metrics (``--metrics-port 0``): the signals it stored per write transaction (the group commit's round size,
from ``cuepoint_storage_transactions_total``) are shown per round.

Targets (issue 13): batched via the SDK >= 0.5x the echo of the same shape, raw stubs >= 0.6x, unbatched
>= 0.8x.

``--no-batched`` / ``--no-unbatched`` keep one half. ``--server-loop uvloop`` runs both servers, the echo and
Cuepoint (``serve --event-loop uvloop``), on uvloop; the load generator stays on asyncio's loop.

``--py-spy PATH`` (or $PY_SPY, or py-spy on PATH) samples the Cuepoint server during the first round's
runs and prints its hottest functions.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import textwrap
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from _common import (
    BENCH_LIMITS,
    CLIENT_CPU,
    CUEPOINT_METHOD,
    SHAPES,
    THROUGHPUT_HEADERS,
    TRANSACTIONS_TOTAL,
    BatchEncoder,
    CpuMeter,
    Metric,
    PySpy,
    ServerProcess,
    Throughput,
    check_quiet,
    cuepoint_server,
    find_py_spy,
    note,
    pin_self,
    raw_throughput,
    report,
    scrape_counters,
    set_server_loop,
    temp_dir,
)
from echo_server import echo_throughput

import cuepoint
from cuepoint.v1 import device_pb2

TARGET_SDK = 0.5
TARGET_RAW = 0.6
TARGET_UNBATCHED = 0.8

# Listens to the event the load sends (screen_view, screen=home): every signal is looked up in the event
# index, evaluated against the condition and recorded; the condition never holds, so nothing is offered
# (an offered cue would make later signals of the device "busy" and measure the arbiter instead).
SCENARIO = """\
id: bench-listening
trigger:
  event: screen_view
  where: {screen: {equals: checkout}}
cue:
  message: "Need a hand?"
  channel: chat
cooldown: 0s
"""


def python_floor(batch: int, seconds: float = 1.0) -> dict[str, float]:
    """Microseconds of Python per signal to decode a batch and read every field of its signals, nothing else.

    The least any Python server must spend on a signal it validates, keeps and stores: it has to look at the
    signal's id, name, time and properties. Measured in this process on the same pre-encoded batches the
    load sends. ``parse_us`` is the C decode alone.
    """
    messages = [BatchEncoder(batch).encode(n, n * batch) for n in range(64)]
    parse = device_pb2.DeviceMessage.FromString

    def timed(read_fields: bool) -> float:
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            for raw in messages:
                signals = parse(raw).signals.signals
                if read_fields:
                    for s in signals:
                        event, stamp = s.event, s.time
                        props = event.properties
                        values = {k: getattr(v, v.WhichOneof("kind")) for k in props for v in (props[k],)}
                        (s.id, event.name, stamp.seconds + stamp.nanos * 1e-9, values)
                count += len(signals)
        return 1e6 * (time.perf_counter() - started) / count

    return {"parse_us": timed(False), "read_us": timed(True)}


# Signals stored, and the write transactions the store's writer committed (cuepoint_storage_*, metrics.py):
# their ratio is how many signals one group commit carries, so its fixed cost (BEGIN, the marks, COMMIT and
# the acks' writes; about 0.2 ms of the loop per round on 2026-12-07's slower host) is paid per that many.
_COMMIT_COUNTERS = {
    "signals": re.compile(r"^cuepoint_signals_received_total (\S+)$", re.M),
    "transactions": TRANSACTIONS_TOTAL,
}


def signals_per_commit(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    if before is None or after is None or after["transactions"] <= before["transactions"]:
        return None
    return (after["signals"] - before["signals"]) / (after["transactions"] - before["transactions"])


def write_scenarios(folder: Path, text: str = SCENARIO) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.yaml").write_text(textwrap.dedent(text))
    return folder


async def sdk_throughput(
    server: ServerProcess,
    *,
    label: str,
    streams: int,
    batch: int,
    window: int,
    seconds: float,
    warmup: float,
) -> Throughput:
    """Signals/s through the SDK.

    Each device tracks ``window/2 x batch`` signals and starts a ``flush()``, keeping two flushes
    outstanding, so about ``window`` messages are in flight, as in the raw-stub run.
    """
    chunk = max(1, window // 2) * batch
    config = cuepoint.ClientConfig(
        max_batch=batch,
        linger=0.0 if batch == 1 else 0.02,
        max_pending_signals=max(10_000, 2 * chunk),
        close_timeout=2.0,
    )
    clients = await asyncio.gather(
        *(
            cuepoint.connect(
                server.address,
                app_id="bench",
                device_id=f"sdk-{i:05d}",
                context=cuepoint.Context(app_version="4.2.0", os="iOS", os_version="17.4"),
                user=cuepoint.User(user_id=f"user-sdk-{i}", tier="free"),
                consent=cuepoint.Consent.FULL,
                config=config,
            )
            for i in range(streams)
        )
    )
    acked = [0]
    messages = [0]
    failures: list[str] = []
    # Bounded in count as well as time.
    max_chunks = max(100, 2_000_000 // chunk)

    async def drive(client: cuepoint.Client) -> None:
        flushes: deque[asyncio.Task[None]] = deque()
        try:
            for _ in range(max_chunks):
                for n in range(chunk):
                    await client.track("screen_view", screen="home", n=n)
                flushes.append(asyncio.create_task(client.flush(timeout=30)))
                if len(flushes) >= 2:
                    await flushes.popleft()
                    acked[0] += chunk
                    messages[0] += chunk // batch
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            for flush in flushes:
                flush.cancel()

    tasks = [asyncio.create_task(drive(c)) for c in clients]
    try:
        await asyncio.sleep(warmup)
        start_acked, start_messages = acked[0], messages[0]
        meter = CpuMeter(server.pid)
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        done, sent = acked[0] - start_acked, messages[0] - start_messages
        server_cpu, client_cpu = meter.read()
        server_sys = meter.system()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    if failures:
        note(f"  {label}: {len(failures)} device(s) failed, first: {failures[0]}")
    return Throughput(
        label, streams, batch, done / elapsed, sent / elapsed, elapsed, server_cpu, client_cpu, len(failures),
        server_sys_pct=server_sys,
    )  # fmt: skip


# What each round measures: (label, server, load, wire shape, batched?). "echo" rows are the baseline of
# every Cuepoint row of the same shape and size in the same round.
VARIANTS: tuple[tuple[str, str, str, bool], ...] = (
    ("echo", "raw", "rows", True),
    ("Cuepoint", "raw", "rows", True),
    ("echo", "raw", "columns", True),
    ("Cuepoint", "raw", "columns", True),
    ("Cuepoint", "SDK", "columns", True),
    ("echo", "raw", "rows", False),
    ("Cuepoint", "raw", "rows", False),
    ("Cuepoint", "SDK", "rows", False),  # one event per batch: the SDK sends it as a Signal message
)


def variant_key(server: str, load: str, shape: str, batched: bool) -> str:
    size = "batched" if batched else "unbatched"
    return f"{server}, {load}, {shape}, {size}"


def targets(load: str, batched: bool) -> float | None:
    """Issue 13's targets (ratio to the echo of the same batch shape, median of interleaved rounds)."""
    if not batched:
        return TARGET_UNBATCHED
    return TARGET_SDK if load == "SDK" else TARGET_RAW


async def cuepoint_run(
    load: str,
    shape: str,
    args: argparse.Namespace,
    batch: int,
    tmp: Path,
    py_spy: str | None,
    profiles: dict[str, Any],
    tag: str,
) -> tuple[Throughput, float | None]:
    """The run's throughput, and the signals one write transaction stored on average (None: unknown)."""
    db = tmp / f"ingest-{tag}.db"
    server = await cuepoint_server(
        write_scenarios(tmp / "scenarios"),
        db,
        log_dir=tmp,
        limits=BENCH_LIMITS if not args.default_limits else (),
        extra=("--event-loop", args.server_loop, "--metrics-port", "0"),
    ).start()
    label = f"Cuepoint, {load}, {shape} x{batch}"
    spy: PySpy | None = None
    try:
        if py_spy:
            # Starts sampling about when the warm-up ends (after stream set-up) and covers the measurement.
            async def start_spy() -> None:
                nonlocal spy
                await asyncio.sleep(args.warmup + 0.5)
                spy = PySpy(py_spy, server.pid, args.seconds - 0.5, tmp / f"spy-{tag}.txt")

            spy_starter = asyncio.create_task(start_spy())
        before = await scrape_counters(server, _COMMIT_COUNTERS)
        if load == "raw":
            result = await raw_throughput(
                server.address,
                CUEPOINT_METHOD,
                label=label,
                streams=args.streams,
                batch=batch,
                window=args.window,
                seconds=args.seconds,
                warmup=args.warmup,
                server_pid=server.pid,
                prefix=f"raw-{tag}",
                shape=shape,
            )
        else:
            result = await sdk_throughput(
                server,
                label=label,
                streams=args.streams,
                batch=batch,
                window=args.window,
                seconds=args.seconds,
                warmup=args.warmup,
            )
            result.shape = shape
        per_commit = signals_per_commit(before, await scrape_counters(server, _COMMIT_COUNTERS))
        refused = server.count_in_log(b"RESOURCE_EXHAUSTED")
        if refused:
            note(f"  {label}: {refused} stream(s) refused by a rate limit: the limiter, not the server, was measured")
        if py_spy:
            await spy_starter
            if spy is not None:
                await spy.wait()
                total, top = spy.top(args.top)
                profiles[label] = {
                    "samples": total,
                    "self": top,
                    "inclusive_cuepoint": spy.top_inclusive(args.top),
                }
        return result, per_commit
    finally:
        await server.stop()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def run(args: argparse.Namespace) -> None:
    py_spy = find_py_spy(args.py_spy) if args.py_spy is not False else None
    if args.py_spy is not False and not py_spy:
        note("py-spy not found; running without the profile")
    variants = [v for v in VARIANTS if (args.unbatched or v[3]) and (args.batched or not v[3])]
    runs: dict[str, list[Throughput]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)
    commits: dict[str, list[float]] = defaultdict(list)  # signals per write transaction, per round
    profiles: dict[str, Any] = {}
    with temp_dir("ingest") as tmp_text:
        tmp = Path(tmp_text)
        # Interleaved: every round measures each echo right before the Cuepoint runs of its shape, so a
        # machine that gets busier or quieter moves both sides of a ratio together.
        for round_no in range(1, args.rounds + 1):
            echo_of: dict[tuple[str, bool], Throughput] = {}
            for server, load, shape, batched in variants:
                batch = args.batch if batched else 1
                key = variant_key(server, load, shape, batched)
                note(f"ingest round {round_no}/{args.rounds}: {key} ({args.streams} streams, {batch}/msg) ...")
                if server == "echo":
                    result = await echo_throughput(
                        streams=args.streams,
                        batch=batch,
                        window=args.window,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        log_dir=tmp,
                        label=f"bare echo, {shape} x{batch}",
                        shape=shape,
                        loop=args.server_loop,
                    )
                    echo_of[(shape, batched)] = result
                else:
                    spy = py_spy if round_no == 1 else None
                    tag = f"{round_no}-{load}-{shape}-{batch}"
                    result, per_commit = await cuepoint_run(load, shape, args, batch, tmp, spy, profiles, tag)
                    ratios[key].append(result.signals_per_s / echo_of[(shape, batched)].signals_per_s)
                    if per_commit is not None:
                        commits[key].append(per_commit)
                runs[key].append(result)

    rows = []
    metrics: list[Metric] = []
    for server, load, shape, batched in variants:
        key = variant_key(server, load, shape, batched)
        rs = runs[key]
        median_run = sorted(rs, key=lambda r: r.signals_per_s)[len(rs) // 2]
        echo_key = variant_key("echo", "raw", shape, batched)
        if server == "echo":
            rows.append([*median_run.row(), "-", "-"])
            continue
        rs_ratio = ratios[key]
        ratio_min, ratio_median = min(rs_ratio), _median(rs_ratio)
        rows.append([*median_run.row(), f"{ratio_min:.2f}x", f"{ratio_median:.2f}x"])
        target = targets(load, batched)
        echo_median = _median([r.signals_per_s for r in runs[echo_key]])
        metrics.append(
            Metric(
                f"ingest {'batched' if batched else 'unbatched'} ({shape} x{median_run.batch}), {load}",
                _median([r.signals_per_s for r in rs]),
                "signals/s",
                baseline=echo_median,
                baseline_name=f"bare echo, {shape} x{median_run.batch}",
                target=f">= {target:.1f}x echo (median)" if target is not None else "",
                met=ratio_median >= target if target is not None else None,
                ratio=ratio_median,
            )
        )
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        (
            f"ingest throughput, {args.streams} device streams, {args.window} messages in flight per stream, "
            f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; median run of {args.rounds} interleaved "
            f"rounds; ratio = Cuepoint / echo of the same batch shape in the same round (min and median over rounds); "
            f"rate limits {'at their defaults' if args.default_limits else 'lifted above the load (still charged)'}",
            [*THROUGHPUT_HEADERS, "ratio min", "ratio median"],
            rows,
        ),
        (
            "every round, signals/s (interleaved in this order)",
            ["run", *[f"round {n}" for n in range(1, args.rounds + 1)]],
            [[key, *[f"{r.signals_per_s:,.0f}" for r in rs]] for key, rs in runs.items()],
        ),
    ]
    if commits:
        sections.append(
            (
                "signals stored per write transaction (cuepoint_storage_transactions_total, whole run incl. warm-up;"
                " the group commit's round size), per round",
                ["run", *[f"round {n}" for n in range(1, args.rounds + 1)]],
                [[key, *[f"{v:.1f}" for v in values]] for key, values in commits.items()],
            )
        )
    for label, prof in profiles.items():
        sections.append(
            (
                f"py-spy, server process during '{label}' ({prof['samples']} samples): self time",
                ["function", "self", "inclusive"],
                [[f, f"{s:.1f}%", f"{i:.1f}%"] for f, s, i in prof["self"]],
            )
        )
        sections.append(
            (
                f"py-spy, server process during '{label}': Cuepoint functions by inclusive time",
                ["function", "inclusive"],
                [[f, f"{i:.1f}%"] for f, i in prof["inclusive_cuepoint"]],
            )
        )
    # Per-signal CPU, the unit bench_eval.py's "Core.ingest, ingest-benchmark shape" row uses.
    floor = python_floor(args.batch)
    budget_rows = []
    for shape in SHAPES:
        echo_runs = runs.get(variant_key("echo", "raw", shape, True))
        raw_runs = runs.get(variant_key("Cuepoint", "raw", shape, True))
        if not echo_runs or not raw_runs:
            continue
        echo_us = _median([r.server_us_per_signal for r in echo_runs])
        raw_us = _median([r.server_us_per_signal for r in raw_runs])
        budget_rows += [
            [f"bare echo server, {shape} x{args.batch} (decode, ack, grpc), all threads", f"{echo_us:.2f}"],
            [f"Cuepoint server, raw {shape} x{args.batch}, all threads", f"{raw_us:.2f}"],
        ]
    budget_rows += [
        ["Python: decode a row batch (C), per signal", f"{floor['parse_us']:.2f}"],
        ["Python: decode a row batch and read every field of a signal", f"{floor['read_us']:.2f}"],
    ]
    sections.append(
        (
            "server CPU per signal, batched (median over rounds; compare bench_eval.py's Core.ingest row)",
            ["item", "us/signal"],
            budget_rows,
        )
    )
    parts = []
    for m in metrics:
        verdict = "" if m.met is None else (" met" if m.met else " NOT MET")
        parts.append(f"{m.name} {m.value:,.0f}/s = {m.ratio:.2f}x{verdict}")
    summary = f"ingest vs echo of the same shape (median of {args.rounds} interleaved rounds): " + "; ".join(parts)
    report(
        "bench_ingest",
        as_json=args.json,
        sections=sections,
        metrics=metrics,
        summary=summary,
        details={
            "runs": {k: [vars(r) for r in v] for k, v in runs.items()},
            "ratios": dict(ratios),
            "signals_per_commit": dict(commits),
            "streams": args.streams,
            "window": args.window,
            "rounds": args.rounds,
            "server_loop": args.server_loop,
            "rate_limits": "default" if args.default_limits else list(BENCH_LIMITS),
            "scenario": SCENARIO,
            "profiles": profiles,
            "python_floor_us": floor,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50, help="concurrent device streams (default 50)")
    parser.add_argument("--batch", type=int, default=100, help="signals per message when batched (default 100)")
    parser.add_argument("--window", type=int, default=4, help="messages in flight per stream (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--no-unbatched", dest="unbatched", action="store_false", help="batched runs only")
    parser.add_argument("--no-batched", dest="batched", action="store_false", help="unbatched runs only")
    parser.add_argument(
        "--server-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of both servers, the echo and Cuepoint (serve --event-loop); the load generator keeps asyncio",
    )
    parser.add_argument(
        "--default-limits", action="store_true", help="keep the server's default rate limits (they cap the load)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    parser.add_argument("--py-spy", nargs="?", const="", default=False, help="profile the server with py-spy [PATH]")
    parser.add_argument("--top", type=int, default=15, help="functions shown per profile (default 15)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 0.5)
    set_server_loop(args.server_loop)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_ingest: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
