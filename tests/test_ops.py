"""The operator's tools: partitions list/maintain/schedule, backup/restore, status.

PostgreSQL-only tests say so with `@pytest.mark.backends`: partitions,
pg_dump and pg_cron exist only there. CLI runs go through a real
subprocess with a password in DB_POSTGRES_URL (the test server trusts
loopback, so any password is accepted) that must never be printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import REPO, with_database
from govdb.config import SecretUrl, Settings
from govdb.errors import ValidationError
from govdb.ops import OpsError
from govdb.ops import backup as ops_backup
from govdb.ops import partitions as ops_partitions
from govdb.ops import status as ops_status

UTC = timezone.utc
PASSWORD = "Pw-n0t-to-be-seen-7781"
CHECKED_TABLES = ops_status.POSTGRES_TABLES


def with_password(url: str, password: str = PASSWORD) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env.update({"DB_BACKEND": settings.backend, "DB_SQLITE_PATH": str(settings.sqlite_path),
                "DB_POSTGRES_URL": settings.postgres_url.reveal(), "DB_AGE_GRAPH": settings.age_graph,
                "DB_AGE_ENABLED": "1" if settings.age_enabled else "0", **extra})
    return env


def govdb(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "govdb.cli", *args], capture_output=True, text=True,
                          env=env_for(settings, **extra), cwd=REPO, timeout=300)
    assert PASSWORD not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def secret_settings(store) -> Settings:
    from dataclasses import replace
    return replace(store.settings, postgres_url=SecretUrl(with_password(store.settings.postgres_url.reveal())))


async def fill(db) -> None:
    """Write every kind of record, including the graph's and far timestamps."""
    await db.create_identity("lead", api_key="k1", tags=["ops"], notes="n")
    await db.create_identity("helper", api_key="k2", parent_agent_id="lead", spawn_reason="test")
    await db.create_session("s1", "lead", ttl=timedelta(hours=1), client_type="t")
    await db.record_agent_state("lead", energy=0.5, integrity=0.9, entropy=0.1, void=0.0, state={"x": [1, 2]})
    await db.update_calibration({"bins": [0.5]}, expected_version=0)
    for ts in (datetime.now(UTC), datetime(2200, 3, 5, tzinfo=UTC)):
        await db.append_audit_event("checkin", agent_id="lead", details={"at": ts.isoformat(), "ü": "ß"}, timestamp=ts)
        await db.record_tool_usage("probe", agent_id="lead", latency_ms=3, timestamp=ts)
    await db.add_discovery("q", agent_id="lead", type="question", summary="why", tags=["a", "b"])
    await db.add_discovery("a", agent_id="helper", type="answer", summary="because", tags=["a"], confidence=0.5)
    await db.link_discoveries("a", "q", edge_type="response_to", response_type="support")
    await db.link_discoveries("q", "a", edge_type="related_to")
    await db.create_dialectic_session("d1", paused_agent_id="helper", reviewer_agent_id="lead", discovery_id="q")
    await db.add_dialectic_message("d1", agent_id="helper", message_type="thesis", reasoning="fine")
    await db.add_dialectic_message("d1", agent_id="lead", message_type="antithesis", concerns=["c"])
    await db.resolve_dialectic_session("d1", resolution={"action": "resume"})


async def checksums(url: str) -> dict[str, tuple[int, str]]:
    """Return (rows, md5 of every row's text in order) per table."""
    import asyncpg
    from govdb.migrate.source import quote_qualified
    conn = await asyncpg.connect(url)
    try:
        out = {}
        for table in CHECKED_TABLES:
            row = await conn.fetchrow(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text"
                                      f" COLLATE \"C\"), '')) FROM {quote_qualified(table)} AS t")
            out[table] = (row[0], row[1])
        return out
    finally:
        await conn.close()


async def graph_of(url: str) -> dict | None:
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await ops_status.graph_summary(conn, "governance")
    finally:
        await conn.close()


