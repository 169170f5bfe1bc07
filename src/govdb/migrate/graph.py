"""Build the AGE graph of agents, discoveries, tags and dialectic sessions.

Two routes, one shape: the labels, edge directions, property names and value
types :class:`govdb.backends.age.Graph` writes live (null properties are
left out, as Cypher's CREATE leaves them out).

- :func:`load_graph`: set-based ``INSERT ... SELECT`` from the relational
  tables (``core.*``, filled by the backfill) into AGE's label tables, edge
  ends resolved by joining on the key property. Never one statement per node
  or edge. Only missing nodes (by key) and edges (by their two ends) are
  added, so it runs any number of times, next to what the backend wrote.
- :func:`export_sql`: a psql script built from a legacy governance.db,
  cleaned by :mod:`govdb.migrate.clean`, for the spec's route
  (``psql -v ON_ERROR_STOP=1 -f FILE``, any number of times). Nodes are
  merged by key with batched Cypher (``UNWIND [...] ... CREATE``); edges
  are batched Cypher lists staged in temporary tables, then inserted with
  their ends resolved by key in SQL, because AGE's Cypher CREATE/MERGE of
  an edge scans both end labels sequentially (quadratic: minutes at 50k
  nodes). Every value in the file goes through :func:`cypher_literal`.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator

import asyncpg

from ..backends import age
from ..backends.postgres import SCHEMA_LOCK
from ..config import SecretUrl
from ..convert import format_timestamp
from ..errors import GovdbError, SchemaError, StoreUnavailableError
from . import MigrationError, SourceError

DEFAULT_GRAPH = "governance"
MODES = ("merge", "create")
#: Rows per Cypher list in the SQL file: AGE builds a list literal by nested
#: additions, so planning grows with its length.
CHUNK = 1_000

#: Vertex label -> its properties, key first, as age.Graph writes them.
NODE_PROPS: dict[str, tuple[str, ...]] = {
    "Agent": ("id", "status", "created_at"),
    "Discovery": ("id", "type", "status", "created_at"),
    "Tag": ("name",),
    "DialecticSession": ("id", "status", "phase", "created_at"),
    "DialecticMessage": ("id", "type", "created_at"),
}
LINK_PROPS = ("response_type", "weight", "created_at")
#: (edge label, start label, end label), one entry per kind of end.
EDGE_KINDS: tuple[tuple[str, str, str], ...] = (
    ("SPAWNED", "Agent", "Agent"),
    ("HAS_TAG", "Agent", "Tag"),
    ("HAS_TAG", "Discovery", "Tag"),
    ("RELATED_TO", "Discovery", "Discovery"),
    ("RESPONSE_TO", "Discovery", "Discovery"),
    ("PAUSED_AGENT", "DialecticSession", "Agent"),
    ("REVIEWER", "DialecticSession", "Agent"),
    ("HAS_MESSAGE", "DialecticSession", "DialecticMessage"),
    ("WROTE", "Agent", "DialecticMessage"),
)
_LINKS = {"related_to": "RELATED_TO", "response_to": "RESPONSE_TO"}


def _edge_props(label: str) -> tuple[str, ...]:
    return LINK_PROPS if label in _LINKS.values() else ()


# -- the relational source ------------------------------------------------------

def ts_sql(column: str) -> str:
    # The text convert.format_timestamp writes (age.Graph's created_at).
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"


#: label -> SELECT of NODE_PROPS[label], in order, from core.*
NODE_SQL: dict[str, str] = {
    "Agent": f"SELECT agent_id, status, {ts_sql('created_at')} FROM core.identities",
    "Discovery": f"SELECT id, type, status, {ts_sql('created_at')} FROM core.discoveries",
    "Tag": ("SELECT t FROM core.identities, unnest(tags) AS t WHERE t IS NOT NULL"
            " UNION SELECT tag FROM core.discovery_tags"),
    "DialecticSession": f"SELECT session_id, status, phase, {ts_sql('created_at')} FROM core.dialectic_sessions",
    "DialecticMessage": f"SELECT id, message_type, {ts_sql('ts')} FROM core.dialectic_messages",
}
_LINK_SQL = (f"SELECT src_id, dst_id, response_type, weight, {ts_sql('created_at')} FROM core.discovery_edges"
             " WHERE edge_type = ")
#: EDGE_KINDS entry -> SELECT of (start key, end key, *link properties) as text keys.
EDGE_SQL: dict[tuple[str, str, str], str] = dict(zip(EDGE_KINDS, (
    "SELECT parent_agent_id, agent_id FROM core.identities WHERE parent_agent_id IS NOT NULL",
    "SELECT DISTINCT agent_id, t FROM core.identities, unnest(tags) AS t WHERE t IS NOT NULL",
    "SELECT discovery_id, tag FROM core.discovery_tags",
    _LINK_SQL + "'related_to'",
    _LINK_SQL + "'response_to'",
    "SELECT session_id, paused_agent_id FROM core.dialectic_sessions",
    "SELECT session_id, reviewer_agent_id FROM core.dialectic_sessions WHERE reviewer_agent_id IS NOT NULL",
    "SELECT session_id, id::text FROM core.dialectic_messages",
    "SELECT agent_id, id::text FROM core.dialectic_messages",
)))


def _check_graph(graph: str) -> str:
    if not isinstance(graph, str) or not age.GRAPH_RE.match(graph):
        raise MigrationError(f"graph name {graph!r} is not 3-63 letters, digits or _ starting with a letter or _")
    return graph


def key_expr(properties: str, label: str) -> str:
    # The expression of the backend's unique index, so lookups and ON CONFLICT use it.
    return (f"ag_catalog.agtype_access_operator({properties},"
            f" '\"{NODE_PROPS[label][0]}\"'::ag_catalog.agtype)")


def build_map(names: Iterable[str], alias: str) -> str:
    # agtype from typed columns (text -> string, float8 -> float, bigint -> integer); nulls left out.
    return "ag_catalog.agtype_build_map_nonull(" + ", ".join(f"'{n}', {alias}.{n}" for n in names) + ")"


def label_table(graph: str, label: str) -> str:
    return f'"{graph}"."{label}"'


def _map_table(label: str) -> str:
    return f"pg_temp._govdb_graph_{label.lower()}"


def node_insert_sql(graph: str, label: str) -> str:
    """Return the INSERT adding ``label`` nodes of core.* that the graph lacks."""
    props = NODE_PROPS[label]
    t = label_table(graph, label)
    return (f"INSERT INTO {t} (properties)"
            f" SELECT s.p FROM (SELECT {build_map(props, 'src')} AS p"
            f" FROM ({NODE_SQL[label]}) AS src({', '.join(props)})) AS s"
            f" WHERE NOT EXISTS (SELECT 1 FROM ONLY {t} AS n"
            f" WHERE {key_expr('n.properties', label)} = {key_expr('s.p', label)})"
            f" ON CONFLICT ({key_expr('properties', label)}) DO NOTHING")


def edge_insert_sql(graph: str, kind: tuple[str, str, str]) -> str:
    """Return the INSERT adding ``kind`` edges of core.* that the graph lacks (needs the key maps)."""
    label, start, end = kind
    props = _edge_props(label)
    t = label_table(graph, label)
    cols = ", ".join(("start_key", "end_key", *props))
    return (f"INSERT INTO {t} (start_id, end_id{', properties' if props else ''})"
            f" SELECT a.gid, b.gid{', ' + build_map(props, 'src') if props else ''}"
            f" FROM ({EDGE_SQL[kind]}) AS src({cols})"
            f" JOIN {_map_table(start)} AS a ON a.key = src.start_key"
            f" JOIN {_map_table(end)} AS b ON b.key = src.end_key"
            f" WHERE NOT EXISTS (SELECT 1 FROM ONLY {t} AS x WHERE x.start_id = a.gid AND x.end_id = b.gid)")


# -- direct bulk load ----------------------------------------------------------------

@asynccontextmanager
async def _connection(conn_or_url: asyncpg.Connection | SecretUrl | str) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(conn_or_url, asyncpg.Connection):
        yield conn_or_url
        return
    url = conn_or_url.reveal() if isinstance(conn_or_url, SecretUrl) else str(conn_or_url)
    masked = SecretUrl(url).masked
    try:
        conn = await asyncpg.connect(url, server_settings={"application_name": "govdb-graph"})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise StoreUnavailableError(f"cannot connect to PostgreSQL at {masked} ({type(exc).__name__}: {exc})") from exc
    try:
        yield conn
    finally:
        await conn.close()


async def _lock(conn: asyncpg.Connection, graph: str, label: str) -> None:
    # One label table per transaction, locked against concurrent writers: the
    # NOT EXISTS checks then see every committed row, and holding one lock at
    # a time cannot deadlock with the backend's writes.
    await conn.execute(f"SET LOCAL search_path = {age.SEARCH_PATH}")
    # Statistics of a label table lag its size (often "empty"): a nested-loop
    # NOT EXISTS would then rescan the table for every row, quadratic; hash
    # and merge joins stay linear whatever the estimates.
    await conn.execute("SET LOCAL enable_nestloop = off")
    await conn.execute(f"LOCK TABLE ONLY {label_table(graph, label)} IN SHARE ROW EXCLUSIVE MODE")


async def load_graph(conn_or_url: asyncpg.Connection | SecretUrl | str,
                     graph: str = DEFAULT_GRAPH) -> dict[str, int]:
    """Add to ``graph`` every node and edge of the relational rows it lacks; return how many per label.

    Creates the extension, graph, labels and indexes when absent (as the
    backend does). Safe to run again and next to live writes.
    """
    _check_graph(graph)
    async with _connection(conn_or_url) as conn:
        try:
            return await _load(conn, graph)
        except GovdbError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise MigrationError(f"the graph load into {graph!r} failed ({type(exc).__name__}: {exc})") from exc


async def _load(conn: asyncpg.Connection, graph: str) -> dict[str, int]:
    if not await conn.fetchval("SELECT to_regclass('core.dialectic_messages') IS NOT NULL"):
        raise SchemaError("the database has no govdb tables (core.*) to build the graph from;"
                          " run the backfill (govdb migrate backfill) first")
    await prepare_graph(conn, graph)
    added: dict[str, int] = {}
    for label in NODE_PROPS:
        async with conn.transaction():
            await _lock(conn, graph, label)
            added[label] = _count(await conn.execute(node_insert_sql(graph, label)))
    try:
        for label in NODE_PROPS:
            # Key text -> graph id, hashed once and joined by every edge kind.
            await conn.execute(
                f"DROP TABLE IF EXISTS {_map_table(label)};"
                f" CREATE TABLE {_map_table(label)} (key text COLLATE \"C\", gid ag_catalog.graphid);"
                f" INSERT INTO {_map_table(label)} SELECT ({key_expr('properties', label)})::text, id"
                f" FROM ONLY {label_table(graph, label)}; ANALYZE {_map_table(label)}")
        for kind in EDGE_KINDS:
            async with conn.transaction():
                await _lock(conn, graph, kind[0])
                added[kind[0]] = added.get(kind[0], 0) + _count(await conn.execute(edge_insert_sql(graph, kind)))
    finally:
        if not conn.is_closed():
            await conn.execute("; ".join(f"DROP TABLE IF EXISTS {_map_table(lb)}" for lb in NODE_PROPS))
    return added


async def prepare_graph(conn: asyncpg.Connection, graph: str) -> None:
    """Create the extension, graph, labels and the backend's indexes where absent."""
    _check_graph(graph)
    async with conn.transaction():
        # The lock the backend holds while it sets up: two set-ups never race.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        if not await _age_installed(conn) and not await age.age_available(conn):
            raise MigrationError("the PostgreSQL server has no Apache AGE extension; install it to build the graph")
        await age.setup_graph(conn, graph)


