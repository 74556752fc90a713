"""SDK logic that needs no server: validation, conversion, batching, error mapping."""

from __future__ import annotations

import asyncio
import math

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import cuepoint
from cuepoint import _convert, _grpc_errors, _validate
from cuepoint._batcher import SignalBatcher
from cuepoint._ids import IdGenerator
from cuepoint._inbox import Inbox, get_within
from cuepoint.client import _merge_context
from cuepoint.engagement import Engagement
from cuepoint.v1 import associate_pb2, common_pb2, device_pb2

T0 = 1_700_000_000.25


def ts(seconds: float) -> Timestamp:
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=round((seconds - whole) * 1e9))


def make_client(**overrides: object) -> cuepoint.Client:
    kwargs: dict[str, object] = {
        "app_id": "fitkit",
        "device_id": "dev-123",
        "context": cuepoint.Context(app_version="4.2.0", os="iOS", attributes={"plan": "annual"}),
        "user": cuepoint.User(user_id="u-42", tier="premium", attributes={"age": 41}),
        "consent": cuepoint.Consent.FULL,
        "config": cuepoint.ClientConfig(clock=lambda: T0),
    }
    kwargs.update(overrides)
    return cuepoint.Client("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


# --- public surface -----------------------------------------------------------


def test_public_api_is_explicit_and_importable() -> None:
    for name in cuepoint.__all__:
        assert hasattr(cuepoint, name), name
    expected = ("connect", "Client", "ClientConfig", "Consent", "Channel", "CueResponse", "connect_associate")
    for name in expected:
        assert name in cuepoint.__all__
    assert isinstance(cuepoint.__version__, str) and cuepoint.__version__
    assert [c.name for c in cuepoint.Consent] == ["NONE", "ESSENTIAL", "FULL"]
    assert [c.name for c in cuepoint.Channel] == ["AUDIO", "SCREEN_SHARE", "CHAT", "VIDEO"]
    assert [c.name for c in cuepoint.CueResponse] == ["ACCEPTED", "DECLINED", "DISMISSED", "EXPIRED", "OPENED"]


def test_every_sdk_error_has_one_root() -> None:
    for cls in (
        cuepoint.ConnectionLost,
        cuepoint.InvalidSignal,
        cuepoint.Rejected,
        cuepoint.ServerError,
        cuepoint.TimedOut,
        cuepoint.BufferFull,
        cuepoint.ClientClosed,
        cuepoint.EngagementClosed,
    ):
        assert issubclass(cls, cuepoint.CuepointError)
    assert issubclass(cuepoint.TimedOut, TimeoutError)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        cuepoint.ClientConfig(max_batch=0)
    with pytest.raises(ValueError):
        cuepoint.ClientConfig(linger=-1)
    with pytest.raises(ValueError):
        cuepoint.ClientConfig(connect_timeout=0)
    with pytest.raises(ValueError):
        cuepoint.AssociateConfig(close_timeout=-1)


# --- local validation -----------------------------------------------------------


@pytest.mark.parametrize("name", ["sync_failed", "a", "screen.viewed", "x:y-z", "a" + "b" * 63])
def test_valid_event_names(name: str) -> None:
    assert _validate.event_name(name) == name


@pytest.mark.parametrize("name", ["", "Sync", "1st", "_x", "sync failed", "a" * 65, "sync\n", 42])
def test_invalid_event_names(name: object) -> None:
    with pytest.raises(cuepoint.InvalidSignal) as info:
        _validate.event_name(name)
    assert info.value.field == "event.name"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (None, "properties.p"),
        ([1], "properties.p"),
        ({"a": 1}, "properties.p"),
        (math.nan, "properties.p"),
        (math.inf, "properties.p"),
        (2**63, "properties.p"),
        ("x" * 1025, "properties.p"),
    ],
)
def test_invalid_property_values(value: object, field: str) -> None:
    with pytest.raises(cuepoint.InvalidSignal) as info:
        _validate.attributes({"p": value}, "properties")
    assert info.value.field == field


