"""Write benchmark of the backends through govdb's Python API: sqlite, postgres and dual.

    .venv/bin/python bench/dual_bench.py                     # ~5 minutes
    .venv/bin/python bench/dual_bench.py --duration 5 --outage-writes 2000

For each backend and 1 and 16 concurrent writers (asyncio tasks on one
store, `create_backend(Settings.from_env(...))`), a fresh store, one agent
per writer made up front, then writes for --duration seconds, each writer
choosing among the four kinds alike: agent state, audit event, tool usage,
discovery with two tags. Reports write latency p50/p99/max and writes/s
(also per kind) and this process's CPU per write (applying to PostgreSQL
included, PostgreSQL's own CPU not). Backends: sqlite, postgres, dual
(DB_DUAL_APPLY=background, the default) and dual-sync (DB_DUAL_APPLY=sync).
For the dual ones it also samples, every 20 ms, how many acknowledged writes
are queued for the background applier (the batch it is applying not
counted), and times when PostgreSQL had them all and when the outbox
records were deleted.

Then the outage: in dual mode with PostgreSQL unreachable (DB_POSTGRES_URL
on a port where nothing listens) --outage-writes writes are made (16
writers, same mix); they land in SQLite and its outbox. Then a new dual
store on the real PostgreSQL replays the queue (`DualDatabase.replay()`,
what `govdb dual replay` runs), timed from connect to an empty queue, and
the PostgreSQL row counts are checked against what was written.

Without --postgres URL a local PostgreSQL is started with `govdb pg start`.
Writes bench/results/dual-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as c  # noqa: E402

from govdb.backends import create_backend  # noqa: E402
from govdb.config import Settings  # noqa: E402

KINDS = ("state", "audit", "tool_usage", "discovery")
TAGS = [f"topic-{i}" for i in range(12)]
PAIRS = (("core.identities", "agent_metadata"), ("core.agent_state", "agent_state"), ("audit.events", "audit_events"),
         ("audit.tool_usage", "tool_usage"), ("core.discoveries", "discoveries"), ("core.discovery_tags", "discovery_tags"))
#: Backend name of a cell -> (DB_BACKEND, DB_DUAL_APPLY).
BACKENDS = {"sqlite": ("sqlite", "background"), "postgres": ("postgres", "background"),
            "dual": ("dual", "background"), "dual-sync": ("dual", "sync")}


def settings(backend: str, sqlite_path: Path | None, pg_url: str | None, max_conn: int) -> Settings:
    kind, apply = BACKENDS[backend]
    env = {"DB_BACKEND": kind, "DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": str(max_conn),
           "DB_DUAL_READ_PRIMARY": "postgres", "DB_DUAL_APPLY": apply}
    if sqlite_path is not None:
        env["DB_SQLITE_PATH"] = str(sqlite_path)
    if pg_url is not None:
        env["DB_POSTGRES_URL"] = pg_url
    return Settings.from_env(env)


async def one_write(db: Any, kind: str, agent: str, rnd: random.Random, n: int) -> None:
    if kind == "state":
        await db.record_agent_state(agent, energy=rnd.random(), integrity=rnd.random(), entropy=rnd.uniform(0.01, 1.5),
                                    void=rnd.uniform(-1, 1), regime=rnd.choice(["nominal", "warning"]),
                                    state={"step": n})
    elif kind == "audit":
        await db.append_audit_event("checkin", agent_id=agent, details={"n": n, "r": rnd.random()})
    elif kind == "tool_usage":
        await db.record_tool_usage("check_in", agent_id=agent, latency_ms=rnd.randrange(1, 200),
                                   success=rnd.random() > 0.02, payload={"n": n})
    else:
        await db.add_discovery(f"{agent}-d{n}", agent_id=agent, type=rnd.choice(["insight", "question"]),
                               summary=f"discovery {n} about entropy", details="cache queue drift " * 5,
                               tags=rnd.sample(TAGS, 2))


async def drive(db: Any, writers: int, *, duration: float | None = None, total: int | None = None,
                prefix: str = "w") -> dict[str, Any]:
    """Run ``writers`` tasks writing the mix for ``duration`` s or ``total`` writes; return the figures."""
    agents = [f"{prefix}-{i:02d}" for i in range(writers)]
    for a in agents:
        await db.create_identity(a, api_key=f"key-{a}-0123456789abcdef")
    samples: list[tuple[str, float]] = []
    errors: Counter[str] = Counter()
    counter = [0]
    deadline = None if duration is None else time.perf_counter() + duration

    async def writer(i: int) -> None:
        rnd = random.Random(i)
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if total is not None:
                if counter[0] >= total:
                    return
            counter[0] += 1
            n = counter[0]
            kind = rnd.choice(KINDS)
            t0 = time.perf_counter()
            try:
                await one_write(db, kind, agents[i], rnd, n)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors[f"{kind}: {type(exc).__name__}"] += 1
                continue
            samples.append((kind, time.perf_counter() - t0))

    depths: list[int] = []

    async def sampler() -> None:  # acknowledged writes queued for the applier (dual)
        while True:
            depths.append(db.queued)
            await asyncio.sleep(0.02)

    t0, cpu0 = time.perf_counter(), c.cpu_seconds(os.getpid())
    sampling = asyncio.ensure_future(sampler()) if hasattr(db, "queued") else None
    await asyncio.gather(*(writer(i) for i in range(writers)))
    elapsed = time.perf_counter() - t0
    caught_up = None
    if hasattr(db, "flush"):
        await db.flush()  # the CPU of applying them belongs to these writes
        caught_up = round(time.perf_counter() - t0 - elapsed, 3)
    cpu = c.cpu_seconds(os.getpid()) - cpu0
    if sampling is not None:
        sampling.cancel()
    out: dict[str, Any] = {"writers": writers, "seconds": round(elapsed, 2), "writes": len(samples),
                           "writes_per_s": round(len(samples) / elapsed, 1),
                           "client_cpu_ms_per_write": round(1000 * cpu / max(len(samples), 1), 3),
                           **{k: x for k, x in c.latency_summary([s for _, s in samples]).items() if k != "n"},
                           "errors": sum(errors.values()), "errors_by_type": dict(errors)}
    out["by_kind"] = {k: c.latency_summary([s for kk, s in samples if kk == k]) for k in KINDS}
    if depths:
        out["waiting_for_postgres"] = {"mean": round(sum(depths) / len(depths), 1), "max": max(depths),
                                       "applied_all_seconds_after_last_write": caught_up}
    return out


async def cell(backend: str, writers: int, args, admin: str | None, work: Path) -> dict[str, Any]:
    name = f"{backend}-{writers}-{next(_CELL_NUMBERS)}"  # a fresh SQLite file every run
    dual = BACKENDS[backend][0] == "dual"
    lite = work / f"{name}.db" if backend == "sqlite" or dual else None
    url = await c.fresh_db(admin, "bench_dual") if backend != "sqlite" else None
    db = create_backend(settings(backend, lite, url, args.pg_max_conn))
    await db.connect()
    try:
        result = {"backend": backend, **await drive(db, writers, duration=args.duration)}
        if dual:
            # Applied entries are deleted in later batches: wait until none is left, and say how long.
            from govdb.backends import outbox
            t0 = time.perf_counter()
            while (left := outbox.queue_counts(lite))["pending"] and time.perf_counter() - t0 < 30:
                await asyncio.sleep(0.1)
            result["outbox_left"], result["outbox_settle_seconds"] = left, round(time.perf_counter() - t0, 1)
    finally:
        await db.close()
    if dual:
        pg, lt = await _pg_counts(url), _sqlite_counts(lite)
        result["stores_match"] = pg == lt
        if pg != lt:
            result["row_counts"] = {"postgres": pg, "sqlite": lt}
    if url:
        await c.drop_db(admin, "bench_dual")
    return result


def _sqlite_counts(path: Path) -> dict[str, int]:
    import sqlite3
    conn = sqlite3.connect(path)
    try:
        out = {pg: conn.execute(f"SELECT count(*) FROM {lt}").fetchone()[0] for pg, lt in PAIRS}
    finally:
        conn.close()
    out["total"] = sum(out.values())
    return out


async def outage(args, admin: str, work: Path) -> dict[str, Any]:
    """Queue --outage-writes writes with PostgreSQL unreachable, then time the replay."""
    from govdb.backends import outbox
    lite = work / "outage.db"
    url = await c.fresh_db(admin, "bench_outage")
    schema = create_backend(settings("postgres", None, url, 2))
    await schema.connect()  # the schema exists; the server is then "down" for the writes
    await schema.close()
    dead = c.with_port(url, c.free_port())  # nothing listens there: PostgreSQL is "down"
    db = create_backend(settings("dual", lite, dead, args.pg_max_conn))
    await db.connect()
    try:
        during = await drive(db, 16, total=args.outage_writes, prefix="outage")
    finally:
        await db.close()
    queued = outbox.queue_counts(lite)
    db = create_backend(settings("dual", lite, url, args.pg_max_conn))
    t0 = time.perf_counter()
    await db.connect()
    try:
        res = await db.replay()
        while (left := outbox.queue_counts(lite)).get("pending", 0) and time.perf_counter() - t0 < 600:
            res = await db.replay()
        seconds = time.perf_counter() - t0
    finally:
        await db.close()
    counts, lite_counts = await _pg_counts(url), _sqlite_counts(lite)
    await c.drop_db(admin, "bench_outage")
    writes = during["writes"] + 16  # + the 16 agents
    return {"writes_during_outage": writes, "write_latency_during_outage": {
                k: during[k] for k in ("p50_ms", "p99_ms", "max_ms", "writes_per_s", "errors")},
            "queued": queued, "left_after_replay": left, "replay_seconds": round(seconds, 2),
            "replay_writes_per_s": round(writes / seconds, 1),
            "replay_entries_per_s": round(queued.get("pending", 0) / seconds, 1),
            "last_replay": {"applied": res.applied, "parked": res.parked, "error": res.error},
            "postgres_rows": counts, "sqlite_rows": lite_counts,
            "postgres_rows_match": counts == lite_counts}


async def _pg_counts(url: str) -> dict[str, int]:
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        out = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t, _ in PAIRS}
    finally:
        await conn.close()
    out["total"] = sum(out.values())
    return out


def medians(runs: list[dict], backends: list[str], writers: list[int]) -> list[dict[str, Any]]:
    """One cell per backend and writer count: the median of its runs' figures (runs that failed
    make the cell failed); the dual ones' outbox and row-count checks must hold in every run."""
    import statistics
    out = []
    for w in writers:
        for b in backends:
            mine = [x for x in runs if x["backend"] == b and x["writers"] == w]
            bad = [x for x in mine if "error" in x]
            if bad or not mine:
                out.append({"backend": b, "writers": w, "error": bad[0]["error"] if bad else "no run"})
                continue
            cell = {"backend": b, "writers": w, "runs": len(mine),
                    **{k: statistics.median(x[k] for x in mine)
                       for k in ("writes_per_s", "p50_ms", "p99_ms", "client_cpu_ms_per_write")},
                    "max_ms": max(x["max_ms"] for x in mine), "errors": sum(x["errors"] for x in mine),
                    "p50_ms_runs": [x["p50_ms"] for x in mine]}
            if "waiting_for_postgres" in mine[0]:
                cell["waiting_for_postgres"] = {
                    "mean": statistics.median(x["waiting_for_postgres"]["mean"] for x in mine),
                    "max": max(x["waiting_for_postgres"]["max"] for x in mine),
                    "applied_all_seconds_after_last_write": max(
                        x["waiting_for_postgres"]["applied_all_seconds_after_last_write"] for x in mine)}
            if "stores_match" in mine[0]:
                cell["stores_match"] = all(x["stores_match"] for x in mine)
                cell["outbox_settle_seconds"] = max(x["outbox_settle_seconds"] for x in mine)
                cell["outbox_left"] = {"pending": max(x["outbox_left"]["pending"] for x in mine)}
                cell["row_counts"] = [x["row_counts"] for x in mine if "row_counts" in x] or None
            out.append(cell)
    return out