async def _age_installed(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'age')"))


def _count(status: str) -> int:
    return int(status.split()[-1])


async def graph_counts(conn: asyncpg.Connection, graph: str = DEFAULT_GRAPH) -> dict[str, int]:
    """Return nodes per vertex label and edges per edge label (0 where the graph or label is missing)."""
    _check_graph(graph)
    labels = [*NODE_PROPS, *dict.fromkeys(k[0] for k in EDGE_KINDS)]
    have = {r[0] for r in await conn.fetch(
        "SELECT l.name::text FROM ag_catalog.ag_label l JOIN ag_catalog.ag_graph g ON g.graphid = l.graph"
        " WHERE g.name = $1", graph)} if await _age_installed(conn) else set()
    present = [lb for lb in labels if lb in have]
    counts = dict.fromkeys(labels, 0)
    if present:
        row = await conn.fetchrow("SELECT " + ", ".join(
            f"(SELECT count(*) FROM ONLY {label_table(graph, lb)})" for lb in present))
        counts.update(zip(present, row))
    return counts


async def expected_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Return the node and edge counts per label the relational rows give (what :func:`load_graph` builds)."""
    counts: dict[str, int] = {}
    for label, sql in NODE_SQL.items():
        counts[label] = await conn.fetchval(f"SELECT count(*) FROM ({sql}) AS s")
    for (label, _, _), sql in EDGE_SQL.items():
        counts[label] = counts.get(label, 0) + await conn.fetchval(f"SELECT count(*) FROM ({sql}) AS s")
    return counts


async def load_graph_per_statement(conn: asyncpg.Connection, graph: str = DEFAULT_GRAPH) -> dict[str, int]:
    """Load the same graph with one Cypher MERGE per node and per edge (the spec's prototype; for benchmarks)."""
    _check_graph(graph)
    await prepare_graph(conn, graph)
    done: dict[str, int] = {}

    def merge_node(label: str, props: tuple[str, ...], values: dict[str, Any]) -> str:
        sets = ", ".join(f"n.{p} = ${p}" for p in props[1:] if values[p] is not None)
        merge = f"MERGE (n:{label} {{{props[0]}: ${props[0]}}})"
        return age.cypher_sql(graph, merge + (f" SET {sets}" if sets else ""))

    async with conn.transaction():
        await conn.execute(f"SET LOCAL search_path = {age.SEARCH_PATH}")
        for label, props in NODE_PROPS.items():
            rows = await conn.fetch(NODE_SQL[label])
            for r in rows:
                values = dict(zip(props, r))
                await conn.execute(merge_node(label, props, values), values)
            done[label] = len(rows)
        for kind in EDGE_KINDS:
            label, start, end = kind
            props = _edge_props(label)
            match = f"MATCH (a:{start} {{{NODE_PROPS[start][0]}: $a}}), (b:{end} {{{NODE_PROPS[end][0]}: $b}})"
            rows = await conn.fetch(EDGE_SQL[kind])
            for r in rows:
                a, b = (int(x) if lb == "DialecticMessage" else x for x, lb in zip(r[:2], (start, end)))
                values = {p: v for p, v in zip(props, r[2:]) if v is not None}
                # Properties in the pattern: AGE ignores a SET after MERGE of an edge with parameters.
                inline = " {" + ", ".join(f"{p}: ${p}" for p in values) + "}" if values else ""
                await conn.execute(age.cypher_sql(graph, f"{match} MERGE (a)-[:{label}{inline}]->(b)"),
                                   {"a": a, "b": b, **values})
            done[label] = done.get(label, 0) + len(rows)
    return done


# -- the SQL file ------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Escaped inside a Cypher string: quotes, backslash, '$' (so no dollar-quote
#: tag can ever occur in the Cypher text), and control characters.
_ESCAPE = re.compile(r"['\"\\$\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT = {"'": "\\'", '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def cypher_literal(value: Any) -> str:
    """Return ``value`` as a Cypher literal that AGE reads back exactly.

    Strings are single-quoted with backslash escapes; ``$`` and control
    characters become ``\\uXXXX``, so the result never contains ``$``.
    Floats keep a fraction or exponent (AGE types ``1`` as an integer).
    Maps need identifier keys. Raises ValueError for NaN, infinities, NUL,
    lone surrogates and types Cypher has no literal for.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no Cypher literal")
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("a NUL character cannot be stored in AGE")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{value[:40]!r} is not valid UTF-8 (lone surrogate)") from None
        return "'" + _ESCAPE.sub(lambda m: _SHORT.get(m.group(), f"\\u{ord(m.group()):04x}"), value) + "'"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or not _IDENT.match(k):
                raise ValueError(f"map key {k!r} is not an identifier")
        return "{" + ", ".join(f"{k}: {cypher_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cypher_literal(v) for v in value) + "]"
    raise ValueError(f"{type(value).__name__} has no Cypher literal")


def dollar_quote(body: str, tag: str = "cypher") -> str:
    """Return ``body`` as a dollar-quoted SQL string; ValueError if the tag occurs in it."""
    if not _IDENT.match(tag) or f"${tag}$" in body:
        raise ValueError(f"dollar-quote tag {tag!r} is unusable for this text")
    return f"${tag}$ {body} ${tag}$"


@dataclass
class GraphRows:
    """The graph as rows: node property values (NODE_PROPS order) and edges
    (start key, end key, then LINK_PROPS values for RELATED_TO/RESPONSE_TO)."""

    nodes: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {lb: [] for lb in NODE_PROPS})
    edges: dict[tuple[str, str, str], list[tuple[Any, ...]]] = field(
        default_factory=lambda: {k: [] for k in EDGE_KINDS})

    def counts(self) -> dict[str, int]:
        out = {lb: len(rows) for lb, rows in self.nodes.items()}
        for (label, _, _), rows in self.edges.items():
            out[label] = out.get(label, 0) + len(rows)
        return out


def read_legacy_graph(sqlite_path: Path | str, *, source_tz: tzinfo | str = timezone.utc) -> GraphRows:
    """Return the graph of a legacy governance.db: the rows the backfill migrates, cleaned alike."""
    from .backfill import parse_timezone

    tz = parse_timezone(source_tz)
    try:
        return _read_legacy(Path(sqlite_path), tz)
    except sqlite3.Error as exc:
        raise SourceError(f"cannot read {sqlite_path} ({type(exc).__name__}: {exc})") from exc


def _read_legacy(sqlite_path: Path, tz: tzinfo) -> GraphRows:
    from .clean import Cleaner, build_context
    from .targets import TARGETS
    from .source import LegacySource

    cleaner = Cleaner(source_tz=tz)
    out = GraphRows()
    nodes, edges = out.nodes, out.edges
    tags: set[str] = set()
    iso = format_timestamp
    with LegacySource(sqlite_path) as source, source.snapshot():
        # The orphan checks of the backfill: the keys of the rows that migrate.
        build_context(source, cleaner)

        def migrated(table: str) -> Iterator[dict[str, Any]]:
            """Yield the PostgreSQL column values of each row that migrates (repaired as the backfill repairs)."""
            if table == "agent_metadata":
                outs: Iterable[Any] = cleaner.clean_identities(source.rows(table))
            else:
                outs = (o for batch in source.batches(table, None, 10_000) for o in cleaner.clean_many(table, batch))
            columns = TARGETS[table].columns
            return (dict(zip(columns, o.values)) for o in outs if o.ok)

        for r in migrated("agent_metadata"):
            nodes["Agent"].append((r["agent_id"], r["status"], iso(r["created_at"])))
            if r["parent_agent_id"] is not None:
                edges["SPAWNED", "Agent", "Agent"].append((r["parent_agent_id"], r["agent_id"]))
            for tag in sorted({t for t in r["tags"] if t is not None}):
                tags.add(tag)
                edges["HAS_TAG", "Agent", "Tag"].append((r["agent_id"], tag))
        for r in migrated("discoveries"):
            nodes["Discovery"].append((r["id"], r["type"], r["status"], iso(r["created_at"])))
        for r in migrated("discovery_tags"):
            tags.add(r["tag"])
            edges["HAS_TAG", "Discovery", "Tag"].append((r["discovery_id"], r["tag"]))
        for r in migrated("discovery_edges"):
            edges[_LINKS[r["edge_type"]], "Discovery", "Discovery"].append(
                (r["src_id"], r["dst_id"], r["response_type"], r["weight"], iso(r["created_at"])))
        for r in migrated("dialectic_sessions"):
            nodes["DialecticSession"].append((r["session_id"], r["status"], r["phase"], iso(r["created_at"])))
            edges["PAUSED_AGENT", "DialecticSession", "Agent"].append((r["session_id"], r["paused_agent_id"]))
            if r["reviewer_agent_id"] is not None:
                edges["REVIEWER", "DialecticSession", "Agent"].append((r["session_id"], r["reviewer_agent_id"]))
        for r in migrated("dialectic_messages"):
            nodes["DialecticMessage"].append((r["id"], r["message_type"], iso(r["ts"])))
            edges["HAS_MESSAGE", "DialecticSession", "DialecticMessage"].append((r["session_id"], r["id"]))
            edges["WROTE", "Agent", "DialecticMessage"].append((r["agent_id"], r["id"]))
    nodes["Tag"] = [(t,) for t in sorted(tags)]
    return out


def render_sql(rows: GraphRows, graph: str = DEFAULT_GRAPH, mode: str = "merge", *,
               chunk: int = CHUNK, note: str = "") -> Iterator[str]:
    """Yield the psql script that writes ``rows`` into ``graph``, statement by statement.

    ``merge``: adds only what is missing (nodes by key, edges by their ends),
    so the script can be applied any number of times. ``create``: plain
    CREATE, for an empty graph. The whole script is one transaction.
    """
    _check_graph(graph)
    if mode not in MODES:
        raise MigrationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    counts = rows.counts()
    yield (f"-- govdb AGE graph export (mode {mode}) into graph {graph}{note}\n"
           f"-- {sum(counts[lb] for lb in NODE_PROPS)} nodes, {sum(len(e) for e in rows.edges.values())} edges."
           f"\n-- Apply: psql -v ON_ERROR_STOP=1 -f THIS_FILE"
           + (" (as often as needed: nothing is duplicated)" if mode == "merge" else " (on an empty graph)")
           + "\n-- A non-superuser needs AGE in $libdir/plugins: replace LOAD 'age' by LOAD '$libdir/plugins/age'.\n")
    yield "\\set ON_ERROR_STOP on\n\\set QUIET on\nSET client_encoding = 'UTF8';\nSET client_min_messages = warning;\n"
    yield "CREATE EXTENSION IF NOT EXISTS age;\nLOAD 'age';\n"
    yield f"SET search_path = {age.SEARCH_PATH};\nBEGIN;\n"
    yield f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK}) AS govdb_lock \\gset\n"
    yield from _setup_sql(graph)
    for label, props in NODE_PROPS.items():
        for part in _chunks(rows.nodes[label], chunk):
            items = cypher_literal([{p: v for p, v in zip(props, r) if v is not None} for r in part])
            create = f"CREATE (:{label} {{{', '.join(f'{p}: r.{p}' for p in props)}}})"
            if mode == "merge":
                query = (f"UNWIND {items} AS r OPTIONAL MATCH (n:{label}) WHERE n.{props[0]} = r.{props[0]}"
                         f" WITH r, n WHERE n IS NULL {create}")
            else:
                query = f"UNWIND {items} AS r {create}"
            # \gset stores the result in a psql variable: nothing printed per chunk.
            yield (f"SELECT count(*) AS govdb_rows FROM ag_catalog.cypher('{graph}', {dollar_quote(query)})"
                   " AS (v ag_catalog.agtype) \\gset\n")
    # Edges: each kind's Cypher lists go into a temporary table, then one
    # set-based INSERT resolves both ends by key (hash joins: linear).
    yield "SET LOCAL enable_nestloop = off;\n"
    for i, kind in enumerate(EDGE_KINDS):
        label, start, end = kind
        props = _edge_props(label)
        stage = f"pg_temp._govdb_edges_{i}"
        cols = ["s", "e", *(["p"] if props else [])]
        typed = ", ".join(f"{c} ag_catalog.agtype" for c in cols)
        yield f"CREATE TEMP TABLE _govdb_edges_{i} ({typed}) ON COMMIT DROP;\n"
        for part in _chunks(rows.edges[kind], chunk):
            items = cypher_literal([
                [r[0], r[1], *([{p: v for p, v in zip(props, r[2:]) if v is not None}] if props else [])]
                for r in part])
            ret = ", ".join(f"r[{n}]" for n in range(len(cols)))
            yield (f"INSERT INTO {stage} SELECT * FROM ag_catalog.cypher('{graph}',"
                   f" {dollar_quote(f'UNWIND {items} AS r RETURN {ret}')}) AS ({typed});\n")
        t = label_table(graph, label)
        sql = (f"INSERT INTO {t} (start_id, end_id{', properties' if props else ''})"
               f" SELECT a.id, b.id{', r.p' if props else ''} FROM {stage} AS r"
               f" JOIN ONLY {label_table(graph, start)} AS a ON {key_expr('a.properties', start)} = r.s"
               f" JOIN ONLY {label_table(graph, end)} AS b ON {key_expr('b.properties', end)} = r.e")
        if mode == "merge":
            sql += f" WHERE NOT EXISTS (SELECT 1 FROM ONLY {t} AS x WHERE x.start_id = a.id AND x.end_id = b.id)"
        yield sql + ";\n"
    yield "COMMIT;\n"
    labels = [*NODE_PROPS, *age.EDGE_LABELS]
    yield ("SELECT label, count AS \"in graph\" FROM (VALUES " + ", ".join(
        f"({i}, '{lb}', (SELECT count(*) FROM ONLY {label_table(graph, lb)}))" for i, lb in enumerate(labels))
        + ") AS c(i, label, count) ORDER BY i;\n")


def _setup_sql(graph: str) -> Iterator[str]:
    """Yield SQL creating the graph, labels and the backend's indexes where absent (age.setup_graph's)."""
    labels = ", ".join(f"('{lb}', 'v')" for lb in NODE_PROPS) + ", " + ", ".join(
        f"('{lb}', 'e')" for lb in age.EDGE_LABELS)
    yield ("DO $setup$\nDECLARE\n    l record;\nBEGIN\n"
           f"    IF NOT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = '{graph}') THEN\n"
           f"        PERFORM ag_catalog.create_graph('{graph}');\n    END IF;\n"
           f"    FOR l IN SELECT * FROM (VALUES {labels}) AS v(name, kind) WHERE NOT EXISTS (\n"
           "        SELECT 1 FROM ag_catalog.ag_label x JOIN ag_catalog.ag_graph g ON g.graphid = x.graph\n"
           f"        WHERE g.name = '{graph}' AND x.name = v.name) LOOP\n"
           "        IF l.kind = 'v' THEN\n"
           f"            PERFORM ag_catalog.create_vlabel('{graph}', l.name);\n"
           "        ELSE\n"
           f"            PERFORM ag_catalog.create_elabel('{graph}', l.name);\n"
           "        END IF;\n    END LOOP;\nEND\n$setup$;\n")
    for label, key in age.VERTEX_KEYS.items():
        t = label_table(graph, label)
        yield (f'CREATE UNIQUE INDEX IF NOT EXISTS "{label.lower()}_{key}_uq" ON {t}'
               f" (ag_catalog.agtype_access_operator(properties, '\"{key}\"'::ag_catalog.agtype));\n")
        yield f'CREATE INDEX IF NOT EXISTS "{label.lower()}_props_gin" ON {t} USING gin (properties);\n'
    for label in age.EDGE_LABELS:
        t = label_table(graph, label)
        yield f'CREATE INDEX IF NOT EXISTS "{label.lower()}_start_idx" ON {t} (start_id);\n'
        yield f'CREATE INDEX IF NOT EXISTS "{label.lower()}_end_idx" ON {t} (end_id);\n'


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def write_sql(rows: GraphRows, out_path: Path | str, graph: str = DEFAULT_GRAPH, mode: str = "merge", *,
              note: str = "") -> None:
    """Write :func:`render_sql`'s script to ``out_path`` (replaced only when complete)."""
    out_path = Path(out_path)
    parent = out_path.resolve().parent
    if not parent.is_dir():
        raise MigrationError(f"cannot write {out_path}: directory {parent} does not exist")
    if out_path.is_dir():
        raise MigrationError(f"cannot write {out_path}: it is a directory (name a file)")
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for part in render_sql(rows, graph, mode, note=note):
                f.write(part)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_sql(sqlite_path: Path | str, out_path: Path | str, graph: str = DEFAULT_GRAPH, mode: str = "merge",
               *, source_tz: tzinfo | str = timezone.utc) -> dict[str, int]:
    """Write a psql script that builds the graph of a legacy governance.db; return nodes/edges per label."""
    _check_graph(graph)
    if mode not in MODES:
        raise MigrationError(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    rows = read_legacy_graph(sqlite_path, source_tz=source_tz)
    stamp = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    # The file name as a Cypher literal: one line, whatever it holds.
    source = cypher_literal(Path(sqlite_path).name.encode("utf-8", "replace").decode("utf-8"))
    write_sql(rows, out_path, graph, mode, note=f"\n-- from {source}, written {stamp}")
    return rows.counts()
