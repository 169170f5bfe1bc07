"""Migration benchmark: on one legacy file, in one go, our backfill vs pgloader,
our graph bulk load vs a per-statement load, and verify.

    .venv/bin/python bench/migration_bench.py --scale 1.0

Needs a PostgreSQL with AGE (default: the one `govdb pg start` runs for
.govdb/pg, or --postgres URL; it creates and drops databases named bench_*)
and pgloader (Debian package `pgloader`; skipped with a note when missing).
Writes bench/results/migration-scale<scale>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import drop_db, fresh_db, local_postmaster, pg_facts, tree_cpu_seconds  # noqa: E402
from generate_legacy import generate  # noqa: E402

from govdb.migrate.backfill import backfill  # noqa: E402
from govdb.migrate.graph import graph_counts, load_graph, load_graph_per_statement  # noqa: E402
from govdb.migrate.verify import verify  # noqa: E402

GRAPH = "governance"


class CpuMeter:
    """CPU seconds a step used: this process and its reaped children (backfill workers,
    pgloader), and the local PostgreSQL's processes (None for a server elsewhere)."""

    def __init__(self, postmaster: int | None):
        self.postmaster = postmaster

    @staticmethod
    def _client() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self) -> "CpuMeter":
        self._c0 = self._client()
        self._p0 = tree_cpu_seconds(self.postmaster) if self.postmaster else None
        return self

    def __exit__(self, *exc: object) -> None:
        self.client = round(self._client() - self._c0, 1)
        self.postgres = None if self._p0 is None else round(tree_cpu_seconds(self.postmaster) - self._p0, 1)

    def as_dict(self) -> dict:
        return {"client_cpu_s": self.client, "postgres_cpu_s": self.postgres}


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


async def atimed(coro):
    t0 = time.perf_counter()
    out = await coro
    return out, time.perf_counter() - t0


def run_pgloader(sqlite_path: Path, url: str) -> dict:
    if not shutil.which("pgloader"):
        return {"skipped": "pgloader is not installed (apt-get install pgloader)"}
    # The settings with which pgloader completed reliably here (its defaults
    # ran out of heap on the reference file in 2 of 5 runs).
    load = (f"LOAD DATABASE FROM sqlite://{sqlite_path} INTO {url}\n"
            " WITH include drop, create tables, create indexes, reset sequences, prefetch rows = 10000;\n")
    with tempfile.NamedTemporaryFile("w", suffix=".load", delete=False) as f:
        f.write(load)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(["pgloader", f.name], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        os.unlink(f.name)
    return {"seconds": round(seconds, 2), "exit_status": proc.returncode, "log_tail": proc.stdout[-3000:]}


async def pg_table_counts(url: str, schema: str = "public") -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        names = [r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
            schema)]
        return {n: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{n}"') for n in sorted(names)}
    finally:
        await conn.close()


async def graph_bench(admin_url: str, work: Path, sizes: list[int], per_statement_max: int) -> list[dict]:
    """Bulk load vs per-statement load at each size (per-statement only up to ``per_statement_max``)."""
    out = []
    for n in sizes:
        path = work / f"knowledge-{n}.db"
        generate(path, discoveries=n)
        name = f"bench_graph_{n}"
        url = await fresh_db(admin_url, name)
        await backfill(url, path, progress=False)
        conn = await asyncpg.connect(url)
        try:
            row = {"discoveries": n}
            counts, row["bulk_seconds"] = await atimed(load_graph(conn, GRAPH))
            row["nodes_and_edges"] = sum((await graph_counts(conn, GRAPH)).values())
            again, row["bulk_rerun_seconds"] = await atimed(load_graph(conn, GRAPH))
            row["bulk_rerun_added"] = sum(again.values())
            if n <= per_statement_max:
                await conn.execute("SELECT ag_catalog.drop_graph($1, true)", GRAPH)
                # AGE 1.5 leaves a session that dropped a graph with a corrupt label cache.
                await conn.close()
                conn = await asyncpg.connect(url)
                _, row["per_statement_seconds"] = await atimed(load_graph_per_statement(conn, GRAPH))
                row["per_statement_nodes_and_edges"] = sum((await graph_counts(conn, GRAPH)).values())
                row["speedup"] = round(row["per_statement_seconds"] / row["bulk_seconds"], 1)
        finally:
            await conn.close()
            await drop_db(admin_url, name)
        out.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(out[-1]), flush=True)
    return out


