"""kill -9 under load: nothing acked is lost, nothing is counted twice, no cue is sent twice.

The server runs as a real process (`cuepoint serve`) on a file database; the
SDK reconnects by itself and resends what the server had not acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import cuepoint

SCENARIO = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
cooldown: 1h
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, folder: Path, db: Path, port: int, *, env: dict[str, str] | None = None) -> None:
        self.args = [
            sys.executable, "-m", "cuepoint_server.cli", "serve", "--scenarios", str(folder),
            "--db", str(db), "--port", str(port), "--no-watch", "--log-level", "warning",
        ]  # fmt: skip
        self.address = f"127.0.0.1:{port}"
        # Added to this process's environment for the server (GRPC_EXPERIMENTS, say).
        self.env = {**os.environ, **env} if env else None
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env
        )
        async with asyncio.timeout(20), grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    proc = ServerProcess(folder, tmp_path / "crash.db", free_port())
    yield proc
    await proc.stop()


async def test_kill_minus_nine_under_load(server_process: ServerProcess, tmp_path: Path) -> None:
    await server_process.start()
    config = cuepoint.ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.5)
    client = await cuepoint.connect(server_process.address, app_id="fitkit", device_id="crashy", config=config)
    cues: list[str] = []
    client.on_cue(lambda cue: cues.append(cue.cue_id))
    tracked: list[str] = []

    async def load() -> None:
        for i in range(3000):
            tracked.append(await client.track("tap", n=i))
            if i % 50 == 0:
                await asyncio.sleep(0)  # let batches go out while the server dies

    await client.track("sync_failed")
    await client.track("sync_failed")
    await client.flush(timeout=10)
    loader = asyncio.create_task(load())
    await asyncio.sleep(0.05)
    await server_process.kill()  # mid-load: some batches acked, some in flight, some queued
    await loader
    await server_process.start()  # same port, same database
    await client.track("sync_failed")
    await client.flush(timeout=30)
    cue = await client.next_cue(timeout=10)
    await client.close()
    await server_process.stop()

    db = sqlite3.connect(tmp_path / "crash.db")
    stored = [row[0] for row in db.execute("SELECT signal_id FROM signals WHERE device_id = 'crashy'")]
    # Every signal the app tracked is stored, each exactly once.
    assert len(stored) == len(set(stored)) == len(tracked) + 3
    assert set(tracked) <= set(stored)
    # The window saw three failures, not more: one cue, sent once.
    assert [r[0] for r in db.execute("SELECT cue_id FROM cues WHERE device_id = 'crashy'")] == [cue.cue_id]
    assert cues == [cue.cue_id]
