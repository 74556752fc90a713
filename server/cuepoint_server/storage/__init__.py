"""Persistence for Cuepoint: plain records, the embedded SQLite store and the PostgreSQL store."""

from .audit_log import AuditRecord
from .base import AcceptOutcome, FunnelSlice, OfferCommit, OfferGuard, OfferResult, Store, StoreClosedError, StoreStats
from .postgres import PostgresStore
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
    ReplicaRecord,
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
    "OfferGuard",
    "OfferResult",
    "ParticipationRecord",
    "PostgresStore",
    "ReplicaRecord",
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
