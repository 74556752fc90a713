"""`cuepoint serve --event-loop uvloop`: the real server process on uvloop stores and acks as on asyncio's loop.

The option exists for CPU per message (README "Performance", issue 13); the rest of the suite runs the
server on asyncio's own loop, so this checks the served path on uvloop end to end: the SDK's unbatched
and batched sends are acked only once stored, the store holds each signal once, and the process ends
cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

import cuepoint

pytest.importorskip("uvloop")

SCENARIO = """
id: taps
trigger: {event: tap, count: {at_least: 3, within: 10m}}
cue: {message: "Three taps", channel: chat, ttl: 10m}
cooldown: 1h
"""


def _mapped(pid: int) -> str | None:
    """The shared objects a process has loaded (Linux /proc), or None elsewhere."""
    maps = Path(f"/proc/{pid}/maps")
    return maps.read_text() if maps.exists() else None


async def test_serve_on_uvloop_acks_what_it_stored(tmp_path: Path) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "taps.yaml").write_text(SCENARIO)
    db = tmp_path / "uv.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cuepoint_server.cli", "serve", "--scenarios", str(folder), "--db", str(db),
        "--port", "0", "--no-watch", "--log-json", "--event-loop", "uvloop",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr
    said: list[str] = []  # everything the server writes, kept to explain a failure
    step = "starting"

    async def drain() -> None:
        # Read to the end, so the server can never block on a full pipe, whatever it logs.
        while line := (await stderr.readline()).decode():
            said.append(line)

    reader: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await stderr.readline()).decode()
                assert line, "serve exited before listening"
                said.append(line)
                if "cuepoint listening on" in line:
                    address = line.rsplit(" ", 1)[1].strip()
                    break
        reader = asyncio.create_task(drain())
        # Linux: the loop really is uvloop's, not a silently ignored flag.
        maps = await asyncio.to_thread(_mapped, proc.pid)
        if maps is not None:
            assert "uvloop" in maps

        # One signal per message (the unbatched path), then one batch of 500. Each step bounded on its own
        # (well inside the suite's 120 s per test), so a stall names the step and shows the server's log.
        single = cuepoint.ClientConfig(max_batch=1, linger=0.0)
        step = "connecting uv-one"
        client = await asyncio.wait_for(
            cuepoint.connect(address, app_id="fitkit", device_id="uv-one", config=single), 20
        )
        step = "tracking 40 taps"
        one = [await client.track("tap", n=i) for i in range(40)]
        step = "flushing uv-one"
        await client.flush(timeout=20)
        step = "waiting for the cue"
        cue = await client.next_cue(timeout=10)
        step = "closing uv-one"
        await asyncio.wait_for(client.close(), 10)
        step = "connecting uv-many"
        batched = await asyncio.wait_for(cuepoint.connect(address, app_id="fitkit", device_id="uv-many"), 20)
        many = [await batched.track("scroll", n=i) for i in range(500)]
        step = "flushing uv-many"
        await batched.flush(timeout=20)
        step = "closing uv-many"
        await asyncio.wait_for(batched.close(), 10)
        step = "stopping"
    except BaseException as exc:
        exc.add_note(f"stalled or failed while {step}; the server said:\n{''.join(said[-40:])}")
        raise
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
        if reader is not None:
            await reader
    assert proc.returncode == 0, "".join(said[-40:])

    store = sqlite3.connect(db)
    for device, tracked in (("uv-one", one), ("uv-many", many)):
        stored = [r[0] for r in store.execute("SELECT signal_id FROM signals WHERE device_id = ?", (device,))]
        assert len(stored) == len(set(stored)) == len(tracked)
        assert set(stored) == set(tracked)
    assert [r[0] for r in store.execute("SELECT cue_id FROM cues WHERE device_id = 'uv-one'")] == [cue.cue_id]
