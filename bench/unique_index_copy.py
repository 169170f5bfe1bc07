"""What keeping audit.event_hashes' unique indexes up during a COPY costs.

    .venv/bin/python bench/unique_index_copy.py            # 1 M rows, about a minute
    .venv/bin/python bench/unique_index_copy.py --rows 200000

The table of the backfill's content dedup (raw_hash text primary key,
event_id uuid unique, ts) is loaded with the same COPY text twice: once with
both unique indexes in place (how the backfill loads it, since live
dual-writes rely on them), once into the bare table with the indexes built
afterwards. Without --postgres URL a local PostgreSQL is started with
`govdb pg start`. Writes bench/results/unique-index-copy-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as c  # noqa: E402

TABLE = ("CREATE TABLE event_hashes (raw_hash text COLLATE \"C\" {pk}, event_id uuid NOT NULL {uq},"
         " ts timestamptz NOT NULL)")


def payload(rows: int) -> bytes:
    # Hash and event id both in random order, as real ones are (uuid4); deterministic per row.
    return "".join(f"{hashlib.sha256(str(i).encode()).hexdigest()}\t"
                   f"{uuid.UUID(bytes=hashlib.md5(str(i).encode()).digest())}\t"
                   f"2025-01-01T00:00:00+00:00\n" for i in range(rows)).encode()


async def load(conn: Any, data: bytes, *, indexes_during: bool) -> dict[str, float]:
    await conn.execute("DROP TABLE IF EXISTS event_hashes")
    await conn.execute(TABLE.format(pk="PRIMARY KEY" if indexes_during else "",
                                    uq="UNIQUE" if indexes_during else ""))

    async def source():
        yield data
    started = time.perf_counter()
    await conn.copy_to_table("event_hashes", source=source(), columns=["raw_hash", "event_id", "ts"],
                             format="text")
    copy = time.perf_counter() - started
    build = 0.0
    if not indexes_during:
        started = time.perf_counter()
        await conn.execute("ALTER TABLE event_hashes ADD PRIMARY KEY (raw_hash), ADD UNIQUE (event_id)")
        build = time.perf_counter() - started
    return {"copy_s": round(copy, 2), "index_build_s": round(build, 2), "total_s": round(copy + build, 2)}


async def main_async(args: argparse.Namespace, admin: str) -> dict[str, Any]:
    import asyncpg
    result: dict[str, Any] = {"when": c.now_iso(), "command": c.command_line(), "machine": c.machine(),
                              "rows": args.rows}
    result["machine"]["postgres"] = (await c.pg_facts(admin))["version"]
    url = await c.fresh_db(admin, "bench_unique_copy")
    data = payload(args.rows)
    conn = await asyncpg.connect(url)
    try:
        result["indexes_during_copy"] = await load(conn, data, indexes_during=True)
        result["indexes_built_after"] = await load(conn, data, indexes_during=False)
    finally:
        await conn.close()
        await c.drop_db(admin, "bench_unique_copy")
    return result


def markdown(r: dict[str, Any]) -> str:
    during, after = r["indexes_during_copy"], r["indexes_built_after"]
    return "\n".join(c.header("COPY into audit.event_hashes' shape, unique indexes during vs after", r) + [
        f"{r['rows']:,} rows (sha256 hex, uuid, timestamp) as COPY text.", "",
        "| indexes | COPY s | index build s | total s |", "|---|---:|---:|---:|",
        f"| up during the COPY | {during['copy_s']} | - | {during['total_s']} |",
        f"| built after the COPY | {after['copy_s']} | {after['index_build_s']} | {after['total_s']} |", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL (default: start one)")
    ap.add_argument("--out", type=Path, default=None, help="result file stem (default bench/results/unique-index-copy-<date>)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="govdb-uniq-"))
    try:
        with c.postgres(args.postgres, work / "pg") as admin:
            result = asyncio.run(main_async(args, admin))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return c.publish(args.out, "unique-index-copy", result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
