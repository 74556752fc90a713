"""`cuepoint` command line: serve, validate, schema, simulate, device, report, model report, forget-device, demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .storage import AuditRecord, ReplicaRecord
    from .webhooks import WebhookConfig

__all__ = ["main"]

_PG_HELP = "PostgreSQL URL (postgresql://USER@HOST/DB) instead of the SQLite --db"


# Young collections per this many new container objects (CPython's default is 700): ingest allocates a few
# per signal, and each full collection walks every device's state (remembered ids, windows).
_GC_THRESHOLDS = (20_000, 20, 20)


def _tune_gc() -> None:
    """Once started: what start-up built (modules, scenarios, caches) lives as long as the process, so it
    moves out of the collector's sight (gc.freeze), and collections run less often. Measured in-process on
    100-signal batches: about 2.5 us of CPU less per signal, of about 11. Only `serve` does this; a process
    that embeds the server keeps its own collector settings."""
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


# How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms).
_SWITCH_INTERVAL = 0.0002


def _tune_switch_interval() -> None:
    """SQLite's thread (aiosqlite) lets go of the GIL around every sqlite3 step and must get it back after each;
    while the event loop is busy it waits a whole switch interval each time (a convoy), so one commit of a
    round of cues took up to ~50 ms and every cue waited for it. Measured 2026-12-05 (issue 13,
    bench_latency.py --quick, 1,000 streams x 1 cue/s): signal-to-cue p50 47-62 -> 9-13 ms, p99 155-157 ->
    55-89 ms at 0.2 ms, with the same CPU per round. Only `serve` does this, as with `_tune_gc`."""
    sys.setswitchinterval(_SWITCH_INTERVAL)


def _serve(args: argparse.Namespace) -> int:
    from .api.auth import AuthConfig, AuthConfigError
    from .api.limits import RateLimits
    from .app import CuepointServer, ServerConfig
    from .core.core_base import CoreConfig
    from .core.delivery import DeliveryFaults
    from .logs import configure_logging
    from .scenarios.loader import ScenarioError

    configure_logging(args.log_level, json=args.log_json, cache=True)
    try:
        auth = AuthConfig.load(args.auth) if args.auth else None
        limits = RateLimits(
            device_rate=args.device_rate,
            device_burst=args.device_burst,
            app_rate=args.app_rate,
            app_burst=args.app_burst,
            app_streams_rate=args.app_streams_rate,
            app_streams_burst=args.app_streams_burst,
            peer_rate=args.peer_rate,
            peer_burst=args.peer_burst,
            peer_streams_rate=args.peer_streams_rate,
            peer_streams_burst=args.peer_streams_burst,
            peer_exempt=tuple(n.strip() for n in args.peer_exempt.split(",") if n.strip()),
        )
    except (AuthConfigError, ValueError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("cannot start: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2

    async def run() -> int:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            db=args.db,
            database=args.database,
            scenarios=args.scenarios,
            watch_scenarios=args.watch,
            auth=auth,
            device_secret_migration=args.device_secret_migration,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            rate_limits=limits,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            webhooks=_webhooks(args),
            http_port=args.http_port,
            http_host=args.http_host,
            desk_resume_grace=args.desk_resume_grace,
            core=CoreConfig(resume_window=args.resume_window, replica_ttl=args.replica_ttl),
            grace=args.grace,
            max_connection_age=args.max_connection_age,
            max_connection_age_grace=args.max_connection_age_grace,
            bus=args.bus,
            bus_prefix=args.bus_prefix,
            delivery_faults=DeliveryFaults.parse(args.test_delivery_faults),
            **({"sweep_every": args.test_sweep_every} if args.test_sweep_every else {}),
        )
        try:
            server = await CuepointServer.start(config)
        except ScenarioError as exc:
            print(f"cannot start: scenario files have {len(exc.issues)} problem(s):\n{exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a busy port (PortUnavailable), the metrics port, the database folder
            print(f"cannot start: {exc}", file=sys.stderr)
            return 2
        _tune_gc()
        _tune_switch_interval()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP reloads the scenario files now (also without --watch); the
        # reloader logs the outcome, and a broken folder keeps the old set.
        reloads: set[asyncio.Task[object]] = set()

        def reload_on_hup() -> None:
            if server.reloader is not None:
                task = loop.create_task(server.reloader.reload_now(reason="SIGHUP"))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_on_hup)
        # Announced once the signal handlers are in place, so a supervisor may signal at once.
        print(f"cuepoint listening on {server.address}", file=sys.stderr, flush=True)
        if server.metrics_port is not None:
            print(f"metrics on http://{config.metrics_host}:{server.metrics_port}/metrics", file=sys.stderr, flush=True)
        if server.http_url is not None:
            print(f"associate desk on {server.http_url}/desk/", file=sys.stderr, flush=True)
            print(f"admin console on {server.http_url}/console/", file=sys.stderr, flush=True)
        await stop.wait()
        await server.stop()
        return 0

    if args.event_loop == "uvloop":
        # Opt-in (issue 13): libuv's loop cuts the server's CPU per unbatched message by ~12% (callgrind,
        # README "Performance"); grpc.aio runs on it, but the test suite runs on asyncio's own loop.
        try:
            import uvloop
        except ImportError:
            print("--event-loop uvloop needs uvloop: pip install 'cuepoint-server[uvloop]'", file=sys.stderr)
            return 2
        return uvloop.run(run())
    return asyncio.run(run())


def _webhooks(args: argparse.Namespace) -> tuple[WebhookConfig, ...]:
    from .webhooks import WebhookConfig

    secret = args.webhook_secret or os.environ.get("CUEPOINT_WEBHOOK_SECRET", "")
    if args.webhook and not secret:
        raise SystemExit("--webhook needs --webhook-secret (or CUEPOINT_WEBHOOK_SECRET) to sign deliveries")
    return tuple(WebhookConfig(url=url, secret=secret) for url in args.webhook)


def _validate(args: argparse.Namespace) -> int:
    from .scenarios.loader import ScenarioError, load_directory, load_file

    total = 0
    problems = 0
    for target in args.paths:
        path = Path(target)
        try:
            loaded = load_directory(path) if path.is_dir() else load_file(path)
            total += len(loaded.scenarios)
        except ScenarioError as exc:
            problems += len(exc.issues)
            for issue in exc.issues:
                print(issue)
    if problems:
        print(f"{problems} problem(s) found", file=sys.stderr)
        return 1
    print(f"ok: {total} scenario(s) valid")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .scenarios.schema import scenario_schema_text

    text = scenario_schema_text()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import difflib

    from .logs import configure_logging
    from .scenarios.loader import ScenarioError
    from .simulate import TraceError, render_json, render_text, simulate_files

    # The timeline is the output; the core's own logs stay out of it.
    configure_logging("warning", json=False)
    render = render_json if args.json else render_text
    try:
        outcomes = simulate_files(args.scenarios, args.trace, why=args.why)
    except ScenarioError as exc:
        print(f"scenario files have {len(exc.issues)} problem(s):\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot read trace: {exc}", file=sys.stderr)
        return 2
    except TraceError as exc:
        sys.stdout.write(render(exc.outcomes) if exc.outcomes else "")
        print(f"invalid trace:\n{exc}", file=sys.stderr)
        return 2
    output = render(outcomes)
    if args.expect is None:
        sys.stdout.write(output)
        return 0
    try:
        expected = Path(args.expect).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"cannot read expected output: {exc}", file=sys.stderr)
        return 2
    if expected == output:
        print(f"ok: {args.trace} matches {args.expect}")
        return 0
    diff = difflib.unified_diff(
        expected.splitlines(keepends=True), output.splitlines(keepends=True), args.expect, "simulated"
    )
    sys.stdout.writelines(diff)
    print(f"{args.trace}: output differs from {args.expect}", file=sys.stderr)
    return 1


def _device(args: argparse.Namespace) -> int:
    import grpc

    import cuepoint

    from .device_player import play
    from .logs import configure_logging
    from .simulate import TraceError, parse_trace

    configure_logging("warning", json=False)
    try:
        trace = parse_trace(Path(args.trace).read_text(encoding="utf-8"), args.trace)
    except OSError as exc:
        print(f"cannot read trace: {exc}", file=sys.stderr)
        return 2
    except TraceError as exc:
        print(f"invalid trace:\n{exc}", file=sys.stderr)
        return 2
    credentials = None
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
    api_key = args.api_key or os.environ.get("CUEPOINT_API_KEY") or None
    config = cuepoint.ClientConfig(api_key=api_key, credentials=credentials)
    try:
        asyncio.run(play(args.address, trace, sys.stdout, speed=args.speed, linger=args.linger, config=config))
    except cuepoint.CuepointError as exc:
        print(f"cuepoint device: {exc}", file=sys.stderr)
        return 2
    return 0


def _explain(args: argparse.Namespace) -> int:
    import grpc

    from .explain_text import fetch, render

    try:
        answer = asyncio.run(fetch(args.address, args.device_id, args.token, args.limit))
    except grpc.RpcError as exc:
        print(f"explain: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    sys.stdout.write(render(answer))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .reporting.report import run, run_handling

    location = args.database or args.db
    if args.handling:
        return run_handling(location, args.since, args.until, args.scenario, args.json, sys.stdout, sys.stderr)
    return run(location, args.since, args.until, args.scenario, args.by, args.json, sys.stdout, sys.stderr)


def _model_report(args: argparse.Namespace) -> int:
    from .predict.report import run

    return run(args.database or args.db, args.top, args.json, sys.stdout)


def _forget_device(args: argparse.Namespace) -> int:
    from .storage.opening import open_store

    async def run() -> bool:
        # The server reads credentials from the database at every Hello, so this works beside a running server.
        store = await open_store(args.database or args.db)
        try:
            return await store.forget_device_credential(args.device_id)
        finally:
            await store.close()

    forgotten = asyncio.run(run())
    print(
        f"{args.device_id}: "
        + ("credential forgotten; its next Hello is a new install" if forgotten else "no credential")
    )
    return 0 if forgotten else 1


def _audit(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from .storage.opening import open_store

    if not args.database and not Path(args.db).is_file():
        print(f"cannot read audit trail: no database at {args.db}", file=sys.stderr)
        return 2

    async def run() -> list[AuditRecord]:
        store = await open_store(args.database or args.db)
        try:
            return await store.audit_entries(actor=args.actor, action=args.action, limit=args.limit)
        finally:
            await store.close()

    for rec in asyncio.run(run()):
        when = datetime.fromtimestamp(rec.time, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        row = {
            "id": rec.id,
            "time": when,
            "actor": rec.actor,
            "roles": list(rec.roles),
            "action": rec.action,
            "target": rec.target,
            "outcome": rec.outcome,
            "detail": rec.detail,
            "before": dict(rec.before),
            "after": dict(rec.after),
        }
        if args.json:
            print(json.dumps(row, sort_keys=True))
            continue
        roles = ",".join(rec.roles) or "-"
        before, after = (json.dumps(row[k], sort_keys=True) for k in ("before", "after"))
        detail = f" ({rec.detail})" if rec.detail else ""
        target = rec.target or "-"
        outcome = f"{rec.outcome}{detail}"
        print(f"{when}  {rec.actor} [{roles}]  {rec.action} {target}  {outcome} before={before} after={after}")
    return 0


def _replicas(args: argparse.Namespace) -> int:
    """The replicas registry: which replicas run, which scenario version each serves; exit 1 if they differ."""
    import json
    import time

    from .core.replicas import replica_statuses, versions_differ
    from .storage.opening import open_store

    if not args.replica_ttl > 0:
        print("--replica-ttl: must be a positive number of seconds", file=sys.stderr)
        return 2
    if not args.database and not Path(args.db).is_file():
        print(f"cannot read replicas: no database at {args.db}", file=sys.stderr)
        return 2

    async def run() -> list[ReplicaRecord]:
        store = await open_store(args.database or args.db)
        try:
            return await store.replicas()
        finally:
            await store.close()

    now = time.time()
    # Judged by the ttl the replicas run with (each judges the others by its own; README: give every replica
    # the same --replica-ttl), so this command agrees with them on who is gone.
    statuses = replica_statuses(asyncio.run(run()), now, "", ttl=args.replica_ttl)
    for r in statuses:
        state = "draining" if r.alive and r.draining else "serving" if r.alive else "gone"
        if args.json:
            row = {"replica_id": r.replica_id, "address": r.address, "host": r.host, "state": state}
            print(json.dumps({**row, "scenarios_version": r.scenarios_version, "last_seen": r.last_seen}))
            continue
        version = r.scenarios_version or "-"
        print(f"{r.replica_id}  {r.address}  {r.host}  scenarios {version}  {state}  seen {now - r.last_seen:.0f}s ago")
    if versions_differ(statuses):
        print("replicas serve different scenario versions: reload the ones on the old files", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(
        run_demo(
            args.scenarios, args.db, http_port=args.http_port, keep_running=args.keep_running, database=args.database
        )
    )


def main(argv: list[str] | None = None) -> int:
    from .api.limits import RateLimits

    parser = argparse.ArgumentParser(prog="cuepoint", description="Proactive in-app engagement server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--scenarios", default="scenarios", help="folder of scenario files")
    serve.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    serve.add_argument(
        "--database",
        default="",
        metavar="URL",
        help="PostgreSQL URL (postgresql://USER@HOST/DB): state shared by any number of replicas, instead of --db",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="asyncio's own loop (default) or uvloop (optional extra [uvloop]; less CPU per message)",
    )
    serve.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    serve.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: a free one)"
    )
    serve.add_argument(
        "--webhook",
        action="append",
        default=[],
        metavar="URL",
        help="POST cue and engagement lifecycle events here (repeatable)",
    )
    serve.add_argument(
        "--webhook-secret", default="", help="HMAC key for webhook signatures (or $CUEPOINT_WEBHOOK_SECRET)"
    )
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    serve.add_argument(
        "--http-port", type=int, default=None, help="serve the associate desk and admin console here (0: a free one)"
    )
    serve.add_argument("--http-host", default="127.0.0.1", help="address of the desk and console")
    serve.add_argument(
        "--desk-resume-grace",
        type=float,
        default=30.0,
        help="seconds a desk page may be gone (reload, network blip) before its associate is signed out and "
        "their engagements re-queued (default: 30)",
    )
    serve.add_argument(
        "--watch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply scenario file edits live (default: on); SIGHUP reloads either way",
    )
    serve.add_argument(
        "--auth", metavar="FILE", help="YAML file of app API keys, associate tokens, admin tokens (default: no auth)"
    )
    serve.add_argument(
        "--device-secret-migration",
        action="store_true",
        help="with --auth, also admit devices that never presented their device secret (SDKs that predate it)",
    )
    serve.add_argument(
        "--resume-window",
        type=float,
        default=120.0,
        help="seconds a closed session may be resumed; its device state is freed after (default 120)",
    )
    serve.add_argument(
        "--bus",
        default="",
        metavar="nats://HOST:4222",
        help="run as one of several replicas: reach the others' streams over this NATS (with a shared --database)",
    )
    serve.add_argument(
        "--bus-prefix", default="cuepoint", help="NATS subject prefix shared by one deployment's replicas"
    )
    # Tests only (core/delivery.py): lose and repeat wake-ups, so tests prove the outbox rows carry the traffic.
    serve.add_argument("--test-delivery-faults", default="", help=argparse.SUPPRESS)
    # Tests only (app.py ServerConfig.sweep_every): how often the cluster sweep adopts a gone replica's work.
    serve.add_argument("--test-sweep-every", type=float, default=0.0, help=argparse.SUPPRESS)
    serve.add_argument(
        "--replica-ttl",
        type=float,
        default=15.0,
        help="seconds after its last heartbeat (written every third of this) that a replica counts as gone: "
        "with --bus the others then fire its due timers, adopt its engagements and free its slots; give every "
        "replica the same value (default 15)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds streams get on SIGTERM (GOAWAY sent, no new streams) before they are cut (default 5)",
    )
    serve.add_argument(
        "--max-connection-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send GOAWAY to connections older than this, so clients reconnect through the load balancer",
    )
    serve.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds a stream may go on after its connection's GOAWAY (default 30)",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS only, with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    limits = RateLimits()
    serve.add_argument("--device-rate", type=float, default=limits.device_rate, help="signals/s per device; 0: off")
    serve.add_argument("--device-burst", type=float, default=limits.device_burst, help="signals a device may burst")
    serve.add_argument("--app-rate", type=float, default=limits.app_rate, help="signals/s per app; 0: off")
    serve.add_argument("--app-burst", type=float, default=limits.app_burst, help="signals an app may burst (0: 1 s)")
    serve.add_argument(
        "--app-streams-rate", type=float, default=limits.app_streams_rate, help="new device streams/s per app; 0: off"
    )
    serve.add_argument("--app-streams-burst", type=float, default=limits.app_streams_burst)
    serve.add_argument("--peer-rate", type=float, default=limits.peer_rate, help="signals/s per client IP; 0: off")
    serve.add_argument("--peer-burst", type=float, default=limits.peer_burst)
    serve.add_argument(
        "--peer-streams-rate", type=float, default=limits.peer_streams_rate, help="new device streams/s per client IP"
    )
    serve.add_argument("--peer-streams-burst", type=float, default=limits.peer_streams_burst)
    serve.add_argument(
        "--peer-exempt",
        default=",".join(limits.peer_exempt),
        help="networks (CIDR, comma-separated) spared the per-client-IP budgets; default loopback; '' for none",
    )
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate", help="check scenario files; prints file:line: field: problem")
    validate.add_argument("paths", nargs="+", help="scenario folders or files")
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of scenario files")
    schema.add_argument("--output", "-o")
    schema.set_defaults(func=_schema)

    simulate = sub.add_parser(
        "simulate", help="replay a signal trace (JSON lines) and print which cues would fire, and why not"
    )
    simulate.add_argument("scenarios", help="folder of scenario files")
    simulate.add_argument("trace", help="trace file: one JSON object per line (see README)")
    simulate.add_argument("--json", action="store_true", help="one JSON object per outcome")
    simulate.add_argument(
        "--expect", metavar="FILE", help="compare with an expected output; exit 1 with a diff when different"
    )
    simulate.add_argument(
        "--why",
        action="store_true",
        help="also print, per line, the scenarios it concerned that did not qualify, and why",
    )
    simulate.set_defaults(func=_simulate)

    device = sub.add_parser(
        "device", help="play a trace file against a running server through the SDK; print what comes back"
    )
    device.add_argument("address", help="host:port of a running cuepoint serve")
    device.add_argument("trace", help="trace file, as for simulate (scenarios/traces/*.jsonl)")
    device.add_argument(
        "--speed", type=float, default=1.0, help="play N times faster than the trace's times; 0: no waiting"
    )
    device.add_argument("--linger", type=float, default=1.0, help="seconds to keep listening after the last line")
    device.add_argument("--api-key", default="", help="the app's API key when auth is on (or $CUEPOINT_API_KEY)")
    device.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this certificate")
    device.set_defaults(func=_device)

    explain = sub.add_parser(
        "explain", help="ask a running server why (not): each scenario's conditions for one device, and its decisions"
    )
    explain.add_argument("device_id")
    explain.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    explain.add_argument("--token", default="", help="admin token, when the server runs with --auth")
    explain.add_argument("--limit", type=int, default=20, help="recent decisions to show (default 20)")
    explain.set_defaults(func=_explain)

    report = sub.add_parser("report", help="funnel per scenario, read from a server's SQLite database")
    report.add_argument("--db", default="cuepoint.db", help="SQLite database path (opened read-only)")
    report.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    report.add_argument("--since", default="7d", help="how far back: a duration (7d, 12h, 30m) or 'all'")
    report.add_argument("--until", default=None, help="end this long ago (a duration); default: no end")
    report.add_argument("--scenario", default=None, help="one scenario id")
    report.add_argument("--by", default="", help="group by context keys, e.g. device.model,app.version")
    report.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    report.add_argument(
        "--handling",
        action="store_true",
        help="handling times per queue and associate (engagements ended in the period) instead of the funnel",
    )
    report.set_defaults(func=_report)

    model = sub.add_parser("model", help="predictive scores' models (outcomes: in the scenario files)")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_report = model_sub.add_parser(
        "report", help="per outcome: labelled sessions, base rate, AUC, calibration per decile, top features"
    )
    model_report.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    model_report.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    model_report.add_argument("--top", type=int, default=10, help="features to list per outcome (default 10)")
    model_report.add_argument("--json", action="store_true", help="one JSON document instead of text")
    model_report.set_defaults(func=_model_report)

    forget = sub.add_parser(
        "forget-device", help="forget a device's credential (lost device secret): its next Hello is a new install"
    )
    forget.add_argument("device_id")
    forget.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    forget.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    forget.set_defaults(func=_forget_device)

    audit = sub.add_parser("audit", help="the admin audit trail, newest first, read from a server's database")
    audit.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    audit.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    audit.add_argument("--actor", default="", help="only this actor, e.g. admin:ops")
    audit.add_argument("--action", default="", help="only this action, e.g. EraseUser or scenarios.reload")
    audit.add_argument("--limit", type=int, default=100, help="at most this many entries")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=_audit)

    replicas = sub.add_parser(
        "replicas", help="the replicas sharing a database and the scenario version each serves (exit 1: they differ)"
    )
    replicas.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    replicas.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    replicas.add_argument("--json", action="store_true", help="one JSON object per line")
    replicas.add_argument(
        "--replica-ttl",
        type=float,
        default=15.0,
        help="seconds after its last heartbeat that a replica counts as gone: the --replica-ttl the replicas "
        "were started with (default 15)",
    )
    replicas.set_defaults(func=_replicas)

    demo = sub.add_parser("demo", help="end-to-end demo: server, simulated phone and associate")
    demo.add_argument("--scenarios", default="scenarios")
    demo.add_argument("--db", default=None, help="database path (default: a temporary file)")
    demo.add_argument("--database", default="", metavar="URL", help=_PG_HELP)
    demo.add_argument("--http-port", type=int, default=0, help="port of the desk and console (default: a free one)")
    demo.add_argument(
        "--keep-running", action="store_true", help="after the story, leave the server up for the desk and console"
    )
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
