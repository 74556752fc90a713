"""Engagement traffic on both streams: chat, upgrades, call signals, claims, fallback.

Converts between the wire and the desk (core/engagements.py) for the message
kinds that device and associate streams share, so the two servicers stay
thin and symmetrical.
"""

from __future__ import annotations

from cuepoint.v1 import associate_pb2, common_pb2, device_pb2

from ..core.errors import InvalidInput
from ..core.model import (
    CallSignalRelay,
    ChannelChanged,
    ChatLine,
    EngagementJoined,
    EngagementOffered,
    FallbackOffered,
    FeedbackAsked,
    InvitationResult,
    OfferWithdrawn,
    SupervisedSnapshot,
    UpgradeAsk,
)
from ..core.service import Core
from ..core.sessions import AssociateSession, DeviceSession
from .convert import (
    CHANNELS,
    PARTIES,
    TRANSFER_MODES,
    callback_at_from_proto,
    chat_to_proto,
    engagement_to_proto,
    supervised_to_proto,
    timestamp,
)

__all__ = [
    "ASSOCIATE_KINDS",
    "DEVICE_KINDS",
    "from_associate",
    "from_device",
    "to_associate",
    "to_device",
]

DEVICE_KINDS = frozenset(
    {"chat", "upgrade_request", "upgrade_response", "call_signal", "end_engagement", "fallback_choice", "feedback"}
)
ASSOCIATE_KINDS = frozenset(
    {
        "claim",
        "reject",
        "presence",
        "chat",
        "upgrade_request",
        "upgrade_response",
        "call_signal",
        "transfer",
        "complete_transfer",
        "add_participant",
        "leave",
        "monitor",
        "whisper",
        "barge",
        "invite",
    }
)
_TRANSFER_MODE_NAMES: dict[int, str] = {v: k for k, v in TRANSFER_MODES.items()}

_CHANNEL_NAMES: dict[int, str] = {v: k for k, v in CHANNELS.items()}
_KINDS: dict[int, str] = {
    common_pb2.CALL_SIGNAL_KIND_OFFER: "offer",
    common_pb2.CALL_SIGNAL_KIND_ANSWER: "answer",
    common_pb2.CALL_SIGNAL_KIND_CANDIDATE: "candidate",
    common_pb2.CALL_SIGNAL_KIND_HANGUP: "hangup",
}
_KIND_TO_PROTO = {v: common_pb2.CallSignalKind.ValueType(k) for k, v in _KINDS.items()}
_FALLBACKS: dict[int, str] = {
    device_pb2.FALLBACK_OPTION_CALLBACK: "callback",
    device_pb2.FALLBACK_OPTION_CHAT: "chat",
    device_pb2.FALLBACK_OPTION_CANCEL: "cancel",
}
_FALLBACK_TO_PROTO = {v: device_pb2.FallbackOption.ValueType(k) for k, v in _FALLBACKS.items()}
_FEEDBACK_KINDS = {"csat": device_pb2.FEEDBACK_KIND_CSAT, "nps": device_pb2.FEEDBACK_KIND_NPS}
_PRESENCE: dict[int, str] = {
    associate_pb2.PRESENCE_AVAILABLE: "available",
    associate_pb2.PRESENCE_BUSY: "busy",
    associate_pb2.PRESENCE_AWAY: "away",
}


def channel_name(field: str, value: int) -> str:
    name = _CHANNEL_NAMES.get(value)
    if name is None:
        raise InvalidInput(field, f"unknown or unspecified channel {value}")
    return name


def presence_name(field: str, value: int, *, default: str | None = None) -> str:
    if value == associate_pb2.PRESENCE_UNSPECIFIED and default is not None:
        return default
    name = _PRESENCE.get(value)
    if name is None:
        raise InvalidInput(field, f"unknown or unspecified presence {value}")
    return name