def test_property_keys_and_counts() -> None:
    good = {"ok_key.1-x": True, "n": -(2**63)}
    assert _validate.attributes(good, "p") == good
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.attributes({"bad key": 1}, "p")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.attributes({"": 1}, "p")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.attributes({f"k{i}": i for i in range(65)}, "p")
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.user(cuepoint.User(attributes={"tier": "gold"}))


def test_remembered_names_and_keys_still_get_every_other_check() -> None:
    # track() remembers names and keys that passed their pattern (issue 13); the rest is checked every time.
    assert _validate.event_name("remembered") == "remembered"
    assert _validate.event_name("remembered") == "remembered"
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.event_name("Remembered")

    class Name(str):
        pass

    assert _validate.event_name(Name("remembered")) == "remembered"
    assert _validate.attributes({"tier": 1, "flag": True, "s": Name("x")}, "properties") == {
        "tier": 1,
        "flag": True,
        "s": "x",
    }
    with pytest.raises(cuepoint.InvalidSignal) as info:
        _validate.attributes({"tier": "gold"}, "user.attributes", reserved=frozenset({"tier"}))
    assert info.value.field == "user.attributes.tier"
    for bad in (2**63, -(2**63) - 1, "x" * 1025, math.nan, None):
        with pytest.raises(cuepoint.InvalidSignal):
            _validate.attributes({"tier": bad}, "properties")


def test_clear_keys_must_be_context_paths() -> None:
    keys = ["app.version", "location.city", "attributes.cart_value", "user.id", "user.nickname"]
    assert _validate.clear_keys(keys) == tuple(keys)
    for bad in (["app"], ["attributes."], ["device.battery"], ["location"]):
        with pytest.raises(cuepoint.InvalidSignal):
            _validate.clear_keys(bad)
    with pytest.raises(cuepoint.InvalidSignal):
        _validate.clear_keys("app.version")


@pytest.mark.parametrize(
    ("app_id", "device_id", "field"),
    [
        ("", "dev", "hello.app_id"),
        ("FitKit", "dev", "hello.app_id"),
        ("fitkit", "", "hello.device_id"),
        ("fitkit", "d" * 129, "hello.device_id"),
        ("fitkit", "dev\n1", "hello.device_id"),
    ],
)
def test_client_rejects_bad_identity(app_id: str, device_id: str, field: str) -> None:
    with pytest.raises(cuepoint.InvalidSignal) as info:
        make_client(app_id=app_id, device_id=device_id)
    assert info.value.field == field


async def test_track_validates_before_queueing() -> None:
    client = make_client()
    with pytest.raises(cuepoint.InvalidSignal):
        await client.track("Bad Name")
    with pytest.raises(cuepoint.InvalidSignal) as info:
        await client.track("sync_failed", attempt=[1, 2])  # type: ignore[arg-type]
    assert info.value.field == "properties.attempt"
    assert client.pending_signals == 0

    signal_id = await client.track("sync_failed", reason="timeout", attempt=2, ratio=0.5, retry=True)
    assert client.pending_signals == 1
    [(queued_id, queued)] = client._batcher.take_batch()
    signal = _convert.as_signal(queued)  # queued as a row; the row form is what the outbox keeps
    assert queued_id == signal_id == signal.id
    assert (signal.time.seconds, signal.time.nanos) == (1_700_000_000, 250_000_000)  # the injected clock
    assert signal.event.name == "sync_failed"
    props = _convert.attributes_from_proto(signal.event.properties)
    assert props == {"attempt": 2, "ratio": 0.5, "reason": "timeout", "retry": True}
    assert signal.event.properties["retry"].WhichOneof("kind") == "bool_value"


async def test_track_name_is_positional_so_any_property_name_works() -> None:
    client = make_client()
    await client.track("form.submitted", name="checkout", self="x")
    [(_, queued)] = client._batcher.take_batch()
    signal = _convert.as_signal(queued)
    assert _convert.attributes_from_proto(signal.event.properties) == {"name": "checkout", "self": "x"}


