"""Issue 5, server side: restart recovery, dedupe across restarts, backpressure, drain, privacy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.clock import ManualClock
from cuepoint_server.core.sessions import OUTBOX_HIGH, PENDING_WRITES_HIGH

from .conftest import StartServer, no_cue, phone
from .test_e2e_foundation import RawDevice, _raw_signal

SYNC = """
id: sync-failure
trigger: {event: sync_failed, count: {at_least: 3, within: 10m}}
cue: {message: "Unable to sync?", channel: audio, ttl: 10m}
cooldown: 1h
"""


def folder_with(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "scenarios"
    folder.mkdir(exist_ok=True)
    (folder / "s.yaml").write_text(text)
    return folder


async def test_windows_dedupe_and_pending_cue_survive_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    folder, db = folder_with(tmp_path, SYNC), tmp_path / "durable.db"
    first = await start_server(scenarios=folder, db=db)
    raw = RawDevice(first.address, "phone-1")
    await raw.read()  # welcome
    raw.send(_raw_signal("s-1", "sync_failed"), _raw_signal("s-2", "sync_failed"), batch_id="b1")
    assert list((await raw.read()).ack.signal_ids) == ["s-1", "s-2"]
    await raw.close()
    await first.stop(1.0)

    second = await start_server(scenarios=folder, db=db)
    raw = RawDevice(second.address, "phone-1")
    await raw.read()
    # The SDK resends what it is unsure about: the server dedupes against storage.
    raw.send(_raw_signal("s-2", "sync_failed"), batch_id="resend")
    again = await raw.read()
    assert again.HasField("ack") and list(again.ack.duplicate_ids) == ["s-2"]
    # Two failures from before the restart are still in the window: the third fires.
    raw.send(_raw_signal("s-3", "sync_failed"), batch_id="b2")
    cue = (await raw.read()).cue
    assert cue.scenario_id == "sync-failure"
    assert (await raw.read()).HasField("ack")  # acked once stored
    assert await second.store.count_signals("phone-1") == 3
    await raw.close()
    await second.stop(1.0)

    # The offer is still on screen after another restart: the same cue comes back, never a new one.
    third = await start_server(scenarios=folder, db=db)
    client = await cuepoint.connect(third.address, app_id="fitkit", device_id="phone-1")
    restored = await client.next_cue(timeout=5)
    assert restored.cue_id == cue.cue_id
    await client.track("sync_failed")
    await client.flush()
    assert await no_cue(client)
    engagement = await client.accept(restored)
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    cues = await third.store.query("SELECT COUNT(*) FROM cues WHERE device_id = 'phone-1'")
    assert cues[0][0] == 1
    await client.close()


async def test_queued_engagement_waits_again_after_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    folder, db = (
        folder_with(tmp_path, SYNC.replace("count: {at_least: 3, within: 10m}", "count: {at_least: 1, within: 10m}")),
        tmp_path / "e.db",
    )
    first = await start_server(scenarios=folder, db=db)
    client = await phone(first)
    await client.track("sync_failed")
    await client.flush()
    engagement = await client.accept(await client.next_cue(timeout=5))
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    await client.close()
    await first.stop(1.0)

    second = await start_server(scenarios=folder, db=db)
    associate = await cuepoint.connect_associate(second.address, associate_id="dana")
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.engagement_id == engagement.engagement_id
    assert assigned.context.device_id == "phone-1" and assigned.context.trigger is not None
    await associate.close()


async def test_a_client_that_does_not_read_cannot_grow_server_memory(start_server: StartServer) -> None:
    server = await start_server(SYNC)
    flooder = RawDevice(server.address, "flooder")
    await flooder.read()
    for i in range(3000):  # never reads the acks
        flooder.send(_raw_signal(f"f-{i}", "tap"), batch_id=f"b{i}")
    well_behaved = await phone(server, "fine")
    for _ in range(30):
        await asyncio.sleep(0.05)
        session = next(s for s in server.core._reg.sessions.values() if s.device_id == "flooder")
        assert session.outbox.qsize() <= OUTBOX_HIGH + 1
        assert len(session.writes or ()) <= PENDING_WRITES_HIGH + 1
    # Others are served all the while.
    await well_behaved.track("sync_failed")
    await well_behaved.flush(timeout=5)
    await well_behaved.close()
    await flooder.close()


async def test_the_reader_waits_while_the_outbox_is_full() -> None:
    from cuepoint_server.core.model import Withdrawal
    from cuepoint_server.core.sessions import DeviceSession
    from cuepoint_server.engine.state import DeviceState

    session = DeviceSession("s", "app", "d", "device:d", "full", DeviceState("d", "app"), 0.0)
    for i in range(OUTBOX_HIGH):
        session.send(Withdrawal(f"c{i}", "test"))
    waiting = asyncio.ensure_future(session.wait_for_room())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # no room: the stream is not read
    session.outbox.get_nowait()  # the writer sent one
    session.notify_room()
    await asyncio.wait_for(waiting, 1)


async def test_graceful_shutdown_keeps_everything_acked(start_server: StartServer, tmp_path: Path) -> None:
    folder, db = folder_with(tmp_path, SYNC), tmp_path / "drain.db"
    server = await start_server(scenarios=folder, db=db)
    client = await phone(server)
    for i in range(500):
        await client.track("tap", n=i)
    await client.flush(timeout=10)
    await server.stop(2.0)
    reopened = await start_server(scenarios=folder, db=db)
    assert await reopened.store.count_signals("phone-1") == 500
    await client.close()


async def test_without_consent_nothing_outlives_the_session(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(SYNC)
    client = await phone(server, "private", consent=cuepoint.Consent.NONE)
    await client.track("sync_failed")
    await client.flush()
    assert await server.store.count_signals("private") == 1  # stored while the session lives
    session_id = client.session_id
    await client.close()
    await asyncio.sleep(0.2)
    # Kept while a dropped connection could still resume the session, then gone.
    assert await server.store.count_signals("private") == 1
    clock.advance(server.core.config.resume_window + 1)
    await server.core.drain()
    assert await server.store.count_signals("private") == 0
    stored = await server.store.get_session(session_id or "")
    assert stored is not None and stored.user_id == ""


async def test_export_and_erase_one_user(start_server: StartServer) -> None:
    server = await start_server(SYNC.replace("at_least: 3", "at_least: 1"))
    client = await phone(server, "erase-me", user_id="u-gone")
    keep = await phone(server, "keep-me", user_id="u-stays")
    for c in (client, keep):
        await c.track("sync_failed")
        await c.flush()
        await c.decline(await c.next_cue(timeout=5))
    await server.core.drain()
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        exported = json.loads((await admin.ExportUser(admin_pb2.ExportUserRequest(user_id="u-gone"))).json)
        assert [s["device_id"] for s in exported["sessions"]] == ["erase-me"]
        assert [s["name"] for s in exported["signals"]] == ["sync_failed"]
        assert [c["status"] for c in exported["cues"]] == ["declined"]
        erased = await admin.EraseUser(admin_pb2.EraseUserRequest(user_id="u-gone"))
        assert erased.deleted["signals"] == 1 and erased.deleted["cues"] == 1
        again = json.loads((await admin.ExportUser(admin_pb2.ExportUserRequest(user_id="u-gone"))).json)
        assert all(rows == [] for rows in again.values())
        still = json.loads((await admin.ExportUser(admin_pb2.ExportUserRequest(user_id="u-stays"))).json)
        assert len(still["signals"]) == 1
        try:
            await admin.EraseUser(admin_pb2.EraseUserRequest(user_id=""))
            raise AssertionError("an empty user id must be refused")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
    for c in (client, keep):
        await c.close()


async def test_retention_deletes_old_journey_data(start_server: StartServer, clock: ManualClock) -> None:
    from cuepoint_server.core.service import CoreConfig

    server = await start_server(SYNC)
    server.core.config = CoreConfig(retention_days=1)
    client = await phone(server)
    await client.track("tap")
    await client.flush()
    clock.advance(2 * 86400)
    await client.track("tap")
    await client.flush()
    assert await server.core.purge() == 1
    assert await server.store.count_signals("phone-1") == 1
    await client.close()


async def test_a_reconnect_resumes_the_session(start_server: StartServer, tmp_path: Path) -> None:
    """A dropped connection does not reset session rules: caps per session, decline memory."""
    folder, db = (
        folder_with(tmp_path, SYNC.replace("at_least: 3", "at_least: 1") + "caps: {per_session: 1}\n"),
        tmp_path / "r.db",
    )
    first = await start_server(scenarios=folder, db=db)
    port = first.port
    client = await phone(first, "resumer", consent=cuepoint.Consent.NONE)
    await client.track("sync_failed")
    await client.flush()
    await client.dismiss(await client.next_cue(timeout=5))
    session_id = client.session_id
    await first.stop(0.5)
    from cuepoint_server.app import CuepointServer, ServerConfig

    for _ in range(50):  # the port frees up a moment after stop
        try:
            second = await CuepointServer.start(
                ServerConfig(port=port, db=str(db), database=first.config.database, scenarios=str(folder)),
                clock=first.core.clock,
            )
            break
        except OSError:
            await asyncio.sleep(0.1)
    try:
        async with asyncio.timeout(10):
            while client.state is not cuepoint.ConnectionState.CONNECTED:  # noqa: ASYNC110 - reconnects by itself
                await asyncio.sleep(0.05)
        await client.track("sync_failed")
        await client.flush(timeout=10)
        assert client.session_id == session_id  # resumed, not a new session
        assert await no_cue(client)  # per-session cap still counts the first offer
        await second.core.drain()
        assert await second.store.count_signals("resumer") == 2  # consent none, but the session lives on
    finally:
        await client.close()
        await second.stop(0.5)
