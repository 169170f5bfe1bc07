"""govdb backup / restore: pg_dump -Fc and pg_restore of the configured PostgreSQL.

The tools must match the server's major version: the one on PATH when it
does, else /usr/lib/postgresql/MAJOR/bin, else the Debian 13 root of
`govdb pg start` (localpg.client_tool). Files reach the tools as stdin and
stdout, so the chroot route needs no mount. The password goes in PGPASSWORD,
never on a command line; the dump file is written under a temporary name
(mode 0600: it holds API key hashes) and linked to its name only when
complete, never over an existing file unless asked.

AGE: pg_dump keeps ag_catalog's graph and label rows with the graph's
schema and label tables, and a restore needs no LOAD 'age'. pg_restore's own
--clean cannot drop partitioned tables' constraints nor AGE graphs, so
``restore --clean`` drops the schemas and extensions the archive holds
itself, then restores in one transaction.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from rich.table import Table

from ..config import Settings
from ..errors import ConflictError, ValidationError
from . import OpsError, connect, console, print_json, require_postgres
from .partitions import human_bytes, url_without_password
from .status import graph_summary, postgres_counts

_VERSION = re.compile(r"\)\s+(\d+)(?:\.\d+)?")
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "public", "pg_toast")
_TOC_SCHEMA = re.compile(r"^\d+; \d+ \d+ SCHEMA - (\S+) ")
_TOC_EXTENSION = re.compile(r"^\d+; \d+ \d+ EXTENSION - (\S+)")


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client program of the right major version and how to run it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    where: str


def tool_major(argv: list[str], env: dict[str, str] | None = None) -> int | None:
    """Return the major version `argv --version` reports, or None."""
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30, env=env,
                             stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    return int(match.group(1)) if match else None


def find_tool(name: str, major: int) -> PgTool:
    """Find ``name`` (pg_dump, pg_restore) of PostgreSQL ``major``; raise OpsError naming the fix."""
    from .. import localpg
    on_path = shutil.which(name)
    found = tool_major([on_path]) if on_path else None
    if on_path and found == major:
        return PgTool(name, [on_path], dict(os.environ), on_path)
    local = localpg.client_tool(name, str(major))
    if local is not None:
        argv, env = local
        return PgTool(name, argv, env, f"{argv[-1]} (in chroot {argv[-2]})" if len(argv) > 1 else argv[0])
    seen = f"{name} {found} on PATH" if on_path else f"no {name} on PATH"
    raise OpsError(f"{name} {major} is needed for this PostgreSQL {major} server, found {seen};"
                   f" install postgresql-client-{major} or run `govdb pg start` once as root"
                   " (its Debian 13 root has the tools)")


def _connection_env(settings: Settings, tool: PgTool, application: str) -> tuple[str, dict[str, str]]:
    """Return the libpq URL without password and the env carrying it (PGPASSWORD)."""
    parts = urlsplit(settings.postgres_url.reveal())
    env = dict(tool.env)
    password = parts.password
    if password is None:
        query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
        password = query.get("password")
    if password is not None:
        env["PGPASSWORD"] = unquote(password)
    env["PGAPPNAME"] = application
    env["PGCONNECT_TIMEOUT"] = env.get("PGCONNECT_TIMEOUT", "10")
    return url_without_password(settings.postgres_url), env


def _run_tool(settings: Settings, tool: PgTool, args: list[str], *, stdin: BinaryIO | None = None,
              stdout: BinaryIO | int = subprocess.PIPE, what: str) -> bytes:
    url, env = _connection_env(settings, tool, f"govdb-{tool.name}")
    argv = [*tool.argv, *(a.replace("{url}", url) for a in args)]
    proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.PIPE, env=env, cwd="/", check=False)
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip()
        secret = env.get("PGPASSWORD")
        if secret:
            detail = detail.replace(secret, "***")
        # One line: the CLI prints one `error:` line.
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        error = OpsError(f"cannot {what} ({tool.name} exited {proc.returncode}"
                         + (f": {' | '.join(lines[-6:])})" if lines else ")"))
        error.detail = " | ".join(lines[-6:])
        raise error
    return proc.stdout or b""


async def _server(settings: Settings) -> tuple[int, str]:
    async with connect(settings, "govdb-backup") as conn:
        return int(await conn.fetchval("SELECT current_setting('server_version_num')::int / 10000")), \
            await conn.fetchval("SELECT current_database()")


def backup_name(now: datetime | None = None) -> str:
    """Return governance_backup_YYYYMMDD.dump for the UTC date of now."""
    return f"governance_backup_{(now or datetime.now(timezone.utc)):%Y%m%d}.dump"


def run_backup(settings: Settings, directory: Path = Path("."), *, overwrite: bool = False,
               now: datetime | None = None) -> dict[str, Any]:
    """Dump the configured database with pg_dump -Fc into DIRECTORY; return what was written."""
    require_postgres(settings, "govdb backup")
    directory = Path(directory)
    if not directory.is_dir():
        raise ValidationError("--dir", f"{directory} is not an existing directory; create it first")
    target = directory / backup_name(now)
    if target.exists() and not overwrite:
        raise ConflictError(f"{target} exists; move it away, choose another --dir, or pass --overwrite")
    major, database = asyncio.run(_server(settings))
    dump, listing = find_tool("pg_dump", major), find_tool("pg_restore", major)
    started = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _run_tool(settings, dump, ["--format=custom", "--no-password", "--dbname={url}"], stdout=out,
                      what=f"dump database {database}")
        with open(tmp, "rb") as archive:
            toc = _run_tool(settings, listing, ["--list"], stdin=archive, what="read back the dump")
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the name was taken meanwhile: never overwrite
            except FileExistsError:
                raise ConflictError(f"{target} appeared while dumping; it was left as it is"
                                    " (move it away or pass --overwrite)") from None
    finally:
        tmp.unlink(missing_ok=True)
    entries = [line for line in toc.decode("utf-8", "replace").splitlines() if line and not line.startswith(";")]
    return {"file": str(target.resolve()), "bytes": target.stat().st_size, "database": database,
            "server_major": major, "tool": dump.where, "entries": len(entries),
            "seconds": round(time.monotonic() - started, 2)}


def backup(settings: Settings, directory: Path = Path("."), *, overwrite: bool = False,
           as_json: bool = False) -> int:
    """Back up the PostgreSQL store with pg_dump -Fc to governance_backup_YYYYMMDD.dump."""
    out = run_backup(settings, directory, overwrite=overwrite)
    if as_json:
        print_json(out)
        return 0
    table = Table("file", "size", "database", "archive entries", "pg_dump", "seconds", title="govdb backup")
    for column in table.columns:
        column.overflow = "fold"
    table.add_row(out["file"], human_bytes(out["bytes"]), out["database"], f"{out['entries']:,}", out["tool"],
                  f"{out['seconds']}")
    console().print(table)
    return 0


# -- restore ------------------------------------------------------------------

def archive_contents(toc: str) -> tuple[list[str], list[str]]:
    """Return the schemas and extensions a `pg_restore --list` output creates."""
    schemas = [m.group(1) for m in map(_TOC_SCHEMA.match, toc.splitlines()) if m]
    extensions = [m.group(1) for m in map(_TOC_EXTENSION.match, toc.splitlines()) if m]
    return schemas, [e for e in extensions if e != "plpgsql"]


async def _target_state(settings: Settings) -> dict[str, Any]:
    async with connect(settings, "govdb-restore") as conn:
        return {
            "database": await conn.fetchval("SELECT current_database()"),
            "major": int(await conn.fetchval("SELECT current_setting('server_version_num')::int / 10000")),
            "schemas": [r[0] for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname <> ALL ($1::text[])"
                " AND nspname NOT LIKE 'pg\\_%' ORDER BY 1", list(_SYSTEM_SCHEMAS))],
            "public_objects": await conn.fetchval(
                "SELECT count(*) FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
                " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
                "                 AND d.objid = c.oid AND d.deptype = 'e')"),
            "extensions": [r[0] for r in await conn.fetch("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")],
            "available": [r[0] for r in await conn.fetch("SELECT name FROM pg_available_extensions")],
        }


async def _drop(settings: Settings, schemas: list[str], extensions: list[str]) -> None:
    from ..migrate.source import quote_ident
    async with connect(settings, "govdb-restore") as conn:
        async with conn.transaction():
            for ext in extensions:
                await conn.execute(f"DROP EXTENSION IF EXISTS {quote_ident(ext)} CASCADE")
            for schema in schemas:
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")


def run_restore(settings: Settings, file: Path, *, clean: bool = False) -> dict[str, Any]:
    """Restore a govdb backup into the configured database (empty, or emptied with clean=True)."""
    require_postgres(settings, "govdb restore")
    file = Path(file)
    if not file.is_file():
        raise ValidationError("FILE", f"{file} does not exist or is not a file")
    state = asyncio.run(_target_state(settings))
    pg_restore = find_tool("pg_restore", state["major"])
    with open(file, "rb") as archive:
        try:
            toc = _run_tool(settings, pg_restore, ["--list"], stdin=archive, what=f"read {file}")
        except OpsError as exc:
            raise OpsError(f"{file} is not a readable pg_dump custom-format archive"
                           f" ({getattr(exc, 'detail', '') or exc})") from None
    schemas, extensions = archive_contents(toc.decode("utf-8", "replace"))
    missing = [e for e in extensions if e not in state["available"]]
    if missing:
        raise OpsError(f"{file} needs the extension(s) {', '.join(missing)}, which the PostgreSQL server at"
                       f" {settings.postgres_url.masked} does not have; install them there first")
    present = state["schemas"] + (["public (tables)"] if state["public_objects"] else [])
    dropped: list[str] = []
    if present and not clean:
        raise ConflictError(f"database {state['database']} is not empty (schemas: {', '.join(present)});"
                            " restore into an empty database, or pass --clean to drop the schemas and"
                            " extensions the backup holds first")
    if clean:
        drop_schemas = [s for s in schemas if s in state["schemas"]]
        drop_ext = [e for e in extensions if e in state["extensions"]]
        asyncio.run(_drop(settings, drop_schemas, drop_ext))
        dropped = drop_schemas + [f"extension {e}" for e in drop_ext]
    started = time.monotonic()
    with open(file, "rb") as archive:
        _run_tool(settings, pg_restore, ["--dbname={url}", "--no-password", "--no-owner", "--no-privileges",
                                         "--single-transaction", "--exit-on-error"],
                  stdin=archive, what=f"restore {file} into database {state['database']}"
                                      " (nothing was restored: it runs in one transaction)")
    seconds = round(time.monotonic() - started, 2)

    async def summary() -> tuple[dict[str, int], dict[str, int] | None]:
        async with connect(settings, "govdb-restore") as conn:
            return await postgres_counts(conn), await graph_summary(conn, settings.age_graph)

    counts, graph = asyncio.run(summary())
    return {"file": str(file.resolve()), "database": state["database"], "dropped_first": dropped,
            "tool": pg_restore.where, "seconds": seconds, "tables": counts, "graph": graph}


def restore(settings: Settings, file: Path, *, clean: bool = False, as_json: bool = False) -> int:
    """Restore a govdb backup (pg_dump -Fc) into the configured PostgreSQL database."""
    out = run_restore(settings, file, clean=clean)
    if as_json:
        print_json(out)
        return 0
    con = console()
    note = f"; dropped first: {', '.join(out['dropped_first'])}" if out["dropped_first"] else ""
    con.print(f"restored {out['file']} into database {out['database']} in {out['seconds']} s{note}", markup=False)
    table = Table("table", "rows", title="restored")
    for name, n in out["tables"].items():
        table.add_row(name, f"{n:,}")
    if out["graph"]:
        table.add_row("graph nodes", f"{out['graph']['nodes']:,}")
        table.add_row("graph edges", f"{out['graph']['edges']:,}")
    con.print(table)
    return 0


__all__ = ["PgTool", "archive_contents", "backup", "backup_name", "find_tool", "restore", "run_backup",
           "run_restore"]