def goal(cells: list[dict]) -> dict[str, Any] | None:
    out = []
    for w in sorted({x["writers"] for x in cells}):
        by = {x["backend"]: x for x in cells if x["writers"] == w and "error" not in x}
        if not {"sqlite", "postgres"} <= set(by):
            continue
        slower = max(by["sqlite"]["p50_ms"], by["postgres"]["p50_ms"])
        for dual in ("dual", "dual-sync"):
            if dual in by:
                out.append({"backend": dual, "writers": w, "dual_p50_ms": by[dual]["p50_ms"],
                            "slower_single_p50_ms": slower, "ratio": round(by[dual]["p50_ms"] / slower, 2),
                            "met": by[dual]["p50_ms"] <= 1.3 * slower})
    return out or None


def markdown(r: dict[str, Any]) -> str:
    lines = c.header("Write benchmark (sqlite, postgres, dual)", r) + [
             f"Writes through the Python API, {r['settings']['duration']} s per cell, mix of agent states, audit"
             f" events, tool usage and discoveries (two tags) in equal parts; dual: DB_DUAL_APPLY background"
             f" (the default), dual-sync: DB_DUAL_APPLY sync; DB_POSTGRES_MAX_CONN"
             f" {r['settings']['pg_max_conn']}. {r['settings']['repeat']} runs per cell, the backends in turn"
             " round after round; the table gives the median run (max and errors: over all runs).", "",
             "| backend | writers | writes/s | p50 ms | p99 ms | max ms | errors | client CPU ms/write |"
             " p50 ms of each run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["cells"]:
        if "error" in x:
            lines.append(f"| {x['backend']} | {x['writers']} | failed: {x['error']} ||||||")
            continue
        lines.append(f"| {x['backend']} | {x['writers']} | {c.fmt(x['writes_per_s'])} | {c.fmt(x['p50_ms'])} |"
                     f" {c.fmt(x['p99_ms'])} | {c.fmt(x['max_ms'])} | {x['errors']} |"
                     f" {x['client_cpu_ms_per_write']:.3f} | {', '.join(c.fmt(v) for v in x['p50_ms_runs'])} |")
    duals = [x for x in r["cells"] if x["backend"].startswith("dual") and "error" not in x]
    if duals:
        lines += ["", "| backend | writers | writes queued for the applier (batch in flight not counted): mean | max |"
                      " PostgreSQL had them all, after the last write | outbox records deleted, after that |"
                      " row counts of both stores |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for x in duals:
            w = x.get("waiting_for_postgres", {})
            lines.append(f"| {x['backend']} | {x['writers']} | {c.fmt(w.get('mean'))} | {c.fmt(w.get('max'))} |"
                         f" {c.fmt(w.get('applied_all_seconds_after_last_write'))} s |"
                         f" {x['outbox_settle_seconds']} s (left {x['outbox_left']['pending']}) |"
                         f" {'match' if x['stores_match'] else 'DIFFER: ' + str(x.get('row_counts'))} |")
    if r.get("goal"):
        lines += ["", "Goal: dual p50 <= 1.3x the slower single backend's p50:", ""]
        lines += [f"- {g['backend']}, {g['writers']} writer(s): {g['dual_p50_ms']} ms vs {g['slower_single_p50_ms']}"
                  f" ms = {g['ratio']}x: {'met' if g['met'] else 'NOT met'}" for g in r["goal"]]
    o = r.get("outage")
    if o and "error" not in o:
        lines += ["", f"Outage: {o['writes_during_outage']:,} writes made in dual mode with PostgreSQL unreachable"
                  f" (p50 {o['write_latency_during_outage']['p50_ms']} ms, {o['write_latency_during_outage']['errors']}"
                  f" errors); replay drained {o['queued'].get('pending', '?'):,} queued outbox entries in"
                  f" {o['replay_seconds']} s = **{c.fmt(o['replay_writes_per_s'])} writes/s**; left after replay:"
                  f" {o['left_after_replay']}; PostgreSQL rows {o['postgres_rows']['total']:,}"
                  f" ({'match' if o['postgres_rows_match'] else 'DO NOT match'} SQLite's rows)."]
    elif o:
        lines += ["", f"Outage: failed: {o['error']}"]
    return "\n".join(lines) + "\n"


async def main_async(args, admin: str | None, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"when": c.now_iso(), "command": c.command_line(), "machine": c.machine(),
                              "settings": {k: x for k, x in vars(args).items() if k not in ("out", "postgres")}}
    if admin:
        result["machine"]["postgres"] = (await c.pg_facts(admin))["version"]
    runs = []
    for writers in args.writers:
        for run in range(1, args.repeat + 1):
            for backend in args.backends:  # the backends back to back, round after round: noise hits all alike
                try:
                    x = await cell(backend, writers, args, admin, work)
                except Exception as exc:  # noqa: BLE001 - reported, the others run
                    x = {"backend": backend, "writers": writers, "error": f"{type(exc).__name__}: {exc}"}
                runs.append({"run": run, **x})
                print(f"{backend} x{writers} run {run}: " + (x.get("error") or f"{x['writes_per_s']} writes/s"
                      f" p50 {x['p50_ms']} p99 {x['p99_ms']} ms errors {x['errors']}"), flush=True)
    result["runs"] = runs
    result["cells"] = medians(runs, args.backends, args.writers)
    result["goal"] = goal(result["cells"])
    if args.outage_writes and admin:
        try:
            result["outage"] = await outage(args, admin, work)
        except Exception as exc:  # noqa: BLE001
            result["outage"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("outage:", result["outage"], flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=_backends, default=list(BACKENDS),
                    help=f"comma-separated, of {', '.join(BACKENDS)} (default all)")
    ap.add_argument("--writers", type=lambda s: [int(w) for w in s.split(",") if w], default=[1, 16])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, interleaved (default 3)")
    ap.add_argument("--outage-writes", type=int, default=10_000, help="writes queued during the outage (0: skip)")
    ap.add_argument("--pg-max-conn", type=int, default=16, help="DB_POSTGRES_MAX_CONN (default 16)")
    ap.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL (default: start one)")
    ap.add_argument("--out", type=Path, default=None, help="result file stem (default bench/results/dual-<date>)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="govdb-dual-"))
    try:
        need_pg = any(b != "sqlite" for b in args.backends) or args.outage_writes
        with c.postgres(args.postgres, work / "pg") if need_pg else _none() as admin:
            result = asyncio.run(main_async(args, admin, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return c.publish(args.out, "dual", result, markdown(result))


_CELL_NUMBERS = itertools.count(1)


def _backends(text: str) -> list[str]:
    names = [b for b in text.split(",") if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
    return names


def _none():
    import contextlib
    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
