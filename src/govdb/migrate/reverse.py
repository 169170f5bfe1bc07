"""Reverse sync: bring back into a legacy governance.db what PostgreSQL holds and it lacks.

Used by ``govdb rollback`` after a cutover: the archived SQLite file is
restored, then every row written to PostgreSQL since (new identities,
sessions, states, audit events, ...) and every later change of an older row
(a status, a session touch, a discovery's status, a dialectic phase) is
written to the file with the same keys, as the SQLite backend writes them.

How rows are found, exactly and without trusting clocks where ids exist:
- keyed entity tables: keys PostgreSQL has and the file lacks, plus rows
  whose change column is at or after ``since`` (compared with the file's
  row as records, so only real differences are written); sessions also when
  PostgreSQL ended or expired them (which changes no timestamp);
- agent_state, dialectic_messages: ids above the file's highest id;
- audit events, tool usage: rows without a legacy id, or above the file's
  highest id; the id the file gives a row is written back to PostgreSQL's
  ``id`` column (its meaning: the legacy SQLite row id), so verify compares
  the same keys and a second run finds nothing left to do;
- discovery tags and edges: keys PostgreSQL has and the file lacks.
Nothing in the file is deleted. Each batch is one SQLite transaction, so a
run that is killed can simply be run again.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import asyncpg

from .. import legacy
from ..backends import pgrows as pg
from ..convert import dump_json, format_timestamp
from ..records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery, DiscoveryLink, Identity,
    Session, ToolUsage,
)
from . import MigrationError

BATCH = 2_000
Row = dict[str, Any]


# -- records -> legacy rows (as backends/sqlite.py writes them) -----------------------

def _ts(dt: datetime | None) -> str | None:
    return None if dt is None else format_timestamp(dt)


def identity_row(i: Identity, api_key_hash: str) -> Row:
    meta = i.metadata if i.notes is None else {**i.metadata, "notes": i.notes}
    return {"agent_id": i.agent_id, "api_key": api_key_hash, "created_at": _ts(i.created_at),
            "updated_at": _ts(i.updated_at), "status": i.status, "parent_agent_id": i.parent_agent_id,
            "spawn_reason": i.spawn_reason, "disabled_at": _ts(i.disabled_at), "tags_json": dump_json(list(i.tags)),
            "lifecycle_events_json": dump_json(list(i.lifecycle_events)), "metadata_json": dump_json(meta)}


def session_row(s: Session) -> Row:
    return {"session_id": s.session_id, "agent_id": s.agent_id, "created_at": _ts(s.created_at),
            "last_active": _ts(s.last_active), "expires_at": _ts(s.expires_at), "is_active": int(s.is_active),
            "client_type": s.client_type, "client_info_json": dump_json(s.client_info),
            "metadata_json": dump_json(s.metadata)}


def agent_state_row(a: AgentState) -> Row:
    core = {"E": a.energy, "I": a.integrity, "S": a.entropy, "V": a.void, "coherence": a.coherence,
            "regime": a.regime}
    doc = {**core, **{k: v for k, v in a.state.items() if k not in core}}
    return {"id": a.id, "agent_id": a.agent_id, "recorded_at": _ts(a.recorded_at), "entropy": a.entropy,
            "integrity": a.integrity, "volatility": a.void, "regime": a.regime, "coherence": a.coherence,
            "state_json": dump_json(doc)}


def calibration_row(c: Calibration) -> Row:
    return {"id": 1, "updated_at": _ts(c.updated_at), "version": c.version, "state_json": dump_json(c.state)}


def audit_row(e: AuditEvent, rowid: int | None) -> Row:
    return {"id": rowid, "timestamp": _ts(e.timestamp), "event_id": e.event_id, "agent_id": e.agent_id,
            "session_id": e.session_id, "event_type": e.event_type, "confidence": e.confidence,
            "details_json": dump_json(e.details), "raw_hash": e.raw_hash}


def tool_usage_row(u: ToolUsage, rowid: int | None) -> Row:
    return {"id": rowid, "timestamp": _ts(u.timestamp), "usage_id": u.usage_id, "agent_id": u.agent_id,
            "session_id": u.session_id, "tool_name": u.tool_name, "latency_ms": u.latency_ms,
            "success": int(u.success), "error_type": u.error_type, "payload_json": dump_json(u.payload)}


def discovery_row(d: Discovery) -> Row:
    """The discoveries row (tags are rows of discovery_tags; the embedding is not in the record)."""
    return {"id": d.id, "agent_id": d.agent_id, "type": d.type, "severity": d.severity, "status": d.status,
            "created_at": _ts(d.created_at), "updated_at": _ts(d.updated_at), "resolved_at": _ts(d.resolved_at),
            "summary": d.summary, "details": d.details, "confidence": d.confidence,
            "related_files": dump_json(list(d.related_files))}


def link_row(link: DiscoveryLink) -> Row:
    return {"src_id": link.src_id, "dst_id": link.dst_id, "edge_type": link.edge_type,
            "response_type": link.response_type, "weight": link.weight, "created_at": _ts(link.created_at),
            "created_by": link.created_by, "metadata": dump_json(link.metadata)}


def dialectic_row(s: DialecticSession) -> Row:
    return {"session_id": s.session_id, "paused_agent_id": s.paused_agent_id,
            "reviewer_agent_id": s.reviewer_agent_id, "phase": s.phase, "status": s.status,
            "created_at": _ts(s.created_at), "updated_at": _ts(s.updated_at), "reason": s.reason,
            "discovery_id": s.discovery_id, "dispute_type": s.dispute_type, "session_type": s.session_type,
            "topic": s.topic, "max_synthesis_rounds": s.max_synthesis_rounds, "synthesis_round": s.synthesis_round,
            "paused_agent_state_json": dump_json(s.paused_agent_state),
            "resolution_json": None if s.resolution is None else dump_json(s.resolution)}


def message_row(m: DialecticMessage) -> Row:
    return {"id": m.id, "session_id": m.session_id, "agent_id": m.agent_id, "message_type": m.message_type,
            "timestamp": _ts(m.timestamp), "root_cause": m.root_cause,
            "proposed_conditions_json": dump_json(m.proposed_conditions), "reasoning": m.reasoning,
            "observed_metrics_json": dump_json(m.observed_metrics), "concerns_json": dump_json(m.concerns),
            "agrees": None if m.agrees is None else int(m.agrees), "signature": m.signature}


# -- the sync ---------------------------------------------------------------------------

@dataclass
class TableSync:
    """What the reverse sync did to one legacy table."""

    table: str
    new: int = 0
    updated: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Entity:
    """A keyed table whose rows change in place."""

    table: str            # legacy table
    key: str              # legacy key column = PostgreSQL key column
    source: str           # PostgreSQL table
    columns: str          # PostgreSQL columns the record builder reads
    changed: str          # PostgreSQL condition "changed since $2"
    from_pg: Callable[[Any], Any]
    from_file: Callable[[sqlite3.Row], Any]
    to_row: Callable[[Any, Any], Row]
    keep: tuple[str, ...] = ()   # columns an update leaves as the file has them


_ENTITIES = (
    _Entity("agent_metadata", "agent_id", "core.identities", pg.IDENTITY_COLS + ", api_key_hash",
            "updated_at >= $2", pg.identity, legacy.identity,
            lambda rec, r: identity_row(rec, r["api_key_hash"]),
            keep=("api_key",)),  # old files hold the raw key, which still verifies
    _Entity("session_identities", "session_id", "core.sessions", pg.SESSION_COLS,
            "last_active >= $2 OR (NOT is_active AND session_id = ANY($3::text[]))", pg.session, legacy.session,
            lambda rec, r: session_row(rec)),
    _Entity("calibration_state", "id", "core.calibration", "id, state, version, updated_at",
            "updated_at >= $2", pg.calibration, legacy.calibration, lambda rec, r: calibration_row(rec)),
    # Tags are synced as discovery_tags rows: both sides read here without them.
    _Entity("discoveries", "id", "core.discoveries",
            "id, agent_id, type, summary, created_at, status, severity, details, confidence, related_files,"
            " updated_at, resolved_at, NULL::text[] AS tags, embedding", "coalesce(updated_at, created_at) >= $2",
            pg.discovery, lambda r: legacy.discovery(r, ()),
            lambda rec, r: {**discovery_row(rec), "embedding": r["embedding"]}, keep=("embedding",)),
    _Entity("dialectic_sessions", "session_id", "core.dialectic_sessions", pg.DIALECTIC_COLS,
            "updated_at >= $2", pg.dialectic, legacy.dialectic_session, lambda rec, r: dialectic_row(rec)),
)


class ReverseSync:
    """One reverse sync of PostgreSQL (``conn``) into the legacy file at ``path``."""

    def __init__(self, conn: asyncpg.Connection, path: Path | str, since: datetime,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None):
        self.conn, self.path, self.since = conn, Path(path), since
        self._progress = progress or (lambda table, total: lambda n: None)
        self.file = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self.file.row_factory = sqlite3.Row
        self.file.text_factory = lambda b: b.decode("utf-8", "replace")

    def close(self) -> None:
        self.file.close()

    async def run(self) -> list[TableSync]:
        """Sync every table in dependency order; return what each got."""
        await pg.set_json_codecs(self.conn)
        steps: list[tuple[str, Callable[[TableSync], Any]]] = [
            ("agent_metadata", lambda r: self._entity(_ENTITIES[0], r)),
            ("session_identities", lambda r: self._entity(_ENTITIES[1], r)),
            ("agent_state", lambda r: self._appended(r, "agent_state", "core.agent_state", pg.STATE_COLS,
                                                     pg.agent_state, agent_state_row)),
            ("calibration_state", lambda r: self._entity(_ENTITIES[2], r)),
            ("audit_events", lambda r: self._audit(r, "audit_events", "audit.events", "event_id",
                                                   pg.EVENT_COLS, pg.audit_event, audit_row)),
            ("tool_usage", lambda r: self._audit(r, "tool_usage", "audit.tool_usage", "usage_id",
                                                 pg.USAGE_COLS, pg.tool_usage, tool_usage_row)),
            ("discoveries", lambda r: self._entity(_ENTITIES[3], r)),
            ("discovery_tags", self._tags),
            ("discovery_edges", self._edges),
            ("dialectic_sessions", lambda r: self._entity(_ENTITIES[4], r)),
            ("dialectic_messages", lambda r: self._appended(r, "dialectic_messages", "core.dialectic_messages",
                                                            pg.MESSAGE_COLS, pg.message, message_row)),
        ]
        out = []
        for table, step in steps:
            result, started = TableSync(table), time.perf_counter()
            await step(result)
            result.seconds = time.perf_counter() - started
            out.append(result)
        return out

    # -- the kinds of table --------------------------------------------------------------

    async def _entity(self, e: _Entity, result: TableSync) -> None:
        in_file = {r[0] for r in self.file.execute(f"SELECT {e.key} FROM {e.table}")}
        in_pg = {r[0] for r in await self.conn.fetch(f"SELECT {e.key} FROM {e.source}")}
        args: list[Any] = [sorted(in_pg - in_file), self.since]
        if e.table == "session_identities":  # ended or expired: is_active flips, no timestamp moves
            args.append([r[0] for r in self.file.execute(
                "SELECT session_id FROM session_identities WHERE coalesce(is_active, 1) NOT IN (0, '0')")])
        rows = await self.conn.fetch(
            f"SELECT {e.columns} FROM {e.source} WHERE {e.key} = ANY($1) OR {e.changed} ORDER BY {e.key}", *args)
        tick = self._progress(e.table, len(rows))
        for chunk in _chunks(rows, BATCH):
            writes: list[Row] = []
            for r in chunk:
                rec = e.from_pg(r)
                stored = self.file.execute(f"SELECT * FROM {e.table} WHERE {e.key} = ?", (r[e.key],)).fetchone()
                if stored is None:
                    result.new += 1
                elif e.from_file(stored) != rec:
                    result.updated += 1
                else:
                    continue
                writes.append(e.to_row(rec, r))
            self._upsert(e.table, e.key, writes, e.keep)
            tick(len(chunk))

    async def _appended(self, result: TableSync, table: str, source: str, columns: str,
                        from_pg: Callable[[Any], Any], to_row: Callable[[Any], Row]) -> None:
        top = self._max_id(table)
        total = await self.conn.fetchval(f"SELECT count(*) FROM {source} WHERE id > $1", top)
        tick = self._progress(table, total)
        async for chunk in self._cursor(f"SELECT {columns} FROM {source} WHERE id > $1 ORDER BY id", top):
            self._insert(table, [to_row(from_pg(r)) for r in chunk])
            result.new += len(chunk)
            tick(len(chunk))

    async def _audit(self, result: TableSync, table: str, source: str, uid: str, columns: str,
                     from_pg: Callable[[Any], Any], to_row: Callable[[Any, int | None], Row]) -> None:
        top = self._max_id(table)
        where = "(id IS NULL OR id > $1)"
        tick = self._progress(table, await self.conn.fetchval(f"SELECT count(*) FROM {source} WHERE {where}", top))
        select = f"SELECT id, {columns} FROM {source} WHERE {where}"
        order = f" ORDER BY ts, {uid} LIMIT {BATCH}"
        # Pages by (ts, key): rows given an id here still match the condition.
        chunk = await self.conn.fetch(select + order, top)
        while chunk:
            given = self._write_audit(result, table, uid, chunk, from_pg, to_row)
            if given:
                await self.conn.execute(
                    f"UPDATE {source} AS t SET id = v.id FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[])"
                    f" AS v(uid, ts, id) WHERE t.{uid} = v.uid AND t.ts = v.ts", *map(list, zip(*given)))
            tick(len(chunk))
            last = chunk[-1]
            chunk = await self.conn.fetch(f"{select} AND (ts, {uid}) > ($2, $3){order}", top, last["ts"], last[uid])

    def _write_audit(self, result: TableSync, table: str, uid: str, chunk: Sequence[Any],
                     from_pg: Callable[[Any], Any], to_row: Callable[[Any, int | None], Row]) -> list[tuple]:
        """Write a page of events (or tool usage) to the file; return (key, ts, file id) to tell PostgreSQL."""
        given: list[tuple[Any, datetime, int]] = []

        def write() -> None:
            for r in chunk:
                rec = from_pg(r)
                have = self.file.execute(f"SELECT id FROM {table} WHERE {uid} = ?", (getattr(rec, uid),)).fetchone()
                if have is not None:  # an earlier run wrote it and stopped before PostgreSQL was told
                    rowid = int(have[0])
                else:
                    rowid = _insert_one(self.file, table, to_row(rec, r["id"]))
                    result.new += 1
                if r["id"] != rowid:
                    given.append((r[uid], r["ts"], rowid))
        self._write(write)
        return given

    async def _tags(self, result: TableSync) -> None:
        have = {tuple(r) for r in self.file.execute("SELECT discovery_id, tag FROM discovery_tags")}
        missing = [tuple(r) for r in await self.conn.fetch(
            "SELECT discovery_id, tag FROM core.discovery_tags ORDER BY discovery_id, tag")
            if (r[0], r[1]) not in have]
        tick = self._progress("discovery_tags", len(missing))
        for chunk in _chunks(missing, BATCH):
            self._insert("discovery_tags", [{"discovery_id": d, "tag": t} for d, t in chunk])
            result.new += len(chunk)
            tick(len(chunk))

    async def _edges(self, result: TableSync) -> None:
        have = {tuple(r) for r in self.file.execute("SELECT src_id, dst_id, edge_type FROM discovery_edges")}
        rows = [r for r in await self.conn.fetch(
            f"SELECT {pg.LINK_COLS} FROM core.discovery_edges e ORDER BY e.src_id, e.dst_id, e.edge_type")
            if (r["src_id"], r["dst_id"], r["edge_type"]) not in have]
        tick = self._progress("discovery_edges", len(rows))
        for chunk in _chunks(rows, BATCH):
            self._insert("discovery_edges", [link_row(pg.link(r)) for r in chunk])
            result.new += len(chunk)
            tick(len(chunk))

    # -- SQLite side ---------------------------------------------------------------------

    def _max_id(self, table: str) -> int:
        top = self.file.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
        if self.file.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
            seq = self.file.execute("SELECT max(seq) FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()[0]
            top = max(top, seq or 0)
        return int(top)

    async def _cursor(self, sql: str, *args: Any):
        async with self.conn.transaction(isolation="repeatable_read", readonly=True):
            cur = await self.conn.cursor(sql, *args)
            while chunk := await cur.fetch(BATCH):
                yield chunk

    def _insert(self, table: str, rows: Sequence[Row]) -> None:
        self._write(lambda: [_insert_one(self.file, table, r) for r in rows])

    def _upsert(self, table: str, key: str, rows: Sequence[Row], keep: Iterable[str]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c != key and c not in keep)
        sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
               f" ON CONFLICT ({key}) DO UPDATE SET {sets}")
        self._write(lambda: self.file.executemany(sql, [tuple(r[c] for c in cols) for r in rows]))

    def _write(self, fn: Callable[[], Any]) -> None:
        try:
            self.file.execute("BEGIN IMMEDIATE")
            try:
                fn()
                self.file.execute("COMMIT")
            except BaseException:
                if self.file.in_transaction:
                    self.file.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise MigrationError(f"cannot write to {self.path} ({exc}); nothing of this batch was written,"
                                 " run the rollback again once the file is writable") from exc


def _insert_one(conn: sqlite3.Connection, table: str, row: Row) -> int:
    # Table and column names come from this module; values are bound.
    cols = [c for c, v in row.items() if not (c == "id" and v is None)]
    cur = conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       tuple(row[c] for c in cols))
    return int(cur.lastrowid or 0)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
