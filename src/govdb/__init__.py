"""govdb: one async store for a governance server, on SQLite, PostgreSQL + AGE, or both.

``get_db()`` returns the process-wide store chosen by the DB_* environment
variables; ``init_db()`` connects it (creating the schema where needed);
``close_db()`` releases it.
"""

from __future__ import annotations

from .backends.base import Database
from .config import Settings
from .errors import (
    ConfigError, ConflictError, GovdbError, NotFoundError, SchemaError,
    StoreUnavailableError, ValidationError,
)

__all__ = [
    "Database", "Settings", "get_db", "init_db", "close_db",
    "GovdbError", "ConfigError", "ValidationError", "NotFoundError",
    "ConflictError", "StoreUnavailableError", "SchemaError",
]

_db: Database | None = None


def get_db(settings: Settings | None = None) -> Database:
    """Return the process-wide store (created on first call, not yet connected)."""
    global _db
    if _db is None:
        from .backends import create_backend
        _db = create_backend(settings or Settings.from_env())
    return _db


async def init_db(settings: Settings | None = None) -> Database:
    """Return the process-wide store, connected and with its schema in place."""
    db = get_db(settings)
    await db.connect()  # idempotent on every backend
    return db


async def close_db() -> None:
    """Close the process-wide store; the next get_db() makes a new one."""
    global _db
    if _db is not None:
        db, _db = _db, None
        await db.close()
