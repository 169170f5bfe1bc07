"""Dual-write (DB_BACKEND=dual): same keys in both stores, nothing lost under faults.

Dual-only by nature: each test looks into both stores (or breaks one). The
behavioural suite (test_db_backends.py) also runs on the dual configurations.
Run as the spec says: `DB_BACKEND=dual pytest tests/test_db_dual_write.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from conftest import REPO, Store, _free_port, settings_for, with_database
from govdb.backends import create_backend, outbox
from govdb.backends.dual import DualDatabase
from govdb.errors import StoreUnavailableError
from govdb.migrate.verify import verify


@pytest.fixture
async def dual(pg_server, tmp_path):
    """A fresh dual store (SQLite file + PostgreSQL database with AGE); yields its Store."""
    name = await pg_server.create_database("dual")
    try:
        yield Store("dual", settings_for("dual", tmp_path=tmp_path, pg_url=with_database(pg_server.url, name)),
                    pg_server, name)
    finally:
        await pg_server.drop_database(name)


async def open_dual(settings) -> DualDatabase:
    db = create_backend(settings)
    assert isinstance(db, DualDatabase)
    await db.connect()
    return db


async def mixed_writes(db, prefix: str = "") -> None:
    p = prefix
    await db.create_identity(f"{p}root", api_key="k-root", tags=["ops", "core"], notes="n", metadata={"b": 1, "a": 2})
    await db.create_identity(f"{p}kid", api_key="k-kid", parent_agent_id=f"{p}root", spawn_reason="split")
    await db.update_identity_status(f"{p}kid", "paused", reason="review")
    await db.update_identity(f"{p}root", tags=["ops", "core", "new"], notes="changed")
    await db.update_identity(f"{p}kid", tags=["solo"])
    await db.update_identity(f"{p}kid", tags=[])  # its HAS_TAG edge and the unused Tag node go
    await db.create_session(f"{p}s1", f"{p}root", ttl=timedelta(seconds=60))
    await db.touch_session(f"{p}s1")
    await db.create_session(f"{p}s2", f"{p}kid", ttl=timedelta(seconds=1))
    await db.end_session(f"{p}s1")
    for i in range(3):
        await db.record_agent_state(f"{p}root", energy=0.1 * i, integrity=0.5, entropy=0.5, void=0.0,
                                    state={"history": [i, 1.5]})
    cal = await db.get_calibration()
    await db.update_calibration({"w": [0.25, 1e20]}, expected_version=cal.version if cal else 0)
    ev, fresh = await db.append_audit_event("login", agent_id=f"{p}root", details={"ip": "x", "n": 1})
    assert fresh
    again, fresh = await db.append_audit_event("login", agent_id=f"{p}root", details={"ip": "x", "n": 1},
                                               timestamp=ev.timestamp)
    assert not fresh and again.event_id == ev.event_id
    await db.record_tool_usage("search", agent_id=f"{p}root", latency_ms=12, success=False, error_type="timeout")
    await db.add_discovery(f"{p}d1", agent_id=f"{p}root", type="bug", summary="first thing", tags=["x", "y"])
    await db.add_discovery(f"{p}d2", agent_id=f"{p}kid", type="fix", summary="answer", details="more words",
                           tags=["y"])
    await db.link_discoveries(f"{p}d2", f"{p}d1", edge_type="response_to", response_type="support", weight=0.5)
    await db.link_discoveries(f"{p}d1", f"{p}d2")
    await db.update_discovery_status(f"{p}d1", "resolved")
    await db.create_dialectic_session(f"{p}ds", paused_agent_id=f"{p}kid", reviewer_agent_id=f"{p}root",
                                      topic="why")
    await db.add_dialectic_message(f"{p}ds", agent_id=f"{p}kid", message_type="thesis", reasoning="because")
    await db.add_dialectic_message(f"{p}ds", agent_id=f"{p}root", message_type="synthesis", agrees=True)
    await db.set_dialectic_phase(f"{p}ds", "antithesis")
    await db.resolve_dialectic_session(f"{p}ds", resolution={"ok": True})


async def wait_for_empty_queue(store: Store, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while outbox.queue_counts(store.settings.sqlite_path)["pending"]:
        assert time.monotonic() < deadline, "the background replayer did not drain the queue"
        await asyncio.sleep(0.1)


async def assert_verified(store: Store) -> None:
    report = await verify(store.settings.postgres_url, store.settings.sqlite_path, graph=True,
                          graph_name=store.settings.age_graph)
    bad = [t.to_dict() for t in report.tables if not t.ok]
    assert report.ok, f"verify found differences: {bad}; graph {report.graph.to_dict() if report.graph else None}"
    assert report.graph is not None and report.graph.ok


def sqlite_ids(store: Store, sql: str) -> list:
    with sqlite3.connect(store.settings.sqlite_path) as conn:
        return sorted(r[0] for r in conn.execute(sql))


async def pg_ids(store: Store, sql: str) -> list:
    conn = await asyncpg.connect(store.settings.postgres_url.reveal())
    try:
        return sorted(r[0] for r in await conn.fetch(sql))
    finally:
        await conn.close()


async def test_mixed_writes_have_the_same_keys_in_both_stores(dual):
    db = await open_dual(dual.settings)
    try:
        await mixed_writes(db)
        assert await db.expire_sessions(now=datetime.now(timezone.utc) + timedelta(seconds=5)) == 1  # s2's ttl ran out
        assert (await db.get_session("s2")).is_active is False
        await db.flush()  # writes are applied to PostgreSQL in the background (DB_DUAL_APPLY=background)
        assert await db.in_step()
    finally:
        await db.close()
    for lite, pg in [
        ("SELECT agent_id FROM agent_metadata", "SELECT agent_id FROM core.identities"),
        ("SELECT id FROM agent_state", "SELECT id FROM core.agent_state"),
        ("SELECT event_id FROM audit_events", "SELECT event_id::text FROM audit.events"),
        ("SELECT usage_id FROM tool_usage", "SELECT usage_id::text FROM audit.tool_usage"),
        ("SELECT id FROM dialectic_messages", "SELECT id FROM core.dialectic_messages"),
        ("SELECT session_id FROM session_identities WHERE is_active = 0",
         "SELECT session_id FROM core.sessions WHERE NOT is_active"),
    ]:
        assert sqlite_ids(dual, lite) == await pg_ids(dual, pg), lite
    # PostgreSQL's own ids start past the ones copied from SQLite.
    top = max(sqlite_ids(dual, "SELECT id FROM agent_state"))
    assert await dual.fetchval("SELECT last_value FROM pg_sequences WHERE sequencename LIKE 'agent_state%'") >= top
    assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 0}
    await assert_verified(dual)


async def test_postgres_unreachable_writes_queue_reads_stay_fresh_then_replay(dual):
    down = replace(dual.settings, postgres_url=type(dual.settings.postgres_url)(
        f"postgresql://postgres@127.0.0.1:{_free_port()}/governance"))
    db = await open_dual(down)
    try:
        await mixed_writes(db)
        # Read-your-writes while PostgreSQL (the read primary) is down.
        assert (await db.get_identity("kid")).status == "paused"
        assert [m.message_type for m in (await db.get_dialectic_session("ds")).messages] == ["thesis", "synthesis"]
        figures = outbox.dual_figures(down.sqlite_path)
        assert figures["pending"] > 20 and figures["parked"] == 0 and figures["oldest_pending_age_s"] >= 0
    finally:
        await db.close()
    assert outbox.queue_counts(down.sqlite_path)["pending"] > 20  # nothing was lost at close either
    db = await open_dual(dual.settings)  # PostgreSQL is back
    try:
        result = await db.replay()
        assert result.error is None and result.parked == 0 and result.pending == 0 and result.applied > 20
        assert (await db.get_identity("kid")).status == "paused"
    finally:
        await db.close()
    await assert_verified(dual)


async def test_postgres_only_constraint_violation_is_parked_and_later_writes_land(dual):
    await dual.execute("ALTER TABLE core.identities ADD CONSTRAINT no_poison CHECK (agent_id <> 'poison')")
    db = await open_dual(dual.settings)
    try:
        await db.create_identity("poison", api_key="k")   # acknowledged: SQLite has it
        await db.create_identity("fine", api_key="k")
        await wait_for_empty_queue(dual)  # the background replayer tried it again, then parked it
        await db.create_identity("later", api_key="k")
        result = await db.replay()
        assert result.error is None and result.pending == 0
        assert await db.get_identity("poison") is not None  # read from SQLite while a write is parked
    finally:
        await db.close()
    assert sorted(await pg_ids(dual, "SELECT agent_id FROM core.identities")) == ["fine", "later"]
    parked = outbox.parked_entries(dual.settings.sqlite_path)
    assert [(e.table, e.key, e.op) for e in parked] == [("agent_metadata", ("poison",), "create_identity")]
    assert "CheckViolationError" in parked[0].last_error and "no_poison" in parked[0].last_error
    assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 1}
    # Fixed on the PostgreSQL side, the operator retries it explicitly.
    await dual.execute("ALTER TABLE core.identities DROP CONSTRAINT no_poison")
    db = await open_dual(dual.settings)
    try:
        assert await db.retry_parked(parked[0].seq) == 1
        assert (await db.replay()).pending == 0
    finally:
        await db.close()
    assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 0}
    await assert_verified(dual)


async def test_a_poison_write_in_a_replayed_batch_is_parked_alone(dual):
    # Writes queued during an outage are replayed as one batch, written set-based; a row
    # PostgreSQL refuses sends that batch down the row-by-row path: only that row is parked.
    await dual.execute("ALTER TABLE core.discoveries ADD CONSTRAINT no_poison CHECK (id <> 'poison')")
    down = replace(dual.settings, postgres_url=type(dual.settings.postgres_url)(
        f"postgresql://postgres@127.0.0.1:{_free_port()}/governance"))
    db = await open_dual(down)
    try:
        await mixed_writes(db, "a-")
        await db.add_discovery("poison", agent_id="a-root", type="bug", summary="never in PostgreSQL", tags=["x"])
        await mixed_writes(db, "b-")
    finally:
        await db.close()
    queued = outbox.queue_counts(dual.settings.sqlite_path)["pending"]
    db = await open_dual(dual.settings)
    try:
        result = await db.replay()
    finally:
        await db.close()
    assert result.error is None and result.pending == 0 and result.parked == 1 and result.applied == queued - 1
    assert [e.key for e in outbox.parked_entries(dual.settings.sqlite_path)] == [("poison",)]
    assert await pg_ids(dual, "SELECT id FROM core.discoveries") == [
        d for d in sqlite_ids(dual, "SELECT id FROM discoveries") if d != "poison"]
    assert await pg_ids(dual, "SELECT agent_id FROM core.identities") == ["a-kid", "a-root", "b-kid", "b-root"]
    await dual.execute("ALTER TABLE core.discoveries DROP CONSTRAINT no_poison")
    db = await open_dual(dual.settings)
    try:
        assert await db.retry_parked() == 1
        assert (await db.replay()).pending == 0
    finally:
        await db.close()
    await assert_verified(dual)


async def test_statement_timeout_is_retried_until_it_lands(dual):
    await dual.execute(
        f'ALTER DATABASE "{dual.dbname}" SET statement_timeout = 300;'
        "CREATE TABLE public.slow (on_ boolean);  INSERT INTO public.slow VALUES (true);"
        "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF (SELECT on_ FROM public.slow) THEN PERFORM pg_sleep(1); END IF; RETURN NEW; END $$;"
        "CREATE TRIGGER slow BEFORE INSERT ON core.agent_state FOR EACH ROW EXECUTE FUNCTION public.slow_down()")
    db = await open_dual(dual.settings)
    try:
        await db.create_identity("a", api_key="k")
        snap = await db.record_agent_state("a", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
        assert (await db.get_latest_agent_state("a")).id == snap.id  # from SQLite meanwhile
        first = await db.replay()
        assert first.error and "QueryCanceledError" in first.error and first.parked == 0
        await dual.execute("UPDATE public.slow SET on_ = false")
        await wait_for_empty_queue(dual)  # the background replayer retries with backoff
        assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 0}
    finally:
        await db.close()
    assert await pg_ids(dual, "SELECT id FROM core.agent_state") == [snap.id]


async def test_sqlite_busy_is_a_clear_error_and_nothing_reaches_postgres(dual, monkeypatch):
    from govdb.backends import sqlite as sqlite_backend
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 300)
    db = await open_dual(dual.settings)
    try:
        await db.create_identity("a", api_key="k")
        other = sqlite3.connect(dual.settings.sqlite_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StoreUnavailableError, match="SQLITE_BUSY|locked"):
                await db.create_identity("b", api_key="k")
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Held for less than the busy timeout, the write waits and lands in both.
        other = sqlite3.connect(dual.settings.sqlite_path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.1, lambda: (other.execute("ROLLBACK"), other.close())).start()
        await db.create_identity("c", api_key="k")
    finally:
        await db.close()
    assert await pg_ids(dual, "SELECT agent_id FROM core.identities") == ["a", "c"]
    assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 0}


async def test_shadow_reads_count_and_detect_drift(dual):
    settings = replace(dual.settings, dual_shadow_rate=1.0)
    db = await open_dual(settings)
    try:
        await db.create_identity("a", api_key="k", metadata={"z": 1, "a": [1.0, 2]})
        await db.add_discovery("d", agent_id="a", type="t", summary="s", tags=["b", "a"])
        await db.flush()  # reads are shadowed only while PostgreSQL holds every write
        for _ in range(3):
            assert (await db.get_identity("a")).status == "active"
            await db.search_discoveries(tags=["a"])
        assert db.shadow_counts()["get_identity"] == (3, 0)
        await dual.execute("UPDATE core.identities SET status = 'paused' WHERE agent_id = 'a'")  # drift
        await db.get_identity("a")
        await db.list_identities()
        assert db.shadow_counts()["get_identity"] == (4, 1)
    finally:
        await db.close()
    figures = outbox.dual_figures(settings.sqlite_path)
    assert figures["shadow_by_operation"]["get_identity"] == {"reads": 4, "mismatches": 1}
    assert figures["shadow_by_operation"]["search_discoveries"] == {"reads": 3, "mismatches": 0}
    assert figures["shadow_mismatches"] == 2 and figures["shadow_reads"] == 8


_WRITER = """
import asyncio, sys
from govdb.config import Settings
from govdb.backends import create_backend

