"""Hot reload: scenario file edits reach live sessions without a restart.

Real server (watching its folder with watchfiles), real SDK over gRPC. The
only timing is a generous timeout on "the reload happened".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.scenarios.reloader import ScenarioReloader, folder_digest

from .conftest import StartServer, no_cue, phone

SYNC_FAILURE = """
id: sync-failure
priority: 100
target: {attribute: user.tier, equals: premium}
trigger:
  event: sync_failed
  count: {at_least: 3, within: 10m}
cue: {message: "Unable to sync? I can help you.", channel: audio}
cooldown: 30m
"""
CRASHES = """
id: crashes
trigger: {event: app_crashed, count: {at_least: 2, within: 15m}}
cue: {message: "Crashing?", channel: chat}
"""


def write(folder: Path, name: str, text: str) -> None:
    # Write then rename, as editors and deploy tools do: the watcher never
    # sees a half-written file.
    tmp = folder / f".{name}.tmp"
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, folder / name)


def reloader_of(server: CuepointServer) -> ScenarioReloader:
    assert server.reloader is not None
    return server.reloader


async def until(reloader: ScenarioReloader, predicate: Callable[[ScenarioReloader], bool]) -> None:
    # Generous: the watcher reloads 50 ms after the folder goes quiet.
    async with asyncio.timeout(5):
        await reloader.wait_until(predicate)


async def reloaded_to(server: CuepointServer, version: int) -> None:
    reloader = reloader_of(server)
    await until(reloader, lambda r: r.version.number >= version)
    assert reloader.version.number == version


async def fail_sync(client: cuepoint.Client, times: int = 3) -> None:
    for _ in range(times):
        await client.track("sync_failed", reason="timeout")
    await client.flush()


async def test_scenario_added_while_connected_fires(start_server: StartServer, tmp_path: Path) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    write(folder, "crashes.yaml", CRASHES)
    server = await start_server(scenarios=folder)
    reloader = reloader_of(server)
    assert reloader.watching and reloader.version.number == 1 and reloader.version.scenarios == 1
    client = await phone(server)
    await fail_sync(client)
    assert await no_cue(client)

    write(folder, "sync.yaml", SYNC_FAILURE)
    await reloaded_to(server, 2)
    assert reloader.version.scenarios == 2
    assert reloader.version.digest == folder_digest(folder)
    # The same session, never reconnected, now gets the new scenario's cue.
    await fail_sync(client)
    cue = await client.next_cue(timeout=5)
    assert (cue.scenario_id, cue.message) == ("sync-failure", "Unable to sync? I can help you.")
    await client.close()


async def test_new_scenario_sees_only_history_the_old_set_kept(start_server: StartServer, tmp_path: Path) -> None:
    # Before the swap nothing listened to sync_failed, so only its latest
    # occurrence was kept; the 10-minute window fills up from the swap on.
    folder = tmp_path / "retention"
    folder.mkdir()
    write(folder, "crashes.yaml", CRASHES)
    server = await start_server(scenarios=folder)
    client = await phone(server)
    await fail_sync(client, 2)
    write(folder, "sync.yaml", SYNC_FAILURE)
    await reloaded_to(server, 2)
    await fail_sync(client, 1)  # two in memory (the latest old one and this)
    assert await no_cue(client)
    await fail_sync(client, 1)
    assert (await client.next_cue(timeout=5)).scenario_id == "sync-failure"
    await client.close()


async def test_disabling_and_removing_a_file_stop_it_firing(start_server: StartServer, tmp_path: Path) -> None:
    folder = tmp_path / "toggle"
    folder.mkdir()
    write(folder, "sync.yaml", SYNC_FAILURE)
    write(folder, "crashes.yaml", CRASHES)
    server = await start_server(scenarios=folder)
    reloader = reloader_of(server)

    write(folder, "sync.yaml", SYNC_FAILURE + "enabled: false\n")
    await reloaded_to(server, 2)
    assert (reloader.version.scenarios, reloader.version.enabled) == (2, 1)
    first = await phone(server, "phone-a", user_id="user-a")
    await fail_sync(first)
    assert await no_cue(first)

    write(folder, "sync.yaml", SYNC_FAILURE)  # enabled again: fires (the negative was not vacuous)
    await reloaded_to(server, 3)
    await fail_sync(first, 1)
    assert (await first.next_cue(timeout=5)).scenario_id == "sync-failure"

    (folder / "sync.yaml").unlink()
    await reloaded_to(server, 4)
    assert reloader.version.scenarios == 1
    second = await phone(server, "phone-b", user_id="user-b")
    await fail_sync(second)
    assert await no_cue(second)
    await first.close()
    await second.close()


async def test_broken_edit_keeps_the_old_version_serving(start_server: StartServer, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    write(folder, "sync.yaml", SYNC_FAILURE)
    server = await start_server(scenarios=folder)
    reloader = reloader_of(server)
    good_digest = reloader.version.digest

    broken = SYNC_FAILURE.replace("within: 10m", "within: soon").replace("Unable to sync? I can help you.", "New text")
    write(folder, "sync.yaml", broken)
    await until(reloader, lambda r: r.last_error is not None)
    assert reloader.last_error is not None
    (issue,) = reloader.last_error.issues
    assert issue.file == str(folder / "sync.yaml")
    assert (issue.line, issue.field) == (7, "trigger.count.within")
    assert "'soon' is not a duration" in issue.message
    assert (reloader.version.number, reloader.version.digest) == (1, good_digest)

    # The old version still serves, to sessions old and new.
    client = await phone(server, "phone-a", user_id="user-a")
    await fail_sync(client)
    assert (await client.next_cue(timeout=5)).message == "Unable to sync? I can help you."

    before = server.core.engine.scenarios.by_id["sync-failure"].version
    write(folder, "sync.yaml", SYNC_FAILURE.replace("Unable to sync? I can help you.", "Fixed text"))
    await reloaded_to(server, 2)
    assert reloader.last_error is None
    # The scenario's own version (its file's content hash, shown in the console) follows the edit.
    after = server.core.engine.scenarios.by_id["sync-failure"].version
    assert len(after) == 12 and after != before
    other = await phone(server, "phone-b", user_id="user-b")
    await fail_sync(other)
    assert (await other.next_cue(timeout=5)).message == "Fixed text"
    await client.close()
    await other.close()


async def test_the_replicas_registry_shows_the_version_served(start_server: StartServer, tmp_path: Path) -> None:
    folder = tmp_path / "reported"
    folder.mkdir()
    write(folder, "sync.yaml", SYNC_FAILURE)
    server = await start_server(scenarios=folder)
    client = await phone(server, "phone-r", user_id="user-r")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        status = await stub.GetScenarios(admin_pb2.GetScenariosRequest())
        (me,) = status.replicas  # one process: the registry holds this server alone
        assert (me.this_replica, me.alive, me.draining, me.address) == (True, True, False, server.address)
        assert me.scenarios_version == folder_digest(folder)[:12] and not status.versions_differ
        # Live now alone asks no one: every session is this replica's.
        live = await stub.ListLiveSessions(admin_pb2.ListLiveSessionsRequest())
        assert [(s.device_id, s.replica_id) for s in live.sessions] == [("phone-r", me.replica_id)]
        assert list(live.unanswered_replicas) == []

        write(folder, "sync.yaml", SYNC_FAILURE.replace("Unable to sync?", "Still not syncing?"))
        await reloaded_to(server, 2)
        new = folder_digest(folder)[:12]
        async with asyncio.timeout(5):  # the registry row is rewritten just after the swap
            while True:
                (me,) = (await stub.GetScenarios(admin_pb2.GetScenariosRequest())).replicas
                if me.scenarios_version == new:
                    break
                await asyncio.sleep(0.05)
    await client.close()


async def test_reload_now_without_watching(tmp_path: Path, clock: ManualClock) -> None:
    folder = tmp_path / "manual"
    folder.mkdir()
    write(folder, "crashes.yaml", CRASHES)
    config = ServerConfig(port=0, db=str(tmp_path / "manual.db"), scenarios=str(folder), watch_scenarios=False)
    server = await CuepointServer.start(config, clock=clock)
    try:
        reloader = reloader_of(server)
        assert not reloader.watching
        assert (await reloader.reload_now()).status == "unchanged"

        write(folder, "sync.yaml", SYNC_FAILURE)
        await asyncio.sleep(0.3)  # nobody watches: nothing changes by itself
        assert reloader.version.number == 1
        result = await reloader.reload_now()
        assert (result.status, result.added, result.version.number) == ("applied", ("sync-failure",), 2)
        assert server.core.engine.scenarios.by_id.keys() == {"crashes", "sync-failure"}

        write(folder, "sync.yaml", SYNC_FAILURE.replace("channel: audio", "channel: fax"))
        rejected = await reloader.reload_now()
        assert rejected.status == "rejected" and rejected.version.number == 2
        assert [(i.line, i.field) for i in rejected.issues] == [(8, "cue.channel")]
        assert "sync-failure" in server.core.engine.scenarios.by_id

        (folder / "sync.yaml").unlink()
        removed = await reloader.reload_now()
        assert (removed.status, removed.removed, removed.version.number) == ("applied", ("sync-failure",), 3)
        assert reloader.last_error is None
    finally:
        await server.stop(0.5)


async def test_serve_reloads_on_sighup(tmp_path: Path) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    write(folder, "crashes.yaml", CRASHES)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuepoint_server.cli",
        "serve",
        "--scenarios",
        str(folder),
        "--db",
        str(tmp_path / "served.db"),
        "--port",
        "0",
        "--no-watch",
        "--log-json",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None

    async def line_with(text: str) -> str:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, f"serve exited before logging {text!r}"
                if text in line:
                    return line

    try:
        await line_with("cuepoint listening on")
        write(folder, "sync.yaml", SYNC_FAILURE)
        proc.send_signal(signal.SIGHUP)
        event = json.loads(await line_with('"scenarios.reloaded"'))
        assert (event["version"], event["added"], event["reason"]) == (2, ["sync-failure"], "SIGHUP")

        write(folder, "sync.yaml", SYNC_FAILURE.replace("within: 10m", "within: soon"))
        proc.send_signal(signal.SIGHUP)
        issue = json.loads(await line_with('"scenarios.reload_issue"'))
        assert (issue["line"], issue["field"]) == (7, "trigger.count.within")
        assert issue["file"].endswith("sync.yaml")
        assert json.loads(await line_with('"scenarios.reload_rejected"'))["serving_version"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
    assert proc.returncode == 0
