"""Shared fixtures: a real Cuepoint server on port 0 with a hand-driven clock."""

from __future__ import annotations

import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "scenarios"

StartServer = Callable[..., Awaitable[CuepointServer]]


@pytest.fixture
def clock() -> ManualClock:
    # Start at real time so SDK timestamps (device clock) look plausible.
    return ManualClock(start=time.time())


@pytest.fixture
async def start_server(tmp_path: Path, clock: ManualClock) -> AsyncIterator[StartServer]:
    servers: list[CuepointServer] = []

    async def start(
        *scenario_texts: str, scenarios: Path | None = None, db: Path | None = None, **options: Any
    ) -> CuepointServer:
        """`options` are further ServerConfig fields (auth, tls_cert, rate_limits, ...)."""
        folder = scenarios
        if folder is None:
            folder = tmp_path / f"scenarios-{len(servers)}"
            folder.mkdir()
            for i, text in enumerate(scenario_texts):
                (folder / f"s{i}.yaml").write_text(textwrap.dedent(text))
        config = ServerConfig(
            port=0, db=str(db or tmp_path / f"cuepoint-{len(servers)}.db"), scenarios=str(folder), **options
        )
        server = await CuepointServer.start(config, clock=clock)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0.5)


async def phone(
    server: CuepointServer,
    device_id: str = "phone-1",
    *,
    tier: str = "premium",
    user_id: str = "user-1",
    consent: cuepoint.Consent = cuepoint.Consent.FULL,
    app_id: str = "fitkit",
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id=app_id,
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS", os_version="17.4", device_model="iPhone15,2"),
        user=cuepoint.User(user_id=user_id, tier=tier, attributes={"first_name": "Sam"}),
        consent=consent,
    )


async def no_cue(client: cuepoint.Client) -> bool:
    """True when no cue is waiting.

    The server evaluates a batch before it acks it, so once flush() returned
    any cue that batch caused is already in the client's inbox.
    """
    try:
        await client.next_cue(timeout=0.1)
    except cuepoint.TimedOut:
        return True
    return False
