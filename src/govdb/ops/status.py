"""govdb status: one screen for the operator, on every backend.

Backend and settings (password masked), rows per table, the AGE graph's
nodes and edges per label, the audit partitions, the last maintenance run,
and in dual mode the retry queue and shadow-read figures.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from rich.table import Table

from ..config import Settings
from ..errors import StoreUnavailableError
from . import connect, console, print_json

POSTGRES_TABLES = (
    "core.identities", "core.sessions", "core.agent_state", "core.calibration", "core.discoveries",
    "core.discovery_tags", "core.discovery_edges", "core.dialectic_sessions", "core.dialectic_messages",
    "audit.events", "audit.event_hashes", "audit.tool_usage",
)
SQLITE_TABLES = (
    "agent_metadata", "session_identities", "agent_state", "calibration_state", "discoveries",
    "discovery_tags", "discovery_edges", "dialectic_sessions", "dialectic_messages", "audit_events",
    "tool_usage", "rate_limits",
)


async def postgres_counts(conn: Any) -> dict[str, int]:
    """Return exact row counts of govdb's PostgreSQL tables (those present)."""
    from ..migrate.source import quote_qualified
    present = [t for t in POSTGRES_TABLES if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t)]
    if not present:
        return {}
    row = await conn.fetchrow("SELECT " + ", ".join(f"(SELECT count(*) FROM {quote_qualified(t)})" for t in present))
    return dict(zip(present, row))


async def graph_summary(conn: Any, graph: str) -> dict[str, Any] | None:
    """Return the AGE graph's counts per label and totals, or None without AGE or graph."""
    from ..migrate.graph import NODE_PROPS, graph_counts
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'age')"):
        return None
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = $1)", graph):
        return None
    counts = await graph_counts(conn, graph)
    nodes = {k: v for k, v in counts.items() if k in NODE_PROPS}
    edges = {k: v for k, v in counts.items() if k not in NODE_PROPS}
    return {"name": graph, "nodes": sum(nodes.values()), "edges": sum(edges.values()),
            "node_labels": nodes, "edge_labels": edges}


def sqlite_counts(path: Path) -> dict[str, int]:
    """Return row counts of the legacy tables in the SQLite file (read-only; never creates it)."""
    from ..migrate.source import quote_ident
    path = Path(path)
    if not path.is_file():
        raise StoreUnavailableError(f"the SQLite file {path} does not exist; check DB_SQLITE_PATH"
                                    " (or run `govdb init` to create it)")
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"cannot open the SQLite file {path} ({exc})") from exc
    try:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {t: conn.execute(f"SELECT count(*) FROM {quote_ident(t)}").fetchone()[0]
                for t in SQLITE_TABLES if t in have}
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"cannot read the SQLite file {path} ({exc})") from exc
    finally:
        conn.close()


async def _postgres_status(settings: Settings) -> dict[str, Any]:
    from .partitions import fetch_partitions, last_run
    async with connect(settings, "govdb-status") as conn:
        out: dict[str, Any] = {
            "server_version": await conn.fetchval("SHOW server_version"),
            "schema_version": (await conn.fetchval("SELECT max(version) FROM core.schema_version")
                               if await conn.fetchval("SELECT to_regclass('core.schema_version') IS NOT NULL")
                               else None),
        }
        # One snapshot for every count.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            out["tables"] = await postgres_counts(conn)
            out["graph"] = await graph_summary(conn, settings.age_graph) if settings.age_enabled else None
            if await conn.fetchval("SELECT to_regclass('audit.events') IS NOT NULL"):
                parts = await fetch_partitions(conn)
                out["partitions"] = _partition_summary(parts)
            else:
                out["partitions"] = None
            out["last_maintenance"] = (await last_run(conn)
                                       if await conn.fetchval("SELECT to_regclass('audit.maintenance_log') IS NOT NULL")
                                       else None)
        return out


def _partition_summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        entry = out.setdefault(p["table"], {"partitions": 0, "oldest": None, "newest": None,
                                            "default_rows": 0, "bytes": 0})
        entry["bytes"] += p["bytes"]
        if p["default"]:
            entry["default_rows"] = p["rows"]
            continue
        entry["partitions"] += 1
        entry["oldest"] = min(filter(None, (entry["oldest"], p["from"])))
        entry["newest"] = max(filter(None, (entry["newest"], p["from"])))
    return out


def dual_figures(settings: Settings) -> dict[str, Any] | None:
    """Return the dual backend's retry-queue and shadow-read figures, or None where there are none."""
    try:
        from ..backends.outbox import dual_figures as figures  # built with the dual backend
    except ImportError:
        return None
    return dict(figures(settings.sqlite_path))


