"""Consent and erasure hold in the bytes on disk: the raw SQLite file and its WAL are scanned for the values.

Real server on port 0, real SDK, real gRPC; a local HTTP receiver for webhooks.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import structlog

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock
from cuepoint_server.logs import configure_logging
from cuepoint_server.webhooks import WebhookConfig, verify

from .conftest import StartServer

HOOK_SECRET = "whsec-privacy-test"

ORDER_HELP = """
id: order-help
trigger: {event: order_stuck}
cue:
  message: "Hi {{ user.first_name | default('there') }}, need help with order {{ attributes.order | default('?') }}?"
  channel: chat
  queue: support
"""


class Receiver:
    """A CRM endpoint: keeps every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def event(self, kind: str) -> dict[str, object]:
        async with asyncio.timeout(10):
            while True:
                for headers, body in self.received:
                    if headers.get("x-cuepoint-event") == kind:
                        assert verify(HOOK_SECRET, headers["x-cuepoint-signature"], body)
                        data: dict[str, object] = json.loads(body)
                        return data
                await asyncio.sleep(0.02)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The server's JSON log lines, through the production processors (redaction included)."""
    out = io.StringIO()
    configure_logging("debug", json=True, file=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def raw_bytes(server: CuepointServer) -> dict[str, bytes]:
    """The database file and its write-ahead log, as bytes on disk."""
    db = Path(server.config.db)
    files = {db.name: db.read_bytes()}
    wal = db.with_name(db.name + "-wal")
    files[wal.name] = wal.read_bytes() if wal.exists() else b""
    return files


async def stored_rows(server: CuepointServer) -> dict[str, bytes]:
    """PostgreSQL: every row of every table of the server's schema, as text, per table."""
    tables = await server.store.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    out: dict[str, bytes] = {}
    for (table,) in tables:
        rows = await server.store.query(f"SELECT CAST(t AS TEXT) FROM {table} AS t")
        out[str(table)] = "\n".join(str(r[0]) for r in rows).encode()
    return out


async def found_on_disk(server: CuepointServer, *values: str) -> dict[str, list[str]]:
    """Which of `values` (UTF-8) appear in which file (PostgreSQL: in which table): the test fails naming them."""
    files = await stored_rows(server) if server.config.database else await asyncio.to_thread(raw_bytes, server)
    hits: dict[str, list[str]] = {}
    for name, data in files.items():
        for value in values:
            if value.encode() in data:
                hits.setdefault(name, []).append(value)
    return hits


async def device(
    server: CuepointServer,
    device_id: str,
    *,
    consent: cuepoint.Consent = cuepoint.Consent.FULL,
    user: cuepoint.User | None = None,
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS", attributes={"order": "A-9001"}),
        user=user,
        consent=consent,
        config=cuepoint.ClientConfig(connect_timeout=5),
    )


async def test_erasure_is_complete_on_a_connected_device(start_server: StartServer, receiver: Receiver) -> None:
    hook = WebhookConfig(url=receiver.url, secret=HOOK_SECRET, backoff=0.01)
    server = await start_server(ORDER_HELP, webhooks=(hook,))
    # Before signing in, on an earlier visit: anonymous history of the device.
    earlier = await device(server, "erin-phone")
    await earlier.track("screen_viewed", screen="anon-history-7f3a")
    await earlier.flush(timeout=5)
    await earlier.close()

    # Another user's rows share the same pages, so the erased ones are cells amid kept data.
    kai = await device(server, "kai-phone", user=cuepoint.User(user_id="kai-4411", attributes={"first_name": "Kai"}))
    await kai.track("screen_viewed", screen="kai-keeps-this-61d0")
    await kai.track("order_stuck")
    await kai.flush(timeout=5)

    phone = await device(server, "erin-phone")
    await phone.track("screen_viewed", screen="pre-signin-2c9e")
    await phone.flush(timeout=5)
    await phone.set_context(
        user=cuepoint.User(user_id="erin-8d2c", attributes={"first_name": "Erinna", "email": "erin@example.com"})
    )
    await phone.track("order_stuck")
    await phone.flush(timeout=5)
    cue = await phone.next_cue(timeout=5)
    assert cue.message == "Hi Erinna, need help with order A-9001?"
    old_session = server.core._reg.sessions["erin-phone"].session_id

    erased_values = ("erin-8d2c", "erin@example.com", "Erinna", "anon-history-7f3a", "pre-signin-2c9e")
    assert await found_on_disk(server, *erased_values)  # the scan does find what is there

    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        events = phone.events()
        deleted = (await admin.EraseUser(admin_pb2.EraseUserRequest(user_id="erin-8d2c"))).deleted
        assert deleted["sessions"] == 2 and deleted["signals"] >= 4 and deleted["cues"] == 1

        # Still connected: what the device sends now is stored, but never under the erased identity.
        await phone.track("screen_viewed", screen="after-erase-5b1d")
        await phone.flush(timeout=5)
        live = server.core._reg.sessions["erin-phone"]
        assert live.session_id != old_session and live.subject == "device:erin-phone"
        assert not any(k.startswith("user.") for k in live.state.context)
        await server.core.drain()
        stored = await server.store.get_session(live.session_id)
        assert stored is not None and stored.user_id == "" and "user.email" not in stored.context
        again = json.loads((await admin.ExportUser(admin_pb2.ExportUserRequest(user_id="erin-8d2c"))).json)
        assert all(rows == [] for rows in again.values()), again
        # The cue that named her was withdrawn from the screen.
        async with asyncio.timeout(5):
            async for item in events:
                if isinstance(item, cuepoint.CueWithdrawal):
                    assert (item.cue_id, item.reason) == (cue.cue_id, "erased")
                    break

    # Not in the database file, not in the WAL: secure_delete zeroes freed cells, the WAL was truncated.
    assert await found_on_disk(server, *erased_values) == {}
    kept = await found_on_disk(server, "after-erase-5b1d", "kai-4411", "kai-keeps-this-61d0")
    assert sorted({v for values in kept.values() for v in values}) == [
        "after-erase-5b1d",
        "kai-4411",
        "kai-keeps-this-61d0",
    ]

    # The CRM is told, signed.
    erased = await receiver.event("user.erased")
    data = erased["data"]
    assert isinstance(data, dict) and data["user_id"] == "erin-8d2c" and data["deleted"]["sessions"] == 2
    await phone.close()
    await kai.close()


VIP_HELP = r"""
id: vip-help
target: {attribute: user.email, matches: "@example\\.com$"}
trigger: {event: vip_stuck}
cue: {message: "Hi {{ user.first_name }}, we can help", channel: chat, queue: support}
"""


async def test_consent_reaches_everything_derived_from_the_user(
    start_server: StartServer, receiver: Receiver, clock: ManualClock, log_output: io.StringIO
) -> None:
    hook = WebhookConfig(url=receiver.url, secret=HOOK_SECRET, backoff=0.01)
    server = await start_server(ORDER_HELP, VIP_HELP, webhooks=(hook,))
    dana = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"], capacity=2)

    # ESSENTIAL: the user id and tier may be kept and shown; the rest of the user's facts nowhere.
    zed = await device(
        server,
        "zed-phone",
        consent=cuepoint.Consent.ESSENTIAL,
        user=cuepoint.User(
            user_id="ess-user-31", tier="premium", attributes={"first_name": "Zelda", "email": "zelda@example.com"}
        ),
    )
    await zed.set_context(user=cuepoint.User(user_id="ess-user-31", attributes={"phone": "+1-555-0199"}))
    await zed.track("vip_stuck")
    await zed.flush(timeout=5)
    cue = await zed.next_cue(timeout=5)
    assert cue.message == "Hi Zelda, we can help"  # the user reads about themselves
    await (await zed.accept(cue)).wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    ctx = (await dana.next_engagement(timeout=5)).context
    withheld = ("Zelda", "zelda@example.com", "+1-555-0199")
    shown = repr(ctx)
    assert [v for v in withheld if v in shown] == []
    assert ctx.user_id == "ess-user-31" and ctx.user is not None and ctx.user.tier == "premium"
    assert {"user.email", "user.first_name", "user.phone"} <= set(ctx.redacted_fields)
    assert ctx.cue is not None and ctx.cue.message == "Hi [redacted], we can help"
    assert any("[redacted]" in c.description for c in (ctx.trigger.conditions if ctx.trigger else ()))
    assert any(e.kind == "context" for e in ctx.journey)  # the update is in the journey, without its value
    started = json.dumps(await receiver.event("engagement.assigned"))
    assert [v for v in withheld if v in started] == []
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        export = (await admin.ExportUser(admin_pb2.ExportUserRequest(user_id="ess-user-31"))).json
    assert "ess-user-31" in export and [v for v in withheld if v in export] == []
    await server.core.drain()
    assert await found_on_disk(server, *withheld) == {}  # not even while the session lives

    # NONE: nothing that identifies the user, not even the id, in any table, during or after the session.
    yus = await device(
        server,
        "yus-phone",
        consent=cuepoint.Consent.NONE,
        user=cuepoint.User(user_id="none-user-77", attributes={"first_name": "Yusuf", "email": "yusuf@example.com"}),
    )
    await yus.set_context(user=cuepoint.User(user_id="none-user-77", attributes={"city_of_birth": "Tromsø"}))
    await yus.track("order_stuck")
    await yus.flush(timeout=5)
    cue = await yus.next_cue(timeout=5)
    assert cue.message == "Hi Yusuf, need help with order A-9001?"
    await (await yus.accept(cue)).wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    ctx = (await dana.next_engagement(timeout=5)).context
    anonymous = ("none-user-77", "Yusuf", "yusuf@example.com", "Tromsø")
    assert [v for v in anonymous if v in repr(ctx)] == [] and ctx.user_id == ""
    await yus.close()
    clock.advance(server.core.config.resume_window + 1)
    await server.core.drain()
    assert await found_on_disk(server, *anonymous) == {}
    logged = log_output.getvalue()
    assert "cue.offered" in logged  # the log is being written...
    assert [v for v in (*withheld, *anonymous) if v in logged] == []  # ...without them
    await zed.close()
    await dana.close()


async def test_a_cue_stored_redacted_is_filled_in_again_for_its_device_after_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    db = tmp_path / "restart.db"
    first = await start_server(ORDER_HELP, db=db)
    zoe = cuepoint.User(user_id="zoe-1", attributes={"first_name": "Zoe-Ann"})
    client = await device(first, "zoe-phone", consent=cuepoint.Consent.ESSENTIAL, user=zoe)
    await client.track("order_stuck")
    await client.flush(timeout=5)
    cue = await client.next_cue(timeout=5)
    assert cue.message == "Hi Zoe-Ann, need help with order A-9001?"
    await first.core.drain()
    stored = await first.store.get_cue(cue.cue_id)
    assert stored is not None and stored.message == "Hi [redacted], need help with order A-9001?"
    await client.close()
    await first.stop(0.5)

    second = await start_server(ORDER_HELP, db=db)
    async with grpc.aio.insecure_channel(second.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Connect()
        hello = device_pb2.Hello(
            app_id="fitkit",
            device_id="zoe-phone",
            context=common_pb2.Context(attributes={"order": common_pb2.AttributeValue(string_value="A-9001")}),
            user=common_pb2.UserIdentity(
                user_id="zoe-1", attributes={"first_name": common_pb2.AttributeValue(string_value="Zoe-Ann")}
            ),
            consent=common_pb2.Consent(level=common_pb2.CONSENT_LEVEL_ESSENTIAL),
        )
        await call.write(device_pb2.DeviceMessage(hello=hello))
        async with asyncio.timeout(5):
            assert (await call.read()).HasField("welcome")
            offered = await call.read()
        assert offered.cue.cue_id == cue.cue_id  # the same cue, restored from storage
        assert offered.cue.message == "Hi Zoe-Ann, need help with order A-9001?"
        call.cancel()
