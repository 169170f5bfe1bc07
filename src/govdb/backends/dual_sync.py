"""Apply outbox entries: copy a row's current state from SQLite to PostgreSQL and the graph.

One PostgreSQL transaction applies a batch of entries. It first takes
``pg_advisory_xact_lock`` on each (table, key), in hash order (no deadlock
between batches), and only then reads the rows from SQLite: whoever applies
a key last read it after every write already committed to SQLite, so
concurrent writers, several processes and replays after a crash all end at
the latest state, and applying an entry twice is harmless.

Rows are converted by the migration's :class:`~govdb.migrate.clean.Cleaner`
and written with the backfill's column lists, so a dual-written row is the
row a backfill writes and ``govdb migrate verify`` compares equal. Entity
rows are overwritten with SQLite's current state; append-only rows are
inserted once (a stored row with other content under the same key is an
error, never overwritten). Graph nodes and edges of the key are upserted
with the set-based SQL of :mod:`govdb.migrate.graph`, keyed as it keys them.

Errors are classified by exception class and SQLSTATE: constraint and data
errors (classes 22, 23, 54) and rows the cleaner refuses are *permanent*
(the entry is parked); lost connections, timeouts, shutdowns, lock and
serialization failures and a busy SQLite file are *transient* (retried).
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from typing import Any, Sequence

import asyncpg

from ..errors import GovdbError, StoreUnavailableError
from ..migrate.clean import Cleaner
from ..migrate.targets import TARGETS, Context
from ..migrate.graph import NODE_PROPS, NODE_SQL, build_map, key_expr, label_table, ts_sql
from ..migrate.source import KEYS, quote_ident, quote_qualified
from .age import drop_unused_tags, lock_tags, node_tags
from .outbox import Entry

#: SQLSTATE classes of a write PostgreSQL will never take: data exception,
#: integrity constraint violation, program limit exceeded.
PERMANENT_CLASSES = ("22", "23", "54")
_ENTITY_KEY = {  # entity tables: conflict key (the rest is overwritten with SQLite's state)
    "agent_metadata": "agent_id", "session_identities": "session_id", "calibration_state": "id",
    "discoveries": "id", "dialectic_sessions": "session_id",
}
#: Append-only tables: the PostgreSQL column a stored row is found by.
_APPEND_KEY = {"agent_state": "id", "dialectic_messages": "id", "audit_events": "event_id",
               "tool_usage": "usage_id"}


class PermanentError(GovdbError):
    """PostgreSQL can never take this write as it is (the entry is parked)."""


class _RowRefused(Exception):
    """A row of a batch tried without savepoints failed for good: redo the batch row by row."""


class TransientError(StoreUnavailableError):
    """PostgreSQL (or SQLite) cannot take the write now; retry later."""


def is_transient(exc: BaseException) -> bool:
    """Return whether a failure is worth retrying (by class and SQLSTATE, never by message)."""
    if isinstance(exc, PermanentError):
        return False
    cause = exc
    while isinstance(cause, GovdbError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, asyncpg.PostgresError):
        # Classes other than data/integrity/limits (08 connection, 40 serialization, 53 resources,
        # 55P03 lock, 57 timeout/shutdown, 42 schema missing) are states of the server, not of the row.
        return (cause.sqlstate or "")[:2] not in PERMANENT_CLASSES
    return isinstance(exc, StoreUnavailableError) or isinstance(
        cause, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError))


#: SQLSTATEs of losing a lock conflict to another transaction: the server is fine, try again.
LOCK_CONFLICTS = frozenset({"40P01", "40001", "55P03"})


def is_lock_conflict(exc: BaseException) -> bool:
    """Return whether a failure is a deadlock, serialization failure or lock timeout."""
    cause: BaseException | None = exc
    while cause is not None:
        if getattr(cause, "sqlstate", None) in LOCK_CONFLICTS:
            return True
        cause = cause.__cause__
    return False


def describe(exc: BaseException) -> str:
    """Return an error's class and SQLSTATE (and a PermanentError's own text): no payloads."""
    if isinstance(exc, PermanentError):
        return str(exc)
    cause = exc
    while isinstance(cause, GovdbError) and cause.__cause__ is not None:
        cause = cause.__cause__
    state = getattr(cause, "sqlstate", None)
    constraint = getattr(cause, "constraint_name", None)
    text = type(cause).__name__ + (f" (SQLSTATE {state})" if state else "")
    return text + (f" on constraint {constraint}" if constraint else "")


# -- reading the rows from SQLite (on the SQLite backend's thread) ------------------

def read_rows(conn: Any, keys: Sequence[tuple[str, tuple[Any, ...]]]) -> dict[tuple[str, str], Any]:
    """Return {(table, key text): (row dict or None, tag rows)} read losslessly, as the backfill reads."""
    import functools
    from .outbox import encode
    factory = conn.text_factory
    conn.text_factory = functools.partial(str, encoding="utf-8", errors="surrogateescape")
    try:
        out: dict[tuple[str, str], Any] = {}
        for table, key in keys:
            cols = KEYS[table]
            where = " AND ".join(f"{quote_ident(c)} = ?" for c in cols)
            cur = conn.execute(f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {where}"
                               " ORDER BY rowid LIMIT 1", tuple(key))
            names = [d[0] for d in cur.description]
            found = cur.fetchone()
            row = None if found is None else dict(zip(names, found))
            tags: list[dict[str, Any]] = []
            if table == "discoveries" and row is not None:
                cur = conn.execute("SELECT rowid AS _rowid, * FROM discovery_tags WHERE discovery_id = ?"
                                   " ORDER BY rowid", (key[0],))
                names = [d[0] for d in cur.description]
                tags = [dict(zip(names, r)) for r in cur.fetchall()]
            out[(table, encode(key))] = (row, tags)
        return out
    finally:
        conn.text_factory = factory


# -- values as PostgreSQL text input (what COPY's text format feeds the same input functions) --

def text_input(v: Any) -> str | None:
    """Return a cleaned value as the text PostgreSQL's input function for its column reads."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "{" + ",".join("NULL" if x is None else '"' + str(x).replace("\\", "\\\\").replace('"', '\\"') + '"'
                              for x in v) + "}"
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    raise TypeError(f"no text input form for a {type(v).__name__}")