def collect(settings: Settings) -> dict[str, Any]:
    """Return everything `govdb status` shows, as plain data."""
    out: dict[str, Any] = {"backend": settings.backend, "settings": settings.describe()}
    if settings.backend in ("sqlite", "dual"):
        out["sqlite"] = {"path": str(settings.sqlite_path), "tables": sqlite_counts(settings.sqlite_path)}
    if settings.backend in ("postgres", "dual"):
        out["postgres"] = asyncio.run(_postgres_status(settings))
    if settings.backend == "dual":
        out["dual"] = dual_figures(settings)
    return out


def status(settings: Settings, *, as_json: bool = False) -> int:
    """Show the store at a glance: settings, rows per table, graph, partitions, maintenance."""
    out = collect(settings)
    if as_json:
        print_json(out)
        return 0
    con = console()
    grid = Table.grid(padding=(0, 3))
    grid.add_row(_settings_table(out), _counts_table(out))
    con.print(grid)
    pg = out.get("postgres")
    if pg:
        lower = Table.grid(padding=(0, 3))
        lower.add_row(_graph_table(pg["graph"]), _partitions_table(pg))
        con.print(lower)
        con.print(last_maintenance_line(pg.get("last_maintenance")), markup=False,
                  style="yellow" if pg.get("last_maintenance") is None else None)
    if settings.backend == "dual":
        con.print(_dual_table(out.get("dual")))
    return 0


def _settings_table(out: dict[str, Any]) -> Table:
    table = Table("setting", "value", title=f"govdb status: {out['backend']}")
    for key, value in out["settings"].items():
        table.add_row(key, value)
    pg = out.get("postgres")
    if pg:
        table.add_row("server", str(pg["server_version"]))
        table.add_row("schema version", str(pg["schema_version"]))
    return table


def _counts_table(out: dict[str, Any]) -> Table:
    sqlite = (out.get("sqlite") or {}).get("tables")
    pg = (out.get("postgres") or {}).get("tables")
    if sqlite is not None and pg is not None:
        table = Table("table", "rows", title="rows per table (SQLite | PostgreSQL)")
        for name, n in sqlite.items():
            table.add_row(f"sqlite {name}", f"{n:,}")
        for name, n in pg.items():
            table.add_row(name, f"{n:,}")
        return table
    table = Table("table", "rows", title="rows per table")
    for name, n in (sqlite if sqlite is not None else pg or {}).items():
        table.add_row(name, f"{n:,}")
    return table


def _graph_table(graph: dict[str, Any] | None) -> Table:
    if graph is None:
        table = Table("graph", title="AGE graph")
        table.add_row("off (no AGE extension, no graph, or DB_AGE_ENABLED=0)")
        return table
    table = Table("label", "count", title=f"AGE graph {graph['name']}",
                  caption=f"{graph['nodes']:,} nodes, {graph['edges']:,} edges")
    for label, n in graph["node_labels"].items():
        table.add_row(f"({label})", f"{n:,}")
    for label, n in graph["edge_labels"].items():
        table.add_row(f"-[{label}]->", f"{n:,}")
    return table


def _partitions_table(pg: dict[str, Any]) -> Table:
    from .partitions import human_bytes
    table = Table("table", "partitions", "months", "in default", "size", title="audit partitions")
    for name, p in (pg.get("partitions") or {}).items():
        table.add_row(name, str(p["partitions"]), f"{(p['oldest'] or '-')[:7]} .. {(p['newest'] or '-')[:7]}",
                      f"{p['default_rows']:,}", human_bytes(p["bytes"]),
                      style="yellow" if p["default_rows"] else None)
    return table


def last_maintenance_line(run: dict[str, Any] | None) -> str:
    """Return one line saying when maintenance last ran and what it did."""
    if run is None:
        return "last maintenance run: never (run `govdb partitions maintain`, or `govdb partitions schedule`)"
    d = run["details"]
    did = "; ".join(f"{n}: {d[n].get('created', 0)} created, {d[n].get('dropped', 0)} dropped,"
                    f" {d[n].get('moved_from_default', 0)} rows moved out of default"
                    for n in ("events", "tool_usage") if n in d)
    return f"last maintenance run: {run['ran_at']:%Y-%m-%d %H:%M} UTC by {d.get('by', '?')} ({did})"


def _dual_table(figures: dict[str, Any] | None) -> Table:
    table = Table("dual mode", "value", title="dual-write: retry queue and shadow reads")
    if figures is None:
        table.add_row("figures", "not available (this govdb has no dual-write outbox)")
    else:
        for key, value in figures.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    table.add_row(f"{key}: {sub}", ", ".join(f"{k} {n}" for k, n in v.items())
                                  if isinstance(v, dict) else str(v))
            else:
                table.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    return table


__all__ = ["collect", "dual_figures", "graph_summary", "postgres_counts", "sqlite_counts", "status"]
