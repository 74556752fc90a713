"""Cuepoint Python SDK.

Devices stream context signals and receive cues::

    async with await cuepoint.connect("host:50051", app_id="fitkit", device_id="dev-1") as client:
        await client.track("sync_failed", reason="timeout")
        cue = await client.next_cue(timeout=30)
        engagement = await client.accept(cue)
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED)
        await engagement.send_chat("It keeps failing since the update")
        async for message in engagement.messages():  # both sides, server order
            print(message.sender, message.text)

Associates receive the engagements, with the device's context and journey,
and talk to the user through the same client::

    assoc = await cuepoint.connect_associate("host:50051", associate_id="a-1", queues=["default"])
    async for engagement in assoc.engagements():
        print(engagement.describe())
        await assoc.send_chat(engagement, "Hi, I can see the sync errors.")
        change = await assoc.request_upgrade(engagement, cuepoint.Channel.SCREEN_SHARE, timeout=60)

Everything public is importable from here; ``cuepoint.v1`` holds the
generated protobuf code and is not part of the SDK's stable API.
"""

import logging as _logging

from ._version import __version__
from .associate import AssociateClient, AssociateEvent, connect_associate
from .client import Client, CueCallback, Engagement, StateCallback, connect
from .config import AssociateConfig, ClientConfig
from .errors import (
    BufferFull,
    ClientClosed,
    ConnectionLost,
    CuepointError,
    EngagementClosed,
    InvalidSignal,
    Rejected,
    ServerError,
    TimedOut,
)
from .models import (
    AssignedEngagement,
    ButtonAction,
    CallSignal,
    CallSignalKind,
    Channel,
    ChannelChange,
    ChatMessage,
    ConnectionState,
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
    ServerEvent,
    SupervisedEngagement,
    Transfer,
    TransferMode,
    Trigger,
    UpgradeRequest,
    User,
    UserVerification,
)

# Library etiquette: records go nowhere unless the app configures logging; every
# failure the SDK logs is also raised to the caller.
_logging.getLogger("cuepoint").addHandler(_logging.NullHandler())

__all__ = [
    "AssignedEngagement",
    "AssociateClient",
    "AssociateConfig",
    "AssociateEvent",
    "BufferFull",
    "ButtonAction",
    "CallSignal",
    "CallSignalKind",
    "Channel",
    "ChannelChange",
    "ChatMessage",
    "Client",
    "ClientClosed",
    "ClientConfig",
    "ConnectionLost",
    "ConnectionState",
    "Consent",
    "Context",
    "Cue",
    "CueButton",
    "CueCallback",
    "CueImage",
    "CueLayout",
    "CueResponse",
    "CueWithdrawal",
    "CuepointError",
    "Engagement",
    "EngagementClosed",
    "EngagementContext",
    "EngagementEnded",
    "EngagementKind",
    "EngagementState",
    "EngagementUpdate",
    "FallbackOffer",
    "FallbackOption",
    "FeedbackKind",
    "FeedbackRequest",
    "InvalidSignal",
    "InvitationResult",
    "JourneyEntry",
    "Location",
    "MatchedCondition",
    "OutcomeScore",
    "Participant",
    "ParticipantRole",
    "Party",
    "Presence",
    "PriorCue",
    "PriorEngagement",
    "Rejected",
    "RoutingRuleMatch",
    "Scalar",
    "ServerError",
    "ServerEvent",
    "StateCallback",
    "SupervisedEngagement",
    "TimedOut",
    "Transfer",
    "TransferMode",
    "Trigger",
    "UpgradeRequest",
    "User",
    "UserVerification",
    "__version__",
    "connect",
    "connect_associate",
]
