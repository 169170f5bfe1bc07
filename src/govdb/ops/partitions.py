"""govdb partitions list|maintain|schedule: the monthly partitions of the audit tables.

Everything goes through the functions of sql/partitions.sql
(``audit.partition_maintenance()`` and its parts), so a run from here, from
pg_cron or from psql does the same and is recorded in audit.maintenance_log.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.table import Table

from ..config import SecretUrl, Settings
from ..errors import ValidationError
from . import connect, console, print_json, require_postgres, require_schema

PARENTS = ("audit.events", "audit.tool_usage")
#: What partitions.sql's partition_maintenance() defaults to.
MONTHS_AHEAD = 3
EVENTS_RETENTION_DAYS = 180
TOOL_USAGE_RETENTION_DAYS = 90
#: The spec's weekly job.
CRON_JOB = "partition-maintenance"
CRON_SCHEDULE = "0 3 * * 0"
CRON_COMMAND = "SELECT audit.partition_maintenance()"
#: A function partitions.sql defines since maintenance reports names; its
#: absence means the database holds older function bodies.
_SENTINEL = "audit.expired_partitions(regclass, interval)"
_BOUND = re.compile(r"FROM \('([^']*)'\) TO \('([^']*)'\)")


@dataclass(frozen=True)
class Policy:
    """Maintenance options: months to premake, retention in days per table."""

    months_ahead: int = MONTHS_AHEAD
    events_retention_days: int = EVENTS_RETENTION_DAYS
    tool_usage_retention_days: int = TOOL_USAGE_RETENTION_DAYS

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("months_ahead", self.months_ahead, 0, 120),
                                    ("events_retention_days", self.events_retention_days, 1, 36_500),
                                    ("tool_usage_retention_days", self.tool_usage_retention_days, 1, 36_500)):
            if type(value) is not int or not lo <= value <= hi:
                raise ValidationError(name, f"is expected to be a whole number in [{lo}, {hi}], got {value!r}")

    @property
    def is_default(self) -> bool:
        return self == Policy()

    def sql(self) -> str:
        """The SQL statement a scheduler runs (the spec's exact text for the defaults)."""
        if self.is_default:
            return CRON_COMMAND
        # Whole numbers checked above: this text holds nothing but digits from outside.
        return (f"SELECT audit.partition_maintenance({self.months_ahead:d},"
                f" make_interval(days => {self.events_retention_days:d}),"
                f" make_interval(days => {self.tool_usage_retention_days:d}))")

    def cli_options(self) -> list[str]:
        out = []
        if self.months_ahead != MONTHS_AHEAD:
            out += ["--months-ahead", str(self.months_ahead)]
        if self.events_retention_days != EVENTS_RETENTION_DAYS:
            out += ["--events-retention-days", str(self.events_retention_days)]
        if self.tool_usage_retention_days != TOOL_USAGE_RETENTION_DAYS:
            out += ["--tool-usage-retention-days", str(self.tool_usage_retention_days)]
        return out


async def ensure_functions(conn: Any) -> None:
    """Apply partitions.sql when the database holds older function bodies (it is idempotent)."""
    if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", _SENTINEL):
        return
    from ..backends.postgres import SCHEMA_LOCK
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", _SENTINEL):
            await conn.execute(resources.files("govdb").joinpath("sql", "partitions.sql").read_text("utf-8"))


# -- list ---------------------------------------------------------------------

async def fetch_partitions(conn: Any) -> list[dict[str, Any]]:
    """Return every partition of the audit tables: parent, name, range, rows, bytes, default."""
    from ..migrate.source import quote_ident
    rows = await conn.fetch(
        "SELECT n.nspname AS schema, p.relname AS parent, c.relname AS name,"
        "       pg_get_expr(c.relpartbound, c.oid) AS bound, c.oid = pt.partdefid AS is_default,"
        "       pg_total_relation_size(c.oid) AS bytes"
        "  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
        "  JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_partitioned_table pt ON pt.partrelid = p.oid"
        " WHERE i.inhparent = ANY($1::regclass[])"
        " ORDER BY p.relname, c.oid = pt.partdefid, c.relname", list(PARENTS))
    out = []
    for r in rows:
        count = await conn.fetchval(f"SELECT count(*) FROM ONLY {quote_ident(r['schema'])}.{quote_ident(r['name'])}")
        bound = _BOUND.search(r["bound"] or "")
        out.append({
            "table": f"audit.{r['parent']}", "partition": r["name"], "default": r["is_default"],
            "from": _short_ts(bound.group(1)) if bound else None, "to": _short_ts(bound.group(2)) if bound else None,
            "rows": count, "bytes": r["bytes"],
        })
    return out


def _short_ts(text: str) -> str:
    return text[:-len(" 00:00:00+00")] if text.endswith(" 00:00:00+00") else text


def list_partitions(settings: Settings, *, as_json: bool = False) -> int:
    """List the partitions of the audit tables with their ranges, row counts and sizes."""
    require_postgres(settings, "govdb partitions list")

    async def go() -> list[dict[str, Any]]:
        async with connect(settings) as conn:
            await require_schema(conn, settings)
            return await fetch_partitions(conn)

    parts = asyncio.run(go())
    if as_json:
        print_json({"partitions": parts})
        return 0
    table = Table("table", "partition", "from (UTC)", "to", "rows", "size",
                  title=f"audit partitions at {settings.postgres_url.masked}")
    for p in parts:
        span = ("(default: rows no month takes)", "") if p["default"] else (p["from"], p["to"])
        style = "yellow" if p["default"] and p["rows"] else None
        table.add_row(p["table"], p["partition"], *span, f"{p['rows']:,}", human_bytes(p["bytes"]), style=style)
    console().print(table)
    return 0


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# -- maintain -----------------------------------------------------------------

class _DryRun(Exception):
    pass


async def run_maintenance(settings: Settings, policy: Policy = Policy(), *, dry_run: bool = False) -> dict[str, Any]:
    """Run audit.partition_maintenance() with ``policy``; with dry_run, in a transaction rolled back."""
    async with connect(settings, "govdb-maintain") as conn:
        await require_schema(conn, settings)
        await ensure_functions(conn)
        result: dict[str, Any] = {}
        try:
            async with conn.transaction():
                result = await conn.fetchval(
                    "SELECT audit.partition_maintenance($1, make_interval(days => $2), make_interval(days => $3))",
                    policy.months_ahead, policy.events_retention_days, policy.tool_usage_retention_days)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
        result["dry_run"] = dry_run
        return result


def maintenance_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Return (table, action, partition, rows) lines for what a maintenance run did."""
    lines: list[tuple[str, str, str, str]] = []
    for name in ("events", "tool_usage"):
        part = result.get(name) or {}
        table = f"audit.{name}"
        for gone in part.get("dropped_partitions", []):
            lines.append((table, "dropped (past retention)", gone["name"].split(".")[-1], f"{gone['rows']:,}"))
        if part.get("expired_default_rows"):
            lines.append((table, "deleted from default (past retention)", f"{name}_default",
                          f"{part['expired_default_rows']:,}"))
        for target, n in sorted((part.get("moved_into") or {}).items()):
            lines.append((table, "moved out of default", target, f"{n:,}"))
        for created in part.get("created_partitions", []):
            lines.append((table, "created", created, ""))
        if part.get("default_rows_left"):
            lines.append((table, "left in default (before year 1)", f"{name}_default",
                          f"{part['default_rows_left']:,}"))
    return lines


def maintain(settings: Settings, *, months_ahead: int = MONTHS_AHEAD,
             events_retention_days: int = EVENTS_RETENTION_DAYS,
             tool_usage_retention_days: int = TOOL_USAGE_RETENTION_DAYS,
             dry_run: bool = False, as_json: bool = False) -> int:
    """Premake partitions, drop those past retention, move rows out of the default partitions."""
    require_postgres(settings, "govdb partitions maintain")
    policy = Policy(months_ahead, events_retention_days, tool_usage_retention_days)
    result = asyncio.run(run_maintenance(settings, policy, dry_run=dry_run))
    if as_json:
        print_json(result)
        return 0
    title = "partition maintenance" + (" (dry run: nothing changed)" if dry_run else "")
    table = Table("table", "action", "partition", "rows", title=title)
    lines = maintenance_rows(result)
    for line in lines:
        table.add_row(*line)
    if not lines:
        table.add_row("", "nothing to do", "", "")
    keep = ", ".join(f"{n} keeps {result[n]['retention']} (from {str(result[n]['keep_from'])[:10]})"
                     for n in ("events", "tool_usage") if n in result)
    con = console()
    con.print(table)
    con.print(f"{keep}; {result.get('months_ahead')} months ahead; {result.get('duration_ms')} ms", markup=False)
    return 0


async def last_run(conn: Any) -> dict[str, Any] | None:
    """Return the latest audit.maintenance_log entry (ran_at, details), or None."""
    row = await conn.fetchrow("SELECT ran_at, details FROM audit.maintenance_log ORDER BY id DESC LIMIT 1")
    return None if row is None else {"ran_at": row["ran_at"], "details": row["details"]}


# -- schedule -----------------------------------------------------------------

async def cron_facts(conn: Any) -> dict[str, Any]:
    """Return what decides whether pg_cron can run the job from this database."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron') AS available,"
        "       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') AS installed,"
        "       'pg_cron' = ANY (string_to_array(replace(current_setting('shared_preload_libraries'), ' ', ''), ','))"
        "         AS preloaded,"
        "       current_setting('cron.database_name', true) AS cron_database,"
        "       current_database() AS database")
    return dict(row)