async def main():
    db = create_backend(Settings.from_env())
    await db.connect()
    await db.create_identity("hub", api_key="k")
    print("ready", flush=True)
    async def task(n):
        await db.create_identity(f"w{n}", api_key="k", parent_agent_id="hub", tags=[f"t{n}"])
        for i in range(10_000):
            await db.record_agent_state(f"w{n}", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
            await db.append_audit_event("tick", agent_id=f"w{n}", details={"i": i})
            await db.add_discovery(f"d{n}-{i}", agent_id=f"w{n}", type="t", summary="s", tags=["x"])
            if i:
                await db.link_discoveries(f"d{n}-{i}", f"d{n}-{i - 1}")
    await asyncio.gather(*(task(n) for n in range(4)))

asyncio.run(main())
"""


async def test_process_killed_mid_load_replay_finishes_the_queue(dual):
    env = {**os.environ, **{k: v for k, v in dual.settings.describe().items()},
           "DB_POSTGRES_URL": dual.settings.postgres_url.reveal(), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        await asyncio.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert outbox.queue_counts(dual.settings.sqlite_path)["pending"] > 0  # records the dead process left
    db = await open_dual(dual.settings)
    try:
        result = await db.replay()
        assert result.error is None and result.parked == 0 and result.pending == 0
    finally:
        await db.close()
    assert len(sqlite_ids(dual, "SELECT id FROM agent_state")) > 10
    await assert_verified(dual)


def run_cli(store: Store, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **store.settings.describe(), "DB_POSTGRES_URL": store.settings.postgres_url.reveal(),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "govdb.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


async def test_cli_status_compare_parked_retry_and_replay(dual):
    await dual.execute("ALTER TABLE core.discoveries ADD CONSTRAINT no_poison CHECK (id <> 'poison')")
    db = await open_dual(dual.settings)
    try:
        await mixed_writes(db)
        await db.create_identity("side", api_key="k")
        await db.add_discovery("poison", agent_id="side", type="t", summary="never in PostgreSQL")
        await wait_for_empty_queue(dual)
    finally:
        await db.close()
    status = run_cli(dual, "dual", "status", "--json")
    assert status.returncode == 0, status.stderr
    figures = json.loads(status.stdout)
    assert figures["parked"] == 1 and figures["pending"] == 0
    assert figures["counts"]["discoveries"] == {"sqlite": 3, "postgres": 2}
    assert figures["parked_entries"][0]["key"] == ["poison"] and "23514" in figures["parked_entries"][0]["error"]
    assert "api_key" not in status.stdout and "k-root" not in status.stdout
    shown = run_cli(dual, "dual", "status")
    assert shown.returncode == 0 and "parked writes" in shown.stdout and "add_discovery" in shown.stdout
    listed = run_cli(dual, "dual", "parked")
    assert listed.returncode == 0 and '["poison"]' in listed.stdout
    compare = run_cli(dual, "dual", "compare", "--json")
    assert compare.returncode == 2, compare.stderr  # the parked discovery is drift
    assert {d["read"] for d in json.loads(compare.stdout)["drift"]} >= {"search_discoveries"}
    assert run_cli(dual, "dual", "replay").returncode == 2  # empty queue, but a parked write remains
    assert run_cli(dual, "dual", "retry-parked", "999").returncode == 1
    await dual.execute("ALTER TABLE core.discoveries DROP CONSTRAINT no_poison")
    retried = run_cli(dual, "dual", "retry-parked")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert run_cli(dual, "dual", "compare").returncode == 0
    assert run_cli(dual, "dual", "replay").returncode == 0
    await assert_verified(dual)


def test_shadow_rate_setting_is_validated():
    from govdb.config import Settings
    from govdb.errors import ConfigError
    assert Settings.from_env({"DB_DUAL_SHADOW_RATE": "0.25"}).dual_shadow_rate == 0.25
    assert Settings.from_env({}).describe()["DB_DUAL_SHADOW_RATE"] == "0"
    for bad in ("1.5", "-0.1", "nan", "often"):
        with pytest.raises(ConfigError, match="DB_DUAL_SHADOW_RATE"):
            Settings.from_env({"DB_DUAL_SHADOW_RATE": bad})


async def test_write_returns_while_postgres_is_slow_and_lands_after(dual):
    """DB_DUAL_APPLY=background (the default): a write is acknowledged once SQLite (with its outbox
    record) committed, reads still see it, and it reaches PostgreSQL when the row lock there is released."""
    db = await open_dual(dual.settings)
    blocker = await asyncpg.connect(dual.settings.postgres_url.reveal())
    try:
        await db.create_identity("a", api_key="k")
        await db.flush()
        assert await db.in_step()
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM core.identities WHERE agent_id = 'a' FOR UPDATE")
        try:
            t0 = time.monotonic()
            await asyncio.wait_for(db.update_identity_status("a", "paused", reason="slow pg"), 3.0)
            await db.record_agent_state("a", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
            assert time.monotonic() - t0 < 3.0
            await asyncio.sleep(0.3)  # the background apply is waiting for the row lock
            assert await pg_ids(dual, "SELECT status FROM core.identities WHERE agent_id = 'a'") == ["active"]
            assert not await db.in_step()
            assert (await db.get_identity("a")).status == "paused"  # read-your-writes: from SQLite meanwhile
            assert len(await db.get_agent_state_history("a")) == 1
        finally:
            await tx.rollback()
        await asyncio.wait_for(db.flush(), 10.0)
        assert await db.in_step()
        assert await pg_ids(dual, "SELECT status FROM core.identities WHERE agent_id = 'a'") == ["paused"]
        await db.create_identity("b", api_key="k")  # close() applies what is still queued
    finally:
        await blocker.close()
        await db.close()
    assert await pg_ids(dual, "SELECT agent_id FROM core.identities") == ["a", "b"]
    assert outbox.queue_counts(dual.settings.sqlite_path) == {"pending": 0, "parked": 0}
    await assert_verified(dual)


async def test_replay_leaves_this_process_s_queued_writes_to_its_applier(dual, monkeypatch):
    # The replayer (and `replay(flush=False)`, what it runs) must not apply records the
    # background applier holds: applying them twice at once doubled the work under load.
    from govdb.backends import dual as dual_module
    monkeypatch.setattr(dual_module, "APPLY_LINGER", 30.0)  # the applier waits: the writes stay queued
    db = await open_dual(dual.settings)
    try:
        await db.create_identity("a", api_key="k")
        await db.record_agent_state("a", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
        assert db.queued == 2
        result = await db.replay(flush=False)
        assert result.applied == 0 and result.pending == 2
        assert await pg_ids(dual, "SELECT agent_id FROM core.identities") == []
        await db.flush()  # the applier's own, now
        assert db.queued == 0 and await db.in_step()
        assert await pg_ids(dual, "SELECT agent_id FROM core.identities") == ["a"]
    finally:
        await db.close()
    await assert_verified(dual)


async def test_sync_apply_waits_for_postgres(dual):
    db = await open_dual(replace(dual.settings, dual_apply="sync"))
    blocker = await asyncpg.connect(dual.settings.postgres_url.reveal())
    try:
        await db.create_identity("a", api_key="k")
        assert await db.in_step()  # applied before create_identity returned
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM core.identities WHERE agent_id = 'a' FOR UPDATE")
        release = asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(tx.rollback()))
        t0 = time.monotonic()
        await db.update_identity_status("a", "paused")
        assert time.monotonic() - t0 >= 0.4  # it waited for the row lock in PostgreSQL
        release.cancel()
        assert await pg_ids(dual, "SELECT status FROM core.identities WHERE agent_id = 'a'") == ["paused"]
    finally:
        await blocker.close()
        await db.close()


def test_dual_apply_setting_is_validated():
    from govdb.config import Settings
    from govdb.errors import ConfigError
    assert Settings.from_env({}).dual_apply == "background"
    assert Settings.from_env({"DB_DUAL_APPLY": "Background"}).describe()["DB_DUAL_APPLY"] == "background"
    with pytest.raises(ConfigError, match="DB_DUAL_APPLY"):
        Settings.from_env({"DB_DUAL_APPLY": "later"})
