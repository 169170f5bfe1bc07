"""Secondary indexes dropped for a first bulk load and built afterwards.

Dropping is recorded in migrate.deferred_indexes in the same transaction, so
the indexes of an interrupted run are built by the next one.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Awaitable, Callable, Coroutine, Sequence

import asyncpg

from . import MigrationError
from .source import quote_qualified

#: Big append-only tables whose non-unique indexes are dropped while a first load fills them
#: (unique ones stay: dedup and dual-writes need them), and the tables that hold them.
DEFERRABLE: dict[str, tuple[str, ...]] = {
    "audit_events": ("audit.events", "audit.event_hashes"),
    "tool_usage": ("audit.tool_usage",),
    "agent_state": ("core.agent_state",),
}
#: Fewest rows to load for which dropping and rebuilding indexes pays.
MIN_DEFER_ROWS = 10_000
#: maintenance_work_mem of an index build after a load.
INDEX_BUILD_MEMORY = "512MB"
_INDEX_DEF = re.compile(r'^CREATE INDEX ((?:"(?:[^"]|"")+"|[^ ]+)) ON (?:ONLY )?')


async def run_all(coros: Sequence[Coroutine[Any, Any, Any]]) -> None:
    """Run the coroutines at the same time; on the first failure cancel the others, then raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise



async def holds_few(conn: asyncpg.Connection, table: str, todo: int) -> bool:
    """Return whether ``table`` holds fewer than a tenth as many rows as ``todo`` (a first load)."""
    if todo <= 0:
        return False
    held = await conn.fetchval(f"SELECT count(*) FROM (SELECT 1 FROM {quote_qualified(table)} LIMIT $1) AS x",
                               todo // 10 + 1)
    return held * 10 < todo


async def defer_indexes(conn: asyncpg.Connection, tables: Sequence[str]) -> list[str]:
    """Drop the non-unique indexes of ``tables``, recording their definitions in
    migrate.deferred_indexes in the same transaction; return their names."""
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name, format('%I.%I', tn.nspname, tc.relname) AS tab,"
            "       pg_get_indexdef(i.indexrelid) AS def"
            "  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            "  JOIN pg_class tc ON tc.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace"
            " WHERE i.indrelid IN (SELECT to_regclass(x) FROM unnest($1::text[]) AS x)"
            "   AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion"
            "   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
            " ORDER BY 1", list(tables))
        if not rows:
            return []
        await conn.execute(
            "INSERT INTO migrate.deferred_indexes (index_name, table_name, definition)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT (index_name) DO NOTHING",
            [r["name"] for r in rows], [r["tab"] for r in rows], [r["def"] for r in rows])
        for r in rows:
            await conn.execute(f"DROP INDEX {r['name']}")
    return [r["name"] for r in rows]


async def restore_indexes(conn: asyncpg.Connection, connect: Callable[[], Awaitable[asyncpg.Connection]],
                          tables: Sequence[str] | None = None, *, workers: int = 2) -> dict[str, float]:
    """Build the indexes recorded in migrate.deferred_indexes (of ``tables``, or all); return seconds per index.

    Each is built (on a partitioned table: on every partition) and its record
    deleted in one transaction; up to ``workers`` at a time, the extra
    connections from ``connect``.
    """
    rows = await conn.fetch(
        "SELECT index_name, definition FROM migrate.deferred_indexes"
        " WHERE $1::text[] IS NULL OR table_name = ANY ($1::text[])"
        " ORDER BY definition LIKE '% USING gin %' DESC, deferred_at, index_name",  # the slowest first
        None if tables is None else list(tables))
    todo = list(rows)
    took: dict[str, float] = {}

    async def build(c: asyncpg.Connection) -> None:
        while todo:
            r = todo.pop(0)
            started = time.perf_counter()
            async with c.transaction():
                await c.execute(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'")
                await c.execute(_create_index_sql(r["definition"]))
                await c.execute("DELETE FROM migrate.deferred_indexes WHERE index_name = $1", r["index_name"])
            took[r["index_name"]] = time.perf_counter() - started

    extra: list[asyncpg.Connection] = []
    try:
        for _ in range(min(workers, len(rows)) - 1):
            extra.append(await connect())
        await run_all([build(c) for c in (conn, *extra)])
    finally:
        for c in extra:
            await c.close()
    return took


def _create_index_sql(definition: str) -> str:
    """Return pg_get_indexdef's text as an idempotent statement building the index on
    the table and, for a partitioned table, on all its partitions."""
    m = _INDEX_DEF.match(definition)
    if m is None:
        raise MigrationError(f"cannot build the deferred index {definition[:120]!r}; build it by hand")
    return f"CREATE INDEX IF NOT EXISTS {m.group(1)} ON {definition[m.end():]}"