async def test_track_keeps_what_was_tracked_when_the_callers_dict_changes_afterwards() -> None:
    # track() checks its keyword arguments in place instead of copying them: Python builds that dict anew for
    # every call, even from **props, so the caller's own dict is never the one queued.
    client = make_client()
    props: dict[str, object] = {"screen": "home", "n": 1}
    await client.track("screen_view", **props)  # type: ignore[arg-type]
    props["screen"] = "changed"
    props["extra"] = float("nan")
    [(_, queued)] = client._batcher.take_batch()
    assert _convert.attributes_from_proto(_convert.as_signal(queued).event.properties) == {"screen": "home", "n": 1}


async def test_buffer_full_raises_instead_of_blocking() -> None:
    client = make_client(config=cuepoint.ClientConfig(max_batch=2, max_pending_signals=2))
    await client.track("a")
    await client.track("b")
    with pytest.raises(cuepoint.BufferFull):
        await client.track("c")


async def test_set_context_builds_update_and_merges_locally() -> None:
    client = make_client()
    with pytest.raises(cuepoint.InvalidSignal):
        await client.set_context()
    with pytest.raises(cuepoint.InvalidSignal):
        await client.set_context(clear_keys=["nope"])
    assert client.pending_signals == 0

    await client.set_context(
        app_version="4.3.0",
        attributes={"cart_value": 12.5},
        user=cuepoint.User(tier="gold"),
        clear_keys=["attributes.plan", "user.age"],
    )
    [(_, signal)] = client._batcher.take_batch()
    update = signal.context
    assert update.context.app_version == "4.3.0"
    assert update.context.os == ""  # empty means unchanged on the wire
    assert list(update.clear_keys) == ["attributes.plan", "user.age"]
    assert _convert.flatten_context_update(update) == {
        "app.version": "4.3.0",
        "attributes.cart_value": 12.5,
        "user.tier": "gold",
    }
    assert client.context == cuepoint.Context(app_version="4.3.0", os="iOS", attributes={"cart_value": 12.5})
    assert client.user == cuepoint.User(user_id="u-42", tier="gold", attributes={})


def test_merge_context_clears_fields() -> None:
    paris = cuepoint.Location(country="FR", city="Paris")
    ctx = cuepoint.Context(app_version="1", locale="fr_FR", location=paris)
    user = cuepoint.User(user_id="u", tier="t", attributes={"a": 1})
    merged, merged_user = _merge_context(
        ctx, user, cuepoint.Context(), None, ["device.locale", "location.city", "user.id"]
    )
    assert merged == cuepoint.Context(app_version="1", location=cuepoint.Location(country="FR"))
    assert merged_user == cuepoint.User(tier="t", attributes={"a": 1})


async def test_unstarted_client_refuses_session_calls() -> None:
    client = make_client()
    with pytest.raises(cuepoint.ClientClosed):
        await client.flush()
    with pytest.raises(cuepoint.ClientClosed):
        await client.decline("cue-1")
    await client.close()
    with pytest.raises(cuepoint.ClientClosed):
        await client.track("after_close")
    with pytest.raises(cuepoint.ClientClosed):
        await client.next_cue(timeout=0.01)


def test_associate_client_validates_sign_in() -> None:
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="")
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="a-1", queues="default")
    with pytest.raises(cuepoint.InvalidSignal):
        cuepoint.AssociateClient("x:1", associate_id="a-1", capacity=0)


# --- conversion ---------------------------------------------------------------


def test_context_round_trip_keeps_scalar_types() -> None:
    ctx = cuepoint.Context(
        app_version="4.2.0",
        os="iOS",
        os_version="17.4",
        device_model="iPhone15,2",
        locale="en_US",
        timezone="Europe/Paris",
        location=cuepoint.Location(country="FR", city="Paris"),
        attributes={"plan": "annual", "seats": 3, "ratio": 0.25, "trial": False, "one": 1, "yes": True},
    )
    msg = _convert.context_to_proto(ctx)
    assert msg.attributes["one"].WhichOneof("kind") == "int_value"
    assert msg.attributes["yes"].WhichOneof("kind") == "bool_value"
    back = _convert.context_from_proto(common_pb2.Context.FromString(msg.SerializeToString()))
    assert back == ctx
    assert type(back.attributes["one"]) is int and type(back.attributes["yes"]) is bool
    assert _convert.context_from_proto(common_pb2.Context()).location is None


