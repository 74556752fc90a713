"""`cuepoint` command line: serve, validate, schema, demo."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from .app import CuepointServer, ServerConfig
    from .logs import configure_logging
    from .scenarios.loader import ScenarioError

    configure_logging(args.log_level, json=args.log_json)

    async def run() -> int:
        config = ServerConfig(host=args.host, port=args.port, db=args.db, scenarios=args.scenarios)
        try:
            server = await CuepointServer.start(config)
        except ScenarioError as exc:
            print(f"cannot start: scenario files have {len(exc.issues)} problem(s):\n{exc}", file=sys.stderr)
            return 2
        print(f"cuepoint listening on {server.address}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()
        return 0

    return asyncio.run(run())


def _validate(args: argparse.Namespace) -> int:
    from .scenarios.loader import ScenarioError, load_directory, load_file

    total = 0
    problems = 0
    for target in args.paths:
        path = Path(target)
        try:
            loaded = load_directory(path) if path.is_dir() else load_file(path)
            total += len(loaded)
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


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(args.scenarios, args.db))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cuepoint", description="Proactive in-app engagement server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--scenarios", default="scenarios", help="folder of scenario files")
    serve.add_argument("--db", default="cuepoint.db", help="SQLite database path")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate", help="check scenario files; prints file:line: field: problem")
    validate.add_argument("paths", nargs="+", help="scenario folders or files")
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of scenario files")
    schema.add_argument("--output", "-o")
    schema.set_defaults(func=_schema)

    demo = sub.add_parser("demo", help="end-to-end demo: server, simulated phone and associate")
    demo.add_argument("--scenarios", default="scenarios")
    demo.add_argument("--db", default=None, help="database path (default: a temporary file)")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
