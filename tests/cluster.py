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
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

NATS_URL = "nats://127.0.0.1:4222"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_answers(host: str = "127.0.0.1", port: int = 4222) -> str:
    """"" when NATS answers its INFO line at host:port, else why not."""
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
