"""Open the store a location names: a postgresql:// URL (several replicas) or a SQLite file (one process)."""

from __future__ import annotations

from .base import Store
from .postgres import PostgresStore, is_postgres_url
from .sqlite import SqliteStore

__all__ = ["open_store"]


async def open_store(location: str) -> Store:
    if is_postgres_url(location):
        return await PostgresStore.open(location)
    return await SqliteStore.open(location)
