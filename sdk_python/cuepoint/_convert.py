"""Translation between ``cuepoint.models`` and the ``cuepoint.v1`` protobufs.

The only module (besides the clients' message building) that knows protobuf
field names. Conversions are total: unset enums become ``None`` and unset
timestamps become ``None`` so a sparse server message never raises here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from functools import partial
from typing import Any, NamedTuple, TypeAlias

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import associate_pb2, common_pb2, device_pb2

from .models import (
    AssignedEngagement,
    ButtonAction,
    CallSignal,
    CallSignalKind,
    Channel,
    ChannelChange,
    ChatMessage,
    Consent,
    Context,
    Cue,
    CueButton,
    CueImage,
    CueLayout,
    CueResponse,
    CueWithdrawal,
    EngagementContext,
    EngagementEnded,
    EngagementKind,
    EngagementState,
    EngagementUpdate,
    FallbackOffer,
    FallbackOption,
    FeedbackKind,
    FeedbackRequest,
    InvitationResult,
    JourneyEntry,
    Location,
    MatchedCondition,
    OutcomeScore,
    Participant,
    ParticipantRole,
    Party,
    Presence,
    PriorCue,
    PriorEngagement,
    RoutingRuleMatch,
    Scalar,
    SupervisedEngagement,
    Transfer,
    TransferMode,
    Trigger,
    UpgradeRequest,
    User,
    UserVerification,
)

CONTEXT_UPDATE_NAME = "context_update"

# Scenario paths (see common.proto) <-> Context fields. Used to flatten
# context changes in a journey into one properties mapping and back.
_CONTEXT_PATHS = {
    "app.version": "app_version",
    "device.os": "os",
    "device.os_version": "os_version",
    "device.model": "device_model",
    "device.locale": "locale",
    "device.timezone": "timezone",
}
_LOCATION_PATHS = {"location.country": "country", "location.region": "region", "location.city": "city"}
_USER_PATHS = {"user.id": "user_id", "user.tier": "tier"}

_CHANNEL_TO_PB = {
    Channel.AUDIO: common_pb2.CHANNEL_AUDIO,
    Channel.SCREEN_SHARE: common_pb2.CHANNEL_SCREEN_SHARE,
    Channel.CHAT: common_pb2.CHANNEL_CHAT,
    Channel.VIDEO: common_pb2.CHANNEL_VIDEO,
}
_CHANNEL_FROM_PB = {v: k for k, v in _CHANNEL_TO_PB.items()}

_CONSENT_TO_PB = {
    Consent.NONE: common_pb2.CONSENT_LEVEL_NONE,
    Consent.ESSENTIAL: common_pb2.CONSENT_LEVEL_ESSENTIAL,
    Consent.FULL: common_pb2.CONSENT_LEVEL_FULL,
}
_CONSENT_FROM_PB = {v: k for k, v in _CONSENT_TO_PB.items()}

_RESPONSE_TO_PB = {
    CueResponse.ACCEPTED: common_pb2.CUE_RESPONSE_KIND_ACCEPTED,
    CueResponse.DECLINED: common_pb2.CUE_RESPONSE_KIND_DECLINED,
    CueResponse.DISMISSED: common_pb2.CUE_RESPONSE_KIND_DISMISSED,
    CueResponse.EXPIRED: common_pb2.CUE_RESPONSE_KIND_EXPIRED,
    CueResponse.OPENED: common_pb2.CUE_RESPONSE_KIND_OPENED,
}

_STATE_TO_PB = {
    EngagementState.QUEUED: common_pb2.ENGAGEMENT_STATE_QUEUED,
    EngagementState.ASSIGNED: common_pb2.ENGAGEMENT_STATE_ASSIGNED,
    EngagementState.ENDED: common_pb2.ENGAGEMENT_STATE_ENDED,
    EngagementState.CALLBACK_REQUESTED: common_pb2.ENGAGEMENT_STATE_CALLBACK_REQUESTED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

_PARTY_TO_PB = {
    Party.USER: common_pb2.PARTY_USER,
    Party.ASSOCIATE: common_pb2.PARTY_ASSOCIATE,
    Party.SYSTEM: common_pb2.PARTY_SYSTEM,
}
_PARTY_FROM_PB = {v: k for k, v in _PARTY_TO_PB.items()}

_CALL_KIND_TO_PB = {
    CallSignalKind.OFFER: common_pb2.CALL_SIGNAL_KIND_OFFER,
    CallSignalKind.ANSWER: common_pb2.CALL_SIGNAL_KIND_ANSWER,
    CallSignalKind.CANDIDATE: common_pb2.CALL_SIGNAL_KIND_CANDIDATE,
    CallSignalKind.HANGUP: common_pb2.CALL_SIGNAL_KIND_HANGUP,
}
_CALL_KIND_FROM_PB = {v: k for k, v in _CALL_KIND_TO_PB.items()}

_FALLBACK_TO_PB = {
    FallbackOption.CALLBACK: device_pb2.FALLBACK_OPTION_CALLBACK,
    FallbackOption.CHAT: device_pb2.FALLBACK_OPTION_CHAT,
    FallbackOption.CANCEL: device_pb2.FALLBACK_OPTION_CANCEL,
}
_FALLBACK_FROM_PB = {v: k for k, v in _FALLBACK_TO_PB.items()}

_PRESENCE_TO_PB = {
    Presence.AVAILABLE: associate_pb2.PRESENCE_AVAILABLE,
    Presence.BUSY: associate_pb2.PRESENCE_BUSY,
    Presence.AWAY: associate_pb2.PRESENCE_AWAY,
}
_PRESENCE_FROM_PB = {v: k for k, v in _PRESENCE_TO_PB.items()}


# --- scalars ----------------------------------------------------------------


def timestamp(t: float) -> Timestamp:
    return Timestamp(**timestamp_fields(t))


def timestamp_fields(t: float) -> dict[str, int]:
    """A Timestamp's fields, for a message built from nested dicts (see event_signal_fields)."""
    # Split before scaling: t * 1e9 is beyond float's integer precision and
    # would shift the time by up to ~100 ns; t - floor(t) is exact.
    seconds = math.floor(t)
    nanos = round((t - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return {"seconds": seconds, "nanos": nanos}


def time_from_proto(msg: Message, field: str) -> float | None:
    """The epoch seconds of Timestamp ``field`` of ``msg``, or None when unset."""
    if not msg.HasField(field):
        return None
    ts: Timestamp = getattr(msg, field)
    # Not ToNanoseconds() / 1e9: dividing the huge integer loses the exact
    # float a round trip of timestamp() should give back.
    return ts.seconds + ts.nanos / 1e9


def channel_to_proto(channel: Channel | None) -> common_pb2.Channel.ValueType:
    return common_pb2.CHANNEL_UNSPECIFIED if channel is None else _CHANNEL_TO_PB[channel]


def channel_from_proto(value: common_pb2.Channel.ValueType) -> Channel | None:
    return _CHANNEL_FROM_PB.get(value)


def consent_to_proto(consent: Consent | None) -> common_pb2.ConsentLevel.ValueType:
    return common_pb2.CONSENT_LEVEL_UNSPECIFIED if consent is None else _CONSENT_TO_PB[consent]


def consent_from_proto(value: common_pb2.ConsentLevel.ValueType) -> Consent | None:
    return _CONSENT_FROM_PB.get(value)


def state_to_proto(state: EngagementState | None) -> common_pb2.EngagementState.ValueType:
    return common_pb2.ENGAGEMENT_STATE_UNSPECIFIED if state is None else _STATE_TO_PB[state]


def state_from_proto(value: common_pb2.EngagementState.ValueType) -> EngagementState | None:
    return _STATE_FROM_PB.get(value)


def party_to_proto(party: Party | None) -> common_pb2.Party.ValueType:
    return common_pb2.PARTY_UNSPECIFIED if party is None else _PARTY_TO_PB[party]


def party_from_proto(value: common_pb2.Party.ValueType) -> Party | None:
    return _PARTY_FROM_PB.get(value)


def call_signal_kind_to_proto(kind: CallSignalKind | None) -> common_pb2.CallSignalKind.ValueType:
    return common_pb2.CALL_SIGNAL_KIND_UNSPECIFIED if kind is None else _CALL_KIND_TO_PB[kind]


def call_signal_kind_from_proto(value: common_pb2.CallSignalKind.ValueType) -> CallSignalKind | None:
    return _CALL_KIND_FROM_PB.get(value)


def fallback_option_to_proto(option: FallbackOption | None) -> device_pb2.FallbackOption.ValueType:
    return device_pb2.FALLBACK_OPTION_UNSPECIFIED if option is None else _FALLBACK_TO_PB[option]


def fallback_option_from_proto(value: device_pb2.FallbackOption.ValueType) -> FallbackOption | None:
    return _FALLBACK_FROM_PB.get(value)


def presence_to_proto(presence: Presence | None) -> associate_pb2.Presence.ValueType:
    return associate_pb2.PRESENCE_UNSPECIFIED if presence is None else _PRESENCE_TO_PB[presence]


def presence_from_proto(value: associate_pb2.Presence.ValueType) -> Presence | None:
    return _PRESENCE_FROM_PB.get(value)


def value_to_proto(value: Scalar) -> common_pb2.AttributeValue:
    # One field, the one of the value's type (the stubs cannot see that through **).
    return common_pb2.AttributeValue(**value_fields(value))  # type: ignore[arg-type]


def value_from_proto(value: common_pb2.AttributeValue) -> Scalar | None:
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    result: Scalar = getattr(value, kind)
    return result


# The AttributeValue field of each exact scalar type (bool is its own key, so it never travels as int_value).
_VALUE_FIELD: dict[type, str] = {str: "string_value", int: "int_value", float: "double_value", bool: "bool_value"}


def value_fields(value: Scalar) -> dict[str, Scalar]:
    """An AttributeValue's fields, for a message built from nested dicts (or by value_to_proto)."""
    return {_VALUE_FIELD.get(type(value)) or _subclass_field(value): value}


def _subclass_field(value: Scalar) -> str:
    """The field of a scalar subclass (an IntEnum, a str subclass): its base type's. bool first: it is an int
    subclass and must not travel as int_value."""
    if isinstance(value, bool):
        return "bool_value"
    if isinstance(value, int):
        return "int_value"
    if isinstance(value, float):
        return "double_value"
    return "string_value"


def fill_attributes(target: MutableMapping[str, common_pb2.AttributeValue], attributes: Mapping[str, Scalar]) -> None:
    for key, value in attributes.items():
        target[key].CopyFrom(value_to_proto(value))


def attributes_from_proto(attributes: Mapping[str, common_pb2.AttributeValue]) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key in sorted(attributes):
        value = value_from_proto(attributes[key])
        if value is not None:
            out[key] = value
    return out


# --- context and identity ---------------------------------------------------


def location_to_proto(location: Location) -> common_pb2.Location:
    return common_pb2.Location(country=location.country, region=location.region, city=location.city)


def location_from_proto(msg: common_pb2.Location) -> Location:
    return Location(country=msg.country, region=msg.region, city=msg.city)


def context_to_proto(context: Context) -> common_pb2.Context:
    msg = common_pb2.Context(
        app_version=context.app_version,
        os=context.os,
        os_version=context.os_version,
        device_model=context.device_model,
        locale=context.locale,
        timezone=context.timezone,
    )
    if context.location is not None:
        msg.location.CopyFrom(location_to_proto(context.location))
    fill_attributes(msg.attributes, context.attributes)
    return msg


def context_from_proto(msg: common_pb2.Context) -> Context:
    return Context(
        app_version=msg.app_version,
        os=msg.os,
        os_version=msg.os_version,
        device_model=msg.device_model,
        locale=msg.locale,
        timezone=msg.timezone,
        location=location_from_proto(msg.location) if msg.HasField("location") else None,
        attributes=attributes_from_proto(msg.attributes),
    )


def user_to_proto(user: User) -> common_pb2.UserIdentity:
    msg = common_pb2.UserIdentity(user_id=user.user_id, tier=user.tier)
    fill_attributes(msg.attributes, user.attributes)
    return msg


def user_from_proto(msg: common_pb2.UserIdentity) -> User:
    return User(user_id=msg.user_id, tier=msg.tier, attributes=attributes_from_proto(msg.attributes))


# --- signals ----------------------------------------------------------------


def event_signal(signal_id: str, at: float, name: str, properties: Mapping[str, Scalar]) -> common_pb2.Signal:
    return common_pb2.Signal(**event_signal_fields(signal_id, at, name, properties))


def event_signal_fields(signal_id: str, at: float, name: str, properties: Mapping[str, Scalar]) -> dict[str, Any]:
    """An event Signal's fields as nested dicts: protobuf builds the whole message from them in one C call,
    where building the Event, each AttributeValue and the Timestamp as messages copies each into its parent
    (one event of two properties, built, wrapped in its DeviceMessage and serialized: 93k -> 60k instructions,
    callgrind; issue 13)."""
    return {
        "id": signal_id,
        "time": timestamp_fields(at),
        "event": {"name": name, "properties": {key: value_fields(value) for key, value in properties.items()}},
    }


def context_update(
    context: common_pb2.Context, user: User | None, clear_keys: Iterable[str]
) -> common_pb2.ContextUpdate:
    update = common_pb2.ContextUpdate(context=context, clear_keys=list(clear_keys))
    if user is not None:
        update.user.CopyFrom(user_to_proto(user))
    return update


def context_signal(
    signal_id: str,
    at: float,
    context: common_pb2.Context,
    user: User | None,
    clear_keys: Iterable[str],
) -> common_pb2.Signal:
    update = context_update(context, user, clear_keys)
    return common_pb2.Signal(id=signal_id, time=timestamp(at), context=update)


def partial_context(
    *,
    app_version: str | None = None,
    os: str | None = None,
    os_version: str | None = None,
    device_model: str | None = None,
    locale: str | None = None,
    timezone: str | None = None,
    location: Location | None = None,
    attributes: Mapping[str, Scalar] | None = None,
) -> common_pb2.Context:
    """A ContextUpdate's context: on the wire, empty fields mean "unchanged"."""
    return context_to_proto(
        Context(
            app_version=app_version or "",
            os=os or "",
            os_version=os_version or "",
            device_model=device_model or "",
            locale=locale or "",
            timezone=timezone or "",
            location=location,
            attributes=attributes or {},
        )
    )


def flatten_context_update(update: common_pb2.ContextUpdate) -> dict[str, Scalar]:
    """The changes of a ContextUpdate keyed by scenario path; empty fields are skipped."""
    out: dict[str, Scalar] = {}
    ctx = update.context
    for path, attr in _CONTEXT_PATHS.items():
        if value := getattr(ctx, attr):
            out[path] = value
    if ctx.HasField("location"):
        for path, attr in _LOCATION_PATHS.items():
            if value := getattr(ctx.location, attr):
                out[path] = value
    for key, value in attributes_from_proto(ctx.attributes).items():
        out[f"attributes.{key}"] = value
    if update.HasField("user"):
        for path, attr in _USER_PATHS.items():
            if value := getattr(update.user, attr):
                out[path] = value
        for key, value in attributes_from_proto(update.user.attributes).items():
            out[f"user.{key}"] = value
    return out


def unflatten_context_update(properties: Mapping[str, Scalar], clear_keys: Iterable[str]) -> common_pb2.ContextUpdate:
    """Inverse of :func:`flatten_context_update` (``user.*`` beyond id/tier are user attributes)."""
    update = common_pb2.ContextUpdate(clear_keys=list(clear_keys))
    for path, value in properties.items():
        if path in _CONTEXT_PATHS:
            setattr(update.context, _CONTEXT_PATHS[path], str(value))
        elif path in _LOCATION_PATHS:
            setattr(update.context.location, _LOCATION_PATHS[path], str(value))
        elif path in _USER_PATHS:
            setattr(update.user, _USER_PATHS[path], str(value))
        elif path.startswith("attributes."):
            update.context.attributes[path.removeprefix("attributes.")].CopyFrom(value_to_proto(value))
        elif path.startswith("user."):
            update.user.attributes[path.removeprefix("user.")].CopyFrom(value_to_proto(value))
        else:
            raise ValueError(f"not a context path: {path!r}")
    return update


def journey_entry_from_proto(msg: common_pb2.JourneyEntry) -> JourneyEntry:
    at = time_from_proto(msg, "time")
    if msg.WhichOneof("kind") == "context":
        return JourneyEntry(
            signal_id=msg.signal_id,
            time=at,
            kind="context",
            name=CONTEXT_UPDATE_NAME,
            properties=flatten_context_update(msg.context),
            cleared_keys=tuple(msg.context.clear_keys),
        )
    return JourneyEntry(
        signal_id=msg.signal_id,
        time=at,
        kind="event",
        name=msg.event.name,
        properties=attributes_from_proto(msg.event.properties),
    )


def journey_entry_to_proto(entry: JourneyEntry) -> common_pb2.JourneyEntry:
    msg = common_pb2.JourneyEntry(signal_id=entry.signal_id)
    if entry.time is not None:
        msg.time.CopyFrom(timestamp(entry.time))
    if entry.kind == "context":
        msg.context.CopyFrom(unflatten_context_update(entry.properties, entry.cleared_keys))
    else:
        msg.event.name = entry.name
        fill_attributes(msg.event.properties, entry.properties)
    return msg


# --- server -> device -------------------------------------------------------


_LAYOUT_TO_PB = {
    CueLayout.BANNER: common_pb2.CUE_LAYOUT_BANNER,
    CueLayout.MODAL: common_pb2.CUE_LAYOUT_MODAL,
    CueLayout.BUBBLE: common_pb2.CUE_LAYOUT_BUBBLE,
}
_LAYOUT_FROM_PB = {v: k for k, v in _LAYOUT_TO_PB.items()}
_ACTION_TO_PB = {
    ButtonAction.ACCEPT: common_pb2.CUE_BUTTON_ACTION_ACCEPT,
    ButtonAction.DECLINE: common_pb2.CUE_BUTTON_ACTION_DECLINE,
    ButtonAction.DISMISS: common_pb2.CUE_BUTTON_ACTION_DISMISS,
    ButtonAction.OPEN_URL: common_pb2.CUE_BUTTON_ACTION_OPEN_URL,
}
_ACTION_FROM_PB = {v: k for k, v in _ACTION_TO_PB.items()}


def _button_to_proto(b: CueButton) -> common_pb2.CueButton:
    return common_pb2.CueButton(
        button_id=b.button_id,
        label=b.label,
        action=_ACTION_TO_PB[b.action] if b.action else common_pb2.CUE_BUTTON_ACTION_UNSPECIFIED,
        channel=channel_to_proto(b.channel),
        url=b.url,
    )


def _button_from_proto(msg: common_pb2.CueButton) -> CueButton:
    return CueButton(
        button_id=msg.button_id,
        label=msg.label,
        action=_ACTION_FROM_PB.get(msg.action),
        channel=channel_from_proto(msg.channel),
        url=msg.url,
    )


def cue_to_proto(cue: Cue) -> common_pb2.Cue:
    msg = common_pb2.Cue(
        cue_id=cue.cue_id,
        scenario_id=cue.scenario_id,
        message=cue.message,
        channel=channel_to_proto(cue.channel),
        allowed_upgrades=[channel_to_proto(c) for c in cue.allowed_upgrades],
        title=cue.title,
        buttons=[_button_to_proto(b) for b in cue.buttons],
        layout=_LAYOUT_TO_PB[cue.layout] if cue.layout else common_pb2.CUE_LAYOUT_UNSPECIFIED,
        variant=cue.variant,
        locale=cue.locale,
    )
    if cue.image is not None:
        msg.image.CopyFrom(common_pb2.CueImage(url=cue.image.url, alt_text=cue.image.alt_text))
    if cue.created_at is not None:
        msg.created_at.CopyFrom(timestamp(cue.created_at))
    if cue.expires_at is not None:
        msg.expires_at.CopyFrom(timestamp(cue.expires_at))
    return msg


def cue_from_proto(msg: common_pb2.Cue) -> Cue:
    upgrades = (channel_from_proto(c) for c in msg.allowed_upgrades)
    return Cue(
        cue_id=msg.cue_id,
        scenario_id=msg.scenario_id,
        message=msg.message,
        channel=channel_from_proto(msg.channel),
        allowed_upgrades=tuple(c for c in upgrades if c is not None),
        created_at=time_from_proto(msg, "created_at"),
        expires_at=time_from_proto(msg, "expires_at"),
        title=msg.title,
        image=CueImage(msg.image.url, msg.image.alt_text) if msg.HasField("image") else None,
        buttons=tuple(_button_from_proto(b) for b in msg.buttons),
        layout=_LAYOUT_FROM_PB.get(msg.layout),
        variant=msg.variant,
        locale=msg.locale,
    )


def user_verification_from_proto(msg: device_pb2.UserVerification) -> UserVerification:
    return UserVerification(user_id=msg.user_id, verified=msg.verified, reason=msg.reason)


def withdrawal_from_proto(msg: device_pb2.CueWithdrawal) -> CueWithdrawal:
    return CueWithdrawal(cue_id=msg.cue_id, reason=msg.reason)


def engagement_update_from_proto(msg: device_pb2.EngagementUpdate) -> EngagementUpdate:
    return EngagementUpdate(
        engagement_id=msg.engagement_id,
        cue_id=msg.cue_id,
        state=state_from_proto(msg.state),
        channel=channel_from_proto(msg.channel),
        queue=msg.queue,
        associate_name=msg.associate_name,
        time=time_from_proto(msg, "time"),
        disposition=msg.disposition,
        queue_position=max(msg.queue_position, 0),
        estimated_wait=msg.estimated_wait.ToTimedelta().total_seconds() if msg.HasField("estimated_wait") else None,
        callback_at=time_from_proto(msg, "callback_at"),
    )


def fallback_offer_from_proto(msg: device_pb2.FallbackOffer) -> FallbackOffer:
    options = (fallback_option_from_proto(o) for o in msg.options)
    return FallbackOffer(
        engagement_id=msg.engagement_id,
        options=tuple(o for o in options if o is not None),
        message=msg.message,
    )


_FEEDBACK_KINDS = {device_pb2.FEEDBACK_KIND_CSAT: FeedbackKind.CSAT, device_pb2.FEEDBACK_KIND_NPS: FeedbackKind.NPS}


def feedback_request_from_proto(msg: device_pb2.FeedbackRequest) -> FeedbackRequest:
    return FeedbackRequest(
        engagement_id=msg.engagement_id,
        kind=_FEEDBACK_KINDS.get(msg.kind),
        question=msg.question,
        min_score=msg.min_score,
        max_score=msg.max_score,
        comment_allowed=msg.comment_allowed,
    )


def feedback_answer(engagement_id: str, score: int, comment: str) -> device_pb2.DeviceMessage:
    answer = device_pb2.FeedbackAnswer(engagement_id=engagement_id, score=score, comment=comment)
    return device_pb2.DeviceMessage(feedback=answer)


# --- engagement traffic (both directions, both sides) -----------------------


def chat_message_from_proto(msg: common_pb2.ChatMessage) -> ChatMessage:
    return ChatMessage(
        engagement_id=msg.engagement_id,
        message_id=msg.message_id,
        sender=party_from_proto(msg.sender),
        text=msg.text,
        time=time_from_proto(msg, "time"),
        sender_id=msg.sender_id,
        sender_name=msg.sender_name,
        whisper=msg.whisper,
    )


def chat_message_to_proto(message: ChatMessage) -> common_pb2.ChatMessage:
    msg = common_pb2.ChatMessage(
        engagement_id=message.engagement_id,
        message_id=message.message_id,
        sender=party_to_proto(message.sender),
        text=message.text,
    )
    if message.time is not None:
        msg.time.CopyFrom(timestamp(message.time))
    return msg


def upgrade_request_from_proto(msg: common_pb2.UpgradeRequest) -> UpgradeRequest:
    return UpgradeRequest(
        engagement_id=msg.engagement_id,
        request_id=msg.request_id,
        channel=channel_from_proto(msg.channel),
        requested_by=party_from_proto(msg.requested_by),
    )


def upgrade_request_to_proto(request: UpgradeRequest) -> common_pb2.UpgradeRequest:
    return common_pb2.UpgradeRequest(
        engagement_id=request.engagement_id,
        request_id=request.request_id,
        channel=channel_to_proto(request.channel),
        requested_by=party_to_proto(request.requested_by),
    )


def upgrade_response_to_proto(engagement_id: str, request_id: str, accepted: bool) -> common_pb2.UpgradeResponse:
    return common_pb2.UpgradeResponse(engagement_id=engagement_id, request_id=request_id, accepted=accepted)


def channel_change_from_proto(msg: common_pb2.ChannelChange) -> ChannelChange:
    return ChannelChange(
        engagement_id=msg.engagement_id,
        request_id=msg.request_id,
        channel=channel_from_proto(msg.channel),
        requested_by=party_from_proto(msg.requested_by),
        accepted=msg.accepted,
        time=time_from_proto(msg, "time"),
    )


def call_signal_from_proto(msg: common_pb2.CallSignal) -> CallSignal:
    return CallSignal(
        engagement_id=msg.engagement_id,
        kind=call_signal_kind_from_proto(msg.kind),
        payload=bytes(msg.payload),
        sender=party_from_proto(msg.sender),
    )


def call_signal_to_proto(signal: CallSignal) -> common_pb2.CallSignal:
    return common_pb2.CallSignal(
        engagement_id=signal.engagement_id,
        kind=call_signal_kind_to_proto(signal.kind),
        payload=signal.payload,
        sender=party_to_proto(signal.sender),
    )


EngagementPayload: TypeAlias = (
    common_pb2.ChatMessage | common_pb2.UpgradeRequest | common_pb2.UpgradeResponse | common_pb2.CallSignal
)
"""What either side sends about a live engagement; wrapped by :func:`device_message`/:func:`associate_message`."""


def device_message(payload: EngagementPayload) -> device_pb2.DeviceMessage:
    if isinstance(payload, common_pb2.ChatMessage):
        return device_pb2.DeviceMessage(chat=payload)
    if isinstance(payload, common_pb2.UpgradeRequest):
        return device_pb2.DeviceMessage(upgrade_request=payload)
    if isinstance(payload, common_pb2.UpgradeResponse):
        return device_pb2.DeviceMessage(upgrade_response=payload)
    return device_pb2.DeviceMessage(call_signal=payload)


def associate_message(payload: EngagementPayload) -> associate_pb2.AssociateMessage:
    if isinstance(payload, common_pb2.ChatMessage):
        return associate_pb2.AssociateMessage(chat=payload)
    if isinstance(payload, common_pb2.UpgradeRequest):
        return associate_pb2.AssociateMessage(upgrade_request=payload)
    if isinstance(payload, common_pb2.UpgradeResponse):
        return associate_pb2.AssociateMessage(upgrade_response=payload)
    return associate_pb2.AssociateMessage(call_signal=payload)


# --- server -> associate ----------------------------------------------------


def trigger_from_proto(msg: common_pb2.TriggerExplanation) -> Trigger:
    return Trigger(
        scenario_id=msg.scenario_id,
        scenario_name=msg.scenario_name,
        scenario_file=msg.scenario_file,
        priority=msg.priority,
        conditions=tuple(MatchedCondition(c.path, c.description) for c in msg.conditions),
        signal_ids=tuple(msg.signal_ids),
    )


def prior_engagement_from_proto(msg: common_pb2.PriorEngagement) -> PriorEngagement:
    return PriorEngagement(
        engagement_id=msg.engagement_id,
        created_at=time_from_proto(msg, "created_at"),
        scenario_id=msg.scenario_id,
        disposition=msg.disposition,
        notes=msg.notes,
        outcome=msg.outcome,
        wrap_up_outcome=msg.wrap_up_outcome,
    )


_CUE_STATUS = {
    common_pb2.CUE_STATUS_OFFERED: "offered",
    common_pb2.CUE_STATUS_ACCEPTED: "accepted",
    common_pb2.CUE_STATUS_DECLINED: "declined",
    common_pb2.CUE_STATUS_DISMISSED: "dismissed",
    common_pb2.CUE_STATUS_EXPIRED: "expired",
    common_pb2.CUE_STATUS_WITHDRAWN: "withdrawn",
    common_pb2.CUE_STATUS_OPENED: "opened",
}


def prior_cue_from_proto(msg: common_pb2.PriorCue) -> PriorCue:
    return PriorCue(
        cue_id=msg.cue_id,
        created_at=time_from_proto(msg, "created_at"),
        scenario_id=msg.scenario_id,
        status=_CUE_STATUS.get(msg.status, ""),
    )


def routing_rule_from_proto(msg: common_pb2.RoutingRuleMatch) -> RoutingRuleMatch:
    return RoutingRuleMatch(
        index=msg.index,
        name=msg.name,
        file=msg.file,
        line=msg.line,
        queue=msg.queue,
        priority=msg.priority,
        skills=tuple(msg.skills),
        conditions=tuple(MatchedCondition(c.path, c.description) for c in msg.conditions),
    )


def engagement_context_from_proto(msg: common_pb2.EngagementContext) -> EngagementContext:
    # An empty UserIdentity is what consent filtering leaves behind: say "nothing".
    has_user = msg.HasField("user") and msg.user.ByteSize() > 0
    return EngagementContext(
        app_id=msg.app_id,
        device_id=msg.device_id,
        user_id=msg.user_id,
        context=context_from_proto(msg.context),
        user=user_from_proto(msg.user) if has_user else None,
        consent=consent_from_proto(msg.consent),
        journey=tuple(journey_entry_from_proto(e) for e in msg.journey),
        trigger=trigger_from_proto(msg.trigger) if msg.HasField("trigger") else None,
        cue=cue_from_proto(msg.cue) if msg.HasField("cue") else None,
        redacted_fields=tuple(msg.redacted_fields),
        segments=tuple(msg.segments),
        milestones=tuple(msg.milestones),
        prior_engagements=tuple(prior_engagement_from_proto(p) for p in msg.prior_engagements),
        priority=msg.priority,
        user_verified=msg.user_verified,
        scores=tuple(
            OutcomeScore(
                s.outcome,
                s.probability,
                _SCORE_STATUS.get(s.status, ""),
                tuple((f.feature, f.contribution) for f in s.top_features),
            )
            for s in msg.scores
        ),
        prior_cues=tuple(prior_cue_from_proto(c) for c in msg.prior_cues),
        routing_rule=routing_rule_from_proto(msg.routing_rule) if msg.HasField("routing_rule") else None,
    )


_SCORE_STATUS = {
    common_pb2.SCORE_STATUS_TRAINING: "training",
    common_pb2.SCORE_STATUS_TRAINED: "trained",
    common_pb2.SCORE_STATUS_SHADOW: "shadow",
}


def assigned_engagement_from_proto(msg: common_pb2.Engagement) -> AssignedEngagement:
    return AssignedEngagement(
        engagement_id=msg.engagement_id,
        cue_id=msg.cue_id,
        queue=msg.queue,
        channel=channel_from_proto(msg.channel),
        created_at=time_from_proto(msg, "created_at"),
        context=engagement_context_from_proto(msg.context),
        state=state_from_proto(msg.state),
        associate_id=msg.associate_id,
        associate_name=msg.associate_name,
        transcript=tuple(chat_message_from_proto(m) for m in msg.transcript),
        transfers=tuple(
            Transfer(
                from_associate_id=t.from_associate_id,
                to_associate_id=t.to_associate_id,
                to_queue=t.to_queue,
                mode=_TRANSFER_MODES.get(t.mode, TransferMode.BLIND),
                note=t.note,
                time=time_from_proto(t, "time"),
            )
            for t in msg.transfers
        ),
        role=_ROLES.get(msg.role, ParticipantRole.OWNER),
        participants=participants_from_proto(msg.participants),
        kind=EngagementKind.CALLBACK if msg.kind == common_pb2.ENGAGEMENT_KIND_CALLBACK else EngagementKind.LIVE,
        callback_at=time_from_proto(msg, "callback_at"),
        callback_number=msg.callback_number,
    )


_ROLES = {
    common_pb2.PARTICIPANT_ROLE_OWNER: ParticipantRole.OWNER,
    common_pb2.PARTICIPANT_ROLE_CONFERENCE: ParticipantRole.CONFERENCE,
    common_pb2.PARTICIPANT_ROLE_CONSULT: ParticipantRole.CONSULT,
    common_pb2.PARTICIPANT_ROLE_MONITOR: ParticipantRole.MONITOR,
    common_pb2.PARTICIPANT_ROLE_BARGE: ParticipantRole.BARGE,
}
_TRANSFER_MODES = {
    common_pb2.TRANSFER_MODE_BLIND: TransferMode.BLIND,
    common_pb2.TRANSFER_MODE_CONSULT: TransferMode.CONSULT,
}
_TRANSFER_MODES_TO_PROTO = {v: k for k, v in _TRANSFER_MODES.items()}


def participants_from_proto(items: Iterable[common_pb2.Participant]) -> tuple[Participant, ...]:
    return tuple(
        Participant(p.associate_id, p.display_name, _ROLES.get(p.role, ParticipantRole.CONFERENCE)) for p in items
    )


def supervised_from_proto(msg: associate_pb2.SupervisedEngagement) -> SupervisedEngagement:
    return SupervisedEngagement(
        engagement_id=msg.engagement_id,
        queue=msg.queue,
        state=state_from_proto(msg.state),
        channel=channel_from_proto(msg.channel),
        associate_id=msg.associate_id,
        participants=participants_from_proto(msg.participants),
        time=time_from_proto(msg, "time"),
    )


def engagement_ended_from_proto(msg: associate_pb2.EngagementEnded) -> EngagementEnded:
    return EngagementEnded(
        engagement_id=msg.engagement_id,
        disposition=msg.disposition,
        ended_by=party_from_proto(msg.ended_by),
    )


# --- device -> server -------------------------------------------------------


def hello(
    *,
    app_id: str,
    device_id: str,
    context: Context,
    user: User | None,
    consent: Consent,
    sdk_version: str,
    resume_session_id: str = "",
    device_secret: str = "",
    user_token: str = "",
    accepts_cue_ack: bool = False,
    accepts_ack_groups: bool = False,
    engaged_cue_ids: Sequence[str] = (),
) -> device_pb2.DeviceMessage:
    msg = device_pb2.Hello(
        app_id=app_id,
        device_id=device_id,
        context=context_to_proto(context),
        consent=common_pb2.Consent(level=consent_to_proto(consent)),
        sdk_version=sdk_version,
        resume_session_id=resume_session_id,
        device_secret=device_secret,
        user_token=user_token,
        accepts_cue_ack=accepts_cue_ack,
        accepts_ack_groups=accepts_ack_groups,
        engaged_cue_ids=engaged_cue_ids,
    )
    if user is not None:
        msg.user.CopyFrom(user_to_proto(user))
    return device_pb2.DeviceMessage(hello=msg)


def signal_batch(
    batch_id: str, sent_at: float, signals: Iterable[common_pb2.Signal | dict[str, Any]]
) -> device_pb2.DeviceMessage:
    """A SignalBatch of ``signals`` (messages, or their fields as dicts), built in place in its DeviceMessage."""
    batch = {"batch_id": batch_id, "sent_at": timestamp_fields(sent_at), "signals": list(signals)}
    return device_pb2.DeviceMessage(signals=batch)  # type: ignore[arg-type]


class EventRow(NamedTuple):
    """A tracked event as plain values: cheaper to queue than a Signal message, sent by column."""

    id: str
    at: float
    name: str
    properties: Mapping[str, Scalar]


# An EventRow from an (id, at, name, properties) tuple, without the NamedTuple's Python-level __new__ (once per
# track(): issue 13).
event_row = partial(tuple.__new__, EventRow)

# What the client queues: events as rows; context updates (and signals restored from the outbox) as Signals.
Outgoing: TypeAlias = EventRow | common_pb2.Signal


def as_signal(item: Outgoing) -> common_pb2.Signal:
    return event_signal(*item) if isinstance(item, EventRow) else item


def outgoing_time(item: Outgoing) -> float:
    if isinstance(item, EventRow):
        return item.at
    return item.time.seconds + item.time.nanos / 1e9


# Events per batch up to which Signal messages cost less than columns: a string table and nine columns are
# overhead for one or two events. Measured client + server, callgrind (README, "Unbatched ingest"): one
# event 153k instructions as rows against 236k as columns, two 238k against 259k.
ROWS_UP_TO = 2


def signals_message(
    batch_id: str, sent_at: float, items: list[Outgoing], *, shaped: bool = False
) -> device_pb2.DeviceMessage:
    """A batch of events by column (SignalColumns); a batch of one or two events, or one with a context update,
    as a SignalBatch of Signal messages. ``shaped``: the server reads SignalColumns.shape_keys (its Welcome said
    so)."""
    if len(items) > ROWS_UP_TO and all(type(item) is EventRow for item in items):
        return signal_columns(batch_id, sent_at, items, shaped=shaped)  # type: ignore[arg-type]
    return signal_batch(
        batch_id, sent_at, [event_signal_fields(*item) if isinstance(item, EventRow) else item for item in items]
    )


def signal_columns(
    batch_id: str, sent_at: float, events: list[EventRow], *, shaped: bool = False
) -> device_pb2.DeviceMessage:
    strings: dict[str, int] = {}  # string -> its index; insertion order is the string table
    intern = strings.setdefault
    names = [intern(e.name, len(strings)) for e in events]
    props = [e.properties for e in events]
    columns = _uniform_columns(props, strings, shaped) or _property_columns(props, strings)
    columns.update(
        batch_id=batch_id,
        sent_at=timestamp(sent_at),
        strings=list(strings),
        ids=" ".join([e.id for e in events]),
        times_us=[round(e.at * 1e6) for e in events],
        names=names,
    )
    # Given as a dict, the columns are built in place: a SignalColumns message given here would be copied.
    return device_pb2.DeviceMessage(signal_columns=columns)  # type: ignore[arg-type]


_TYPE_OF: dict[type, tuple[int, str]] = {
    str: (device_pb2.PROPERTY_TYPE_STRING, "string_values"),
    bool: (device_pb2.PROPERTY_TYPE_BOOL, "bool_values"),
    int: (device_pb2.PROPERTY_TYPE_INT, "int_values"),
    float: (device_pb2.PROPERTY_TYPE_DOUBLE, "double_values"),
}


# SignalColumns' fields as keyword arguments (or the dict DeviceMessage takes for it).
_Columns: TypeAlias = dict[str, Any]


def _uniform_columns(props: list[Mapping[str, Scalar]], strings: dict[str, int], shaped: bool) -> _Columns | None:
    """The property columns of a batch whose events all have the same keys, in the same order, each key's values
    of one type (an app's usual batch: one event, its properties); None for any other batch.

    A column per key, read by C loops (map, set, slices) instead of Python code per property: sending a batch of
    two-property events cost ~1.7 us a signal in `_property_columns` (issue 13). ``shaped``: the keys and types
    go once (shape_keys, shape_types) instead of once per property (prop_keys, prop_types, prop_counts).
    """
    n = len(props)
    keys = tuple(props[0])
    if not keys:
        return {"prop_counts": [0] * n} if not any(props) else None
    if list(map(tuple, props)).count(keys) != n:
        return None
    width = len(keys)
    key_indexes = [strings.setdefault(key, len(strings)) for key in keys]
    types: list[int] = []
    out: _Columns = {}
    by_column: dict[str, list[list[Scalar]]] = {}
    for key in keys:
        values = [p[key] for p in props]
        kinds = set(map(type, values))
        if len(kinds) != 1 or (kind := _TYPE_OF.get(kinds.pop())) is None:
            return None
        proto_type, column = kind
        types.append(proto_type)
        if proto_type == device_pb2.PROPERTY_TYPE_STRING:
            for value in dict.fromkeys(values):  # each distinct value once, in order
                strings.setdefault(value, len(strings))  # type: ignore[arg-type]
            values = list(map(strings.__getitem__, values))  # type: ignore[arg-type]
        by_column.setdefault(column, []).append(values)
    for column, parts in by_column.items():
        if len(parts) == 1:
            out[column] = parts[0]
        else:
            # Values go in property order: each event's values of this type, key by key.
            merged: list[Scalar] = [0] * (n * len(parts))
            for j, part in enumerate(parts):
                merged[j :: len(parts)] = part
            out[column] = merged
    if shaped:
        return {"shape_keys": key_indexes, "shape_types": types, **out}
    return {"prop_counts": [width] * n, "prop_keys": key_indexes * n, "prop_types": types * n, **out}


def _property_columns(props: list[Mapping[str, Scalar]], strings: dict[str, int]) -> _Columns:
    """The property columns of any batch, property by property."""
    intern = strings.setdefault
    counts: list[int] = []
    keys: list[int] = []
    types: list[int] = []
    text: list[int] = []
    ints: list[int] = []
    doubles: list[float] = []
    bools: list[bool] = []
    for properties in props:
        counts.append(len(properties))
        for key, value in properties.items():
            keys.append(intern(key, len(strings)))
            kind = type(value)
            if kind is str:
                types.append(device_pb2.PROPERTY_TYPE_STRING)
                text.append(intern(value, len(strings)))  # type: ignore[arg-type]
            elif kind is bool:
                types.append(device_pb2.PROPERTY_TYPE_BOOL)
                bools.append(value)  # type: ignore[arg-type]
            elif kind is int:
                types.append(device_pb2.PROPERTY_TYPE_INT)
                ints.append(value)  # type: ignore[arg-type]
            else:
                types.append(device_pb2.PROPERTY_TYPE_DOUBLE)
                doubles.append(value)  # type: ignore[arg-type]
    return {
        "prop_counts": counts,
        "prop_keys": keys,
        "prop_types": types,
        "string_values": text,
        "int_values": ints,
        "double_values": doubles,
        "bool_values": bools,
    }


def cue_response(cue_id: str, response: CueResponse, at: float, button_id: str = "") -> device_pb2.DeviceMessage:
    msg = device_pb2.CueResponse(cue_id=cue_id, kind=_RESPONSE_TO_PB[response], time=timestamp(at), button_id=button_id)
    return device_pb2.DeviceMessage(cue_response=msg)


def end_by_user(engagement_id: str) -> device_pb2.DeviceMessage:
    return device_pb2.DeviceMessage(end_engagement=device_pb2.EndEngagementByUser(engagement_id=engagement_id))


def fallback_choice(
    engagement_id: str, option: FallbackOption, phone_number: str, callback_at: float | None = None
) -> device_pb2.DeviceMessage:
    msg = device_pb2.FallbackChoice(
        engagement_id=engagement_id, option=fallback_option_to_proto(option), phone_number=phone_number
    )
    if callback_at is not None:
        msg.callback_at.CopyFrom(timestamp(callback_at))
    return device_pb2.DeviceMessage(fallback_choice=msg)


# --- associate -> server ----------------------------------------------------


def sign_in(
    *,
    associate_id: str,
    display_name: str,
    queues: Iterable[str],
    capacity: int,
    skills: Iterable[str] = (),
    manual_claim: bool = False,
    presence: Presence | None = None,
    supervised_queues: Iterable[str] = (),
    channel_capacity: Mapping[Channel, int] | None = None,
) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.SignIn(
        channel_capacity=[
            associate_pb2.ChannelCapacity(channel=channel_to_proto(c), limit=n)
            for c, n in (channel_capacity or {}).items()
        ],
        supervised_queues=list(supervised_queues),
        associate_id=associate_id,
        display_name=display_name,
        queues=list(queues),
        capacity=capacity,
        skills=list(skills),
        manual_claim=manual_claim,
        presence=presence_to_proto(presence),
    )
    return associate_pb2.AssociateMessage(sign_in=msg)


def claim_engagement(engagement_id: str) -> associate_pb2.AssociateMessage:
    return associate_pb2.AssociateMessage(claim=associate_pb2.ClaimEngagement(engagement_id=engagement_id))


def reject_engagement(engagement_id: str, reason: str) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.RejectEngagement(engagement_id=engagement_id, reason=reason)
    return associate_pb2.AssociateMessage(reject=msg)


def set_presence(presence: Presence, reason: str = "") -> associate_pb2.AssociateMessage:
    msg = associate_pb2.SetPresence(presence=presence_to_proto(presence), reason=reason)
    return associate_pb2.AssociateMessage(presence=msg)


def transfer(
    engagement_id: str, to_associate_id: str, to_queue: str, mode: TransferMode, note: str
) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.TransferEngagement(
        engagement_id=engagement_id,
        to_associate_id=to_associate_id,
        to_queue=to_queue,
        mode=_TRANSFER_MODES_TO_PROTO[mode],
        note=note,
    )
    return associate_pb2.AssociateMessage(transfer=msg)


def complete_transfer(engagement_id: str) -> associate_pb2.AssociateMessage:
    return associate_pb2.AssociateMessage(complete_transfer=associate_pb2.CompleteTransfer(engagement_id=engagement_id))


def add_participant(engagement_id: str, associate_id: str) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.AddParticipant(engagement_id=engagement_id, associate_id=associate_id)
    return associate_pb2.AssociateMessage(add_participant=msg)


def leave(engagement_id: str, disposition: str, notes: str) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.LeaveEngagement(engagement_id=engagement_id, disposition=disposition, notes=notes)
    return associate_pb2.AssociateMessage(leave=msg)


def monitor(engagement_id: str) -> associate_pb2.AssociateMessage:
    return associate_pb2.AssociateMessage(monitor=associate_pb2.MonitorEngagement(engagement_id=engagement_id))


def whisper(engagement_id: str, text: str) -> associate_pb2.AssociateMessage:
    return associate_pb2.AssociateMessage(whisper=associate_pb2.Whisper(engagement_id=engagement_id, text=text))


def invite(device_id: str, channel: Channel, message: str, reason: str) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.InviteDevice(
        device_id=device_id, channel=channel_to_proto(channel), message=message, reason=reason
    )
    return associate_pb2.AssociateMessage(invite=msg)


def invitation_from_proto(msg: associate_pb2.InvitationResult) -> InvitationResult:
    return InvitationResult(msg.device_id, msg.cue_id, msg.blocked_reason, msg.detail)


def barge(engagement_id: str) -> associate_pb2.AssociateMessage:
    return associate_pb2.AssociateMessage(barge=associate_pb2.BargeIn(engagement_id=engagement_id))


def end_engagement(
    engagement_id: str, disposition: str, notes: str, outcome: str = ""
) -> associate_pb2.AssociateMessage:
    msg = associate_pb2.EndEngagement(
        engagement_id=engagement_id, disposition=disposition, notes=notes, outcome=outcome
    )
    return associate_pb2.AssociateMessage(end=msg)
