"""Backfill a legacy governance.db into PostgreSQL's relational tables.

Worker processes (one per core) read the append-only tables by key range
(ranges fixed when the table starts) and clean them (source.py, clean.py)
into COPY text; the tables whose rows a live server changes in place are read
in one snapshot and cleaned here. The run writes each batch in key order
with its quarantined rows, repairs and checkpoint in one transaction. Audit
events, tool usage and the other tables (in dependency order) load at the same
time, each stream on a connection of its own. A kill at any moment loses at
most the batches in flight; ``resume=True`` goes on after the last committed
key of each table, and every write is idempotent, so there are no duplicates
and no gaps.

A batch is COPYed straight into its table; one with rows PostgreSQL holds
already fails there and is COPYed into a staging table and merged with one
set-based INSERT ... SELECT ... ON CONFLICT instead (after a few such
batches, every batch of the table is). Into a big append-only table that
holds few rows (a first load) the non-unique indexes are dropped for the
load and built afterwards (recorded in migrate.deferred_indexes, so an
interrupted run's are built by the next). Rows already in PostgreSQL win
when they are newer (live dual-writes): entity tables are upserted only where
the source row is newer, append-only tables never overwrite. Legacy numeric
ids are kept, and the identity sequences are moved past them at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone, tzinfo
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import asyncpg

from ..backends.outbox import encode as outbox_key
from ..config import SecretUrl, Settings, parse_postgres_url
from ..errors import ConfigError, StoreUnavailableError
from . import MigrationError
from .clean import Cleaner, build_context
from .copytext import copy_text
from .indexes import DEFERRABLE, MIN_DEFER_ROWS, defer_indexes, holds_few, restore_indexes, run_all
from .report import BackfillReport, Progress, TableReport, count_outcome, first_line, from_checkpoint
from .source import INTEGER_KEYED, LegacySource, decode_key, encode_key, quote_ident, quote_qualified
from .targets import TARGETS, Context, Outcome, raw_text
from .workers import PARTITIONED, Batch, Workers, pack

UTC = timezone.utc
DEFAULT_BATCH_SIZE = 10_000

#: --tables names -> legacy tables, in load order.
UNITS: dict[str, tuple[str, ...]] = {
    "identities": ("agent_metadata",),
    "sessions": ("session_identities",),
    "agent_state": ("agent_state",),
    "calibration": ("calibration_state",),
    "audit_events": ("audit_events",),
    "tool_usage": ("tool_usage",),
    "knowledge": ("discoveries", "discovery_tags", "discovery_edges"),
    "dialectic": ("dialectic_sessions", "dialectic_messages"),
}
ORDER = tuple(t for tables in UNITS.values() for t in tables)
#: Legacy table -> the tables whose rows its rows point at (loaded first).
PARENTS: dict[str, tuple[str, ...]] = {
    "session_identities": ("agent_metadata",), "agent_state": ("agent_metadata",),
    "discoveries": ("agent_metadata",), "discovery_tags": ("discoveries",), "discovery_edges": ("discoveries",),
    "dialectic_sessions": ("agent_metadata", "discoveries"),
    "dialectic_messages": ("agent_metadata", "dialectic_sessions"),
}
#: Entity tables: conflict key and "the source row is newer" condition.
_UPSERT = {
    "agent_metadata": ("agent_id", "t.updated_at < EXCLUDED.updated_at"),
    "session_identities": ("session_id", "t.last_active < EXCLUDED.last_active"),
    "calibration_state": ("id", "t.updated_at < EXCLUDED.updated_at"),
    "discoveries": ("id", "coalesce(t.updated_at, t.created_at) < coalesce(EXCLUDED.updated_at, EXCLUDED.created_at)"),
    "dialectic_sessions": ("session_id", "t.updated_at < EXCLUDED.updated_at"),
}
#: Append-only tables keyed by the legacy id: what makes a stored row the same row.
_SAME_ROW = {
    "agent_state": ("agent_id", "recorded_at"),
    "dialectic_messages": ("session_id", "agent_id", "ts"),
    "tool_usage": ("ts", "tool_name"),
}
_KINDS = {"agent_metadata": "agent", "discoveries": "discovery", "dialectic_sessions": "dialectic session"}
#: Month partitions are made for months in this window; rows far in the past
#: or future stay in the DEFAULT partition (audit.partition_maintenance moves them).
_FIRST_PARTITION_YEAR = 2000
_MAX_MONTHS_AHEAD = 12
_LOCK_KEY = 0x676F7664625F6D67  # "govdb_mg": one backfill per database at a time
_ROW_ERROR_CLASSES = ("22", "23", "54")  # data exception, integrity, program limit
#: Loaded on streams of their own, at the same time as the rest: they point at no other table.
_OWN_STREAM = ("audit_events", "tool_usage")
#: Failed direct COPYs (rows PostgreSQL holds already) after which a table is only merged.
_MAX_DIRECT_FAILURES = 3
#: Times a batch is written again after losing a lock conflict with live writers.
_LOCK_CONFLICT_RETRIES = 10



# -- entry point -------------------------------------------------------------------

async def backfill(
    settings_or_url: Settings | SecretUrl | str, sqlite_path: Path | str, *,
    tables: Sequence[str] | str | None = None, dry_run: bool = False, resume: bool = False,
    restart: bool = False, source_tz: tzinfo | str = UTC, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True, workers: int | None = None,
) -> BackfillReport:
    """Copy the legacy SQLite file into PostgreSQL; return per-table counts.

    ``tables``: names of :data:`UNITS` (or legacy table names); None = all.
    ``dry_run``: read and clean everything, write nothing. ``resume``: go on
    from the checkpoints; ``restart``: discard them first. Without either, a
    run refuses when an unfinished backfill is recorded. ``workers``: processes
    that read and clean the source (default: one per core). Raises
    :class:`~govdb.errors.GovdbError` subclasses with messages naming the fix.
    """
    settings = _settings(settings_or_url)
    selected = select_tables(tables)
    tz = parse_timezone(source_tz)
    if resume and restart:
        raise MigrationError("use --resume or --restart, not both")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive whole number; got {batch_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError("workers", f"must be a positive whole number; got {workers!r}")
    source = LegacySource(sqlite_path)
    try:
        run = _Run(settings, source, selected, tz, batch_size, progress,
                   workers if workers is not None else (os.cpu_count() or 1))
        if dry_run:
            return await run.dry_run()
        return await run.backfill(resume=resume, restart=restart)
    finally:
        source.close()


async def move_sequence(conn: asyncpg.Connection, table: str, top: int) -> None:
    """Move the id sequence of legacy ``table``'s target past ``top``, the highest id the
    source ever gave (quarantined rows too, and AUTOINCREMENT's high-water mark: see
    LegacySource.max_id), so no new id repeats a legacy one; then the identity sequences."""
    if top > 0:
        await conn.execute(
            "SELECT setval(s, $1, true) FROM (SELECT pg_get_serial_sequence($2, 'id')::regclass AS s) AS x"
            " WHERE $1 > coalesce(pg_sequence_last_value(s), 0)", top, TARGETS[table].table)
    await conn.execute("SELECT core.sync_identity_sequences()")


#: Legacy tables whose ids PostgreSQL goes on giving (after a backfill, or a cutover).
SEQUENCED = ("agent_state", "dialectic_messages")


def select_tables(tables: Sequence[str] | str | None) -> list[str]:
    """Return the legacy tables named by ``tables`` (unit or legacy names), in load order."""
    if tables is None:
        return list(ORDER)
    names = [t.strip() for t in (tables.split(",") if isinstance(tables, str) else tables)]
    chosen: set[str] = set()
    for name in names:
        if not name:
            continue
        if name in UNITS:
            chosen.update(UNITS[name])
        elif name in ORDER:
            chosen.add(name)
        else:
            raise ConfigError("--tables", f"names an unknown table {name!r}; choose from {', '.join(UNITS)}")
    if not chosen:
        raise ConfigError("--tables", "names no table")
    return [t for t in ORDER if t in chosen]


def parse_timezone(value: tzinfo | str) -> tzinfo:
    if isinstance(value, tzinfo):
        return value
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    name = str(value).strip()
    if name.upper() in ("UTC", "Z", "GMT"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("--source-timezone", f"is not a known time zone: {name!r} (e.g. UTC, Europe/Berlin)") from None


def _settings(value: Settings | SecretUrl | str) -> Settings:
    if isinstance(value, Settings):
        return value
    url = value if isinstance(value, SecretUrl) else parse_postgres_url(str(value), "--postgres")
    return Settings(backend="postgres", postgres_url=url, postgres_min_conn=1, postgres_max_conn=2)


# -- one run -------------------------------------------------------------------------

@dataclass
class _Table:
    """The state of one table during a run (mirrors its checkpoint row)."""

    name: str
    report: TableReport
    after: tuple[Any, ...] | None = None
    had_quarantine: bool = False
    had_repairs: bool = False
    stage: str = ""
    direct: bool = True             # COPY straight into the target (until it holds rows of the source)
    direct_failures: int = 0


class _Run:
    def __init__(self, settings: Settings, source: LegacySource, tables: list[str], tz: tzinfo,
                 batch_size: int, progress: bool, workers: int):
        self.settings = settings
        self.url = settings.postgres_url
        self.source = source
        self.tables = tables
        self.tz = tz
        self.batch_size = batch_size
        self.cleaner = Cleaner(source_tz=tz)
        self.fingerprint = source.fingerprint()
        self.conn: asyncpg.Connection | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="govdb-backfill-source")
        self.months: set[tuple[str, date]] = set()
        self.workers = Workers(workers)
        self.progress = Progress(progress)
        self.report = BackfillReport(
            source=str(source.path), fingerprint=self.fingerprint, target=self.url.masked, dry_run=False,
            journal_mode=source.journal_mode, source_timezone=str(tz))
        if not source.wal:
            self.report.notes.append(
                f"the source is not in WAL mode (journal_mode={source.journal_mode}): each batch was read in a short"
                " transaction of its own so writers were never blocked, and a table is not one snapshot;"
                " the journal mode was left as it is")
        missing = [t for t in tables if t not in source.tables]
        if missing:
            self.report.notes.append(f"the source has no table {', '.join(missing)}: nothing to migrate there")
        if "rate_limits" in source.tables:
            self.report.notes.append("rate_limits is not migrated: PostgreSQL has no such table (transient data)")

    # -- dry run -----------------------------------------------------------------

    async def dry_run(self) -> BackfillReport:
        started = time.perf_counter()
        self.report.dry_run = True
        try:
            existing = await self._existing_keys_read_only()
        except StoreUnavailableError as exc:
            self.report.notes.append(f"{exc}; the dry run assumes an empty target")
            existing = Context(agents=set(), discoveries=set(), dialectic_sessions=set())
        loop = asyncio.get_running_loop()
        with self.progress:
            await loop.run_in_executor(self.pool, self._dry_run_sync, existing)
        self.pool.shutdown()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _dry_run_sync(self, existing: Context) -> None:
        build_context(self.source, self.cleaner, existing=existing)
        for table in self.tables:
            rep = TableReport(table, TARGETS[table].table, status="dry run")
            self.report.tables.append(rep)
            t0 = time.perf_counter()
            notes_before = self.cleaner.notes.copy()
            with self.source.snapshot():
                task = self.progress.add(table, self.source.count(table))
                if table == "agent_metadata":
                    batches: Iterator[list[Outcome]] = iter([self.cleaner.clean_identities(
                        self.source.rows(table), existing_agents=existing.agents or ())])
                else:
                    batches = (self.cleaner.clean_many(table, rows)
                               for rows in self.source.batches(table, None, self.batch_size))
                for outs in batches:
                    for o in outs:
                        count_outcome(rep, o)
                    self.progress.advance(task, len(outs), rep.source_rows, time.perf_counter() - t0)
            rep.notes = self.cleaner.notes - notes_before
            rep.seconds = time.perf_counter() - t0

    async def _existing_keys_read_only(self) -> Context:
        conn = await self._connect()
        try:
            await conn.execute("SET default_transaction_read_only = on")
            if not await conn.fetchval("SELECT to_regclass('core.identities') IS NOT NULL"):
                return Context(agents=set(), discoveries=set(), dialectic_sessions=set())
            return Context(
                agents={r[0] for r in await conn.fetch("SELECT agent_id FROM core.identities")},
                discoveries={r[0] for r in await conn.fetch("SELECT id FROM core.discoveries")},
                dialectic_sessions={r[0] for r in await conn.fetch("SELECT session_id FROM core.dialectic_sessions")})
        finally:
            await conn.close()

    # -- the real run ----------------------------------------------------------

    async def backfill(self, *, resume: bool, restart: bool) -> BackfillReport:
        started = time.perf_counter()
        await self._prepare_schema()
        self.conn = conn = await self._connect()
        streams: list[_Stream] = []
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                raise MigrationError("another backfill is running against this database;"
                                     " wait for it to finish (or stop it) and retry")
            began = time.perf_counter()
            built = await restore_indexes(conn, self._connect)
            if built:
                self.report.notes.append(
                    f"built {len(built)} indexes an interrupted backfill had deferred ({', '.join(built)})"
                    f" in {time.perf_counter() - began:.1f} s")
            plan = await self._plan(resume=resume, restart=restart)
            await self.workers.start()
            streams = [_Stream(self, tables, i) for i, tables in enumerate(_streams(self.tables))]
            with self.progress:
                await run_all([s.load(plan) for s in streams])
            await conn.execute("SELECT core.sync_identity_sequences()")
            if set(self.tables) & {"agent_metadata", "discoveries", "discovery_tags", "discovery_edges",
                                   "dialectic_sessions", "dialectic_messages"}:
                self.report.notes.append("the backfill writes the relational tables only: build the AGE graph"
                                         " from the source with `govdb migrate graph` before reading lineage or"
                                         " links from PostgreSQL with AGE on")
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise StoreUnavailableError(f"lost PostgreSQL at {self.url.masked} ({type(exc).__name__}: {exc});"
                                        " rerun with --resume") from exc
        finally:
            for stream in streams:
                await stream.close()
            await self.workers.close()
            self.pool.shutdown(wait=True)
            if not conn.is_closed():
                await conn.close()
        self.report.tables.sort(key=lambda rep: ORDER.index(rep.table))
        self.report.seconds = time.perf_counter() - started
        return self.report

    async def _connect(self) -> asyncpg.Connection:
        try:
            # synchronous_commit off: a server crash may undo the last few batches, data and
            # checkpoint together (one transaction), so a resume redoes them; nothing is lost.
            return await asyncpg.connect(self.url.reveal(), server_settings={
                "application_name": "govdb-backfill", "TimeZone": "UTC", "synchronous_commit": "off"})
        except asyncpg.InvalidCatalogNameError as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.url.masked} has no such database; create it first") \
                from exc
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {self.url.masked} ({type(exc).__name__}: {first_line(exc)})") from exc

    async def _prepare_schema(self) -> None:
        from ..backends.postgres import PostgresDatabase
        db = PostgresDatabase.from_settings(self.settings)
        # Its warnings (e.g. the AGE graph lagging the tables) go into the report, not stderr.
        with _captured_warnings("govdb.backends.postgres") as warnings:
            await db.connect()  # schema.sql + partitions.sql (+ AGE graph) when missing
            await db.close()
        self.report.notes.extend(warnings)
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY + 1)
                await conn.execute(resources.files("govdb").joinpath("sql", "migrate.sql").read_text("utf-8"))
        finally:
            await conn.close()

    async def _plan(self, *, resume: bool, restart: bool) -> dict[str, Any]:
        """Check the checkpoints against the flags; return this source's checkpoint per table to resume."""
        conn = self.conn
        assert conn is not None
        if restart:
            await conn.execute("DELETE FROM migrate.checkpoints WHERE source_table = ANY($1::text[])", self.tables)
        rows = await conn.fetch("SELECT * FROM migrate.checkpoints ORDER BY updated_at")
        mine = {r["source_table"]: r for r in rows if r["source"] == self.fingerprint}
        others = [r for r in rows if r["source"] != self.fingerprint and not r["done"]
                  and r["source_table"] in self.tables]
        if resume:
            if not any(t in mine for t in self.tables) and others:
                raise MigrationError("cannot resume; checkpoint belongs to another source file (use --restart);"
                                     f" that file: {others[0]['source_path']}")
            if not any(t in mine for t in self.tables):
                self.report.notes.append("--resume: no checkpoint of this source; started from the beginning")
        elif not restart:
            unfinished = [mine[t] for t in self.tables if t in mine and not mine[t]["done"]]
            if unfinished:
                r = unfinished[0]
                raise MigrationError(
                    f"a backfill of this source stopped in table {r['source_table']} after {r['rows_read']:,} rows;"
                    " use --resume to continue it or --restart to start over")
            if others:
                raise MigrationError(
                    f"an unfinished backfill of another source file ({others[0]['source_path']}) is recorded;"
                    " finish it (--resume with that file) or use --restart to discard its checkpoints")
        for table in self.tables:
            for parent in PARENTS.get(table, ()):
                if parent not in self.tables and not (parent in mine and mine[parent]["done"]):
                    unit = next(u for u, ts in UNITS.items() if parent in ts)
                    raise MigrationError(f"{table} needs {parent}, which has not been backfilled from this source;"
                                         f" add {unit} to --tables")
        return mine if resume else {}


