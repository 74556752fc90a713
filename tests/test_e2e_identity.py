"""Who a device and a user are: device secrets, verified user tokens, consent everywhere, complete erasure.

The app key ships inside every app, so it is public: these tests attack with it. Real server on port 0,
real SDK (or generated stubs, as a hostile client would use them), real gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from cuepoint_server import cli
from cuepoint_server.api.auth import AuthConfig, AuthConfigError
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .conftest import StartServer, db_option

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
    if server.config.database:  # PostgreSQL: no stored row holds it
        rows = await server.store.query("SELECT CAST(c AS TEXT) FROM device_credentials AS c")
        assert rows and not any(secret in str(r[0]) for r in rows)
    else:
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
    assert await asyncio.to_thread(cli.main, ["forget-device", *db_option(server), "lost-phone"]) == 0
    assert await asyncio.to_thread(cli.main, ["forget-device", *db_option(server), "lost-phone"]) == 1
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


# --- verified users ------------------------------------------------------------------------------------

USER_SECRET = "fitkit-backend-signing-secret-0123456789"  # shared with the app's backend only
DANA_TOKEN = "dana_tok_1a2b3c4d5e6f7a8b"
SHOP_KEY = "shop_test_8e2d4b6a1c3f5e70"
SHOP_PRIVATE = ec.generate_private_key(ec.SECP256R1())
SHOP_PUBLIC_PEM = (
    SHOP_PRIVATE.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
ISSUER, AUDIENCE = "https://api.fitkit.example", "cuepoint"
USERS_AUTH = AuthConfig.from_dict(
    {
        "apps": {
            "fitkit": {
                "api_keys": [APP_KEY],
                "user_tokens": {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": USER_SECRET},
            },
            "shop": {
                "api_keys": [SHOP_KEY],
                "user_tokens": {"issuer": "https://shop.example", "audience": AUDIENCE, "public_key": SHOP_PUBLIC_PEM},
            },
        },
        "associates": {"dana": {"token": DANA_TOKEN, "queues": ["*"]}},
        "admin_tokens": [ADMIN_TOKEN],
    }
)
HELP = """
id: help
trigger: {event: help}
cue: {message: "Need help?", channel: chat, queue: support}
after_decline: never
"""
CALL_ME = """
id: call-me
trigger: {event: call_me}
cue: {message: "Shall we call you?", channel: audio, queue: support}
"""


def user_token(clock: ManualClock, sub: str, **changes: Any) -> str:
    """What the app's backend signs after its own sign-in: short-lived, for this issuer and audience."""
    key = changes.pop("key", USER_SECRET)
    algorithm = changes.pop("algorithm", "HS256")
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": int(clock.now()), "exp": int(clock.now()) + 300}
    claims.update(changes)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm)


async def user_device(
    server: CuepointServer,
    device_id: str,
    user_id: str = "",
    token: str | None = None,
    *,
    app_id: str = "fitkit",
    consent: cuepoint.Consent = cuepoint.Consent.FULL,
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id=app_id,
        device_id=device_id,
        user=cuepoint.User(user_id=user_id) if user_id else None,
        consent=consent,
        config=cuepoint.ClientConfig(api_key=SHOP_KEY if app_id == "shop" else APP_KEY, connect_timeout=5),
        user_token=token,
    )


async def verdict(client: cuepoint.Client) -> cuepoint.UserVerification:
    """The server's verdict on the token the client presented in its Hello."""
    async with asyncio.timeout(5):
        while client.user_verification is None:  # noqa: ASYNC110 - set by the client's reader
            await asyncio.sleep(0.01)
    return client.user_verification


async def help_cue(client: cuepoint.Client, event: str = "help") -> cuepoint.Cue | None:
    await client.track(event)
    await client.flush(timeout=5)
    try:
        return await client.next_cue(timeout=0.3)
    except cuepoint.TimedOut:
        return None


