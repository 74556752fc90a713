"""Two (or more) real `cuepoint serve` replicas on loopback, sharing one database and the local NATS.

Used by tests/test_e2e_cluster.py. Each run gets its own NATS subject prefix, so runs on one NATS never hear
each other; the database is the run's fresh PostgreSQL database (a schema per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

NATS_URL = "nats://127.0.0.1:4222"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_answers(host: str = "127.0.0.1", port: int = 4222) -> str:
    """ "" when NATS answers its INFO line at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            if not s.recv(4096).startswith(b"INFO"):
                return f"{host}:{port} answered, but not as NATS"
    except OSError as exc:
        return f"NATS at {host}:{port} did not answer ({exc})"
    return ""


class Replica:
    """One `cuepoint serve` process; start / SIGTERM (drain) / SIGKILL."""

    def __init__(self, name: str, scenarios: Path, database: str, prefix: str, log: Path, *extra: str) -> None:
        self.name = name
        self.database = database
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        self.args = [
            sys.executable, "-m", "cuepoint_server.cli", "serve", "--scenarios", str(scenarios),
            *(["--database", database] if "://" in database else ["--db", database]), "--bus", NATS_URL, "--bus-prefix", prefix,
            "--port", str(self.port), "--no-watch", "--log-level", "info", "--log-json", "--grace", "2", *extra,
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(*self.args, stdout=out, stderr=subprocess.STDOUT)
        try:
            await self._serving()
        except BaseException:
            # Not yet in the fixture's list, so nothing else would stop it: never leave a replica behind.
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            raise

    async def _serving(self) -> None:
        assert self.process is not None
        async with asyncio.timeout(30), grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)

    def reload(self) -> None:
        """SIGHUP: load the scenarios folder again now (the replicas run with --no-watch)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    async def drain(self) -> int:
        """SIGTERM: stop taking streams, GOAWAY, give streams their grace, flush; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def run_prefix() -> str:
    return f"cuepoint-test-{secrets.token_hex(4)}"


class Balancer:
    """A TCP proxy in front of the replicas (a load balancer, to the SDK): `to(replica)` sends new connections
    there and drops the open ones, so a client's reconnect lands on that replica."""

    def __init__(self, replica: Replica) -> None:
        self.upstream = replica.port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def to(self, replica: Replica) -> None:
        self.upstream = replica.port
        for writer in list(self._writers):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: tuple[asyncio.StreamWriter, ...]
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        for writer in pair:
            writer.close()
            self._writers.discard(writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def balancer(replica: Replica) -> AsyncIterator[Balancer]:
    proxy = await Balancer(replica).start()
    try:
        yield proxy
    finally:
        await proxy.close()
