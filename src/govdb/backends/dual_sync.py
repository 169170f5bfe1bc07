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
error, never overwritten). Graph nodes and edges of the keys are upserted
with the SQL of :mod:`govdb.migrate.graph`, keyed as it keys them.

A batch is written set-based: per table one statement over the batch's rows
(one jsonb array of text values), per graph statement one for all its keys
(arrays), in TARGETS order (parents first), so a batch of 200 costs as many
round trips as a batch of one. If PostgreSQL refuses a row, that try is rolled
back and the batch is written again row by row, each under a savepoint, so
only the refused row fails.

Errors are classified by exception class and SQLSTATE: constraint and data
errors (classes 22, 23, 54) and rows the cleaner refuses are *permanent*
(the entry is parked); lost connections, timeouts, shutdowns, lock and
serialization failures and a busy SQLite file are *transient* (retried).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import asyncpg

from ..errors import GovdbError, StoreUnavailableError
from ..migrate.clean import Cleaner
from ..migrate.targets import TARGETS, Context
from ..migrate.graph import NODE_PROPS, NODE_SQL, build_map, key_expr, label_table, ts_sql
from ..migrate.source import KEYS, quote_ident, quote_qualified
from .age import drop_unused_tags, lock_tags
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

def _row_sql(table: str) -> str:
    where = " AND ".join(f"{quote_ident(c)} = ?" for c in KEYS[table])
    return f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {where} ORDER BY rowid LIMIT 1"


_ROW_SQL = {table: _row_sql(table) for table in TARGETS}


