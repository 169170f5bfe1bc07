"""PostgreSQL backend (asyncpg), with an optional Apache AGE graph.

The relational tables in schemas ``core`` and ``audit`` are the system of
record. When AGE is on, agents, discoveries, tags and dialectic sessions are
mirrored as a graph in the same transaction as their rows, and lineage is
read with Cypher; without AGE the same answers come from recursive SQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Sequence

import asyncpg

from ..config import SecretUrl, Settings
from ..convert import dump_json, format_timestamp
from ..errors import (
    ConflictError, GovdbError, NotFoundError, SchemaError, StoreUnavailableError, ValidationError,
)
from ..records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery,
    DiscoveryLink, Health, Identity, Neighbor, Session, ToolStats, ToolUsage,
)
from . import age
from . import pgrows as pgr
from .base import Database, indexed_word

log = logging.getLogger(__name__)

#: The schema version schema.sql creates (its INSERT INTO core.schema_version).
SCHEMA_VERSION = 1
#: pg_advisory_xact_lock key serialising schema set-up between processes.
SCHEMA_LOCK = 0x676F7664625F7363  # "govdb_sc"
_CLOSING_PHASE = {"resolved": "resolved", "escalated": "escalated", "failed": "failed", "cancelled": "failed"}
_CLOSE_TIMEOUT = 10.0

# SQLSTATE classes meaning "try again later": connection (08), resources
# (53), operator intervention incl. statement timeout (57), lock not
# available (55P03), serialization failure / deadlock (40).
_UNAVAILABLE_CLASSES = ("08", "53", "57", "40")
_SCHEMA_STATES = {"42P01", "42703", "3F000", "42883", "42704"}
_FK_KINDS = {
    "identities_parent_fk": "agent", "sessions_agent_fk": "agent", "agent_state_agent_fk": "agent",
    "discoveries_agent_fk": "agent", "discovery_tags_discovery_fk": "discovery",
    "discovery_edges_src_fk": "discovery", "discovery_edges_dst_fk": "discovery",
    "dialectic_sessions_paused_fk": "agent", "dialectic_sessions_reviewer_fk": "agent",
    "dialectic_sessions_discovery_fk": "discovery", "dialectic_messages_session_fk": "dialectic session",
    "dialectic_messages_agent_fk": "agent",
}
_EXISTS = {
    "agent": "SELECT EXISTS (SELECT 1 FROM core.identities WHERE agent_id = $1)",
    "session": "SELECT EXISTS (SELECT 1 FROM core.sessions WHERE session_id = $1)",
    "discovery": "SELECT EXISTS (SELECT 1 FROM core.discoveries WHERE id = $1)",
    "dialectic session": "SELECT EXISTS (SELECT 1 FROM core.dialectic_sessions WHERE session_id = $1)",
}

class PostgresDatabase(Database):
    """The governance store in PostgreSQL, with AGE when the server has it."""

    name = "postgres"
    supports_copy = True

    def __init__(self, url: SecretUrl, *, min_conn: int = 2, max_conn: int = 10,
                 graph: str = "governance", statement_cache_size: int = 100,
                 age_enabled: bool = True):
        if not isinstance(url, SecretUrl):
            raise TypeError("url must be a SecretUrl (it keeps the password out of logs)")
        if not age.GRAPH_RE.match(graph):
            raise ValueError(f"graph name {graph!r} is not 3-63 letters, digits or _")
        self._url = url
        self._min_conn, self._max_conn = min_conn, max_conn
        self._statement_cache = statement_cache_size
        self._age_enabled = age_enabled
        self._graph = age.Graph(graph)
        self._pool: asyncpg.Pool | None = None
        self._graph_stale: list[str] = []
        self._lock = asyncio.Lock()
        self.supports_graph = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "PostgresDatabase":
        return cls(settings.postgres_url, min_conn=settings.postgres_min_conn,
                   max_conn=settings.postgres_max_conn, graph=settings.age_graph,
                   statement_cache_size=settings.postgres_statement_cache,
                   age_enabled=settings.age_enabled)

    def __repr__(self) -> str:
        return f"PostgresDatabase({self._url.masked!r}, graph={'on' if self.supports_graph else 'off'})"

    # -- lifecycle -------------------------------------------------------

    async def connect(self) -> None:
        """Apply the schema if needed, set up AGE, and open the pool. Idempotent."""
        if self._pool is not None:
            return
        async with self._lock:
            if self._pool is not None:
                return
            try:
                conn = await asyncpg.connect(self._url.reveal(), statement_cache_size=self._statement_cache,
                                             server_settings={"application_name": "govdb"})
            except Exception as exc:  # noqa: BLE001 - every failure here means "cannot reach it"
                raise self._map_error(exc, connecting=True) from exc
            try:
                await pgr.set_json_codecs(conn)
                graph_on = await self._prepare_database(conn)
            except GovdbError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._map_error(exc) from exc
            finally:
                await conn.close()
            server_settings = {"application_name": "govdb", "TimeZone": "UTC"}
            if graph_on:
                # asyncpg's pool runs RESET ALL on release, which would undo a
                # SET; a startup setting is the session default RESET returns to.
                server_settings["search_path"] = age.SEARCH_PATH
            try:
                self._pool = await asyncpg.create_pool(
                    self._url.reveal(), min_size=self._min_conn, max_size=self._max_conn,
                    statement_cache_size=self._statement_cache, server_settings=server_settings,
                    init=self._init_age_connection if graph_on else pgr.set_json_codecs,
                    reset=_reset_connection)
            except Exception as exc:  # noqa: BLE001
                raise self._map_error(exc, connecting=True) from exc
            self.supports_graph = graph_on

    async def close(self) -> None:
        """Close every pooled connection. Safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, asyncpg.InterfaceError, OSError):
            pool.terminate()

    async def _init_age_connection(self, conn: asyncpg.Connection) -> None:
        # Runs for every new pooled connection: LOAD lasts for the session
        # (RESET ALL does not undo it), so each connection is ready for Cypher.
        await pgr.set_json_codecs(conn)
        await age.load_age(conn)

    async def _prepare_database(self, conn: asyncpg.Connection) -> bool:
        """Create or check the schema, partitions and graph; return whether the graph is on."""
        async with conn.transaction():
            # Two processes starting at once: the second waits, then finds it done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            stored = await _stored_version(conn)
            if stored is not None and stored > SCHEMA_VERSION:
                raise SchemaError(f"the database schema is version {stored}, newer than this govdb"
                                  f" (version {SCHEMA_VERSION}); upgrade govdb")
            functions_present = await conn.fetchval(
                "SELECT to_regprocedure('audit.partition_maintenance(integer, interval, interval)') IS NOT NULL"
                " AND to_regprocedure('audit.expired_partitions(regclass, interval)') IS NOT NULL")
            if stored != SCHEMA_VERSION or not functions_present:
                for script in ("schema.sql", "partitions.sql"):
                    await conn.execute(resources.files("govdb").joinpath("sql", script).read_text("utf-8"))
                stored = await _stored_version(conn)
                if stored != SCHEMA_VERSION:
                    raise SchemaError(f"schema.sql recorded version {stored}, expected {SCHEMA_VERSION}")
            await conn.execute("SELECT audit.ensure_partitions('audit.events'::regclass, 3),"
                               " audit.ensure_partitions('audit.tool_usage'::regclass, 3),"
                               " core.sync_identity_sequences()")
            if not self._age_enabled:
                return False
            if not await age.age_available(conn):
                log.warning("AGE is not installed on the PostgreSQL server at %s; graph is off", self._url.masked)
                return False
            try:
                async with conn.transaction():  # a savepoint: a refusal leaves the schema work intact
                    await age.setup_graph(conn, self._graph.name)
            except asyncpg.InsufficientPrivilegeError as exc:
                log.warning("cannot set up AGE at %s (%s); graph is off", self._url.masked, exc)
                return False
            # Rows written while AGE was off (or bulk-loaded) leave the graph
            # behind. Rebuilding locks the knowledge tables, so it is the
            # operator's call (`govdb migrate graph`), not a side effect of start-up.
            self._graph_stale = await self._graph.out_of_step(conn)
            if self._graph_stale:
                log.warning("AGE graph %s is out of step with the tables (%s); run `govdb migrate graph`",
                            self._graph.name, ", ".join(self._graph_stale))
            return True

    async def health(self) -> Health:
        """Return whether the store answers, its schema version and graph state."""
        graph = "on" if self.supports_graph else "off"
        if self._pool is None:
            return Health(self.name, False, graph, None, {"error": "not connected", "url": self._url.masked})
        try:
            async with self.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT (SELECT max(version) FROM core.schema_version) AS version,"
                    " current_setting('server_version') AS server,"
                    " (SELECT extversion FROM pg_extension WHERE extname = 'age') AS age")
        except GovdbError as exc:
            return Health(self.name, False, graph, None, {"error": str(exc), "url": self._url.masked})
        return Health(self.name, True, graph, row["version"], {
            "url": self._url.masked, "server_version": row["server"], "age_version": row["age"],
            "graph_name": self._graph.name if self.supports_graph else None,
            "graph_out_of_step": ", ".join(self._graph_stale) or "no",
            "pool_size": self._pool.get_size(), "pool_idle": self._pool.get_idle_size(),
        })

    @asynccontextmanager
    async def acquire(self, *, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """Yield a pooled connection (in a transaction if asked), mapping driver errors."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the PostgreSQL store is not connected; call connect() first")
        try:
            async with pool.acquire() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except GovdbError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: BaseException, *, connecting: bool = False) -> GovdbError:
        """Return the govdb error for a driver error (by class and SQLSTATE, never message text)."""
        state = getattr(exc, "sqlstate", None) or ""
        if isinstance(exc, asyncpg.UniqueViolationError):
            return ConflictError(f"the write clashes with a stored row (unique key {exc.constraint_name})")
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            return NotFoundError(_FK_KINDS.get(exc.constraint_name or "", "record"), None)
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return StoreUnavailableError(f"PostgreSQL at {self._url.masked} has no such database;"
                                         " create it or fix DB_POSTGRES_URL")
        if state in _SCHEMA_STATES:
            return SchemaError(f"the PostgreSQL schema is missing or not govdb's ({type(exc).__name__});"
                               " run `govdb init` or check DB_POSTGRES_URL")
        if (connecting or isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError))
                or state[:2] in _UNAVAILABLE_CLASSES or state == "55P03"):
            return StoreUnavailableError(
                f"PostgreSQL at {self._url.masked} is unavailable ({type(exc).__name__}: {_first_line(exc)});"
                " retry later or check the server")
        return StoreUnavailableError(
            f"PostgreSQL refused the statement ({type(exc).__name__}, SQLSTATE {state or 'none'})")

    async def copy_records(self, table: str, columns: Sequence[str],
                           records: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]]) -> int:
        """Bulk-load rows with COPY into ``schema.table``; return how many were loaded."""
        schema, _, name = table.rpartition(".")
        async with self.acquire() as conn:
            status = await conn.copy_records_to_table(name, schema_name=schema or "public",
                                                      columns=list(columns), records=records)
        return int(status.split()[-1])

    async def _exists(self, conn: asyncpg.Connection, kind: str, key: str) -> bool:
        return bool(await conn.fetchval(_EXISTS[kind], key))

    async def _require(self, conn: asyncpg.Connection, kind: str, key: str) -> None:
        if not await self._exists(conn, kind, key):
            raise NotFoundError(kind, key)

    # -- identities ------------------------------------------------------

    async def _create_identity(self, ident: Identity, api_key_hash: str) -> Identity:
        async with self.acquire(transaction=True) as conn:
            if ident.parent_agent_id is not None:
                await self._require(conn, "agent", ident.parent_agent_id)
            row = await conn.fetchrow(
                "INSERT INTO core.identities (agent_id, api_key_hash, status, created_at, updated_at,"
                " parent_agent_id, spawn_reason, tags, notes, metadata)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (agent_id) DO NOTHING"
                f" RETURNING {pgr.IDENTITY_COLS}",
                ident.agent_id, api_key_hash, ident.status, ident.created_at, ident.updated_at,
                ident.parent_agent_id, ident.spawn_reason, list(ident.tags), ident.notes, ident.metadata)
            if row is None:
                raise ConflictError(f"agent {ident.agent_id!r} already exists")
            if self.supports_graph:
                await self._graph.add_agent(conn, ident)
            return pgr.identity(row)

    async def _get_identity(self, agent_id: str) -> Identity | None:
        async with self.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {pgr.IDENTITY_COLS} FROM core.identities WHERE agent_id = $1", agent_id)
        return None if row is None else pgr.identity(row)

    async def _list_identities(self, status: str | None, tag: str | None, limit: int, offset: int) -> list[Identity]:
        where, args = _filters(("status = {}", status), ("tags @> ARRAY[{}::text]", tag))
        sql = (f"SELECT {pgr.IDENTITY_COLS} FROM core.identities WHERE {where}"
               f" ORDER BY created_at, agent_id LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}")
        async with self.acquire() as conn:
            return [pgr.identity(r) for r in await conn.fetch(sql, *args, limit, offset)]

    async def _update_identity_status(self, agent_id: str, status: str, reason: str | None,
                                      now: datetime) -> Identity:
        async with self.acquire(transaction=True) as conn:
            # In SET, i.status is still the old value.
            row = await conn.fetchrow(
                "UPDATE core.identities AS i SET status = $2::text, updated_at = $3::timestamptz,"
                " disabled_at = CASE WHEN $2::text = 'disabled' THEN $3::timestamptz END,"
                " lifecycle_events = CASE jsonb_typeof(i.lifecycle_events) WHEN 'array' THEN i.lifecycle_events"
                "   ELSE '[]'::jsonb END || jsonb_build_array(jsonb_build_object("
                "   'at', $4::text, 'status', $2::text, 'from', i.status, 'reason', $5::text))"
                f" WHERE agent_id = $1 RETURNING {pgr.IDENTITY_COLS}",
                agent_id, status, now, format_timestamp(now), reason)
            if row is None:
                raise NotFoundError("agent", agent_id)
            if self.supports_graph:
                await self._graph.set_agent_status(conn, agent_id, status)
            return pgr.identity(row)

    async def _update_identity(self, agent_id: str, tags: tuple[str, ...] | None, notes: str | None,
                               metadata: dict[str, Any] | None, now: datetime) -> Identity:
        async with self.acquire(transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE core.identities SET tags = coalesce($2, tags), notes = coalesce($3, notes),"
                f" metadata = coalesce($4, metadata), updated_at = $5 WHERE agent_id = $1 RETURNING {pgr.IDENTITY_COLS}",
                agent_id, None if tags is None else list(tags), notes, metadata, now)
            if row is None:
                raise NotFoundError("agent", agent_id)
            if self.supports_graph and tags is not None:
                await self._graph.set_agent_tags(conn, agent_id, tags)
            return pgr.identity(row)

    async def _get_api_key_hash(self, agent_id: str) -> str | None:
        async with self.acquire() as conn:
            return await conn.fetchval("SELECT api_key_hash FROM core.identities WHERE agent_id = $1", agent_id)

    async def _get_lineage(self, agent_id: str, max_depth: int) -> list[Identity]:
        async with self.acquire() as conn:
            if self.supports_graph:
                await self._require(conn, "agent", agent_id)
                ids = [agent_id, *await self._graph.lineage_ids(conn, agent_id, max_depth)]
                rows = await conn.fetch(f"SELECT {pgr.IDENTITY_COLS} FROM core.identities WHERE agent_id = ANY($1)", ids)
                found = {r["agent_id"]: r for r in rows}
                out = []
                for i in ids:  # the relational rows are the record: stop where one is missing
                    if i not in found:
                        break
                    out.append(pgr.identity(found[i]))
                return out
            rows = await conn.fetch(
                "WITH RECURSIVE chain (agent_id, parent, depth, path) AS ("
                "  SELECT agent_id, parent_agent_id, 1, ARRAY[agent_id] FROM core.identities WHERE agent_id = $1"
                "  UNION ALL"
                "  SELECT i.agent_id, i.parent_agent_id, c.depth + 1, c.path || i.agent_id"
                "    FROM chain c JOIN core.identities i ON i.agent_id = c.parent"
                "   WHERE c.depth <= $2 AND NOT i.agent_id = ANY (c.path))"
                f" SELECT {pgr.IDENTITY_COLS} FROM chain c JOIN core.identities USING (agent_id) ORDER BY c.depth",
                agent_id, max_depth)
        if not rows:
            raise NotFoundError("agent", agent_id)
        return [pgr.identity(r) for r in rows]

    async def _list_children(self, agent_id: str) -> list[Identity]:
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.IDENTITY_COLS} FROM core.identities WHERE parent_agent_id = $1"
                                    " ORDER BY created_at, agent_id", agent_id)
            if not rows:
                await self._require(conn, "agent", agent_id)
        return [pgr.identity(r) for r in rows]

    # -- sessions --------------------------------------------------------

    async def _create_session(self, sess: Session) -> Session:
        async with self.acquire(transaction=True) as conn:
            await self._require(conn, "agent", sess.agent_id)
            row = await conn.fetchrow(
                "INSERT INTO core.sessions (session_id, agent_id, created_at, last_active, expires_at, is_active,"
                " client_type, client_info, metadata) VALUES ($1, $2, $3, $4, $5, true, $6, $7, $8)"
                f" ON CONFLICT (session_id) DO NOTHING RETURNING {pgr.SESSION_COLS}",
                sess.session_id, sess.agent_id, sess.created_at, sess.last_active, sess.expires_at,
                sess.client_type, sess.client_info, sess.metadata)
        if row is None:
            raise ConflictError(f"session {sess.session_id!r} already exists")
        return pgr.session(row)

    async def _get_session(self, session_id: str) -> Session | None:
        async with self.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {pgr.SESSION_COLS} FROM core.sessions WHERE session_id = $1", session_id)
        return None if row is None else pgr.session(row)

    async def _touch_session(self, session_id: str, now: datetime, expires_at: datetime | None) -> Session:
        async with self.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE core.sessions SET last_active = $2, expires_at = coalesce($3, expires_at)"
                f" WHERE session_id = $1 RETURNING {pgr.SESSION_COLS}", session_id, now, expires_at)
        if row is None:
            raise NotFoundError("session", session_id)
        return pgr.session(row)

    async def _end_session(self, session_id: str, now: datetime) -> Session:
        async with self.acquire() as conn:
            row = await conn.fetchrow(
                f"UPDATE core.sessions SET is_active = false WHERE session_id = $1 RETURNING {pgr.SESSION_COLS}",
                session_id)
        if row is None:
            raise NotFoundError("session", session_id)
        return pgr.session(row)

    async def _get_active_sessions(self, agent_id: str, now: datetime) -> list[Session]:
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {pgr.SESSION_COLS} FROM core.sessions WHERE agent_id = $1 AND is_active AND expires_at > $2"
                " ORDER BY last_active DESC, session_id DESC", agent_id, now)
        return [pgr.session(r) for r in rows]

    async def _expire_sessions(self, now: datetime) -> int:
        async with self.acquire() as conn:
            status = await conn.execute(
                "UPDATE core.sessions SET is_active = false WHERE is_active AND expires_at <= $1", now)
        return int(status.split()[-1])

    # -- agent state -----------------------------------------------------

    async def _record_agent_state(self, snap: AgentState) -> AgentState:
        # A positive id (dual-write copying SQLite's row id) is kept.
        cols = "agent_id, recorded_at, energy, integrity, entropy, void, coherence, regime, snapshot"
        args = [snap.agent_id, snap.recorded_at, snap.energy, snap.integrity, snap.entropy, snap.void,
                snap.coherence, snap.regime, snap.state]
        if snap.id > 0:
            cols, args = "id, " + cols, [snap.id, *args]
        marks = ", ".join(f"${i}" for i in range(1, len(args) + 1))
        async with self.acquire() as conn:
            try:
                new_id = await conn.fetchval(
                    f"INSERT INTO core.agent_state ({cols}) VALUES ({marks}) RETURNING id", *args)
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFoundError("agent", snap.agent_id) from exc
        return dataclasses.replace(snap, id=new_id)

    async def _get_latest_agent_state(self, agent_id: str) -> AgentState | None:
        rows = await self._get_agent_state_history(agent_id, 1, None)
        return rows[0] if rows else None

    async def _get_agent_state_history(self, agent_id: str, limit: int, since: datetime | None) -> list[AgentState]:
        where, args = _filters(("agent_id = {}", agent_id), ("recorded_at >= {}", since))
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.STATE_COLS} FROM core.agent_state WHERE {where}"
                                    f" ORDER BY recorded_at DESC, id DESC LIMIT ${len(args) + 1}", *args, limit)
        return [pgr.agent_state(r) for r in rows]

    # -- calibration -----------------------------------------------------

    async def _get_calibration(self) -> Calibration | None:
        async with self.acquire() as conn:
            row = await conn.fetchrow("SELECT state, version, updated_at FROM core.calibration WHERE id = 1")
        return None if row is None else pgr.calibration(row)

    async def _update_calibration(self, state: dict[str, Any], expected_version: int | None,
                                  now: datetime) -> Calibration:
        async with self.acquire(transaction=True) as conn:
            # The row lock (or, for the first write, the primary key) makes
            # check-and-write atomic between concurrent writers.
            current = await conn.fetchval("SELECT version FROM core.calibration WHERE id = 1 FOR UPDATE") or 0
            if expected_version is not None and expected_version != current:
                raise ConflictError(f"calibration is at version {current}, not {expected_version};"
                                    " read it again and retry")
            row = await conn.fetchrow(
                "INSERT INTO core.calibration (id, state, version, updated_at) VALUES (1, $1, $2, $3)"
                " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version,"
                "   updated_at = EXCLUDED.updated_at WHERE core.calibration.version = $4"
                " RETURNING state, version, updated_at", state, current + 1, now, current)
            if row is None:
                raise ConflictError("calibration changed while being written; read it again and retry")
        return pgr.calibration(row)

    # -- audit events ----------------------------------------------------

    async def _append_audit_event(self, ev: AuditEvent) -> tuple[AuditEvent, bool]:
        async with self.acquire(transaction=True) as conn:
            for _ in range(2):
                try:
                    fresh = await conn.fetchval(
                        "INSERT INTO audit.event_hashes (raw_hash, event_id, ts) VALUES ($1, $2, $3)"
                        " ON CONFLICT (raw_hash) DO NOTHING RETURNING true", ev.raw_hash, ev.event_id, ev.timestamp)
                except asyncpg.UniqueViolationError as exc:
                    raise ConflictError(f"audit event {ev.event_id} already exists with other content") from exc
                if fresh:
                    await conn.execute(
                        f"INSERT INTO audit.events ({pgr.EVENT_COLS}, words) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        ev.event_id, ev.timestamp, ev.event_type, ev.agent_id, ev.session_id, ev.confidence,
                        ev.details, ev.raw_hash, pgr.audit_words(ev.event_type, dump_json(ev.details)))
                    return ev, True
                row = await conn.fetchrow(
                    f"SELECT {', '.join('e.' + c for c in pgr.EVENT_COLS.split(', '))} FROM audit.event_hashes h"
                    " JOIN audit.events e ON e.event_id = h.event_id AND e.ts = h.ts WHERE h.raw_hash = $1",
                    ev.raw_hash)
                if row is not None:
                    return pgr.audit_event(row), False
                # The hash outlived its event (retention dropped it): forget it, store anew.
                await conn.execute("DELETE FROM audit.event_hashes WHERE raw_hash = $1", ev.raw_hash)
        raise ConflictError(f"audit event {ev.event_id} could not be stored; retry")  # pragma: no cover

    async def _query_audit_events(self, agent_id: str | None, event_type: str | None, since: datetime | None,
                                  until: datetime | None, limit: int) -> list[AuditEvent]:
        where, args = _filters(("agent_id = {}", agent_id), ("event_type = {}", event_type),
                               ("ts >= {}", since), ("ts < {}", until))
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.EVENT_COLS} FROM audit.events WHERE {where}"
                                    f" ORDER BY ts DESC, event_id DESC LIMIT ${len(args) + 1}", *args, limit)
        return [pgr.audit_event(r) for r in rows]

    async def _search_audit_events(self, words: tuple[str, ...], limit: int) -> list[AuditEvent]:
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.EVENT_COLS} FROM audit.events WHERE words @> $1::text[]"
                                    " ORDER BY ts DESC, event_id DESC LIMIT $2", _query_words(words), limit)
        return [pgr.audit_event(r) for r in rows]

    # -- tool usage ------------------------------------------------------

    async def _record_tool_usage(self, use: ToolUsage) -> ToolUsage:
        async with self.acquire() as conn:
            # The key includes ts (partitioning); NOT EXISTS makes usage_id
            # unique across months too.
            inserted = await conn.fetchval(
                f"INSERT INTO audit.tool_usage ({pgr.USAGE_COLS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9"
                " WHERE NOT EXISTS (SELECT 1 FROM audit.tool_usage WHERE usage_id = $1)"
                " ON CONFLICT DO NOTHING RETURNING true",
                use.usage_id, use.timestamp, use.tool_name, use.agent_id, use.session_id, use.latency_ms,
                use.success, use.error_type, use.payload)
        if not inserted:
            raise ConflictError(f"tool usage {use.usage_id} already exists")
        return use

    async def _query_tool_usage(self, agent_id: str | None, tool_name: str | None, since: datetime | None,
                                until: datetime | None, limit: int) -> list[ToolUsage]:
        where, args = _filters(("agent_id = {}", agent_id), ("tool_name = {}", tool_name),
                               ("ts >= {}", since), ("ts < {}", until))
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.USAGE_COLS} FROM audit.tool_usage WHERE {where}"
                                    f" ORDER BY ts DESC, usage_id DESC LIMIT ${len(args) + 1}", *args, limit)
        return [pgr.tool_usage(r) for r in rows]

    async def _get_tool_stats(self, agent_id: str | None, since: datetime | None) -> list[ToolStats]:
        where, args = _filters(("agent_id = {}", agent_id), ("ts >= {}", since))
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tool_name, count(*) AS calls, count(*) FILTER (WHERE success) AS successes,"
                " sum(latency_ms)::float8 / nullif(count(latency_ms), 0) AS avg_ms, max(latency_ms) AS max_ms"
                f" FROM audit.tool_usage WHERE {where} GROUP BY tool_name ORDER BY calls DESC, tool_name", *args)
        return [ToolStats(tool_name=r["tool_name"], calls=r["calls"], successes=r["successes"],
                          failures=r["calls"] - r["successes"], avg_latency_ms=r["avg_ms"],
                          max_latency_ms=r["max_ms"]) for r in rows]

    # -- knowledge graph -------------------------------------------------

    async def _add_discovery(self, disc: Discovery) -> Discovery:
        async with self.acquire(transaction=True) as conn:
            await self._require(conn, "agent", disc.agent_id)
            created = await conn.fetchval(
                "INSERT INTO core.discoveries (id, agent_id, type, severity, status, created_at, updated_at,"
                " resolved_at, summary, details, related_files, confidence, words)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING"
                " RETURNING true",
                disc.id, disc.agent_id, disc.type, disc.severity, disc.status, disc.created_at, disc.updated_at,
                disc.resolved_at, disc.summary, disc.details, list(disc.related_files), disc.confidence,
                pgr.discovery_words(disc.summary, disc.details))
            if not created:
                raise ConflictError(f"discovery {disc.id!r} already exists")
            if disc.tags:
                await conn.execute("INSERT INTO core.discovery_tags (discovery_id, tag)"
                                   " SELECT $1, t FROM unnest($2::text[]) AS t", disc.id, list(disc.tags))
            if self.supports_graph:
                await self._graph.add_discovery(conn, disc)
            return await self._fetch_discovery(conn, disc.id)  # type: ignore[return-value]

    async def _fetch_discovery(self, conn: asyncpg.Connection, discovery_id: str) -> Discovery | None:
        row = await conn.fetchrow(f"SELECT {pgr.DISCOVERY_COLS} FROM core.discoveries d WHERE d.id = $1", discovery_id)
        return None if row is None else pgr.discovery(row)

    async def _get_discovery(self, discovery_id: str) -> Discovery | None:
        async with self.acquire() as conn:
            return await self._fetch_discovery(conn, discovery_id)

    async def _update_discovery_status(self, discovery_id: str, status: str, now: datetime) -> Discovery:
        async with self.acquire(transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE core.discoveries AS d SET status = $2::text, updated_at = $3::timestamptz,"
                f" resolved_at = CASE WHEN $2::text = 'resolved' THEN $3::timestamptz END WHERE d.id = $1 RETURNING {pgr.DISCOVERY_COLS}",
                discovery_id, status, now)
            if row is None:
                raise NotFoundError("discovery", discovery_id)
            if self.supports_graph:
                await self._graph.set_discovery_status(conn, discovery_id, status)
            return pgr.discovery(row)

    async def _link_discoveries(self, link: DiscoveryLink) -> DiscoveryLink:
        async with self.acquire(transaction=True) as conn:
            await self._require(conn, "discovery", link.src_id)
            await self._require(conn, "discovery", link.dst_id)
            row = await conn.fetchrow(
                "INSERT INTO core.discovery_edges AS e (src_id, dst_id, edge_type, response_type, weight,"
                " created_at, created_by, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                f" ON CONFLICT (src_id, dst_id, edge_type) DO NOTHING RETURNING {pgr.LINK_COLS}",
                link.src_id, link.dst_id, link.edge_type, link.response_type, link.weight, link.created_at,
                link.created_by, link.metadata)
            if row is None:
                raise ConflictError(f"discoveries {link.src_id!r} -> {link.dst_id!r} are already"
                                    f" linked as {link.edge_type}")
            if self.supports_graph:
                await self._graph.add_link(conn, link)
            return pgr.link(row)

    async def _search_discoveries(self, words: tuple[str, ...], tags: tuple[str, ...], type: str | None,
                                  status: str | None, agent_id: str | None, limit: int) -> list[Discovery]:
        filters: list[tuple[str, Any]] = [
            ("d.type = {}", type), ("d.status = {}", status), ("d.agent_id = {}", agent_id),
            ("d.id IN (SELECT t.discovery_id FROM core.discovery_tags t WHERE t.tag = ANY ({}::text[])"
             f" GROUP BY t.discovery_id HAVING count(*) = {len(tags)})", list(tags) if tags else None)]
        if words:
            filters.append(("d.words @> {}::text[]", _query_words(words)))
        where, args = _filters(*filters)
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {pgr.DISCOVERY_COLS} FROM core.discoveries d WHERE {where}"
                                    f" ORDER BY d.created_at DESC, d.id DESC LIMIT ${len(args) + 1}", *args, limit)
        return [pgr.discovery(r) for r in rows]

    async def _get_neighbors(self, discovery_id: str, edge_type: str | None) -> list[Neighbor]:
        type_cond = "" if edge_type is None else " AND e.edge_type = $2"
        args = (discovery_id,) if edge_type is None else (discovery_id, edge_type)
        async with self.acquire() as conn:
            await self._require(conn, "discovery", discovery_id)
            rows = await conn.fetch(
                f"SELECT {pgr.LINK_COLS}, n.other, n.direction, {pgr.DISCOVERY_COLS} FROM ("
                f"   SELECT e.dst_id AS other, 'out' AS direction, e.src_id, e.dst_id, e.edge_type"
                f"     FROM core.discovery_edges e WHERE e.src_id = $1{type_cond}"
                f"   UNION ALL SELECT e.src_id, 'in', e.src_id, e.dst_id, e.edge_type"
                f"     FROM core.discovery_edges e WHERE e.dst_id = $1{type_cond}) AS n"
                " JOIN core.discovery_edges e USING (src_id, dst_id, edge_type)"
                " JOIN core.discoveries d ON d.id = n.other"
                " ORDER BY n.other, e.edge_type, n.direction", *args)
        return [Neighbor(pgr.discovery(r), pgr.link(r), r["direction"]) for r in rows]

    async def _get_response_chain(self, discovery_id: str, max_depth: int) -> list[Discovery]:
        async with self.acquire() as conn:
            # Each step follows the response_to link with the smallest dst id;
            # a step back into the chain ends it.
            rows = await conn.fetch(
                "WITH RECURSIVE chain (id, depth, path) AS ("
                "  SELECT d.id, 0, ARRAY[d.id] FROM core.discoveries d WHERE d.id = $1"
                "  UNION ALL"
                "  SELECT n.dst_id, c.depth + 1, c.path || n.dst_id FROM chain c"
                "   CROSS JOIN LATERAL (SELECT e.dst_id FROM core.discovery_edges e"
                "     WHERE e.src_id = c.id AND e.edge_type = 'response_to' ORDER BY e.dst_id LIMIT 1) AS n"
                "   WHERE c.depth < $2 AND NOT n.dst_id = ANY (c.path))"
                f" SELECT {pgr.DISCOVERY_COLS} FROM chain c JOIN core.discoveries d ON d.id = c.id ORDER BY c.depth",
                discovery_id, max_depth)
        if not rows:
            raise NotFoundError("discovery", discovery_id)
        return [pgr.discovery(r) for r in rows]

    # -- dialectic -------------------------------------------------------

    async def _create_dialectic_session(self, sess: DialecticSession) -> DialecticSession:
        async with self.acquire(transaction=True) as conn:
            await self._require(conn, "agent", sess.paused_agent_id)
            if sess.reviewer_agent_id is not None:
                await self._require(conn, "agent", sess.reviewer_agent_id)
            if sess.discovery_id is not None:
                await self._require(conn, "discovery", sess.discovery_id)
            row = await conn.fetchrow(
                "INSERT INTO core.dialectic_sessions (session_id, paused_agent_id, reviewer_agent_id, phase, status,"
                " created_at, updated_at, reason, discovery_id, dispute_type, session_type, topic,"
                " max_synthesis_rounds, synthesis_round, paused_agent_state)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                f" ON CONFLICT (session_id) DO NOTHING RETURNING {pgr.DIALECTIC_COLS}",
                sess.session_id, sess.paused_agent_id, sess.reviewer_agent_id, sess.phase, sess.status,
                sess.created_at, sess.updated_at, sess.reason, sess.discovery_id, sess.dispute_type,
                sess.session_type, sess.topic, sess.max_synthesis_rounds, sess.synthesis_round,
                sess.paused_agent_state)
            if row is None:
                raise ConflictError(f"dialectic session {sess.session_id!r} already exists")
            if self.supports_graph:
                await self._graph.add_dialectic_session(conn, sess)
            return pgr.dialectic(row)

    async def _get_dialectic_session(self, session_id: str) -> DialecticSession | None:
        async with self.acquire() as conn:
            return await self._fetch_dialectic(conn, session_id)

    async def _fetch_dialectic(self, conn: asyncpg.Connection, session_id: str, *,
                               lock: bool = False) -> DialecticSession | None:
        row = await conn.fetchrow(f"SELECT {pgr.DIALECTIC_COLS} FROM core.dialectic_sessions WHERE session_id = $1"
                                  + (" FOR UPDATE" if lock else ""), session_id)
        if row is None:
            return None
        if lock:
            return pgr.dialectic(row)
        msgs = await conn.fetch(f"SELECT {pgr.MESSAGE_COLS} FROM core.dialectic_messages WHERE session_id = $1"
                                " ORDER BY id", session_id)
        return pgr.dialectic(row, tuple(pgr.message(m) for m in msgs))

    async def _assign_reviewer(self, session_id: str, reviewer_agent_id: str, now: datetime) -> DialecticSession:
        async with self.acquire(transaction=True) as conn:
            sess = await self._fetch_dialectic(conn, session_id, lock=True)
            if sess is None:
                raise NotFoundError("dialectic session", session_id)
            await self._require(conn, "agent", reviewer_agent_id)
            if reviewer_agent_id == sess.paused_agent_id:
                raise ValidationError("reviewer_agent_id", "must differ from the session's paused agent")
            _require_active(sess)
            await conn.execute("UPDATE core.dialectic_sessions SET reviewer_agent_id = $2, updated_at = $3"
                               " WHERE session_id = $1", session_id, reviewer_agent_id, now)
            if self.supports_graph:
                await self._graph.set_reviewer(conn, session_id, reviewer_agent_id)
            return await self._fetch_dialectic(conn, session_id)  # type: ignore[return-value]

    async def _add_dialectic_message(self, msg: DialecticMessage) -> DialecticMessage:
        cols = ("session_id, agent_id, message_type, ts, root_cause, proposed_conditions, reasoning,"
                " observed_metrics, concerns, agrees, signature")
        args = [msg.session_id, msg.agent_id, msg.message_type, msg.timestamp, msg.root_cause,
                msg.proposed_conditions, msg.reasoning, msg.observed_metrics, msg.concerns, msg.agrees,
                msg.signature]
        if msg.id > 0:  # dual-write copying SQLite's row id
            cols, args = "id, " + cols, [msg.id, *args]
        marks = ", ".join(f"${i}" for i in range(1, len(args) + 1))
        async with self.acquire(transaction=True) as conn:
            sess = await self._fetch_dialectic(conn, msg.session_id, lock=True)
            if sess is None:
                raise NotFoundError("dialectic session", msg.session_id)
            await self._require(conn, "agent", msg.agent_id)
            _require_active(sess)
            row = await conn.fetchrow(f"INSERT INTO core.dialectic_messages ({cols}) VALUES ({marks})"
                                      f" RETURNING {pgr.MESSAGE_COLS}", *args)
            await conn.execute("UPDATE core.dialectic_sessions SET updated_at = $2,"
                               " synthesis_round = synthesis_round + $3 WHERE session_id = $1",
                               msg.session_id, msg.timestamp, int(msg.message_type == "synthesis"))
            stored = pgr.message(row)
            if self.supports_graph:
                await self._graph.add_dialectic_message(conn, stored)
            return stored

    async def _set_dialectic_phase(self, session_id: str, phase: str, now: datetime) -> DialecticSession:
        return await self._change_state(session_id, now, phase=phase)

    async def _resolve_dialectic_session(self, session_id: str, resolution: dict[str, Any], status: str,
                                         now: datetime) -> DialecticSession:
        return await self._change_state(session_id, now, status=status, phase=_CLOSING_PHASE[status],
                                        resolution=resolution)

    async def _change_state(self, session_id: str, now: datetime, *, phase: str, status: str | None = None,
                            resolution: dict[str, Any] | None = None) -> DialecticSession:
        async with self.acquire(transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE core.dialectic_sessions SET phase = $2, status = coalesce($3, status),"
                " resolution = coalesce($4, resolution), updated_at = $5"
                " WHERE session_id = $1 AND status = 'active' RETURNING status",
                session_id, phase, status, resolution, now)
            if row is None:
                sess = await self._fetch_dialectic(conn, session_id, lock=True)
                if sess is None:
                    raise NotFoundError("dialectic session", session_id)
                _require_active(sess)
                raise ConflictError(f"dialectic session {session_id!r} changed meanwhile; retry")
            if self.supports_graph:
                await self._graph.set_dialectic_state(conn, session_id, row["status"], phase)
            return await self._fetch_dialectic(conn, session_id)  # type: ignore[return-value]

    async def _get_active_dialectic_sessions(self, agent_id: str) -> list[DialecticSession]:
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {pgr.DIALECTIC_COLS} FROM core.dialectic_sessions WHERE status = 'active'"
                " AND (paused_agent_id = $1 OR reviewer_agent_id = $1) ORDER BY created_at, session_id", agent_id)
        return [pgr.dialectic(r) for r in rows]


# -- helpers --------------------------------------------------------------------

async def _reset_connection(conn: asyncpg.Connection) -> None:
    """What a released connection needs before its next use: only a transaction left open
    ends. asyncpg's default (unlock advisory locks, close cursors, unlisten, RESET ALL: four
    statements on every release) undoes state this backend never leaves on a pooled connection
    (its advisory locks and settings are transaction-scoped, it never listens or keeps cursors)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _stored_version(conn: asyncpg.Connection) -> int | None:
    if not await conn.fetchval("SELECT to_regclass('core.schema_version') IS NOT NULL"):
        return None
    return await conn.fetchval("SELECT max(version) FROM core.schema_version")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _filters(*pairs: tuple[str, Any]) -> tuple[str, list[Any]]:
    """Return a WHERE condition of the fragments whose value is not None, and the values.

    Each ``{}`` in a fragment becomes the next ``$n``; a tuple value fills
    several. The SQL text never contains a value.
    """
    conds: list[str] = []
    args: list[Any] = []
    for sql, value in pairs:
        if value is None:
            continue
        values = list(value) if isinstance(value, tuple) else [value]
        marks = [f"${len(args) + i + 1}" for i in range(len(values))]
        conds.append(sql.format(*marks))
        args.extend(values)
    return " AND ".join(conds) or "true", args


def _query_words(words: tuple[str, ...]) -> list[str]:
    return [indexed_word(w) for w in words]


def _require_active(sess: DialecticSession) -> None:
    if sess.status != "active":
        raise ConflictError(f"dialectic session {sess.session_id!r} is {sess.status}, not active;"
                            " open a new session instead")


