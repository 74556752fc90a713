"""Replicas: one process on SQLite, one on PostgreSQL, two on PostgreSQL + NATS, beside the echo, same load.

    .venv/bin/python bench/bench_replicas.py [--rounds 3] [--streams 50] [--lat-streams 500] [--rate 0.5] [--json]

Needs the local PostgreSQL (127.0.0.1:5432, trust; user postgres or root) and NATS (127.0.0.1:4222), as
the cluster tests do; says so in one line and exits 0 when either does not answer (``--require`` makes
that exit 1). Every run starts real ``cuepoint serve`` processes (bench/_common.py, as tests/cluster.py
does): a temp SQLite file; ``--database postgresql://.../DB?search_path=...`` with a fresh schema per run
in a fresh database (dropped at the end); and for two replicas the same schema plus
``--bus nats://127.0.0.1:4222 --bus-prefix <unique>``. The client load is split evenly over the replicas,
as a load balancer would (each device stream stays on the replica it reached).

Two loads per configuration (one start of its servers per round, both scenarios in one folder), each right
after the bare echo under the identical load, in ``--rounds``
interleaved rounds:

* batched ingest: ``--streams`` device streams x 4 in flight, raw stubs, ``SignalColumns`` of ``--batch``
  signals (the SDK's wire form), the listening scenario of bench_ingest.py; signals/s acked (after commit);
* signal-to-cue: ``--lat-streams`` devices, one connection each, ``--rate`` triggers/s per device, the
  help_me scenario of bench_latency.py (send, wait for the cue, decline, think); p50 and p99.

The PostgreSQL configurations serve their Prometheus metrics (``--metrics-port 0``); around each load the
benchmark reads every replica's ``cuepoint_storage_round_trips_total`` and prints the round trips the
stores sent PostgreSQL per signal batch stored (ingest) and per cue round (signal-to-cue: the trigger's
signals, the offer decision with its per-user guard, the decline), under load, so merged writes count as
what they cost.

Rate limits are lifted above the load (``BENCH_LIMITS``). On two cores the two replicas, PostgreSQL, NATS
and the load generator share the same two cores, so two replicas show what the coordination costs, not
what a second machine would add.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import secrets
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import (
    BENCH_LIMITS,
    CLIENT_CPU,
    CUEPOINT_METHOD,
    ECHO_METHOD,
    Metric,
    ServerProcess,
    Throughput,
    check_quiet,
    cuepoint_server,
    echo_server,
    note,
    pin_self,
    raise_nofile,
    raw_throughput,
    report,
    scrape_counters,
    temp_dir,
)
from bench_ingest import write_scenarios as write_ingest_scenarios
from bench_latency import LatencyResult, measure
from bench_latency import write_scenarios as write_latency_scenarios

PG_HOST, PG_PORT = "127.0.0.1", 5432
NATS_URL = "nats://127.0.0.1:4222"
CONFIGS = ("bare echo", "1 x SQLite", "1 x PostgreSQL", "2 x PostgreSQL + NATS")


def services_missing() -> str:
    """ "" when PostgreSQL and NATS both answer, else why not (one line)."""
    import socket

    for name, port in (("PostgreSQL", PG_PORT), ("NATS", 4222)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        except OSError as exc:
            return f"{name} at 127.0.0.1:{port} did not answer ({exc})"
    return ""


async def _pg_admin() -> Any:
    import asyncpg

    errors = []
    for user in ("postgres", "root"):
        try:
            return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="postgres", timeout=5)
        except Exception as exc:
            errors.append(f"{user}: {exc}")
    raise ConnectionError("; ".join(errors))


async def create_database() -> tuple[str, str]:
    name = f"cuepoint_bench_{secrets.token_hex(4)}"
    admin = await _pg_admin()
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        user = await admin.fetchval("SELECT current_user")
    finally:
        await admin.close()
    return name, f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"


async def drop_database(name: str) -> None:
    admin = await _pg_admin()
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def start_config(config: str, scenarios: Path, tmp: Path, database: str, tag: str) -> list[ServerProcess]:
    """The server processes of one configuration, started (replicas in parallel)."""
    if config == "bare echo":
        return [await echo_server(log_dir=tmp).start()]
    if config == "1 x SQLite":
        return [await cuepoint_server(scenarios, tmp / f"{tag}.db", log_dir=tmp, limits=BENCH_LIMITS).start()]
    schema = f"{database}?search_path=s_{hashlib.sha256(tag.encode()).hexdigest()[:20]}"
    if config == "1 x PostgreSQL":
        extra = ["--database", schema, "--metrics-port", "0"]
        only = cuepoint_server(scenarios, tmp / "unused.db", log_dir=tmp, limits=BENCH_LIMITS, extra=extra)
        return [await only.start()]
    extra = ["--database", schema, "--metrics-port", "0", "--bus", NATS_URL]
    extra += ["--bus-prefix", f"cuepoint-bench-{secrets.token_hex(4)}"]
    # The first replica migrates the schema; the second starts once it is there (both would be fine: the
    # migration runs under a lock, but sequential start-up keeps the log quiet).
    first = await cuepoint_server(scenarios, tmp / "unused.db", log_dir=tmp, limits=BENCH_LIMITS, extra=extra).start()
    second = await cuepoint_server(scenarios, tmp / "unused.db", log_dir=tmp, limits=BENCH_LIMITS, extra=extra).start()
    return [first, second]


# The counters the round trips are divided by (Prometheus text exposition).
_COUNTERS = {
    "trips": re.compile(r"^cuepoint_storage_round_trips_total (\S+)$", re.M),
    "signals": re.compile(r"^cuepoint_signals_received_total (\S+)$", re.M),
    "offered": re.compile(r'^cuepoint_cues_total\{[^}]*outcome="offered"[^}]*\} (\S+)$', re.M),
}


async def counters(servers: list[ServerProcess]) -> dict[str, float] | None:
    """The round trips, signals stored and cues offered so far, summed over the replicas (None: no metrics)."""
    totals: dict[str, float] = defaultdict(float)
    for s in servers:
        found = await scrape_counters(s, _COUNTERS)
        if found is None:
            return None
        for name, value in found.items():
            totals[name] += value
    return totals


def per(before: dict[str, float] | None, after: dict[str, float] | None, unit: str, scale: float = 1.0) -> float | None:
    """Round trips per `unit` (signals/scale: batches) between two scrapes."""
    if before is None or after is None or after[unit] <= before[unit]:
        return None
    return (after["trips"] - before["trips"]) / ((after[unit] - before[unit]) / scale)


async def stop_all(servers: list[ServerProcess]) -> None:
    await asyncio.gather(*(s.stop() for s in servers))


async def ingest_run(config: str, servers: list[ServerProcess], args: argparse.Namespace, tag: str) -> Throughput:
    """Batched ingest, the streams split evenly over the servers; signals/s summed, CPU summed over servers."""
    method = ECHO_METHOD if config == "bare echo" else CUEPOINT_METHOD
    shares = [args.streams // len(servers) + (1 if i < args.streams % len(servers) else 0) for i in range(len(servers))]
    parts = await asyncio.gather(
        *(
            raw_throughput(
                s.address,
                method,
                label=config,
                streams=n,
                batch=args.batch,
                window=4,
                seconds=args.seconds,
                warmup=args.warmup,
                server_pid=s.pid,
                prefix=f"{tag}-{i}",
                shape="columns",
            )
            for i, (s, n) in enumerate(zip(servers, shares, strict=True))
        )
    )
    return Throughput(
        config,
        args.streams,
        args.batch,
        sum(p.signals_per_s for p in parts),
        sum(p.messages_per_s for p in parts),
        statistics.mean(p.seconds for p in parts),
        sum(p.server_cpu_pct for p in parts),
        parts[0].client_cpu_pct,  # one load generator: every part measured the same process
        sum(p.failures for p in parts),
        "columns",
    )


async def latency_run(config: str, servers: list[ServerProcess], args: argparse.Namespace, seed: int) -> LatencyResult:
    """Signal-to-cue (or the echo's round trip), the devices split evenly over the servers."""
    echo = config == "bare echo"
    shares = [
        args.lat_streams // len(servers) + (1 if i < args.lat_streams % len(servers) else 0)
        for i in range(len(servers))
    ]
    parts = await asyncio.gather(
        *(
            measure(
                s,
                ECHO_METHOD if echo else CUEPOINT_METHOD,
                label=f"rep{i}",
                streams=n,
                rate=args.rate,
                seconds=args.seconds,
                warmup=args.lat_warmup,
                streams_per_channel=1,
                answer_kind="ack" if echo else "cue",
                seed=seed * 10 + i,
            )
            for i, (s, n) in enumerate(zip(servers, shares, strict=True))
        )
    )
    merged = LatencyResult(config, args.lat_streams, args.rate, args.seconds)
    for p in parts:
        merged.samples += p.samples
        merged.ack_samples += p.ack_samples
        merged.timeouts += p.timeouts
        merged.failures += p.failures
        merged.server_cpu_pct += p.server_cpu_pct
    merged.client_cpu_pct = parts[0].client_cpu_pct
    if not echo:
        merged.failures += sum(s.errors_in_log() for s in servers)
    return merged


async def run(args: argparse.Namespace) -> None:
    ingest: dict[str, list[Throughput]] = defaultdict(list)
    latency: dict[str, list[LatencyResult]] = defaultdict(list)
    trips: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    db_name, database = await create_database()
    try:
        with temp_dir("replicas") as tmp_text:
            tmp = Path(tmp_text)
            # One folder, both scenarios: the ingest load's screen_view never matches its condition, so the
            # help_me cues of the latency load are the only ones; one start per configuration and round.
            scenarios = write_ingest_scenarios(tmp / "scenarios")
            write_latency_scenarios(tmp / "scenarios")
            for round_no in range(1, args.rounds + 1):
                for config in CONFIGS:
                    tag = f"r{round_no}-{CONFIGS.index(config)}"
                    note(f"replicas round {round_no}/{args.rounds}: {config}: starting ...")
                    servers = await start_config(config, scenarios, tmp, database, tag)
                    try:
                        note(f"replicas round {round_no}/{args.rounds}: {config}: ingest ...")
                        start = await counters(servers) if "PostgreSQL" in config else None
                        ingest[config].append(await ingest_run(config, servers, args, tag))
                        middle = await counters(servers) if start is not None else None
                        note(f"replicas round {round_no}/{args.rounds}: {config}: signal-to-cue ...")
                        latency[config].append(await latency_run(config, servers, args, round_no))
                        end = await counters(servers) if middle is not None else None
                        for kind, value in (
                            ("batch", per(start, middle, "signals", args.batch)),
                            ("cue", per(middle, end, "offered")),
                        ):
                            if value is not None:
                                trips[config][kind].append(value)
                    finally:
                        await stop_all(servers)
    finally:
        await drop_database(db_name)

    ingest_rows = []
    latency_rows = []
    metrics: list[Metric] = []
    echo_ingest = [r.signals_per_s for r in ingest["bare echo"]]
    echo_p99 = [r.stats()["p99_ms"] for r in latency["bare echo"]]
    for config in CONFIGS:
        runs = ingest[config]
        ratios = [r.signals_per_s / e for r, e in zip(runs, echo_ingest, strict=True)]
        med = statistics.median(r.signals_per_s for r in runs)
        ingest_rows.append(
            [
                config,
                f"{med:,.0f}",
                ", ".join(f"{r.signals_per_s:,.0f}" for r in runs),
                f"{statistics.median(r.server_cpu_pct for r in runs):.0f}%",
                f"{statistics.median(r.client_cpu_pct for r in runs):.0f}%",
                f"{statistics.median(r.server_us_per_signal for r in runs):.2f}",
                "-" if config == "bare echo" else f"{min(ratios):.3f}x",
                "-" if config == "bare echo" else f"{statistics.median(ratios):.3f}x",
                str(sum(r.failures for r in runs)),
            ]
        )
        lat = latency[config]
        p50 = statistics.median(r.stats()["p50_ms"] for r in lat)
        p99 = statistics.median(r.stats()["p99_ms"] for r in lat)
        lat_ratios = [r.stats()["p99_ms"] / e for r, e in zip(lat, echo_p99, strict=True)]
        done = statistics.median(len(r.samples) / r.seconds for r in lat)
        latency_rows.append(
            [
                config,
                f"{done:,.0f}",
                f"{p50:.2f}",
                f"{p99:.2f}",
                ", ".join(f"{r.stats()['p99_ms']:.1f}" for r in lat),
                "-" if config == "bare echo" else f"{min(lat_ratios):.1f}x",
                "-" if config == "bare echo" else f"{statistics.median(lat_ratios):.1f}x",
                f"{statistics.median(r.server_cpu_pct for r in lat):.0f}%",
                f"{statistics.median(r.client_cpu_pct for r in lat):.0f}%",
                str(sum(r.timeouts for r in lat)),
                str(sum(r.failures for r in lat)),
            ]
        )
        if config != "bare echo":
            metrics.append(
                Metric(
                    f"ingest batched (columns x{args.batch}), {config}",
                    med,
                    "signals/s",
                    baseline=statistics.median(echo_ingest),
                    ratio=statistics.median(ratios),
                )
            )
            metrics.append(
                Metric(
                    f"signal-to-cue p99, {args.lat_streams} streams x {args.rate:g}/s, {config}",
                    p99,
                    "ms",
                    baseline=statistics.median(echo_p99),
                    ratio=statistics.median(lat_ratios),
                )
            )
    trip_rows = []
    for config, kinds in trips.items():
        batch, cue = kinds.get("batch", []), kinds.get("cue", [])
        trip_rows.append(
            [
                config,
                f"{statistics.median(batch):.3f}" if batch else "-",
                ", ".join(f"{v:.3f}" for v in batch),
                f"{statistics.median(cue):.2f}" if cue else "-",
                ", ".join(f"{v:.2f}" for v in cue),
            ]
        )

    def trips_of(config: str) -> str:
        kinds = trips.get(config)
        if not kinds or not kinds.get("batch") or not kinds.get("cue"):
            return ""
        batch, cue = statistics.median(kinds["batch"]), statistics.median(kinds["cue"])
        return f", PG round trips {batch:.3f}/signal batch {cue:.2f}/cue round"

    summary = f"replicas (median of {args.rounds} interleaved rounds): " + "; ".join(
        f"{row[0]}: ingest {row[1]} signals/s, cue p50 {lrow[2]} ms p99 {lrow[3]} ms{trips_of(row[0])}"
        for row, lrow in zip(ingest_rows, latency_rows, strict=True)
    )
    report(
        "bench_replicas",
        as_json=args.json,
        sections=[
            (
                f"batched ingest, {args.streams} streams split over the replicas, 4 in flight, raw stubs, columns "
                f"x{args.batch}, {args.seconds:g} s after {args.warmup:g} s warm-up; {args.rounds} interleaved rounds; "
                "server cpu summed over the replicas (PostgreSQL's and NATS's own processes not included)",
                [
                    "configuration",
                    "signals/s (median)",
                    "each round",
                    "server cpu",
                    "client cpu",
                    "server us/sig",
                    "vs echo min",
                    "vs echo median",
                    "failures",
                ],
                ingest_rows,
            ),
            (
                f"signal-to-cue, {args.lat_streams} devices (one connection each) split over the replicas, "
                f"{args.rate:g} trigger/s each, {args.seconds:g} s after {args.lat_warmup:g} s warm-up; p99 ratio "
                "to the echo's round trip in the same round",
                [
                    "configuration",
                    "cues/s",
                    "p50 ms",
                    "p99 ms",
                    "p99 each round",
                    "p99 vs echo min",
                    "p99 vs echo median",
                    "server cpu",
                    "client cpu",
                    "timeouts",
                    "failures",
                ],
                latency_rows,
            ),
            (
                "PostgreSQL round trips (cuepoint_storage_round_trips_total, summed over the replicas) per signal "
                f"batch of {args.batch} stored during the ingest load, and per cue round (trigger, offer decision "
                "with its per-user guard, decline) during the signal-to-cue load; writes merged by the writer "
                "count once",
                ["configuration", "per signal batch (median)", "each round", "per cue round (median)", "each round"],
                trip_rows,
            ),
        ],
        metrics=metrics,
        summary=summary,
        details={
            "ingest": {k: [vars(r) for r in v] for k, v in ingest.items()},
            "latency": {
                k: [
                    {
                        "answer": r.stats(),
                        "ack": r.stats(r.ack_samples),
                        "server_cpu_pct": r.server_cpu_pct,
                        "client_cpu_pct": r.client_cpu_pct,
                        "timeouts": r.timeouts,
                        "failures": r.failures,
                    }
                    for r in v
                ]
                for k, v in latency.items()
            },
            "rounds": args.rounds,
            "round_trips": {k: dict(v) for k, v in trips.items()},
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--streams", type=int, default=50, help="ingest device streams in all (default 50)")
    parser.add_argument("--batch", type=int, default=100, help="signals per ingest message (default 100)")
    parser.add_argument("--lat-streams", type=int, default=500, help="latency devices in all (default 500)")
    parser.add_argument("--rate", type=float, default=0.5, help="triggers/s per latency device (default 0.5)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="ingest warm-up seconds (default 1)")
    parser.add_argument("--lat-warmup", type=float, default=1.5, help="latency warm-up seconds (default 1.5)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s runs")
    parser.add_argument("--require", action="store_true", help="exit 1 (not 0) when PostgreSQL or NATS is missing")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.lat_warmup = min(args.rounds, 2), 2.0, 0.5, 1.0
    missing = services_missing()
    if missing:
        why = f"bench_replicas: skipped: {missing} (needs PostgreSQL and NATS on loopback)"
        print(json.dumps({"bench": "bench_replicas", "metrics": [], "summary": why}) if args.json else why)
        return 1 if args.require else 0
    raise_nofile(4 * args.lat_streams + 1024)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_replicas: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
