"""Persistence for Cuepoint: plain records and the embedded SQLite store."""

from .audit_log import AuditRecord
from .base import AcceptOutcome, FunnelSlice, OfferCommit, Store, StoreClosedError, StoreStats
from .records import (
    ChannelChangeRecord,
    ChatRecord,
    ContextValue,
    CueRecord,
    DecisionRecord,
    DeviceCredentialRecord,
    EngagementRecord,
    FeedbackRecord,
    LabelRecord,
    ModelRecord,
    ParticipationRecord,
    SessionRecord,
    SignalRecord,
    SwitchRecord,
    TransferRecord,
    WebhookRecord,
)
from .sqlite import SCHEMA_VERSION, SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "AcceptOutcome",
    "AuditRecord",
    "ChannelChangeRecord",
    "ChatRecord",
    "ContextValue",
    "CueRecord",
    "DecisionRecord",
    "DeviceCredentialRecord",
    "EngagementRecord",
    "FeedbackRecord",
    "FunnelSlice",
    "LabelRecord",
    "ModelRecord",
    "OfferCommit",
    "ParticipationRecord",
    "SessionRecord",
    "SignalRecord",
    "SqliteStore",
    "Store",
    "StoreClosedError",
    "StoreStats",
    "SwitchRecord",
    "TransferRecord",
    "WebhookRecord",
]
