"""The baseline: a bare grpc.aio bidi echo with Cuepoint's message shapes, and its throughput.

The server speaks ``/benchecho.v1.Echo/Connect`` (a generic handler, so nothing of Cuepoint runs):
it reads ``cuepoint.v1.DeviceMessage`` and answers a Hello with a ``Welcome`` and each ``SignalBatch``
(or columnar ``SignalColumns``) with a ``SignalAck`` listing the batch's signal ids; cue responses get
no answer. That is the least any
server must do with these messages (parse, build the ack, serialize), so it is the ceiling the real
server is compared to, measured on the same machine in the same run.

Run the throughput benchmark (server in a subprocess, load generator in this process):

    .venv/bin/python bench/echo_server.py [--streams 1,50] [--batch 1,100] [--seconds 4] [--json]

Run only the server (prints ``echo listening on HOST:PORT``):

    .venv/bin/python bench/echo_server.py serve [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from _common import (
    CLIENT_CPU,
    ECHO_METHOD,
    THROUGHPUT_HEADERS,
    Metric,
    Throughput,
    check_quiet,
    echo_server,
    note,
    pin_self,
    raw_throughput,
    report,
    serve_until_signalled,
    temp_dir,
)
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import device_pb2

SERVICE = "benchecho.v1.Echo"
MAX_SIGNALS_PER_BATCH = 500


async def _connect(
    requests: AsyncIterator[device_pb2.DeviceMessage], context: grpc.aio.ServicerContext[object, object]
) -> AsyncIterator[device_pb2.ServerMessage]:
    async for message in requests:
        kind = message.WhichOneof("kind")
        if kind == "signals":
            batch = message.signals
            yield device_pb2.ServerMessage(
                ack=device_pb2.SignalAck(batch_id=batch.batch_id, signal_ids=[s.id for s in batch.signals])
            )
        elif kind == "signal_columns":
            columns = message.signal_columns
            yield device_pb2.ServerMessage(
                ack=device_pb2.SignalAck(
                    batch_id=columns.batch_id, signal_ids=columns.ids.split(" ") if columns.ids else []
                )
            )
        elif kind == "hello":
            now = Timestamp()
            now.GetCurrentTime()
            yield device_pb2.ServerMessage(
                welcome=device_pb2.Welcome(
                    session_id=f"echo-{message.hello.device_id}",
                    server_time=now,
                    max_signals_per_batch=MAX_SIGNALS_PER_BATCH,
                )
            )


def build_server(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ]
    )
    handler = grpc.stream_stream_rpc_method_handler(
        _connect,
        request_deserializer=device_pb2.DeviceMessage.FromString,
        response_serializer=device_pb2.ServerMessage.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, bound


async def serve(host: str, port: int) -> None:
    server, bound = build_server(host, port)
    await serve_until_signalled(server, f"echo listening on {host}:{bound}")


async def echo_throughput(
    *,
    streams: int,
    batch: int,
    window: int,
    seconds: float,
    warmup: float,
    log_dir: Path,
    label: str | None = None,
    streams_per_channel: int = 1,
    shape: str = "rows",
    loop: str = "asyncio",
) -> Throughput:
    """Start an echo server subprocess (on ``loop``), measure it with the raw load, stop it."""
    server = await echo_server(log_dir=log_dir, loop=loop).start()
    try:
        return await raw_throughput(
            server.address,
            ECHO_METHOD,
            label=label or f"bare echo, {batch}/msg",
            streams=streams,
            batch=batch,
            window=window,
            seconds=seconds,
            warmup=warmup,
            server_pid=server.pid,
            streams_per_channel=streams_per_channel,
            prefix="echo",
            shape=shape,
        )
    finally:
        await server.stop()


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


async def bench(args: argparse.Namespace) -> None:
    results: list[Throughput] = []
    with temp_dir("echo") as tmp:
        for streams in _ints(args.streams):
            for batch in _ints(args.batch):
                note(f"echo: {streams} stream(s), {batch} signal(s)/message ...")
                results.append(
                    await echo_throughput(
                        streams=streams,
                        batch=batch,
                        window=args.window,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        log_dir=Path(tmp),
                        label=f"bare echo, {streams} stream(s), {batch}/msg",
                    )
                )
    best = max(results, key=lambda r: r.signals_per_s)
    msg_best = max(results, key=lambda r: r.messages_per_s)
    metrics = [
        Metric(f"echo ceiling, {r.streams} streams x {r.batch}/msg", r.signals_per_s, "signals/s") for r in results
    ]
    summary = (
        f"bare grpc.aio echo ceiling: {best.signals_per_s:,.0f} signals/s "
        f"({best.streams} streams, {best.batch}/msg); {msg_best.messages_per_s:,.0f} msgs/s "
        f"({msg_best.streams} streams, {msg_best.batch}/msg)"
    )
    report(
        "echo_server",
        as_json=args.json,
        sections=[
            (
                f"bare echo throughput, {args.window} message(s) in flight per stream, {args.seconds:g} s",
                THROUGHPUT_HEADERS,
                [r.row() for r in results],
            )
        ],
        metrics=metrics,
        summary=summary,
        details={"runs": [vars(r) for r in results], "window": args.window},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve_cmd = sub.add_parser("serve", help="run only the echo server")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=0)
    serve_cmd.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's event loop")
    parser.add_argument("--streams", default="1,50", help="comma-separated stream counts (default 1,50)")
    parser.add_argument("--batch", default="1,100", help="comma-separated signals per message (default 1,100)")
    parser.add_argument("--window", type=int, default=4, help="messages in flight per stream (default 4)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("loopback addresses only")
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port))
        else:
            asyncio.run(serve(args.host, args.port))
        return 0
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 0.5)
    pin_self(CLIENT_CPU)
    check_quiet()
    started = time.perf_counter()
    asyncio.run(bench(args))
    note(f"echo_server: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
