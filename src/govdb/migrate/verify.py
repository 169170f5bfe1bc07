"""Verify a migration: the legacy SQLite file, cleaned, against PostgreSQL.

Both sides reduce each row to one canonical text (:class:`RowForm`, the same
code for both: the source side is the legacy row after :mod:`.clean`, so the
backfill's repairs apply and quarantined rows drop out), hash it to 64 bits
and add the hashes per key range: order-independent, memory per range, not
per row. Ranges whose count or sum differ are bisected, re-reading only them
on both sides, until small enough to compare row by row and name each key:
missing in PostgreSQL, extra there, or changed (with its columns).
Quarantined rows are matched against ``migrate.quarantine``; the AGE graph's
node and edge counts against what the cleaned source implies.

The source side (SQLite reading and cleaning, the larger half, pure Python)
runs in a worker process so it overlaps the PostgreSQL side on another core;
a thread would share one core with it under the GIL. PostgreSQL is read in
one read-only REPEATABLE READ transaction: every table from one snapshot.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import timezone, tzinfo
from pathlib import Path
from typing import Any, Mapping, Sequence

import asyncpg

from ..backends.age import EDGE_LABELS, GRAPH_RE, VERTEX_KEYS
from ..config import SecretUrl, Settings, parse_postgres_url
from ..errors import ConfigError, SchemaError, StoreUnavailableError
from .backfill import parse_timezone, select_tables
from .checksums import (
    BATCH, MASK64, Difference, Key, KeyRanges, NarrowStats, RowForm, Span, Sums, accumulate, finish, narrow,
    new_sums, shorten, span_where,
)
from .source import LegacySource, quote_ident
from .targets import TARGETS
from .verify_source import MAX_WORKERS, SPLIT_MIN_ROWS, SPLIT_TABLES, SourceSide

UTC = timezone.utc
_EXISTING_SQL = {"agent": "SELECT agent_id FROM core.identities", "discovery": "SELECT id FROM core.discoveries",
                 "dialectic session": "SELECT session_id FROM core.dialectic_sessions"}
GRAPH_TABLES = ("agent_metadata", "discoveries", "discovery_tags", "discovery_edges", "dialectic_sessions",
                "dialectic_messages")



# -- the PostgreSQL side ------------------------------------------------------------

class PostgresSide:
    """The target rows, read inside the caller's transaction on one connection."""

    def __init__(self, conn: asyncpg.Connection, forms: Mapping[str, RowForm]):
        self.conn, self.forms = conn, forms
        self.seconds = 0.0

    def _select(self, table: str, span: Span, what: str = "", order: bool = False,
                limit: int | None = None) -> tuple[str, list]:
        target = TARGETS[table]
        where, args = span_where(target.key, span, lambda n: f"${n}")
        what = what or ", ".join(quote_ident(c) for c in target.columns)
        sql = f"SELECT {what} FROM {target.table} WHERE {where}"
        if order:
            sql += " ORDER BY " + ", ".join(quote_ident(k) for k in target.key)
        return sql + (f" LIMIT {int(limit)}" if limit is not None else ""), args

    async def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums:
        started = time.perf_counter()
        form, sums = self.forms[table], new_sums(ranges)
        sql, args = self._select(table, span)
        cur = await self.conn.cursor(sql, *args)
        pending: asyncio.Future | None = asyncio.ensure_future(cur.fetch(BATCH))
        try:
            while pending is not None:
                rows = await pending
                pending = None
                if len(rows) == BATCH:
                    # Ask for the next batch before hashing this one: PostgreSQL works meanwhile.
                    pending = asyncio.ensure_future(cur.fetch(BATCH))
                    await asyncio.sleep(0)
                accumulate(form, ranges, rows, sums)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        self.seconds += time.perf_counter() - started
        return finish(sums)

    async def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]:
        form = self.forms[table]
        sql, args = self._select(table, span, order=True, limit=limit)
        out = []
        for r in await self.conn.fetch(sql, *args):
            norm = form.normalise(r)
            out.append((form.key(norm), norm))
        return out

    async def keys(self, table: str, span: Span) -> list[Key]:
        key = TARGETS[table].key
        sql, args = self._select(table, span, ", ".join(quote_ident(k) for k in key), order=True)
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]



# -- the report ---------------------------------------------------------------------

