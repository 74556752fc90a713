"""Nobody where they don't belong: auth, TLS, bad input, rate limits, rich status, redaction.

Real server on port 0, real SDK and generated stubs over real gRPC.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc.error_details_pb2 import BadRequest, QuotaFailure
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import cuepoint
from cuepoint import _grpc_errors
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2
from cuepoint_server.api.auth import AuthConfig, AuthConfigError
from cuepoint_server.api.limits import RateLimits
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock
from cuepoint_server.core.validation import Limits
from cuepoint_server.logs import REDACTED, configure_logging

from .conftest import ROOT, StartServer

FITKIT_KEY = "fk_test_4f9a1c2e7b3d5a60"
OTHER_KEY = "ot_test_8e2d4b6a1c3f5e70"
DANA_TOKEN = "dana_tok_1a2b3c4d5e6f7a8b"
BOB_TOKEN = "bob_tok_9f8e7d6c5b4a3f2e"
ADMIN_TOKEN = "admin_tok_0c1d2e3f4a5b6c7d"

AUTH = AuthConfig.from_dict(
    {
        "apps": {"fitkit": {"api_keys": [FITKIT_KEY]}, "otherapp": {"api_keys": [OTHER_KEY]}},
        "associates": {
            "dana": {"token": DANA_TOKEN, "queues": ["fitkit-support"]},
            # The file may hold only the digest of a token.
            "bob": {"token": "sha256:" + hashlib.sha256(BOB_TOKEN.encode()).hexdigest(), "queues": ["billing"]},
        },
        "admin_tokens": [ADMIN_TOKEN],
    }
)

SYNC_FAILURE = """
id: sync-failure
apps: [fitkit]
target: {attribute: user.tier, equals: premium}
trigger:
  event: sync_failed
  count: {at_least: 3, within: 10m}
cue: {message: "Unable to sync? I can help you.", channel: audio, queue: fitkit-support}
cooldown: 30m
"""
PAYMENT_FAILURE = """
id: payment-failure
apps: [fitkit]
trigger: {event: payment_failed}
cue: {message: "Payment trouble?", channel: chat, queue: billing}
cooldown: 30m
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def device(
    server: CuepointServer,
    device_id: str = "phone-1",
    *,
    api_key: str | None = FITKIT_KEY,
    app_id: str = "fitkit",
    credentials: grpc.ChannelCredentials | None = None,
    connect_timeout: float = 5.0,
    address: str | None = None,
) -> cuepoint.Client:
    return await cuepoint.connect(
        address or server.address,
        app_id=app_id,
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS"),
        user=cuepoint.User(user_id="user-1042", tier="premium", attributes={"first_name": "Sam"}),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(api_key=api_key, credentials=credentials, connect_timeout=connect_timeout),
    )


async def associate(
    server: CuepointServer, associate_id: str, token: str | None, queues: Iterable[str] = ()
) -> cuepoint.AssociateClient:
    return await cuepoint.connect_associate(
        server.address,
        associate_id=associate_id,
        queues=queues,
        config=cuepoint.AssociateConfig(token=token, connect_timeout=5),
    )


async def tracked_and_acked(client: cuepoint.Client, event: str = "screen_viewed") -> None:
    await client.track(event)
    await client.flush(timeout=5)


def rich(error: grpc.aio.AioRpcError) -> Status:
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert isinstance(status, Status)
    return status


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    out = []
    for detail in rich(error).details:
        request = BadRequest()
        if detail.Unpack(request):
            out.extend((v.field, v.description) for v in request.field_violations)
    return out


def quota_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    out = []
    for detail in rich(error).details:
        quota = QuotaFailure()
        if detail.Unpack(quota):
            out.extend((v.subject, v.description) for v in quota.violations)
    return out