def cron_plan(facts: dict[str, Any]) -> tuple[str, str]:
    """Return ("here" | "create" | "other-database" | "crontab", why) from :func:`cron_facts`."""
    if facts["installed"]:
        return "here", "pg_cron is installed in this database"
    if not facts["available"]:
        return "crontab", "the server has no pg_cron extension (not in pg_available_extensions)"
    if not facts["preloaded"]:
        return "crontab", ("pg_cron is available but not in shared_preload_libraries"
                           " (add it, set cron.database_name, restart the server, then run schedule again)")
    if (facts.get("cron_database") or "postgres") == facts["database"]:
        return "create", "pg_cron is preloaded and runs jobs in this database; creating the extension"
    return "other-database", f"pg_cron runs in database {facts['cron_database']!r}; scheduling the job there"


def crontab_line(settings: Settings, policy: Policy = Policy()) -> str:
    """Return the crontab line running `govdb partitions maintain` weekly (no password in it)."""
    govdb = Path(sys.executable).with_name("govdb")
    program = [str(govdb)] if govdb.is_file() else [sys.executable, "-m", "govdb.cli"]
    env = {"DB_BACKEND": "postgres", "DB_POSTGRES_URL": url_without_password(settings.postgres_url)}
    words = [f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(w) for w in program]
    words += ["partitions", "maintain", *policy.cli_options()]
    return f"{CRON_SCHEDULE} {' '.join(words)} >> \"$HOME/govdb-partition-maintenance.log\" 2>&1"


