"""Ingest throughput: signals/s acked by the real server, beside the bare echo, in the same run.

    .venv/bin/python bench/bench_ingest.py [--streams 50] [--batch 100] [--seconds 5] [--json]

Each run starts a fresh server in a subprocess (``cuepoint serve`` with a temp SQLite file and a one-file
scenarios folder, default log level) and drives it from this process over loopback, with N concurrent
device streams (default 50), each keeping ``--window`` messages in flight:

* bare echo: ``echo_server.py`` with the same message shapes (the ceiling);
* Cuepoint, raw stubs: the same pre-encoded messages as the echo run, so only the server differs;
* Cuepoint, SDK: ``cuepoint.connect`` + ``client.track()`` + ``client.flush()``, SDK batching
  (``max_batch``) and validation included; each device tracks ``window/2 x batch`` signals and flushes,
  with two flushes outstanding (about ``window`` messages in flight).

Each is run batched (``--batch`` signals per message, default 100) and unbatched (1 per message). A
signal counts once the server acked it; Cuepoint acks only after the batch is committed to SQLite.
The product target: batched ingest at least 50% of the bare echo ceiling.

``--py-spy PATH`` (or $PY_SPY, or py-spy on PATH) samples the Cuepoint server during its runs and prints
its hottest functions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from _common import (
    CLIENT_CPU,
    CUEPOINT_METHOD,
    THROUGHPUT_HEADERS,
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
    temp_dir,
)
from echo_server import echo_throughput

import cuepoint
from cuepoint.v1 import device_pb2

TARGET_RATIO = 0.5

# Listens to an event the load never sends: ingest pays for the index lookup, not for evaluations.
SCENARIO = """\
id: bench-unrelated
trigger:
  event: help_me
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
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    if failures:
        note(f"  {label}: {len(failures)} device(s) failed, first: {failures[0]}")
    return Throughput(
        label, streams, batch, done / elapsed, sent / elapsed, elapsed, server_cpu, client_cpu, len(failures)
    )


async def cuepoint_run(
    kind: str,
    args: argparse.Namespace,
    batch: int,
    tmp: Path,
    py_spy: str | None,
    profiles: dict[str, Any],
) -> Throughput:
    db = tmp / f"ingest-{kind.replace(' ', '-')}-{batch}.db"
    server = await cuepoint_server(write_scenarios(tmp / "scenarios"), db, log_dir=tmp).start()
    label = f"Cuepoint, {kind}, {batch}/msg"
    spy: PySpy | None = None
    try:
        if py_spy:
            # Starts sampling about when the warm-up ends (after stream set-up) and covers the measurement.
            async def start_spy() -> None:
                nonlocal spy
                await asyncio.sleep(args.warmup + 0.5)
                spy = PySpy(py_spy, server.pid, args.seconds - 0.5, tmp / f"spy-{kind}-{batch}.txt")

            spy_starter = asyncio.create_task(start_spy())
        if kind == "raw stubs":
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
                prefix=f"raw{batch}",
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
        return result
    finally:
        await server.stop()


