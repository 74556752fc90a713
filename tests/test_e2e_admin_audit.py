"""Admin roles and the audit trail (issue 11, item 8).

Real server on port 0 with auth, AdminService over real gRPC, the real reload path and `cuepoint audit`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.api.auth import AuthConfig, AuthConfigError

from .conftest import StartServer, db_option

FITKIT_KEY = "fk_test_4f9a1c2e7b3d5a60"
LEGACY = "adm_legacy_5c1e9a7f3b2d4c6e"  # listed without roles: every role, as before roles existed
TOKENS = {
    "viewer": "adm_viewer_1a2b3c4d5e6f7a8b",
    "author": "adm_author_2b3c4d5e6f7a8b9c",
    "operator": "adm_operator_3c4d5e6f7a8b9c0d",
    "privacy": "adm_privacy_4d5e6f7a8b9c0d1e",
}
NAMES = {"viewer": "vera", "author": "ada", "operator": "otto", "privacy": "pia"}
AUTH = AuthConfig.from_dict(
    {
        "apps": {"fitkit": {"api_keys": [FITKIT_KEY]}},
        "admin_tokens": [
            LEGACY,
            *({"name": NAMES[role], "token": token, "roles": [role]} for role, token in TOKENS.items()),
        ],
    }
)
PING = """
id: ping
trigger: {event: ping}
cue: {message: "pong", channel: chat}
"""

# A request for every AdminService method that passes validation, so only the role decides.
REQUESTS: dict[str, Any] = {
    "ExplainDevice": admin_pb2.ExplainDeviceRequest(device_id="phone-1"),
    "SetOffersPaused": admin_pb2.SetOffersPausedRequest(paused=False),
    "GetScenarios": admin_pb2.GetScenariosRequest(),
    "GetFunnel": admin_pb2.GetFunnelRequest(),
    "ListLiveSessions": admin_pb2.ListLiveSessionsRequest(),
    "SetVariantStopped": admin_pb2.SetVariantStoppedRequest(scenario_id="nope", variant_id="a"),
    "ExportUser": admin_pb2.ExportUserRequest(user_id="user-1"),
    "EraseUser": admin_pb2.EraseUserRequest(user_id="nobody"),
    "ForgetDeviceCredential": admin_pb2.ForgetDeviceCredentialRequest(device_id="phone-1"),
    "GetModelReport": admin_pb2.GetModelReportRequest(),
    "SetScenarioEnabled": admin_pb2.SetScenarioEnabledRequest(scenario_id="ping", enabled=True),
    "ListDeadWebhooks": admin_pb2.ListDeadWebhooksRequest(),
    "RedeliverWebhook": admin_pb2.RedeliverWebhookRequest(delivery_id="none"),
    "ListAuditEntries": admin_pb2.ListAuditEntriesRequest(),
    "GetHandlingTimes": admin_pb2.GetHandlingTimesRequest(),
}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write(folder: Path, name: str, text: str) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, folder / name)


async def call(stub: admin_pb2_grpc.AdminServiceStub, method: str, token: str) -> grpc.StatusCode:
    try:
        await getattr(stub, method)(REQUESTS[method], metadata=bearer(token))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_admin_rpc_needs_a_role(start_server: StartServer) -> None:
    server = await start_server(PING, auth=AUTH)
    methods = list(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)
    assert set(methods) == set(REQUESTS), "a new AdminService method needs a request here"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        allowed: dict[str, set[str]] = {}
        for method in methods:
            allowed[method] = set()
            for role, token in TOKENS.items():
                code = await call(stub, method, token)
                if code is grpc.StatusCode.PERMISSION_DENIED:
                    continue
                allowed[method].add(role)
            # No method is open to every role; the legacy token (no roles listed) may call everything.
            assert allowed[method] != set(TOKENS), method
            assert allowed[method], method
            assert await call(stub, method, LEGACY) is not grpc.StatusCode.PERMISSION_DENIED
        assert allowed["SetOffersPaused"] == {"operator"}
        assert allowed["EraseUser"] == allowed["ExportUser"] == {"privacy"}
        assert "viewer" in allowed["ExplainDevice"] and "viewer" not in allowed["ListAuditEntries"]
        # The refusal names the role that is missing.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EraseUser(REQUESTS["EraseUser"], metadata=bearer(TOKENS["operator"]))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "admin 'otto' lacks the role 'privacy' needed for AdminService.EraseUser" in (info.value.details() or "")


def test_admin_token_roles_are_checked_in_the_auth_file() -> None:
    with pytest.raises(AuthConfigError, match=r"admin_tokens\[0\]\.roles: unknown role 'root'"):
        AuthConfig.from_dict({"admin_tokens": [{"name": "x", "token": TOKENS["viewer"], "roles": ["root"]}]})
    with pytest.raises(AuthConfigError, match=r"admin_tokens\[0\]\.roles"):
        AuthConfig.from_dict({"admin_tokens": [{"name": "x", "token": TOKENS["viewer"], "roles": []}]})
    with pytest.raises(AuthConfigError, match=r"admin_tokens\[0\]\.name: 'admin' is already used"):
        AuthConfig.from_dict({"admin_tokens": [{"name": "admin", "token": TOKENS["viewer"], "roles": ["viewer"]}]})
    with pytest.raises(AuthConfigError, match=r"admin_tokens\[1\]\.name: 'x' is already used"):
        AuthConfig.from_dict(
            {
                "admin_tokens": [
                    {"name": "x", "token": TOKENS["viewer"], "roles": ["viewer"]},
                    {"name": "x", "token": TOKENS["author"], "roles": ["author"]},
                ]
            }
        )


async def test_admin_actions_are_audited_durably_with_before_and_after(
    start_server: StartServer, tmp_path: Path
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    write(folder, "ping.yaml", PING)
    db = tmp_path / "audit.db"
    server = await start_server(scenarios=folder, db=db, auth=AUTH)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        operator, privacy, viewer = (bearer(TOKENS[r]) for r in ("operator", "privacy", "viewer"))
        await stub.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=True, reason="incident 42"), metadata=operator)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SetOffersPaused(admin_pb2.SetOffersPausedRequest(paused=False), metadata=viewer)
        await stub.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="phone-9"), metadata=viewer)
        await stub.ExportUser(admin_pb2.ExportUserRequest(user_id="alice@example.com"), metadata=privacy)
        await stub.EraseUser(admin_pb2.EraseUserRequest(user_id="alice@example.com"), metadata=privacy)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ExplainDevice(admin_pb2.ExplainDeviceRequest(), metadata=viewer)  # INVALID_ARGUMENT
        await stub.GetScenarios(admin_pb2.GetScenariosRequest(), metadata=bearer(LEGACY))
        # A reload is an admin action too: the server records it as itself, with the versions.
        assert server.reloader is not None
        write(folder, "more.yaml", PING.replace("id: ping", "id: ping-2").replace("event: ping", "event: ping2"))
        async with asyncio.timeout(5):
            await server.reloader.wait_until(lambda r: r.version.number >= 2)

        async def entries() -> list[admin_pb2.AuditEntry]:
            reply = await stub.ListAuditEntries(admin_pb2.ListAuditEntriesRequest(limit=50), metadata=operator)
            return list(reply.entries)

        async with asyncio.timeout(5):
            # The server writes a reload's entry from its own task, right after the swap.
            while not any(e.action == "scenarios.reload" for e in await entries()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        found = list(reversed(await entries()))  # oldest first

    def one(action: str, actor: str, outcome: int = admin_pb2.AUDIT_OUTCOME_OK) -> admin_pb2.AuditEntry:
        (entry,) = [e for e in found if (e.action, e.actor, e.outcome) == (action, actor, outcome)]
        return entry

    paused = one("SetOffersPaused", "admin:otto")
    assert list(paused.roles) == ["operator"] and paused.target == "offers"
    assert json.loads(paused.before_json) == {"paused": False}
    assert json.loads(paused.after_json) == {"paused": True, "reason": "incident 42"}
    denied = one("SetOffersPaused", "admin:vera", admin_pb2.AUDIT_OUTCOME_DENIED)
    assert "lacks the role 'operator'" in denied.detail
    assert one("ExplainDevice", "admin:vera").target == "device:phone-9"  # token use, read-only calls too
    failed = one("ExplainDevice", "admin:vera", admin_pb2.AUDIT_OUTCOME_FAILED)
    assert "INVALID_ARGUMENT" in failed.detail
    erased = one("EraseUser", "admin:pia")
    digest = "user-sha256:" + hashlib.sha256(b"alice@example.com").hexdigest()[:32]
    assert erased.target == one("ExportUser", "admin:pia").target == digest
    assert "deleted" in json.loads(erased.after_json)
    legacy = one("GetScenarios", "admin:admin")
    assert set(legacy.roles) == {"viewer", "author", "operator", "privacy"}
    reload = one("scenarios.reload", "system:file-change")
    assert json.loads(reload.before_json)["version"] == 1
    assert json.loads(reload.after_json)["version"] == 2 and json.loads(reload.after_json)["added"] == ["ping-2"]
    assert all(e.time.seconds > 0 for e in found)
    # No erased value is kept by the audit trail.
    assert not any("alice@example.com" in str(e) for e in found)

    # Durable: after the server stops, `cuepoint audit` reads the same entries from the database.
    await server.stop(0.5)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cuepoint_server.cli", "audit", *db_option(server), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(r["actor"], r["action"], r["outcome"]) for r in rows} >= {
        ("admin:otto", "SetOffersPaused", "ok"),
        ("admin:vera", "SetOffersPaused", "denied"),
        ("admin:pia", "EraseUser", "ok"),
        ("system:file-change", "scenarios.reload", "ok"),
    }
    text = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cuepoint_server.cli", "audit", *db_option(server), "--action", "SetOffersPaused"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and len(lines) == 2, text.stdout
    assert "admin:vera" in lines[0] and "denied" in lines[0]  # newest first
    assert "admin:otto" in lines[1] and '"paused": true' in lines[1]


async def test_console_switches_need_roles_and_are_audited(start_server: StartServer) -> None:
    import aiohttp

    server = await start_server(PING, auth=AUTH, http_port=0)

    async def console(role: str) -> tuple[aiohttp.ClientSession, dict[str, str]]:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with http.post(f"{server.http_url}/api/console/session", json={"token": TOKENS[role]}) as response:
            assert response.status == 200, await response.text()
            return http, {"X-CSRF-Token": str((await response.json())["csrf"])}

    viewer, viewer_csrf = await console("viewer")
    operator, operator_csrf = await console("operator")
    author, author_csrf = await console("author")
    try:
        async with viewer.post(f"{server.http_url}/api/console/pause", json={"paused": True}, headers=viewer_csrf) as r:
            assert r.status == 403 and "lacks the role 'operator'" in await r.text()
        assert not server.core.offers_paused
        async with operator.post(
            f"{server.http_url}/api/console/pause", json={"paused": True, "reason": "drill"}, headers=operator_csrf
        ) as r:
            assert r.status == 200
        url = f"{server.http_url}/api/console/scenarios/ping/enabled"
        async with author.post(url, json={"enabled": False}, headers=author_csrf) as r:
            assert r.status == 200 and (await r.json())["enabled"] is False
    finally:
        for http in (viewer, operator, author):
            await http.close()
    assert server.audit is not None
    found = {(e.actor, e.action, e.outcome): e for e in await server.audit.entries()}
    assert ("admin:vera", "console.pause", "denied") in found
    paused = found["admin:otto", "console.pause", "ok"]
    assert (dict(paused.before), dict(paused.after)) == ({"paused": False}, {"paused": True, "reason": "drill"})
    switched = found["admin:ada", "console.set_enabled", "ok"]
    assert (switched.target, dict(switched.before), dict(switched.after)) == (
        "ping",
        {"enabled": True},
        {"enabled": False},
    )
