"""SQLite backend over the legacy governance.db layout.

Every sqlite3 call runs on one worker thread that owns the connection, so
the event loop never blocks. Each operation is one transaction: writes
take ``BEGIN IMMEDIATE`` (a read-check-then-write is atomic and processes
sharing the file serialise), and any failure rolls the whole operation back.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..convert import (
    dump_json, format_timestamp, normalise_timestamp, read_bool, read_float, read_int, read_json,
    read_str_list,
)
from ..errors import (
    ConflictError, GovdbError, NotFoundError, SchemaError, StoreUnavailableError, ValidationError,
)
from ..records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery,
    DiscoveryLink, Health, Identity, Neighbor, Session, ToolStats, ToolUsage,
)
from .. import legacy
from .base import Database, search_words

T = TypeVar("T")
Conn = sqlite3.Connection
BUSY_TIMEOUT_MS = 5_000
TABLES = (
    "agent_metadata", "session_identities", "agent_state", "audit_events", "tool_usage",
    "calibration_state", "discoveries", "discovery_tags", "discovery_edges", "rate_limits",
    "dialectic_sessions", "dialectic_messages",
)
_KEYS = {  # kind -> (table, key column)
    "agent": ("agent_metadata", "agent_id"),
    "session": ("session_identities", "session_id"),
    "discovery": ("discoveries", "id"),
    "dialectic session": ("dialectic_sessions", "session_id"),
}
_CLOSING_PHASE = {"resolved": "resolved", "escalated": "escalated", "failed": "failed", "cancelled": "failed"}
_UNAVAILABLE = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_PERM,
})
_UNIQUE = frozenset({sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY})

#: Called as ``hook(conn, result)`` inside each write transaction of the
#: current task, after the write and before COMMIT (the dual backend records
#: its outbox there, so the record commits or rolls back with the write).
WRITE_HOOK: contextvars.ContextVar[Callable[[sqlite3.Connection, Any], None] | None] = contextvars.ContextVar(
    "govdb_sqlite_write_hook", default=None)


def _ts(col: str) -> str:
    """SQL for a timestamp column as canonical text, so order and range tests
    are right for legacy forms too; canonical rows skip the Python call."""
    return (f"(CASE WHEN length({col}) = 32 AND substr({col}, 11, 1) = 'T' AND substr({col}, 27) = '+00:00'"
            f" THEN {col} ELSE govdb_ts(CAST({col} AS BLOB)) END)")


def _bool(col: str, default: int) -> str:
    """SQL for a legacy boolean column, read as convert.read_bool reads it."""
    return f"(CASE {col} WHEN 1 THEN 1 WHEN 0 THEN 0 ELSE govdb_bool(CAST({col} AS BLOB), {default}) END)"


def _text_args(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Arguments arrive as BLOBs (CAST in the SQL): sqlite3 cannot hand a
    # function TEXT that is not UTF-8, and legacy files hold such TEXT.
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*(a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in args))
    return wrapper


def _words_match(words: str, *texts: Any) -> int:
    text = " ".join(t for t in texts if isinstance(t, str))
    wanted = words.split()
    # Exact cheap pre-check: an ASCII word that is a token of the text is a
    # substring of text.lower() (only the final-sigma rule depends on context).
    lowered = text.lower()
    if any(w.isascii() and w not in lowered for w in wanted):
        return 0
    have = set(search_words(text))
    return int(all(w in have for w in wanted))


def _audit_match(words: str, event_type: Any, details_json: Any) -> int:
    # Details are searched as PostgreSQL's jsonb prints them, so legacy rows
    # written with \uXXXX escapes are searched unescaped.
    if isinstance(details_json, str) and "\\u" in details_json:
        value = read_json(details_json, None)
        details_json = details_json if value is None else dump_json(value)
    return _words_match(words, event_type, details_json)


_SQL_FUNCTIONS: tuple[tuple[str, int, Callable[..., Any]], ...] = (
    ("govdb_ts", 1, normalise_timestamp),
    ("govdb_bool", 2, lambda value, default: int(bool(read_bool(value, bool(default))))),
    ("govdb_words_match", -1, _words_match),
    ("govdb_audit_match", 3, _audit_match),
    ("govdb_has_tag", 2, lambda tags_json, tag: int(tag in read_str_list(tags_json))),
)


class SQLiteDatabase(Database):
    """The governance store in one SQLite file (legacy layout, opened as it is)."""

    name = "sqlite"
    supports_graph = False
    supports_copy = False

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._pool: ThreadPoolExecutor | None = None
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"

    # -- lifecycle -------------------------------------------------------

    async def connect(self) -> None:
        async with self._lock:
            if self._pool is not None:
                return
            pool = ThreadPoolExecutor(1, thread_name_prefix="govdb-sqlite")
            try:
                self._conn = await self._on(pool, self._open)
            except BaseException:
                pool.shutdown(wait=False)
                raise
            self._pool = pool

    async def close(self) -> None:
        async with self._lock:
            pool, conn = self._pool, self._conn
            self._pool = self._conn = None
            if pool is None:
                return
            try:
                if conn is not None:
                    await self._on(pool, conn.close)  # queued behind work already submitted
            finally:
                pool.shutdown(wait=False)

    async def health(self) -> Health:
        details: dict[str, Any] = {"path": str(self.path), "sqlite_version": sqlite3.sqlite_version}
        try:
            details.update(await self._read(_health_details))
        except GovdbError as exc:
            return Health(self.name, False, "n/a", None, {**details, "error": str(exc)})
        return Health(self.name, not details["missing_tables"], "n/a", None, details)

    def _open(self) -> Conn:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the directory of {self.path} ({exc})") from exc
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.row_factory = sqlite3.Row
            conn.text_factory = functools.partial(str, encoding="utf-8", errors="replace")
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = OFF")  # as the legacy server ran
            for name, nargs, fn in _SQL_FUNCTIONS:
                conn.create_function(name, nargs, _text_args(fn), deterministic=True)
            schema = resources.files("govdb").joinpath("sql/sqlite_legacy.sql").read_text("utf-8")
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{schema}\nCOMMIT;")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF in _UNAVAILABLE:
                    raise
                raise SchemaError(f"{self.path} does not have the governance.db layout ({exc})") from exc
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            conn.close()
            raise
        return conn

    # -- running work on the connection's thread ---------------------------

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug in this module, not a state of the store
        except sqlite3.Error as exc:
            raise self._map_error(exc) from exc

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._transaction("BEGIN", fn, args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._transaction("BEGIN IMMEDIATE", fn, args, WRITE_HOOK.get())

    async def _transaction(self, begin: str, fn: Callable[..., T], args: tuple[Any, ...],
                           hook: Callable[[Conn, Any], None] | None = None) -> T:
        pool, conn = self._pool, self._conn
        if pool is None or conn is None:
            raise StoreUnavailableError(f"SQLite store {self.path} is not connected (call connect() first)")
        return await self._on(pool, _in_transaction, conn, begin, fn, args, hook)

    def _map_error(self, exc: sqlite3.Error) -> GovdbError:
        code = getattr(exc, "sqlite_errorcode", None) or 0
        if isinstance(exc, sqlite3.IntegrityError) and code in _UNIQUE:
            return ConflictError(f"a record with the same key already exists ({exc})")
        if code & 0xFF in _UNAVAILABLE:
            return StoreUnavailableError(
                f"SQLite store {self.path} is unavailable ({getattr(exc, 'sqlite_errorname', 'error')}: {exc});"
                " retry later or check the file and its directory")
        if code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return SchemaError(f"{self.path} is not a usable SQLite database ({exc})")
        return GovdbError(f"SQLite error on {self.path}: {exc}")

    # -- identities ------------------------------------------------------

    async def _create_identity(self, ident: Identity, api_key_hash: str) -> Identity:
        def tx(conn: Conn) -> Identity:
            if ident.parent_agent_id is not None:
                _require(conn, "agent", ident.parent_agent_id)
            _refuse_existing(conn, "agent", ident.agent_id)
            _insert(conn, "agent_metadata", agent_id=ident.agent_id, api_key=api_key_hash,
                    created_at=format_timestamp(ident.created_at), updated_at=format_timestamp(ident.updated_at),
                    status=ident.status, parent_agent_id=ident.parent_agent_id, spawn_reason=ident.spawn_reason,
                    tags_json=dump_json(list(ident.tags)), lifecycle_events_json="[]",
                    metadata_json=_metadata_json(ident.metadata, ident.notes))
            return _load_identity(conn, ident.agent_id)
        return await self._write(tx)

    async def _get_identity(self, agent_id: str) -> Identity | None:
        return await self._read(_first, _identity, "SELECT * FROM agent_metadata WHERE agent_id = ?", agent_id)

    async def _list_identities(self, status: str | None, tag: str | None, limit: int, offset: int) -> list[Identity]:
        where, args = _filters(("COALESCE(status, 'active') = ?", status),
                               ("govdb_has_tag(CAST(tags_json AS BLOB), ?)", tag))
        sql = f"SELECT * FROM agent_metadata WHERE {where} ORDER BY {_ts('created_at')}, agent_id LIMIT ? OFFSET ?"
        return await self._read(_select, _identity, sql, *args, limit, offset)

    async def _update_identity_status(self, agent_id: str, status: str, reason: str | None,
                                      now: datetime) -> Identity:
        def tx(conn: Conn) -> Identity:
            cur, at = _load_identity(conn, agent_id), format_timestamp(now)
            events = [*cur.lifecycle_events, {"at": at, "status": status, "from": cur.status, "reason": reason}]
            _update(conn, "agent", agent_id, status=status, updated_at=at, lifecycle_events_json=dump_json(events),
                    disabled_at=at if status == "disabled" else None)
            return _load_identity(conn, agent_id)
        return await self._write(tx)

    async def _update_identity(self, agent_id: str, tags: tuple[str, ...] | None, notes: str | None,
                               metadata: dict[str, Any] | None, now: datetime) -> Identity:
        def tx(conn: Conn) -> Identity:
            cur = _load_identity(conn, agent_id)
            _update(conn, "agent", agent_id, updated_at=format_timestamp(now),
                    tags_json=dump_json(list(cur.tags if tags is None else tags)),
                    metadata_json=_metadata_json(cur.metadata if metadata is None else metadata,
                                                 cur.notes if notes is None else notes))
            return _load_identity(conn, agent_id)
        return await self._write(tx)

    async def _get_api_key_hash(self, agent_id: str) -> str | None:
        # Old files hold the raw key here; keys.verify_api_key accepts both.
        value = await self._read(_scalar, "SELECT api_key FROM agent_metadata WHERE agent_id = ?", agent_id)
        return None if value is None else str(value)

    async def _get_lineage(self, agent_id: str, max_depth: int) -> list[Identity]:
        def tx(conn: Conn) -> list[Identity]:
            out: list[Identity] = []
            seen: set[str] = set()
            ident: Identity | None = _load_identity(conn, agent_id)
            while ident is not None and len(out) <= max_depth and ident.agent_id not in seen:
                out.append(ident)
                seen.add(ident.agent_id)
                parent = ident.parent_agent_id
                ident = None if parent is None else _first(conn, _identity, _BY_AGENT, parent)
            return out
        return await self._read(tx)

    async def _list_children(self, agent_id: str) -> list[Identity]:
        def tx(conn: Conn) -> list[Identity]:
            _require(conn, "agent", agent_id)
            return _select(conn, _identity, "SELECT * FROM agent_metadata WHERE parent_agent_id = ?"
                           f" ORDER BY {_ts('created_at')}, agent_id", agent_id)
        return await self._read(tx)

    # -- sessions --------------------------------------------------------

    async def _create_session(self, sess: Session) -> Session:
        def tx(conn: Conn) -> Session:
            _require(conn, "agent", sess.agent_id)
            _refuse_existing(conn, "session", sess.session_id)
            _insert(conn, "session_identities", session_id=sess.session_id, agent_id=sess.agent_id,
                    created_at=format_timestamp(sess.created_at), last_active=format_timestamp(sess.last_active),
                    expires_at=format_timestamp(sess.expires_at), is_active=1, client_type=sess.client_type,
                    client_info_json=dump_json(sess.client_info), metadata_json=dump_json(sess.metadata))
            return _load_session(conn, sess.session_id)
        return await self._write(tx)

    async def _get_session(self, session_id: str) -> Session | None:
        return await self._read(_first, _session, _BY_SESSION, session_id)

    async def _touch_session(self, session_id: str, now: datetime, expires_at: datetime | None) -> Session:
        def tx(conn: Conn) -> Session:
            _load_session(conn, session_id)
            changes = {"last_active": format_timestamp(now)}
            if expires_at is not None:
                changes["expires_at"] = format_timestamp(expires_at)
            _update(conn, "session", session_id, **changes)
            return _load_session(conn, session_id)
        return await self._write(tx)

    async def _end_session(self, session_id: str, now: datetime) -> Session:
        def tx(conn: Conn) -> Session:
            _load_session(conn, session_id)
            _update(conn, "session", session_id, is_active=0)
            return _load_session(conn, session_id)
        return await self._write(tx)

    async def _get_active_sessions(self, agent_id: str, now: datetime) -> list[Session]:
        sql = (f"SELECT * FROM session_identities WHERE agent_id = ? AND {_bool('is_active', 1)}"
               f" AND {_ts('expires_at')} > ? ORDER BY {_ts('last_active')} DESC, session_id DESC")
        return await self._read(_select, _session, sql, agent_id, format_timestamp(now))

    async def _expire_sessions(self, now: datetime) -> int:
        def tx(conn: Conn) -> int:
            return conn.execute(f"UPDATE session_identities SET is_active = 0 WHERE {_bool('is_active', 1)}"
                                f" AND {_ts('expires_at')} <= ?", (format_timestamp(now),)).rowcount
        return await self._write(tx)

    # -- agent state -----------------------------------------------------

    async def _record_agent_state(self, snap: AgentState) -> AgentState:
        core = {"E": snap.energy, "I": snap.integrity, "S": snap.entropy, "V": snap.void,
                "coherence": snap.coherence, "regime": snap.regime}
        doc = {**core, **{k: v for k, v in snap.state.items() if k not in core}}

        def tx(conn: Conn) -> AgentState:
            _require(conn, "agent", snap.agent_id)
            rowid = _insert(conn, "agent_state", agent_id=snap.agent_id, recorded_at=format_timestamp(snap.recorded_at),
                            entropy=snap.entropy, integrity=snap.integrity, volatility=snap.void,
                            regime=snap.regime, coherence=snap.coherence, state_json=dump_json(doc))
            return _select(conn, _agent_state, "SELECT * FROM agent_state WHERE id = ?", rowid)[0]
        return await self._write(tx)

    async def _get_latest_agent_state(self, agent_id: str) -> AgentState | None:
        rows = await self._get_agent_state_history(agent_id, 1, None)
        return rows[0] if rows else None

    async def _get_agent_state_history(self, agent_id: str, limit: int,
                                       since: datetime | None) -> list[AgentState]:
        where, args = _filters(("agent_id = ?", agent_id), (f"{_ts('recorded_at')} >= ?", _opt_ts(since)))
        sql = f"SELECT * FROM agent_state WHERE {where} ORDER BY {_ts('recorded_at')} DESC, id DESC LIMIT ?"
        return await self._read(_select, _agent_state, sql, *args, limit)

    # -- calibration -----------------------------------------------------

    async def _get_calibration(self) -> Calibration | None:
        return await self._read(_first, _calibration, _CALIBRATION)

    async def _update_calibration(self, state: dict[str, Any], expected_version: int | None,
                                  now: datetime) -> Calibration:
        def tx(conn: Conn) -> Calibration:
            stored = _first(conn, _calibration, _CALIBRATION)
            version = 0 if stored is None else stored.version
            if expected_version is not None and expected_version != version:
                raise ConflictError(f"calibration is at version {version}, not {expected_version};"
                                    " read it again and retry")
            conn.execute("INSERT INTO calibration_state (id, updated_at, version, state_json) VALUES (1, ?, ?, ?)"
                         " ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at,"
                         " version = excluded.version, state_json = excluded.state_json",
                         (format_timestamp(now), version + 1, dump_json(state)))
            return _select(conn, _calibration, _CALIBRATION)[0]
        return await self._write(tx)

    # -- audit events ----------------------------------------------------

    async def _append_audit_event(self, ev: AuditEvent) -> tuple[AuditEvent, bool]:
        def tx(conn: Conn) -> tuple[AuditEvent, bool]:
            stored = _first(conn, _audit, "SELECT * FROM audit_events WHERE raw_hash = ?", ev.raw_hash)
            if stored is not None:
                return stored, False
            if _scalar(conn, "SELECT 1 FROM audit_events WHERE event_id = ?", ev.event_id):
                raise ConflictError(f"audit event {ev.event_id} already exists with other content")
            rowid = _insert(conn, "audit_events", timestamp=format_timestamp(ev.timestamp), event_id=ev.event_id,
                            agent_id=ev.agent_id, session_id=ev.session_id, event_type=ev.event_type,
                            confidence=ev.confidence, details_json=dump_json(ev.details), raw_hash=ev.raw_hash)
            return _select(conn, _audit, "SELECT * FROM audit_events WHERE id = ?", rowid)[0], True
        return await self._write(tx)

    async def _query_audit_events(self, agent_id: str | None, event_type: str | None, since: datetime | None,
                                  until: datetime | None, limit: int) -> list[AuditEvent]:
        where, args = _filters(("agent_id = ?", agent_id), ("event_type = ?", event_type),
                               *_time_range("timestamp", since, until))
        sql = f"SELECT * FROM audit_events WHERE {where} ORDER BY {_AUDIT_ORDER} LIMIT ?"
        return await self._read(_select, _audit, sql, *args, limit)

    async def _search_audit_events(self, words: tuple[str, ...], limit: int) -> list[AuditEvent]:
        sql = ("SELECT * FROM audit_events WHERE govdb_audit_match(?, CAST(event_type AS BLOB),"
               f" CAST(details_json AS BLOB)) ORDER BY {_AUDIT_ORDER} LIMIT ?")
        return await self._read(_select, _audit, sql, " ".join(words), limit)

    # -- tool usage ------------------------------------------------------

    async def _record_tool_usage(self, use: ToolUsage) -> ToolUsage:
        def tx(conn: Conn) -> ToolUsage:
            if _scalar(conn, "SELECT 1 FROM tool_usage WHERE usage_id = ?", use.usage_id):
                raise ConflictError(f"tool usage {use.usage_id} already exists")
            rowid = _insert(conn, "tool_usage", timestamp=format_timestamp(use.timestamp), usage_id=use.usage_id,
                            agent_id=use.agent_id, session_id=use.session_id, tool_name=use.tool_name,
                            latency_ms=use.latency_ms, success=int(use.success), error_type=use.error_type,
                            payload_json=dump_json(use.payload))
            return _select(conn, _tool_usage, "SELECT * FROM tool_usage WHERE id = ?", rowid)[0]
        return await self._write(tx)

    async def _query_tool_usage(self, agent_id: str | None, tool_name: str | None, since: datetime | None,
                                until: datetime | None, limit: int) -> list[ToolUsage]:
        where, args = _filters(("agent_id = ?", agent_id), ("tool_name = ?", tool_name),
                               *_time_range("timestamp", since, until))
        sql = (f"SELECT * FROM tool_usage WHERE {where}"
               f" ORDER BY {_ts('timestamp')} DESC, usage_id DESC, id DESC LIMIT ?")
        return await self._read(_select, _tool_usage, sql, *args, limit)

    async def _get_tool_stats(self, agent_id: str | None, since: datetime | None) -> list[ToolStats]:
        where, args = _filters(("agent_id = ?", agent_id), *_time_range("timestamp", since, None))
        sql = ("SELECT tool_name, COUNT(*) AS calls, SUM(ok) AS successes, AVG(ms) AS avg_ms, MAX(ms) AS max_ms"
               f" FROM (SELECT tool_name, {_bool('success', 1)} AS ok,"
               "  CASE WHEN typeof(latency_ms) IN ('integer', 'real') THEN latency_ms END AS ms"
               f"  FROM tool_usage WHERE {where}) GROUP BY tool_name ORDER BY calls DESC, tool_name")
        return await self._read(_select, _tool_stats, sql, *args)

    # -- knowledge graph -------------------------------------------------

    async def _add_discovery(self, disc: Discovery) -> Discovery:
        def tx(conn: Conn) -> Discovery:
            _require(conn, "agent", disc.agent_id)
            _refuse_existing(conn, "discovery", disc.id)
            _insert(conn, "discoveries", id=disc.id, agent_id=disc.agent_id, type=disc.type, severity=disc.severity,
                    status=disc.status, created_at=format_timestamp(disc.created_at),
                    updated_at=_opt_ts(disc.updated_at), resolved_at=_opt_ts(disc.resolved_at),
                    summary=disc.summary, details=disc.details, confidence=disc.confidence,
                    related_files=dump_json(list(disc.related_files)))
            conn.executemany("INSERT INTO discovery_tags (discovery_id, tag) VALUES (?, ?)",
                             [(disc.id, tag) for tag in disc.tags])
            return _load_discovery(conn, disc.id)
        return await self._write(tx)

    async def _get_discovery(self, discovery_id: str) -> Discovery | None:
        return await self._read(_get_discovery, discovery_id)

    async def _update_discovery_status(self, discovery_id: str, status: str, now: datetime) -> Discovery:
        def tx(conn: Conn) -> Discovery:
            _require(conn, "discovery", discovery_id)
            at = format_timestamp(now)
            _update(conn, "discovery", discovery_id, status=status, updated_at=at,
                    resolved_at=at if status == "resolved" else None)
            return _load_discovery(conn, discovery_id)
        return await self._write(tx)

    async def _link_discoveries(self, link: DiscoveryLink) -> DiscoveryLink:
        key = (link.src_id, link.dst_id, link.edge_type)
        by_key = "SELECT * FROM discovery_edges WHERE src_id = ? AND dst_id = ? AND edge_type = ?"

        def tx(conn: Conn) -> DiscoveryLink:
            _require(conn, "discovery", link.src_id)
            _require(conn, "discovery", link.dst_id)
            if _scalar(conn, by_key, *key):
                raise ConflictError(f"discoveries {link.src_id!r} -> {link.dst_id!r} are already"
                                    f" linked as {link.edge_type}")
            _insert(conn, "discovery_edges", src_id=link.src_id, dst_id=link.dst_id, edge_type=link.edge_type,
                    response_type=link.response_type, weight=link.weight,
                    created_at=format_timestamp(link.created_at), created_by=link.created_by,
                    metadata=dump_json(link.metadata))
            return _select(conn, _link, by_key, *key)[0]
        return await self._write(tx)

    async def _search_discoveries(self, words: tuple[str, ...], tags: tuple[str, ...], type: str | None,
                                  status: str | None, agent_id: str | None, limit: int) -> list[Discovery]:
        where, args = _filters(
            ("govdb_words_match(?, CAST(summary AS BLOB), CAST(details AS BLOB))", " ".join(words) or None),
            ("NOT EXISTS (SELECT 1 FROM json_each(?) AS want WHERE NOT EXISTS (SELECT 1 FROM discovery_tags t"
             " WHERE t.discovery_id = discoveries.id AND t.tag = want.value))", json.dumps(tags) if tags else None),
            ("type = ?", type), ("COALESCE(status, 'open') = ?", status), ("agent_id = ?", agent_id))
        sql = f"SELECT * FROM discoveries WHERE {where} ORDER BY {_ts('created_at')} DESC, id DESC LIMIT ?"

        def tx(conn: Conn) -> list[Discovery]:
            return [_discovery(conn, row) for row in conn.execute(sql, (*args, limit)).fetchall()]
        return await self._read(tx)

    async def _get_neighbors(self, discovery_id: str, edge_type: str | None) -> list[Neighbor]:
        only = "" if edge_type is None else " AND edge_type = ?"
        sql = (f"SELECT *, dst_id AS other, 'out' AS direction FROM discovery_edges WHERE src_id = ?{only}"
               f" UNION ALL SELECT *, src_id, 'in' FROM discovery_edges WHERE dst_id = ?{only}"
               " ORDER BY other, edge_type, direction")
        args = (discovery_id, edge_type) * 2 if edge_type else (discovery_id,) * 2

        def tx(conn: Conn) -> list[Neighbor]:
            _require(conn, "discovery", discovery_id)
            out = []
            for row in conn.execute(sql, args).fetchall():
                other = _get_discovery(conn, row["other"])
                if other is not None:  # legacy edges may point at nothing
                    out.append(Neighbor(other, _link(row), row["direction"]))
            return out
        return await self._read(tx)

    async def _get_response_chain(self, discovery_id: str, max_depth: int) -> list[Discovery]:
        nearest = ("SELECT e.dst_id FROM discovery_edges e JOIN discoveries d ON d.id = e.dst_id"
                   " WHERE e.src_id = ? AND e.edge_type = 'response_to' ORDER BY e.dst_id LIMIT 1")

        def tx(conn: Conn) -> list[Discovery]:
            chain = [_load_discovery(conn, discovery_id)]
            while len(chain) <= max_depth:
                nxt = _scalar(conn, nearest, chain[-1].id)
                if nxt is None or any(d.id == nxt for d in chain):
                    break
                chain.append(_load_discovery(conn, nxt))
            return chain
        return await self._read(tx)

    # -- dialectic -------------------------------------------------------

    async def _create_dialectic_session(self, sess: DialecticSession) -> DialecticSession:
        def tx(conn: Conn) -> DialecticSession:
            _require(conn, "agent", sess.paused_agent_id)
            if sess.reviewer_agent_id is not None:
                _require(conn, "agent", sess.reviewer_agent_id)
            if sess.discovery_id is not None:
                _require(conn, "discovery", sess.discovery_id)
            _refuse_existing(conn, "dialectic session", sess.session_id)
            _insert(conn, "dialectic_sessions", session_id=sess.session_id, paused_agent_id=sess.paused_agent_id,
                    reviewer_agent_id=sess.reviewer_agent_id, phase=sess.phase, status=sess.status,
                    created_at=format_timestamp(sess.created_at), updated_at=format_timestamp(sess.updated_at),
                    reason=sess.reason, discovery_id=sess.discovery_id, dispute_type=sess.dispute_type,
                    session_type=sess.session_type, topic=sess.topic,
                    max_synthesis_rounds=sess.max_synthesis_rounds, synthesis_round=sess.synthesis_round,
                    paused_agent_state_json=dump_json(sess.paused_agent_state))
            return _load_dialectic(conn, sess.session_id)
        return await self._write(tx)

    async def _get_dialectic_session(self, session_id: str) -> DialecticSession | None:
        return await self._read(_get_dialectic, session_id)

    async def _assign_reviewer(self, session_id: str, reviewer_agent_id: str, now: datetime) -> DialecticSession:
        def tx(conn: Conn) -> DialecticSession:
            sess = _load_dialectic(conn, session_id, messages=False)
            _require(conn, "agent", reviewer_agent_id)
            if reviewer_agent_id == sess.paused_agent_id:
                raise ValidationError("reviewer_agent_id", "must differ from the session's paused agent")
            _require_active(sess)
            _update(conn, "dialectic session", session_id, reviewer_agent_id=reviewer_agent_id,
                    updated_at=format_timestamp(now))
            return _load_dialectic(conn, session_id)
        return await self._write(tx)

    async def _add_dialectic_message(self, msg: DialecticMessage) -> DialecticMessage:
        def tx(conn: Conn) -> DialecticMessage:
            sess = _load_dialectic(conn, msg.session_id, messages=False)
            _require(conn, "agent", msg.agent_id)
            _require_active(sess)
            at = format_timestamp(msg.timestamp)
            rowid = _insert(conn, "dialectic_messages", session_id=msg.session_id, agent_id=msg.agent_id,
                            message_type=msg.message_type, timestamp=at, root_cause=msg.root_cause,
                            proposed_conditions_json=dump_json(msg.proposed_conditions), reasoning=msg.reasoning,
                            observed_metrics_json=dump_json(msg.observed_metrics),
                            concerns_json=dump_json(msg.concerns), signature=msg.signature,
                            agrees=None if msg.agrees is None else int(msg.agrees))
            _update(conn, "dialectic session", msg.session_id, updated_at=at,
                    synthesis_round=sess.synthesis_round + (msg.message_type == "synthesis"))
            return _select(conn, _message, "SELECT * FROM dialectic_messages WHERE id = ?", rowid)[0]
        return await self._write(tx)

    async def _set_dialectic_phase(self, session_id: str, phase: str, now: datetime) -> DialecticSession:
        return await self._write(_close_or_move, session_id, {"phase": phase, "updated_at": format_timestamp(now)})

    async def _resolve_dialectic_session(self, session_id: str, resolution: dict[str, Any], status: str,
                                         now: datetime) -> DialecticSession:
        return await self._write(_close_or_move, session_id, {
            "status": status, "phase": _CLOSING_PHASE[status], "resolution_json": dump_json(resolution),
            "updated_at": format_timestamp(now)})

    async def _get_active_dialectic_sessions(self, agent_id: str) -> list[DialecticSession]:
        sql = ("SELECT * FROM dialectic_sessions WHERE COALESCE(status, 'active') = 'active'"
               f" AND (paused_agent_id = ? OR reviewer_agent_id = ?) ORDER BY {_ts('created_at')}, session_id")
        return await self._read(_select, _dialectic, sql, agent_id, agent_id)


_BY_AGENT = "SELECT * FROM agent_metadata WHERE agent_id = ?"
_BY_SESSION = "SELECT * FROM session_identities WHERE session_id = ?"
_CALIBRATION = "SELECT * FROM calibration_state WHERE id = 1"
_AUDIT_ORDER = f"{_ts('timestamp')} DESC, event_id DESC, id DESC"


# -- helpers run on the connection's thread --------------------------------

def _in_transaction(conn: Conn, begin: str, fn: Callable[..., T], args: tuple[Any, ...],
                    hook: Callable[[Conn, Any], None] | None = None) -> T:
    conn.execute(begin)
    try:
        result = fn(conn, *args)
        if hook is not None:
            hook(conn, result)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error says more
        raise
    return result


def _select(conn: Conn, build: Callable[[sqlite3.Row], T], sql: str, *args: Any) -> list[T]:
    return [build(row) for row in conn.execute(sql, args).fetchall()]


def _first(conn: Conn, build: Callable[[sqlite3.Row], T], sql: str, *args: Any) -> T | None:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else build(row)


def _scalar(conn: Conn, sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


def _insert(conn: Conn, table: str, **values: Any) -> int:
    # Table and column names come from this module; every value is bound.
    cur = conn.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                       tuple(values.values()))
    return cur.lastrowid or 0


def _update(conn: Conn, kind: str, key: str, **values: Any) -> None:
    table, column = _KEYS[kind]
    sets = ", ".join(f"{name} = ?" for name in values)
    conn.execute(f"UPDATE {table} SET {sets} WHERE {column} = ?", (*values.values(), key))


def _filters(*pairs: tuple[str, Any]) -> tuple[str, list[Any]]:
    """Return a WHERE condition of the fragments whose value is not None, and the values.

    Each fragment holds one ``?``; the SQL text never contains a value.
    """
    used = [(sql, value) for sql, value in pairs if value is not None]
    return " AND ".join(sql for sql, _ in used) or "1", [value for _, value in used]


def _time_range(col: str, since: datetime | None, until: datetime | None) -> list[tuple[str, Any]]:
    return [(f"{_ts(col)} >= ?", _opt_ts(since)), (f"{_ts(col)} < ?", _opt_ts(until))]


def _require(conn: Conn, kind: str, key: str) -> None:
    table, column = _KEYS[kind]
    if _scalar(conn, f"SELECT 1 FROM {table} WHERE {column} = ?", key) is None:
        raise NotFoundError(kind, key)


def _refuse_existing(conn: Conn, kind: str, key: str) -> None:
    table, column = _KEYS[kind]
    if _scalar(conn, f"SELECT 1 FROM {table} WHERE {column} = ?", key) is not None:
        raise ConflictError(f"{kind} {key!r} already exists")


def _require_active(sess: DialecticSession) -> None:
    if sess.status != "active":
        raise ConflictError(f"dialectic session {sess.session_id!r} is {sess.status}, not active;"
                            " open a new session instead")


def _close_or_move(conn: Conn, session_id: str, changes: dict[str, Any]) -> DialecticSession:
    _require_active(_load_dialectic(conn, session_id, messages=False))
    _update(conn, "dialectic session", session_id, **changes)
    return _load_dialectic(conn, session_id)


def _opt_ts(dt: datetime | None) -> str | None:
    return None if dt is None else format_timestamp(dt)


def _metadata_json(metadata: dict[str, Any], notes: str | None) -> str:
    # The legacy layout has no notes column; notes live in metadata_json.
    return dump_json(metadata if notes is None else {**metadata, "notes": notes})


def _health_details(conn: Conn) -> dict[str, Any]:
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {
        "journal_mode": _scalar(conn, "PRAGMA journal_mode"),
        "user_version": _scalar(conn, "PRAGMA user_version"),
        "missing_tables": [t for t in TABLES if t not in present],
    }


# -- rows to records (legacy rows may be dirty: defaults, never a crash) ------

_identity = legacy.identity
_session = legacy.session
_agent_state = legacy.agent_state
_calibration = legacy.calibration
_audit = legacy.audit_event
_tool_usage = legacy.tool_usage
_link = legacy.link
_dialectic = legacy.dialectic_session
_message = legacy.dialectic_message


def _load_identity(conn: Conn, agent_id: str) -> Identity:
    return _found(_first(conn, _identity, _BY_AGENT, agent_id), "agent", agent_id)


def _load_session(conn: Conn, session_id: str) -> Session:
    return _found(_first(conn, _session, _BY_SESSION, session_id), "session", session_id)


def _load_discovery(conn: Conn, discovery_id: str) -> Discovery:
    return _found(_get_discovery(conn, discovery_id), "discovery", discovery_id)


def _load_dialectic(conn: Conn, session_id: str, *, messages: bool = True) -> DialecticSession:
    return _found(_get_dialectic(conn, session_id, messages=messages), "dialectic session", session_id)


def _found(value: T | None, kind: str, key: str) -> T:
    if value is None:
        raise NotFoundError(kind, key)
    return value


def _tool_stats(r: sqlite3.Row) -> ToolStats:
    calls, ok = int(r["calls"]), int(r["successes"] or 0)
    return ToolStats(tool_name=r["tool_name"] or "", calls=calls, successes=ok, failures=calls - ok,
                     avg_latency_ms=read_float(r["avg_ms"]), max_latency_ms=read_int(r["max_ms"]))


def _get_discovery(conn: Conn, discovery_id: str) -> Discovery | None:
    row = conn.execute("SELECT * FROM discoveries WHERE id = ?", (discovery_id,)).fetchone()
    return None if row is None else _discovery(conn, row)


def _discovery(conn: Conn, r: sqlite3.Row) -> Discovery:
    tags = conn.execute("SELECT tag FROM discovery_tags WHERE discovery_id = ? ORDER BY tag", (r["id"],))
    return legacy.discovery(r, (t[0] for t in tags))


def _get_dialectic(conn: Conn, session_id: str, *, messages: bool = True) -> DialecticSession | None:
    row = conn.execute("SELECT * FROM dialectic_sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    msgs = _select(conn, _message, "SELECT * FROM dialectic_messages WHERE session_id = ? ORDER BY id",
                   session_id) if messages else []
    return _dialectic(row, tuple(msgs))