def url_without_password(url: SecretUrl) -> str:
    """Return the URL with its password (netloc or ?password=) removed."""
    parts = urlsplit(url.reveal())
    netloc = parts.netloc.rpartition("@")
    if netloc[1]:
        user = netloc[0].split(":", 1)[0]
        netloc_text = f"{user}@{netloc[2]}" if user else netloc[2]
    else:
        netloc_text = parts.netloc
    query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith("password="))
    return urlunsplit((parts.scheme, netloc_text, parts.path, query, parts.fragment))


async def install_schedule(settings: Settings, policy: Policy = Policy()) -> dict[str, Any]:
    """Install the weekly pg_cron job where pg_cron can run it; otherwise return the crontab line to use."""
    async with connect(settings, "govdb-schedule") as conn:
        await require_schema(conn, settings)
        await ensure_functions(conn)
        facts = await cron_facts(conn)
        how, why = cron_plan(facts)
        out: dict[str, Any] = {"method": "pg_cron" if how != "crontab" else "crontab", "reason": why,
                               "job": CRON_JOB, "schedule": CRON_SCHEDULE, "command": policy.sql()}
        if how == "crontab":
            out["crontab"] = crontab_line(settings, policy)
            out["password_note"] = (None if url_without_password(settings.postgres_url)
                                    == settings.postgres_url.reveal() else
                                    "the line holds no password: put it in ~/.pgpass of the user whose"
                                    " crontab runs it (or PGPASSWORD in that crontab's environment)")
            return out
        if how == "create":
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        if how in ("here", "create"):
            out["job_id"] = await conn.fetchval("SELECT cron.schedule($1, $2, $3)", CRON_JOB, CRON_SCHEDULE,
                                                policy.sql())
            out["database"] = facts["database"]
            return out
    return await _schedule_elsewhere(settings, policy, facts, out)


async def _schedule_elsewhere(settings: Settings, policy: Policy, facts: dict[str, Any],
                              out: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import replace
    parts = urlsplit(settings.postgres_url.reveal())
    other = replace(settings, postgres_url=SecretUrl(urlunsplit(
        (parts.scheme, parts.netloc, "/" + facts["cron_database"], parts.query, parts.fragment))))
    async with connect(other, "govdb-schedule") as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        # Named jobs replace each other only within one database: unschedule ours first.
        await conn.execute("SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = $1 AND database = $2",
                           CRON_JOB, facts["database"])
        out["job_id"] = await conn.fetchval("SELECT cron.schedule_in_database($1, $2, $3, $4)", CRON_JOB,
                                            CRON_SCHEDULE, policy.sql(), facts["database"])
    out["database"] = facts["database"]
    return out


def schedule(settings: Settings, *, months_ahead: int = MONTHS_AHEAD,
             events_retention_days: int = EVENTS_RETENTION_DAYS,
             tool_usage_retention_days: int = TOOL_USAGE_RETENTION_DAYS, as_json: bool = False) -> int:
    """Schedule weekly maintenance with pg_cron, or print the crontab line to use without it."""
    require_postgres(settings, "govdb partitions schedule")
    policy = Policy(months_ahead, events_retention_days, tool_usage_retention_days)
    out = asyncio.run(install_schedule(settings, policy))
    if as_json:
        print_json(out)
        return 0
    con = console()
    if out["method"] == "pg_cron":
        con.print(f"scheduled pg_cron job {out['job']!r} (id {out['job_id']}) in database {out['database']}:"
                  f" {out['schedule']} {out['command']}", markup=False)
        return 0
    con.print(f"pg_cron not used: {out['reason']}.", markup=False)
    con.print("Add this line to the crontab of a user who may reach the database (crontab -e):", markup=False)
    print(out["crontab"])
    if out.get("password_note"):
        con.print(f"note: {out['password_note']}", markup=False)
    return 0


__all__ = ["Policy", "crontab_line", "cron_plan", "fetch_partitions", "install_schedule", "last_run",
           "list_partitions", "maintain", "maintenance_rows", "run_maintenance", "schedule",
           "url_without_password"]