async def main_async(args) -> dict:
    admin = args.postgres
    work = Path(tempfile.mkdtemp(prefix="govdb-bench-"))
    result: dict = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "scale": args.scale, "dirty": args.dirty,
    }
    facts = await pg_facts(admin)
    result["machine"]["postgres"] = facts["version"]
    postmaster = local_postmaster(facts["postmaster_pid"])
    try:
        src = work / "governance.db"
        counts, result["generate_seconds"] = timed(generate, src, scale=args.scale, dirty=args.dirty)
        result["source_rows"] = counts
        result["source_total"] = sum(v for k, v in counts.items() if k != "rate_limits")
        print(f"source: {result['source_total']:,} rows", flush=True)

        if not args.skip_pgloader:
            url = await fresh_db(admin, "bench_pgloader")
            with CpuMeter(postmaster) as cpu:
                result["pgloader"] = run_pgloader(src, url)
            result["pgloader"].update(cpu.as_dict())
            loaded = await pg_table_counts(url)
            result["pgloader"]["rows_loaded"] = loaded
            result["pgloader"]["rows_lost"] = {t: counts[t] - loaded.get(t, 0) for t in counts
                                               if counts[t] != loaded.get(t, 0)}
            await drop_db(admin, "bench_pgloader")
            print(f"pgloader: {result['pgloader'].get('seconds')} s", flush=True)

        url = await fresh_db(admin, "bench_govdb")
        with CpuMeter(postmaster) as cpu:
            report, secs = await atimed(backfill(url, src, progress=False))
        result["backfill"] = {
            "seconds": round(secs, 2), "rows_per_second": round(report.source_rows / secs), **cpu.as_dict(),
            "reconciled": report.reconciled,
            "tables": {t.table: {"source": t.source_rows, "migrated": t.migrated, "quarantined": t.quarantined,
                                 "repaired": t.repaired, "seconds": round(t.seconds, 2)} for t in report.tables},
            "notes": report.notes,  # among them the deferred index builds and their times
        }
        print(f"backfill: {secs:.1f} s", flush=True)
        _, result["backfill_rerun_seconds"] = await atimed(backfill(url, src, progress=False))
        conn = await asyncpg.connect(url)
        try:
            added, secs = await atimed(load_graph(conn, GRAPH))
            result["graph_bulk"] = {"seconds": round(secs, 2), "added": added}
        finally:
            await conn.close()
        print(f"graph bulk load: {secs:.1f} s", flush=True)
        with CpuMeter(postmaster) as cpu:
            rep, secs = await atimed(verify(url, src, graph=True, graph_name=GRAPH))
        result["verify"] = {"seconds": round(secs, 2), "ok": rep.ok, **cpu.as_dict()}
        print(f"verify: {secs:.1f} s ok={rep.ok}", flush=True)
        await drop_db(admin, "bench_govdb")

        if args.graph_sizes:
            result["graph_sizes"] = await graph_bench(admin, work, args.graph_sizes, args.per_statement_max)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    lines = [f"Migration benchmark, {r['when']}: {r['machine']['cpus']} CPUs, PostgreSQL {r['machine']['postgres']},"
             f" Python {r['machine']['python']}; source {r['source_total']:,} rows (scale {r['scale']},"
             f" dirty rows: {'yes' if r['dirty'] else 'no'}).", "",
             "| step | seconds | client CPU s | PostgreSQL CPU s | note |", "|---|---:|---:|---:|---|"]
    pg = r.get("pgloader")
    if pg and "seconds" in pg:
        lost = ", ".join(f"{t} {n:,}" for t, n in pg["rows_lost"].items()) or "none"
        lines.append(f"| pgloader (prefetch rows = 10000) | {pg['seconds']} | {_cpu(pg)} | exit {pg['exit_status']};"
                     f" rows lost: {lost} |")
    b = r["backfill"]
    lines.append(f"| govdb backfill | {b['seconds']} | {_cpu(b)} | {b['rows_per_second']:,} rows/s;"
                 f" reconciled: {b['reconciled']} |")
    lines.append(f"| govdb backfill, second run (idempotent) | {round(r['backfill_rerun_seconds'], 2)} | - | - | |")
    lines.append(f"| graph bulk load | {r['graph_bulk']['seconds']} | - | - |"
                 f" {sum(r['graph_bulk']['added'].values()):,} nodes+edges |")
    lines.append(f"| verify | {r['verify']['seconds']} | {_cpu(r['verify'])} | ok: {r['verify']['ok']} |")
    lines += ["", "Backfill notes:", ""] + [f"- {n}" for n in b.get("notes", [])]
    if r.get("graph_sizes"):
        lines += ["", "| discoveries | bulk load s | per-statement s | speedup | nodes+edges |", "|---:|---:|---:|---:|---:|"]
        for g in r["graph_sizes"]:
            lines.append(f"| {g['discoveries']:,} | {g['bulk_seconds']} | {g.get('per_statement_seconds', '-')} |"
                         f" {g.get('speedup', '-')} | {g['nodes_and_edges']:,} |")
    return "\n".join(lines) + "\n"


def _cpu(step: dict) -> str:
    pg = step.get("postgres_cpu_s")
    return f"{step.get('client_cpu_s', '-')} | {'-' if pg is None else pg}"


def default_postgres() -> str | None:
    url = os.environ.get("GOVDB_BENCH_POSTGRES_URL") or os.environ.get("GOVDB_TEST_POSTGRES_URL")
    if url:
        return url
    try:
        from govdb import localpg
        return localpg.url(HERE.parent / ".govdb" / "pg")
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.1, help="1.0 = the 1.83 M-row reference file")
    ap.add_argument("--dirty", action="store_true", help="add one row of each dirty case")
    ap.add_argument("--postgres", default=default_postgres(), help="admin URL of a PostgreSQL with AGE")
    ap.add_argument("--skip-pgloader", action="store_true")
    ap.add_argument("--graph-sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[2000, 10000, 50000],
                    help="discoveries per graph-only run (default 2000,10000,50000; empty to skip)")
    ap.add_argument("--per-statement-max", type=int, default=2000,
                    help="largest size at which to run the slow per-statement load (default 2000)")
    ap.add_argument("--out", type=Path, default=None, help="result file stem (default bench/results/migration-scale<S>)")
    args = ap.parse_args(argv)
    if not args.postgres:
        print("error: no PostgreSQL: pass --postgres URL or run `govdb pg start`", file=sys.stderr)
        return 1
    result = asyncio.run(main_async(args))
    stem = args.out or HERE / "results" / f"migration-scale{args.scale:g}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
