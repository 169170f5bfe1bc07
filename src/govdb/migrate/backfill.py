"""Backfill a legacy governance.db into PostgreSQL's relational tables.

Per table, in dependency order: read a batch from the source (source.py),
clean it (clean.py), COPY it into a staging table without indexes, merge it
with one set-based INSERT ... SELECT ... ON CONFLICT, and write the batch's
quarantined rows, repairs and checkpoint in the same transaction. A kill at
any moment loses at most the batch in flight; ``resume=True`` goes on after
the last committed key, and every merge is idempotent, so there are no
duplicates and no gaps. Cleaning of batch N+1 (a worker thread) overlaps
the merge of batch N.

Rows already in PostgreSQL win when they are newer (live dual-writes):
entity tables are upserted only where the source row is newer, append-only
tables never overwrite. Legacy numeric ids are kept, and the identity
sequences are moved past them at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone, tzinfo
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import asyncpg

from ..config import SecretUrl, Settings, parse_postgres_url
from ..errors import ConfigError, GovdbError, StoreUnavailableError
from . import MigrationError
from .clean import TARGETS, Cleaner, Context, Outcome, build_context, prescan_duplicates
from .source import LegacySource, decode_key, encode_key, quote_ident, quote_qualified

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
_PARTITIONED = {"audit_events": "audit.events", "tool_usage": "audit.tool_usage"}
_KINDS = {"agent_metadata": "agent", "discoveries": "discovery", "dialectic_sessions": "dialectic session"}
#: Month partitions are made for months in this window; rows far in the past
#: or future stay in the DEFAULT partition (audit.partition_maintenance moves them).
_FIRST_PARTITION_YEAR = 2000
_MAX_MONTHS_AHEAD = 12
_LOCK_KEY = 0x676F7664625F6D67  # "govdb_mg": one backfill per database at a time
_ROW_ERROR_CLASSES = ("22", "23", "54")  # data exception, integrity, program limit


@dataclass
class TableReport:
    """What happened to one legacy table."""

    table: str
    target: str
    source_rows: int = 0
    migrated: int = 0
    quarantined: int = 0
    repaired: int = 0
    inserted: int = 0
    updated: int = 0
    seconds: float = 0.0
    status: str = "done"
    problems: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        """Migrated rows PostgreSQL already had (same, or newer there)."""
        return self.migrated - self.inserted - self.updated

    @property
    def reconciled(self) -> bool:
        return self.source_rows == self.migrated + self.quarantined

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BackfillReport:
    source: str
    fingerprint: str
    target: str
    dry_run: bool
    journal_mode: str
    source_timezone: str
    tables: list[TableReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        """True when every table has source = migrated + quarantined."""
        return all(t.reconciled for t in self.tables)

    @property
    def source_rows(self) -> int:
        return sum(t.source_rows for t in self.tables)

    def table(self, name: str) -> TableReport:
        return next(t for t in self.tables if t.table == name)

    def render(self) -> Any:
        """Return the summary as a rich Table."""
        from rich.table import Table
        title = "backfill dry run (nothing written)" if self.dry_run else "backfill"
        table = Table(title=f"{title}: {self.source} -> {self.target}", caption=self._caption())
        cols = ["table", "source", "migrated" if not self.dry_run else "would migrate",
                "quarantined" if not self.dry_run else "would quarantine",
                "repaired" if not self.dry_run else "would repair"]
        cols += ([] if self.dry_run else ["inserted", "updated", "kept"]) + ["rows/s", "reconciled"]
        for c in cols:
            table.add_column(c, justify="left" if c == "table" else "right")
        for t in self.tables:
            row = [f"{t.table}" + ("" if t.status == "done" else f" ({t.status})"), f"{t.source_rows:,}",
                   f"{t.migrated:,}", f"{t.quarantined:,}", f"{t.repaired:,}"]
            if not self.dry_run:
                row += [f"{t.inserted:,}", f"{t.updated:,}", f"{t.kept:,}"]
            row += [f"{t.rows_per_second:,.0f}" if t.seconds else "-",
                    "[green]yes[/green]" if t.reconciled else "[red]NO[/red]"]
            table.add_row(*row)
        return table

    def render_problems(self) -> Any:
        """Return the problems found (repairs and quarantine reasons by kind) as a rich Table."""
        from rich.table import Table
        table = Table("table", "problem", "rows", title="problems found")
        for t in self.tables:
            for problem, n in sorted(t.problems.items()):
                table.add_row(t.table, problem, f"{n:,}")
            for note, n in sorted(t.notes.items()):
                table.add_row(t.table, f"note: {note}", f"{n:,}")
        return table

    def _caption(self) -> str:
        rate = self.source_rows / self.seconds if self.seconds else 0
        return (f"{self.source_rows:,} rows in {self.seconds:.1f} s ({rate:,.0f} rows/s);"
                f" naive timestamps read in {self.source_timezone}; source journal_mode={self.journal_mode}")


# -- entry point -------------------------------------------------------------------

async def backfill(
    settings_or_url: Settings | SecretUrl | str, sqlite_path: Path | str, *,
    tables: Sequence[str] | str | None = None, dry_run: bool = False, resume: bool = False,
    restart: bool = False, source_tz: tzinfo | str = UTC, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> BackfillReport:
    """Copy the legacy SQLite file into PostgreSQL; return per-table counts.

    ``tables``: names of :data:`UNITS` (or legacy table names); None = all.
    ``dry_run``: read and clean everything, write nothing. ``resume``: go on
    from the checkpoints; ``restart``: discard them first. Without either, a
    run refuses when an unfinished backfill is recorded. Raises
    :class:`~govdb.errors.GovdbError` subclasses with messages naming the fix.
    """
    settings = _settings(settings_or_url)
    selected = select_tables(tables)
    tz = parse_timezone(source_tz)
    if resume and restart:
        raise MigrationError("use --resume or --restart, not both")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive whole number; got {batch_size!r}")
    source = LegacySource(sqlite_path)
    try:
        run = _Run(settings, source, selected, tz, batch_size, progress)
        if dry_run:
            return await run.dry_run()
        return await run.backfill(resume=resume, restart=restart)
    finally:
        source.close()


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


class _Run:
    def __init__(self, settings: Settings, source: LegacySource, tables: list[str], tz: tzinfo,
                 batch_size: int, progress: bool):
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
        self.progress = _Progress(progress)
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
                        _count(rep, o)
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
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                raise MigrationError("another backfill is running against this database;"
                                     " wait for it to finish (or stop it) and retry")
            plan = await self._plan(resume=resume, restart=restart)
            with self.progress:
                for table in self.tables:
                    await self._table(table, plan.get(table))
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
            self.pool.shutdown(wait=True)
            if not conn.is_closed():
                await conn.close()
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
                f"cannot connect to PostgreSQL at {self.url.masked} ({type(exc).__name__}: {_first_line(exc)})") from exc

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

    async def _table(self, table: str, checkpoint: Any) -> None:
        conn = self.conn
        assert conn is not None
        target = TARGETS[table]
        rep = TableReport(table, target.table)
        self.report.tables.append(rep)
        t = _Table(table, rep)
        if checkpoint is not None and checkpoint["done"]:
            _from_checkpoint(rep, checkpoint)
            rep.status = "done earlier"
            return
        if checkpoint is not None:
            _from_checkpoint(rep, checkpoint)
            t.after = None if checkpoint["last_key"] is None else decode_key(checkpoint["last_key"])
        else:
            await conn.execute(
                "INSERT INTO migrate.checkpoints AS c (source, source_table, source_path) VALUES ($1, $2, $3)"
                " ON CONFLICT (source, source_table) DO UPDATE SET source_path = EXCLUDED.source_path,"
                " last_key = NULL, rows_read = 0, rows_migrated = 0, rows_quarantined = 0, rows_repaired = 0,"
                " rows_inserted = 0, rows_updated = 0, done = false, started_at = now(), updated_at = now()",
                self.fingerprint, table, str(self.source.path))
        t.had_quarantine, t.had_repairs = await conn.fetchrow(
            "SELECT EXISTS (SELECT 1 FROM migrate.quarantine WHERE source = $1 AND source_table = $2),"
            " EXISTS (SELECT 1 FROM migrate.repairs WHERE source = $1 AND source_table = $2)",
            self.fingerprint, table)
        await self._load_context(table)
        t.stage = quote_ident(f"govdb_stage_{table}")
        cols = ", ".join(quote_ident(c) for c in target.columns)
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{t.stage}")
        await conn.execute(f"CREATE TEMP TABLE {t.stage} AS SELECT {cols} FROM {quote_qualified(target.table)}"
                           " WITH NO DATA")
        notes_before = self.cleaner.notes.copy()
        started = time.perf_counter()
        elapsed_before = rep.seconds
        loop = asyncio.get_running_loop()
        batches = self._batches(t)
        task = None
        done_here = 0
        try:
            pending = loop.run_in_executor(self.pool, next, batches, None)
            while True:
                item = await pending
                if item is None:
                    break
                if item[0] == "total":
                    task = self.progress.add(table, rep.source_rows + item[1], done=rep.source_rows)
                    pending = loop.run_in_executor(self.pool, next, batches, None)
                    continue
                _, outs, last_key = item
                pending = loop.run_in_executor(self.pool, next, batches, None)  # clean N+1 while N merges
                await self._write_batch(t, outs, last_key)
                rep.seconds = elapsed_before + time.perf_counter() - started
                done_here += len(outs)
                self.progress.advance(task, len(outs), done_here, time.perf_counter() - started)
        finally:
            await loop.run_in_executor(self.pool, batches.close)
        await conn.execute(
            "UPDATE migrate.checkpoints SET done = true, updated_at = now() WHERE source = $1 AND source_table = $2",
            self.fingerprint, table)
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{t.stage}")
        if table in ("agent_state", "dialectic_messages"):
            await self._move_sequence(table)
        rep.notes = self.cleaner.notes - notes_before
        rep.seconds = elapsed_before + time.perf_counter() - started

    async def _move_sequence(self, table: str) -> None:
        """Move the id sequence past every id the source ever gave (quarantined rows
        too, and AUTOINCREMENT's high-water mark), so no new id repeats a legacy one."""
        conn = self.conn
        assert conn is not None
        top = await asyncio.get_running_loop().run_in_executor(self.pool, self.source.max_id, table)
        if top > 0:
            await conn.execute(
                "SELECT setval(s, $1, true) FROM (SELECT pg_get_serial_sequence($2, 'id')::regclass AS s) AS x"
                " WHERE $1 > coalesce(pg_sequence_last_value(s), 0)", top, TARGETS[table].table)
        await conn.execute("SELECT core.sync_identity_sequences()")

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

    def _batches(self, t: _Table) -> Iterator[tuple[Any, ...]]:
        """Yield ("total", n) once, then ("batch", outcomes, last_key); runs on the source thread."""
        table, source, cleaner = t.name, self.source, self.cleaner
        with source.snapshot():
            if table == "agent_metadata":
                outs = cleaner.clean_identities(source.rows(table), existing_agents=cleaner.context.agents or ())
                if t.after is not None:
                    after = tuple(t.after)
                    outs = [o for o in outs if tuple(o.order) > after]
                yield ("total", len(outs))
                for i in range(0, len(outs), self.batch_size):
                    chunk = outs[i:i + self.batch_size]
                    yield ("batch", chunk, tuple(chunk[-1].order))
                return
            yield ("total", source.count(table, t.after))
            if table in ("audit_events", "tool_usage"):
                prescan_duplicates(source, cleaner, (table,))
            for rows in source.batches(table, t.after, self.batch_size):
                outs = cleaner.clean_many(table, rows)
                last = outs[-1].key
                yield ("batch", outs, () if any(k is None or not isinstance(k, (str, int)) for k in last) else last)

    # -- writing one batch -------------------------------------------------------

    async def _write_batch(self, t: _Table, outs: list[Outcome], last_key: tuple[Any, ...]) -> None:
        conn = self.conn
        assert conn is not None
        rep = t.report
        ok = [o for o in outs if o.ok]
        await self._ensure_partitions(t.name, ok)
        async with conn.transaction():
            inserted, updated, refused = await self._merge_safe(t, ok)
            for o, reason in refused:
                o.quarantine(reason, "refused" if reason.startswith("PostgreSQL refused") else "duplicate")
            quarantined = [o for o in outs if not o.ok]
            migrated = [o for o in outs if o.ok]
            repaired = [o for o in migrated if o.repairs]
            if t.had_quarantine and migrated:
                await conn.execute(
                    "DELETE FROM migrate.quarantine WHERE source = $1 AND source_table = $2"
                    " AND key_md5 IN (SELECT md5(k) FROM unnest($3::text[]) AS k)",
                    self.fingerprint, t.name, [o.key_text for o in migrated])
            if t.had_repairs and migrated:
                await conn.execute(
                    "DELETE FROM migrate.repairs WHERE source = $1 AND source_table = $2"
                    " AND key_md5 IN (SELECT md5(k) FROM unnest($3::text[]) AS k)",
                    self.fingerprint, t.name, [o.key_text for o in migrated])
            if quarantined:
                await conn.execute(
                    "INSERT INTO migrate.quarantine (source, source_table, key, kind, reason, raw_row)"
                    " SELECT $1, $2, k, kd, r, raw FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])"
                    "   AS u(k, kd, r, raw)"
                    " ON CONFLICT (source, source_table, key_md5) DO UPDATE SET key = EXCLUDED.key,"
                    "   kind = EXCLUDED.kind, reason = EXCLUDED.reason, raw_row = EXCLUDED.raw_row,"
                    "   quarantined_at = now()",
                    self.fingerprint, t.name, [o.key_text for o in quarantined], [o.kind or "" for o in quarantined],
                    [o.reason for o in quarantined], [o.raw_text() for o in quarantined])
            if repaired:
                cols = _repair_rows(repaired)
                await conn.execute(
                    "INSERT INTO migrate.repairs (source, source_table, key, column_name, kind, problem, original,"
                    " original_encoding)"
                    " SELECT $1, $2, k, c, kd, p, o, e FROM unnest($3::text[], $4::text[], $5::text[], $6::text[],"
                    "   $7::text[], $8::text[]) AS u(k, c, kd, p, o, e)"
                    " ON CONFLICT (source, source_table, key_md5, column_name) DO UPDATE SET key = EXCLUDED.key,"
                    "   kind = EXCLUDED.kind, problem = EXCLUDED.problem, original = EXCLUDED.original,"
                    "   original_encoding = EXCLUDED.original_encoding, repaired_at = now()",
                    self.fingerprint, t.name, *cols)
            rep.source_rows += len(outs)
            rep.migrated += len(migrated)
            rep.quarantined += len(quarantined)
            rep.repaired += len(repaired)
            rep.inserted += inserted
            rep.updated += updated
            for o in quarantined:
                rep.problems[f"quarantined: {o.kind}"] += 1
            for o in repaired:
                for r in o.repairs:
                    rep.problems[f"{r.column}: {r.kind}"] += 1
            await conn.execute(
                "UPDATE migrate.checkpoints SET last_key = $3, rows_read = $4, rows_migrated = $5,"
                " rows_quarantined = $6, rows_repaired = $7, rows_inserted = $8, rows_updated = $9, updated_at = now()"
                " WHERE source = $1 AND source_table = $2",
                self.fingerprint, t.name, encode_key(last_key), rep.source_rows, rep.migrated, rep.quarantined,
                rep.repaired, rep.inserted, rep.updated)

    async def _merge_safe(self, t: _Table, outs: list[Outcome]) -> tuple[int, int, list[tuple[Outcome, str]]]:
        """Merge ``outs``; a row PostgreSQL refuses is isolated by halving and comes back with the reason."""
        if not outs:
            return 0, 0, []
        conn = self.conn
        assert conn is not None
        try:
            async with conn.transaction():  # a savepoint
                return await self._merge(t, outs)
        except asyncpg.PostgresError as exc:
            if (exc.sqlstate or "")[:2] not in _ROW_ERROR_CLASSES:
                raise
            if len(outs) == 1:
                return 0, 0, [(outs[0], f"PostgreSQL refused the row (SQLSTATE {exc.sqlstate}: {_first_line(exc)})")]
            mid = len(outs) // 2
            a = await self._merge_safe(t, outs[:mid])
            b = await self._merge_safe(t, outs[mid:])
            return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    async def _merge(self, t: _Table, outs: list[Outcome]) -> tuple[int, int, list[tuple[Outcome, str]]]:
        conn = self.conn
        assert conn is not None
        table, target = t.name, TARGETS[t.name]
        await conn.copy_records_to_table(t.stage.strip('"'), records=[o.values for o in outs],
                                         columns=list(target.columns))
        cols = ", ".join(quote_ident(c) for c in target.columns)
        into = quote_qualified(target.table)
        refused: list[tuple[Outcome, str]] = []
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
            if inserted < len(outs):
                by_id = {o.key[0]: o for o in outs}
                for r in await conn.fetch(
                        f"SELECT s.id, h.event_id AS same_hash FROM {t.stage} s"
                        " LEFT JOIN audit.event_hashes h ON h.raw_hash = s.raw_hash"
                        " WHERE h.event_id IS DISTINCT FROM s.event_id"):
                    o = by_id[r["id"]]
                    refused.append((o, f"same content (raw_hash) as audit event {r['same_hash']} already in PostgreSQL"
                                    if r["same_hash"] else
                                    f"event_id {o.value('event_id')} is already used in PostgreSQL by an event with"
                                    " other content"))
        elif table in _SAME_ROW:
            conflict = "ON CONFLICT (id) DO NOTHING" if table != "tool_usage" else "ON CONFLICT DO NOTHING"
            inserted = await conn.fetchval(
                f"WITH i AS (INSERT INTO {into} ({cols}) SELECT {cols} FROM {t.stage} {conflict} RETURNING 1)"
                " SELECT count(*) FROM i")
            if inserted < len(outs):
                same = _SAME_ROW[table]
                key = "usage_id" if table == "tool_usage" else "id"
                by_key = {o.value(key): o for o in outs}
                # A row written by dual-write has the same content; tool usage it
                # wrote has no legacy id, one from another source row has another.
                other_id = " OR t.id <> s.id" if table == "tool_usage" else ""
                for r in await conn.fetch(
                        f"SELECT s.{key} AS k FROM {t.stage} s JOIN {into} t USING ({key})"
                        f" WHERE ({', '.join('t.' + c for c in same)}) IS DISTINCT FROM"
                        f" ({', '.join('s.' + c for c in same)}){other_id}"):
                    o = by_key[str(r["k"]) if table == "tool_usage" else r["k"]]
                    refused.append((o, f"{key} {r['k']} is already used in PostgreSQL by another row"))
        else:  # discovery_tags, discovery_edges: the key is the whole identity
            inserted = await conn.fetchval(
                f"WITH i AS (INSERT INTO {into} ({cols}) SELECT {cols} FROM {t.stage}"
                " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM i")
        await conn.execute(f"TRUNCATE {t.stage}")
        return inserted, updated, refused

    async def _ensure_partitions(self, table: str, outs: list[Outcome]) -> None:
        parent = _PARTITIONED.get(table)
        if parent is None or not outs:
            return
        ts_index = TARGETS[table].columns.index("ts")
        today = datetime.now(UTC).date()
        last = date(today.year + (today.month - 1 + _MAX_MONTHS_AHEAD) // 12,
                    (today.month - 1 + _MAX_MONTHS_AHEAD) % 12 + 1, 1)
        months = {o.values[ts_index].date().replace(day=1) for o in outs}  # type: ignore[index]
        todo = sorted(m for m in months if (parent, m) not in self.months
                      and date(_FIRST_PARTITION_YEAR, 1, 1) <= m <= last)
        conn = self.conn
        assert conn is not None
        for month in todo:
            await conn.execute("SELECT audit.create_month_partition($1::regclass, $2::date)", parent, month)
            self.months.add((parent, month))


def summarize(report: BackfillReport, console: Any = None) -> int:
    """Print the summary (and problems found, notes) for people; return the exit status:
    0 when every table reconciles, 2 when one does not."""
    import sys
    from rich.console import Console
    out = console or (Console() if sys.stdout.isatty() else Console(width=200))
    out.print(report.render())
    if report.dry_run or any(t.problems or t.notes for t in report.tables):
        out.print(report.render_problems())
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    if report.reconciled:
        return 0
    bad = ", ".join(t.table for t in report.tables if not t.reconciled)
    print(f"error: counts do not reconcile (source != migrated + quarantined) for {bad}", file=sys.stderr)
    return 2


def _count(rep: TableReport, o: Outcome) -> None:
    rep.source_rows += 1
    if o.ok:
        rep.migrated += 1
        if o.repairs:
            rep.repaired += 1
            for r in o.repairs:
                rep.problems[f"{r.column}: {r.kind}"] += 1
    else:
        rep.quarantined += 1
        rep.problems[f"quarantined: {o.kind}"] += 1


def _from_checkpoint(rep: TableReport, c: Any) -> None:
    rep.source_rows, rep.migrated, rep.quarantined = c["rows_read"], c["rows_migrated"], c["rows_quarantined"]
    rep.repaired, rep.inserted, rep.updated = c["rows_repaired"], c["rows_inserted"], c["rows_updated"]


def _repair_rows(outs: list[Outcome]) -> list[list[Any]]:
    """Return the repairs as columns, one row per (key, column): several repairs of a column are joined."""
    merged: dict[tuple[str, str], list[Any]] = {}
    for o in outs:
        key = o.key_text
        for r in o.repairs:
            have = merged.get((key, r.column))
            if have is None:
                merged[(key, r.column)] = [key, r.column, r.kind, r.problem, r.original, r.encoding]
            elif r.kind not in have[2].split(","):
                have[2] += "," + r.kind
                have[3] += "; " + r.problem
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class _Progress:
    """Rich progress bars on stderr (rows, rows/s, ETA), or nothing."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )
            self._bar = Progress(
                TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10} rows/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True))

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, name: str, total: int, done: int = 0) -> Any:
        if self._bar is None:
            return None
        return self._bar.add_task(name, total=max(total, done), completed=done, rate="-")

    def advance(self, task: Any, n: int, done: int, seconds: float) -> None:
        """Advance by ``n`` rows; ``done`` rows took ``seconds`` in this run."""
        if self._bar is None or task is None:
            return
        self._bar.update(task, advance=n, rate=f"{done / seconds if seconds > 0 else 0:,.0f}")


def describe_error(exc: BaseException) -> str:
    """Return the one-line message the CLI prints for an expected error."""
    if isinstance(exc, GovdbError):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"