@dataclass
class TableResult:
    """The verification of one legacy table."""

    table: str
    target: str
    source_rows: int = 0
    quarantined: int = 0          # by the cleaner, or refused by PostgreSQL while loading
    postgres_rows: int = 0
    quarantine_recorded: int = 0  # rows of migrate.quarantine for this source and table
    checksum_source: str = ""
    checksum_postgres: str = ""
    ranges: int = 0
    ranges_differing: int = 0
    unrecorded_quarantine: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.source_rows - self.quarantined

    @property
    def checksum_match(self) -> bool:
        return self.ranges_differing == 0 and self.expected == self.postgres_rows

    @property
    def ok(self) -> bool:
        return self.checksum_match and self.unrecorded_quarantine == 0

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "target": self.target, "ok": self.ok, "source_rows": self.source_rows,
                "quarantined": self.quarantined, "expected": self.expected, "postgres_rows": self.postgres_rows,
                "quarantine_recorded": self.quarantine_recorded, "checksum_match": self.checksum_match,
                "checksum_source": self.checksum_source, "checksum_postgres": self.checksum_postgres,
                "ranges": self.ranges, "ranges_differing": self.ranges_differing,
                "unrecorded_quarantine": self.unrecorded_quarantine,
                "differences": [d.to_dict() for d in self.differences]}


@dataclass
class GraphResult:
    checked: bool
    name: str
    expected: dict[str, int] = field(default_factory=dict)
    actual: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.checked or all(self.expected.get(k, 0) == self.actual.get(k, 0)
                                       for k in self.expected.keys() | self.actual.keys())

    def to_dict(self) -> dict[str, Any]:
        labels = sorted(self.expected.keys() | self.actual.keys(), key=_label_order)
        return {"checked": self.checked, "name": self.name, "ok": self.ok, "reason": self.reason or None,
                "labels": [{"label": k, "expected": self.expected.get(k, 0), "actual": self.actual.get(k, 0)}
                           for k in labels]}


def _label_order(label: str) -> tuple[int, str]:
    order = [*VERTEX_KEYS, *EDGE_LABELS]
    return (order.index(label), label) if label in order else (len(order), label)


