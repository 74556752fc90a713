"""Rich cues, localised texts and A/B variants (issue 17), end to end: real server on port 0, real SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2
from cuepoint_server.app import CuepointServer
from cuepoint_server.cli import main
from cuepoint_server.clock import ManualClock
from cuepoint_server.engine.variants import assign_variant
from cuepoint_server.reporting.stats import two_proportion_test, wilson_interval
from cuepoint_server.storage import CueRecord

from .conftest import StartServer, db_option
from .test_e2e_foundation import RawDevice, _raw_signal

RICH = """
milestones:
  - {id: synced, when: {event: sync_succeeded}}
scenarios:
  - id: sync-rich
    trigger: {event: sync_failed}
    outcome: synced
    cue:
      title: "Sync trouble, {{ user.first_name }}?"
      message: "Unable to sync? I can help you."
      channel: audio
      upgrades: [chat, video]
      ttl: 10m
      queue: support
      image: {url: "https://cdn.example.com/sync.png", alt: "A phone syncing"}
      layout: modal
      buttons:
        - {id: call, label: "Call me", action: accept}
        - {id: chat, label: "Chat instead", action: accept, channel: chat}
        - {id: faq, label: "Read the FAQ", action: open_url, url: "fitkit://help/sync"}
      locales:
        pt:
          title: "Problemas, {{ user.first_name }}?"
          message: "Não sincroniza? Posso ajudar."
          buttons: {call: "Ligar", chat: "Conversar"}
          image_alt: "Um telefone"
        pt-BR: {message: "Não está sincronizando? Posso ajudar."}
