"""`govdb dual ...`: the dual-write queue and the comparison of both stores (plain functions, settings first)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from .backends import outbox, shadow
from .config import Settings
from .errors import GovdbError, StoreUnavailableError
from .migrate.targets import TARGETS

console = Console()
err_console = Console(stderr=True)


def replay(settings: Settings, *, progress: bool = True) -> int:
    """Apply the queued dual writes to PostgreSQL now; exit 2 when parked writes remain."""
    async def go() -> Any:
        db = _dual(settings)
        await db.connect()
        try:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err_console,
                          disable=not progress, transient=True) as bar:
                task = bar.add_task("replaying", total=None)
                return await db.replay(progress=lambda done, parked: bar.update(
                    task, description=f"replayed {done:,}, parked {parked:,}"))
        finally:
            await db.close()
    result = asyncio.run(go())
    figures = outbox.dual_figures(settings.sqlite_path)
    table = Table("applied", "parked now", "pending", "parked in all", title="govdb dual replay")
    table.add_row(f"{result.applied:,}", f"{result.parked:,}", f"{figures['pending']:,}", f"{figures['parked']:,}")
    console.print(table)
    for seq, tbl, key, error in result.parked_now:
        console.print(f"parked #{seq} {tbl} {key}: {error}")
    if result.error:
        raise StoreUnavailableError(f"PostgreSQL did not take the queue ({result.error});"
                                    f" {figures['pending']:,} writes still queued, run it again later")
    return 2 if figures["parked"] else 0


def status(settings: Settings, *, as_json: bool = False) -> int:
    """Show both stores' row counts, the retry queue, parked writes and shadow-read figures."""
    figures = outbox.dual_figures(settings.sqlite_path)
    parked = outbox.parked_entries(settings.sqlite_path)
    lite = _sqlite_counts(settings)
    pg, pg_error = asyncio.run(_postgres_counts(settings)), None
    if isinstance(pg, GovdbError):
        pg, pg_error = {}, str(pg)
    if as_json:
        print(json.dumps({
            "counts": {t: {"sqlite": lite.get(t), "postgres": pg.get(t)} for t in TARGETS},
            "postgres_error": pg_error, **figures,
            "parked_entries": [{"seq": e.seq, "table": e.table, "key": list(e.key), "op": e.op,
                                "attempts": e.attempts, "error": e.last_error, "enqueued_at": e.enqueued_at}
                               for e in parked],
        }, indent=2, default=str))
        return 0
    counts = Table("table", "SQLite", "PostgreSQL", "difference", title="rows per table")
    for t, target in TARGETS.items():
        a, b = lite.get(t), pg.get(t)
        diff = "-" if a is None or b is None else f"{b - a:+,}" if a != b else "0"
        counts.add_row(f"{t} -> {target.table}", _n(a), _n(b), diff)
    console.print(counts)
    if pg_error:
        console.print(f"PostgreSQL: {pg_error}")
    queue = Table("pending", "oldest pending (s)", "parked", "shadow reads", "shadow mismatches",
                  title="dual-write queue and shadow reads")
    queue.add_row(_n(figures["pending"]), _n(figures["oldest_pending_age_s"]), _n(figures["parked"]),
                  _n(figures["shadow_reads"]), _n(figures["shadow_mismatches"]))
    console.print(queue)
    if figures["shadow_by_operation"]:
        ops = Table("operation", "reads", "mismatches", title="shadow reads by operation")
        for op, f in figures["shadow_by_operation"].items():
            ops.add_row(op, _n(f["reads"]), _n(f["mismatches"]))
        console.print(ops)
    if parked:
        console.print(_parked_table(parked))
    return 0


def parked(settings: Settings, *, as_json: bool = False) -> int:
    """List the parked writes (PostgreSQL refused them) with their operation, key and error."""
    entries = outbox.parked_entries(settings.sqlite_path)
    if as_json:
        print(json.dumps([{"seq": e.seq, "table": e.table, "key": list(e.key), "op": e.op, "attempts": e.attempts,
                           "error": e.last_error, "enqueued_at": e.enqueued_at} for e in entries], indent=2))
    elif entries:
        console.print(_parked_table(entries))
    else:
        console.print("no parked writes")
    return 0


def retry_parked(settings: Settings, seq: int | None = None, *, drop: bool = False) -> int:
    """Put parked writes (all, or one by its #) back in the queue and replay; --drop deletes them instead."""
    async def go() -> tuple[int, Any]:
        db = _dual(settings)
        await db.connect()
        try:
            if drop:
                return await db.drop_parked(seq), None
            n = await db.retry_parked(seq)
            return n, await db.replay()
        finally:
            await db.close()
    if seq is not None and not any(e.seq == seq for e in outbox.parked_entries(settings.sqlite_path)):
        raise GovdbError(f"no parked write #{seq} (see `govdb dual parked`)")
    n, result = asyncio.run(go())
    if drop:
        console.print(f"dropped {n} parked write(s): PostgreSQL will never get them")
        return 0
    counts = outbox.queue_counts(settings.sqlite_path)
    console.print(f"retried {n} parked write(s): {result.applied} applied, {result.parked} parked again,"
                  f" {counts['pending']} pending")
    return 2 if counts["parked"] else 0