def test_user_round_trip() -> None:
    user = cuepoint.User(user_id="u-42", tier="premium", attributes={"age": 41, "vip": True})
    assert _convert.user_from_proto(_convert.user_to_proto(user)) == user


def test_cue_round_trip() -> None:
    cue = cuepoint.Cue(
        cue_id="cue-1",
        scenario_id="fitkit-sync-failure",
        message="Unable to sync? I can help you.",
        channel=cuepoint.Channel.AUDIO,
        allowed_upgrades=(cuepoint.Channel.SCREEN_SHARE, cuepoint.Channel.CHAT),
        created_at=T0,
        expires_at=T0 + 120,
        title="Sync trouble?",
    )
    assert _convert.cue_from_proto(_convert.cue_to_proto(cue)) == cue
    assert cue.is_expired(T0 + 120) and not cue.is_expired(T0)
    sparse = _convert.cue_from_proto(common_pb2.Cue(cue_id="c"))
    assert sparse == cuepoint.Cue(cue_id="c")  # unset channel/times are None, not 0


def test_journey_entries_round_trip() -> None:
    event = cuepoint.JourneyEntry(
        signal_id="s1", time=T0, kind="event", name="sync_failed", properties={"attempt": 2, "why": "timeout"}
    )
    context = cuepoint.JourneyEntry(
        signal_id="s2",
        time=T0 + 1.5,
        kind="context",
        name="context_update",
        properties={
            "app.version": "4.3.0",
            "location.country": "DE",
            "attributes.plan": "monthly",
            "user.id": "u-42",
            "user.tier": "gold",
            "user.age": 42,
        },
        cleared_keys=("attributes.cart_value",),
    )
    for entry in (event, context):
        msg = _convert.journey_entry_to_proto(entry)
        wire = common_pb2.JourneyEntry.FromString(msg.SerializeToString())
        assert _convert.journey_entry_from_proto(wire) == entry
    msg = _convert.journey_entry_to_proto(context)
    assert msg.context.context.app_version == "4.3.0"
    assert msg.context.user.user_id == "u-42" and msg.context.user.attributes["age"].int_value == 42


def _engagement_proto() -> common_pb2.Engagement:
    cue = common_pb2.Cue(
        cue_id="cue-1",
        scenario_id="fitkit-sync-failure",
        message="Unable to sync? I can help you.",
        channel=common_pb2.CHANNEL_AUDIO,
        title="Sync trouble?",
        created_at=ts(T0 + 10),
    )
    journey = [
        common_pb2.JourneyEntry(
            signal_id=f"s{i}",
            time=ts(T0 + i),
            event=common_pb2.Event(
                name="sync_failed",
                properties={"attempt": common_pb2.AttributeValue(int_value=i)},
            ),
        )
        for i in (1, 2, 3)
    ]
    journey.insert(
        0,
        common_pb2.JourneyEntry(
            signal_id="s0",
            time=ts(T0),
            context=common_pb2.ContextUpdate(
                context=common_pb2.Context(app_version="4.2.0"), clear_keys=["attributes.cart"]
            ),
        ),
    )
    return common_pb2.Engagement(
        engagement_id="eng-1",
        cue_id="cue-1",
        queue="fitkit-support",
        state=common_pb2.ENGAGEMENT_STATE_ASSIGNED,
        channel=common_pb2.CHANNEL_AUDIO,
        created_at=ts(T0 + 11),
        associate_id="a-1",
        associate_name="Dana",
        context=common_pb2.EngagementContext(
            app_id="fitkit",
            device_id="dev-123",
            user_id="u-42",
            context=common_pb2.Context(
                app_version="4.2.0",
                os="iOS",
                os_version="17.4",
                device_model="iPhone15,2",
                location=common_pb2.Location(country="FR"),
                attributes={"plan": common_pb2.AttributeValue(string_value="annual")},
            ),
            user=common_pb2.UserIdentity(user_id="u-42", tier="premium"),
            consent=common_pb2.CONSENT_LEVEL_FULL,
            journey=journey,
            trigger=common_pb2.TriggerExplanation(
                scenario_id="fitkit-sync-failure",
                scenario_name="FitKit: sync keeps failing (premium)",
                scenario_file="scenarios/fitkit-sync-failure.yaml",
                priority=100,
                conditions=[
                    common_pb2.MatchedCondition(
                        path="trigger", description="count(sync_failed) >= 3 within 10m (observed 3)"
                    )
                ],
                signal_ids=["s1", "s2", "s3"],
            ),
            cue=cue,
            redacted_fields=["user.attributes"],
        ),
    )