class _Stream:
    """Tables loaded one after another on a connection of their own; the streams of a run
    load at the same time (see :func:`_streams`), their batches cleaned by the worker processes."""

    def __init__(self, run: _Run, tables: list[str], priority: int = 0):
        self.run = run
        self.tables = tables
        self.priority = priority
        self.fingerprint = run.fingerprint
        self.batch_size = run.batch_size
        self.cleaner = Cleaner(source_tz=run.tz)
        self.source: LegacySource | None = None
        self.conn: asyncpg.Connection | None = None
        # Source reads of this stream that stay in this process (tables read in one snapshot,
        # rows to quarantine).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"govdb-backfill-{tables[0]}")

    async def load(self, plan: dict[str, Any]) -> None:
        self.source = LegacySource(self.run.source.path)
        self.conn = await self.run._connect()
        for table in self.tables:
            await self._table(table, plan.get(table))

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 10)
            except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError):
                conn.terminate()
        self.pool.shutdown(wait=True)
        if self.source is not None:
            self.source.close()

    async def _table(self, table: str, checkpoint: Any) -> None:
        conn, source = self.conn, self.source
        assert conn is not None and source is not None
        target = TARGETS[table]
        rep = TableReport(table, target.table)
        self.run.report.tables.append(rep)
        t = _Table(table, rep)
        if checkpoint is not None and checkpoint["done"]:
            from_checkpoint(rep, checkpoint)
            rep.status = "done earlier"
            return
        if checkpoint is not None:
            from_checkpoint(rep, checkpoint)
            t.after = None if checkpoint["last_key"] is None else decode_key(checkpoint["last_key"])
        else:
            await conn.execute(
                "INSERT INTO migrate.checkpoints AS c (source, source_table, source_path) VALUES ($1, $2, $3)"
                " ON CONFLICT (source, source_table) DO UPDATE SET source_path = EXCLUDED.source_path,"
                " last_key = NULL, rows_read = 0, rows_migrated = 0, rows_quarantined = 0, rows_repaired = 0,"
                " rows_inserted = 0, rows_updated = 0, done = false, started_at = now(), updated_at = now()",
                self.fingerprint, table, str(source.path))
        t.had_quarantine, t.had_repairs = await conn.fetchrow(
            "SELECT EXISTS (SELECT 1 FROM migrate.quarantine WHERE source = $1 AND source_table = $2),"
            " EXISTS (SELECT 1 FROM migrate.repairs WHERE source = $1 AND source_table = $2)",
            self.fingerprint, table)
        t.stage = quote_ident(f"govdb_stage_{table}")
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{t.stage}")
        started = time.perf_counter()
        elapsed_before = rep.seconds
        if table in _UPSERT:  # rows a live server changes in place: one snapshot, read here
            await self._load_context(table)
            jobs: list[dict[str, Any]] = []
            batches = await self._snapshot_batches(t)
            todo = sum(b.read for b in batches)
        else:
            jobs, todo = await self._jobs(t)
            batches = []
        deferred: list[str] = []
        if table in DEFERRABLE and todo >= MIN_DEFER_ROWS and await holds_few(conn, target.table, todo):
            deferred = await defer_indexes(conn, DEFERRABLE[table])
        task = self.run.progress.add(table, rep.source_rows + todo, done=rep.source_rows)
        done_here = 0

        async def write(b: Batch) -> None:
            nonlocal done_here
            await self._write_batch(t, b)
            rep.seconds = elapsed_before + time.perf_counter() - started
            done_here += b.read
            self.run.progress.advance(task, b.read, done_here, time.perf_counter() - started)

        for b in batches:
            await write(b)
        # Batches are cleaned ahead by the workers and written in key order (checkpoints follow it).
        ahead: deque[asyncio.Future[Any]] = deque()
        jobs.reverse()
        try:
            while jobs or ahead:
                while jobs and len(ahead) < self.run.workers.size + 1:
                    ahead.append(asyncio.ensure_future(self.run.workers.run(jobs.pop(), self.priority)))
                await write(await ahead.popleft())
        finally:
            for f in ahead:
                f.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
        if deferred:
            began = time.perf_counter()
            built = await restore_indexes(conn, self.run._connect, DEFERRABLE[table])
            self.run.report.notes.append(
                f"{table}: {len(deferred)} secondary indexes were dropped for the load and built afterwards in"
                f" {time.perf_counter() - began:.1f} s ({', '.join(f'{n} {s:.1f} s' for n, s in built.items())})")
        await conn.execute(
            "UPDATE migrate.checkpoints SET done = true, updated_at = now() WHERE source = $1 AND source_table = $2",
            self.fingerprint, table)
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{t.stage}")
        if table in SEQUENCED:
            await self._move_sequence(table)
        rep.seconds = elapsed_before + time.perf_counter() - started

    async def _jobs(self, t: _Table) -> tuple[list[dict[str, Any]], int]:
        """Return the worker jobs that read and clean the table's rows after the checkpoint, and how many rows."""
        table = t.name
        base = {"path": str(self.run.source.path), "tz": self.run.tz, "table": table,
                "key_texts": t.had_quarantine or t.had_repairs}
        if table in ("audit_events", "tool_usage"):
            context = await self.run.workers.run({**base, "op": "prescan"}, self.priority)
        else:
            await self._load_context(table)
            context = self.cleaner.context
        ends, todo = await self.run.workers.run({**base, "op": "bounds", "after": t.after, "size": self.batch_size},
                                                self.priority)
        base["context"] = context
        jobs = []
        lo = t.after
        if t.after is None:  # a run from the start: first the rows whose key is not text (to quarantine)
            assert self.source is not None
            odd = await asyncio.get_running_loop().run_in_executor(self.pool, self.source.odd_count, table)
            if odd:
                jobs.append({**base, "op": "odd"})
                todo += odd
            lo = ()
        for hi in ends:
            jobs.append({**base, "op": "clean", "lo": lo, "hi": hi})
            lo = hi
        return jobs, todo

    async def _snapshot_batches(self, t: _Table) -> list[Batch]:
        """Read and clean the table here, in one snapshot of the source (identities as a
        whole: parents and lineage cycles need every row)."""
        def clean() -> list[Batch]:
            source, cleaner, table = self.source, self.cleaner, t.name
            assert source is not None
            chunks: list[tuple[list[Outcome], tuple[Any, ...]]] = []
            with source.snapshot():
                if table == "agent_metadata":
                    outs = cleaner.clean_identities(source.rows(table), existing_agents=cleaner.context.agents or ())
                    if t.after is not None:
                        outs = [o for o in outs if tuple(o.order) > tuple(t.after)]
                    for i in range(0, len(outs), self.batch_size):
                        chunk = outs[i:i + self.batch_size]
                        chunks.append((chunk, tuple(chunk[-1].order)))
                else:
                    for rows in source.batches(table, t.after, self.batch_size):
                        chunk = cleaner.clean_many(table, rows)
                        last = chunk[-1].key
                        chunks.append((chunk, () if any(k is None or not isinstance(k, (str, int)) for k in last)
                                       else last))
            notes, cleaner.notes = cleaner.notes, Counter()
            out = [pack(table, chunk, last, t.had_quarantine or t.had_repairs) for chunk, last in chunks]
            if out:
                out[0].notes = notes
            return out
        return await asyncio.get_running_loop().run_in_executor(self.pool, clean)

    async def _move_sequence(self, table: str) -> None:
        assert self.conn is not None and self.source is not None
        source = self.source
        top = await asyncio.get_running_loop().run_in_executor(self.pool, source.max_id, table)
        await move_sequence(self.conn, table, top)

    async def _load_context(self, table: str) -> None:
        """Point the cleaner at the parent keys PostgreSQL holds now (parents load first)."""
        conn = self.conn
        assert conn is not None
        ctx = self.cleaner.context
        ctx.agents = {r[0] for r in await conn.fetch("SELECT agent_id FROM core.identities")}
        ctx.discoveries = {r[0] for r in await conn.fetch("SELECT id FROM core.discoveries")}
        ctx.dialectic_sessions = {r[0] for r in await conn.fetch("SELECT session_id FROM core.dialectic_sessions")}
        ctx.quarantined = {}
        for source_table, kind in _KINDS.items():
            keys = await conn.fetch("SELECT key FROM migrate.quarantine WHERE source = $1 AND source_table = $2",
                                    self.fingerprint, source_table)
            ctx.quarantined[kind] = {decode_key(r[0])[0] for r in keys if r[0].startswith('["')}

    def _raw_texts(self, table: str, keys: list[tuple[Any, ...]]) -> list[str]:
        """Return the source rows of ``keys`` as quarantine text (runs on the source thread)."""
        assert self.source is not None
        return [raw_text(row) if (row := self.source.row(table, key)) is not None else "{}" for key in keys]

    # -- writing one batch -------------------------------------------------------

    async def _write_batch(self, t: _Table, b: Batch) -> None:
        """Write one batch, its bookkeeping and its checkpoint in one transaction; a batch that
        lost a lock conflict with live writers (dual-write: deadlock, serialization failure)
        is rolled back whole and written again."""
        await self._ensure_partitions(t.name, b.months)
        for attempt in itertools.count(1):
            try:
                done = await self._write_batch_once(t, b)
                break
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt >= _LOCK_CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(0.05 * attempt)
        rep = t.report  # counted once the batch is committed
        rep.source_rows, rep.migrated, rep.quarantined, rep.repaired, rep.inserted, rep.updated = done
        rep.notes.update(b.notes)

    async def _write_batch_once(self, t: _Table, b: Batch) -> tuple[int, int, int, int, int, int]:
        conn = self.conn
        assert conn is not None
        rep = t.report
        async with conn.transaction():
            inserted, updated, refused = await self._merge_safe(t, _Rows(b.keys, b.payload, b.hashes))
            quarantined, landed = await self._orphans_landed(t, list(b.quarantined))
            gone: set[tuple[Any, ...]] = set()
            if refused:
                raws = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self._raw_texts, t.name, [k for k, _ in refused])
                for (key, reason), raw in zip(refused, raws):
                    kind = "refused" if reason.startswith("PostgreSQL refused") else "duplicate"
                    quarantined.append((encode_key(key), kind, reason, raw))
                    gone.add(key)
            migrated = len(b.keys) - len(gone) + landed
            repaired = [r for r in b.repaired if r[0] not in gone]
            if migrated and b.key_texts is not None:
                texts = [kt for k, kt in zip(b.keys, b.key_texts) if k not in gone]
                for flag, bookkeeping in ((t.had_quarantine, "quarantine"), (t.had_repairs, "repairs")):
                    if flag:
                        await conn.execute(
                            f"DELETE FROM migrate.{bookkeeping} WHERE source = $1 AND source_table = $2"
                            " AND key_md5 IN (SELECT md5(k) FROM unnest($3::text[]) AS k)",
                            self.fingerprint, t.name, texts)
            if quarantined:
                await conn.execute(
                    "INSERT INTO migrate.quarantine (source, source_table, key, kind, reason, raw_row)"
                    " SELECT $1, $2, k, kd, r, raw FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])"
                    "   AS u(k, kd, r, raw)"
                    " ON CONFLICT (source, source_table, key_md5) DO UPDATE SET key = EXCLUDED.key,"
                    "   kind = EXCLUDED.kind, reason = EXCLUDED.reason, raw_row = EXCLUDED.raw_row,"
                    "   quarantined_at = now()",
                    self.fingerprint, t.name, *map(list, zip(*quarantined)))
            if repaired:
                await conn.execute(
                    "INSERT INTO migrate.repairs (source, source_table, key, column_name, kind, problem, original,"
                    " original_encoding)"
                    " SELECT $1, $2, k, c, kd, p, o, e FROM unnest($3::text[], $4::text[], $5::text[], $6::text[],"
                    "   $7::text[], $8::text[]) AS u(k, c, kd, p, o, e)"
                    " ON CONFLICT (source, source_table, key_md5, column_name) DO UPDATE SET key = EXCLUDED.key,"
                    "   kind = EXCLUDED.kind, problem = EXCLUDED.problem, original = EXCLUDED.original,"
                    "   original_encoding = EXCLUDED.original_encoding, repaired_at = now()",
                    self.fingerprint, t.name, *_repair_rows(repaired))
            done = (rep.source_rows + b.read, rep.migrated + migrated, rep.quarantined + len(quarantined),
                    rep.repaired + len(repaired), rep.inserted + inserted, rep.updated + updated)
            await conn.execute(
                "UPDATE migrate.checkpoints SET last_key = $3, rows_read = $4, rows_migrated = $5,"
                " rows_quarantined = $6, rows_repaired = $7, rows_inserted = $8, rows_updated = $9, updated_at = now()"
                " WHERE source = $1 AND source_table = $2",
                self.fingerprint, t.name, encode_key(b.last_key), *done)
        for q in quarantined:
            rep.problems[f"quarantined: {q[1]}"] += 1
        for _, _, repairs in repaired:
            for r in repairs:
                rep.problems[f"{r[0]}: {r[1]}"] += 1
        return done

    async def _orphans_landed(self, t: _Table, quarantined: list[tuple[str, str, str, str]]
                              ) -> tuple[list[tuple[str, str, str, str]], int]:
        """Return the batch's quarantined rows without the orphans that a live dual-write is
        bringing to PostgreSQL, and how many those were.

        A row whose parent a dual-write created after this table's parents were read is an
        orphan to the cleaner, but the dual-write brings parent and row: the row (or its
        parent) still has a record in the file's outbox, or PostgreSQL holds the row already
        (a record is deleted only after it landed, so the outbox is asked first). Such a row
        is migrated, not quarantined. Orphans are rare: a few queries each.
        """
        conn = self.conn
        assert conn is not None
        orphans = [q for q in quarantined if q[1] == "orphan"]
        if not orphans:
            return quarantined, 0
        pairs = {q[0]: [(t.name, outbox_key(decode_key(q[0]))), *_parent_keys(t.name, q[3])] for q in orphans}
        pending = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._pending_writes, [p for ps in pairs.values() for p in ps])
        target = TARGETS[t.name]
        where = " AND ".join(f"{quote_ident(c)} = ${i}" for i, c in enumerate(target.key, 1))
        kind = int if t.name in INTEGER_KEYED else str
        landed: set[str] = set()
        for q in orphans:
            if any(p in pending for p in pairs[q[0]]):
                landed.add(q[0])
                continue
            key = decode_key(q[0])
            if len(key) == len(target.key) and all(type(v) is kind for v in key) and await conn.fetchval(
                    f"SELECT EXISTS (SELECT 1 FROM {quote_qualified(target.table)} WHERE {where})", *key):
                landed.add(q[0])
        if landed:  # and a record of it from an earlier run is no longer true
            await conn.execute(
                "DELETE FROM migrate.quarantine WHERE source = $1 AND source_table = $2"
                " AND key_md5 IN (SELECT md5(k) FROM unnest($3::text[]) AS k)", self.fingerprint, t.name,
                sorted(landed))
        return [q for q in quarantined if q[0] not in landed], len(landed)

    def _pending_writes(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        assert self.source is not None
        return self.source.pending_writes(pairs)

    async def _merge_safe(self, t: _Table, rows: _Rows) -> tuple[int, int, list[tuple[tuple[Any, ...], str]]]:
        """Merge ``rows``; a row PostgreSQL refuses is isolated by halving and comes back with the reason."""
        if not rows.keys:
            return 0, 0, []
        conn = self.conn
        assert conn is not None
        try:
            async with conn.transaction():  # a savepoint
                return await self._merge(t, rows)
        except asyncpg.PostgresError as exc:
            if (exc.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                raise
            if len(rows.keys) == 1:
                return 0, 0, [(rows.keys[0], f"PostgreSQL refused the row (SQLSTATE {exc.sqlstate}:"
                                             f" {first_line(exc)})")]
            first, second = rows.halves()
            a = await self._merge_safe(t, first)
            b = await self._merge_safe(t, second)
            return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    async def _merge(self, t: _Table, rows: _Rows) -> tuple[int, int, list[tuple[tuple[Any, ...], str]]]:
        conn = self.conn
        assert conn is not None
        table, target = t.name, TARGETS[t.name]
        if t.direct:
            try:
                async with conn.transaction():  # a savepoint
                    if table == "audit_events":
                        await copy_text(conn, "audit.event_hashes", ("raw_hash", "event_id", "ts"), rows.hashes)
                    await copy_text(conn, target.table, target.columns, rows.payload)
                return len(rows.keys), 0, []
            except asyncpg.PostgresError as exc:
                # A row PostgreSQL holds already (or refuses): this batch takes the merge below.
                if (exc.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                    raise
                t.direct_failures += 1
                t.direct = t.direct_failures < _MAX_DIRECT_FAILURES
        # Made here, in the batch's transaction, so a rollback cannot leave it half there.
        await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {t.stage} AS SELECT"
                           f" {', '.join(quote_ident(c) for c in target.columns)}"
                           f" FROM {quote_qualified(target.table)} WITH NO DATA")
        await copy_text(conn, t.stage.strip('"'), target.columns, rows.payload)
        cols = ", ".join(quote_ident(c) for c in target.columns)
        into = quote_qualified(target.table)
        refused: list[tuple[tuple[Any, ...], str]] = []
        updated = 0
        if table in _UPSERT:
            key, newer = _UPSERT[table]
            rest = [c for c in target.columns if c != key]
            row = await conn.fetchrow(
                f"WITH up AS (INSERT INTO {into} AS t ({cols}) SELECT {cols} FROM {t.stage}"
                f" ON CONFLICT ({quote_ident(key)}) DO UPDATE SET ({', '.join(map(quote_ident, rest))})"
                f" = ROW({', '.join('EXCLUDED.' + quote_ident(c) for c in rest)}) WHERE {newer}"
                " RETURNING (xmax = 0) AS fresh)"
                " SELECT count(*) FILTER (WHERE fresh) AS inserted, count(*) FILTER (WHERE NOT fresh) AS updated FROM up")
            inserted, updated = row["inserted"], row["updated"]
        elif table == "audit_events":
            inserted = await conn.fetchval(
                "WITH h AS (INSERT INTO audit.event_hashes (raw_hash, event_id, ts)"
                f"  SELECT raw_hash, event_id, ts FROM {t.stage} ORDER BY id"
                "  ON CONFLICT DO NOTHING RETURNING raw_hash, event_id),"
                f" e AS (INSERT INTO audit.events ({cols}) SELECT {', '.join('s.' + quote_ident(c) for c in target.columns)}"
                f"  FROM {t.stage} s JOIN h USING (raw_hash, event_id) ON CONFLICT DO NOTHING RETURNING 1)"
                " SELECT count(*) FROM e")
            if inserted < len(rows.keys):
                for r in await conn.fetch(
                        f"SELECT s.id, s.event_id, h.event_id AS same_hash FROM {t.stage} s"
                        " LEFT JOIN audit.event_hashes h ON h.raw_hash = s.raw_hash"
                        " WHERE h.event_id IS DISTINCT FROM s.event_id"):
                    refused.append(((r["id"],), f"same content (raw_hash) as audit event {r['same_hash']} already in"
                                    " PostgreSQL" if r["same_hash"] else
                                    f"event_id {r['event_id']} is already used in PostgreSQL by an event with"
                                    " other content"))
        elif table in _SAME_ROW:
            conflict = "ON CONFLICT (id) DO NOTHING" if table != "tool_usage" else "ON CONFLICT DO NOTHING"
            inserted = await conn.fetchval(
                f"WITH i AS (INSERT INTO {into} ({cols}) SELECT {cols} FROM {t.stage} {conflict} RETURNING 1)"
                " SELECT count(*) FROM i")
            if inserted < len(rows.keys):
                same = _SAME_ROW[table]
                key = "usage_id" if table == "tool_usage" else "id"
                # A row written by dual-write has the same content; tool usage it
                # wrote has no legacy id, one from another source row has another.
                other_id = " OR t.id <> s.id" if table == "tool_usage" else ""
                for r in await conn.fetch(
                        f"SELECT s.id, s.{key} AS k FROM {t.stage} s JOIN {into} t USING ({key})"
                        f" WHERE ({', '.join('t.' + c for c in same)}) IS DISTINCT FROM"
                        f" ({', '.join('s.' + c for c in same)}){other_id}"):
                    refused.append(((r["id"],), f"{key} {r['k']} is already used in PostgreSQL by another row"))
        else:  # discovery_tags, discovery_edges: the key is the whole identity
            inserted = await conn.fetchval(
                f"WITH i AS (INSERT INTO {into} ({cols}) SELECT {cols} FROM {t.stage}"
                " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM i")
        await conn.execute(f"TRUNCATE {t.stage}")
        return inserted, updated, refused

    async def _ensure_partitions(self, table: str, months: list[date]) -> None:
        parent = PARTITIONED.get(table)
        if parent is None or not months:
            return
        today = datetime.now(UTC).date()
        last = date(today.year + (today.month - 1 + _MAX_MONTHS_AHEAD) // 12,
                    (today.month - 1 + _MAX_MONTHS_AHEAD) % 12 + 1, 1)
        todo = sorted(m for m in months if (parent, m) not in self.run.months
                      and date(_FIRST_PARTITION_YEAR, 1, 1) <= m <= last)
        conn = self.conn
        assert conn is not None
        for month in todo:
            await conn.execute("SELECT audit.create_month_partition($1::regclass, $2::date)", parent, month)
            self.run.months.add((parent, month))


@dataclass
class _Rows:
    """Rows to load: their keys and COPY text, halvable to isolate a row PostgreSQL refuses."""

    keys: list[tuple[Any, ...]]
    payload: bytes
    hashes: bytes = b""

    def halves(self) -> tuple["_Rows", "_Rows"]:
        mid = len(self.keys) // 2
        lines = self.payload.split(b"\n")[:-1]
        hashes = self.hashes.split(b"\n")[:-1] if self.hashes else []

        def part(s: slice) -> "_Rows":
            return _Rows(self.keys[s], b"".join(x + b"\n" for x in lines[s]),
                         b"".join(x + b"\n" for x in hashes[s]))
        return part(slice(None, mid)), part(slice(mid, None))

# -- streams ------------------------------------------

def _streams(tables: list[str]) -> list[list[str]]:
    """Split the tables (in load order) into streams that may load at the same time,
    the one that takes longest (audit events) first."""
    rest = [t for t in tables if t not in _OWN_STREAM]
    return [[t] for t in tables if t in _OWN_STREAM] + ([rest] if rest else [])


#: Legacy table -> (column, parent table) of the references its orphan check follows.
_PARENT_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "session_identities": (("agent_id", "agent_metadata"),),
    "agent_state": (("agent_id", "agent_metadata"),),
    "discoveries": (("agent_id", "agent_metadata"),),
    "discovery_tags": (("discovery_id", "discoveries"),),
    "discovery_edges": (("src_id", "discoveries"), ("dst_id", "discoveries")),
    "dialectic_sessions": (("paused_agent_id", "agent_metadata"), ("reviewer_agent_id", "agent_metadata"),
                           ("discovery_id", "discoveries")),
    "dialectic_messages": (("session_id", "dialectic_sessions"), ("agent_id", "agent_metadata")),
}


def _parent_keys(table: str, raw_row: str) -> list[tuple[str, str]]:
    """Return the (parent table, key text) pairs an orphan's raw row (quarantine text) points at."""
    try:
        row = json.loads(raw_row)
    except ValueError:
        return []
    out = []
    for column, parent in _PARENT_COLUMNS.get(table, ()):
        value = row.get(column) if isinstance(row, dict) else None
        if isinstance(value, str):
            out.append((parent, outbox_key((value,))))
    return out


def _repair_rows(repaired: list[tuple[Any, str, list[tuple[Any, ...]]]]) -> list[list[Any]]:
    """Return the repairs (key, key text, repairs as (column, kind, problem, original, encoding))
    as columns, one row per (key, column): several repairs of a column are joined."""
    merged: dict[tuple[str, str], list[Any]] = {}
    for _, key, repairs in repaired:
        for column, kind, problem, original, encoding in repairs:
            have = merged.get((key, column))
            if have is None:
                merged[(key, column)] = [key, column, kind, problem, original, encoding]
            elif kind not in have[2].split(","):
                have[2] += "," + kind
                have[3] += "; " + problem
    return [list(col) for col in zip(*merged.values())]


@contextmanager
def _captured_warnings(logger_name: str) -> Iterator[list[str]]:
    logger = logging.getLogger(logger_name)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


