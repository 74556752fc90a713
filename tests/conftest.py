"""Shared fixtures: a real Cuepoint server on port 0 with a hand-driven clock, on SQLite and on PostgreSQL.

Every test that starts its server with `start_server` runs once per storage backend ([sqlite], [postgres]).
PostgreSQL is the local server at 127.0.0.1:5432 (trust auth); each test run gets a fresh database
(cuepoint_test_<random>, dropped at the end) and each server database in it a schema of its own. When
PostgreSQL does not answer, the [postgres] tests are skipped with one line saying why, unless
CUEPOINT_REQUIRE_SERVICES=1 (CI) makes that a failure. CUEPOINT_TEST_BACKENDS=sqlite runs one backend only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import cuepoint
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.storage import PostgresStore, SqliteStore

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "scenarios"

StartServer = Callable[..., Awaitable[CuepointServer]]

PG_HOST, PG_PORT = "127.0.0.1", 5432
BACKENDS = tuple(b for b in os.environ.get("CUEPOINT_TEST_BACKENDS", "sqlite,postgres").split(",") if b)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


def _needs_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    on_postgres = callspec is not None and callspec.params.get("backend") == "postgres"
    return on_postgres or "pg_database" in getattr(item, "fixturenames", ())


_NO_POSTGRES = pytest.StashKey[tuple[int, str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without PostgreSQL, its tests are left out and one line says so (the summary); under
    CUEPOINT_REQUIRE_SERVICES=1 they stay and fail."""
    if os.environ.get("CUEPOINT_REQUIRE_SERVICES") == "1" or not any(_needs_postgres(i) for i in items):
        return

    async def probe() -> None:
        await (await _pg_admin()).close()

    try:
        asyncio.run(probe())
    except (ConnectionError, OSError) as exc:
        left_out = [i for i in items if _needs_postgres(i)]
        items[:] = [i for i in items if not _needs_postgres(i)]
        config.hook.pytest_deselected(items=left_out)
        config.stash[_NO_POSTGRES] = (len(left_out), str(exc))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _NO_POSTGRES in config.stash:
        count, why = config.stash[_NO_POSTGRES]
        terminalreporter.write_line(
            f"SKIPPED {count} PostgreSQL tests: PostgreSQL at {PG_HOST}:{PG_PORT} did not answer ({why}); "
            "CUEPOINT_REQUIRE_SERVICES=1 makes that a failure",
            yellow=True,
        )


async def _pg_admin() -> asyncpg.Connection:
    errors = []
    for user in ("postgres", "root"):
        try:
            return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="postgres", timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            errors.append(f"{user}: {exc}")
    raise ConnectionError("; ".join(errors))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database for this test run, dropped at the end."""
    name = f"cuepoint_test_{secrets.token_hex(4)}"

    async def create() -> str:
        admin = await _pg_admin()
        try:
            await admin.execute(f"CREATE DATABASE {name}")
            user = await admin.fetchval("SELECT current_user")
        finally:
            await admin.close()
        return f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"

    try:
        url = asyncio.run(create())
    except (ConnectionError, OSError, asyncpg.PostgresError) as exc:
        why = f"PostgreSQL at {PG_HOST}:{PG_PORT} did not answer ({exc}): [postgres] tests skipped"
        if os.environ.get("CUEPOINT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{why}, but CUEPOINT_REQUIRE_SERVICES=1 requires them", pytrace=False)
        pytest.skip(why)
    yield url

    async def drop() -> None:
        admin = await _pg_admin()
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()

    asyncio.run(drop())


def pg_url_for(database: str, key: str) -> str:
    """A store of its own in the run's database: one schema per key (e.g. a server's database file path)."""
    return f"{database}?search_path=s_{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def db_option(server: CuepointServer) -> list[str]:
    """The command-line option naming the server's database, for `cuepoint report`, `audit`, ...: --db or --database."""
    return ["--database", server.config.database] if server.config.database else ["--db", server.config.db]


OpenStore = Callable[[Path], Awaitable[Any]]


@pytest.fixture
def open_store_at(backend: str, request: pytest.FixtureRequest) -> OpenStore:
    """Opens the store `start_server(db=path)` would use for `path`, on the test's backend."""
    pg = str(request.getfixturevalue("pg_database")) if backend == "postgres" else ""

    async def open_(path: Path) -> Any:
        if pg:
            return await PostgresStore.open(pg_url_for(pg, str(path)))
        return await SqliteStore.open(path)

    return open_


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "postgres":
        request.getfixturevalue("pg_database")
    return name


@pytest.fixture
async def store(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A store on the test's backend (SqliteStore; PostgresStore: a fresh schema per test), for the store tests
    (test_storage.py and the others parametrised over `backend`)."""
    s: Any
    if backend == "postgres":
        s = await PostgresStore.open(pg_url_for(request.getfixturevalue("pg_database"), str(tmp_path)))
    else:
        s = await SqliteStore.open(str(tmp_path / "cuepoint.db"))
    yield s
    await s.close()


@pytest.fixture
def clock() -> ManualClock:
    # Start at real time so SDK timestamps (device clock) look plausible.
    return ManualClock(start=time.time())


@pytest.fixture
async def start_server(
    tmp_path: Path, clock: ManualClock, backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[StartServer]:
    servers: list[CuepointServer] = []
    pg = str(request.getfixturevalue("pg_database")) if backend == "postgres" else ""

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
        path = str(db or tmp_path / f"cuepoint-{len(servers)}.db")
        # On PostgreSQL the same path names the same schema: a restart with db=path finds its data again.
        database = pg_url_for(pg, path) if pg else ""
        config = ServerConfig(port=0, db=path, database=database, scenarios=str(folder), **options)
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