# -- the graph, per key ------------------------------------------------------------------

def _k(label: str, expr: str) -> str:
    """The agtype key of ``label`` built from an SQL value (what the unique key index holds)."""
    prop = NODE_PROPS[label][0]
    return (f"ag_catalog.agtype_access_operator(ag_catalog.agtype_build_map('{prop}', {expr}),"
            f" '\"{prop}\"'::ag_catalog.agtype)")


def _node_sql(graph: str, label: str, param: str) -> str:
    props = NODE_PROPS[label]
    return (f"INSERT INTO {label_table(graph, label)} (properties) SELECT {build_map(props, 'src')}"
            f" FROM ({NODE_SQL[label]}) AS src({', '.join(props)}) WHERE src.{props[0]} = {param}"
            f" ON CONFLICT ({key_expr('properties', label)}) DO UPDATE SET properties = EXCLUDED.properties")


def _tag_nodes_sql(graph: str, want: str) -> str:
    return (f"INSERT INTO {label_table(graph, 'Tag')} (properties) SELECT ag_catalog.agtype_build_map('name', w.t)"
            f" FROM ({want}) AS w(t) ON CONFLICT ({key_expr('properties', 'Tag')}) DO NOTHING")


def _edge_sql(graph: str, label: str, start: str, end: str, key_end: str, param: str, want: str,
              props: tuple[str, ...] = (), exact: bool = True) -> list[str]:
    """Return statements making the ``label`` edges of one node (at ``key_end``) those ``want`` lists."""
    t = label_table(graph, label)
    cols = ", ".join(("other", *props))
    a_key = _k(start, param if key_end == "start" else "w.other")
    b_key = _k(end, param if key_end == "end" else "w.other")
    out = [f"INSERT INTO {t} (start_id, end_id{', properties' if props else ''})"
           f" SELECT a.id, b.id{', ' + build_map(props, 'w') if props else ''} FROM ({want}) AS w({cols})"
           f" JOIN ONLY {label_table(graph, start)} AS a ON {key_expr('a.properties', start)} = {a_key}"
           f" JOIN ONLY {label_table(graph, end)} AS b ON {key_expr('b.properties', end)} = {b_key}"
           f" WHERE NOT EXISTS (SELECT 1 FROM ONLY {t} AS x WHERE x.start_id = a.id AND x.end_id = b.id)"]
    if exact:
        mine, other = ("a", "b") if key_end == "start" else ("b", "a")
        other_label = end if key_end == "start" else start
        out.append(
            f"DELETE FROM ONLY {t} AS x USING ONLY {label_table(graph, start)} AS a, ONLY {label_table(graph, end)} AS b"
            f" WHERE x.start_id = a.id AND x.end_id = b.id"
            f" AND {key_expr(mine + '.properties', start if mine == 'a' else end)} = {_k(start if mine == 'a' else end, param)}"
            f" AND NOT EXISTS (SELECT 1 FROM ({want}) AS w({cols})"
            f" WHERE {key_expr(other + '.properties', other_label)} = {_k(other_label, 'w.other')})")
    return out


