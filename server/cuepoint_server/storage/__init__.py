"""Persistence for Cuepoint: plain records and the embedded SQLite store."""

from .records import (
    ChannelChangeRecord,
    ChatRecord,
    ContextValue,
    CueRecord,
    DecisionRecord,
    EngagementRecord,
    FeedbackRecord,
    SessionRecord,
    SignalRecord,
)
from .sqlite import SCHEMA_VERSION, SqliteStore, StoreClosedError, StoreStats

__all__ = [
    "SCHEMA_VERSION",
    "ChannelChangeRecord",
    "ChatRecord",
    "ContextValue",
    "CueRecord",
    "DecisionRecord",
    "EngagementRecord",
    "FeedbackRecord",
    "SessionRecord",
    "SignalRecord",
    "SqliteStore",
    "StoreClosedError",
    "StoreStats",
]
