"""Cutover to PostgreSQL and rollback to SQLite, on real files and a real PostgreSQL.

Each test gets a governance.db written through the SQLite backend, a fresh
database (with AGE) holding its backfill and graph, and runs the commands as
an operator would: the functions, and the CLI in a subprocess.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from conftest import settings_for, with_database
from govdb import cutover as co
from govdb.backends import create_backend, outbox
from govdb.config import Settings
from govdb.errors import GovdbError
from govdb.keys import generate_api_key
from govdb.migrate.backfill import backfill
from govdb.migrate.graph import load_graph
from govdb.migrate.verify import verify

UTC = timezone.utc
REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pw-Never-Shown-42"
TABLES = ("agent_metadata", "session_identities", "agent_state", "calibration_state", "audit_events", "tool_usage",
          "discoveries", "discovery_tags", "discovery_edges", "dialectic_sessions", "dialectic_messages")


async def _fill(db) -> None:
    await db.create_identity("agent-a", api_key=generate_api_key(), tags=["lead"], notes="first")
    await db.create_identity("agent-b", api_key=generate_api_key(), parent_agent_id="agent-a")
    await db.create_session("sess-1", "agent-a", ttl=timedelta(hours=1))
    await db.create_session("sess-2", "agent-b", ttl=timedelta(hours=1), client_type="cli")
    await db.record_agent_state("agent-a", energy=0.5, integrity=0.9, entropy=0.2, void=-0.1, state={"lambda1": 0.1})
    await db.update_calibration({"bins": [0.5]}, expected_version=0)
    await db.append_audit_event("checkin", agent_id="agent-a", details={"m": "hello"})
    await db.record_tool_usage("search", agent_id="agent-a", latency_ms=5)
    await db.add_discovery("d-1", agent_id="agent-a", type="question", summary="why now", tags=["t1", "t2"])
    await db.add_discovery("d-2", agent_id="agent-b", type="answer", summary="because", tags=["t1"])
    await db.link_discoveries("d-2", "d-1", edge_type="response_to", response_type="extend")
    await db.create_dialectic_session("ds-1", paused_agent_id="agent-b", reason="review")
    await db.assign_reviewer("ds-1", "agent-a")
    await db.add_dialectic_message("ds-1", agent_id="agent-b", message_type="thesis", reasoning="fine")


class Site:
    """A SQLite file and the PostgreSQL database it was backfilled into."""

    def __init__(self, path: Path, url: str):
        self.path, self.url = path, url
        self.settings = Settings.from_env({
            "DB_BACKEND": "dual", "DB_SQLITE_PATH": str(path), "DB_POSTGRES_URL": url,
            "DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": "4"})

    def backend(self, kind: str):
        return create_backend(Settings.from_env({
            "DB_BACKEND": kind, "DB_SQLITE_PATH": str(self.path), "DB_POSTGRES_URL": self.url,
            "DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": "4"}))

    async def fetch(self, sql: str, *args):
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    def outbox(self, *, parked: bool) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            outbox.ensure_tables(conn)
            [entry] = outbox.enqueue(conn, "create_identity", [("agent_metadata", ("agent-a",))])
            if parked:
                outbox.park(conn, [(entry.seq, "CheckViolationError: refused")])
            conn.execute("COMMIT")
        finally:
            conn.close()


@pytest.fixture
async def site(pg_server, tmp_path) -> Site:
    name = await pg_server.create_database("postgres")
    url = with_database(pg_server.url, name)
    path = tmp_path / "data" / "governance.db"
    s = Site(path, url)
    db = s.backend("sqlite")
    await db.connect()
    try:
        await _fill(db)
    finally:
        await db.close()
    report = await backfill(settings_for("postgres", pg_url=url), path, progress=False, workers=1)
    assert report.reconciled
    await load_graph(url)
    try:
        yield s
    finally:
        await pg_server.drop_database(name)


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


# -- cutover ------------------------------------------------------------------------------

async def test_cutover_is_refused_when_verify_finds_a_difference(site, capsys):
    await site.fetch("UPDATE core.identities SET status = 'paused' WHERE agent_id = 'agent-b'")
    assert await _in_thread(co.cutover, site.settings) == 2
    out = capsys.readouterr().out
    assert "cutover refused" in out and "verify: differences in agent_metadata" in out
    assert not (site.path.parent / "archive").exists()
    [row] = await site.fetch("SELECT to_regclass('migrate.cutovers') AS t")
    assert row["t"] is None  # nothing recorded


@pytest.mark.parametrize("parked", [False, True], ids=["pending", "parked"])
async def test_cutover_is_refused_while_a_write_waits_for_postgres(site, capsys, parked):
    site.outbox(parked=parked)
    assert await _in_thread(co.cutover, site.settings) == 2
    out = capsys.readouterr().out
    failing = "no parked writes: 1 parked" if parked else "retry queue empty: 1 writes wait for PostgreSQL"
    assert failing in out
    assert not (site.path.parent / "archive").exists()


async def test_cutover_archives_a_consistent_copy_records_it_and_moves_sequences(site, capsys):
    # A live writer whose last write is still only in the WAL.
    live = sqlite3.connect(site.path, isolation_level=None)
    live.execute("PRAGMA wal_autocheckpoint = 0")
    live.execute("INSERT INTO rate_limits (agent_id, timestamp) VALUES ('agent-a', 'now')")
    assert Path(f"{site.path}-wal").stat().st_size > 0
    try:
        assert await _in_thread(co.cutover, site.settings, dry_run=True) == 0
        assert "nothing was changed" in capsys.readouterr().out
        assert not (site.path.parent / "archive").exists()

        assert await _in_thread(co.cutover, site.settings) == 0
    finally:
        live.close()
    out = capsys.readouterr().out
    archive = site.path.parent / "archive" / f"governance_{datetime.now(UTC):%Y%m%d}.db"
    assert archive.is_file() and not Path(f"{archive}-wal").exists()
    assert site.path.is_file()  # left in place for servers still in dual mode
    assert _counts(archive) == _counts(site.path)
    with sqlite3.connect(archive) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM rate_limits").fetchone()[0] == 1
    assert "DB_BACKEND" in out and "postgres" in out
    [rec] = await site.fetch("SELECT archive_path, marks FROM migrate.cutovers WHERE rolled_back_at IS NULL")
    assert rec["archive_path"] == str(archive.resolve())
    import json
    marks = json.loads(rec["marks"])
    assert marks["core.agent_state"]["rows"] == 1 and marks["audit.events"]["max_id"] == 1
    [seq] = await site.fetch("SELECT last_value FROM core.dialectic_messages_id_seq")
    assert seq["last_value"] >= 1

    # A second cutover is refused while this one stands; a second archive never replaces the first.
    assert await _in_thread(co.cutover, site.settings) == 2
    assert "no cutover recorded yet" in capsys.readouterr().out
    again = co.archive_sqlite(site.path, archive.parent, datetime.now(UTC))
    assert again.name == f"governance_{datetime.now(UTC):%Y%m%d}_2.db" and archive.is_file()


# -- rollback -----------------------------------------------------------------------------

async def _write_after_cutover(db) -> str:
    key = generate_api_key()
    await db.create_identity("agent-c", api_key=key, parent_agent_id="agent-a",
                             created_at=datetime(2020, 1, 1, tzinfo=UTC))  # an old stamp: found by its key
    await db.update_identity_status("agent-b", "paused", reason="review")
    await db.update_identity("agent-a", tags=["lead", "ops"], notes="changed")
    await db.create_session("sess-3", "agent-c", ttl=timedelta(hours=2))
    await db.touch_session("sess-1", ttl=timedelta(hours=3))
    await db.end_session("sess-2")
    await db.record_agent_state("agent-c", energy=0.4, integrity=0.8, entropy=0.3, void=0.2, regime="warning")
    await db.record_agent_state("agent-a", energy=0.6, integrity=0.95, entropy=0.1, void=-0.2)
    await db.update_calibration({"bins": [0.25, 0.75]}, expected_version=1)
    await db.append_audit_event("checkin", agent_id="agent-c", details={"m": "after cutover"})
    await db.append_audit_event("old", agent_id="agent-a", details={}, timestamp=datetime(2021, 5, 1, tzinfo=UTC))
    await db.record_tool_usage("search", agent_id="agent-c", latency_ms=9, success=False, error_type="Timeout")
    await db.add_discovery("d-3", agent_id="agent-c", type="answer", summary="new answer", tags=["t3", "t1"])
    await db.link_discoveries("d-3", "d-1", edge_type="response_to", response_type="support")
    await db.update_discovery_status("d-1", "resolved")
    await db.add_dialectic_message("ds-1", agent_id="agent-a", message_type="antithesis", concerns=["x"])
    await db.set_dialectic_phase("ds-1", "synthesis")
    await db.add_dialectic_message("ds-1", agent_id="agent-b", message_type="synthesis", agrees=True)
    await db.resolve_dialectic_session("ds-1", resolution={"action": "resume"})
    await db.create_dialectic_session("ds-2", paused_agent_id="agent-c", reviewer_agent_id="agent-a",
                                      discovery_id="d-3")
    await db.add_dialectic_message("ds-2", agent_id="agent-c", message_type="thesis", reasoning="new")
    return key


async def _everything(db) -> dict:
    agents = ("agent-a", "agent-b", "agent-c")
    return {
        "identities": [await db.get_identity(a) for a in agents],
        "sessions": [await db.get_session(s) for s in ("sess-1", "sess-2", "sess-3")],
        "states": [await db.get_agent_state_history(a) for a in agents],
        "calibration": await db.get_calibration(),
        "audit": await db.query_audit_events(limit=100),
        "tools": await db.query_tool_usage(limit=100),
        "discoveries": [await db.get_discovery(d) for d in ("d-1", "d-2", "d-3")],
        "neighbors": await db.get_neighbors("d-1"),
        "dialectic": [await db.get_dialectic_session(s) for s in ("ds-1", "ds-2")],
    }


async def test_rollback_after_cutover_brings_back_every_later_write_with_the_same_keys(site, capsys):
    assert await _in_thread(co.cutover, site.settings) == 0
    pg = site.backend("postgres")
    await pg.connect()
    try:
        key = await _write_after_cutover(pg)
        expected = await _everything(pg)
    finally:
        await pg.close()

    with pytest.raises(GovdbError, match="use --force"):  # the original is still there
        await _in_thread(co.rollback, site.settings, progress=False)
    before = _counts(site.path)
    capsys.readouterr()
    assert await _in_thread(co.rollback, site.settings, force=True, progress=False) == 0
    out = capsys.readouterr().out
    assert "verified: the file holds everything PostgreSQL holds" in out and "DB_BACKEND" in out
    [aside] = [p for p in site.path.parent.glob("governance.db.before-rollback-*") if p.name[-4:] not in ("-wal", "-shm")]
    assert _counts(aside) == before  # kept aside, not deleted

    restored = site.backend("sqlite")
    await restored.connect()
    try:
        got = await _everything(restored)
        assert await restored.verify_api_key("agent-c", key)
    finally:
        await restored.close()
    for part in expected:
        assert got[part] == expected[part], part
    assert got["identities"][1].status == "paused" and not got["sessions"][1].is_active
    assert got["dialectic"][0].status == "resolved" and len(got["dialectic"][0].messages) == 3

    report = await verify(site.url, site.path, graph=True)
    assert report.ok, [t.to_dict() for t in report.tables if not t.ok]
    assert report.graph is not None and report.graph.checked
    [rec] = await site.fetch("SELECT rollback FROM migrate.cutovers WHERE rolled_back_at IS NOT NULL")
    assert '"audit_events": {"new": 2' in rec["rollback"]

    # The cutover is rolled back: a second rollback has nothing to restore.
    assert await _in_thread(co.rollback, site.settings, progress=False) == 0
    assert "no cutover is recorded" in capsys.readouterr().out


async def test_rollback_during_dual_write_restores_nothing_and_warns_of_queued_writes(site, capsys):
    site.outbox(parked=False)
    before = _counts(site.path)
    assert await _in_thread(co.rollback, site.settings, progress=False) == 0
    out = capsys.readouterr().out
    assert "nothing to restore" in out and "1 writes still wait for PostgreSQL" in out
    assert "DB_BACKEND" in out and "sqlite" in out
    assert _counts(site.path) == before and not list(site.path.parent.glob("*.before-rollback-*"))


# -- the CLI ------------------------------------------------------------------------------

def _cli(site: Site, *args: str) -> subprocess.CompletedProcess:
    url = site.url.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    assert PASSWORD in url
    env = {**os.environ, "DB_SQLITE_PATH": str(site.path), "DB_POSTGRES_URL": url, "DB_BACKEND": "dual"}
    return subprocess.run([sys.executable, "-m", "govdb.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


async def test_cli_exit_codes_and_no_password_in_output(site):
    site.outbox(parked=True)
    runs = [("refused", await _in_thread(_cli, site, "cutover"), 2)]
    conn = sqlite3.connect(site.path)
    conn.execute("DELETE FROM govdb_outbox")
    conn.commit()
    conn.close()
    runs += [("dry run", await _in_thread(_cli, site, "cutover", "--dry-run"), 0),
             ("cutover", await _in_thread(_cli, site, "cutover"), 0),
             ("no force", await _in_thread(_cli, site, "rollback", "--no-progress"), 1),
             ("rollback", await _in_thread(_cli, site, "rollback", "--force"), 0)]
    for name, run, code in runs:
        assert run.returncode == code, (name, run.stdout[-2000:], run.stderr[-2000:])
        assert PASSWORD not in run.stdout + run.stderr, name
        assert "Traceback" not in run.stderr, name
    assert runs[3][1].stderr.startswith("error: ") and "--force" in runs[3][1].stderr
    assert "postgres:***@" in runs[2][1].stdout


async def _in_thread(fn, *args, **kw):
    # The commands run their own event loop (asyncio.run), as the CLI does.
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))
