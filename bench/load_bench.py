"""Load benchmark: `govdb serve --http` processes on one store, driven over MCP.

    .venv/bin/python bench/load_bench.py                      # full matrix, under 10 minutes
    .venv/bin/python bench/load_bench.py --duration 5 --backends sqlite --procs 1,8

For each backend (sqlite, postgres), each number of server processes (1, 4,
8) and without / with one long-running reader, it starts that many
`govdb serve --http` processes on one store (same DB_* settings; SQLite: one
file; PostgreSQL: a fresh database per cell), registers one agent per client
up front, then runs closed-loop MCP clients (the SDK's streamable HTTP
client), spread round-robin over the processes, from --client-procs separate
processes. The mix: 70 % check_in (with a live session; about a quarter of
them change regime, which adds an audit event; every call adds a tool-usage
row), 20 % reads (get_state, get_agent, search_discoveries,
query_audit_events, get_neighbors), 10 % store_discovery with two tags,
related_to links to earlier discoveries and sometimes a response_to.

The long reader runs in its own process and holds one read transaction open
for the whole cell (SQLite: BEGIN + reads, so the WAL cannot be checkpointed
past its snapshot; PostgreSQL: REPEATABLE READ), scanning the audit events,
tool usage and states with aggregations, pausing --reader-pause s between scans.

Both backends start from the same data: a legacy file from
bench/generate_legacy.py (--seed-scale), used as is by SQLite and backfilled
(+ graph) into a template database for PostgreSQL. Without --postgres URL a
local PostgreSQL is started with `govdb pg start` in a temporary directory.
Writes bench/results/load-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as c  # noqa: E402

TAGS = [f"topic-{i}" for i in range(12)]
WORDS = ["entropy", "cache", "queue", "latency", "drift", "batch", "schema", "review", "memory", "graph"]
READS = ("get_state", "get_agent", "search_discoveries", "query_audit_events", "get_neighbors")
READER_SQL = {
    "sqlite": [
        "SELECT event_type, count(*), sum(length(details_json)) FROM audit_events GROUP BY event_type",
        "SELECT tool_name, count(*), avg(latency_ms), sum(success) FROM tool_usage GROUP BY tool_name",
        "SELECT agent_id, count(*), avg(entropy) FROM agent_state GROUP BY agent_id",
    ],
    "postgres": [
        "SELECT event_type, count(*), sum(length(details::text)) FROM audit.events GROUP BY event_type",
        "SELECT tool_name, count(*), avg(latency_ms), count(*) FILTER (WHERE success) FROM audit.tool_usage"
        " GROUP BY tool_name",
        "SELECT agent_id, count(*), avg(entropy) FROM core.agent_state GROUP BY agent_id",
    ],
}


# -- the load generator (a child process) ------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, float]] = []  # (op, start, seconds)
        self.errors: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.measuring = False

    def add(self, op: str, start: float, seconds: float, error: str | None) -> None:
        if not self.measuring:
            return
        self.samples.append((op, start, seconds))
        if error:
            self.errors[f"{op}: {error}"] += 1


def _error_type(result: Any) -> str:
    err = (result.structured_content or {}).get("error") or {}
    kind = err.get("type", "ArgumentError")
    msg = err.get("message") or (result.content[0].text if result.content else "")
    for needle in ("database is locked", "database table is locked", "timeout", "too many clients"):
        if needle in msg.lower():
            return f"{kind} ({needle})"
    return kind


class Agent:
    """One closed-loop client: its agent, key, session, and the discoveries it knows."""

    def __init__(self, spec: dict[str, Any], known: list[str], seed: int):
        self.id, self.key, self.session = spec["agent_id"], spec["api_key"], spec["session_id"]
        self.url = spec["url"]
        self.known = known
        self.rnd = random.Random(seed)
        self.regime = "nominal"

    def next_call(self) -> tuple[str, str, dict[str, Any]]:
        r, rnd = self.rnd.random(), self.rnd
        if r < 0.70:
            if rnd.random() < 0.25:
                self.regime = "warning" if self.regime == "nominal" else "nominal"
            return "check_in", "check_in", {
                "agent_id": self.id, "api_key": self.key, "session_id": self.session,
                "energy": round(rnd.random(), 3), "integrity": round(rnd.random(), 3),
                "entropy": round(rnd.uniform(0.01, 1.5), 3), "void": round(rnd.uniform(-1, 1), 3),
                "regime": self.regime, "state": {"step": rnd.randrange(10**6)}}
        if r < 0.90:
            tool = rnd.choice(READS)
            args: dict[str, Any] = {
                "get_state": {"agent_id": self.id, "limit": 10},
                "get_agent": {"agent_id": self.id},
                "search_discoveries": {"query": rnd.choice(WORDS), "tags": [rnd.choice(TAGS)], "limit": 20},
                "query_audit_events": {"agent_id": self.id, "limit": 20},
                "get_neighbors": {"discovery_id": rnd.choice(self.known)},
            }[tool]
            return "read", tool, args
        words = rnd.sample(WORDS, 3)
        args = {"agent_id": self.id, "api_key": self.key, "type": rnd.choice(["insight", "question", "answer"]),
                "summary": f"Observed {words[0]} and {words[1]} around {words[2]} in run {rnd.randrange(10**6)}",
                "details": " ".join(rnd.choices(WORDS, k=20)), "tags": rnd.sample(TAGS, 2),
                "related_to": rnd.sample(self.known[-200:], min(2, len(self.known)))}
        if rnd.random() < 0.3:
            target = rnd.choice(self.known[-200:])
            if target not in args["related_to"]:
                args |= {"response_to": target, "response_type": rnd.choice(["extend", "question", "support"])}
        return "knowledge", "store_discovery", args


async def _client_loop(agent: Agent, rec: Recorder, stop: asyncio.Event, ready: asyncio.Event,
                       connected: list[int]) -> None:
    from mcp import Client
    while not stop.is_set():
        try:
            async with Client(agent.url, read_timeout_seconds=120) as client:
                connected[0] += 1
                if connected[0] >= connected[1]:
                    ready.set()
                while not stop.is_set():
                    op, tool, args = agent.next_call()
                    t0 = time.perf_counter()
                    try:
                        result = await client.call_tool(tool, args)
                    except Exception as exc:  # noqa: BLE001 - counted, then reconnect
                        rec.add(op, t0, time.perf_counter() - t0, f"client {type(exc).__name__}")
                        raise
                    rec.add(op, t0, time.perf_counter() - t0, _error_type(result) if result.is_error else None)
                    if result.is_error:
                        continue
                    data = result.structured_content or {}
                    for w in data.get("warnings", []):
                        rec.warnings[f"{tool}: {w.split('(')[0].strip()}"] += 1
                    if tool == "store_discovery":
                        agent.known.append(data["discovery"]["id"])
        except Exception:  # noqa: BLE001 - the transport broke: open a new client
            if not stop.is_set():
                await asyncio.sleep(0.1)


async def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    rec, stop, ready = Recorder(), asyncio.Event(), asyncio.Event()
    connected = [0, len(cfg["agents"])]
    agents = [Agent(a, list(cfg["known"]), seed=cfg["seed"] + i) for i, a in enumerate(cfg["agents"])]
    tasks = [asyncio.create_task(_client_loop(a, rec, stop, ready, connected)) for a in agents]
    await asyncio.wait_for(ready.wait(), 60)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    await asyncio.sleep(cfg["warmup"])
    rec.measuring = True
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.sleep(cfg["duration"])
    rec.measuring = False
    elapsed, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print("measured", flush=True)
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    return {"samples": [s for s in rec.samples if s[1] >= t0 and s[1] + s[2] <= t0 + elapsed],
            "errors": dict(rec.errors), "warnings": dict(rec.warnings), "elapsed": elapsed,
            "cpu_seconds": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}


# -- the long reader (a child process) -----------------------------------------

def _reader(cfg: dict[str, Any]) -> dict[str, Any]:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    scans: list[float] = []
    if cfg["backend"] == "sqlite":
        import sqlite3
        conn = sqlite3.connect(cfg["path"], isolation_level=None, timeout=30)
        conn.execute("BEGIN")  # the snapshot is taken by the first read and held to the end
        print("ready", flush=True)
        while not stop[0]:
            t0 = time.perf_counter()
            for sql in READER_SQL["sqlite"]:
                conn.execute(sql).fetchall()
            scans.append(time.perf_counter() - t0)
            time.sleep(cfg["pause"])
        conn.execute("ROLLBACK")
        conn.close()
    else:
        async def run() -> None:
            import asyncpg
            conn = await asyncpg.connect(cfg["url"])
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    print("ready", flush=True)
                    while not stop[0]:
                        t0 = time.perf_counter()
                        for sql in READER_SQL["postgres"]:
                            await conn.fetch(sql)
                        scans.append(time.perf_counter() - t0)
                        await asyncio.sleep(cfg["pause"])
            finally:
                await conn.close()
        asyncio.run(run())
    return {"scans": len(scans), **{k.replace("_ms", "_scan_ms"): x for k, x in c.latency_summary(scans).items()
                                    if k != "n"}}


def _child_main(mode: str) -> int:
    cfg = json.loads(sys.stdin.readline())
    out = asyncio.run(_worker(cfg)) if mode == "worker" else _reader(cfg)
    print(json.dumps(out), flush=True)
    return 0


# -- the orchestrator ---------------------------------------------------------

def _spawn(mode: str, cfg: dict[str, Any], log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, f"--_{mode}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.stdin.write(json.dumps(cfg) + "\n")
    proc.stdin.flush()
    return proc


def _expect_line(proc: subprocess.Popen, expected: str, what: str) -> None:
    line = proc.stdout.readline()
    if line.strip() != expected:
        raise RuntimeError(f"{what} did not say {expected!r} (exit {proc.poll()}); see the cell's log")


async def _setup_agents(urls: list[str], clients: int, seed_known: list[str]) -> tuple[list[dict], list[str]]:
    """Register one agent per client (through the servers), bind a session, store one discovery each."""
    from mcp import Client

    async def one(i: int) -> tuple[dict, str]:
        url = urls[i % len(urls)]
        async with Client(url) as client:
            async def call(tool: str, **args: Any) -> dict:
                r = await client.call_tool(tool, args)
                if r.is_error:
                    raise RuntimeError(f"setup {tool} failed: {r.content[0].text}")
                return r.structured_content
            reg = await call("register_agent", agent_id=f"load-{i:03d}", tags=["load"])
            key = reg["api_key"]
            sess = await call("bind_session", agent_id=f"load-{i:03d}", api_key=key, client_type="load-bench")
            disc = await call("store_discovery", agent_id=f"load-{i:03d}", api_key=key, tags=TAGS[:2],
                              summary=f"seed discovery {i} about entropy and cache",
                              related_to=seed_known[i:i + 2])
        return ({"agent_id": f"load-{i:03d}", "api_key": key, "session_id": sess["session"]["session_id"],
                 "url": url}, disc["discovery"]["id"])

    done = []
    for start in range(0, clients, 8):  # a few at a time: the servers are just up
        done += await asyncio.gather(*(one(i) for i in range(start, min(clients, start + 8))))
    return [a for a, _ in done], [d for _, d in done]


def _stop(procs: list[subprocess.Popen], timeout: float = 20) -> list[int | None]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


def run_cell(args, backend: str, procs: int, reader: bool, store: dict[str, Any], work: Path) -> dict[str, Any]:
    name = f"{backend}-p{procs}-{'reader' if reader else 'noreader'}"
    log_path = work / f"{name}.log"
    env = {k: x for k, x in os.environ.items() if not k.startswith("DB_")}
    env.update({"DB_BACKEND": backend, "DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": str(args.pg_max_conn)})
    if backend == "sqlite":
        db_path = work / f"{name}.db"
        shutil.copyfile(store["sqlite_seed"], db_path)
        env["DB_SQLITE_PATH"] = str(db_path)
    else:
        db_url = asyncio.run(c.fresh_db(store["admin_url"], "bench_load", template="bench_load_seed"))
        env["DB_POSTGRES_URL"] = db_url
    ports = [c.free_port() for _ in range(procs)]
    cell: dict[str, Any] = {"backend": backend, "procs": procs, "long_reader": reader, "clients": args.clients}
    with open(log_path, "w") as log:
        def command(i: int, port: int) -> list[str]:
            serve = ["serve", "--http", f"127.0.0.1:{port}"]
            if args.server_profile is None:
                return [c.GOVDB, *serve]
            args.server_profile.mkdir(parents=True, exist_ok=True)
            return [sys.executable, "-m", "cProfile", "-o", str(args.server_profile / f"{name}-{i}.prof"),
                    "-m", "govdb.cli", *serve]
        servers = [subprocess.Popen(command(i, p), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                   for i, p in enumerate(ports)]
        children: list[subprocess.Popen] = []
        try:
            for s, p in zip(servers, ports):
                c.wait_port(p, s, timeout=60)
            urls = [f"http://127.0.0.1:{p}/mcp" for p in ports]
            agents, known = asyncio.run(_setup_agents(urls, args.clients, store["seed_discoveries"]))
            known = store["seed_discoveries"][:200] + known
            rdr = None
            if reader:
                rdr = _spawn("reader", {"backend": backend, "path": env.get("DB_SQLITE_PATH"),
                                        "url": env.get("DB_POSTGRES_URL"), "pause": args.reader_pause}, log)
                children.append(rdr)
                _expect_line(rdr, "ready", "the long reader")
            workers = []
            for w in range(args.client_procs):
                mine = agents[w::args.client_procs]
                if mine:
                    workers.append(_spawn("worker", {"agents": mine, "known": known, "seed": 1000 * w,
                                                     "warmup": args.warmup, "duration": args.duration}, log))
            children += workers
            for wp in workers:
                _expect_line(wp, "ready", "a load generator")
            pg_pid = store.get("postmaster_pid")
            for wp in workers:
                wp.stdin.write("go\n")
                wp.stdin.flush()
            time.sleep(args.warmup)  # the workers measure after the same warm-up
            cpu0 = _cpu(servers, workers, rdr, pg_pid)
            t0 = time.perf_counter()
            for wp in workers:
                _expect_line(wp, "measured", "a load generator")
            wall = time.perf_counter() - t0
            cpu1 = _cpu(servers, workers, rdr, pg_pid)
            results = [json.loads(wp.stdout.readline()) for wp in workers]
            if rdr is not None:
                _stop([rdr])
                cell["reader"] = json.loads(rdr.stdout.readline() or "{}")
            _stop(workers)
            if backend == "sqlite":
                wal = Path(str(db_path) + "-wal")
                cell["sqlite_wal_mb_at_end"] = round(wal.stat().st_size / 2**20, 1) if wal.exists() else 0
        finally:
            _stop(children)
            codes = _stop(servers)
    cell["server_exit_codes"] = codes
    text = log_path.read_text(errors="replace")
    cell["server_log_warnings"] = {
        "tool usage not recorded": text.count("not recorded ("),
        "audit event not written": text.count("not written ("),
        "unexpected tool failures": text.count("failed unexpectedly"),
        "tracebacks": text.count("Traceback"),
    }
    cell.update(_summarise(results, wall, {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}))
    if backend == "postgres":
        asyncio.run(c.drop_db(store["admin_url"], "bench_load"))
    return cell


def _cpu(servers, workers, rdr, pg_pid) -> dict[str, float]:
    out = {"servers": sum(c.cpu_seconds(s.pid) for s in servers),
           "load_generators": sum(c.cpu_seconds(w.pid) for w in workers),
           "long_reader": c.cpu_seconds(rdr.pid) if rdr else 0.0,
           "machine": c.machine_busy()[0]}
    if pg_pid:
        out["postgres"] = c.tree_cpu_seconds(pg_pid)
    return out


def _summarise(results: list[dict], wall: float, cpu: dict[str, float]) -> dict[str, Any]:
    samples = [s for r in results for s in r["samples"]]
    elapsed = max(r["elapsed"] for r in results)
    errors: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        warnings.update(r["warnings"])
    by_op = {}
    for op in ("check_in", "read", "knowledge"):
        xs = [s[2] for s in samples if s[0] == op]
        by_op[op] = {**c.latency_summary(xs), "ops_per_s": round(len(xs) / elapsed, 1)}
    return {"seconds": round(elapsed, 1), "ops": len(samples), "ops_per_s": round(len(samples) / elapsed, 1),
            **{k: x for k, x in c.latency_summary([s[2] for s in samples]).items() if k != "n"},
            "errors": sum(errors.values()), "errors_by_type": dict(errors.most_common()),
            "result_warnings": dict(warnings.most_common()), "by_op": by_op,
            "cpu_cores_used": {k: round(x / wall, 2) for k, x in cpu.items()},
            "load_generator_cpu_self_reported": round(sum(r["cpu_seconds"] for r in results) / elapsed, 2)}


async def _prepare_postgres(admin_url: str, seed: Path | None, work: Path) -> None:
    from govdb.migrate.backfill import backfill
    from govdb.migrate.graph import load_graph
    url = await c.fresh_db(admin_url, "bench_load_seed")
    if seed is not None:
        await backfill(url, seed, progress=False)
        await load_graph(url)
    else:  # the schema only: one server start applies it
        from govdb.backends.postgres import PostgresDatabase
        from govdb.config import SecretUrl
        db = PostgresDatabase(SecretUrl(url), min_conn=1, max_conn=1)
        await db.connect()
        await db.close()


def _seed_discoveries(path: Path) -> list[str]:
    import sqlite3
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM discoveries ORDER BY id LIMIT 400")]
    finally:
        conn.close()


def markdown(r: dict[str, Any]) -> str:
    lines = c.header("Load benchmark", r) + [
             f"Settings: {r['settings']['clients']} closed-loop MCP clients (streamable HTTP) in"
             f" {r['settings']['client_procs']} processes, {r['settings']['duration']} s per cell after"
             f" {r['settings']['warmup']} s warm-up; mix 70 % check_in / 20 % reads / 10 % store_discovery;"
             f" DB_POSTGRES_MIN/MAX_CONN 1/{r['settings']['pg_max_conn']} per server process;"
             f" seed data: {r['settings']['seed_rows']:,} legacy rows (scale {r['settings']['seed_scale']}).", "",
             "| backend | procs | long reader | ops/s | p50 ms | p99 ms | max ms | errors | check_in p99 |"
             " CPU servers | CPU postgres | CPU load gen | CPU machine |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["cells"]:
        if "error" in x:
            lines.append(f"| {x['backend']} | {x['procs']} | {'yes' if x['long_reader'] else 'no'} |"
                         f" failed: {x['error']} |||||||||")
            continue
        cpu = x["cpu_cores_used"]
        lines.append(
            f"| {x['backend']} | {x['procs']} | {'yes' if x['long_reader'] else 'no'} | {c.fmt(x['ops_per_s'])} |"
            f" {c.fmt(x['p50_ms'])} | {c.fmt(x['p99_ms'])} | {c.fmt(x['max_ms'])} | {x['errors']} |"
            f" {c.fmt(x['by_op']['check_in']['p99_ms'])} | {cpu['servers']} | {cpu.get('postgres', '-')} |"
            f" {cpu['load_generators']} | {cpu['machine']} |")
    lines += ["", "Latency by kind of call (p50 / p99 ms):", "",
              "| backend | procs | long reader | check_in | reads | store_discovery | reader scans (n, p50 ms) | SQLite WAL at end |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for x in r["cells"]:
        if "error" in x:
            continue
        b, rd = x["by_op"], x.get("reader") or {}
        lines.append(f"| {x['backend']} | {x['procs']} | {'yes' if x['long_reader'] else 'no'} |"
                     + "".join(f" {c.fmt(b[k]['p50_ms'])} / {c.fmt(b[k]['p99_ms'])} |" for k in ("check_in", "read", "knowledge"))
                     + (f" {rd.get('scans')}, {c.fmt(rd.get('p50_scan_ms'))} |" if rd else " - |")
                     + (f" {x['sqlite_wal_mb_at_end']} MB |" if "sqlite_wal_mb_at_end" in x else " - |"))
    lines += ["", "CPU columns are cores used on average during the measured window (2.0 = both cores busy);"
              " 'machine' includes everything running on the machine.", ""]
    errs = [(x, e, n) for x in r["cells"] for e, n in x.get("errors_by_type", {}).items()]
    if errs:
        lines += ["Errors by type:", ""] + [
            f"- {x['backend']} p{x['procs']} {'reader' if x['long_reader'] else 'no reader'}: {e} x{n}"
            for x, e, n in errs] + [""]
    hidden = [(x, k, n) for x in r["cells"] for k, n in {**x.get("result_warnings", {}),
                                                         **x.get("server_log_warnings", {})}.items() if n]
    if hidden:
        lines += ["Warnings (the call succeeded but a follow-up write did not, or the server logged a failure):", ""]
        lines += [f"- {x['backend']} p{x['procs']} {'reader' if x['long_reader'] else 'no reader'}: {k} x{n}"
                  for x, k, n in hidden] + [""]
    if r.get("goals"):
        lines += ["Goals at 8 processes with the long reader:", ""]
        lines += [f"- {g['goal']}: {'met' if g['met'] else 'NOT met'} ({g['detail']})" for g in r["goals"]] + [""]
    return "\n".join(lines)


def goals(cells: list[dict]) -> list[dict]:
    pick = {x["backend"]: x for x in cells if x["procs"] == 8 and x["long_reader"] and "error" not in x}
    if not {"sqlite", "postgres"} <= set(pick):
        return []
    s, p = pick["sqlite"], pick["postgres"]
    return [
        {"goal": "postgres throughput >= sqlite's", "met": p["ops_per_s"] >= s["ops_per_s"],
         "detail": f"{p['ops_per_s']} vs {s['ops_per_s']} ops/s"},
        {"goal": "postgres p99 <= 1/3 of sqlite's", "met": p["p99_ms"] <= s["p99_ms"] / 3,
         "detail": f"{p['p99_ms']} vs {s['p99_ms']} ms (limit {round(s['p99_ms'] / 3, 1)})"},
        {"goal": "zero errors on postgres", "met": p["errors"] == 0, "detail": f"{p['errors']} errors"},
    ]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 2 and sys.argv[1] in ("--_worker", "--_reader"):
        return _child_main(sys.argv[1][3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--procs", default="1,4,8", help="server processes per cell (default 1,4,8)")
    ap.add_argument("--reader", choices=["both", "off", "on"], default="both", help="cells without/with the long reader")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per cell (default 20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent MCP clients in total (default 16)")
    ap.add_argument("--client-procs", type=int, default=2, help="processes running the clients (default 2)")
    ap.add_argument("--pg-max-conn", type=int, default=4, help="DB_POSTGRES_MAX_CONN per server process (default 4)")
    ap.add_argument("--reader-pause", type=float, default=0.5, help="seconds between the long reader's scans")
    ap.add_argument("--seed-scale", type=float, default=0.02, help="legacy rows to start from (generate_legacy scale)")
    ap.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL (default: start one)")
    ap.add_argument("--server-profile", type=Path, default=None,
                    help="run each server under cProfile, writing DIR/<cell>-<n>.prof (slows them down)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work directory (stores, server logs)")
    ap.add_argument("--out", type=Path, default=None, help="result file stem (default bench/results/load-<date>)")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    procs = [int(p) for p in args.procs.split(",") if p]
    readers = {"both": [False, True], "off": [False], "on": [True]}[args.reader]
    work = Path(tempfile.mkdtemp(prefix="govdb-load-"))
    result: dict[str, Any] = {"when": c.now_iso(), "command": c.command_line(), "machine": c.machine(),
                              "settings": {k: x for k, x in vars(args).items()
                                           if k not in ("out", "postgres", "keep_work", "server_profile")}}
    try:
        seed: Path | None = work / "seed.db"
        result["settings"]["seed_rows"] = 0
        if args.seed_scale > 0:
            from generate_legacy import generate
            result["settings"]["seed_rows"] = sum(generate(seed, scale=args.seed_scale).values())
        else:
            import sqlite3
            sqlite3.connect(seed).executescript((c.ROOT / "src/govdb/sql/sqlite_legacy.sql").read_text()).close()
            seed = None
        store: dict[str, Any] = {"sqlite_seed": work / "seed.db",
                                 "seed_discoveries": _seed_discoveries(work / "seed.db")}
        pg_ctx = c.postgres(args.postgres, work / "pg") if "postgres" in backends else contextlib.nullcontext()
        with pg_ctx as admin_url:
            if admin_url:
                facts = asyncio.run(c.pg_facts(admin_url))
                result["machine"]["postgres"] = facts["version"]
                need = max(procs) * args.pg_max_conn + 5
                if need > facts["max_connections"]:
                    raise SystemExit(f"error: {max(procs)} processes x DB_POSTGRES_MAX_CONN {args.pg_max_conn}"
                                     f" need {need} connections; the server allows {facts['max_connections']}"
                                     " (lower --pg-max-conn)")
                store["admin_url"] = admin_url
                store["postmaster_pid"] = c.local_postmaster(facts["postmaster_pid"])
                asyncio.run(_prepare_postgres(admin_url, seed, work))
            cells = []
            # Same configuration on both backends back to back: machine noise hits both alike.
            for n in procs:
                for reader in readers:
                    for backend in backends:
                        t = time.perf_counter()
                        try:
                            cell = run_cell(args, backend, n, reader, store, work)
                        except Exception as exc:  # noqa: BLE001 - one failed cell is reported, the rest run
                            cell = {"backend": backend, "procs": n, "long_reader": reader,
                                    "error": f"{type(exc).__name__}: {exc}"}
                        cells.append(cell)
                        print(f"{backend} p{n} reader={'on' if reader else 'off'}: "
                              + (cell.get("error") or f"{cell['ops_per_s']} ops/s p50 {cell['p50_ms']} p99 "
                                 f"{cell['p99_ms']} max {cell['max_ms']} ms errors {cell['errors']}")
                              + f" ({time.perf_counter() - t:.0f} s)", flush=True)
            if admin_url:
                asyncio.run(c.drop_db(admin_url, "bench_load_seed"))
        result["cells"] = cells
        result["goals"] = goals(cells)
    finally:
        if args.keep_work:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return c.publish(args.out, "load", result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