async def fetchval(url: str, sql: str, *args):
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@pytest.fixture
async def empty_database(pg_server):
    """A database with nothing in it (not from govdb's templates): a restore target."""
    name = f"govdb_t_empty_{uuid.uuid4().hex[:10]}"
    conn = await pg_server.admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(pg_server.url, name)
    finally:
        await pg_server.drop_database(name)


# -- partitions ---------------------------------------------------------------------

def month_start(months_back: int) -> datetime:
    now = datetime.now(UTC)
    y, m = divmod(now.year * 12 + now.month - 1 - months_back, 12)
    return datetime(y, m + 1, 1, tzinfo=UTC)


@pytest.mark.backends("postgres", "postgres-noage")
async def test_maintenance_moves_far_rows_and_drops_expired(store, db):
    url = store.settings.postgres_url.reveal()
    old = month_start(8) + timedelta(days=3)  # past the 180 days, in a month that has a partition
    old_part = f"events_{old:%Y_%m}"
    await store.execute(f"SELECT audit.create_month_partition('audit.events'::regclass, '{old:%Y-%m-%d}')")
    far_past, far_future = datetime(1990, 1, 5, tzinfo=UTC), datetime(2200, 3, 5, 12, tzinfo=UTC)
    for ts in (old, far_past, far_future):
        await db.append_audit_event("far", details={"at": ts.isoformat()}, timestamp=ts)
        await db.record_tool_usage("far", timestamp=ts)
    assert await fetchval(url, "SELECT count(*) FROM audit.events_default") == 2  # 1990 and 2200: no partition

    plan = await ops_partitions.run_maintenance(store.settings, dry_run=True)
    assert plan["dry_run"] is True
    assert [p["name"] for p in plan["events"]["dropped_partitions"]] == [f"audit.{old_part}"]
    assert plan["events"]["dropped_partitions"][0]["rows"] == 1
    assert plan["events"]["expired_default_rows"] == 1
    assert plan["events"]["moved_into"] == {"events_2200_03": 1}
    # ... and nothing changed, nothing was logged.
    assert await fetchval(url, "SELECT count(*) FROM audit.events_default") == 2
    assert await fetchval(url, "SELECT to_regclass($1) IS NOT NULL", f"audit.{old_part}")
    assert await fetchval(url, "SELECT count(*) FROM audit.maintenance_log") == 0

    done = await ops_partitions.run_maintenance(store.settings)
    assert {k: done["events"][k] for k in ("dropped", "expired_default_rows", "moved_from_default")} == \
        {"dropped": 1, "expired_default_rows": 1, "moved_from_default": 1}
    assert "events_2200_03" in done["events"]["created_partitions"]
    assert done["tool_usage"]["moved_into"] == {"tool_usage_2200_03": 1}
    assert done["tool_usage"]["expired_default_rows"] == 2  # no tool_usage partition: 1990 and the old month
    where = await fetchval(url, "SELECT string_agg(tableoid::regclass::text, ',' ORDER BY ts) FROM audit.events"
                                " WHERE event_type = 'far'")
    assert where == "audit.events_2200_03"
    assert await fetchval(url, "SELECT count(*) FROM audit.events_default") == 0
    assert await fetchval(url, "SELECT count(*) FROM audit.tool_usage_default") == 0
    assert await fetchval(url, "SELECT count(*) FROM audit.event_hashes WHERE ts < now() - interval '180 days'") == 0
    assert len(await db.query_audit_events(event_type="far", since=far_future)) == 1

    lines = ops_partitions.maintenance_rows(done)
    assert ("audit.events", "dropped (past retention)", old_part, "1") in lines
    assert ("audit.events", "moved out of default", "events_2200_03", "1") in lines

    again = await ops_partitions.run_maintenance(store.settings)
    assert ops_partitions.maintenance_rows(again) == []
    async with ops_partitions.connect(store.settings) as conn:
        last = await ops_partitions.last_run(conn)
    assert last["details"]["events"]["created"] == 0 and last["details"]["by"] == "govdb-maintain"
    assert await fetchval(url, "SELECT count(*) FROM audit.maintenance_log") == 2