async def from_device(core: Core, session: DeviceSession, message: device_pb2.DeviceMessage) -> None:
    desk = core.desk
    kind = message.WhichOneof("kind")
    if kind is not None:
        # Across replicas the engagement may still be on its way to this device's replica (core/follow.py).
        await core.followed(session, str(getattr(getattr(message, kind), "engagement_id", "")))
    if kind == "chat":
        engagement = desk.device_engagement(session, message.chat.engagement_id, "chat.engagement_id")
        await desk.chat("user", engagement, message.chat.text)
    elif kind == "upgrade_request":
        req = message.upgrade_request
        engagement = desk.device_engagement(session, req.engagement_id, "upgrade_request.engagement_id")
        desk.request_upgrade("user", engagement, req.request_id, channel_name("upgrade_request.channel", req.channel))
    elif kind == "upgrade_response":
        res = message.upgrade_response
        engagement = desk.device_engagement(session, res.engagement_id, "upgrade_response.engagement_id")
        desk.respond_upgrade("user", engagement, res.request_id, res.accepted)
    elif kind == "call_signal":
        sig = message.call_signal
        engagement = desk.device_engagement(session, sig.engagement_id, "call_signal.engagement_id")
        desk.call_signal("user", engagement, _call_kind(sig.kind), sig.payload)
    elif kind == "end_engagement":
        await desk.end_by_user(session, message.end_engagement.engagement_id)
    elif kind == "fallback_choice":
        choice = message.fallback_choice
        option = _FALLBACKS.get(choice.option)
        if option is None:
            raise InvalidInput("fallback_choice.option", f"unknown or unspecified option {choice.option}")
        await desk.choose_fallback(
            session, choice.engagement_id, option, choice.phone_number, callback_at_from_proto(choice)
        )
    elif kind == "feedback":
        answer = message.feedback
        await desk.give_feedback(session, answer.engagement_id, answer.score, answer.comment)


async def from_associate(core: Core, associate: AssociateSession, message: associate_pb2.AssociateMessage) -> None:
    desk = core.desk
    kind = message.WhichOneof("kind")
    if kind == "claim":
        desk.claim(associate, message.claim.engagement_id)
    elif kind == "reject":
        desk.reject(associate, message.reject.engagement_id, message.reject.reason[:200])
    elif kind == "presence":
        if len(message.presence.reason) > 64:
            raise InvalidInput("presence.reason", "at most 64 characters")
        desk.set_presence(
            associate, presence_name("presence.presence", message.presence.presence), message.presence.reason
        )
    elif kind == "chat":
        engagement = desk.speaking_engagement(associate, message.chat.engagement_id)
        await desk.chat("associate", engagement, message.chat.text, by=associate)
    elif kind == "transfer":
        t = message.transfer
        mode = "blind"
        if t.mode:
            mode = _TRANSFER_MODE_NAMES.get(t.mode, "")
            if not mode:
                raise InvalidInput("transfer.mode", f"unknown transfer mode {t.mode}")
        await desk.transfer(
            associate, t.engagement_id, to_associate_id=t.to_associate_id, to_queue=t.to_queue, mode=mode, note=t.note
        )
    elif kind == "complete_transfer":
        await desk.complete_transfer(associate, message.complete_transfer.engagement_id)
    elif kind == "add_participant":
        add = message.add_participant
        await desk.add_participant(associate, add.engagement_id, add.associate_id)
    elif kind == "leave":
        leave = message.leave
        await desk.leave(associate, leave.engagement_id, leave.disposition, leave.notes)
    elif kind == "monitor":
        await desk.monitor(associate, message.monitor.engagement_id)
    elif kind == "whisper":
        await desk.whisper(associate, message.whisper.engagement_id, message.whisper.text)
    elif kind == "barge":
        await desk.barge(associate, message.barge.engagement_id)
    elif kind == "invite":
        invite = message.invite
        result = core.invite(
            associate, invite.device_id, channel_name("invite.channel", invite.channel), invite.message, invite.reason
        )
        associate.send(result)
    elif kind == "upgrade_request":
        req = message.upgrade_request
        engagement = desk.associate_engagement(associate, req.engagement_id)
        desk.request_upgrade(
            "associate", engagement, req.request_id, channel_name("upgrade_request.channel", req.channel)
        )
    elif kind == "upgrade_response":
        res = message.upgrade_response
        desk.respond_upgrade(
            "associate", desk.associate_engagement(associate, res.engagement_id), res.request_id, res.accepted
        )
    elif kind == "call_signal":
        sig = message.call_signal
        desk.call_signal(
            "associate", desk.associate_engagement(associate, sig.engagement_id), _call_kind(sig.kind), sig.payload
        )