async def test_a_claimed_user_id_never_borrows_the_users_journey_or_memory(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(HELP, CALL_ME, auth=USERS_AUTH)
    dana = await cuepoint.connect_associate(
        server.address, associate_id="dana", queues=["support"], config=cuepoint.AssociateConfig(token=DANA_TOKEN)
    )
    # Alice signs in on her phone: the app's backend vouches for her.
    phone = await user_device(server, "alice-phone", "u-alice", user_token(clock, "u-alice"))
    assert await verdict(phone) == cuepoint.UserVerification("u-alice", True)
    await phone.track("screen_viewed", screen="order A-9001")
    cue = await help_cue(phone)
    assert cue is not None
    await phone.decline(cue)

    # Mallory has the app key and Alice's user id, but no token from FitKit's backend: a claim.
    mallory = await user_device(server, "mallory-phone", "u-alice")
    assert mallory.user_verification is None  # no token, no verdict
    stolen = await help_cue(mallory)
    assert stolen is not None  # Alice's decline memory did not follow a mere claim
    engagement = await mallory.accept(stolen)
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    ctx = (await dana.next_engagement(timeout=5)).context
    assert (ctx.user_id, ctx.user_verified) == ("u-alice", False)  # shown, marked unverified
    assert [e.name for e in ctx.journey] == ["help"]  # Mallory's own, nothing of Alice's
    assert ctx.prior_engagements == ()
    decisions = await server.store.cues_for_subject("device:mallory-phone")
    assert [c.device_id for c in decisions] == ["mallory-phone"]  # memory and caps stay with the device

    # Forged, stale or misdirected tokens verify nothing.
    now = int(clock.now())
    forged = {
        "bad signature": user_token(clock, "u-alice", key="a-secret-the-attacker-made-up-0123456789"),
        "expired": user_token(clock, "u-alice", exp=now - 120),
        "wrong audience": user_token(clock, "u-alice", aud="someone-else"),
        "wrong issuer": user_token(clock, "u-alice", iss="https://evil.example"),
        "not a short-lived token": user_token(clock, "u-alice", exp=now + 30 * 86400),
        "missing claim 'exp'": user_token(clock, "u-alice", exp=None),
        "algorithm not allowed": jwt.encode(
            {"sub": "u-alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}, None, algorithm="none"
        ),
    }
    for reason, token in forged.items():
        answer = await mallory.set_user_token(token, timeout=5)
        assert not answer.verified and reason in answer.reason, (reason, answer)
    assert server.core._reg.sessions["mallory-phone"].subject == "device:mallory-phone"

    # Alice's tablet signs in after connecting; her decline follows her there, her journey is stitched.
    tablet = await user_device(server, "alice-tablet")
    answer = await tablet.set_user_token(user_token(clock, "u-alice"), timeout=5)
    assert answer == cuepoint.UserVerification("u-alice", True)
    assert await help_cue(tablet) is None
    call = await help_cue(tablet, "call_me")
    assert call is not None
    await (await tablet.accept(call)).wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    for c in (phone, mallory, tablet):
        await c.close()
    await dana.close()


async def test_verified_journey_is_stitched_and_marked(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(CALL_ME, auth=USERS_AUTH)
    dana = await cuepoint.connect_associate(
        server.address, associate_id="dana", queues=["support"], config=cuepoint.AssociateConfig(token=DANA_TOKEN)
    )
    phone = await user_device(server, "bob-phone", "u-bob", user_token(clock, "u-bob"))
    await phone.track("screen_viewed", screen="pricing")
    await phone.flush(timeout=5)
    tablet = await user_device(server, "bob-tablet", "u-bob", user_token(clock, "u-bob"))
    cue = await help_cue(tablet, "call_me")
    assert cue is not None
    await (await tablet.accept(cue)).wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    ctx = (await dana.next_engagement(timeout=5)).context
    assert (ctx.user_id, ctx.user_verified) == ("u-bob", True)
    assert {e.name for e in ctx.journey} == {"screen_viewed", "call_me"}  # across both devices

    # A token is the authority on who signed in: the claimed id gives way to its subject.
    other = await user_device(server, "carol-phone", "u-someone", user_token(clock, "u-carol"))
    assert await verdict(other) == cuepoint.UserVerification("u-carol", True)
    assert server.core._reg.sessions["carol-phone"].subject == "user:u-carol"
    # Without consent a verified user is still not kept: no identity, no stitching.
    private = await user_device(server, "dora-phone", consent=cuepoint.Consent.NONE)
    assert (await private.set_user_token(user_token(clock, "u-dora"), timeout=5)).verified
    assert server.core._reg.sessions["dora-phone"].subject == "device:dora-phone"
    await server.core.drain()
    stored = await server.store.get_session(private.session_id)
    assert stored is not None and stored.user_id == "" and not stored.identified
    await private.close()
    for c in (phone, tablet, other):
        await c.close()
    await dana.close()


async def test_an_asymmetric_key_verifies_and_refuses_algorithm_confusion(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(CALL_ME, auth=USERS_AUTH)
    claims = {"sub": "u-dan", "iss": "https://shop.example", "aud": AUDIENCE, "exp": int(clock.now()) + 300}
    signed = jwt.encode(claims, SHOP_PRIVATE, algorithm="ES256")
    shop = await user_device(server, "shop-phone", "u-dan", signed, app_id="shop")
    assert (await verdict(shop)).verified
    # The public key is public: an HS256 token "signed" with it must not verify.
    confused = jwt.encode(claims, SHOP_PUBLIC_PEM.encode(), algorithm="HS256") if _hs256_accepts_pem() else None
    if confused is not None:
        assert not (await shop.set_user_token(confused, timeout=5)).verified
    # FitKit's backend cannot vouch for shop users, nor shop's for FitKit's.
    fitkit_token = user_token(clock, "u-dan")
    assert not (await shop.set_user_token(fitkit_token, timeout=5)).verified
    await shop.close()


def _hs256_accepts_pem() -> bool:
    """PyJWT refuses to HMAC-sign with a PEM key (its own guard against the confusion); then nothing to try."""
    try:
        jwt.encode({"a": 1}, SHOP_PUBLIC_PEM.encode(), algorithm="HS256")
    except jwt.InvalidKeyError:
        return False
    return True


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"audience": AUDIENCE, "hs256_secret": USER_SECRET}, "issuer and audience are required"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": "short"}, "at least 32 characters"),
        ({"issuer": ISSUER, "audience": AUDIENCE}, "exactly one of"),
        (
            {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": USER_SECRET, "public_key": SHOP_PUBLIC_PEM},
            "exactly one of",
        ),
        (
            {"issuer": ISSUER, "audience": AUDIENCE, "public_key": SHOP_PUBLIC_PEM, "algorithms": ["HS256"]},
            "not allowed",
        ),
        ({"issuer": ISSUER, "audience": AUDIENCE, "public_key": "not a key"}, "PEM public key"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": USER_SECRET, "leeway": 5}, "unknown key"),
    ],
)
def test_user_token_keys_in_the_auth_file_are_checked(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        AuthConfig.from_dict({"apps": {"fitkit": {"api_keys": [APP_KEY], "user_tokens": entry}}})
    assert problem in str(info.value) and "apps.fitkit.user_tokens" in str(info.value)