# -- compare ------------------------------------------------------------------------

def compare(settings: Settings, *, as_json: bool = False, sample: int = 20) -> int:
    """Run a fixed battery of reads on both stores and report drift per read; exit 2 on drift."""
    rows = asyncio.run(_compare(settings, sample))
    drift = [r for r in rows if not r[2]]
    if as_json:
        print(json.dumps({"reads": len(rows), "drift": [{"read": r[0], "args": r[1]} for r in drift]}, indent=2))
    else:
        table = Table("read", "runs", "drift", title="govdb dual compare: SQLite vs PostgreSQL")
        by_read: dict[str, list[Any]] = {}
        for name, args, ok in rows:
            by_read.setdefault(name, []).append((args, ok))
        for name, runs in by_read.items():
            bad = [a for a, ok in runs if not ok]
            table.add_row(name, str(len(runs)), "[green]none[/green]" if not bad else
                          f"[red]{len(bad)}[/red]: " + ", ".join(map(str, bad[:3])))
        console.print(table)
    return 2 if drift else 0


async def _compare(settings: Settings, sample: int) -> list[tuple[str, str, bool]]:
    from .backends.postgres import PostgresDatabase
    from .backends.sqlite import SQLiteDatabase
    lite, pg = SQLiteDatabase(settings.sqlite_path), PostgresDatabase.from_settings(settings)
    await lite.connect()
    try:
        await pg.connect()
    except BaseException:
        await lite.close()
        raise
    out: list[tuple[str, str, bool]] = []

    async def check(name: str, *args: Any, **kw: Any) -> Any:
        a = await _outcome(getattr(lite, name)(*args, **kw))
        b = await _outcome(getattr(pg, name)(*args, **kw))
        out.append((name, ", ".join(map(str, args)), shadow.same(name, a, b)))
        return a

    try:
        idents = await check("list_identities", limit=1000)
        agents = [i.agent_id for i in idents][:sample] if isinstance(idents, list) else []
        for agent in agents:
            await check("get_identity", agent)
            await check("get_lineage", agent)
            await check("list_children", agent)
            await check("get_latest_agent_state", agent)
            await check("get_agent_state_history", agent, limit=50)
            await check("query_audit_events", agent_id=agent, limit=50)
            await check("get_tool_stats", agent_id=agent)
            await check("get_active_dialectic_sessions", agent)
            await check("search_discoveries", agent_id=agent, limit=50)
        await check("get_calibration")
        await check("query_audit_events", limit=200)
        await check("query_tool_usage", limit=200)
        await check("get_tool_stats")
        found = await check("search_discoveries", limit=sample)
        for d in found if isinstance(found, list) else []:
            await check("get_discovery", d.id)
            await check("get_neighbors", d.id)
            await check("get_response_chain", d.id)
        with sqlite3.connect(settings.sqlite_path) as conn:
            sessions = [r[0] for r in conn.execute(
                "SELECT session_id FROM dialectic_sessions WHERE typeof(session_id) = 'text'"
                " ORDER BY rowid DESC LIMIT ?", (sample,))]
        for sid in sessions:
            await check("get_dialectic_session", sid)
    finally:
        await pg.close()
        await lite.close()
    return out


async def _outcome(coro: Any) -> Any:
    try:
        return await coro
    except GovdbError as exc:  # the same error on both sides is agreement too
        return f"{type(exc).__name__}: {exc}"


# -- helpers ----------------------------------------------------------------------------

def _dual(settings: Settings) -> Any:
    # Imported when a command runs: the CLI starts without asyncpg (a SQLite-only install).
    from .backends.dual import DualDatabase
    return DualDatabase.from_settings(settings)


def _sqlite_counts(settings: Settings) -> dict[str, int]:
    from .ops.status import sqlite_counts
    return sqlite_counts(settings.sqlite_path)


async def _postgres_counts(settings: Settings) -> dict[str, int | None] | GovdbError:
    """Rows per legacy table's PostgreSQL target (None: the table is missing), or the error."""
    from .ops import connect
    from .ops.status import postgres_counts
    try:
        async with connect(settings, "govdb-dual-status") as conn:
            counts = await postgres_counts(conn)
    except GovdbError as exc:
        return exc
    return {t: counts.get(target.table) for t, target in TARGETS.items()}


def _parked_table(entries: list[outbox.Entry]) -> Table:
    table = Table("#", "operation", "table", "key", "attempts", "error", "queued at", title="parked writes")
    for e in entries:
        table.add_row(str(e.seq), e.op, e.table, e.key_text, str(e.attempts), e.last_error or "", e.enqueued_at)
    return table


def _n(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)
