"""Shared pieces of the benchmarks: the machine header, percentiles, CPU time,
PostgreSQL scratch databases and a local server, and the result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOVDB = str(Path(sys.executable).with_name("govdb"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine(postgres_version: str | None = None) -> dict[str, Any]:
    """CPUs, memory, Python, platform (and PostgreSQL's version when given)."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if postgres_version:
        info["postgres"] = postgres_version
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[min(int(rank), len(sorted_values)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50, p99, max in milliseconds."""
    xs = sorted(seconds)
    ms = (lambda x: None if x is None else round(x * 1000, 2))
    return {"n": len(xs), "p50_ms": ms(percentile(xs, 50)), "p99_ms": ms(percentile(xs, 99)),
            "max_ms": ms(xs[-1] if xs else None)}


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a live process (and of its reaped children); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def descendants(pid: int) -> list[int]:
    """The pid and every live process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, reaped ones included."""
    return sum(cpu_seconds(p, children=True) for p in descendants(pid))


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[:3]} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


def with_port(url: str, port: int) -> str:
    p = urlsplit(url)
    netloc = p.netloc.rsplit("@", 1)
    host = netloc[-1].rsplit(":", 1)[0] if not netloc[-1].endswith("]") else netloc[-1]
    netloc[-1] = f"{host}:{port}"
    return urlunsplit((p.scheme, "@".join(netloc), p.path, p.query, p.fragment))


async def fresh_db(admin_url: str, name: str, template: str | None = None) -> str:
    """Drop and create database ``name`` (optionally from ``template``); return its URL."""
    import asyncpg
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return with_db(admin_url, name)


async def drop_db(admin_url: str, name: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def pg_facts(admin_url: str) -> dict[str, Any]:
    import asyncpg
    conn = await asyncpg.connect(admin_url)
    try:
        return {"version": await conn.fetchval("SHOW server_version"),
                "max_connections": int(await conn.fetchval("SHOW max_connections")),
                "postmaster_pid": await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")}
    finally:
        await conn.close()


@contextmanager
def postgres(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield ``url``, or start a local PostgreSQL (`govdb pg start`) in ``data_dir`` and stop it after."""
    if url:
        yield url
        return
    port = free_port()
    subprocess.run([GOVDB, "pg", "start", "--data-dir", str(data_dir), "--port", str(port)],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run([GOVDB, "pg", "url", "--data-dir", str(data_dir)],
                             check=True, capture_output=True, text=True).stdout.strip()
        yield out.splitlines()[-1].strip()
    finally:
        subprocess.run([GOVDB, "pg", "stop", "--data-dir", str(data_dir)], stdout=subprocess.DEVNULL)


def header(title: str, r: dict[str, Any]) -> list[str]:
    """Return the first lines of a result file: title and time, the machine, the command."""
    m = r["machine"]
    return [f"# {title}, {r['when']}", "",
            f"Machine: {m['cpus']} CPUs, {m.get('memory_gib', '?')} GiB, PostgreSQL {m.get('postgres', '-')},"
            f" Python {m['python']}, {m['platform']}; load average at start {m.get('load_avg_at_start')}.", "",
            f"Command: `{r['command']}`", ""]


def write_results(stem: Path, result: dict[str, Any], markdown: str) -> None:
    """Write ``stem``.json and ``stem``.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)


def publish(out: Path | None, name: str, result: dict[str, Any], markdown: str) -> int:
    """Write the result to ``out`` (default bench/results/<name>-<date>) and print it; return 0."""
    write_results(out or Path(__file__).resolve().parent / "results" / f"{name}-{time.strftime('%Y%m%d')}",
                  result, markdown)
    print(markdown)
    return 0


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}" if x >= 100 else f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def local_postmaster(checkpointer_pid: int | None) -> int | None:
    """The postmaster of a PostgreSQL on this machine (parent of its checkpointer), else None."""
    if not checkpointer_pid:
        return None
    try:
        if not Path(f"/proc/{checkpointer_pid}/comm").read_text().startswith("postgres"):
            return None
    except OSError:
        return None
    return ppid(checkpointer_pid)
