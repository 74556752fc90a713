"""Several apps (brands) served by one installation (issue 18, item 5).

Each app has its own folder under scenarios/apps/<app>/ (scenarios, policy, queues with their disposition
codes), its own keys, associates limited to it and admins limited to it. Real server on port 0 with auth,
real SDK clients for devices and associates, AdminService over real gRPC.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.api.auth import AuthConfig, AuthConfigError
from cuepoint_server.app import CuepointServer
from cuepoint_server.scenarios.loader import ScenarioError, load_directory

from .conftest import StartServer

ALPHA_KEY = "alpha_live_1a2b3c4d5e6f7a8b"
BETA_KEY = "beta_live_2b3c4d5e6f7a8b9c"
ANN = "assoc_ann_3c4d5e6f7a8b9c0d"  # an associate of alpha
BOB = "assoc_bob_4d5e6f7a8b9c0d1e"  # an associate of beta
ALICE = "adm_alice_5e6f7a8b9c0d1e2f"  # an operator of alpha only
ROOT = "adm_root_6f7a8b9c0d1e2f3a"  # an operator of the whole installation

AUTH = AuthConfig.from_dict(
    {
        "apps": {"alpha": {"api_keys": [ALPHA_KEY]}, "beta": {"api_keys": [BETA_KEY]}},
        "associates": {
            "ann": {"token": ANN, "queues": ["*"], "apps": ["alpha"]},
            "bob": {"token": BOB, "queues": ["*"], "apps": ["beta"]},
        },
        "admin_tokens": [
            {"name": "alice", "token": ALICE, "roles": ["operator"], "apps": ["alpha"]},
            {"name": "root", "token": ROOT, "roles": ["operator"]},
        ],
    }
)

FILES = {
    # The installation's own: a scenario for every app and a queue both apps' engagements may enter.
    "shared.yaml": """
        scenarios:
          - id: shared-faq
            trigger: {event: faq}
            cue: {message: "Questions?", channel: chat, queue: shared}
        routing:
          queues: [{id: shared}]
    """,
    "apps/alpha/help.yaml": """
        scenarios:
          - id: alpha-help
            trigger: {event: help}
            cue: {message: "Alpha here to help", channel: chat, queue: alpha-support}
        routing:
          queues: [{id: alpha-support, dispositions: [fixed, not_fixed]}]
    """,
    # Beta's own policy: one cue per session, whatever the scenario.
    "apps/beta/help.yaml": """
        scenarios:
          - id: beta-help
            trigger: {event: help}
            cue: {message: "Beta is listening", channel: chat, queue: beta-support}
        policy:
          caps: {per_session: 1}
        routing:
          queues: [{id: beta-support, dispositions: [sorted]}]
    """,
}


def scenario_folder(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


async def start(start_server: StartServer, tmp_path: Path) -> CuepointServer:
    return await start_server(scenarios=scenario_folder(tmp_path / "scenarios", FILES), auth=AUTH)


async def device(server: CuepointServer, app_id: str, device_id: str) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id=app_id,
        device_id=device_id,
        context=cuepoint.Context(app_version="1.0.0", os="iOS"),
        user=cuepoint.User(user_id=f"{device_id}-user"),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(api_key=ALPHA_KEY if app_id == "alpha" else BETA_KEY, connect_timeout=5),
    )


async def associate(
    server: CuepointServer, associate_id: str, token: str, queues: list[str], capacity: int = 1
) -> cuepoint.AssociateClient:
    return await cuepoint.connect_associate(
        server.address,
        associate_id=associate_id,
        display_name=associate_id.title(),
        queues=queues,
        capacity=capacity,
        config=cuepoint.AssociateConfig(token=token, connect_timeout=5),
    )


async def cue_for(client: cuepoint.Client, event: str) -> cuepoint.Cue:
    await client.track(event)
    await client.flush(timeout=5)
    return await client.next_cue(timeout=5)


async def no_cue_after(client: cuepoint.Client, event: str) -> bool:
    await client.track(event)
    await client.flush(timeout=5)
    try:
        await client.next_cue(timeout=0.2)
    except cuepoint.TimedOut:
        return True
    return False


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_each_app_gets_its_own_cues_policy_queues_and_associates(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start(start_server, tmp_path)

    # An associate of alpha may not serve beta's queue, whatever the token's queue grant says.
    with pytest.raises(cuepoint.Rejected) as refused:
        await associate(server, "ann", ANN, ["alpha-support", "beta-support"])
    assert refused.value.code == "PERMISSION_DENIED"
    ann = await associate(server, "ann", ANN, ["alpha-support", "shared"])

    # The same event, each app's own scenario: a device of one app never gets the other's cue.
    alpha = await device(server, "alpha", "alpha-phone")
    beta = await device(server, "beta", "beta-phone")
    alpha_cue = await cue_for(alpha, "help")
    beta_cue = await cue_for(beta, "help")
    assert (alpha_cue.scenario_id, alpha_cue.message) == ("alpha-help", "Alpha here to help")
    assert (beta_cue.scenario_id, beta_cue.message) == ("beta-help", "Beta is listening")

    # Alpha's engagement reaches Ann; beta's waits in beta's queue for an associate of beta.
    alpha_engagement = await alpha.accept(alpha_cue)
    taken = await ann.next_engagement(timeout=5)
    assigned = await alpha_engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert taken.engagement_id == assigned.engagement_id
    await ann.end(taken, disposition="fixed")
    beta_engagement = await beta.accept(beta_cue)
    await beta_engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)

    # An installation-wide queue: Ann serves it, yet a beta engagement in it never reaches her.
    beta_faq = await device(server, "beta", "beta-faq")
    faq_engagement = await beta_faq.accept(await cue_for(beta_faq, "faq"))
    await faq_engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
    with pytest.raises(cuepoint.TimedOut):
        await ann.next_engagement(timeout=0.3)
    stored = await server.store.get_engagement(faq_engagement.engagement_id)
    assert stored is not None and (stored.queue, stored.state, stored.associate_id) == ("shared", "queued", "")
    # Bob, of beta, signs in to the same queues and takes both of beta's engagements.
    bob = await associate(server, "bob", BOB, ["beta-support", "shared"], capacity=2)
    got = {(await bob.next_engagement(timeout=5)).engagement_id for _ in range(2)}
    assert got == {beta_engagement.engagement_id, faq_engagement.engagement_id}
    assert not ann.active

    # Beta's own policy (one cue per session) holds for beta's devices only.
    beta_two = await device(server, "beta", "beta-two")
    await beta_two.decline(await cue_for(beta_two, "faq"))
    assert await no_cue_after(beta_two, "help")
    alpha_two = await device(server, "alpha", "alpha-two")
    await alpha_two.decline(await cue_for(alpha_two, "faq"))
    assert (await cue_for(alpha_two, "help")).scenario_id == "alpha-help"
    await server.core.drain()
    decisions = await server.store.decisions_for_device("beta-two")
    assert [(d.scenario_id, d.reason) for d in decisions if d.outcome == "blocked"] == [("beta-help", "cap")]
    for c in (alpha, beta, beta_faq, beta_two, alpha_two, ann, bob):
        await c.close()


async def test_an_admin_of_one_app_sees_and_changes_nothing_of_another(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start(start_server, tmp_path)
    alpha = await device(server, "alpha", "alpha-phone")
    beta = await device(server, "beta", "beta-phone")
    await alpha.decline(await cue_for(alpha, "help"))
    await beta.decline(await cue_for(beta, "help"))
    await server.core.drain()

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        alice, root = bearer(ALICE), bearer(ROOT)

        async def refused(method: str, request: object) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await getattr(stub, method)(request, metadata=alice)
            return raised.value.code()

        denied = grpc.StatusCode.PERMISSION_DENIED
        # Beta's funnel, live sessions, devices and switches: refused, naming why.
        assert await refused("GetFunnel", admin_pb2.GetFunnelRequest(scenario_id="beta-help")) is denied
        assert await refused("ListLiveSessions", admin_pb2.ListLiveSessionsRequest(app_id="beta")) is denied
        assert await refused("ExplainDevice", admin_pb2.ExplainDeviceRequest(device_id="beta-phone")) is denied
        assert (
            await refused("ForgetDeviceCredential", admin_pb2.ForgetDeviceCredentialRequest(device_id="beta-phone"))
            is denied
        )
        for scenario_id in ("beta-help", "shared-faq"):  # another app's, and every app's
            request = admin_pb2.SetScenarioEnabledRequest(scenario_id=scenario_id, enabled=False, reason="x")
            assert await refused("SetScenarioEnabled", request) is denied
        # What acts on every app at once needs an admin of every app.
        assert await refused("SetOffersPaused", admin_pb2.SetOffersPausedRequest(paused=True)) is denied
        assert await refused("EraseUser", admin_pb2.EraseUserRequest(user_id="beta-phone-user")) is denied

        # Nothing changed: beta's scenario is on, offers flow, beta's device credential is kept.
        assert server.core.scenario_enabled("beta-help") and server.core.scenario_enabled("shared-faq")
        assert not server.core.offers_paused
        assert await server.store.device_credential("beta-phone") is not None
        beta_two = await device(server, "beta", "beta-two")
        assert (await cue_for(beta_two, "help")).scenario_id == "beta-help"

        # Reads show alpha's part only.
        scenarios = await stub.GetScenarios(admin_pb2.GetScenariosRequest(), metadata=alice)
        assert [s.id for s in scenarios.scenarios] == ["alpha-help"]
        funnel = await stub.GetFunnel(admin_pb2.GetFunnelRequest(), metadata=alice)
        assert [(r.scenario_id, r.offered) for r in funnel.rows] == [("alpha-help", 1)]
        live = await stub.ListLiveSessions(admin_pb2.ListLiveSessionsRequest(), metadata=alice)
        assert {s.device_id for s in live.sessions} == {"alpha-phone"}
        assert {q.queue for q in live.queues} <= {"alpha-support"}
        explained = await stub.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="alpha-phone"), metadata=alice)
        assert [c.scenario_id for c in explained.scenarios] == ["alpha-help"]
        # Alice's own switch works, on her app only.
        await stub.SetScenarioEnabled(
            admin_pb2.SetScenarioEnabledRequest(scenario_id="alpha-help", enabled=False, reason="copy"), metadata=alice
        )
        assert not server.core.scenario_enabled("alpha-help") and server.core.scenario_enabled("beta-help")

        # An admin of every app sees both.
        everything = await stub.GetScenarios(admin_pb2.GetScenariosRequest(), metadata=root)
        assert {s.id for s in everything.scenarios} == {"alpha-help", "beta-help", "shared-faq"}
        all_live = await stub.ListLiveSessions(admin_pb2.ListLiveSessionsRequest(), metadata=root)
        assert {s.device_id for s in all_live.sessions} == {"alpha-phone", "beta-phone", "beta-two"}
        all_funnel = await stub.GetFunnel(admin_pb2.GetFunnelRequest(), metadata=root)
        assert {r.scenario_id for r in all_funnel.rows} == {"alpha-help", "beta-help"}
        beta_explained = await stub.ExplainDevice(admin_pb2.ExplainDeviceRequest(device_id="beta-phone"), metadata=root)
        assert beta_explained.decisions

        # The trail: every refusal is on it as denied; Alice reads her app's admins' entries only.
        trail = await stub.ListAuditEntries(admin_pb2.ListAuditEntriesRequest(limit=100), metadata=root)
        alices = [(e.action, e.outcome) for e in trail.entries if e.actor == "admin:alice"]
        assert ("SetScenarioEnabled", admin_pb2.AUDIT_OUTCOME_DENIED) in alices
        assert ("SetOffersPaused", admin_pb2.AUDIT_OUTCOME_DENIED) in alices
        assert ("SetScenarioEnabled", admin_pb2.AUDIT_OUTCOME_OK) in alices
        mine = await stub.ListAuditEntries(admin_pb2.ListAuditEntriesRequest(limit=100), metadata=alice)
        assert mine.entries and {e.actor for e in mine.entries} == {"admin:alice"}
        assert all("app:alpha" in e.roles for e in mine.entries)
        changed = [
            e for e in mine.entries if e.action == "SetScenarioEnabled" and e.outcome == admin_pb2.AUDIT_OUTCOME_OK
        ]
        assert json.loads(changed[0].after_json)["enabled"] is False
    for c in (alpha, beta, beta_two):
        await c.close()


def test_an_app_folder_cannot_reach_into_another_app(tmp_path: Path) -> None:
    folder = scenario_folder(
        tmp_path / "scenarios",
        {
            **FILES,
            "apps/alpha/bad.yaml": """
                scenarios:
                  - id: alpha-poach
                    trigger: {event: help}
                    cue: {message: "Mine", channel: chat, queue: beta-support}
                  - id: alpha-other
                    apps: [beta]
                    trigger: {event: help}
                    cue: {message: "Also mine", channel: chat, queue: alpha-support}
            """,
            "everyone.yaml": """
                id: everyone-help
                trigger: {event: help}
                cue: {message: "Hello", channel: chat, queue: alpha-support}
            """,
        },
    )
    with pytest.raises(ScenarioError) as raised:
        load_directory(folder)
    found = {(Path(i.file).name, i.field, i.message.split(";")[0]) for i in raised.value.issues}
    assert found == {
        ("bad.yaml", "cue.queue", "queue 'beta-support' belongs to app 'beta'"),
        ("bad.yaml", "apps", "a file under apps/alpha/ applies to app 'alpha' only"),
        ("everyone.yaml", "cue.queue", "queue 'alpha-support' belongs to app 'alpha'"),
    }
    # The good folder loads, every scenario of an app folder scoped to its app.
    good = load_directory(scenario_folder(tmp_path / "good", FILES))
    assert {s.spec.id: s.spec.apps for s in good.scenarios} == {
        "shared-faq": [],
        "alpha-help": ["alpha"],
        "beta-help": ["beta"],
    }
    assert good.queue_owners() == {"alpha-support": "alpha", "beta-support": "beta"}


def test_app_scopes_in_the_auth_file_name_known_apps() -> None:
    with pytest.raises(AuthConfigError, match=r"admin_tokens\[0\]\.apps: unknown app"):
        AuthConfig.from_dict(
            {
                "apps": {"alpha": {"api_keys": [ALPHA_KEY]}},
                "admin_tokens": [{"name": "x", "token": ALICE, "roles": ["viewer"], "apps": ["gamma"]}],
            }
        )
    with pytest.raises(AuthConfigError, match=r"associates\.ann\.apps: unknown app"):
        AuthConfig.from_dict({"associates": {"ann": {"token": ANN, "queues": ["*"], "apps": ["alpha"]}}})
