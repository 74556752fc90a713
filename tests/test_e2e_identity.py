"""Who a device and a user are: device secrets, verified user tokens, consent everywhere, complete erasure.

The app key ships inside every app, so it is public: these tests attack with it. Real server on port 0,
real SDK (or generated stubs, as a hostile client would use them), real gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from cuepoint_server import cli
from cuepoint_server.api.auth import AuthConfig
from cuepoint_server.app import CuepointServer

from .conftest import StartServer

APP_KEY = "fk_test_4f9a1c2e7b3d5a60"
ADMIN_TOKEN = "admin_tok_0c1d2e3f4a5b6c7d"
AUTH = AuthConfig.from_dict({"apps": {"fitkit": {"api_keys": [APP_KEY]}}, "admin_tokens": [ADMIN_TOKEN]})

ORDER_HELP = """
id: order-help
apps: [fitkit]
trigger: {event: order_stuck}
cue:
  message: "Hi {{ user.first_name }}, need help with order {{ attributes.order }}?"
  channel: chat
  queue: fitkit-support
"""


async def device(
    server: CuepointServer,
    device_id: str,
    *,
    first_name: str = "Alice",
    outbox: Path | None = None,
    device_secret: str | None = None,
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS", attributes={"order": "A-9001"}),
        user=cuepoint.User(user_id=f"user-{first_name.lower()}", attributes={"first_name": first_name}),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(
            api_key=APP_KEY, outbox_path=str(outbox) if outbox else None, connect_timeout=5, reconnect=False
        ),
        device_secret=device_secret,
    )


def admin_metadata() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ADMIN_TOKEN}"),)


async def raw_hello(server: CuepointServer, device_id: str, secret: str = "") -> device_pb2.ServerMessage:
    """A Hello from generated stubs (an SDK that predates device secrets sends none); the Welcome or the error."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Connect(metadata=(("authorization", f"Bearer {APP_KEY}"),))
        hello = device_pb2.Hello(app_id="fitkit", device_id=device_id, device_secret=secret)
        await call.write(device_pb2.DeviceMessage(hello=hello))
        async with asyncio.timeout(5):
            message = await call.read()
        await call.done_writing()
        async with asyncio.timeout(5):
            while await call.read() is not grpc.aio.EOF:
                pass
        assert isinstance(message, device_pb2.ServerMessage)
        return message


async def test_a_device_id_belongs_to_the_install_that_first_used_it(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(ORDER_HELP, auth=AUTH)
    outbox = tmp_path / "victim-outbox.db"
    victim = await device(server, "victim-phone", outbox=outbox)
    secret = victim.device_secret
    assert len(secret) >= 43  # 256 random bits, URL-safe
    await victim.track("order_stuck")
    await victim.flush(timeout=5)
    cue = await victim.next_cue(timeout=5)
    assert cue.message == "Hi Alice, need help with order A-9001?"

    # Only the secret's SHA-256 is stored.
    stored = await server.store.device_credential("victim-phone")
    assert stored is not None and stored.secret_sha256 == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in await asyncio.to_thread(Path(server.config.db).read_bytes)

    # The attacker has the app key and the victim's device id, but not its secret.
    for guess in (None, "not-the-secret", secret[:-1] + ("A" if secret[-1] != "A" else "B")):
        with pytest.raises(cuepoint.Rejected) as info:
            await device(server, "victim-phone", first_name="Mallory", device_secret=guess)
        assert info.value.code == "UNAUTHENTICATED", guess
        assert "device_secret" in (info.value.details or "")
    reply = await raw_hello_error(server, "victim-phone")
    assert reply is grpc.StatusCode.UNAUTHENTICATED

    # Nothing of the attempts reached the victim's session: same session, context, pending cue.
    live = server.core._reg.sessions["victim-phone"]
    assert live.session_id == victim.session_id and not live.closed
    assert live.state.context["user.first_name"] == "Alice"
    assert server.core._reg.pending["victim-phone"].offer.cue_id == cue.cue_id
    engagement = await victim.accept(cue)
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    await victim.close()

    # The install keeps its secret in its outbox file: a restarted app connects as itself.
    again = await device(server, "victim-phone", outbox=outbox)
    assert again.device_secret == secret
    await again.track("screen_viewed")
    await again.flush(timeout=5)
    await again.close()
    # So does an app that keeps the secret itself (its keychain) and passes it back.
    keychain = await device(server, "victim-phone", device_secret=secret)
    await keychain.close()


async def raw_hello_error(server: CuepointServer, device_id: str, secret: str = "") -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_hello(server, device_id, secret)
    return info.value.code()


async def test_an_operator_forgets_a_lost_device_secret(start_server: StartServer) -> None:
    server = await start_server(ORDER_HELP, auth=AUTH)
    first = await device(server, "lost-phone")
    lost = first.device_secret
    await first.close()
    # The app was reinstalled without its secret: refused until an operator forgets the credential.
    with pytest.raises(cuepoint.Rejected):
        await device(server, "lost-phone")
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ForgetDeviceCredential(admin_pb2.ForgetDeviceCredentialRequest(device_id="lost-phone"))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED  # an admin RPC
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ForgetDeviceCredential(admin_pb2.ForgetDeviceCredentialRequest(), metadata=admin_metadata())
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        reply = await admin.ForgetDeviceCredential(
            admin_pb2.ForgetDeviceCredentialRequest(device_id="lost-phone"), metadata=admin_metadata()
        )
        assert reply.forgotten
    fresh = await device(server, "lost-phone")
    assert fresh.device_secret and fresh.device_secret != lost
    await fresh.close()
    with pytest.raises(cuepoint.Rejected):  # the old secret is worth nothing now
        await device(server, "lost-phone", device_secret=lost)

    # The same from the command line, beside the running server.
    assert await asyncio.to_thread(cli.main, ["forget-device", "--db", server.config.db, "lost-phone"]) == 0
    assert await asyncio.to_thread(cli.main, ["forget-device", "--db", server.config.db, "lost-phone"]) == 1
    newest = await device(server, "lost-phone")
    assert newest.device_secret not in ("", lost, fresh.device_secret)
    await newest.close()


async def test_migration_mode_admits_old_sdks_until_they_present_their_secret(start_server: StartServer) -> None:
    strict = await start_server(ORDER_HELP, auth=AUTH)
    welcome = (await raw_hello(strict, "old-sdk-phone")).welcome
    assert welcome.session_id and welcome.device_secret  # issued; an old SDK ignores it
    assert await raw_hello_error(strict, "old-sdk-phone") is grpc.StatusCode.UNAUTHENTICATED

    server = await start_server(ORDER_HELP, auth=AUTH, device_secret_migration=True)
    assert (await raw_hello(server, "old-sdk-phone")).welcome.device_secret
    # An SDK that never presents its secret keeps working in migration mode...
    again = await raw_hello(server, "old-sdk-phone")
    assert again.welcome.session_id and not again.welcome.device_secret
    # ...while an install that presented its secret once is held to it from then on.
    updated = await device(server, "new-sdk-phone")
    secret = updated.device_secret
    await updated.close()
    assert (await raw_hello(server, "new-sdk-phone", secret)).welcome.session_id
    assert await raw_hello_error(server, "new-sdk-phone") is grpc.StatusCode.UNAUTHENTICATED
