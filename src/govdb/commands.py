"""CLI commands as plain functions: settings first, results printed as tables.

cli.py only parses arguments and calls these; tests call them directly.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .backends import create_backend
from .backends.base import Database
from .config import Settings

# Piped output (logs, CI) gets wide tables rather than rich's 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)


def _run(coro):
    return asyncio.run(coro)


def show_settings(settings: Settings) -> None:
    """Show the effective DB_* settings (passwords masked)."""
    table = Table("variable", "value", title="govdb settings")
    for key, value in settings.describe().items():
        table.add_row(key, value)
    console.print(table)


def init(settings: Settings) -> int:
    """Create or upgrade the schema of the configured store; safe to repeat."""
    async def go() -> int:
        async with create_backend(settings) as db:
            h = await db.health()
        table = Table("backend", "schema version", "graph", "store", title="govdb init")
        table.add_row(h.backend, str(h.schema_version), h.graph, _where(settings))
        console.print(table)
        return 0 if h.ok else 1
    return _run(go())


def health(settings: Settings) -> int:
    """Check that the configured store answers; exit 1 if it does not."""
    async def go() -> int:
        async with create_backend(settings) as db:
            h = await db.health()
        table = Table("check", "value", title=f"health of {h.backend}")
        table.add_row("ok", "yes" if h.ok else "NO")
        table.add_row("schema version", str(h.schema_version))
        table.add_row("graph", h.graph)
        for key, value in h.details.items():
            table.add_row(str(key), str(value))
        console.print(table)
        return 0 if h.ok else 1
    return _run(go())


def _where(settings: Settings) -> str:
    if settings.backend == "sqlite":
        return str(settings.sqlite_path)
    if settings.backend == "postgres":
        return settings.postgres_url.masked
    return f"{settings.sqlite_path} + {settings.postgres_url.masked}"


def demo(settings: Settings) -> int:
    """Write and read back every kind of record through get_db(); print what was stored."""
    from . import close_db, init_db
    from .keys import generate_api_key

    async def go() -> int:
        db = await init_db(settings)
        try:
            rows = await _demo_round(db, generate_api_key())
        finally:
            await close_db()
        table = Table("record", "key", "read back", title=f"govdb demo on {settings.backend}: {_where(settings)}")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return 0
    return _run(go())


async def _demo_round(db: Database, key: str) -> list[tuple[str, str, str]]:
    import secrets
    run = secrets.token_hex(3)  # a short tag so repeated demos never collide
    lead, helper = f"demo-lead-{run}", f"demo-helper-{run}"
    rows: list[tuple[str, str, str]] = []

    ident = await db.create_identity(lead, api_key=key, tags=["demo"], notes="created by govdb demo")
    child = await db.create_identity(helper, api_key=key + "-2", parent_agent_id=lead, spawn_reason="demo")
    lineage = await db.get_lineage(helper)
    rows.append(("identity", ident.agent_id, f"status={ident.status}, key verifies={await db.verify_api_key(lead, key)}"))
    rows.append(("identity (child)", child.agent_id, "lineage " + " <- ".join(i.agent_id for i in lineage)))

    sess = await db.create_session(f"sess-{run}", lead, ttl=timedelta(hours=1), client_type="demo")
    sess = await db.touch_session(sess.session_id)
    rows.append(("session", sess.session_id, f"active={sess.is_active}, expires {sess.expires_at:%H:%M} UTC"))

    st = await db.record_agent_state(lead, energy=0.72, integrity=0.91, entropy=0.18, void=-0.05,
                                     regime="nominal", coherence=0.88, state={"lambda1": 0.12})
    latest = await db.get_latest_agent_state(lead)
    rows.append(("agent state", str(st.id), f"E={latest.energy} I={latest.integrity} S={latest.entropy} V={latest.void} ({latest.regime})"))

    cal = await db.get_calibration()
    cal = await db.update_calibration({"bins": [0.25, 0.5, 0.75], "run": run},
                                      expected_version=cal.version if cal else 0)
    rows.append(("calibration", f"version {cal.version}", f"bins={cal.state['bins']}"))

    ev, inserted = await db.append_audit_event("demo_checkin", agent_id=lead, session_id=sess.session_id,
                                               details={"message": "demo check-in"})
    found = await db.search_audit_events("demo check-in")
    rows.append(("audit event", ev.event_id, f"inserted={inserted}, full-text hits={len(found)}"))

    await db.record_tool_usage("demo_tool", agent_id=lead, latency_ms=12, success=True)
    stats = {s.tool_name: s for s in await db.get_tool_stats(agent_id=lead)}
    rows.append(("tool usage", "demo_tool", f"calls={stats['demo_tool'].calls}, avg={stats['demo_tool'].avg_latency_ms} ms"))

    q = await db.add_discovery(f"disc-q-{run}", agent_id=lead, type="question", summary="Why does entropy rise at night?",
                               tags=["demo", "entropy"])
    a = await db.add_discovery(f"disc-a-{run}", agent_id=helper, type="answer",
                               summary="Nightly batch jobs raise entropy", tags=["demo"], confidence=0.7)
    await db.link_discoveries(a.id, q.id, edge_type="response_to", response_type="extend")
    hits = await db.search_discoveries("entropy", tags=["demo"])
    chain = await db.get_response_chain(a.id)
    rows.append(("discovery", q.id, f"search hits={len(hits)}, chain " + " -> ".join(d.type for d in chain)))

    ds = await db.create_dialectic_session(f"dialectic-{run}", paused_agent_id=helper, reason="demo review")
    await db.assign_reviewer(ds.session_id, lead)
    await db.add_dialectic_message(ds.session_id, agent_id=helper, message_type="thesis", reasoning="I was fine")
    await db.set_dialectic_phase(ds.session_id, "antithesis")
    await db.add_dialectic_message(ds.session_id, agent_id=lead, message_type="antithesis", concerns=["entropy"])
    await db.set_dialectic_phase(ds.session_id, "synthesis")
    await db.add_dialectic_message(ds.session_id, agent_id=helper, message_type="synthesis", agrees=True)
    ds = await db.resolve_dialectic_session(ds.session_id, resolution={"action": "resume"})
    full = await db.get_dialectic_session(ds.session_id)
    rows.append(("dialectic session", ds.session_id, f"{ds.status} after {len(full.messages)} messages"))

    h = await db.health()
    schema = "legacy layout" if h.schema_version is None else f"schema v{h.schema_version}"
    rows.append(("health", h.backend, f"ok={h.ok}, {schema}, graph {h.graph}"))
    return rows


def pg_start(data_dir: Path, port: int) -> int:
    """Start a local PostgreSQL 17 + AGE on 127.0.0.1 with its data in DATA_DIR."""
    from . import localpg
    server = localpg.start(data_dir, port=port,
                           log=lambda msg: console.print(msg, style="dim", soft_wrap=True, markup=False))
    _show_server({"route": server.route, "url": server.url, "data_dir": server.data_dir,
                  "pid": server.pid, "running": True})
    return 0


def pg_status(data_dir: Path) -> int:
    """Show whether the local PostgreSQL in DATA_DIR runs; exit 1 if it does not."""
    from . import localpg
    status = localpg.status(data_dir)
    if status is None:
        console.print(f"no local PostgreSQL was ever started in {data_dir}")
        return 1
    _show_server(status)
    return 0 if status.get("running") else 1


def _show_server(status: dict) -> None:
    table = Table("route", "url", "data dir", "pid", "running", title="local PostgreSQL + AGE")
    for column in table.columns:
        column.overflow = "fold"
    table.add_row(str(status.get("route")), str(status.get("url")), str(status.get("data_dir")),
                  str(status.get("pid")), "yes" if status.get("running") else "no")
    console.print(table)


def pg_stop(data_dir: Path) -> int:
    """Stop the local PostgreSQL started from DATA_DIR."""
    from . import localpg
    stopped = localpg.stop(data_dir)
    console.print("stopped" if stopped else "not running")
    return 0


def pg_url(data_dir: Path) -> int:
    """Print the URL of the local PostgreSQL in DATA_DIR."""
    from . import localpg
    print(localpg.url(data_dir))
    return 0


def _postgres_settings(settings: Settings, postgres_url: str | None) -> Settings:
    if not postgres_url:
        return settings
    from dataclasses import replace
    from .config import parse_postgres_url
    return replace(settings, postgres_url=parse_postgres_url(postgres_url, "--postgres"))


def migrate_backfill(settings: Settings, sqlite_path: Path | None, postgres_url: str | None, *,
                     tables: str | None = None, dry_run: bool = False, resume: bool = False,
                     restart: bool = False, source_timezone: str = "UTC", batch_size: int | None = None,
                     progress: bool = True) -> int:
    """Copy the legacy SQLite file into PostgreSQL: resumable, repaired or quarantined, nothing lost."""
    from .migrate.backfill import DEFAULT_BATCH_SIZE, backfill
    from .migrate.report import summarize
    report = _run(backfill(
        _postgres_settings(settings, postgres_url), sqlite_path or settings.sqlite_path, tables=tables,
        dry_run=dry_run, resume=resume, restart=restart, source_tz=source_timezone,
        batch_size=batch_size or DEFAULT_BATCH_SIZE, progress=progress))
    return summarize(report, console)


def migrate_graph(settings: Settings, postgres_url: str | None, graph: str | None = None) -> int:
    """Build the AGE graph from the backfilled tables: set-based, adds only what is missing."""
    from .migrate.graph import graph_counts, load_graph

    async def go() -> tuple[dict[str, int], dict[str, int]]:
        target = _postgres_settings(settings, postgres_url)
        name = graph or target.age_graph
        conn = await _connect(target)
        try:
            added = await load_graph(conn, name)
            return added, await graph_counts(conn, name)
        finally:
            await conn.close()

    added, counts = _run(go())
    table = Table("label", "added", "in graph", title=f"AGE graph {graph or settings.age_graph}")
    for label, total in counts.items():
        table.add_row(label, f"{added.get(label, 0):,}", f"{total:,}")
    console.print(table)
    return 0


def migrate_export_graph(settings: Settings, sqlite_path: Path | None, out: Path, *, mode: str = "merge",
                         graph: str | None = None, source_timezone: str = "UTC") -> int:
    """Write a psql script that builds the AGE graph of a legacy governance.db (no database needed)."""
    from .migrate.graph import NODE_PROPS, export_sql
    name = graph or settings.age_graph
    counts = export_sql(sqlite_path or settings.sqlite_path, out, name, mode, source_tz=source_timezone)
    nodes = sum(n for label, n in counts.items() if label in NODE_PROPS)
    console.print(f"wrote {out}: {nodes:,} nodes, {sum(counts.values()) - nodes:,} edges for graph {name}"
                  f" (mode {mode}); apply with: psql -v ON_ERROR_STOP=1 -f {out}", markup=False)
    return 0


async def _connect(settings: Settings):
    import asyncpg
    from .errors import StoreUnavailableError
    try:
        return await asyncpg.connect(settings.postgres_url.reveal())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailableError(f"PostgreSQL at {settings.postgres_url.masked} is unavailable"
                                    f" ({type(exc).__name__})") from exc


def migrate_verify(settings: Settings, sqlite_path: Path | None, postgres_url: str | None, *,
                   tables: str | None = None, source_timezone: str = "UTC", as_json: bool = False,
                   max_diffs: int = 10, graph: str | None = None, check_graph: bool = True) -> int:
    """Check PostgreSQL against the legacy file: counts, checksums per key range, graph; exit 2 on a difference."""
    from .migrate.verify import verify
    target = _postgres_settings(settings, postgres_url)
    report = _run(verify(target, sqlite_path or settings.sqlite_path, tables=tables, source_tz=source_timezone,
                         graph=check_graph, graph_name=graph or target.age_graph, max_diffs=max_diffs))
    if as_json:
        print(report.to_json())
    else:
        for part in report.render():
            console.print(part)
        for note in report.notes:
            console.print(f"note: {note}", markup=False)
        bad = [t.table for t in report.tables if not t.ok]
        if report.graph is not None and not report.graph.ok:
            bad.append(f"graph {report.graph.name}")
        console.print("[green]verified: everything matches[/green]" if report.ok
                      else f"[red]differences found in: {', '.join(bad)}[/red]")
    return 0 if report.ok else 2


def serve(settings: Settings, http: str | None = None, stateless: bool = False) -> int:
    """Serve the governance tools over MCP: stdio, or streamable HTTP with --http HOST:PORT."""
    from .server import serve as run_server  # the MCP SDK is needed only here
    return run_server(settings, http, stateless=stateless)