def test_assigned_engagement_from_proto() -> None:
    eng = _convert.assigned_engagement_from_proto(_engagement_proto())
    assert eng.engagement_id == "eng-1" and eng.cue_id == "cue-1" and eng.queue == "fitkit-support"
    assert eng.channel is cuepoint.Channel.AUDIO and eng.state is cuepoint.EngagementState.ASSIGNED
    assert eng.created_at == pytest.approx(T0 + 11)
    ctx = eng.context
    assert (ctx.app_id, ctx.device_id, ctx.user_id) == ("fitkit", "dev-123", "u-42")
    assert ctx.context.device_model == "iPhone15,2"
    assert ctx.context.location == cuepoint.Location(country="FR")
    assert ctx.user == cuepoint.User(user_id="u-42", tier="premium")
    assert ctx.consent is cuepoint.Consent.FULL
    assert [e.kind for e in ctx.journey] == ["context", "event", "event", "event"]
    assert ctx.journey[0].properties == {"app.version": "4.2.0"}
    assert ctx.journey[0].cleared_keys == ("attributes.cart",)
    assert ctx.journey[3] == cuepoint.JourneyEntry("s3", T0 + 3, "event", "sync_failed", {"attempt": 3})
    assert ctx.trigger is not None and ctx.trigger.priority == 100
    [(path, description)] = ctx.trigger.conditions
    assert path == "trigger" and "observed 3" in description
    assert ctx.cue is not None and ctx.cue.title == "Sync trouble?"
    assert ctx.redacted_fields == ("user.attributes",)

    text = eng.describe()
    for expected in (
        "eng-1",
        "iPhone15,2",
        "iOS 17.4",
        "4.2.0",
        "premium",
        "FitKit: sync keeps failing (premium)",
        "count(sync_failed) >= 3 within 10m (observed 3)",
        "attempt=2",
        "Withheld (consent): user.attributes",
    ):
        assert expected in text, expected
    fired = [line for line in text.splitlines() if line.startswith("  > ")]
    assert len(fired) == 3  # the three signals that made the cue fire
    assert "(-7.0s)" in fired[-1]  # relative to the cue's creation


def test_consent_filtered_user_is_none() -> None:
    msg = common_pb2.EngagementContext(app_id="a", device_id="d", user=common_pb2.UserIdentity())
    ctx = _convert.engagement_context_from_proto(msg)
    assert ctx.user is None and ctx.consent is None and ctx.trigger is None


def test_engagement_update_and_withdrawal_from_proto() -> None:
    update = _convert.engagement_update_from_proto(
        device_pb2.EngagementUpdate(
            engagement_id="eng-1",
            cue_id="cue-1",
            state=common_pb2.ENGAGEMENT_STATE_QUEUED,
            channel=common_pb2.CHANNEL_CHAT,
            queue="default",
            time=ts(T0),
        )
    )
    assert update == cuepoint.EngagementUpdate(
        "eng-1", "cue-1", cuepoint.EngagementState.QUEUED, cuepoint.Channel.CHAT, "default", "", T0
    )
    withdrawal = _convert.withdrawal_from_proto(device_pb2.CueWithdrawal(cue_id="c", reason="expired"))
    assert withdrawal == cuepoint.CueWithdrawal("c", "expired")
    ended_msg = associate_pb2.EngagementEnded(engagement_id="e", disposition="x")
    ended = _convert.engagement_ended_from_proto(ended_msg)
    assert ended == cuepoint.EngagementEnded("e", "x")


