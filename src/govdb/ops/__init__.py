"""The operator's tools (spec phase 6): partitions, backup and restore, status.

- ``partitions``: list, maintain (premake, retention, the DEFAULT partitions)
  and schedule (pg_cron, or a crontab line) the monthly audit partitions.
- ``backup``: ``pg_dump -Fc`` / ``pg_restore`` with the server's major version.
- ``status``: one screen of what the configured store holds.

Functions take the Settings first and return an exit code, like commands.py.
"""

from __future__ import annotations

import json
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from rich.console import Console

from ..config import Settings
from ..errors import GovdbError, SchemaError, StoreUnavailableError


class OpsError(GovdbError):
    """An operator's tool cannot do its work; the message names the fix."""


def console() -> Console:
    """Return a console on the current stdout (wide when piped, as in commands.py)."""
    return Console(file=sys.stdout) if sys.stdout.isatty() else Console(file=sys.stdout, width=200)


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=str))


def require_postgres(settings: Settings, what: str) -> None:
    """Refuse a tool that works on PostgreSQL when the backend is sqlite."""
    if settings.backend == "sqlite":
        raise OpsError(f"{what} works on PostgreSQL, but DB_BACKEND is sqlite;"
                       " set DB_BACKEND=postgres (or dual) and DB_POSTGRES_URL")


@asynccontextmanager
async def connect(settings: Settings, application: str = "govdb-ops") -> AsyncIterator[Any]:
    """Yield a connection to the configured PostgreSQL (UTC, JSON decoded)."""
    import asyncpg
    url = settings.postgres_url
    try:
        conn = await asyncpg.connect(url.reveal(), server_settings={"application_name": application,
                                                                     "TimeZone": "UTC"})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise StoreUnavailableError(f"PostgreSQL at {url.masked} is unavailable ({type(exc).__name__});"
                                    " check DB_POSTGRES_URL and that the server runs") from exc
    try:
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(kind, schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
        yield conn
    finally:
        await conn.close()


async def require_schema(conn: Any, settings: Settings) -> None:
    """Raise SchemaError unless govdb's tables are in the database."""
    if not await conn.fetchval("SELECT to_regclass('audit.events') IS NOT NULL"
                               " AND to_regclass('core.schema_version') IS NOT NULL"):
        raise SchemaError(f"the database at {settings.postgres_url.masked} has no govdb schema;"
                          " run `govdb init` first")


__all__ = ["OpsError", "connect", "console", "print_json", "require_postgres", "require_schema"]
