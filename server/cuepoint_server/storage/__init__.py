"""Persistence for Cuepoint: plain records and the embedded SQLite store."""

from .records import (
    ChannelChangeRecord,
    ChatRecord,
    ContextValue,
    CueRecord,
    DecisionRecord,
    EngagementRecord,
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
    "SessionRecord",
    "SignalRecord",
    "SqliteStore",
    "StoreClosedError",
    "StoreStats",
]