"""


async def device(
    server: CuepointServer, device_id: str, *, locale: str = "", user_id: str | None = None
) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(app_version="4.2.0", os="iOS", locale=locale),
        user=cuepoint.User(user_id=user_id or f"user-{device_id}", tier="premium", attributes={"first_name": "Sam"}),
        consent=cuepoint.Consent.FULL,
    )


async def settled(server: CuepointServer, cue_id: str) -> CueRecord:
    """The stored cue once an answer reached it (the answer travels on the stream after press() returns)."""
    async with asyncio.timeout(5):
        while True:
            await server.core.drain()
            stored = await server.store.get_cue(cue_id)
            if stored is not None and stored.status != "offered":
                return stored
            await asyncio.sleep(0.01)


async def cue_after(client: cuepoint.Client, event: str = "sync_failed") -> cuepoint.Cue:
    await client.track(event)
    await client.flush()
    return await client.next_cue(timeout=5)


async def test_rich_cue_is_typed_localised_and_records_the_button(start_server: StartServer) -> None:
    server = await start_server(RICH)
    associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["support"])

    # pt-BR: its own message; the title, labels and alt text fall back to pt; the FAQ label to the default.
    brazil = await device(server, "br-phone", locale="pt-BR")
    cue = await cue_after(brazil)
    assert (cue.locale, cue.message, cue.title) == ("pt-BR", "Não está sincronizando? Posso ajudar.", "Problemas, Sam?")
    assert cue.layout is cuepoint.CueLayout.MODAL
    assert cue.image == cuepoint.CueImage("https://cdn.example.com/sync.png", "Um telefone")
    assert cue.buttons == (
        cuepoint.CueButton("call", "Ligar", cuepoint.ButtonAction.ACCEPT, None, ""),
        cuepoint.CueButton("chat", "Conversar", cuepoint.ButtonAction.ACCEPT, cuepoint.Channel.CHAT, ""),
        cuepoint.CueButton("faq", "Read the FAQ", cuepoint.ButtonAction.OPEN_URL, None, "fitkit://help/sync"),
    )
    # The chat button accepts on chat rather than the cue's audio.
    engagement = await brazil.press(cue, "chat")
    assert engagement is not None
    update = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    assert update.channel is cuepoint.Channel.CHAT
    offered = await associate.next_engagement(timeout=5)
    assert offered.channel is cuepoint.Channel.CHAT
    stored = await server.store.get_cue(cue.cue_id)
    assert stored is not None and (stored.status, stored.button_id, stored.locale) == ("accepted", "chat", "pt-BR")

    # pt_PT: only the language matches; the link button answers "opened".
    portugal = await device(server, "pt-phone", locale="pt_PT")
    cue = await cue_after(portugal)
    assert (cue.locale, cue.message, [b.label for b in cue.buttons]) == (
        "pt",
        "Não sincroniza? Posso ajudar.",
        ["Ligar", "Conversar", "Read the FAQ"],
    )
    assert await portugal.press(cue, cue.buttons[2]) is None
    stored = await settled(server, cue.cue_id)
    assert (stored.status, stored.button_id) == ("opened", "faq")

    # No translation for German: the default texts.
    germany = await device(server, "de-phone", locale="de-DE")
    cue = await cue_after(germany)
    assert (cue.locale, cue.message, cue.title, cue.image and cue.image.alt_text) == (
        "",
        "Unable to sync? I can help you.",
        "Sync trouble, Sam?",
        "A phone syncing",
    )
    with pytest.raises(cuepoint.Rejected):
        await germany.press(cue, "no-such-button")
    await germany.decline(cue)  # buttons are optional for the answer

    for client in (brazil, portugal, germany):
        await client.close()
    await associate.close()


@pytest.mark.parametrize(
    ("button", "kind", "field"),
    [
        ("nope", common_pb2.CUE_RESPONSE_KIND_DECLINED, "cue_response.button_id"),
        ("faq", common_pb2.CUE_RESPONSE_KIND_ACCEPTED, "cue_response.kind"),
    ],
)
async def test_a_button_the_cue_lacks_or_contradicts_is_invalid_argument(
    start_server: StartServer, button: str, kind: common_pb2.CueResponseKind.ValueType, field: str
) -> None:
    server = await start_server(RICH)
    raw = RawDevice(server.address, "raw-phone")
    assert (await raw.read()).HasField("welcome")
    raw.send(_raw_signal("s-1", "sync_failed"))
    cue_id = ""
    while not cue_id:
        message = await raw.read()
        if message.HasField("cue"):
            cue_id = message.cue.cue_id
            assert [b.button_id for b in message.cue.buttons] == ["call", "chat", "faq"]
    answer = device_pb2.CueResponse(cue_id=cue_id, kind=kind, button_id=button)
    raw.outgoing.put_nowait(device_pb2.DeviceMessage(cue_response=answer))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await raw.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    await raw.close()


async def test_a_re_offered_cue_keeps_its_buttons_and_locale_after_a_restart(start_server: StartServer) -> None:
    server = await start_server(RICH)
    first = await device(server, "phone-r", locale="pt")
    cue = await cue_after(first)
    await first.close()
    await server.core.drain()
    scenarios = server.config.scenarios
    db = server.config.db
    await server.stop(0.5)

    again = await start_server(scenarios=Path(scenarios), db=Path(db))
    second = await device(again, "phone-r", locale="pt")
    restored = await second.next_cue(timeout=5)
    assert restored.cue_id == cue.cue_id
    assert (restored.locale, restored.message, restored.buttons, restored.image, restored.layout) == (
        cue.locale,
        cue.message,
        cue.buttons,
        cue.image,
        cue.layout,
    )
    await second.close()


AB = """
milestones:
  - {id: synced, when: {event: sync_succeeded}}
scenarios:
  - id: sync-ab
    trigger: {event: sync_failed}
    outcome: synced
    cue:
      message: "Unable to sync? I can help you."
      channel: audio
      ttl: 10m
      locales: {fr: {message: "Problème de synchro ? Je peux aider."}}
    variants:
      - {id: control, weight: 1}
      - id: short
        weight: 1
        message: "Sync broken? Tap to chat."
        channel: chat
        buttons: [{id: go, label: "Chat now", action: accept}]
        locales: {fr: {message: "Synchro cassée ? Discutons.", buttons: {go: "Discuter"}}}