@dataclass
class VerifyReport:
    source: str
    fingerprint: str
    target: str
    source_timezone: str
    tables: list[TableResult] = field(default_factory=list)
    graph: GraphResult | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_source: float = 0.0
    seconds_postgres: float = 0.0
    workers: int = 1

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables) and (self.graph is None or self.graph.ok)

    def table(self, name: str) -> TableResult:
        return next(t for t in self.tables if t.table == name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "fingerprint": self.fingerprint, "target": self.target,
                "source_timezone": self.source_timezone, "tables": [t.to_dict() for t in self.tables],
                "graph": self.graph.to_dict() if self.graph else None, "notes": self.notes,
                "seconds": {"total": round(self.seconds, 3), "source": round(self.seconds_source, 3),
                            "postgres": round(self.seconds_postgres, 3)}, "source_workers": self.workers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def render(self) -> list[Any]:
        """Return rich renderables: the per-table summary, the differences, the graph."""
        from rich.table import Table
        from rich.text import Text  # data as Text: ids holding [brackets] are not markup
        yes, no = Text("yes", style="green"), Text("NO", style="red")
        out: list[Any] = []
        summary = Table(title=Text(f"verify: {self.source} -> {self.target}"), caption=(
            f"{sum(t.source_rows for t in self.tables):,} source rows in {self.seconds:.1f} s;"
            f" naive timestamps read in {self.source_timezone}"))
        for c in ("table", "source rows", "quarantined", "expected", "in PostgreSQL", "checksum match",
                  "first differences"):
            summary.add_column(c, justify="left" if c in ("table", "first differences") else "right")
        for t in self.tables:
            firsts = [d.describe() for d in t.differences[:3]]
            if len(t.differences) > 3:
                firsts.append(f"... {len(t.differences) - 3} more below")
            summary.add_row(t.table, f"{t.source_rows:,}", f"{t.quarantined:,}", f"{t.expected:,}",
                            f"{t.postgres_rows:,}", yes if t.checksum_match else no, Text("\n".join(firsts) or "-"))
        out.append(summary)
        diffs = [(t.table, d) for t in self.tables for d in t.differences]
        if diffs:
            detail = Table("table", "key", "difference", "detail", title="first differing keys")
            for name, d in diffs:
                detail.add_row(name, Text(d.key_text()), Text(d.what()), Text(shorten(d.detail, 160)))
            out.append(detail)
        if self.graph is not None and self.graph.checked:
            graph = Table("label", "expected", "in graph", "match", title=f"AGE graph {self.graph.name}")
            for row in self.graph.to_dict()["labels"]:
                graph.add_row(row["label"], f"{row['expected']:,}", f"{row['actual']:,}",
                              yes if row["expected"] == row["actual"] else no)
            out.append(graph)
        return out


# -- the run ------------------------------------------------------------------------

async def verify(postgres_url_or_settings: Settings | SecretUrl | str, sqlite_path: Path | str, *,
                 tables: Sequence[str] | str | None = None, source_tz: tzinfo | str = UTC, graph: bool = True,
                 graph_name: str | None = None, max_diffs: int = 10, workers: int | None = None) -> VerifyReport:
    """Compare the legacy file, cleaned as the backfill cleans it, with PostgreSQL; return the report.

    ``tables``: names of backfill.UNITS or legacy tables (None = all).
    ``graph_name``: default the settings' DB_AGE_GRAPH, else ``governance``.
    ``workers``: processes reading the source (default: one per CPU, at
    most 4, when audit_events and tool_usage are large; else 1).
    Raises GovdbError subclasses when it cannot verify (bad input, no
    database, unreadable file); differences are in the report (``.ok``).
    """
    started = time.perf_counter()
    settings = _settings(postgres_url_or_settings)
    graph_name = graph_name or settings.age_graph
    if not GRAPH_RE.match(graph_name):
        raise ConfigError("--graph-name", f"must be 3-63 letters, digits or _; got {graph_name!r}")
    if not isinstance(max_diffs, int) or max_diffs < 1:
        raise ConfigError("--max-diffs", f"must be a positive whole number; got {max_diffs!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError("--workers", f"must be a positive whole number; got {workers!r}")
    selected, tz = select_tables(tables), parse_timezone(source_tz)
    with LegacySource(sqlite_path) as probe:
        path, fingerprint = probe.path, probe.fingerprint()
        if workers is None:
            split_rows = sum(probe.count(t) for t in SPLIT_TABLES if t in selected)
            # Measured on 2 CPUs: 2 workers beat 1 (and 3) though this process also hashes PostgreSQL's rows.
            workers = 1 if split_rows < SPLIT_MIN_ROWS else max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    url = settings.postgres_url
    report = VerifyReport(str(path), fingerprint, url.masked, str(tz), workers=workers)
    conn = await _connect(url)
    spawn = multiprocessing.get_context("spawn")  # fork is unsafe with a running event loop and threads
    pools = [ProcessPoolExecutor(1, mp_context=spawn) for _ in range(workers)]
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _run(conn, SourceSide(pools), report, selected, tz, graph, graph_name, max_diffs)
    except asyncpg.PostgresError as exc:
        raise StoreUnavailableError(f"PostgreSQL at {url.masked} refused a query ({type(exc).__name__}:"
                                    f" {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    except (OSError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailableError(f"lost PostgreSQL at {url.masked} ({type(exc).__name__}: {exc})") from exc
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        if not conn.is_closed():
            await conn.close()
    report.seconds = time.perf_counter() - started
    return report


async def _run(conn: asyncpg.Connection, src: SourceSide, report: VerifyReport, selected: list[str], tz: tzinfo,
               graph: bool, graph_name: str, max_diffs: int) -> None:
    # The workers start (spawn, import) while PostgreSQL is read.
    opened = asyncio.gather(*(src.call("open", report.source, tz, worker=j) for j in range(src.workers)))
    try:
        kinds = {t: await _column_kinds(conn, t) for t in selected}
        quarantine, notes = await _quarantine(conn, report.fingerprint, selected)
        report.notes += notes
        existing = {kind: {r[0] for r in await conn.fetch(sql)} for kind, sql in _EXISTING_SQL.items()}
    finally:
        await opened
    planned = await asyncio.gather(*(src.call("setup", kinds, quarantine, existing, selected if j == 0 else [],
                                              worker=j) for j in range(src.workers)))
    ranges = {t: planned[0][t][0] for t in selected}
    counts = {t: planned[0][t][1] for t in selected}
    started = time.perf_counter()

    async def source_side() -> dict[str, dict[str, Any]]:
        found = await src.scan_all(selected, ranges, counts, max_diffs)
        report.seconds_source = time.perf_counter() - started
        return found

    scanning = asyncio.ensure_future(source_side())
    pg = PostgresSide(conn, {t: RowForm.for_table(t, kinds[t]) for t in selected})
    try:
        pg_sums = {t: await pg.checksums(t, ranges[t], None) for t in selected}
        report.seconds_postgres = pg.seconds
        results = await scanning
    finally:
        scanning.cancel()
    for t in selected:
        r, target = results[t], TARGETS[t]
        res = TableResult(t, target.table, source_rows=r["source_rows"], quarantined=r["quarantined"] + r["refused"],
                          postgres_rows=sum(c for c, _ in pg_sums[t]), quarantine_recorded=len(quarantine.get(t, ())),
                          checksum_source=_total(r["sums"]), checksum_postgres=_total(pg_sums[t]),
                          ranges=ranges[t].size - 1, unrecorded_quarantine=r["unrecorded_count"])
        res.differences = [Difference("unrecorded-quarantine", k, (), reason) for k, reason in r["unrecorded"]]
        stats = NarrowStats()
        if r["sums"] != pg_sums[t] and len(res.differences) < max_diffs:
            res.differences += await narrow(t, target.columns, src, pg, ranges[t], r["sums"], pg_sums[t],
                                            max_diffs=max_diffs - len(res.differences), stats=stats,
                                            show=pg.forms[t].show)
        res.ranges_differing = sum(a != b for a, b in zip(r["sums"], pg_sums[t]))
        stale = res.quarantine_recorded - r["matched"]
        if stale > 0:
            report.notes.append(f"{t}: {stale} rows of migrate.quarantine name keys the source no longer has")
        report.tables.append(res)
    if not graph:
        report.graph = GraphResult(False, graph_name, reason="not asked for (--no-graph)")
    elif missing := [t for t in GRAPH_TABLES if t not in selected]:
        report.graph = GraphResult(False, graph_name, reason=f"needs the tables {', '.join(missing)} in --tables")
    else:
        report.graph = await _graph(conn, graph_name, results)
    if not report.graph.checked:
        report.notes.append(f"graph check skipped: {report.graph.reason}")
    elif report.graph.reason:
        report.notes.append(report.graph.reason)


def _total(sums: Sums) -> str:
    return f"{sum(c for c, _ in sums)}:{sum(s for _, s in sums) & MASK64:016x}"


async def _column_kinds(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    target = TARGETS[table]
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", target.table):
        raise SchemaError(f"PostgreSQL has no table {target.table}: nothing was migrated there"
                          " (run the backfill first, or check --postgres)")
    rows = await conn.fetch("SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t"
                            " ON t.oid = a.atttypid WHERE a.attrelid = $1::regclass AND a.attnum > 0"
                            " AND NOT a.attisdropped", target.table)
    kinds = {r[0]: r[1] for r in rows}
    missing = [c for c in target.columns if c not in kinds]
    if missing:
        raise SchemaError(f"{target.table} has no column {', '.join(missing)}; the schema is not the one govdb expects")
    return kinds


async def _quarantine(conn: asyncpg.Connection, fingerprint: str,
                      selected: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Return the quarantined keys recorded for this source, per table, and notes on the checkpoints."""
    if not await conn.fetchval("SELECT to_regclass('migrate.quarantine') IS NOT NULL"):
        return {}, ["PostgreSQL has no migrate.quarantine table: no backfill has run against it"]
    quarantine: dict[str, list[str]] = {}
    for r in await conn.fetch("SELECT source_table, key FROM migrate.quarantine WHERE source = $1"
                              " AND source_table = ANY($2::text[])", fingerprint, selected):
        quarantine.setdefault(r[0], []).append(r[1])
    done = {r[0]: r[1] for r in await conn.fetch(
        "SELECT source_table, done FROM migrate.checkpoints WHERE source = $1", fingerprint)}
    notes = [f"{t}: the backfill of this source has not finished it (run the backfill with --resume)"
             for t in selected if t in done and not done[t]]
    if not done:
        notes.append("no backfill of this source file is recorded in migrate.checkpoints")
    return quarantine, notes


async def _graph(conn: asyncpg.Connection, name: str, results: Mapping[str, dict[str, Any]]) -> GraphResult:
    if not await conn.fetchval("SELECT to_regclass('ag_catalog.ag_graph') IS NOT NULL") or not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = $1)", name):
        return GraphResult(False, name, reason=f"the database has no AGE graph {name!r}")
    expected: Counter[str] = Counter({label: 0 for label in (*VERTEX_KEYS, *EDGE_LABELS)})
    tags: set[str] = set()
    for r in results.values():
        expected.update(r["graph"])
        tags |= r["tags"]
    expected["Tag"] = len(tags)
    from .graph import graph_counts
    actual = await graph_counts(conn, name)
    result = GraphResult(True, name, dict(expected), dict(actual))
    if not any(actual.values()) and any(expected.values()):
        result.reason = "the graph is empty: build it (govdb migrate graph)"
    return result


def _settings(value: Settings | SecretUrl | str) -> Settings:
    if isinstance(value, Settings):
        return value
    url = value if isinstance(value, SecretUrl) else parse_postgres_url(str(value), "--postgres")
    return Settings(backend="postgres", postgres_url=url)


async def _connect(url: SecretUrl) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url.reveal(), server_settings={
            "application_name": "govdb-verify", "TimeZone": "UTC", "default_transaction_read_only": "on"})
    except asyncpg.InvalidCatalogNameError as exc:
        raise StoreUnavailableError(f"PostgreSQL at {url.masked} has no such database") from exc
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreUnavailableError(f"cannot connect to PostgreSQL at {url.masked} ({type(exc).__name__}: {first})") \
            from exc

