"""Persistence: one Store protocol, an SQLite and a PostgreSQL implementation."""

from __future__ import annotations

from relay.store.base import Store, StoreConflict, StoreUnavailable

__all__ = ["Store", "StoreConflict", "StoreUnavailable", "open_store"]


async def open_store(store_url: str, *, synchronous: str = "NORMAL") -> Store:
    """Open (and migrate) the store named by `RELAY_STORE_URL`."""
    if store_url.startswith("sqlite:///"):
        from relay.config import sqlite_path
        from relay.store.sqlite import SQLiteStore

        store = SQLiteStore(sqlite_path(store_url), synchronous=synchronous)
        await store.open()
        return store
    raise StoreUnavailable("only sqlite:/// stores are supported by this build")