class RawDevice:
    """A device speaking raw frames (bytes) on DeviceService/Connect, as a broken or hostile client would."""

    def __init__(self, address: str, *, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        connect = self.channel.stream_stream(
            "/cuepoint.v1.DeviceService/Connect",
            request_serializer=lambda b: b,
            response_deserializer=device_pb2.ServerMessage.FromString,
        )
        self.call = connect(self._frames(), metadata=metadata or None)

    async def _frames(self) -> AsyncIterator[bytes]:
        while (frame := await self.outgoing.get()) is not None:
            yield frame

    def send(self, message: device_pb2.DeviceMessage | bytes) -> None:
        self.outgoing.put_nowait(message if isinstance(message, bytes) else message.SerializeToString())

    def hello(self, device_id: str, app_id: str = "fitkit", **fields: Any) -> None:
        self.send(device_pb2.DeviceMessage(hello=device_pb2.Hello(app_id=app_id, device_id=device_id, **fields)))

    def signals(self, *signals: common_pb2.Signal, batch_id: str = "b") -> None:
        batch = device_pb2.SignalBatch(batch_id=batch_id, signals=signals)
        batch.sent_at.GetCurrentTime()
        self.send(device_pb2.DeviceMessage(signals=batch))

    async def read(self) -> device_pb2.ServerMessage:
        async with asyncio.timeout(5):
            message = await self.call.read()
        assert message is not grpc.aio.EOF
        return message  # type: ignore[no-any-return]

    async def failure(self) -> grpc.aio.AioRpcError:
        """Read until the server ends the stream with an error; return it."""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(5):
                while await self.call.read() is not grpc.aio.EOF:
                    pass
        return info.value

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        await self.channel.close()


def event(signal_id: str, name: str = "screen_viewed", **props: str) -> common_pb2.Signal:
    signal = common_pb2.Signal(id=signal_id, event=common_pb2.Event(name=name))
    for key, value in props.items():
        signal.event.properties[key].string_value = value
    signal.time.GetCurrentTime()
    return signal


async def fail_sync(client: cuepoint.Client, times: int = 3) -> None:
    for _ in range(times):
        await client.track("sync_failed", reason="timeout")
    await client.flush(timeout=5)


# --- auth ---------------------------------------------------------------------------------------------


async def test_auth_is_off_by_default_and_says_so(start_server: StartServer) -> None:
    with structlog.testing.capture_logs() as logs:
        server = await start_server(SYNC_FAILURE)
    warning = [e for e in logs if e["event"] == "auth.disabled"]
    assert warning and warning[0]["log_level"] == "warning"
    # The demo and every existing test connect without credentials.
    client = await device(server, api_key=None)
    await tracked_and_acked(client)
    await client.close()


async def test_device_needs_a_known_api_key(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    for key in (None, "fk_test_not_issued_to_anyone"):
        with pytest.raises(cuepoint.Rejected) as info:
            await device(server, api_key=key)
        assert info.value.code == "UNAUTHENTICATED", key
    # A malformed header is no better than none.
    raw = RawDevice(server.address, metadata=(("authorization", FITKIT_KEY),))
    raw.hello("raw-phone")
    assert (await raw.failure()).code() is grpc.StatusCode.UNAUTHENTICATED
    await raw.close()

    client = await device(server)
    await tracked_and_acked(client)
    await client.close()


async def test_key_of_one_app_cannot_connect_devices_of_another(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    with pytest.raises(cuepoint.Rejected) as info:
        await device(server, app_id="otherapp", api_key=FITKIT_KEY)
    assert info.value.code == "PERMISSION_DENIED"
    assert "otherapp" in (info.value.details or "")
    other = await device(server, "other-phone", app_id="otherapp", api_key=OTHER_KEY)
    await tracked_and_acked(other)
    await other.close()


async def test_associate_and_admin_credentials_do_not_open_device_streams(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    for token in (DANA_TOKEN, ADMIN_TOKEN):
        with pytest.raises(cuepoint.Rejected) as info:
            await device(server, api_key=token)
        assert info.value.code == "PERMISSION_DENIED"


async def test_associate_token_signs_in_only_as_itself_to_its_queues(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, PAYMENT_FAILURE, auth=AUTH)
    cases: list[tuple[str, str | None, list[str], str]] = [
        ("dana", None, [], "UNAUTHENTICATED"),
        ("dana", "not-a-token-anyone-issued", [], "UNAUTHENTICATED"),
        ("dana", FITKIT_KEY, [], "PERMISSION_DENIED"),  # an app key is not an associate token
        ("bob", DANA_TOKEN, [], "PERMISSION_DENIED"),  # someone else's id
        ("dana", DANA_TOKEN, ["billing"], "PERMISSION_DENIED"),  # a queue not granted
        ("dana", DANA_TOKEN, ["fitkit-support", "billing"], "PERMISSION_DENIED"),
    ]
    for associate_id, token, queues, code in cases:
        with pytest.raises(cuepoint.Rejected) as info:
            await associate(server, associate_id, token, queues)
        assert info.value.code == code, (associate_id, token, queues)

    # No queues asked: signed in to exactly the granted ones.
    dana = await associate(server, "dana", DANA_TOKEN)
    assert dana.queues == ("fitkit-support",)
    bob = await associate(server, "bob", BOB_TOKEN, ["billing"])

    # A billing engagement reaches bob, never dana.
    client = await device(server)
    await client.track("payment_failed")
    await client.flush(timeout=5)
    engagement = await client.accept(await client.next_cue(timeout=5))
    assigned = await bob.next_engagement(timeout=5)
    assert (
        assigned.engagement_id
        == (await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)).engagement_id
    )
    with pytest.raises(cuepoint.TimedOut):
        await dana.next_engagement(timeout=0.3)
    await bob.end(assigned, disposition="resolved")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)

    # ...and a fitkit-support one (from another session: one engagement per session) reaches dana.
    second = await device(server, "phone-2")
    await fail_sync(second)
    await second.accept(await second.next_cue(timeout=5))
    assert (await dana.next_engagement(timeout=5)).queue == "fitkit-support"
    await client.close()
    await second.close()
    await dana.close()
    await bob.close()


async def test_admin_rpcs_need_an_admin_token(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer("admin_tok_guessed_0000000000"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(FITKIT_KEY), grpc.StatusCode.PERMISSION_DENIED),
            (bearer(DANA_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=True), metadata=metadata or None)
            assert info.value.code() is code, metadata
        assert not server.core.offers_paused  # nothing of a refused call happened
        reply = await admin.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=True), metadata=bearer(ADMIN_TOKEN))
        assert reply.paused and server.core.offers_paused
        scenarios = await admin.GetScenarios(admin_pb2.GetScenariosRequest(), metadata=bearer(ADMIN_TOKEN))
        assert [s.id for s in scenarios.scenarios] == ["sync-failure"]
        # Health checking stays open for load balancers.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_device_cannot_answer_another_devices_cue(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    owner = await device(server, "owner-phone")
    other = await device(server, "other-phone")
    await fail_sync(owner)
    cue = await owner.next_cue(timeout=5)

    events = other.events()
    await other.accept(cue.cue_id)  # the id leaked, say
    async with asyncio.timeout(5):
        async for item in events:
            if isinstance(item, cuepoint.CueWithdrawal):
                assert (item.cue_id, item.reason) == (cue.cue_id, "unknown")
                break
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None and stored.status == "offered" and stored.device_id == "owner-phone"
    # The owner's offer is untouched: it can still accept it.
    engagement = await owner.accept(cue)
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    await tracked_and_acked(other)  # and the other session lives on
    await owner.close()
    await other.close()


def test_auth_file_loads_digests_and_rejects_mistakes(tmp_path: Path) -> None:
    good = tmp_path / "auth.yaml"
    good.write_text(
        "apps:\n  fitkit:\n    api_keys: [fk_test_4f9a1c2e7b3d5a60]\n"
        "associates:\n  dana: {token: 'sha256:" + hashlib.sha256(b"x" * 20).hexdigest() + "', queues: ['*']}\n"
        "admin_tokens: [admin_tok_0c1d2e3f4a5b6c7d]\n"
    )
    config = AuthConfig.load(good)
    assert set(config.apps) == {"fitkit"} and config.associates["dana"].allows("any-queue")
    # Only digests are kept: no token is in memory or in the repr.
    assert FITKIT_KEY not in repr(config) and FITKIT_KEY.encode() not in b"".join(config.apps["fitkit"])

    bad = {
        "short token": {"admin_tokens": ["short"]},
        "same token twice": {"apps": {"a": {"api_keys": [FITKIT_KEY]}}, "admin_tokens": [FITKIT_KEY]},
        "unknown key": {"apps": {}, "admins": []},
        "associate without queues": {"associates": {"dana": {"token": DANA_TOKEN}}},
        "bad app id": {"apps": {"Fit Kit": {"api_keys": [FITKIT_KEY]}}},
    }
    for what, data in bad.items():
        with pytest.raises(AuthConfigError):
            AuthConfig.from_dict(data)
            pytest.fail(what)

    broken = tmp_path / "broken.yaml"
    broken.write_text("admin_tokens: [short]\n")
    done = subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "serve", "--auth", str(broken), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "admin_tokens[0]" in done.stderr


def test_sdk_configs_keep_secrets_out_of_repr() -> None:
    config = cuepoint.ClientConfig(api_key=FITKIT_KEY, metadata=(("x-trace", "1"),))
    assert config.call_metadata() == (("x-trace", "1"), ("authorization", f"Bearer {FITKIT_KEY}"))
    assert FITKIT_KEY not in repr(config)
    assert DANA_TOKEN not in repr(cuepoint.AssociateConfig(token=DANA_TOKEN))
    with pytest.raises(ValueError):
        cuepoint.ClientConfig(api_key="two words")
    with pytest.raises(ValueError):
        cuepoint.ClientConfig(api_key=FITKIT_KEY, metadata=(("authorization", "Bearer x"),))


# --- TLS ----------------------------------------------------------------------------------------------


def self_signed(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_sdk_over_tls_and_plaintext_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = await start_server(SYNC_FAILURE, auth=AUTH, tls_cert=str(cert), tls_key=str(key))
    trusted = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

    client = await device(server, credentials=trusted)
    await fail_sync(client)
    assert (await client.next_cue(timeout=5)).scenario_id == "sync-failure"
    await client.close()
    by_name = await device(server, "named", credentials=trusted, address=f"localhost:{server.port}")
    await tracked_and_acked(by_name)
    await by_name.close()
    dana = await cuepoint.connect_associate(
        server.address,
        associate_id="dana",
        config=cuepoint.AssociateConfig(token=DANA_TOKEN, credentials=trusted, connect_timeout=5),
    )
    await dana.close()

    # Plaintext against the TLS port: no session.
    with pytest.raises(cuepoint.CuepointError) as plain:
        await device(server, "plain", connect_timeout=2)
    assert isinstance(plain.value, cuepoint.ConnectionLost | cuepoint.TimedOut)
    # A certificate we do not trust: no session either.
    stranger, _ = self_signed(tmp_path, "stranger")
    with pytest.raises(cuepoint.CuepointError) as untrusted:
        await device(
            server,
            "mitm",
            credentials=grpc.ssl_channel_credentials(root_certificates=stranger.read_bytes()),
            connect_timeout=2,
        )
    assert isinstance(untrusted.value, cuepoint.ConnectionLost | cuepoint.TimedOut)


async def test_tls_needs_both_cert_and_key(start_server: StartServer, tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    with pytest.raises(ValueError, match="both"):
        await start_server(SYNC_FAILURE, tls_cert=str(cert))


# --- bad input ----------------------------------------------------------------------------------------


async def test_unknown_enum_values_are_invalid_argument(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address)
    raw.hello("consent-42", consent=common_pb2.Consent(level=42))  # type: ignore[arg-type]
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == [("hello.consent.level", "unknown consent level 42")]
    await raw.close()

    raw = RawDevice(server.address)
    raw.hello("kind-99")
    assert (await raw.read()).HasField("welcome")
    raw.send(device_pb2.DeviceMessage(cue_response=device_pb2.CueResponse(cue_id="c", kind=99)))  # type: ignore[arg-type]
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == ["cue_response.kind"]
    await raw.close()


async def test_invalid_utf8_is_invalid_argument_not_a_crash(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    hello_with_bad_app_id = b"\x0a\x04" + b"\x0a\x02\xff\xfe"  # DeviceMessage.hello{app_id: ff fe}
    raw = RawDevice(server.address)
    raw.send(hello_with_bad_app_id)
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (error.details() or "")
    await raw.close()

    raw = RawDevice(server.address)
    raw.hello("utf8-later")
    assert (await raw.read()).HasField("welcome")
    raw.send(b"\x12\x03\x0a\x01\xff")  # DeviceMessage.signals{batch_id: ff}
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    await raw.close()

    async with grpc.aio.insecure_channel(server.address) as channel:
        explain = channel.unary_unary(
            "/cuepoint.v1.AdminService/ExplainDevice",
            request_serializer=lambda b: b,
            response_deserializer=admin_pb2.ExplainDeviceResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await explain(b"\x0a\x01\xff")  # ExplainDeviceRequest{device_id: ff}
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    client = await device(server, api_key=None)  # the server is fine
    await tracked_and_acked(client)
    await client.close()


async def test_size_limits(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, max_message_bytes=256 * 1024)
    # One message over the server's gRPC limit.
    raw = RawDevice(server.address)
    raw.hello("too-big")
    assert (await raw.read()).HasField("welcome")
    raw.signals(event("big-1", blob="x" * 300_000))
    assert (await raw.failure()).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await raw.close()

    server = await start_server(SYNC_FAILURE)
    # A batch over Limits.max_batch_bytes although every signal is within the limits.
    raw = RawDevice(server.address)
    raw.hello("fat-batch")
    assert (await raw.read()).HasField("welcome")
    props = {f"p{i}": "x" * 1000 for i in range(8)}
    raw.signals(*(event(f"s-{i}", **props) for i in range(Limits.max_batch_bytes // 8000 + 10)))
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == ["signals"]
    assert await server.store.count_signals("fat-batch") == 0
    await raw.close()

    # Too many attributes in a hello; a key that is no context key.
    for hello, field in [
        (
            device_pb2.Hello(
                app_id="fitkit",
                device_id="many-attrs",
                context=common_pb2.Context(
                    attributes={f"a{i}": common_pb2.AttributeValue(int_value=i) for i in range(Limits.max_props + 1)}
                ),
            ),
            "hello.context.attributes",
        ),
        (
            device_pb2.Hello(
                app_id="fitkit",
                device_id="bad-key",
                context=common_pb2.Context(attributes={"no spaces": common_pb2.AttributeValue(int_value=1)}),
            ),
            "hello.context['attributes.no spaces']",
        ),
    ]:
        raw = RawDevice(server.address)
        raw.send(device_pb2.DeviceMessage(hello=hello))
        error = await raw.failure()
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(error)] == [field]
        await raw.close()


async def test_rejections_carry_rich_status_and_stay_small(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE)
    raw = RawDevice(server.address)
    raw.hello("rich")
    assert (await raw.read()).HasField("welcome")
    raw.signals(event("ok-1"), event("bad-1", name="Bad Name " + "x" * 200_000))
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rich(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    ((field, description),) = field_violations(error)
    assert field == "signals.signals[1].event.name" and description.startswith("invalid event name 'Bad Name x")
    # Echoed input is clipped: the status fits in any client's trailer limit.
    assert len(error.details() or "") <= 512 and len(status.SerializeToString()) < 2048
    assert (error.details() or "").startswith("signals.signals[1].event.name: invalid event name")
    await raw.close()


def test_sdk_reads_the_field_from_rich_status() -> None:
    violation = BadRequest.FieldViolation(field="signals.signals[2].event.name", description="bad")
    status = Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="no field prefix in this message")
    status.details.add().Pack(BadRequest(field_violations=[violation]))
    trailers = (("grpc-status-details-bin", status.SerializeToString()),)
    error = _grpc_errors.from_status(grpc.StatusCode.INVALID_ARGUMENT, status.message, trailers)
    assert isinstance(error, cuepoint.InvalidSignal) and error.field == "signals.signals[2].event.name"
    # Without details (or without googleapis-common-protos) the message is parsed, as before.
    plain = _grpc_errors.from_status(grpc.StatusCode.INVALID_ARGUMENT, "hello.app_id: required")
    assert isinstance(plain, cuepoint.InvalidSignal) and plain.field == "hello.app_id"


# --- floods -------------------------------------------------------------------------------------------


async def test_device_rate_limit_ends_only_the_flooding_stream(start_server: StartServer, clock: ManualClock) -> None:
    limits = RateLimits(device_rate=10, device_burst=20)
    server = await start_server(SYNC_FAILURE, rate_limits=limits)
    raw = RawDevice(server.address)
    raw.hello("flooder")  # 20 - 1
    assert (await raw.read()).HasField("welcome")
    raw.signals(*(event(f"a-{i}") for i in range(15)), batch_id="first")  # 19 - 15
    assert (await raw.read()).ack.batch_id == "first"
    raw.signals(*(event(f"b-{i}") for i in range(10)), batch_id="second")  # 4 left: passes, into debt (-6)
    assert (await raw.read()).ack.batch_id == "second"
    raw.signals(event("c-0"), batch_id="third")
    error = await raw.failure()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_violations(error) == [("device:fitkit/flooder", "device rate limit: 10 signals/s (burst 20)")]
    assert await server.store.count_signals("flooder") == 25  # the refused batch was not applied
    await raw.close()

    # Another device is unaffected, also through the SDK.
    calm = await device(server, "calm", api_key=None)
    await tracked_and_acked(calm)
    # The flooder's bucket refills with time: -6 + 2 s x 10/s.
    clock.advance(2)
    raw = RawDevice(server.address)
    raw.hello("flooder")
    assert (await raw.read()).HasField("welcome")
    raw.signals(*(event(f"d-{i}") for i in range(10)), batch_id="fourth")
    assert (await raw.read()).ack.batch_id == "fourth"
    await raw.close()
    await calm.close()


async def test_sdk_backs_off_when_throttled_and_loses_nothing(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(SYNC_FAILURE, rate_limits=RateLimits(device_rate=10, device_burst=20))

    async def client(device_id: str, reconnect: bool) -> cuepoint.Client:
        return await cuepoint.connect(
            server.address,
            app_id="fitkit",
            device_id=device_id,
            config=cuepoint.ClientConfig(reconnect=reconnect, reconnect_initial_backoff=0.05),
        )

    # Without reconnect the refusal surfaces as Rejected(RESOURCE_EXHAUSTED).
    strict = await client("strict", reconnect=False)
    for i in range(40):
        await strict.track("screen_viewed", n=i)
    await strict.flush(timeout=5)  # 19 left: passes into debt
    await strict.track("screen_viewed", n=40)
    with pytest.raises(cuepoint.Rejected) as info:
        await strict.flush(timeout=5)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    await strict.close()

    # With reconnect (the default) the client backs off, and once the bucket refills every signal is acked.
    patient = await client("patient", reconnect=True)
    for i in range(40):
        await patient.track("screen_viewed", n=i)
    await patient.flush(timeout=5)
    for i in range(40, 45):
        await patient.track("screen_viewed", n=i)
    flushed = asyncio.ensure_future(patient.flush(timeout=10))
    await asyncio.sleep(0.3)  # refused (and retried with backoff) meanwhile
    assert not flushed.done()
    clock.advance(5)
    await flushed  # every signal acked, i.e. stored
    assert patient.is_open
    await patient.close()


async def test_app_rate_limit_spares_other_apps(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, rate_limits=RateLimits(device_rate=0, app_rate=5, app_burst=30))
    first = RawDevice(server.address)
    first.hello("fit-1")  # 30 - 1
    assert (await first.read()).HasField("welcome")
    first.signals(*(event(f"a-{i}") for i in range(29)))  # 0 left
    assert (await first.read()).HasField("ack")
    second = RawDevice(server.address)
    second.hello("fit-2")  # another device of the same app
    error = await second.failure()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [s for s, _ in quota_violations(error)] == ["app:fitkit"]
    other = await device(server, "other", app_id="otherapp", api_key=None)
    await tracked_and_acked(other)
    await other.close()
    await first.close()
    await second.close()


# --- logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("debug", json=True, file=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()


def test_log_processor_drops_secrets_and_personal_data(log_output: io.StringIO) -> None:
    log = structlog.get_logger("test")
    log.info(
        "probe",
        authorization=f"Bearer {FITKIT_KEY}",
        api_key=FITKIT_KEY,
        token=DANA_TOKEN,
        user_id="user-1042",
        email="sam@example.com",
        subject="user:user-1042",
        context={"user.id": "user-1042", "user.first_name": "Sam", "location.city": "Lyon", "app.version": "4.2.0"},
        device_id="phone-1",
    )
    try:
        raise RuntimeError(f"call failed with metadata authorization: Bearer {ADMIN_TOKEN}")
    except RuntimeError:
        log.exception("crashed")
    text = log_output.getvalue()
    for secret in (FITKIT_KEY, DANA_TOKEN, ADMIN_TOKEN, "user-1042", "sam@example.com", "Sam", "Lyon"):
        assert secret not in text, secret
    probe = json.loads(text.splitlines()[0])
    assert probe["api_key"] == probe["token"] == probe["user_id"] == probe["subject"] == REDACTED
    assert probe["context"] == {
        "user.id": REDACTED,
        "user.first_name": REDACTED,
        "location.city": REDACTED,
        "app.version": "4.2.0",
    }
    assert probe["device_id"] == "phone-1"  # operational ids stay
    assert f"Bearer {REDACTED}" in text


def test_log_lines_are_json_with_a_utc_timestamp_and_any_value(log_output: io.StringIO) -> None:
    """The fast encoder (msgspec) and the once-a-second timestamp keep a line what it was: one JSON object, text
    as written (no escapes, so a leaked name is found by a plain search), an ISO UTC timestamp; a value JSON has
    no form for is written as its repr."""
    log = structlog.get_logger("test")
    log.info("probe", city="Tromsø", ratio=0.25, big=2**70, nested={"a": [1, 2.5, None]}, thing=object())
    log.info("int-key", counts={1: "one"})
    first, second = (json.loads(line) for line in log_output.getvalue().splitlines())
    assert "Tromsø" in log_output.getvalue()
    assert first["city"] == "Tromsø" and first["ratio"] == 0.25 and first["big"] == 2**70
    assert first["nested"] == {"a": [1, 2.5, None]} and first["thing"].startswith("<object object at")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", first["timestamp"]), first["timestamp"]
    stamped = datetime.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs(stamped.timestamp() - time.time()) < 60
    assert second["counts"] == {"1": "one"}


async def test_server_logs_never_show_credentials_or_users(start_server: StartServer, log_output: io.StringIO) -> None:
    server = await start_server(SYNC_FAILURE, auth=AUTH)
    dana = await associate(server, "dana", DANA_TOKEN)
    client = await device(server)
    await fail_sync(client)
    await client.accept(await client.next_cue(timeout=5))
    await dana.next_engagement(timeout=5)
    with pytest.raises(cuepoint.Rejected):
        await device(server, "intruder", api_key=OTHER_KEY)  # app mismatch
    with pytest.raises(cuepoint.Rejected):
        await associate(server, "dana", BOB_TOKEN)
    await client.close()
    await dana.close()
    text = log_output.getvalue()
    assert "session.opened" in text and "associate.signed_in" in text
    rejected = [json.loads(line) for line in text.splitlines() if '"auth.rejected"' in line]
    assert [r["method"].rsplit(".", 1)[1] for r in rejected] == ["DeviceService/Connect", "AssociateService/Connect"]
    assert "otherapp" in rejected[0]["error"]
    for secret in (FITKIT_KEY, OTHER_KEY, DANA_TOKEN, BOB_TOKEN, "user-1042"):
        assert secret not in text, secret