def test_outgoing_messages() -> None:
    hello = _convert.hello(
        app_id="fitkit",
        device_id="dev-1",
        context=cuepoint.Context(os="Android"),
        user=None,
        consent=cuepoint.Consent.ESSENTIAL,
        sdk_version="cuepoint-python/test",
    ).hello
    assert hello.consent.level == common_pb2.CONSENT_LEVEL_ESSENTIAL
    assert not hello.HasField("user") and hello.context.os == "Android"

    batch = _convert.signal_batch("b1", T0, [_convert.event_signal("s1", T0, "x", {})]).signals
    assert batch.batch_id == "b1" and batch.sent_at.nanos == 250_000_000
    assert [s.id for s in batch.signals] == ["s1"]

    response = _convert.cue_response("cue-1", cuepoint.CueResponse.DISMISSED, T0).cue_response
    assert response.kind == common_pb2.CUE_RESPONSE_KIND_DISMISSED

    end = _convert.end_engagement("eng-1", "resolved", "fixed").end
    assert (end.engagement_id, end.disposition, end.notes) == ("eng-1", "resolved", "fixed")


def test_row_batches_are_built_from_dicts_with_each_value_in_its_field() -> None:
    """Events sent as rows are built from nested dicts (issue 13); each value keeps its type's field: a bool is
    not an int, and subclasses (an IntEnum, a str subclass) travel as their base type, as value_to_proto has it."""
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    props = {"s": "home", "i": 7, "f": 1.5, "b": True, "e": Level.HIGH, "n": Name("x")}
    message = _convert.signals_message("b1", T0, [_convert.event_row(("s1", T0 + 1.5, "screen_view", props))])
    (signal,) = message.signals.signals
    assert message.signals.batch_id == "b1" and message.signals.sent_at.nanos == 250_000_000
    assert (signal.id, signal.event.name) == ("s1", "screen_view")
    assert (signal.time.seconds, signal.time.nanos) == (int(T0 + 1.5), 750_000_000)
    kinds = {key: value.WhichOneof("kind") for key, value in signal.event.properties.items()}
    assert kinds == {
        "s": "string_value",
        "i": "int_value",
        "f": "double_value",
        "b": "bool_value",
        "e": "int_value",
        "n": "string_value",
    }
    assert _convert.attributes_from_proto(signal.event.properties) == {**props, "e": 3, "n": "x"}
    # The same message as one built field by field.
    by_field = common_pb2.Event(name="screen_view")
    _convert.fill_attributes(by_field.properties, props)
    assert signal.event == by_field


# --- batching -----------------------------------------------------------------


def test_batcher_flushes_on_size() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=3, linger=10.0)
    assert b.time_until_due(0.0) is None
    for i in range(2):
        b.add(f"s{i}", f"p{i}", now=0.0)
    assert not b.due(0.0)
    b.add("s2", "p2", now=0.0)
    b.add("s3", "p3", now=0.0)
    assert b.due(0.0)
    assert b.take_batch() == [("s0", "p0"), ("s1", "p1"), ("s2", "p2")]
    assert b.queued_count == 1 and b.in_flight_count == 3 and b.pending_count == 4


def test_batcher_flushes_after_linger() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=100, linger=0.02)
    b.add("s0", "p", now=1.0)
    b.add("s1", "p", now=1.015)
    assert b.time_until_due(1.01) == pytest.approx(0.01)
    assert not b.due(1.019)
    assert b.due(1.02)  # the oldest signal sets the deadline
    assert [sid for sid, _ in b.take_batch()] == ["s0", "s1"]
    assert b.time_until_due(5.0) is None


def test_batcher_flush_request_and_watermark() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=100, linger=60.0)
    b.add("s0", "p", now=0.0)
    b.add("s1", "p", now=0.0)
    target = b.request_flush()
    assert target == 2 and b.due(0.0)
    b.take_batch()
    b.add("s2", "p", now=0.0)  # after the flush: must not extend it
    assert not b.due(0.0)
    assert not b.acked_through(target)
    assert b.ack(["s0", "unknown"]) == 1
    assert not b.acked_through(target)
    assert b.ack(["s1"]) == 1
    assert b.acked_through(target)
    assert not b.acked_through(b.last_seq)
    assert b.unacked_ids() == ["s2"]


