"""Apache AGE helpers: agtype parsing, Cypher with parameters, the graph's shape.

Cypher text is always a constant written here; every value reaches AGE
through the agtype parameter map (``$1``), never through string formatting.
The graph name is checked against :data:`GRAPH_RE` (as config does) before
it is embedded.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from decimal import Decimal
from json.decoder import scanstring
from typing import Any, Iterable, Sequence

import asyncpg

from ..convert import format_timestamp
from ..records import DialecticMessage, DialecticSession, Discovery, DiscoveryLink, Identity

log = logging.getLogger(__name__)

GRAPH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{2,62}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

#: Vertex label -> the property that identifies a vertex (unique-indexed).
VERTEX_KEYS = {
    "Agent": "id", "Discovery": "id", "Tag": "name",
    "DialecticSession": "id", "DialecticMessage": "id",
}
EDGE_LABELS = ("SPAWNED", "HAS_TAG", "RELATED_TO", "RESPONSE_TO",
               "PAUSED_AGENT", "REVIEWER", "HAS_MESSAGE", "WROTE")
_LINK_LABELS = {"related_to": "RELATED_TO", "response_to": "RESPONSE_TO"}
#: The SQL that AGE generates names its operators unqualified, so ag_catalog
#: must be on the search path; last, so unqualified CREATEs still go to public.
SEARCH_PATH = '"$user", public, ag_catalog'


# -- agtype ---------------------------------------------------------------------

class _Parser:
    """Recursive-descent reader of agtype text (JSON plus ``::type`` suffixes)."""

    _NUMBER = re.compile(r"-?(?:Infinity|NaN|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)")
    _SUFFIX = re.compile(r"::([A-Za-z_]+)")
    _WS = re.compile(r"\s*")

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"agtype text is malformed at offset {self.i}: {what}")

    def ws(self) -> None:
        self.i = self._WS.match(self.s, self.i).end()

    def value(self) -> Any:
        self.ws()
        if self.i >= len(self.s):
            raise self.fail("unexpected end")
        ch = self.s[self.i]
        raw = None
        if ch == "{":
            val: Any = self.obj()
        elif ch == "[":
            val = self.arr()
        elif ch == '"':
            val, self.i = scanstring(self.s, self.i + 1)
        else:
            for word, lit in (("true", True), ("false", False), ("null", None)):
                if self.s.startswith(word, self.i):
                    self.i += len(word)
                    val = lit
                    break
            else:
                m = self._NUMBER.match(self.s, self.i)
                if not m:
                    raise self.fail(f"unexpected {ch!r}")
                raw, self.i = m.group(), m.end()
                val = float(raw) if any(c in raw for c in ".eEIN") else int(raw)
        m = self._SUFFIX.match(self.s, self.i)
        if m:  # outside strings only: scanstring consumed any '::' inside one
            self.i = m.end()
            if m.group(1) == "numeric" and raw is not None:
                val = Decimal(raw)
            elif m.group(1) == "float" and raw is not None:
                val = float(raw)
        return val

    def obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.i += 1
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            if not self.s.startswith('"', self.i):
                raise self.fail("expected a key")
            key, self.i = scanstring(self.s, self.i + 1)
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.fail("expected ':'")
            self.i += 1
            out[key] = self.value()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("}", self.i):
                self.i += 1
                return out
            else:
                raise self.fail("expected ',' or '}'")

    def arr(self) -> list[Any]:
        out: list[Any] = []
        self.i += 1
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("]", self.i):
                self.i += 1
                return out
            else:
                raise self.fail("expected ',' or ']'")


def parse_agtype(text: str | None) -> Any:
    """Return agtype text as plain Python values.

    Vertices and edges become dicts (id, label, properties, and start_id /
    end_id for edges), paths lists; ``::numeric`` values become Decimal.
    """
    if text is None:
        return None
    p = _Parser(text)
    val = p.value()
    p.ws()
    if p.i != len(p.s):
        raise p.fail("trailing text")
    return val


def encode_agtype(value: Any) -> str:
    """Return agtype input text for a JSON-like value (the parameter map)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