def graph_statements(graph: str) -> dict[str, list[str]]:
    """Return, per legacy table, the statements that bring the graph of one key in step ($1.. = the key)."""
    agent_tags = "SELECT DISTINCT t FROM core.identities, unnest(tags) AS t WHERE agent_id = $1::text AND t IS NOT NULL"
    disc_tags = "SELECT tag FROM core.discovery_tags WHERE discovery_id = $1::text"
    link = (f"SELECT dst_id, response_type, weight, {ts_sql('created_at')} FROM core.discovery_edges"
            " WHERE src_id = $1::text AND dst_id = $2::text AND edge_type = ")
    return {
        "agent_metadata": [
            _node_sql(graph, "Agent", "$1::text"), _tag_nodes_sql(graph, agent_tags),
            *_edge_sql(graph, "HAS_TAG", "Agent", "Tag", "start", "$1::text", agent_tags),
            *_edge_sql(graph, "SPAWNED", "Agent", "Agent", "end", "$1::text",
                       "SELECT parent_agent_id FROM core.identities WHERE agent_id = $1::text"
                       " AND parent_agent_id IS NOT NULL")],
        "discoveries": [
            _node_sql(graph, "Discovery", "$1::text"), _tag_nodes_sql(graph, disc_tags),
            *_edge_sql(graph, "HAS_TAG", "Discovery", "Tag", "start", "$1::text", disc_tags)],
        "discovery_edges:related_to": _edge_sql(graph, "RELATED_TO", "Discovery", "Discovery", "start", "$1::text",
                                                link + "'related_to' AND $3::text = 'related_to'",
                                                ("response_type", "weight", "created_at"), exact=False),
        "discovery_edges:response_to": _edge_sql(graph, "RESPONSE_TO", "Discovery", "Discovery", "start",
                                                 "$1::text", link + "'response_to' AND $3::text = 'response_to'",
                                                 ("response_type", "weight", "created_at"), exact=False),
        "dialectic_sessions": [
            _node_sql(graph, "DialecticSession", "$1::text"),
            *_edge_sql(graph, "PAUSED_AGENT", "DialecticSession", "Agent", "start", "$1::text",
                       "SELECT paused_agent_id FROM core.dialectic_sessions WHERE session_id = $1::text"),
            *_edge_sql(graph, "REVIEWER", "DialecticSession", "Agent", "start", "$1::text",
                       "SELECT reviewer_agent_id FROM core.dialectic_sessions WHERE session_id = $1::text"
                       " AND reviewer_agent_id IS NOT NULL")],
        "dialectic_messages": [
            _node_sql(graph, "DialecticMessage", "$1::bigint"),
            *_edge_sql(graph, "HAS_MESSAGE", "DialecticSession", "DialecticMessage", "end", "$1::bigint",
                       "SELECT session_id FROM core.dialectic_messages WHERE id = $1::bigint"),
            *_edge_sql(graph, "WROTE", "Agent", "DialecticMessage", "end", "$1::bigint",
                       "SELECT agent_id FROM core.dialectic_messages WHERE id = $1::bigint")],
    }


# -- applying -------------------------------------------------------------------------------