def test_batcher_duplicates_count_as_acked_and_server_caps_batch() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=100, linger=0.0)
    b.limit_batch(2)
    assert b.max_batch == 2
    b.limit_batch(0)
    assert b.max_batch == 100
    b.limit_batch(500)
    assert b.max_batch == 100
    b.limit_batch(2)
    for i in range(3):
        b.add(f"s{i}", "p", now=0.0)
    assert len(b.take_batch()) == 2
    b.ack(["s0"])
    b.ack(["s1"])  # e.g. listed in duplicate_ids
    assert b.acked_through(2) and b.pending_count == 1
    with pytest.raises(ValueError):
        b.add("s2", "p", now=0.0)


def test_batcher_requeues_in_flight_in_order_with_same_ids() -> None:
    b: SignalBatcher[str] = SignalBatcher(max_batch=2, linger=0.0)
    for i in range(3):
        b.add(f"s{i}", f"p{i}", now=0.0)
    b.take_batch()
    b.ack(["s0"])
    assert b.requeue_in_flight() == 1
    assert b.take_batch() == [("s1", "p1"), ("s2", "p2")]
    # A late ack for a requeued, not yet resent signal removes it from the queue.
    b.requeue_in_flight()
    assert b.ack(["s2"]) == 1
    assert b.take_batch() == [("s1", "p1")]


def test_batcher_tells_sent_from_queued_by_position_when_acks_mix_them() -> None:
    # No "sent" flag: the queue is always the newest entries, so an entry is queued when its seq is at least the
    # queue head's. Acks of sent and queued signals, in one list, head included.
    b: SignalBatcher[str] = SignalBatcher(max_batch=2, linger=0.0)
    for i in range(6):
        b.add(f"s{i}", f"p{i}", now=0.0)
    assert [i for i, _ in b.take_batch()] == ["s0", "s1"]
    assert b.ack(["s2", "s0", "s4"]) == 3  # queued (the head), sent, queued
    assert b.queued_count == 2 and b.in_flight_count == 1
    assert b.take_batch() == [("s3", "p3"), ("s5", "p5")]
    assert b.requeue_in_flight() == 3
    assert b.take_batch() == [("s1", "p1"), ("s3", "p3")]
    assert b.ack(["s5", "s1"]) == 2
    assert b.take_batch() == [] and b.pending_items() == [("s3", "p3")]


def test_ids_are_sortable_and_unique() -> None:
    now = [T0]
    gen = IdGenerator(lambda: now[0])
    ids = [gen() for _ in range(1000)]
    now[0] += 0.001
    ids.append(gen())
    now[0] -= 10  # the clock stepping back must not break ordering
    ids.append(gen())
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 and i.isalnum() and i.isupper() for i in ids)


# --- error mapping ------------------------------------------------------------


def _aio_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, cuepoint.InvalidSignal),
        (grpc.StatusCode.UNAVAILABLE, cuepoint.ConnectionLost),
        (grpc.StatusCode.CANCELLED, cuepoint.ConnectionLost),
        (grpc.StatusCode.DEADLINE_EXCEEDED, cuepoint.TimedOut),
        (grpc.StatusCode.NOT_FOUND, cuepoint.Rejected),
        (grpc.StatusCode.PERMISSION_DENIED, cuepoint.Rejected),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, cuepoint.Rejected),
        (grpc.StatusCode.INTERNAL, cuepoint.ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, cuepoint.ServerError),
    ],
)
def test_rpc_errors_map_to_sdk_errors(code: grpc.StatusCode, cls: type[cuepoint.CuepointError]) -> None:
    error = _grpc_errors.from_rpc_error(_aio_error(code, "boom"))
    assert type(error) is cls
    assert error.code == code.name and error.details == "boom"
    assert "boom" in str(error)


def test_invalid_argument_keeps_server_message_and_field() -> None:
    details = "signals.signals[3].event.name: invalid event name 'X'; expected ^[a-z]..."
    error = _grpc_errors.from_rpc_error(_aio_error(grpc.StatusCode.INVALID_ARGUMENT, details))
    assert isinstance(error, cuepoint.InvalidSignal)
    assert error.details == details
    assert error.field == "signals.signals[3].event.name"
    hello_first = "the first message must be a hello"
    plain = _grpc_errors.from_rpc_error(_aio_error(grpc.StatusCode.INVALID_ARGUMENT, hello_first))
    assert isinstance(plain, cuepoint.InvalidSignal) and plain.field is None