async def load_age(conn: asyncpg.Connection) -> None:
    """Load AGE into this session and teach asyncpg the agtype type."""
    try:
        await conn.execute("LOAD 'age'")
    except asyncpg.InsufficientPrivilegeError:
        # Non-superusers may only load libraries from $libdir/plugins.
        await conn.execute("LOAD '$libdir/plugins/age'")
    await conn.set_type_codec("agtype", schema="ag_catalog", encoder=encode_agtype,
                              decoder=parse_agtype, format="text")


# -- Cypher ---------------------------------------------------------------------

def cypher_sql(graph: str, query: str, columns: Sequence[str] = ("v",)) -> str:
    """Return the SQL that runs ``query`` on ``graph`` with ``$1`` as its parameter map."""
    if not GRAPH_RE.match(graph):
        raise ValueError(f"graph name {graph!r} is not 3-63 letters, digits or _")
    if "$$" in query:
        raise ValueError("Cypher text must not contain $$ (pass values as parameters)")
    if not columns or not all(_NAME_RE.match(c) for c in columns):
        raise ValueError(f"result column names must be identifiers, got {columns!r}")
    cols = ", ".join(f"{c} ag_catalog.agtype" for c in columns)
    return f"SELECT * FROM ag_catalog.cypher('{graph}', $$ {query} $$, $1) AS ({cols})"


async def cypher(conn: asyncpg.Connection, graph: str, query: str,
                 params: dict[str, Any] | None = None,
                 columns: Sequence[str] = ("v",)) -> list[tuple[Any, ...]]:
    """Run Cypher with parameters; return result rows as tuples of plain values."""
    rows = await conn.fetch(cypher_sql(graph, query, columns), params or {})
    return [tuple(r) for r in rows]


# -- the graph --------------------------------------------------------------------