class Applier:
    """Applies outbox entries to PostgreSQL (see the module docstring)."""

    def __init__(self, pg: Any, sqlite: Any, graph: str):
        self.pg = pg            # PostgresDatabase
        self.sqlite = sqlite    # SQLiteDatabase
        self.graph = graph
        self._types: dict[str, list[str]] = {}
        self._graph_sql: dict[str, list[str]] | None = None

    async def apply(self, entries: Sequence[Entry]) -> dict[int, str]:
        """Apply entries in one transaction; return {seq: reason} of those that can never land.

        Raises TransientError (the whole batch is rolled back) when PostgreSQL
        or SQLite cannot take it now.
        """
        if not entries:
            return {}
        keys = list(dict.fromkeys((e.table, e.key) for e in entries))
        failed: dict[tuple[str, tuple[Any, ...]], str] = {}
        # A batch is first tried without a savepoint per row (two round trips fewer a row); if a
        # row can never land the whole try is rolled back and the batch redone row by row.
        for careful in ((False, True) if len(keys) > 1 else (True,)):
            try:
                await self._apply_keys(keys, failed, careful)
                break
            except _RowRefused:
                failed.clear()
                continue
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc):
                    raise TransientError(f"PostgreSQL cannot take the write now ({describe(exc)})") from exc
                if len(keys) != 1:
                    raise
                failed[keys[0]] = describe(exc)
        return {e.seq: failed[(e.table, e.key)] for e in entries if (e.table, e.key) in failed}

    async def _apply_keys(self, keys: list[tuple[str, tuple[Any, ...]]],
                          failed: dict[tuple[str, tuple[Any, ...]], str], careful: bool) -> None:
        async with self.pg.acquire(transaction=True) as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
                " FROM unnest($1::text[]) AS k ORDER BY 1) AS s",
                [f"govdb:dual:{t}:{_key_text(k)}" for t, k in keys])
            rows = await self.sqlite._read(read_rows, keys)
            had = await self._lock_tags(conn, keys, rows) if self.pg.supports_graph else {}
            for table, key in keys:
                row, tags = rows[(table, _key_text(key))]
                old = had.get((table, key), [])
                if len(keys) == 1:
                    await self._apply_row(conn, table, key, row, tags, old)
                    continue
                if not careful:
                    try:
                        await self._apply_row(conn, table, key, row, tags, old)
                    except Exception as exc:  # noqa: BLE001 - classified right here
                        if is_transient(exc):
                            raise
                        raise _RowRefused() from exc
                    continue
                try:
                    async with conn.transaction():  # a savepoint: one bad row leaves the others
                        await self._apply_row(conn, table, key, row, tags, old)
                except Exception as exc:  # noqa: BLE001 - classified right here
                    if is_transient(exc):
                        raise
                    failed[(table, key)] = describe(exc)

    async def _lock_tags(self, conn: asyncpg.Connection, keys: Sequence[tuple[str, tuple[Any, ...]]],
                         rows: dict[tuple[str, str], Any]) -> dict[tuple[str, tuple[Any, ...]], list[str]]:
        """Lock every Tag name the keys' nodes have now or will have after their rows are applied,
        in one order (Tag nodes are shared between keys: batches and single writes never wait in a
        cycle); return the names each tagged key's node has now."""
        had: dict[tuple[str, tuple[Any, ...]], list[str]] = {}
        names: set[str] = set()
        cleaner = Cleaner(context=Context())
        tags_at = TARGETS["agent_metadata"].columns.index("tags")
        for table, key in keys:
            label = _TAGGED.get(table)
            if label is None:
                continue
            had[(table, key)] = await node_tags(conn, self.graph, label, key[0])
            names.update(had[(table, key)])
            row, tag_rows = rows[(table, _key_text(key))]
            if row is None:
                continue
            if table == "agent_metadata":
                out = cleaner.clean(table, row)
                names.update(out.values[tags_at] or () if out.ok else ())  # type: ignore[index]
            else:
                names.update(t.values[1] for t in (cleaner.clean("discovery_tags", r) for r in tag_rows) if t.ok)
        await lock_tags(conn, sorted(n for n in names if isinstance(n, str)))
        return had

    async def _apply_row(self, conn: asyncpg.Connection, table: str, key: tuple[Any, ...],
                         row: dict[str, Any] | None, tags: list[dict[str, Any]], old_tags: list[str]) -> None:
        """Copy one row (and its graph) to PostgreSQL; ``old_tags``: its node's Tag names before."""
        if row is None:
            return  # not in SQLite (nothing to copy)
        cleaner = Cleaner(context=Context())
        out = cleaner.clean(table, row)
        if not out.ok:
            raise PermanentError(f"the SQLite row cannot be migrated: {out.reason}")
        target = TARGETS[table]
        types = await self._column_types(conn, target.table, target.columns)
        values = [text_input(v) for v in out.values]  # type: ignore[union-attr]
        cols = ", ".join(quote_ident(c) for c in target.columns)
        marks = ", ".join(f"${i}::text::{t}" for i, t in enumerate(types, 1))
        into = quote_qualified(target.table)
        if table in _ENTITY_KEY:
            k = _ENTITY_KEY[table]
            rest = [quote_ident(c) for c in target.columns if c != k]
            await conn.execute(
                f"INSERT INTO {into} AS t ({cols}) VALUES ({marks}) ON CONFLICT ({quote_ident(k)}) DO UPDATE"
                f" SET ({', '.join(rest)}) = ROW({', '.join('EXCLUDED.' + c for c in rest)})"
                f" WHERE ({', '.join('t.' + c for c in rest)}) IS DISTINCT FROM"
                f" ({', '.join('EXCLUDED.' + c for c in rest)})", *values)
            if table == "discoveries":
                wanted = [t.values[1] for t in (cleaner.clean("discovery_tags", r) for r in tags) if t.ok]
                await conn.execute("INSERT INTO core.discovery_tags (discovery_id, tag)"
                                   " SELECT $1, t FROM unnest($2::text[]) AS t ON CONFLICT DO NOTHING", key[0], wanted)
                await conn.execute("DELETE FROM core.discovery_tags WHERE discovery_id = $1 AND tag <> ALL ($2::text[])",
                                   key[0], wanted)
        elif table in _APPEND_KEY:
            if table == "audit_events":
                h = [values[target.columns.index(c)] for c in ("raw_hash", "event_id", "ts")]
                fresh = await conn.fetchval("INSERT INTO audit.event_hashes (raw_hash, event_id, ts)"
                                            " VALUES ($1::text, $2::text::uuid, $3::text::timestamptz) ON CONFLICT DO NOTHING"
                                            " RETURNING true", *h)
                if not fresh and not await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM audit.event_hashes WHERE raw_hash = $1::text"
                        " AND event_id = $2::text::uuid)",
                        h[0], h[1]):
                    raise PermanentError(f"audit event {h[1]}: PostgreSQL holds its content or its event_id"
                                         " under another event")
            # tool_usage's key includes ts (partitions): NOT EXISTS keeps usage_id unique across months.
            where = " WHERE NOT EXISTS (SELECT 1 FROM audit.tool_usage WHERE usage_id = $2::text::uuid)" \
                if table == "tool_usage" else ""
            inserted = await conn.fetchval(
                f"INSERT INTO {into} ({cols}) SELECT {marks}{where} ON CONFLICT DO NOTHING RETURNING true", *values)
            if not inserted:
                k = _APPEND_KEY[table]
                same = await conn.fetchval(
                    f"SELECT EXISTS (SELECT 1 FROM {into} AS t WHERE t.{quote_ident(k)} = ${target.columns.index(k) + 1}"
                    f"::text::{types[target.columns.index(k)]}"
                    f" AND ({', '.join('t.' + quote_ident(c) for c in target.columns)}) IS NOT DISTINCT FROM ({marks}))",
                    *values)
                if not same:
                    raise PermanentError(f"{k} {values[target.columns.index(k)]} of {target.table} is already used"
                                         " in PostgreSQL by a row with other content")
        else:  # discovery_edges: the key is the whole identity, the row never changes
            await conn.execute(f"INSERT INTO {into} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", *values)
        if self.pg.supports_graph:
            await self._sync_graph(conn, table, key, old_tags)

    async def _sync_graph(self, conn: asyncpg.Connection, table: str, key: tuple[Any, ...],
                          old_tags: list[str]) -> None:
        """Bring the key's nodes and edges in step (its Tag names are locked: :meth:`_lock_tags`)."""
        if self._graph_sql is None:
            self._graph_sql = graph_statements(self.graph)
        name = f"{table}:{key[2]}" if table == "discovery_edges" else table
        statements = self._graph_sql.get(name)
        if not statements:
            return
        args = list(key)
        for sql in statements:
            used = max(int(n) for n in _params(sql))
            await conn.execute(sql, *args[:used])
        if old_tags:
            await drop_unused_tags(conn, self.graph, old_tags)

    async def _column_types(self, conn: asyncpg.Connection, table: str, columns: Sequence[str]) -> list[str]:
        types = self._types.get(table)
        if types is None:
            rows = await conn.fetch("SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute"
                                    " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table)
            by_name = {r["attname"]: r["t"] for r in rows}
            types = self._types[table] = [by_name[c] for c in columns]
        return types


#: Legacy tables whose rows carry tags in the graph, and the label of their node.
_TAGGED = {"agent_metadata": "Agent", "discoveries": "Discovery"}


def _params(sql: str) -> list[str]:
    import re
    return re.findall(r"\$(\d+)", sql) or ["0"]


def _key_text(key: tuple[Any, ...]) -> str:
    from .outbox import encode
    return encode(key)
