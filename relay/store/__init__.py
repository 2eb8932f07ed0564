"""Persistence: one Store protocol, an SQLite and a PostgreSQL implementation."""

from __future__ import annotations

from relay.store.base import Store, StoreConflict, StoreUnavailable

__all__ = ["Store", "StoreConflict", "StoreUnavailable", "open_store"]


async def open_store(
    store_url: str,
    *,
    synchronous: str = "NORMAL",
    sqlite_busy_timeout_ms: int = 5_000,
    postgres_schema: str = "public",
) -> Store:
    """Open (and migrate) the store named by `RELAY_STORE_URL`."""
    store: Store
    if store_url.startswith("sqlite:///"):
        from relay.config import sqlite_path
        from relay.store.sqlite import SQLiteStore

        store = SQLiteStore(
            sqlite_path(store_url),
            synchronous=synchronous,
            busy_timeout_ms=sqlite_busy_timeout_ms,
        )
    elif store_url.startswith(("postgresql://", "postgres://")):
        from relay.store.postgres import PostgresStore

        store = PostgresStore(store_url, schema=postgres_schema)
    else:
        # Never echo the URL: it may carry a password.
        raise StoreUnavailable("the store URL must start with sqlite:/// or postgresql://")
    await store.open()
    return store