@pytest.mark.backends("postgres")
async def test_maintenance_options_shorter_retention_and_more_months(store, db):
    url = store.settings.postgres_url.reveal()
    two_months_ago = month_start(2) + timedelta(days=1)
    await store.execute(f"SELECT audit.create_month_partition('audit.tool_usage'::regclass,"
                        f" '{two_months_ago:%Y-%m-%d}')")
    await db.record_tool_usage("t", timestamp=two_months_ago)
    policy = ops_partitions.Policy(months_ahead=6, events_retention_days=180, tool_usage_retention_days=30)
    done = await ops_partitions.run_maintenance(store.settings, policy)
    assert [p["name"] for p in done["tool_usage"]["dropped_partitions"]] == \
        [f"audit.tool_usage_{two_months_ago:%Y_%m}"]
    ahead = month_start(-6)
    assert await fetchval(url, "SELECT to_regclass($1) IS NOT NULL", f"audit.events_{ahead:%Y_%m}")
    with pytest.raises(ValidationError, match="months_ahead"):
        ops_partitions.Policy(months_ahead=-1)


@pytest.mark.backends("postgres")
async def test_partitions_cli_list_maintain_schedule(store, db):
    settings = secret_settings(store)
    await db.append_audit_event("future", timestamp=datetime(2201, 1, 2, tzinfo=UTC))

    listed = govdb(settings, "partitions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    parts = json.loads(listed.stdout)["partitions"]
    by_name = {p["partition"]: p for p in parts}
    this = datetime.now(UTC)
    assert by_name[f"events_{this:%Y_%m}"]["from"] == f"{this:%Y-%m}-01"
    assert by_name["events_default"]["default"] is True and by_name["events_default"]["rows"] == 1
    assert by_name["tool_usage_default"]["rows"] == 0
    assert all(p["bytes"] > 0 for p in parts)
    table = govdb(settings, "partitions", "list")
    assert table.returncode == 0 and "events_default" in table.stdout and "tool_usage_default" in table.stdout

    dry = govdb(settings, "partitions", "maintain", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout and "events_2201_01" in dry.stdout
    done = govdb(settings, "partitions", "maintain", "--json", DB_EVENTS_RETENTION_DAYS="200")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"]["retention"] == "200 days"
    assert json.loads(done.stdout)["events"]["moved_into"] == {"events_2201_01": 1}

    bad = govdb(settings, "partitions", "maintain", "--months-ahead", "-2")
    assert bad.returncode == 1 and bad.stderr.startswith("error:")

    # The test server has no pg_cron: the fallback is the crontab line.
    sched = govdb(settings, "partitions", "schedule", "--json")
    assert sched.returncode == 0, sched.stderr
    out = json.loads(sched.stdout)
    assert out["method"] == "crontab" and "pg_cron" in out["reason"]
    assert out["crontab"].startswith("0 3 * * 0 ")
    assert "partitions maintain" in out["crontab"] and "DB_POSTGRES_URL=" in out["crontab"]
    assert out["command"] == "SELECT audit.partition_maintenance()"
    assert out["password_note"] and ".pgpass" in out["password_note"]
    text = govdb(settings, "partitions", "schedule", "--tool-usage-retention-days", "60")
    assert text.returncode == 0 and "pg_cron not used" in text.stdout
    assert "--tool-usage-retention-days 60" in text.stdout


def test_cron_plan_decisions():
    base = {"installed": False, "available": True, "preloaded": True, "cron_database": "governance",
            "database": "governance"}
    assert ops_partitions.cron_plan({**base, "installed": True})[0] == "here"
    assert ops_partitions.cron_plan(base)[0] == "create"
    assert ops_partitions.cron_plan({**base, "cron_database": "postgres"})[0] == "other-database"
    how, why = ops_partitions.cron_plan({**base, "preloaded": False})
    assert how == "crontab" and "shared_preload_libraries" in why
    assert ops_partitions.cron_plan({**base, "available": False})[0] == "crontab"
    policy = ops_partitions.Policy(months_ahead=2, tool_usage_retention_days=30)
    assert policy.sql() == ("SELECT audit.partition_maintenance(2, make_interval(days => 180),"
                            " make_interval(days => 30))")


def test_url_without_password():
    strip = ops_partitions.url_without_password
    assert strip(SecretUrl("postgresql://u:p%40ss@h:5/db?sslmode=require")) == "postgresql://u@h:5/db?sslmode=require"
    assert strip(SecretUrl("postgresql://h/db?password=x&sslmode=off")) == "postgresql://h/db?sslmode=off"
    assert strip(SecretUrl("postgresql://u@h/db")) == "postgresql://u@h/db"


# -- backup and restore -------------------------------------------------------------

@pytest.mark.backends("postgres")
async def test_backup_restore_round_trip(store, db, empty_database, tmp_path):
    await fill(db)
    await db.close()
    source_url = store.settings.postgres_url.reveal()
    before, graph_before = await checksums(source_url), await graph_of(source_url)
    assert graph_before["nodes"] > 0 and graph_before["edges"] > 0
    assert all(n > 0 for n, _ in before.values())

    settings = secret_settings(store)
    made = govdb(settings, "backup", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    dumps = list(tmp_path.glob("governance_backup_*.dump"))
    assert [d.name for d in dumps] == [ops_backup.backup_name()]
    assert dumps[0].stat().st_mode & 0o077 == 0  # it holds key hashes: owner only
    again = govdb(settings, "backup", "--dir", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr and len(again.stderr.splitlines()) == 1
    assert len(list(tmp_path.iterdir())) == 1  # no partial file left behind

    from dataclasses import replace
    target = replace(settings, postgres_url=SecretUrl(with_password(empty_database)))
    restored = govdb(target, "restore", str(dumps[0]))
    assert restored.returncode == 0, restored.stderr
    assert await checksums(empty_database) == before
    assert await graph_of(empty_database) == graph_before

    # The restored database works as a govdb store, graph included.
    from govdb.backends import create_backend
    back = create_backend(target)
    await back.connect()
    try:
        assert back.supports_graph
        assert [d.id for d in await back.get_response_chain("a")] == ["a", "q"]
        await back.add_discovery("new", agent_id="lead", type="note", summary="after restore", tags=["a"])
    finally:
        await back.close()
    assert (await graph_of(empty_database))["node_labels"]["Discovery"] == 3

    refused = govdb(target, "restore", str(dumps[0]))
    assert refused.returncode == 1 and "not empty" in refused.stderr and "--clean" in refused.stderr
    cleaned = govdb(target, "restore", "--clean", str(dumps[0]))
    assert cleaned.returncode == 0, cleaned.stderr
    assert await checksums(empty_database) == before
    assert await graph_of(empty_database) == graph_before


@pytest.mark.backends("postgres")
async def test_restore_and_backup_errors(store, tmp_path):
    settings = secret_settings(store)
    junk = tmp_path / "junk.dump"
    junk.write_text("not an archive")
    with pytest.raises(OpsError, match="not a readable pg_dump custom-format archive"):
        await asyncio.to_thread(ops_backup.run_restore, settings, junk)
    with pytest.raises(ValidationError, match="does not exist"):
        await asyncio.to_thread(ops_backup.run_restore, settings, tmp_path / "missing.dump")
    with pytest.raises(ValidationError, match="not an existing directory"):
        await asyncio.to_thread(ops_backup.run_backup, settings, tmp_path / "nowhere")
    from dataclasses import replace
    with pytest.raises(OpsError, match="DB_BACKEND is sqlite"):
        await asyncio.to_thread(ops_backup.run_backup, replace(settings, backend="sqlite"), tmp_path)


@pytest.mark.backends("postgres")
async def test_tools_match_the_server_major(store):
    major = int(await fetchval(store.settings.postgres_url.reveal(),
                               "SELECT current_setting('server_version_num')::int / 10000"))
    for name in ("pg_dump", "pg_restore"):
        tool = ops_backup.find_tool(name, major)
        assert ops_backup.tool_major(tool.argv, tool.env) == major


# -- status -------------------------------------------------------------------------

@pytest.mark.backends("sqlite")
async def test_status_on_sqlite(store, db):
    await db.create_identity("a1", api_key="k")
    await db.append_audit_event("e")
    settings = store.settings
    out = govdb(settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["backend"] == "sqlite" and "postgres" not in doc
    assert doc["sqlite"]["tables"]["agent_metadata"] == 1 and doc["sqlite"]["tables"]["audit_events"] == 1
    screen = govdb(settings, "status")
    assert screen.returncode == 0 and "agent_metadata" in screen.stdout
    from dataclasses import replace
    missing = replace(settings, sqlite_path=settings.sqlite_path.with_name("nope.db"))
    gone = govdb(missing, "status")
    assert gone.returncode == 1 and gone.stderr.startswith("error:") and "DB_SQLITE_PATH" in gone.stderr
    assert not missing.sqlite_path.exists()  # status never creates the file


@pytest.mark.backends("postgres", "postgres-noage")
async def test_status_on_postgres(store, db, config):
    await fill(db)
    await ops_partitions.run_maintenance(store.settings)
    settings = secret_settings(store)
    out = govdb(settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    pg = doc["postgres"]
    assert doc["settings"]["DB_POSTGRES_URL"].count("***") == 1
    assert pg["tables"]["core.identities"] == 2 and pg["tables"]["audit.events"] == 2
    assert pg["tables"]["core.discovery_edges"] == 2
    assert pg["partitions"]["audit.events"]["default_rows"] == 0
    assert pg["partitions"]["audit.events"]["newest"] == "2200-03-01"
    assert pg["last_maintenance"]["details"]["events"]["moved_from_default"] == 1
    if config == "postgres":
        assert pg["graph"]["node_labels"]["Agent"] == 2 and pg["graph"]["edge_labels"]["RESPONSE_TO"] == 1
    else:
        assert pg["graph"] is None
    screen = govdb(settings, "status")
    assert screen.returncode == 0, screen.stderr
    assert "last maintenance" in screen.stdout and "core.identities" in screen.stdout


@pytest.mark.backends("postgres")
async def test_status_in_dual_mode_shows_both_sides(store, db, tmp_path):
    from dataclasses import replace
    from govdb.backends.sqlite import SQLiteDatabase
    lite = SQLiteDatabase(tmp_path / "governance.db")
    await lite.connect()
    await lite.create_identity("only-in-sqlite", api_key="k")
    await lite.close()
    settings = replace(store.settings, backend="dual", sqlite_path=tmp_path / "governance.db")
    doc = await asyncio.to_thread(ops_status.collect, settings)
    assert doc["sqlite"]["tables"]["agent_metadata"] == 1
    assert doc["postgres"]["tables"]["core.identities"] == 0
    import importlib.util
    if importlib.util.find_spec("govdb.backends.outbox") is None:  # the dual-write helper's module
        assert doc["dual"] is None
    else:
        assert {"pending", "parked", "shadow_reads", "shadow_mismatches"} <= set(doc["dual"])
        assert doc["dual"]["pending"] == 0


@pytest.mark.backends("postgres")
async def test_maintenance_upgrades_older_function_bodies(store, db):
    # A database set up by an older govdb (schema version 1) lacks the newer helpers;
    # the backend does not re-apply partitions.sql at that version, so maintenance does.
    await store.execute("DROP FUNCTION audit.expired_partitions(regclass, interval);"
                        " DROP FUNCTION audit.retention_start(interval)")
    done = await ops_partitions.run_maintenance(store.settings)
    assert done["events"]["dropped_partitions"] == []
    assert await store.fetchval("SELECT to_regprocedure('audit.expired_partitions(regclass, interval)') IS NOT NULL")