async def age_available(conn: asyncpg.Connection) -> bool:
    """Tell whether the server can install AGE in this database."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'age')"))


async def setup_graph(conn: asyncpg.Connection, graph: str) -> None:
    """Create the extension, the graph, its labels and indexes, each only if absent.

    Run inside a transaction that holds the schema lock; AGE is loaded first.
    """
    if not GRAPH_RE.match(graph):
        raise ValueError(f"graph name {graph!r} is not 3-63 letters, digits or _")
    await conn.execute("CREATE EXTENSION IF NOT EXISTS age")
    await load_age(conn)
    # create_graph / create_vlabel fail when the object exists: guard each.
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = $1)", graph):
        await conn.execute("SELECT ag_catalog.create_graph($1)", graph)
    have = {r["name"] for r in await conn.fetch(
        "SELECT l.name::text AS name FROM ag_catalog.ag_label l JOIN ag_catalog.ag_graph g ON g.graphid = l.graph"
        " WHERE g.name = $1", graph)}
    for label in VERTEX_KEYS:
        if label not in have:
            await conn.execute("SELECT ag_catalog.create_vlabel($1, $2)", graph, label)
    for label in EDGE_LABELS:
        if label not in have:
            await conn.execute("SELECT ag_catalog.create_elabel($1, $2)", graph, label)
    # CREATE INDEX IF NOT EXISTS still locks the table: skip the ones present.
    present = {r["indexname"] for r in await conn.fetch(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1", graph)}
    wanted = []
    for label, key in VERTEX_KEYS.items():
        # Unique key for integrity; GIN on properties for MATCH (n:L {key: $v}).
        wanted.append((f"{label.lower()}_{key}_uq", f'CREATE UNIQUE INDEX "{{}}" ON "{graph}"."{label}"'
                       f" (ag_catalog.agtype_access_operator(properties, '\"{key}\"'::ag_catalog.agtype))"))
        wanted.append((f"{label.lower()}_props_gin", f'CREATE INDEX "{{}}" ON "{graph}"."{label}" USING gin (properties)'))
    for label in EDGE_LABELS:
        for end in ("start", "end"):
            wanted.append((f"{label.lower()}_{end}_idx", f'CREATE INDEX "{{}}" ON "{graph}"."{label}" ({end}_id)'))
    for name, ddl in wanted:
        if name not in present:
            await conn.execute(ddl.format(name))
    await _default_search_path(conn)


async def _default_search_path(conn: asyncpg.Connection) -> None:
    """Make ag_catalog part of this database's default search path.

    Then any session (psql, scripts, other clients) can run Cypher after
    ``LOAD 'age'`` without a SET. Left alone if the database already sets a
    search path that names ag_catalog; skipped with a warning if we may not.
    """
    current = await conn.fetchval(
        "SELECT cfg FROM pg_db_role_setting s, unnest(s.setconfig) AS cfg"
        " WHERE s.setrole = 0 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND cfg LIKE 'search\\_path=%'")
    if current is not None and "ag_catalog" in current:
        return
    path = SEARCH_PATH if current is None else current.split("=", 1)[1] + ", ag_catalog"
    dbname = await conn.fetchval("SELECT quote_ident(current_database())")
    try:
        async with conn.transaction():
            await conn.execute(f"ALTER DATABASE {dbname} SET search_path = {path}")
    except asyncpg.InsufficientPrivilegeError:
        log.warning("cannot set the default search_path of database %s (not its owner);"
                    " sessions must SET search_path to include ag_catalog for Cypher", dbname)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else format_timestamp(dt)


class Graph:
    """Writes that mirror relational rows into the graph, and traversal reads.

    Call within the transaction that writes the relational rows. Vertex
    properties stay small (ids, status, type, ISO timestamps); the relational
    tables remain the system of record.
    """

    def __init__(self, name: str):
        if not GRAPH_RE.match(name):
            raise ValueError(f"graph name {name!r} is not 3-63 letters, digits or _")
        self.name = name

    async def run(self, conn: asyncpg.Connection, query: str, params: dict[str, Any] | None = None,
                  columns: Sequence[str] = ("v",)) -> list[tuple[Any, ...]]:
        return await cypher(conn, self.name, query, params, columns)

    async def add_agent(self, conn: asyncpg.Connection, ident: Identity) -> None:
        await self.run(conn, "CREATE (:Agent {id: $id, status: $status, created_at: $created_at})",
                       {"id": ident.agent_id, "status": ident.status, "created_at": _iso(ident.created_at)})
        if ident.parent_agent_id is not None:
            await self.run(conn, "MATCH (p:Agent {id: $parent}), (c:Agent {id: $id}) CREATE (p)-[:SPAWNED]->(c)",
                           {"parent": ident.parent_agent_id, "id": ident.agent_id})
        await self.add_tags(conn, "Agent", ident.agent_id, ident.tags)

    async def add_tags(self, conn: asyncpg.Connection, label: str, node_id: str, tags: Iterable[str]) -> None:
        tags = sorted(set(tags))
        if not tags:
            return
        if label not in ("Agent", "Discovery"):
            raise ValueError(f"label {label!r} carries no tags")
        await lock_tags(conn, tags)
        await self.run(conn, "UNWIND $tags AS tag MERGE (:Tag {name: tag})", {"tags": tags})
        await self.run(conn, f"UNWIND $tags AS tag MATCH (n:{label} {{id: $id}}), (t:Tag {{name: tag}}) "
                             "CREATE (n)-[:HAS_TAG]->(t)", {"tags": tags, "id": node_id})

    async def set_agent_status(self, conn: asyncpg.Connection, agent_id: str, status: str) -> None:
        await self.run(conn, "MATCH (a:Agent {id: $id}) SET a.status = $status", {"id": agent_id, "status": status})

    async def set_agent_tags(self, conn: asyncpg.Connection, agent_id: str, tags: Iterable[str]) -> None:
        """Make the agent's HAS_TAG edges ``tags``; a Tag node no longer used by any node goes too
        (the graph holds the tags in use, as a build from the tables does)."""
        tags = sorted(set(tags))
        old = await node_tags(conn, self.name, "Agent", agent_id)
        await lock_tags(conn, [*old, *tags])
        await self.run(conn, "MATCH (:Agent {id: $id})-[e:HAS_TAG]->(:Tag) DELETE e", {"id": agent_id})
        await self.add_tags(conn, "Agent", agent_id, tags)
        await drop_unused_tags(conn, self.name, set(old) - set(tags))

    async def add_discovery(self, conn: asyncpg.Connection, disc: Discovery) -> None:
        await self.run(conn, "CREATE (:Discovery {id: $id, type: $type, status: $status, created_at: $created_at})",
                       {"id": disc.id, "type": disc.type, "status": disc.status,
                        "created_at": _iso(disc.created_at)})
        await self.add_tags(conn, "Discovery", disc.id, disc.tags)

    async def set_discovery_status(self, conn: asyncpg.Connection, discovery_id: str, status: str) -> None:
        await self.run(conn, "MATCH (d:Discovery {id: $id}) SET d.status = $status",
                       {"id": discovery_id, "status": status})

    async def add_link(self, conn: asyncpg.Connection, link: DiscoveryLink) -> None:
        label = _LINK_LABELS[link.edge_type]
        await self.run(conn, f"MATCH (s:Discovery {{id: $src}}), (d:Discovery {{id: $dst}}) "
                             f"CREATE (s)-[:{label} {{response_type: $response_type, weight: $weight, "
                             "created_at: $created_at}]->(d)",
                       {"src": link.src_id, "dst": link.dst_id, "response_type": link.response_type,
                        "weight": link.weight, "created_at": _iso(link.created_at)})

    async def add_dialectic_session(self, conn: asyncpg.Connection, sess: DialecticSession) -> None:
        await self.run(conn, "MATCH (p:Agent {id: $paused}) "
                             "CREATE (s:DialecticSession {id: $id, status: $status, phase: $phase, "
                             "created_at: $created_at})-[:PAUSED_AGENT]->(p)",
                       {"id": sess.session_id, "paused": sess.paused_agent_id, "status": sess.status,
                        "phase": sess.phase, "created_at": _iso(sess.created_at)})
        if sess.reviewer_agent_id is not None:
            await self.set_reviewer(conn, sess.session_id, sess.reviewer_agent_id)

    async def set_reviewer(self, conn: asyncpg.Connection, session_id: str, reviewer_id: str) -> None:
        await self.run(conn, "MATCH (:DialecticSession {id: $id})-[e:REVIEWER]->(:Agent) DELETE e", {"id": session_id})
        await self.run(conn, "MATCH (s:DialecticSession {id: $id}), (r:Agent {id: $reviewer}) "
                             "CREATE (s)-[:REVIEWER]->(r)", {"id": session_id, "reviewer": reviewer_id})

    async def set_dialectic_state(self, conn: asyncpg.Connection, session_id: str, status: str, phase: str) -> None:
        await self.run(conn, "MATCH (s:DialecticSession {id: $id}) SET s.status = $status, s.phase = $phase",
                       {"id": session_id, "status": status, "phase": phase})

    async def add_dialectic_message(self, conn: asyncpg.Connection, msg: DialecticMessage) -> None:
        await self.run(conn, "MATCH (s:DialecticSession {id: $session}), (a:Agent {id: $agent}) "
                             "CREATE (m:DialecticMessage {id: $id, type: $type, created_at: $created_at}) "
                             "CREATE (s)-[:HAS_MESSAGE]->(m) CREATE (a)-[:WROTE]->(m)",
                       {"session": msg.session_id, "agent": msg.agent_id, "id": msg.id,
                        "type": msg.message_type, "created_at": _iso(msg.timestamp)})

    async def lineage_ids(self, conn: asyncpg.Connection, agent_id: str, max_depth: int) -> list[str]:
        """Return the agent's ancestors' ids, nearest first, at most ``max_depth`` of them, stopping at a cycle."""
        if max_depth < 1:
            return []
        hops = int(max_depth)  # a validated int: the one non-parameter in Cypher text
        rows = await self.run(conn, f"MATCH p = (:Agent {{id: $id}})<-[:SPAWNED*1..{hops}]-(x:Agent) "
                                    "RETURN x.id, length(p)", {"id": agent_id}, columns=("id", "depth"))
        seen, out = {agent_id}, []
        for anc, _ in sorted(rows, key=lambda r: r[1]):
            if anc in seen:
                break
            seen.add(anc)
            out.append(anc)
        return out

    async def out_of_step(self, conn: asyncpg.Connection) -> list[str]:
        """Return the labels whose counts differ from the relational rows they mirror.

        A cheap check at start-up: rows written while the graph was off, or
        bulk-loaded, leave the graph behind; `govdb migrate graph` catches it up.
        """
        g = f'"{self.name}"'
        checks = {
            "Agent": "SELECT count(*) FROM core.identities",
            "Discovery": "SELECT count(*) FROM core.discoveries",
            "DialecticSession": "SELECT count(*) FROM core.dialectic_sessions",
            "DialecticMessage": "SELECT count(*) FROM core.dialectic_messages",
            "SPAWNED": "SELECT count(*) FROM core.identities WHERE parent_agent_id IS NOT NULL",
            "RELATED_TO": "SELECT count(*) FROM core.discovery_edges WHERE edge_type = 'related_to'",
            "RESPONSE_TO": "SELECT count(*) FROM core.discovery_edges WHERE edge_type = 'response_to'",
            "HAS_TAG": "SELECT (SELECT count(*) FROM (SELECT DISTINCT agent_id, unnest(tags) FROM core.identities) AS t)"
                       " + (SELECT count(*) FROM core.discovery_tags)",
        }
        stale = []
        for label, sql in checks.items():
            if await conn.fetchval(sql) != await conn.fetchval(f'SELECT count(*) FROM ONLY {g}."{label}"'):
                stale.append(label)
        return stale


async def lock_tags(conn: asyncpg.Connection, tags: Sequence[str]) -> None:
    """Take the transaction's lock on each Tag node name, in one order (no deadlock): whoever
    adds or removes a Tag node or its edges holds it."""
    if tags:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('govdb:tag:' || t, 0))"
            " FROM (SELECT DISTINCT t FROM unnest($1::text[]) AS t ORDER BY t) AS s", list(tags))


async def node_tags(conn: asyncpg.Connection, graph: str, label: str, node_id: str) -> list[str]:
    """Return the names of the Tag nodes the ``label`` node ``node_id`` has HAS_TAG edges to."""
    if label not in ("Agent", "Discovery"):
        raise ValueError(f"label {label!r} carries no tags")
    rows = await cypher(conn, graph, f"MATCH (:{label} {{id: $id}})-[:HAS_TAG]->(t:Tag) RETURN t.name", {"id": node_id})
    return sorted(r[0] for r in rows)


async def drop_unused_tags(conn: asyncpg.Connection, graph: str, names: Iterable[str]) -> None:
    """Delete the Tag nodes among ``names`` that no HAS_TAG edge reaches any more (hold their
    :func:`lock_tags` locks)."""
    names = sorted(set(names))
    if names:
        await cypher(conn, graph, "UNWIND $tags AS tag MATCH (t:Tag {name: tag}) OPTIONAL MATCH (t)<-[e:HAS_TAG]-()"
                                  " WITH t, count(e) AS uses WHERE uses = 0 DELETE t", {"tags": names})
