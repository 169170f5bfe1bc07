"""Cutover to PostgreSQL and rollback to SQLite (the spec's phase 5 and rollback plan).

``cutover`` refuses unless verify passes and the dual-write retry queue is
empty with no parked write; then it moves PostgreSQL's id sequences past
every legacy id, archives a consistent copy of the SQLite file (WAL
included) to ``<dir of the file>/archive/<name>_YYYYMMDD.db``, records the
cutover and PostgreSQL's high-water marks in ``migrate.cutovers``, and prints
the settings to switch to. The original file stays where it is: servers still
running in dual mode keep writing to it, and moving it under them would lose
those writes (and strand its WAL); the operator removes it once every server
runs with ``DB_BACKEND=postgres``.

``rollback`` during dual-write has nothing to restore (SQLite has every
write); after a cutover it restores the archive and brings back what was
written to PostgreSQL since (migrate/reverse.py), then verifies.

The record lives in PostgreSQL, not in a file beside the archive: after the
cutover PostgreSQL is the store of record, the marks describe its tables and
are written in one transaction with nothing else to keep in step, and a
rollback (which needs PostgreSQL for the reverse sync anyway) finds it
whatever became of the archive directory.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .commands import _connect, _postgres_settings, console
from .config import Settings
from .errors import StoreUnavailableError
from .migrate import MigrationError

UTC = timezone.utc
#: Rows changed this long before the cutover are compared again by a rollback:
#: application clocks (which stamp updated_at) may run behind PostgreSQL's.
CLOCK_MARGIN = timedelta(hours=1)

_CUTOVERS_SQL = """
CREATE SCHEMA IF NOT EXISTS migrate;
CREATE TABLE IF NOT EXISTS migrate.cutovers (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at     timestamptz NOT NULL,      -- PostgreSQL's clock when the cutover began
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    sqlite_path    text NOT NULL,
    archive_path   text NOT NULL,
    marks          jsonb NOT NULL,            -- per table: rows, max_id, max_ts
    rolled_back_at timestamptz,
    rollback       jsonb                      -- per table: rows brought back
);
"""
#: PostgreSQL table -> (id column or None, the column that moves when a row is written or changed).
_MARKS = {
    "core.identities": (None, "updated_at"),
    "core.sessions": (None, "last_active"),
    "core.agent_state": ("id", "recorded_at"),
    "core.calibration": (None, "updated_at"),
    "audit.events": ("id", "ts"),
    "audit.tool_usage": ("id", "ts"),
    "core.discoveries": (None, "coalesce(updated_at, created_at)"),
    "core.discovery_tags": (None, None),
    "core.discovery_edges": (None, "created_at"),
    "core.dialectic_sessions": (None, "updated_at"),
    "core.dialectic_messages": ("id", "ts"),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# -- cutover ------------------------------------------------------------------------------

def cutover(settings: Settings, sqlite_path: Path | None = None, postgres_url: str | None = None, *,
            archive_dir: Path | None = None, dry_run: bool = False, source_timezone: str = "UTC") -> int:
    """Switch to PostgreSQL: check verify and the retry queue, archive the SQLite file, record it."""
    target = _postgres_settings(settings, postgres_url)
    path = Path(sqlite_path or settings.sqlite_path)
    return asyncio.run(_cutover(target, path, archive_dir or path.parent / "archive", dry_run, source_timezone))


async def _cutover(settings: Settings, path: Path, archive_dir: Path, dry_run: bool, tz: str) -> int:
    if not path.is_file():
        raise MigrationError(f"SQLite file {path} does not exist (give --sqlite or set DB_SQLITE_PATH)")
    checks = await _cutover_checks(settings, path, tz)
    console.print(_checks_table(checks, f"cutover checks: {path} -> {settings.postgres_url.masked}"))
    if not all(c.ok for c in checks):
        console.print(Text("cutover refused: " + "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok),
                           style="red"))
        return 2
    if dry_run:
        console.print("dry run: every check passes; nothing was changed")
        return 0
    conn = await _connect(settings)
    try:
        started = await conn.fetchval("SELECT now()")
        await _move_sequences(conn, path)
        archive = archive_sqlite(path, archive_dir, started)
        marks = await high_water_marks(conn)
        async with conn.transaction():
            await conn.execute(_CUTOVERS_SQL)
            await conn.execute(
                "INSERT INTO migrate.cutovers (started_at, sqlite_path, archive_path, marks)"
                " VALUES ($1, $2, $3, $4::text::jsonb)", started, str(path.resolve()), str(archive.resolve()),
                _json(marks))
    finally:
        await conn.close()
    done = Table("table", "rows", "max id", "latest change", title=f"cutover recorded; archive {archive}")
    for table, m in marks.items():
        done.add_row(table, f"{m['rows']:,}", "-" if m["max_id"] is None else str(m["max_id"]), m["max_ts"] or "-")
    console.print(done)
    console.print(_settings_table("switch every server to", {
        "DB_BACKEND": "postgres", "DB_POSTGRES_URL": settings.postgres_url.masked,
        "DB_AGE_GRAPH": settings.age_graph, "DB_AGE_ENABLED": "1" if settings.age_enabled else "0"}))
    console.print(Text(f"{path} stays in place: servers still in dual mode write to it. Once every server runs"
                       f" with DB_BACKEND=postgres, remove it; `govdb rollback` restores {archive} and brings"
                       " back what PostgreSQL got since."))
    return 0


async def _cutover_checks(settings: Settings, path: Path, tz: str) -> list[Check]:
    from .migrate.verify import verify
    report = await verify(settings, path, source_tz=tz, graph=settings.age_enabled, graph_name=settings.age_graph)
    bad = [t.table for t in report.tables if not t.ok]
    if report.graph is not None and not report.graph.ok:
        bad.append(f"graph {report.graph.name}")
    checks = [Check("verify", report.ok, "everything matches" if report.ok else
                    f"differences in {', '.join(bad)} (see govdb migrate verify)")]
    pending, parked, problem = queue_state(path)
    if problem:
        checks += [Check("retry queue empty", False, problem), Check("no parked writes", False, problem)]
    else:
        checks += [Check("retry queue empty", pending == 0, f"{pending:,} writes wait for PostgreSQL"
                         + ("" if pending == 0 else " (run govdb dual replay)")),
                   Check("no parked writes", parked == 0, f"{parked:,} parked"
                         + ("" if parked == 0 else " (see govdb dual status; fix or drop them first)"))]
    active = await _active_cutover(settings)
    checks.append(Check("no cutover recorded yet", active is None, "none" if active is None else
                        f"one at {active['started_at']:%Y-%m-%d %H:%M} UTC, archive {active['archive_path']}"
                        " (govdb rollback first)"))
    return checks


def queue_state(sqlite_path: Path) -> tuple[int, int, str | None]:
    """Return (pending, parked, problem) of the dual-write outbox in the SQLite file."""
    try:
        from .backends.outbox import queue_counts
    except ImportError:
        return 0, 0, "unknown: this govdb has no dual-write outbox (govdb.backends.outbox)"
    counts: Any = queue_counts(sqlite_path)
    if isinstance(counts, dict):
        return int(counts["pending"]), int(counts["parked"]), None
    if hasattr(counts, "pending"):
        return int(counts.pending), int(counts.parked), None
    pending, parked = counts
    return int(pending), int(parked), None


async def _move_sequences(conn: Any, path: Path) -> None:
    # The backfill's own step: ids PostgreSQL gives from now on never repeat
    # one the file ever gave (AUTOINCREMENT's mark too).
    from .migrate.backfill import SEQUENCED, move_sequence
    from .migrate.source import LegacySource
    with LegacySource(path) as source:
        tops = {table: source.max_id(table) for table in SEQUENCED}
    for table, top in tops.items():
        await move_sequence(conn, table, top)


def archive_sqlite(path: Path, archive_dir: Path, when: datetime) -> Path:
    """Copy the (possibly live) SQLite file, WAL included, to ARCHIVE_DIR/<stem>_YYYYMMDD<suffix>.

    The copy is one consistent snapshot (SQLite's backup API), a single file
    (rollback journal), checked, and fsynced; an existing archive is never
    replaced: a second one that day gets ``_2``, ``_3``, ...
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    tmp = archive_dir / f".{path.name}.{os.getpid()}.partial"
    _copy_database(path, tmp)
    stem, suffix = path.stem, path.suffix or ".db"
    n = 1
    while True:
        final = archive_dir / f"{stem}_{when.astimezone(UTC):%Y%m%d}{'' if n == 1 else f'_{n}'}{suffix}"
        try:
            os.link(tmp, final)  # fails when the name exists: never replaces an archive
            break
        except FileExistsError:
            n += 1
    tmp.unlink()
    _fsync_dir(archive_dir)
    return final


def _copy_database(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{quote(str(src.resolve()))}?mode=ro", uri=True, timeout=30)
    try:
        copy = sqlite3.connect(dst)
        try:
            source.backup(copy)  # one step: a consistent snapshot of the file and its WAL
            copy.execute("PRAGMA journal_mode = DELETE")
            status = copy.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            copy.close()
    except sqlite3.Error as exc:
        dst.unlink(missing_ok=True)
        raise StoreUnavailableError(f"cannot copy {src} to {dst} ({exc})") from exc
    finally:
        source.close()
    if status != "ok":
        dst.unlink(missing_ok=True)
        raise MigrationError(f"the copy of {src} fails SQLite's quick_check ({status}); check the file first")
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def high_water_marks(conn: Any) -> dict[str, dict[str, Any]]:
    """Return per PostgreSQL table: rows, the largest id, the latest change (ISO text)."""
    marks = {}
    for table, (id_col, ts_col) in _MARKS.items():
        # Table and column names come from _MARKS.
        row = await conn.fetchrow(f"SELECT count(*) AS rows, {f'max({id_col})' if id_col else 'NULL::bigint'}"
                                  f" AS max_id, {f'max({ts_col})' if ts_col else 'NULL::timestamptz'} AS max_ts"
                                  f" FROM {table}")
        marks[table] = {"rows": row["rows"], "max_id": row["max_id"],
                        "max_ts": None if row["max_ts"] is None else row["max_ts"].astimezone(UTC).isoformat()}
    return marks


# -- rollback -----------------------------------------------------------------------------

def rollback(settings: Settings, sqlite_path: Path | None = None, postgres_url: str | None = None, *,
             archive: Path | None = None, force: bool = False, verify_after: bool = True,
             progress: bool = True) -> int:
    """Go back to SQLite: after a cutover, restore the archive and bring back PostgreSQL's later writes."""
    target = _postgres_settings(settings, postgres_url)
    path = Path(sqlite_path or settings.sqlite_path)
    return asyncio.run(_rollback(target, path, archive, force, verify_after, progress))


async def _rollback(settings: Settings, path: Path, archive: Path | None, force: bool, verify_after: bool,
                    progress: bool) -> int:
    active = await _active_cutover(settings)
    if active is None:
        return _rollback_dual(path)
    archive = Path(archive or active["archive_path"])
    if not archive.is_file():
        raise MigrationError(f"the archive {archive} of the cutover does not exist (give --archive PATH)")
    if path.exists() or Path(f"{path}-wal").exists():
        if not force:
            raise MigrationError(f"{path} exists; use --force to keep it aside (renamed, never deleted)"
                                 " and restore the archive in its place")
        aside = set_aside(path)
        console.print(Text(f"kept the existing file aside as {aside}"))
    restore_archive(archive, path)
    console.print(Text(f"restored {archive} to {path}"))
    from .migrate.reverse import ReverseSync
    conn = await _connect(settings)
    try:
        with _progress(progress) as bars:
            sync = ReverseSync(conn, path, active["started_at"] - CLOCK_MARGIN, bars)
            try:
                results = await sync.run()
            finally:
                sync.close()
        await conn.execute("UPDATE migrate.cutovers SET rolled_back_at = now(), rollback = $2::text::jsonb"
                           " WHERE id = $1", active["id"],
                           _json({r.table: {"new": r.new, "updated": r.updated} for r in results}))
    finally:
        await conn.close()
    table = Table("table", "new rows", "updated rows", "seconds",
                  title=f"rollback: brought back from PostgreSQL into {path}")
    for r in results:
        table.add_row(r.table, f"{r.new:,}", f"{r.updated:,}", f"{r.seconds:.1f}")
    console.print(table)
    code = 0
    if verify_after:
        from .migrate.verify import verify
        report = await verify(settings, path, graph=settings.age_enabled, graph_name=settings.age_graph)
        for part in report.render():
            console.print(part)
        console.print(Text("verified: the file holds everything PostgreSQL holds", style="green") if report.ok
                      else Text("differences found: see the table above", style="red"))
        code = 0 if report.ok else 2
    console.print(_settings_table("switch every server to", {"DB_BACKEND": "sqlite", "DB_SQLITE_PATH": str(path)}))
    return code


def _rollback_dual(path: Path) -> int:
    console.print(Text("no cutover is recorded in PostgreSQL: SQLite has every write of the dual-write phase,"
                       " nothing to restore"))
    pending, parked, problem = queue_state(path)
    if problem:
        console.print(Text(f"note: retry queue {problem}"))
    elif pending or parked:
        console.print(Text(f"warning: {pending:,} writes still wait for PostgreSQL and {parked:,} are parked;"
                           " SQLite has them all, they matter only if you go back to PostgreSQL", style="yellow"))
    console.print(_settings_table("switch every server to", {"DB_BACKEND": "sqlite", "DB_SQLITE_PATH": str(path)}))
    return 0


def set_aside(path: Path) -> Path:
    """Rename the file (after folding its WAL in) and its -wal/-shm to ``<name>.before-rollback-<time>``."""
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # not a database, or busy: renamed with its WAL beside it all the same
    aside = path.with_name(f"{path.name}.before-rollback-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    for extra in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{extra}")
        if src.exists():
            os.rename(src, f"{aside}{extra}")
    _fsync_dir(path.parent)
    return aside


def restore_archive(archive: Path, path: Path) -> None:
    """Copy ``archive`` to ``path`` (which must not exist) consistently and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.restoring")
    _copy_database(archive, tmp)
    try:
        os.link(tmp, path)  # fails if a file appeared there meanwhile: never replaces one
    except FileExistsError:
        raise MigrationError(f"{path} appeared while restoring; stop the servers using it and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


async def _active_cutover(settings: Settings) -> dict[str, Any] | None:
    """Return the latest cutover not rolled back, or None."""
    conn = await _connect(settings)
    try:
        if not await conn.fetchval("SELECT to_regclass('migrate.cutovers') IS NOT NULL"):
            return None
        row = await conn.fetchrow("SELECT id, started_at, archive_path, sqlite_path FROM migrate.cutovers"
                                  " WHERE rolled_back_at IS NULL ORDER BY id DESC LIMIT 1")
        return None if row is None else dict(row)
    finally:
        await conn.close()


# -- output -------------------------------------------------------------------------------

def _checks_table(checks: list[Check], title: str) -> Table:
    table = Table("check", "result", "detail", title=Text(title))
    for c in checks:
        table.add_row(c.name, Text("pass", style="green") if c.ok else Text("FAIL", style="red"), Text(c.detail))
    return table


def _settings_table(title: str, values: dict[str, str]) -> Table:
    table = Table("variable", "value", title=title)
    for key, value in values.items():
        table.add_row(key, Text(value))
    return table


class _progress:
    """Progress bars on stderr, one per table (or none)."""

    def __init__(self, on: bool):
        self.bars = Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=Console(stderr=True)) if on else None

    def __enter__(self):
        if self.bars is None:
            return None
        self.bars.start()
        bars = self.bars

        def table(name: str, total: int):
            task = bars.add_task(name, total=total)
            return lambda n: bars.advance(task, n)
        return table

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()


def _json(value: Any) -> str:
    import json
    return json.dumps(value)