"""

WEIGHTS = (("control", 1.0), ("short", 1.0))


async def admin(server: CuepointServer) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(grpc.aio.insecure_channel(server.address))


async def test_variants_are_stable_per_user_split_the_funnel_and_can_be_stopped(
    start_server: StartServer, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(AB)
    users = [f"ab{i:02d}" for i in range(24)]
    expected = {u: assign_variant(f"user:{u}", "sync-ab", WEIGHTS) for u in users}
    assert set(expected.values()) == {"control", "short"}
    clients = {u: await device(server, u, user_id=u, locale="fr-CA" if i % 3 == 0 else "") for i, u in enumerate(users)}
    for i, (user, client) in enumerate(clients.items()):
        cue = await cue_after(client)
        assert cue.variant == expected[user]
        french = i % 3 == 0
        if cue.variant == "short":
            assert cue.channel is cuepoint.Channel.CHAT
            assert cue.message == ("Synchro cassée ? Discutons." if french else "Sync broken? Tap to chat.")
            assert [b.label for b in cue.buttons] == (["Discuter"] if french else ["Chat now"])
        else:
            assert cue.channel is cuepoint.Channel.AUDIO and cue.buttons == ()
            assert cue.message == (
                "Problème de synchro ? Je peux aider." if french else "Unable to sync? I can help you."
            )
        assert cue.locale == ("fr" if french else "")
    # Converted: every "short" user and every third control user reach the outcome.
    converted = [u for i, u in enumerate(users) if expected[u] == "short" or i % 3 == 1]
    for user in converted:
        await clients[user].track("sync_succeeded")
        await clients[user].flush()

    # The same user on another device: the same variant.
    other = next(u for u in users if expected[u] == "short")
    second_phone = await device(server, f"{other}-tablet", user_id=other)
    assert (await cue_after(second_phone)).variant == "short"
    await second_phone.close()

    await server.core.drain()
    stub = await admin(server)
    (row,) = (await stub.GetFunnel(admin_pb2.GetFunnelRequest(scenario_id="sync-ab"))).rows
    assert [(v.variant_id, v.control) for v in row.variants] == [("control", True), ("short", False)]
    counts = {}
    for v in row.variants:
        members = [u for u in users if expected[u] == v.variant_id]
        won = [u for u in members if u in converted]
        sessions = len(members) + (1 if v.variant_id == "short" else 0)  # the tablet's session
        assert (v.offered, v.conversion.sessions, v.conversion.converted) == (sessions, sessions, len(won))
        assert (v.ci_low, v.ci_high) == pytest.approx(wilson_interval(len(won), sessions))
        counts[v.variant_id] = (len(won), sessions)
    p_value, difference = two_proportion_test(*counts["short"], *counts["control"])
    assert (row.variants[1].p_value, row.variants[1].difference) == pytest.approx((p_value, difference))
    assert (row.variants[0].p_value, row.variants[0].difference) == (1.0, 0.0)
    # `cuepoint report` prints the same split from the database file.
    assert await asyncio.to_thread(main, ["report", *db_option(server), "--since", "all"]) == 0
    report = capsys.readouterr().out
    won, sessions = counts["short"]
    assert f"sync-ab: short  offered {sessions}  accepted 0  conv. {won}/{sessions}" in report
    assert f"{difference:+.1%} p={p_value:.3f}" in report

    # Stop "short" without a release: its users see the control; the control cannot be stopped.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetVariantStopped(admin_pb2.SetVariantStoppedRequest(scenario_id="sync-ab", variant_id="control"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "variant_id" in (info.value.details() or "")
    stopped = await stub.SetVariantStopped(
        admin_pb2.SetVariantStoppedRequest(scenario_id="sync-ab", variant_id="short", stopped=True, reason="test")
    )
    assert [(v.variant_id, v.stopped) for v in stopped.variants] == [("control", False), ("short", True)]
    late = next(f"late{i}" for i in range(100) if assign_variant(f"user:late{i}", "sync-ab", WEIGHTS) == "short")
    phone = await device(server, late, user_id=late)
    assert (await cue_after(phone)).variant == "control"
    await phone.close()
    for client in clients.values():
        await client.close()

    # Persisted: a restarted server still serves the control to "short" users.
    scenarios, db = server.config.scenarios, server.config.db
    await server.stop(0.5)

    again = await start_server(scenarios=Path(scenarios), db=Path(db))
    info_after = await (await admin(again)).GetScenarios(admin_pb2.GetScenariosRequest())
    assert [(v.variant_id, v.weight, v.control, v.stopped) for v in info_after.scenarios[0].variants] == [
        ("control", 1.0, True, False),
        ("short", 1.0, False, True),
    ]
    late2 = next(f"later{i}" for i in range(100) if assign_variant(f"user:later{i}", "sync-ab", WEIGHTS) == "short")
    phone = await device(again, late2, user_id=late2)
    assert (await cue_after(phone)).variant == "control"
    await phone.close()
    await asyncio.sleep(0)