def _call_kind(value: int) -> str:
    kind = _KINDS.get(value)
    if kind is None:
        raise InvalidInput("call_signal.kind", f"unknown or unspecified kind {value}")
    return kind


def _upgrade(ask: UpgradeAsk) -> common_pb2.UpgradeRequest:
    return common_pb2.UpgradeRequest(
        engagement_id=ask.engagement_id,
        request_id=ask.request_id,
        channel=CHANNELS[ask.channel],
        requested_by=PARTIES[ask.requested_by],
    )


def _change(change: ChannelChanged) -> common_pb2.ChannelChange:
    return common_pb2.ChannelChange(
        engagement_id=change.engagement_id,
        request_id=change.request_id,
        channel=CHANNELS[change.channel],
        requested_by=PARTIES[change.requested_by],
        accepted=change.accepted,
        time=timestamp(change.time),
    )


def _signal(sig: CallSignalRelay) -> common_pb2.CallSignal:
    return common_pb2.CallSignal(
        engagement_id=sig.engagement_id, kind=_KIND_TO_PROTO[sig.kind], payload=sig.payload, sender=PARTIES[sig.sender]
    )


def to_device(item: object) -> device_pb2.ServerMessage | None:
    if isinstance(item, ChatLine):
        return device_pb2.ServerMessage(chat=chat_to_proto(item))
    if isinstance(item, UpgradeAsk):
        return device_pb2.ServerMessage(upgrade_request=_upgrade(item))
    if isinstance(item, ChannelChanged):
        return device_pb2.ServerMessage(channel_change=_change(item))
    if isinstance(item, CallSignalRelay):
        return device_pb2.ServerMessage(call_signal=_signal(item))
    if isinstance(item, FallbackOffered):
        return device_pb2.ServerMessage(
            fallback=device_pb2.FallbackOffer(
                engagement_id=item.engagement_id,
                options=[_FALLBACK_TO_PROTO[o] for o in item.options],
                message=item.message,
            )
        )
    if isinstance(item, FeedbackAsked):
        return device_pb2.ServerMessage(
            feedback_request=device_pb2.FeedbackRequest(
                engagement_id=item.engagement_id,
                kind=_FEEDBACK_KINDS[item.kind],
                question=item.question,
                min_score=item.min_score,
                max_score=item.max_score,
                comment_allowed=item.comment_allowed,
            )
        )
    return None


def to_associate(item: object) -> associate_pb2.AssociateEvent | None:
    if isinstance(item, ChatLine):
        return associate_pb2.AssociateEvent(chat=chat_to_proto(item))
    if isinstance(item, UpgradeAsk):
        return associate_pb2.AssociateEvent(upgrade_request=_upgrade(item))
    if isinstance(item, ChannelChanged):
        return associate_pb2.AssociateEvent(channel_change=_change(item))
    if isinstance(item, CallSignalRelay):
        return associate_pb2.AssociateEvent(call_signal=_signal(item))
    if isinstance(item, EngagementOffered):
        return associate_pb2.AssociateEvent(offered=engagement_to_proto(item.view))
    if isinstance(item, EngagementJoined):
        return associate_pb2.AssociateEvent(joined=engagement_to_proto(item.view))
    if isinstance(item, InvitationResult):
        return associate_pb2.AssociateEvent(
            invitation=associate_pb2.InvitationResult(
                device_id=item.device_id, cue_id=item.cue_id, blocked_reason=item.blocked_reason, detail=item.detail
            )
        )
    if isinstance(item, SupervisedSnapshot):
        return associate_pb2.AssociateEvent(supervised=supervised_to_proto(item))
    if isinstance(item, OfferWithdrawn):
        return associate_pb2.AssociateEvent(
            offer_withdrawn=associate_pb2.OfferWithdrawn(engagement_id=item.engagement_id, reason=item.reason)
        )
    return None
