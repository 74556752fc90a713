"""prototype_server.py's cue round over two processes: a gRPC front and a core, joined by a Unix socket.

    .venv/bin/python bench/bench_latency.py --quick --split-work 0,320

Issue 13's latency target (p99 signal-to-cue under 10 ms at 1,000 cues/s) is a question of how busy the one
event loop that serves the streams is: ``bench_latency.py --prototype-work`` adds CPU to the prototype's cue
round on its loop and finds the p99 over 10 ms once that loop spends more than about half a millisecond per
round, which Cuepoint's does (gRPC's share and its own work together). This asks whether the other design
would meet it: the streams on one process (the front: gRPC reads and writes, a frame to the core and back),
the work on another (the core: the prototype's cue round, validated, deduped, counted, the trigger and the cue
committed together to SQLite, the decline stored, plus ``--work-us`` of CPU per round in the interpreter,
half at the trigger and half at the answer, standing in for Cuepoint's evaluation).

The front answers the Hello itself and tells the core which device the stream is; a signal batch goes to the
core and the stream waits for its answer (the cue with its ack, or the ack); a cue response goes to the core
and nothing comes back. Frames: ``!IIB`` (payload length, stream number, kind) then the payload; answers
``!II`` then the ServerMessage's bytes. ``serve`` runs the front, which starts the core (``core``) itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from _common import SERVER_CPU, ServerProcess, serve_until_signalled
from prototype_server import Device, Invalid, Writer, store_answer, store_rows, validate_rows, welcome

from cuepoint.v1 import device_pb2

SERVICE = "benchsplit.v1.Split"
SPLIT_METHOD = f"/{SERVICE}/Connect"

_TO_CORE = struct.Struct("!IIB")
_TO_FRONT = struct.Struct("!II")
HELLO, SIGNALS, RESPONSE, CLOSED = 1, 2, 3, 4


# --- the front: streams ---------------------------------------------------------------------------------------


class CoreLink:
    """The front's end of the socket: frames out, answers routed back to the stream waiting for them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._task = asyncio.get_running_loop().create_task(self._read())

    def send(self, stream: int, kind: int, payload: bytes) -> None:
        self._writer.write(_TO_CORE.pack(len(payload), stream, kind) + payload)

    async def ask(self, stream: int, payload: bytes) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[stream] = future
        self.send(stream, SIGNALS, payload)
        return await future

    async def _read(self) -> None:
        while True:
            head = await self._reader.readexactly(_TO_FRONT.size)
            size, stream = _TO_FRONT.unpack(head)
            answer = await self._reader.readexactly(size)
            future = self._waiting.pop(stream, None)
            if future is not None and not future.done():
                future.set_result(answer)


async def front(host: str, port: int, work_us: float) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    core = await asyncio.create_subprocess_exec(
        *(sys.executable, str(Path(__file__)), "core", "--fd", str(theirs.fileno()), "--work-us", f"{work_us:g}"),
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    link = CoreLink(reader, writer)
    numbers = itertools.count(1)

    async def connect(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        stream = next(numbers)
        try:
            async for raw in requests:
                message = device_pb2.DeviceMessage.FromString(raw)
                kind = message.WhichOneof("kind")
                if kind == "signals":
                    yield await link.ask(stream, raw)
                elif kind == "cue_response":
                    link.send(stream, RESPONSE, raw)
                elif kind == "hello":
                    link.send(stream, HELLO, message.hello.device_id.encode())
                    yield welcome(f"split-{stream}")
        finally:
            link.send(stream, CLOSED, b"")

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(connect)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    try:
        await serve_until_signalled(server, f"split prototype listening on {host}:{bound}")
    finally:
        writer.close()
        async with asyncio.timeout(10):
            await core.wait()


# --- the core: the cue round's work ---------------------------------------------------------------------------


async def core(fd: int, work: float) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    devices: dict[int, tuple[str, Device]] = {}
    tasks: set[asyncio.Task[None]] = set()
    with tempfile.TemporaryDirectory(prefix="split-") as tmp:
        store = Writer(str(Path(tmp) / "split.db"))

        def answer(stream: int, message: device_pb2.ServerMessage) -> None:
            payload = message.SerializeToString()
            writer.write(_TO_FRONT.pack(len(payload), stream) + payload)

        async def signals(stream: int, raw: bytes) -> None:
            device_id, device = devices[stream]
            now = time.time()
            batch = device_pb2.DeviceMessage.FromString(raw).signals
            try:
                ids, times, names = validate_rows(batch, len(raw), now)
            except Invalid:
                # The benchmark's load never sends one; the one-process prototype ends the stream instead.
                ids, times, names = [], [], []
            device.charge(len(ids), now)
            duplicates = device.ids.remember_all(ids)
            ack = device_pb2.SignalAck(batch_id=batch.batch_id, signal_ids=ids, duplicate_ids=duplicates)
            if not ids:
                answer(stream, device_pb2.ServerMessage(ack=ack))
                return
            latest = max(times)
            device.count(Counter(names).items(), latest)
            row = (device_id, min(times), latest, len(ids), min(ids), max(ids), raw)
            answer(stream, await store_rows(store, device, device_id, row, names, ack, now, work))

        async def response(stream: int, raw: bytes) -> None:
            _, device = devices[stream]
            await store_answer(store, device, device_pb2.DeviceMessage.FromString(raw).cue_response, work)

        loop = asyncio.get_running_loop()
        while True:
            try:
                head = await reader.readexactly(_TO_CORE.size)
            except asyncio.IncompleteReadError:
                return
            size, stream, kind = _TO_CORE.unpack(head)
            payload = await reader.readexactly(size) if size else b""
            if kind == HELLO:
                devices[stream] = (payload.decode(), Device(time.time()))
            elif kind == CLOSED:
                devices.pop(stream, None)
            elif stream in devices:
                task = loop.create_task(signals(stream, payload) if kind == SIGNALS else response(stream, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


def split_server(log_dir: Path, work_us: float = 0.0) -> ServerProcess:
    argv = [sys.executable, str(Path(__file__)), "serve", "--work-us", f"{work_us:g}"]
    return ServerProcess(argv, name="split", cpu=SERVER_CPU, log_dir=log_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the front (it starts the core)")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=0)
    serve_cmd.add_argument("--work-us", type=float, default=0.0, help="CPU spent by the core per cue round (us)")
    core_cmd = sub.add_parser("core", help="the core process (started by serve)")
    core_cmd.add_argument("--fd", type=int, required=True)
    core_cmd.add_argument("--work-us", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(front(args.host, args.port, args.work_us))
    else:
        asyncio.run(core(args.fd, args.work_us / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