async def run(args: argparse.Namespace) -> None:
    py_spy = find_py_spy(args.py_spy) if args.py_spy is not False else None
    if args.py_spy is not False and not py_spy:
        note("py-spy not found; running without the profile")
    batches = [args.batch, 1]
    runs: dict[tuple[str, int], list[Throughput]] = defaultdict(list)
    profiles: dict[str, Any] = {}
    with temp_dir("ingest") as tmp_text:
        tmp = Path(tmp_text)
        for batch in batches:
            for attempt in range(args.repeat):
                note(f"ingest: bare echo, {args.streams} streams, {batch}/msg ...")
                runs[("echo", batch)].append(
                    await echo_throughput(
                        streams=args.streams,
                        batch=batch,
                        window=args.window,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        log_dir=tmp,
                        label=f"bare echo, {batch}/msg",
                    )
                )
                for kind in ("raw stubs", "SDK"):
                    note(f"ingest: Cuepoint via {kind}, {args.streams} streams, {batch}/msg ...")
                    spy = py_spy if attempt == 0 else None
                    runs[(kind, batch)].append(await cuepoint_run(kind, args, batch, tmp, spy, profiles))
    # The median run of each (this machine's throughput varies between runs; see --repeat).
    results = {key: sorted(rs, key=lambda r: r.signals_per_s)[len(rs) // 2] for key, rs in runs.items()}

    rows = []
    for batch in batches:
        echo = results[("echo", batch)]
        for key in (("echo", batch), ("raw stubs", batch), ("SDK", batch)):
            r = results[key]
            rows.append([*r.row(), f"{r.signals_per_s / echo.signals_per_s:.2f}x"])
    echo_b = results[("echo", args.batch)]
    raw_b = results[("raw stubs", args.batch)]
    sdk_b = results[("SDK", args.batch)]
    echo_1, raw_1, sdk_1 = results[("echo", 1)], results[("raw stubs", 1)], results[("SDK", 1)]
    target = f">= {TARGET_RATIO:.0%} of echo"
    metrics = [
        Metric(
            f"ingest batched ({args.batch}/msg), raw stubs",
            raw_b.signals_per_s,
            "signals/s",
            baseline=echo_b.signals_per_s,
            target=target,
            met=raw_b.signals_per_s >= TARGET_RATIO * echo_b.signals_per_s,
        ),
        Metric(
            f"ingest batched ({args.batch}/msg), SDK",
            sdk_b.signals_per_s,
            "signals/s",
            baseline=echo_b.signals_per_s,
            target=target,
            met=sdk_b.signals_per_s >= TARGET_RATIO * echo_b.signals_per_s,
        ),
        Metric("ingest unbatched (1/msg), raw stubs", raw_1.signals_per_s, "signals/s", echo_1.signals_per_s),
        Metric("ingest unbatched (1/msg), SDK", sdk_1.signals_per_s, "signals/s", echo_1.signals_per_s),
    ]
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        (
            f"ingest throughput, {args.streams} device streams, {args.window} messages in flight per stream, "
            f"{args.seconds:g} s measured after {args.warmup:g} s warm-up"
            + (f", median of {args.repeat} runs" if args.repeat > 1 else ""),
            [*THROUGHPUT_HEADERS, "vs echo"],
            rows,
        )
    ]
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
    # What 50% of the echo would leave per signal, next to what merely reading a signal costs in Python.
    floor = python_floor(args.batch)
    echo_us = 1e6 * (echo_b.server_cpu_pct / 100) / echo_b.signals_per_s
    raw_us = 1e6 * (raw_b.server_cpu_pct / 100) / raw_b.signals_per_s
    spare_us = echo_us / TARGET_RATIO - echo_us
    sections.append(
        (
            f"per-signal CPU budget at {TARGET_RATIO:.0%} of the echo ({args.batch}/msg; server CPU of the runs above)",
            ["item", "us/signal"],
            [
                ["bare echo server, all threads (decode, ack, grpc)", f"{echo_us:.2f}"],
                [f"a server at {TARGET_RATIO:.0%} of the echo may spend", f"{echo_us / TARGET_RATIO:.2f}"],
                ["... of which beyond what the echo already spends", f"{spare_us:.2f}"],
                ["Python: decode a batch (C), per signal", f"{floor['parse_us']:.2f}"],
                ["Python: decode and read every field of a signal, nothing else", f"{floor['read_us']:.2f}"],
                ["Cuepoint server, all threads (validate, state, evaluate, journal, ack)", f"{raw_us:.2f}"],
            ],
        )
    )
    metrics.append(
        Metric(
            "Python floor: read one signal's fields",
            floor["read_us"],
            "us/signal",
            baseline=spare_us,
            target=f"<= {spare_us:.2f} us spare at {TARGET_RATIO:.0%} of echo",
            met=floor["read_us"] <= spare_us,
        )
    )
    ratio = raw_b.signals_per_s / echo_b.signals_per_s
    sdk_ratio = sdk_b.signals_per_s / echo_b.signals_per_s
    verdict = "MET" if max(ratio, sdk_ratio) >= TARGET_RATIO else "NOT MET"
    summary = (
        f"ingest: batched {raw_b.signals_per_s:,.0f} signals/s raw ({ratio:.0%} of echo "
        f"{echo_b.signals_per_s:,.0f}), {sdk_b.signals_per_s:,.0f} via SDK ({sdk_ratio:.0%}); unbatched "
        f"{raw_1.signals_per_s:,.0f} raw / {sdk_1.signals_per_s:,.0f} SDK vs echo {echo_1.signals_per_s:,.0f}; "
        f"target >= {TARGET_RATIO:.0%} of echo: {verdict}"
    )
    report(
        "bench_ingest",
        as_json=args.json,
        sections=sections,
        metrics=metrics,
        summary=summary,
        details={
            "runs": {f"{k[0]}/{k[1]}": vars(v) for k, v in results.items()},
            "all_runs": {f"{k[0]}/{k[1]}": [r.signals_per_s for r in v] for k, v in runs.items()},
            "streams": args.streams,
            "window": args.window,
            "profiles": profiles,
            "python_floor_us": floor,
            "echo_server_us_per_signal": echo_us,
            "cuepoint_server_us_per_signal": raw_us,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50, help="concurrent device streams (default 50)")
    parser.add_argument("--batch", type=int, default=100, help="signals per message when batched (default 100)")
    parser.add_argument("--window", type=int, default=4, help="messages in flight per stream (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, the median is shown (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    parser.add_argument("--py-spy", nargs="?", const="", default=False, help="profile the server with py-spy [PATH]")
    parser.add_argument("--top", type=int, default=15, help="functions shown per profile (default 15)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 0.5)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_ingest: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