def _rows_where(conn: Any, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def read_rows(conn: Any, keys: Sequence[tuple[str, tuple[Any, ...]]]) -> list[tuple[dict[str, Any] | None, list[Any]]]:
    """Return (row dict or None, tag rows) of each key, in order, read losslessly, as the backfill reads.

    Keys of one column are read a table at a time (``IN``); the first row by rowid is a key's
    row. A key no row of that read equals in Python (absent, or an odd legacy value SQLite
    compares with type affinity) is read on its own, as the backfill's lookup reads it."""
    import functools
    factory = conn.text_factory
    conn.text_factory = functools.partial(str, encoding="utf-8", errors="surrogateescape")
    try:
        found: dict[tuple[str, tuple[Any, ...]], dict[str, Any]] = {}
        by_table: dict[str, list[Any]] = {}
        for table, key in keys:
            if len(KEYS[table]) == 1:
                by_table.setdefault(table, []).append(key[0])
        for table, values in by_table.items():
            col = KEYS[table][0]
            for row in _rows_where(conn, f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {quote_ident(col)}"
                                         " IN (SELECT value FROM json_each(?)) ORDER BY rowid", (json.dumps(values),)):
                found.setdefault((table, (row[col],)), row)
        tags_of: dict[Any, list[dict[str, Any]]] = {}
        discoveries = by_table.get("discoveries")
        if discoveries:
            for row in _rows_where(conn, "SELECT rowid AS _rowid, * FROM discovery_tags WHERE discovery_id"
                                         " IN (SELECT value FROM json_each(?)) ORDER BY rowid", (json.dumps(discoveries),)):
                tags_of.setdefault(row["discovery_id"], []).append(row)
        out = []
        for table, key in keys:
            row = found.get((table, tuple(key)))
            if row is None:
                rows = _rows_where(conn, _ROW_SQL[table], tuple(key))
                row = rows[0] if rows else None
            tags = tags_of.get(key[0]) if table == "discoveries" and row is not None else []
            if tags is None:  # none by Python equality: ask SQLite, as the backfill does
                tags = _rows_where(conn, "SELECT rowid AS _rowid, * FROM discovery_tags WHERE discovery_id = ?"
                                         " ORDER BY rowid", (key[0],))
            out.append((row, tags))
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


# -- the graph, a batch of keys at a time ------------------------------------------------

def _k(label: str, expr: str) -> str:
    """The agtype key of ``label`` built from an SQL value (what the unique key index holds)."""
    prop = NODE_PROPS[label][0]
    return (f"ag_catalog.agtype_access_operator(ag_catalog.agtype_build_map('{prop}', {expr}),"
            f" '\"{prop}\"'::ag_catalog.agtype)")


def _node_sql(graph: str, label: str, keys: str) -> str:
    props = NODE_PROPS[label]
    return (f"INSERT INTO {label_table(graph, label)} (properties) SELECT {build_map(props, 'src')}"
            f" FROM ({NODE_SQL[label]}) AS src({', '.join(props)}) WHERE src.{props[0]} = ANY ({keys})"
            f" ON CONFLICT ({key_expr('properties', label)}) DO UPDATE SET properties = EXCLUDED.properties")


def _tagged_node_sql(graph: str, label: str, keys: str, want: str) -> str:
    """The node upsert and the Tag nodes its tags need, in one statement (different tables)."""
    return (f"WITH node AS ({_node_sql(graph, label, keys)})"
            f" INSERT INTO {label_table(graph, 'Tag')} (properties) SELECT ag_catalog.agtype_build_map('name', n.t)"
            f" FROM (SELECT DISTINCT w.other FROM ({want}) AS w(key, other)) AS n(t)"
            f" ON CONFLICT ({key_expr('properties', 'Tag')}) DO NOTHING")


def _edge_sql(graph: str, label: str, start: str, end: str, key_end: str, keys: str, want: str,
              props: tuple[str, ...] = (), exact: bool = True) -> list[str]:
    """Return statements making the ``label`` edges of the nodes at ``key_end`` whose keys are in
    ``keys`` those ``want`` lists: rows (key, other, *props) -- the node's key and the other end's."""
    t = label_table(graph, label)
    cols = ", ".join(("key", "other", *props))
    a_key = _k(start, "w.key" if key_end == "start" else "w.other")
    b_key = _k(end, "w.key" if key_end == "end" else "w.other")
    insert = (f"INSERT INTO {t} (start_id, end_id{', properties' if props else ''})"
              f" SELECT a.id, b.id{', ' + build_map(props, 'w') if props else ''} FROM ({want}) AS w({cols})"
              f" JOIN ONLY {label_table(graph, start)} AS a ON {key_expr('a.properties', start)} = {a_key}"
              f" JOIN ONLY {label_table(graph, end)} AS b ON {key_expr('b.properties', end)} = {b_key}"
              f" WHERE NOT EXISTS (SELECT 1 FROM ONLY {t} AS x WHERE x.start_id = a.id AND x.end_id = b.id)")
    if not exact:
        return [insert]
    mine, other = ("a", "b") if key_end == "start" else ("b", "a")
    mine_label, other_label = (start, end) if key_end == "start" else (end, start)
    # One statement: the DELETE (edges no longer wanted) and the INSERT (wanted, missing) touch
    # different edges, so neither needs to see the other's change.
    return [f"WITH gone AS (DELETE FROM ONLY {t} AS x USING ONLY {label_table(graph, start)} AS a,"
            f" ONLY {label_table(graph, end)} AS b"
            f" WHERE x.start_id = a.id AND x.end_id = b.id"
            f" AND {key_expr(mine + '.properties', mine_label)} IN"
            f" (SELECT {_k(mine_label, 'k.v')} FROM unnest({keys}) AS k(v))"
            f" AND NOT EXISTS (SELECT 1 FROM ({want}) AS w({cols})"
            f" WHERE {key_expr(mine + '.properties', mine_label)} = {_k(mine_label, 'w.key')}"
            f" AND {key_expr(other + '.properties', other_label)} = {_k(other_label, 'w.other')}))"
            f" {insert}"]


def graph_statements(graph: str) -> dict[str, list[str]]:
    """Return, per legacy table, the statements that bring the graph of a batch of its keys in
    step: ``$1`` is the array of keys (for discovery_edges ``$1, $2, $3`` the arrays of src, dst
    and edge type), as text."""
    keys, ids = "$1::text[]", "$1::text[]::bigint[]"
    agent_tags = ("SELECT DISTINCT agent_id, t FROM core.identities, unnest(tags) AS t"
                  f" WHERE agent_id = ANY ({keys}) AND t IS NOT NULL")
    disc_tags = f"SELECT discovery_id, tag FROM core.discovery_tags WHERE discovery_id = ANY ({keys})"

    def links(kind: str) -> str:
        return (f"SELECT e.src_id, e.dst_id, e.response_type, e.weight, {ts_sql('e.created_at')}"
                " FROM core.discovery_edges AS e JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(s, d, t)"
                f" ON e.src_id = k.s AND e.dst_id = k.d AND e.edge_type = k.t WHERE e.edge_type = '{kind}'")
    link_props = ("response_type", "weight", "created_at")
    return {
        "agent_metadata": [
            _tagged_node_sql(graph, "Agent", keys, agent_tags),
            *_edge_sql(graph, "HAS_TAG", "Agent", "Tag", "start", keys, agent_tags),
            *_edge_sql(graph, "SPAWNED", "Agent", "Agent", "end", keys,
                       "SELECT agent_id, parent_agent_id FROM core.identities"
                       f" WHERE agent_id = ANY ({keys}) AND parent_agent_id IS NOT NULL")],
        "discoveries": [
            _tagged_node_sql(graph, "Discovery", keys, disc_tags),
            *_edge_sql(graph, "HAS_TAG", "Discovery", "Tag", "start", keys, disc_tags)],
        "discovery_edges": [
            *_edge_sql(graph, "RELATED_TO", "Discovery", "Discovery", "start", keys, links("related_to"),
                       link_props, exact=False),
            *_edge_sql(graph, "RESPONSE_TO", "Discovery", "Discovery", "start", keys, links("response_to"),
                       link_props, exact=False)],
        "dialectic_sessions": [
            _node_sql(graph, "DialecticSession", keys),
            *_edge_sql(graph, "PAUSED_AGENT", "DialecticSession", "Agent", "start", keys,
                       f"SELECT session_id, paused_agent_id FROM core.dialectic_sessions WHERE session_id = ANY ({keys})"),
            *_edge_sql(graph, "REVIEWER", "DialecticSession", "Agent", "start", keys,
                       "SELECT session_id, reviewer_agent_id FROM core.dialectic_sessions"
                       f" WHERE session_id = ANY ({keys}) AND reviewer_agent_id IS NOT NULL")],
        "dialectic_messages": [
            _node_sql(graph, "DialecticMessage", ids),
            *_edge_sql(graph, "HAS_MESSAGE", "DialecticSession", "DialecticMessage", "end", ids,
                       f"SELECT id, session_id FROM core.dialectic_messages WHERE id = ANY ({ids})"),
            *_edge_sql(graph, "WROTE", "Agent", "DialecticMessage", "end", ids,
                       f"SELECT id, agent_id FROM core.dialectic_messages WHERE id = ANY ({ids})")],
    }


def tags_sql(graph: str, label: str) -> str:
    """SELECT (key, tag name) of the HAS_TAG edges of the ``label`` nodes whose keys are in ``$1``."""
    return (f"SELECT k.v, ag_catalog.agtype_access_operator(t.properties, '\"name\"'::ag_catalog.agtype)"
            f" FROM unnest($1::text[]) AS k(v)"
            f" JOIN ONLY {label_table(graph, label)} AS n ON {key_expr('n.properties', label)} = {_k(label, 'k.v')}"
            f" JOIN ONLY {label_table(graph, 'HAS_TAG')} AS e ON e.start_id = n.id"
            f" JOIN ONLY {label_table(graph, 'Tag')} AS t ON t.id = e.end_id")


# -- applying -------------------------------------------------------------------------------

#: Legacy tables whose rows carry tags in the graph, and the label of their node.
_TAGGED = {"agent_metadata": "Agent", "discoveries": "Discovery"}
#: Where an identity row's tags are among its cleaned values.
_TAGS_AT = TARGETS["agent_metadata"].columns.index("tags")
#: Legacy table -> the PostgreSQL columns its graph statements are keyed by.
_GRAPH_KEY = {"agent_metadata": ("agent_id",), "discoveries": ("id",), "discovery_edges": ("src_id", "dst_id", "edge_type"),
              "dialectic_sessions": ("session_id",), "dialectic_messages": ("id",)}


@dataclass
class _Item:
    """One key of a batch, cleaned: the row PostgreSQL gets (as text input) and its tags."""
    table: str
    key: tuple[Any, ...]
    values: list[str | None]                           # the cleaned row as text input
    tags: list[str]                                    # the tags it has now (Agent/Discovery nodes)
    old_tags: list[str] = field(default_factory=list)  # Agent/Discovery: its node's Tag names before

    def column(self, name: str) -> str | None:
        return self.values[TARGETS[self.table].columns.index(name)]

    def dropped_tags(self) -> set[str]:
        """Tag names its node had before and has no more (their Tag nodes may go unused)."""
        return set(self.old_tags) - set(self.tags)


class Applier:
    """Applies outbox entries to PostgreSQL (see the module docstring)."""

    def __init__(self, pg: Any, sqlite: Any, graph: str):
        self.pg = pg            # PostgresDatabase
        self.sqlite = sqlite    # SQLiteDatabase
        self.graph = graph
        self._types: dict[str, list[str]] = {}
        self._sql: dict[str, dict[str, str]] = {}
        self._graph_sql: dict[str, list[tuple[str, int]]] | None = None  # (statement, parameters it takes)

    async def apply(self, entries: Sequence[Entry]) -> dict[int, str]:
        """Apply entries in one transaction; return {seq: reason} of those that can never land.

        Raises TransientError (the whole batch is rolled back) when PostgreSQL
        or SQLite cannot take it now.
        """
        if not entries:
            return {}
        keys = list(dict.fromkeys((e.table, e.key) for e in entries))
        failed: dict[tuple[str, tuple[Any, ...]], str] = {}
        # The batch is first written set-based; if a row can never land, that try is rolled back
        # and the batch written again row by row, a savepoint each, so only that row fails.
        for careful in (False, True):
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
                break
        return {e.seq: failed[(e.table, e.key)] for e in entries if (e.table, e.key) in failed}

    async def _apply_keys(self, keys: list[tuple[str, tuple[Any, ...]]],
                          failed: dict[tuple[str, tuple[Any, ...]], str], careful: bool) -> None:
        async with self.pg.acquire(transaction=True) as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
                " FROM unnest($1::text[]) AS k ORDER BY 1) AS s",
                [f"govdb:dual:{t}:{_key_text(k)}" for t, k in keys])
            rows = await self.sqlite._read(read_rows, keys)
            items = self._clean(keys, rows, failed)
            if self.pg.supports_graph:
                await self._lock_tags(conn, items)
            if not careful:
                try:
                    await self._write(conn, items)
                except Exception as exc:  # noqa: BLE001 - classified right here
                    if is_transient(exc):
                        raise
                    raise _RowRefused() from exc
                return
            for item in items:
                try:
                    async with conn.transaction():  # a savepoint: one bad row leaves the others
                        await self._write(conn, [item])
                except Exception as exc:  # noqa: BLE001 - classified right here
                    if is_transient(exc):
                        raise
                    failed[(item.table, item.key)] = describe(exc)

    def _clean(self, keys: list[tuple[str, tuple[Any, ...]]], rows: list[tuple[dict[str, Any] | None, list[Any]]],
               failed: dict[tuple[str, tuple[Any, ...]], str]) -> list[_Item]:
        """Return the batch's rows as PostgreSQL takes them (keys not in SQLite have nothing to
        copy); a row the migration's cleaner refuses fails with its reason."""
        items = []
        for (table, key), (row, tag_rows) in zip(keys, rows):
            if row is None:
                continue
            cleaner = Cleaner(context=Context())  # one per row: no state carried between rows
            out = cleaner.clean(table, row)
            if not out.ok:
                failed[(table, key)] = f"the SQLite row cannot be migrated: {out.reason}"
                continue
            if table == "agent_metadata":
                tags = [t for t in out.values[_TAGS_AT] or () if isinstance(t, str)]  # type: ignore[index]
            else:
                tags = [t.values[1] for t in (cleaner.clean("discovery_tags", r) for r in tag_rows) if t.ok]
            items.append(_Item(table, key, [text_input(v) for v in out.values], tags))  # type: ignore[union-attr]
        return items

    async def _lock_tags(self, conn: asyncpg.Connection, items: list[_Item]) -> None:
        """Lock every Tag name the items' nodes have now or will have after they are applied, in
        one order (Tag nodes are shared between keys: batches and single writes never wait in a
        cycle), and note on each item the names its node has now."""
        names: set[str] = set()
        for table, label in _TAGGED.items():
            mine = {item.column(_GRAPH_KEY[table][0]): item for item in items if item.table == table}
            if not mine:
                continue
            for key, name in await conn.fetch(tags_sql(self.graph, label), list(mine)):
                mine[key].old_tags.append(name)
            for item in mine.values():
                names.update(item.old_tags, item.tags)
        await lock_tags(conn, sorted(n for n in names if isinstance(n, str)))

    async def _write(self, conn: asyncpg.Connection, items: list[_Item]) -> None:
        """Write the items' rows and then their graph, table by table in TARGETS order (parents first)."""
        by_table: dict[str, list[_Item]] = {}
        for item in items:
            by_table.setdefault(item.table, []).append(item)
        order = [t for t in TARGETS if t in by_table]
        for table in order:
            await self._write_rows(conn, table, by_table[table])
        if self.pg.supports_graph:
            if self._graph_sql is None:
                self._graph_sql = {table: [(sql, _param_count(sql)) for sql in statements]
                                   for table, statements in graph_statements(self.graph).items()}
            for table in order:
                group = by_table[table]
                statements = self._graph_sql.get(table, [])
                if not statements:
                    continue
                args = [list(c) for c in zip(*([item.column(c) for c in _GRAPH_KEY[table]] for item in group))]
                for sql, n in statements:
                    await conn.execute(sql, *args[:n])
            dropped = set().union(*(item.dropped_tags() for item in items if item.table in _TAGGED))
            if dropped:
                await drop_unused_tags(conn, self.graph, dropped)

    async def _write_rows(self, conn: asyncpg.Connection, table: str, group: list[_Item]) -> None:
        """Write a group of one table's rows with set-based statements (the rows go as one jsonb
        array of text values: one parameter, however many rows and columns)."""
        sql = self._sql.get(table) or await self._table_sql(conn, table)
        rows = json.dumps([item.values for item in group], ensure_ascii=False, separators=(",", ":"))
        if table in _ENTITY_KEY:
            await conn.execute(sql["upsert"], rows)
            if table == "discoveries":
                ids = [item.column("id") for item in group for _ in item.tags]
                tags = [t for item in group for t in item.tags]
                # The DELETE (tags dropped) and the INSERT (tags added) touch different rows.
                await conn.execute(
                    "WITH gone AS (DELETE FROM core.discovery_tags AS d WHERE d.discovery_id = ANY ($3::text[])"
                    " AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS w(id, tag)"
                    " WHERE w.id = d.discovery_id AND w.tag = d.tag))"
                    " INSERT INTO core.discovery_tags (discovery_id, tag)"
                    " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                    ids, tags, [item.column("id") for item in group])
        elif table in _APPEND_KEY:
            if table == "audit_events":
                await self._event_hashes(conn, rows, len(group))
            inserted = [r[0] for r in await conn.fetch(sql["insert"], rows)]
            if len(inserted) < len(group):
                # Those not inserted must already be there with the same content (applied before).
                other = await conn.fetchval(sql["other"], rows, inserted)
                if other is not None:
                    raise PermanentError(f"{_APPEND_KEY[table]} {other} of {TARGETS[table].table} is already used"
                                         " in PostgreSQL by a row with other content")
        else:  # discovery_edges: the key is the whole identity, the row never changes
            await conn.execute(sql["insert"], rows)

    async def _table_sql(self, conn: asyncpg.Connection, table: str) -> dict[str, str]:
        """Build (once) the set-based statements of a table; ``$1`` is the jsonb array of rows."""
        target = TARGETS[table]
        types = await self._column_types(conn, target.table, target.columns)
        source = "jsonb_array_elements($1::text::jsonb) AS w(r)"
        casts = ", ".join(f"(w.r->>{i})::{t}" for i, t in enumerate(types))
        cols = ", ".join(quote_ident(c) for c in target.columns)
        into = quote_qualified(target.table)
        out: dict[str, str] = {}
        if table in _ENTITY_KEY:
            k = _ENTITY_KEY[table]
            rest = [quote_ident(c) for c in target.columns if c != k]
            out["upsert"] = (
                f"INSERT INTO {into} AS t ({cols}) SELECT {casts} FROM {source}"
                f" ON CONFLICT ({quote_ident(k)}) DO UPDATE"
                f" SET ({', '.join(rest)}) = ROW({', '.join('EXCLUDED.' + c for c in rest)})"
                f" WHERE ({', '.join('t.' + c for c in rest)}) IS DISTINCT FROM"
                f" ({', '.join('EXCLUDED.' + c for c in rest)})")
        elif table in _APPEND_KEY:
            key = quote_ident(_APPEND_KEY[table])
            k = target.columns.index(_APPEND_KEY[table])
            key_sql = f"(w.r->>{k})::{types[k]}"
            # tool_usage's key includes ts (partitions): NOT EXISTS keeps usage_id unique across months.
            where = f" WHERE NOT EXISTS (SELECT 1 FROM audit.tool_usage AS u WHERE u.usage_id = {key_sql})" \
                if table == "tool_usage" else ""
            out["insert"] = (f"INSERT INTO {into} ({cols}) SELECT {casts} FROM {source}{where}"
                             f" ON CONFLICT DO NOTHING RETURNING {key}::text")
            out["other"] = (f"SELECT w.r->>{k} FROM {source} WHERE NOT ({key_sql}::text = ANY ($2::text[]))"
                            f" AND NOT EXISTS (SELECT 1 FROM {into} AS t WHERE t.{key} = {key_sql}"
                            f" AND ({', '.join('t.' + quote_ident(c) for c in target.columns)}) IS NOT DISTINCT FROM"
                            f" ({casts})) LIMIT 1")
        else:
            out["insert"] = f"INSERT INTO {into} ({cols}) SELECT {casts} FROM {source} ON CONFLICT DO NOTHING"
        self._sql[table] = out
        return out

    async def _event_hashes(self, conn: asyncpg.Connection, rows: str, n: int) -> None:
        """Claim each event's content hash (audit.event_hashes: one event per content)."""
        h, e, ts = (TARGETS["audit_events"].columns.index(c) for c in ("raw_hash", "event_id", "ts"))
        fresh = [r[0] for r in await conn.fetch(
            f"INSERT INTO audit.event_hashes (raw_hash, event_id, ts) SELECT w.r->>{h}, (w.r->>{e})::uuid,"
            f" (w.r->>{ts})::timestamptz FROM jsonb_array_elements($1::text::jsonb) AS w(r) ON CONFLICT DO NOTHING"
            " RETURNING event_id::text", rows)]
        if len(fresh) < n:
            other = await conn.fetchval(
                f"SELECT w.r->>{e} FROM jsonb_array_elements($1::text::jsonb) AS w(r)"
                f" WHERE NOT ((w.r->>{e})::uuid::text = ANY ($2::text[])) AND NOT EXISTS (SELECT 1"
                f" FROM audit.event_hashes AS x WHERE x.raw_hash = w.r->>{h} AND x.event_id = (w.r->>{e})::uuid)"
                " LIMIT 1", rows, fresh)
            if other is not None:
                raise PermanentError(f"audit event {other}: PostgreSQL holds its content or its event_id"
                                     " under another event")

    async def _column_types(self, conn: asyncpg.Connection, table: str, columns: Sequence[str]) -> list[str]:
        types = self._types.get(table)
        if types is None:
            rows = await conn.fetch("SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute"
                                    " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table)
            by_name = {r["attname"]: r["t"] for r in rows}
            types = self._types[table] = [by_name[c] for c in columns]
        return types


def _param_count(sql: str) -> int:
    """The highest ``$n`` a statement uses (0: none)."""
    import re
    return max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)


def _key_text(key: tuple[Any, ...]) -> str:
    from .outbox import encode
    return encode(key)
