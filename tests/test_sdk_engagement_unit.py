"""SDK engagement features without a server: conversions, local validation, reply matching.

Chat, upgrades, call signalling, fallback and manual claim are exercised end
to end against the real server elsewhere; here are the pieces that need none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import cuepoint
from cuepoint import _convert, _validate
from cuepoint._conversation import Conversation
from cuepoint._convert import EngagementPayload
from cuepoint.engagement import Engagement
from cuepoint.v1 import associate_pb2, common_pb2, device_pb2

T0 = 1_700_000_000.25


def ts(seconds: float) -> Timestamp:
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=round((seconds - whole) * 1e9))


# --- public surface -------------------------------------------------------------


def test_new_names_are_exported() -> None:
    for name in (
        "ChatMessage",
        "Party",
        "UpgradeRequest",
        "ChannelChange",
        "CallSignal",
        "CallSignalKind",
        "FallbackOffer",
        "FallbackOption",
        "PriorEngagement",
        "Presence",
    ):
        assert name in cuepoint.__all__ and hasattr(cuepoint, name), name
    assert [p.name for p in cuepoint.Party] == ["USER", "ASSOCIATE", "SYSTEM"]
    assert [k.name for k in cuepoint.CallSignalKind] == ["OFFER", "ANSWER", "CANDIDATE", "HANGUP"]
    assert [o.name for o in cuepoint.FallbackOption] == ["CALLBACK", "CHAT", "CANCEL"]
    assert [p.name for p in cuepoint.Presence] == ["AVAILABLE", "BUSY", "AWAY"]


def test_callback_requested_sits_between_assigned_and_ended() -> None:
    state = cuepoint.EngagementState
    ranks = [state.QUEUED.rank, state.ASSIGNED.rank, state.CALLBACK_REQUESTED.rank, state.ENDED.rank]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4
    assert _convert.state_from_proto(common_pb2.ENGAGEMENT_STATE_CALLBACK_REQUESTED) is state.CALLBACK_REQUESTED
    assert _convert.state_to_proto(state.CALLBACK_REQUESTED) == common_pb2.ENGAGEMENT_STATE_CALLBACK_REQUESTED


def test_models_are_frozen() -> None:
    message = cuepoint.ChatMessage("e", "m", cuepoint.Party.USER, "hi", T0)
    with pytest.raises(AttributeError):
        message.text = "changed"  # type: ignore[misc]


# --- enums ------------------------------------------------------------------------


def test_enum_conversions_round_trip_and_unspecified_is_none() -> None:
    pairs = [
        (cuepoint.Party, _convert.party_to_proto, _convert.party_from_proto),
        (cuepoint.CallSignalKind, _convert.call_signal_kind_to_proto, _convert.call_signal_kind_from_proto),
        (cuepoint.FallbackOption, _convert.fallback_option_to_proto, _convert.fallback_option_from_proto),
        (cuepoint.Presence, _convert.presence_to_proto, _convert.presence_from_proto),
    ]
    for enum_cls, to_pb, from_pb in pairs:
        for member in enum_cls:
            value = to_pb(member)  # type: ignore[operator]
            assert value != 0 and from_pb(value) is member  # type: ignore[operator]
        assert to_pb(None) == 0  # type: ignore[operator]
        assert from_pb(0) is None  # type: ignore[operator]
        assert from_pb(99) is None  # type: ignore[operator]  # a newer server's value


# --- server -> SDK ------------------------------------------------------------------


def test_chat_message_from_proto() -> None:
    msg = common_pb2.ChatMessage(
        engagement_id="e1", message_id="m1", sender=common_pb2.PARTY_ASSOCIATE, text="Hi, Dana here", time=ts(T0)
    )
    chat = _convert.chat_message_from_proto(msg)
    assert chat == cuepoint.ChatMessage("e1", "m1", cuepoint.Party.ASSOCIATE, "Hi, Dana here", T0)
    assert _convert.chat_message_from_proto(common_pb2.ChatMessage(engagement_id="e1")) == cuepoint.ChatMessage("e1")
    assert _convert.chat_message_to_proto(chat) == msg


def test_upgrade_request_and_channel_change_from_proto() -> None:
    request = _convert.upgrade_request_from_proto(
        common_pb2.UpgradeRequest(
            engagement_id="e1",
            request_id="r1",
            channel=common_pb2.CHANNEL_SCREEN_SHARE,
            requested_by=common_pb2.PARTY_ASSOCIATE,
        )
    )
    assert request == cuepoint.UpgradeRequest("e1", "r1", cuepoint.Channel.SCREEN_SHARE, cuepoint.Party.ASSOCIATE)
    change = _convert.channel_change_from_proto(
        common_pb2.ChannelChange(
            engagement_id="e1",
            request_id="r1",
            channel=common_pb2.CHANNEL_SCREEN_SHARE,
            requested_by=common_pb2.PARTY_ASSOCIATE,
            accepted=True,
            time=ts(T0),
        )
    )
    assert change == cuepoint.ChannelChange(
        "e1", "r1", cuepoint.Channel.SCREEN_SHARE, cuepoint.Party.ASSOCIATE, True, T0
    )
    refused = _convert.channel_change_from_proto(common_pb2.ChannelChange(engagement_id="e1", request_id="r2"))
    assert not refused.accepted and refused.channel is None and refused.time is None


def test_call_signal_from_proto_keeps_bytes() -> None:
    payload = bytes(range(256)) * 4
    msg = common_pb2.CallSignal(
        engagement_id="e1", kind=common_pb2.CALL_SIGNAL_KIND_CANDIDATE, payload=payload, sender=common_pb2.PARTY_USER
    )
    signal = _convert.call_signal_from_proto(msg)
    assert signal == cuepoint.CallSignal("e1", cuepoint.CallSignalKind.CANDIDATE, payload, cuepoint.Party.USER)
    assert type(signal.payload) is bytes
    assert _convert.call_signal_to_proto(signal) == msg


def test_fallback_offer_from_proto_skips_unknown_options() -> None:
    offer = _convert.fallback_offer_from_proto(
        device_pb2.FallbackOffer(
            engagement_id="e1",
            options=[device_pb2.FALLBACK_OPTION_CALLBACK, 42, device_pb2.FALLBACK_OPTION_CANCEL],  # type: ignore[list-item]
            message="Everyone is busy",
        )
    )
    assert offer == cuepoint.FallbackOffer(
        "e1", (cuepoint.FallbackOption.CALLBACK, cuepoint.FallbackOption.CANCEL), "Everyone is busy"
    )


def test_engagement_update_disposition_and_ended_by() -> None:
    update = _convert.engagement_update_from_proto(
        device_pb2.EngagementUpdate(
            engagement_id="e1", cue_id="c1", state=common_pb2.ENGAGEMENT_STATE_ENDED, disposition="user_ended"
        )
    )
    assert update.state is cuepoint.EngagementState.ENDED and update.disposition == "user_ended"
    ended = _convert.engagement_ended_from_proto(
        associate_pb2.EngagementEnded(engagement_id="e1", disposition="user_ended", ended_by=common_pb2.PARTY_USER)
    )
    assert ended == cuepoint.EngagementEnded("e1", "user_ended", cuepoint.Party.USER)
    legacy = _convert.engagement_ended_from_proto(associate_pb2.EngagementEnded(engagement_id="e1"))
    assert legacy.ended_by is None


def _context_with_history() -> common_pb2.EngagementContext:
    return common_pb2.EngagementContext(
        app_id="fitkit",
        device_id="dev-1",
        priority=7,
        prior_engagements=[
            common_pb2.PriorEngagement(
                engagement_id="eng-old-2",
                created_at=ts(T0 - 86_400),
                scenario_id="sync-failure",
                disposition="resolved",
                notes="re-logged in",
                outcome="sync_ok",
            ),
            common_pb2.PriorEngagement(engagement_id="eng-old-1", created_at=ts(T0 - 2 * 86_400)),
        ],
    )


def test_prior_engagements_and_priority_from_proto() -> None:
    ctx = _convert.engagement_context_from_proto(_context_with_history())
    assert ctx.priority == 7
    assert ctx.prior_engagements == (
        cuepoint.PriorEngagement("eng-old-2", T0 - 86_400, "sync-failure", "resolved", "re-logged in", "sync_ok"),
        cuepoint.PriorEngagement("eng-old-1", T0 - 2 * 86_400),
    )
    empty = _convert.engagement_context_from_proto(common_pb2.EngagementContext(app_id="a", device_id="d"))
    assert empty.prior_engagements == () and empty.priority == 0


def test_describe_lists_prior_engagements_with_dispositions() -> None:
    eng = _convert.assigned_engagement_from_proto(
        common_pb2.Engagement(engagement_id="eng-9", cue_id="cue-9", queue="q", context=_context_with_history())
    )
    text = eng.describe()
    assert "priority 7" in text.splitlines()[0]
    assert "History: 2 prior engagement(s), newest first" in text
    [newest] = [line for line in text.splitlines() if "eng-old-2" in line]
    assert "2023-11-13" in newest and "scenario sync-failure" in newest
    assert "resolved - re-logged in (outcome: sync_ok)" in newest
    [oldest] = [line for line in text.splitlines() if "eng-old-1" in line]
    assert "no disposition" in oldest
    plain = _convert.assigned_engagement_from_proto(
        common_pb2.Engagement(engagement_id="e", context=common_pb2.EngagementContext(app_id="a", device_id="d"))
    )
    assert "History: no prior engagements" in plain.describe()


def test_assigned_and_offered_share_the_conversion() -> None:
    event = associate_pb2.AssociateEvent(offered=common_pb2.Engagement(engagement_id="e1", cue_id="c1"))
    offer = _convert.assigned_engagement_from_proto(event.offered)
    assert offer.engagement_id == "e1" and offer.cue_id == "c1"


# --- SDK -> server ---------------------------------------------------------------------


def test_device_engagement_messages() -> None:
    chat = _convert.chat_message_to_proto(cuepoint.ChatMessage("e1", text="hello"))
    assert _convert.device_message(chat).chat == common_pb2.ChatMessage(engagement_id="e1", text="hello")
    request = _convert.upgrade_request_to_proto(cuepoint.UpgradeRequest("e1", "r1", cuepoint.Channel.VIDEO))
    wrapped = _convert.device_message(request)
    assert (
        wrapped.WhichOneof("kind") == "upgrade_request" and wrapped.upgrade_request.channel == common_pb2.CHANNEL_VIDEO
    )
    response = _convert.device_message(_convert.upgrade_response_to_proto("e1", "r9", True))
    assert response.upgrade_response == common_pb2.UpgradeResponse(engagement_id="e1", request_id="r9", accepted=True)
    signal = _convert.call_signal_to_proto(cuepoint.CallSignal("e1", cuepoint.CallSignalKind.OFFER, b"v=0"))
    assert _convert.device_message(signal).call_signal.payload == b"v=0"

    end = _convert.end_by_user("e1")
    assert end.WhichOneof("kind") == "end_engagement" and end.end_engagement.engagement_id == "e1"
    choice = _convert.fallback_choice("e1", cuepoint.FallbackOption.CALLBACK, "+33 6 12 34 56 78").fallback_choice
    assert choice.option == device_pb2.FALLBACK_OPTION_CALLBACK and choice.phone_number == "+33 6 12 34 56 78"


def test_associate_messages() -> None:
    sign_in = _convert.sign_in(
        associate_id="dana",
        display_name="Dana",
        queues=["support"],
        capacity=2,
        skills=["billing", "ios"],
        manual_claim=True,
        presence=cuepoint.Presence.AWAY,
    ).sign_in
    assert list(sign_in.skills) == ["billing", "ios"] and sign_in.manual_claim
    assert sign_in.presence == associate_pb2.PRESENCE_AWAY
    legacy = _convert.sign_in(associate_id="a", display_name="", queues=[], capacity=1).sign_in
    assert not legacy.manual_claim and legacy.presence == associate_pb2.PRESENCE_UNSPECIFIED

    assert _convert.claim_engagement("e1").claim.engagement_id == "e1"
    reject = _convert.reject_engagement("e1", "no skill").reject
    assert (reject.engagement_id, reject.reason) == ("e1", "no skill")
    assert _convert.set_presence(cuepoint.Presence.BUSY).presence.presence == associate_pb2.PRESENCE_BUSY

    payloads: list[EngagementPayload] = [
        common_pb2.ChatMessage(engagement_id="e1", text="hi"),
        common_pb2.UpgradeRequest(engagement_id="e1", request_id="r"),
        common_pb2.UpgradeResponse(engagement_id="e1", request_id="r"),
        common_pb2.CallSignal(engagement_id="e1", kind=common_pb2.CALL_SIGNAL_KIND_HANGUP),
    ]
    kinds = [_convert.associate_message(p).WhichOneof("kind") for p in payloads]
    assert kinds == ["chat", "upgrade_request", "upgrade_response", "call_signal"]


# --- local validation ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "Hello, I need help", " padded ", "line one\nline two", "x" * 4000, "é" * 4000])
def test_valid_chat_text(text: str) -> None:
    assert _validate.chat_text(text) == text  # sent as given, never trimmed


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "x" * 4001, None, 42, b"bytes"])
def test_invalid_chat_text(text: object) -> None:
    with pytest.raises(cuepoint.InvalidSignal) as info:
        _validate.chat_text(text)
    assert info.value.field == "chat.text"


def test_call_payload_limit_is_64_kib() -> None:
    assert _validate.call_payload(b"") == b""
    assert _validate.call_payload(bytearray(b"\x00" * 65_536)) == b"\x00" * 65_536
    assert type(_validate.call_payload(memoryview(b"sdp"))) is bytes
    with pytest.raises(cuepoint.InvalidSignal, match="65536 bytes") as info:
        _validate.call_payload(b"\x00" * 65_537)
    assert info.value.field == "call_signal.payload"
    with pytest.raises(cuepoint.InvalidSignal, match="must be bytes"):
        _validate.call_payload("v=0 text is not bytes")


def test_enum_arguments_must_be_sdk_enums() -> None:
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.call_signal_kind("offer")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.channel(common_pb2.CHANNEL_VIDEO)
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.fallback_option("chat")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.presence("busy")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.flag(1, "upgrade_response.accepted")
    assert _validate.channel(cuepoint.Channel.VIDEO) is cuepoint.Channel.VIDEO


def test_phone_number_and_names() -> None:
    assert _validate.phone_number("") == ""
    assert _validate.phone_number("+1 (312) 555-0100") == "+1 (312) 555-0100"
    for bad in ("1" * 33, "+1\n555", 5551234):
        with pytest.raises(cuepoint.InvalidSignal):
            _validate.phone_number(bad)
    assert _validate.names(["billing", "ios"], "sign_in.skills") == ("billing", "ios")
    for bad_names in ("billing", ["ok", ""], ["ok", 3]):
        with pytest.raises(cuepoint.InvalidSignal):
            _validate.names(bad_names, "sign_in.skills")  # type: ignore[arg-type]


def test_associate_client_validates_new_sign_in_fields() -> None:
    client = cuepoint.AssociateClient("x:1", associate_id="a-1", skills=["billing"], manual_claim=True)
    assert client.manual_claim and client.presence is cuepoint.Presence.AVAILABLE
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="a-1", skills="billing")
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="a-1", manual_claim="yes")  # type: ignore[arg-type]
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="a-1", presence="away")  # type: ignore[arg-type]


async def test_engagement_handle_validates_before_anything_else() -> None:
    handle = Engagement(cuepoint.Cue(cue_id="cue-1"))
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.send_chat("")
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.send_chat("x" * 4001)
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.send_call_signal(cuepoint.CallSignalKind.OFFER, b"\x00" * (64 * 1024 + 1))
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.send_call_signal("offer", b"")  # type: ignore[arg-type]
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.request_upgrade("video")  # type: ignore[arg-type]
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.choose_fallback(cuepoint.FallbackOption.CALLBACK, phone_number="1" * 33)
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.respond_upgrade("r1", True)  # type: ignore[arg-type]
    # Valid input on a handle no client owns fails as closed, not as invalid.
    with pytest.raises(cuepoint.ClientClosed):
        await handle.send_chat("hello")


async def test_associate_client_validates_before_sending() -> None:
    client = cuepoint.AssociateClient("x:1", associate_id="a-1")
    with pytest.raises(cuepoint.InvalidSignal):
        await client.send_chat("e1", " ")
    with pytest.raises(cuepoint.InvalidSignal):
        await client.send_call_signal("e1", cuepoint.CallSignalKind.ANSWER, bytes(64 * 1024 + 1))
    with pytest.raises(cuepoint.InvalidSignal):
        await client.set_presence("busy")  # type: ignore[arg-type]
    with pytest.raises(cuepoint.InvalidSignal):
        await client.claim("")
    with pytest.raises(cuepoint.ClientClosed):  # valid, but never started
        await client.send_chat("e1", "hello")


# --- reply matching (no stream: payloads go to a list) -------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[EngagementPayload] = []

    async def __call__(self, payload: EngagementPayload) -> None:
        self.sent.append(payload)


def _ids() -> Callable[[], str]:
    counter = iter(range(1, 1000))
    return lambda: f"r{next(counter)}"


async def test_chat_echo_resolves_oldest_send_with_same_text() -> None:
    sent = _Recorder()
    conv = Conversation(cuepoint.Party.USER, sent, _ids())
    first = asyncio.create_task(conv.send_chat("e1", "hello"))
    second = asyncio.create_task(conv.send_chat("e1", "again"))
    await asyncio.sleep(0)
    assert [p.text for p in sent.sent] == ["hello", "again"]  # type: ignore[union-attr]
    # The associate's message resolves nothing; ours resolve in order.
    conv.on_chat(cuepoint.ChatMessage("e1", "m1", cuepoint.Party.ASSOCIATE, "hello"))
    conv.on_chat(cuepoint.ChatMessage("e1", "m2", cuepoint.Party.USER, "hello"))
    conv.on_chat(cuepoint.ChatMessage("e1", "m3", cuepoint.Party.USER, "again"))
    assert (await first).message_id == "m2" and (await second).message_id == "m3"
    assert [m.message_id for m in conv.messages.items] == ["m1", "m2", "m3"]


async def test_chat_echo_with_altered_text_resolves_oldest_send() -> None:
    conv = Conversation(cuepoint.Party.ASSOCIATE, _Recorder(), _ids())
    pending = asyncio.create_task(conv.send_chat("e1", "  hi  "))
    await asyncio.sleep(0)
    conv.on_chat(cuepoint.ChatMessage("e1", "m1", cuepoint.Party.ASSOCIATE, "hi"))
    assert (await pending).text == "hi"


async def test_channel_change_resolves_only_our_request() -> None:
    sent = _Recorder()
    conv = Conversation(cuepoint.Party.USER, sent, _ids())
    waiting = asyncio.create_task(conv.request_upgrade("e1", cuepoint.Channel.VIDEO))
    await asyncio.sleep(0)
    [request] = sent.sent
    assert isinstance(request, common_pb2.UpgradeRequest) and request.request_id == "r1"
    # Same id but requested by the other side: not ours.
    conv.on_channel_change(cuepoint.ChannelChange("e1", "r1", cuepoint.Channel.CHAT, cuepoint.Party.ASSOCIATE, True))
    await asyncio.sleep(0)
    assert not waiting.done() and conv.channel is cuepoint.Channel.CHAT
    conv.on_channel_change(cuepoint.ChannelChange("e1", "r1", cuepoint.Channel.VIDEO, cuepoint.Party.USER, False))
    change = await waiting
    assert not change.accepted and conv.channel is cuepoint.Channel.CHAT  # a refusal changes nothing


async def test_upgrade_requests_replay_only_unanswered_and_refuse_double_answers() -> None:
    sent = _Recorder()
    conv = Conversation(cuepoint.Party.USER, sent, _ids())
    first = cuepoint.UpgradeRequest("e1", "a1", cuepoint.Channel.SCREEN_SHARE, cuepoint.Party.ASSOCIATE)
    second = cuepoint.UpgradeRequest("e1", "a2", cuepoint.Channel.VIDEO, cuepoint.Party.ASSOCIATE)
    conv.on_upgrade_request(first)
    conv.on_upgrade_request(second)
    await conv.respond_upgrade(first, True)
    assert sent.sent[-1] == common_pb2.UpgradeResponse(engagement_id="e1", request_id="a1", accepted=True)
    with pytest.raises(cuepoint.Rejected):
        await conv.respond_upgrade(first, False)
    assert conv.pending_upgrade_requests == (second,)
    # Settled by the server (e.g. the associate gave up): no longer pending either.
    conv.on_channel_change(cuepoint.ChannelChange("e1", "a2", cuepoint.Channel.VIDEO, cuepoint.Party.ASSOCIATE))
    assert not conv.pending_upgrade_requests


async def test_finish_fails_pending_replies_and_ends_iterators() -> None:
    conv = Conversation(cuepoint.Party.USER, _Recorder(), _ids())
    conv.on_chat(cuepoint.ChatMessage("e1", "m1", cuepoint.Party.SYSTEM, "welcome"))
    pending = asyncio.create_task(conv.send_chat("e1", "anyone?"))
    await asyncio.sleep(0)

    def closed() -> cuepoint.CuepointError:
        return cuepoint.Rejected("engagement over")

    conv.finish(None, closed)
    with pytest.raises(cuepoint.Rejected):
        await pending
    assert [m.text async for m in conv.messages.iterate()] == ["welcome"]
    with pytest.raises(cuepoint.Rejected):
        await conv.send_chat("e1", "late")