def test_clean_end_and_bare_rpc_error_mean_connection_lost() -> None:
    assert isinstance(_grpc_errors.from_status(grpc.StatusCode.OK, ""), cuepoint.ConnectionLost)
    assert isinstance(_grpc_errors.from_rpc_error(grpc.RpcError()), cuepoint.ConnectionLost)


# --- inboxes and engagement handles ---------------------------------------------


async def test_inbox_drains_before_raising_and_discards() -> None:
    inbox: Inbox[int] = Inbox()
    for i in range(4):
        inbox.put(i)
    assert inbox.discard(lambda i: i % 2 == 1) == 2
    inbox.close(cuepoint.ConnectionLost("gone"))
    inbox.put(99)  # ignored after close
    assert [await inbox.get(), await inbox.get()] == [0, 2]
    with pytest.raises(cuepoint.ConnectionLost):
        await inbox.get()


async def test_inbox_iteration_ends_on_clean_close_and_wakes_waiters() -> None:
    inbox: Inbox[str] = Inbox(maxlen=2)
    for item in "abc":
        inbox.put(item)

    async def consume() -> list[str]:
        return [item async for item in inbox]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    inbox.put("d")
    inbox.close()
    assert await task == ["b", "c", "d"]  # the oldest was dropped at maxlen
    with pytest.raises(cuepoint.ClientClosed):
        await get_within(inbox, 1.0, "cue")


async def test_get_within_times_out() -> None:
    inbox: Inbox[int] = Inbox()
    with pytest.raises(cuepoint.TimedOut):
        await get_within(inbox, 0.01, "cue")


def _update(state: cuepoint.EngagementState, name: str = "") -> cuepoint.EngagementUpdate:
    return cuepoint.EngagementUpdate("eng-1", "cue-1", state, cuepoint.Channel.AUDIO, "default", name, T0)


async def test_engagement_handle_waits_and_replays() -> None:
    handle = Engagement(cuepoint.Cue(cue_id="cue-1"))
    waiter = asyncio.create_task(handle.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=1.0))
    await asyncio.sleep(0)
    handle._push(_update(cuepoint.EngagementState.QUEUED))
    handle._push(_update(cuepoint.EngagementState.ASSIGNED, "Dana"))
    assigned = await waiter
    assert assigned.associate_name == "Dana"
    assert handle.engagement_id == "eng-1" and handle.state is cuepoint.EngagementState.ASSIGNED
    # "At least QUEUED" is satisfied by a later state; a late iterator replays.
    assert (await handle.wait_for(cuepoint.EngagementState.QUEUED)).state is cuepoint.EngagementState.QUEUED
    handle._push(_update(cuepoint.EngagementState.ENDED))
    states = [u.state.name for u in [u async for u in handle.updates()] if u.state]
    assert states == ["QUEUED", "ASSIGNED", "ENDED"]


async def test_engagement_that_ends_early_raises() -> None:
    handle = Engagement(cuepoint.Cue(cue_id="cue-1"))
    handle._push(_update(cuepoint.EngagementState.QUEUED))
    handle._push(_update(cuepoint.EngagementState.ENDED))
    with pytest.raises(cuepoint.EngagementClosed) as info:
        await handle.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=1.0)
    assert info.value.update.state is cuepoint.EngagementState.ENDED
    ended = await handle.wait_for(cuepoint.EngagementState.ENDED)
    assert ended.state is cuepoint.EngagementState.ENDED


async def test_engagement_wait_times_out_and_sees_session_failure() -> None:
    handle = Engagement(cuepoint.Cue(cue_id="cue-1"))
    with pytest.raises(cuepoint.TimedOut):
        await handle.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=0.01)
    handle._finish(cuepoint.InvalidSignal("INVALID_ARGUMENT: x", code="INVALID_ARGUMENT"))
    with pytest.raises(cuepoint.InvalidSignal):
        await handle.wait_for(cuepoint.EngagementState.ASSIGNED)
