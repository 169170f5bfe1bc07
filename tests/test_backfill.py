"""The backfill against real PostgreSQL, from real legacy SQLite files.

Every test gets its own database (prefix mig_, from the schema template of
conftest.py) and its own copy of a generated legacy file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from conftest import copy_of, generate_legacy_file, with_database
from govdb.backends.postgres import PostgresDatabase
from govdb.backends.sqlite import SQLiteDatabase
from govdb.config import SecretUrl
from govdb.migrate import MigrationError
from govdb.migrate.backfill import backfill
from govdb.migrate.copytext import copy_column, copy_field, copy_lines, copy_text
from govdb.migrate.indexes import defer_indexes, restore_indexes
from govdb.migrate.targets import TARGETS

UTC = timezone.utc
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "migrate_sqlite_to_postgres.py"
PG_COUNT = {  # legacy table -> how to count its rows in PostgreSQL
    t.source: f"SELECT count(*) FROM {t.table}" for t in TARGETS.values()
}


@pytest.fixture
def legacy_db(dirty_legacy_template, tmp_path) -> Path:
    return copy_of(dirty_legacy_template, tmp_path)


async def _create_db(pg_server, template: str | None) -> str:
    name = f"mig_{uuid.uuid4().hex[:12]}"
    conn = await pg_server.admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return name


@pytest.fixture
async def pg_url(pg_server):
    name = await _create_db(pg_server, pg_server.templates["postgres"])
    try:
        yield with_database(pg_server.url, name)
    finally:
        await pg_server.drop_database(name)


async def fetch(url: str, sql: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def fetchval(url: str, sql: str, *args):
    return (await fetch(url, sql, *args))[0][0]


def source_count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def quarantined(url: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    rows = await fetch(url, "SELECT source_table, key, kind, reason, raw_row FROM migrate.quarantine")
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


async def repaired(url: str) -> dict[tuple[str, str, str], tuple[str, str, str, str]]:
    rows = await fetch(url, "SELECT source_table, key, column_name, kind, problem, original, original_encoding"
                            " FROM migrate.repairs")
    return {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6]) for r in rows}


def key(*values) -> str:
    return json.dumps(list(values), ensure_ascii=False)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# -- every dirty case -------------------------------------------------------------------

async def test_each_dirty_case_is_repaired_or_quarantined_and_counts_reconcile(legacy_db, pg_url):
    report = await backfill(pg_url, legacy_db, progress=False, batch_size=500)
    assert report.reconciled
    for t in report.tables:
        assert t.source_rows == source_count(legacy_db, t.table), t.table
        assert t.migrated + t.quarantined == t.source_rows
        assert await fetchval(pg_url, PG_COUNT[t.table]) == t.migrated, t.table  # fresh database
    q, r = await quarantined(pg_url), await repaired(pg_url)
    assert sum(t.quarantined for t in report.tables) == len(q)

    # Timestamps: garbage and empty quarantined (no other timestamp in the row), formats converted.
    assert q[("agent_metadata", key("dirty-ts-6"))][0] == "bad-timestamp"
    assert q[("agent_metadata", key("dirty-ts-7"))][0] == "bad-timestamp"
    created = {row[0]: row[1] for row in await fetch(
        pg_url, "SELECT agent_id, created_at FROM core.identities WHERE agent_id LIKE 'dirty-ts-%'")}
    assert created["dirty-ts-0"] == datetime(2025, 11, 26, 1, 15, 29, 222120, tzinfo=UTC)  # naive = UTC
    assert created["dirty-ts-4"] == datetime(2025, 11, 26, 8, 15, 29, tzinfo=UTC)
    assert created["dirty-ts-5"] == datetime(2025, 11, 26, 1, 15, 29, tzinfo=UTC)  # epoch seconds
    assert created["dirty-ts-8"].year == 2999 and created["dirty-ts-9"].year == 1901  # kept
    bad_ts = [k for k, v in q.items() if k[0] == "audit_events" and v[0] == "bad-timestamp"]
    assert len(bad_ts) == 2
    # JSON: invalid / null / \u0000 repaired as the SQLite backend reads them, original kept.
    assert r[("agent_metadata", key("dirty-json-0"), "metadata_json")][0] == "invalid-json"
    assert r[("agent_metadata", key("dirty-json-0"), "metadata_json")][2] == "{not json"
    assert r[("agent_metadata", key("dirty-json-1"), "metadata_json")][0] == "json-null"
    assert r[("agent_metadata", key("dirty-json-2"), "metadata_json")][2] == '{"a": "x\\u0000y"}'
    assert await fetchval(pg_url, "SELECT metadata FROM core.identities WHERE agent_id = 'dirty-json-2'") \
        == '{"a": "xy"}'
    # NUL and bytes that are not UTF-8.
    assert r[("discoveries", key("dirty-nul"), "summary")][0] == "nul-byte"
    assert r[("discoveries", key("dirty-utf8"), "summary")][2:] == ("6e6f742d75746638ff", "hex")
    summaries = dict(await fetch(pg_url, "SELECT id, summary FROM core.discoveries WHERE id LIKE 'dirty-%'"))
    assert summaries == {"dirty-nul": "beforeafter", "dirty-utf8": "not-utf8\ufffd"}
    assert any(k[0] == "tool_usage" and k[2] == "tool_name" and v[0] == "invalid-utf8" for k, v in r.items())
    # event_id / usage_id missing or not UUIDs: legacy_uuid(table, rowid).
    bad_ids = [v for k, v in r.items() if k[0] == "audit_events" and k[2] == "event_id"]
    assert {v[2] for v in bad_ids} >= {None, "", "not-a-uuid", "12345"}
    assert sum(1 for k in r if k[0] == "tool_usage" and k[2] == "usage_id") == 5
    # EISV: NaN / inf / out of range / unknown regime without a valid state_json value.
    assert sorted(v[0] for k, v in q.items() if k[0] == "agent_state") == [
        "bad-value"] * 5 + ["orphan", "unknown-value"]
    # success not 0/1: read as read_bool reads it.
    assert sorted(v[2] for k, v in r.items() if k[0] == "tool_usage" and k[2] == "success") == ["-1", "2", "yes"]
    # Unknown status: paused, recorded.
    assert await fetchval(pg_url, "SELECT status FROM core.identities WHERE agent_id = 'dirty-status'") == "paused"
    # Orphans quarantined; a parent naming no agent cleared; a lineage cycle broken once.
    assert q[("session_identities", key("dirty-orphan-session"))][0] == "orphan"
    assert q[("discovery_tags", key("ghost-discovery", "orphan-tag"))][0] == "orphan"
    assert q[("discovery_edges", key("ghost-discovery", "disc-0000000", "related_to"))][0] == "orphan"
    assert any(k[0] == "dialectic_messages" and "ghost-session" in v[1] for k, v in q.items())
    parents = dict(await fetch(pg_url, "SELECT agent_id, parent_agent_id FROM core.identities"
                                       " WHERE agent_id IN ('dirty-orphan-parent', 'dirty-cycle-a', 'dirty-cycle-b')"))
    assert parents == {"dirty-orphan-parent": None, "dirty-cycle-a": None, "dirty-cycle-b": "dirty-cycle-a"}
    assert r[("agent_metadata", key("dirty-cycle-a"), "parent_agent_id")][0] == "lineage-cycle"
    # Large payloads and far timestamps are kept (the DEFAULT partition holds the far ones).
    big = await fetchval(pg_url, "SELECT length(details->>'blob') FROM audit.events WHERE event_type = 'dirty_big'")
    assert big == 3_000_000
    assert await fetchval(pg_url, "SELECT count(*) FROM audit.events_default WHERE event_type IN"
                                  " ('dirty_big', 'dirty_old')") == 2
    assert await fetchval(pg_url, "SELECT to_regclass('audit.events_2025_01') IS NOT NULL")
    # audit.event_hashes has every event; a NULL raw_hash got base.audit_hash.
    assert await fetchval(pg_url, "SELECT count(*) FROM audit.event_hashes") == report.table("audit_events").migrated
    assert await fetchval(pg_url, "SELECT count(*) FROM audit.events e JOIN audit.event_hashes h"
                                  " USING (raw_hash, event_id, ts)") == report.table("audit_events").migrated


async def test_no_raw_api_key_reaches_postgresql(legacy_db, pg_url):
    with sqlite3.connect(legacy_db) as conn:
        raw_keys = [r[0] for r in conn.execute("SELECT api_key FROM agent_metadata")]
    await backfill(pg_url, legacy_db, progress=False)
    assert await fetchval(pg_url, "SELECT count(*) FROM core.identities WHERE api_key_hash !~ '^sha256\\$[0-9a-f]{64}$'") == 0
    dump = ""
    for sql in ("SELECT * FROM core.identities", "SELECT * FROM migrate.quarantine", "SELECT * FROM migrate.repairs"):
        dump += "\n".join(str(tuple(r)) for r in await fetch(pg_url, sql))
    leaked = [k for k in raw_keys if len(k) > 2 and k in dump]
    assert not leaked
    db = PostgresDatabase(SecretUrl(pg_url), min_conn=1, max_conn=2, age_enabled=False)
    async with db:  # the legacy raw key still verifies against its hash
        assert await db.verify_api_key("agent-000003", raw_keys[3])
        assert not await db.verify_api_key("agent-000003", "wrong")


# -- type fidelity ----------------------------------------------------------------------

ODD = ["odd-'quote'", 'odd-"dq"', "odd-$$d$$", "odd-\\b\\s", "odd;x", "odd'}) MATCH (n) DETACH DELETE n //",
       "odd'); DROP TABLE core.identities; --", "агент", "エージェント", "وكيل", "tab\there", "emoji-🙂"]


def _fidelity_file(path: Path) -> None:
    """A legacy file of odd but readable values in every column, written as old servers wrote them."""
    conn = sqlite3.connect(path)
    conn.executescript((REPO / "src/govdb/sql/sqlite_legacy.sql").read_text())
    conn.execute("PRAGMA journal_mode=WAL")
    stamps = ["2025-11-26T01:15:29.222120", "2025-11-26 01:15:29", "2025-11-26T01:15:29Z",
              "2025-11-26T01:15:29.5+05:30", "1764119729.25", "2025-11-26T01:15:29.222120+00:00"]
    docs = ['{"k": 1}', '{"nested": {"a": [1, 2.5, null, true, "ü"]}, "big": 12345678901234567890}',
            '{"f": 1e+20, "g": 1.5e-07, "h": -0.0}', '{"esc": "\\u00e9\\n\\"q\\""}', '{}', None]
    with conn:
        for i, odd in enumerate(ODD):
            ts, doc = stamps[i % len(stamps)], docs[i % len(docs)]
            conn.execute(
                "INSERT INTO agent_metadata (agent_id, api_key, created_at, updated_at, status, parent_agent_id,"
                " spawn_reason, disabled_at, tags_json, lifecycle_events_json, metadata_json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (odd, f"raw-{i}", ts, None if i % 2 else ts, ("active", None, "disabled")[i % 3],
                 ODD[i - 1] if i else None, odd, ts if i % 3 == 2 else None, json.dumps([odd, "t"]),
                 json.dumps([{"at": ts, "status": "x"}]) if i % 2 else None,
                 json.dumps({"notes": f"note {odd}", "m": i}) if i % 3 == 0 else doc))
            conn.execute("INSERT INTO session_identities VALUES (?,?,?,?,?,?,?,?,?)",
                         (f"s-{odd}", odd, ts, stamps[(i + 1) % 6], stamps[(i + 2) % 6], (1, 0, None)[i % 3],
                          odd if i % 2 else None, doc, doc))
            conn.execute(
                "INSERT INTO agent_state (agent_id, recorded_at, entropy, integrity, stability_index, volatility,"
                " regime, coherence, state_json) VALUES (?,?,?,?,?,?,?,?,?)",
                (odd, ts, 0.001 if i % 2 else None, 1.0, 0.5, -2.0 if i % 2 else None, (None, "STABLE", "warning")[i % 3],
                 None if i % 4 == 0 else 0.25,
                 json.dumps({"E": i / 20, "S": 2.0, "V": 1.5, "regime": "recovery", "hist": [i, 1e-9],
                             "λ": odd}) if i % 10 != 1 else None))
            conn.execute("INSERT INTO audit_events (timestamp, event_id, agent_id, session_id, event_type, confidence,"
                         " details_json, raw_hash) VALUES (?,?,?,?,?,?,?,?)",
                         (ts, str(uuid.UUID(int=i + 1)), odd if i % 2 else None, f"s-{odd}", f"type-{odd}",
                          (None, 0.0, 1.0, 0.333)[i % 4], doc or "{}", f"hash-{i}"))
            conn.execute("INSERT INTO tool_usage (timestamp, usage_id, agent_id, session_id, tool_name, latency_ms,"
                         " success, error_type, payload_json) VALUES (?,?,?,?,?,?,?,?,?)",
                         (ts, str(uuid.UUID(int=1000 + i)), odd, None, f"tool-{odd}", (None, 0, 86_400_000, 7)[i % 4],
                          (1, 0, None)[i % 3], odd if i % 2 else None, doc))
            conn.execute("INSERT INTO discoveries (id, agent_id, type, severity, status, created_at, updated_at,"
                         " resolved_at, summary, details, related_files, confidence, embedding)"
                         " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (f"d-{odd}", odd, odd, (None, "high", "low")[i % 3], (None, "open", "resolved")[i % 3], ts,
                          None if i % 2 else stamps[(i + 3) % 6], ts if i % 3 == 2 else None, f"summary {odd}",
                          odd if i % 2 else None, json.dumps([f"src/{odd}.py"]) if i % 2 else None,
                          (None, 0.0, 1.0, 0.5)[i % 4], bytes([i, 0, 255]) if i % 2 else None))
            conn.execute("INSERT INTO discovery_tags VALUES (?, ?)", (f"d-{odd}", odd))
            if i:
                conn.execute("INSERT INTO discovery_edges VALUES (?,?,?,?,?,?,?,?)",
                             (f"d-{odd}", f"d-{ODD[i - 1]}", ("related_to", "response_to")[i % 2],
                              (None, "question")[i % 2], (None, 0.5)[i % 2], ts, odd if i % 3 else None, doc))
            done = i % 3 == 0
            conn.execute("INSERT INTO dialectic_sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (f"dia-{odd}", odd, ODD[i - 1] if i else None, "resolved" if done else None,
                          "resolved" if done else None, ts, None if i % 2 else ts, odd, f"d-{odd}", odd, "review",
                          odd, (None, 3)[i % 2], (None, 2)[i % 2], doc, json.dumps({"r": odd}) if done else None))
            conn.execute("INSERT INTO dialectic_messages (session_id, agent_id, message_type, timestamp, root_cause,"
                         " proposed_conditions_json, reasoning, observed_metrics_json, concerns_json, agrees,"
                         " signature) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         (f"dia-{odd}", odd, ("thesis", "antithesis", "synthesis")[i % 3], ts, odd,
                          json.dumps([odd]) if i % 2 else None, odd, doc, None, (None, 0, 1)[i % 3], odd))
        conn.execute("INSERT INTO calibration_state VALUES (1, ?, NULL, ?)",
                     ("2025-11-26 01:15:29", '{"bins": [0.1, 0.5], "λ": 1e-05}'))
    conn.close()


async def test_type_fidelity_postgres_reads_what_sqlite_reads(tmp_path, pg_url):
    """Odd legacy values -> PostgreSQL -> read through the PostgreSQL backend equal
    what the SQLite backend reads from the source (every row here migrates unrepaired)."""
    path = tmp_path / "fidelity.db"
    _fidelity_file(path)
    report = await backfill(pg_url, path, progress=False)
    assert report.reconciled
    assert sum(t.quarantined for t in report.tables) == 0
    assert await fetchval(pg_url, "SELECT count(*) FROM migrate.repairs") == 0, await repaired(pg_url)
    shutil.copy(path, tmp_path / "read.db")  # the SQLite backend adds its indexes on open
    lite = SQLiteDatabase(tmp_path / "read.db")
    pg = PostgresDatabase(SecretUrl(pg_url), min_conn=1, max_conn=2, age_enabled=False)
    async with lite, pg:
        assert await pg.get_calibration() == await lite.get_calibration()
        for odd in ODD:
            assert await pg.get_identity(odd) == await lite.get_identity(odd), odd
            assert await pg.get_session(f"s-{odd}") == await lite.get_session(f"s-{odd}"), odd
            assert await pg.get_agent_state_history(odd) == await lite.get_agent_state_history(odd), odd
            assert await pg.get_discovery(f"d-{odd}") == await lite.get_discovery(f"d-{odd}"), odd
            assert await pg.get_neighbors(f"d-{odd}") == await lite.get_neighbors(f"d-{odd}"), odd
            assert await pg.get_dialectic_session(f"dia-{odd}") == await lite.get_dialectic_session(f"dia-{odd}"), odd
            assert await pg.get_lineage(odd) == await lite.get_lineage(odd), odd
        assert await pg.query_audit_events(limit=1000) == await lite.query_audit_events(limit=1000)
        assert await pg.query_tool_usage(limit=1000) == await lite.query_tool_usage(limit=1000)
        assert await pg.get_tool_stats() == await lite.get_tool_stats()
        for word in ("odd", "агент", "drop", "esc", "u00e9", "é", "1e", "20", "5e", "07", "12345678901234567890",
                     "ü", "λ", "null", "type_odd", "k"):
            assert await pg.search_audit_events(word) == await lite.search_audit_events(word), word
            assert await pg.search_discoveries(word) == await lite.search_discoveries(word), word


async def test_search_words_of_migrated_rows_are_the_sqlite_backends(tmp_path, pg_url):
    """The words column the backfill computes finds what the SQLite backend finds in the
    source: long words (indexed as digests), non-Latin words, words in \\u escapes."""
    path = tmp_path / "words.db"
    _fidelity_file(path)
    long_word, long_cyrillic = "Ab" * 150, "Жж" * 60
    docs = [json.dumps({"text": f"{long_word} x"}), json.dumps({"text": f"{long_cyrillic} 東京 snake_case"}),
            '{"text": "\\u0416\\u0436 \\u6771"}', json.dumps({"text": f"{long_word[:-1]} y"}, ensure_ascii=False)]
    conn = sqlite3.connect(path)
    with conn:
        for i, doc in enumerate(docs):
            conn.execute("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash)"
                         " VALUES (?, ?, 'words', ?, ?)", ("2025-11-26T01:15:29Z", str(uuid.UUID(int=500 + i)), doc,
                                                            f"words-{i}"))
            conn.execute("INSERT INTO discoveries (id, agent_id, type, created_at, summary, details)"
                         " VALUES (?, ?, 'x', '2025-11-26T01:15:29Z', ?, ?)", (f"w-{i}", ODD[0], doc, doc[::-1]))
    conn.close()  # the last connection checkpoints the WAL into the file copied below
    assert (await backfill(pg_url, path, progress=False)).reconciled
    shutil.copy(path, tmp_path / "read.db")
    lite = SQLiteDatabase(tmp_path / "read.db")
    pg = PostgresDatabase(SecretUrl(pg_url), min_conn=1, max_conn=2, age_enabled=False)
    async with lite, pg:
        for word in (long_word, long_word.lower(), long_word[:-1], long_cyrillic, "жж" * 60, "東京", "snake_case",
                     "u0416", "жж", "東", "text", "x y", f"{long_word} x", long_word[::-1]):
            found = await lite.search_audit_events(word)
            assert await pg.search_audit_events(word) == found, word
            assert await pg.search_discoveries(word) == await lite.search_discoveries(word), word
        assert [e.details for e in await pg.search_audit_events(long_word)] == [json.loads(docs[0])]


async def test_source_timezone_applies_to_naive_timestamps_only(tmp_path, pg_url):
    path = tmp_path / "fidelity.db"
    _fidelity_file(path)
    await backfill(pg_url, path, progress=False, tables="identities", source_tz="America/Los_Angeles")
    got = dict(await fetch(pg_url, "SELECT agent_id, created_at FROM core.identities WHERE agent_id = ANY($1)",
                           [ODD[0], ODD[2], ODD[3]]))
    assert got[ODD[0]] == datetime(2025, 11, 26, 9, 15, 29, 222120, tzinfo=UTC)  # naive: Los Angeles (PST)
    assert got[ODD[2]] == datetime(2025, 11, 26, 1, 15, 29, tzinfo=UTC)  # Z stays UTC
    assert got[ODD[3]] == datetime(2025, 11, 25, 19, 45, 29, 500000, tzinfo=UTC)


# -- idempotence, newer rows, refusals ------------------------------------------------------

async def test_second_run_changes_nothing(legacy_db, pg_url):
    first = await backfill(pg_url, legacy_db, progress=False)
    counts = {t: await fetchval(pg_url, sql) for t, sql in PG_COUNT.items()}
    q, r = await quarantined(pg_url), await repaired(pg_url)
    second = await backfill(pg_url, legacy_db, progress=False)
    assert second.reconciled
    for a, b in zip(first.tables, second.tables):
        assert (b.inserted, b.updated) == (0, 0), b.table
        assert (a.source_rows, a.migrated, a.quarantined, a.repaired) == (
            b.source_rows, b.migrated, b.quarantined, b.repaired)
    assert counts == {t: await fetchval(pg_url, sql) for t, sql in PG_COUNT.items()}
    assert (q, r) == (await quarantined(pg_url), await repaired(pg_url))


async def test_newer_postgres_rows_are_left_alone(legacy_db, pg_url):
    pg = PostgresDatabase(SecretUrl(pg_url), min_conn=1, max_conn=2, age_enabled=False)
    async with pg:
        # Written live (dual-write) before the backfill, newer than the source row.
        live = await pg.create_identity("agent-000001", api_key="live-key", metadata={"live": True}, tags=["live"])
        await backfill(pg_url, legacy_db, progress=False)
        assert await pg.get_identity("agent-000001") == live
        assert await pg.verify_api_key("agent-000001", "live-key")
        # Changed live after a backfill: a second backfill keeps the change.
        changed = await pg.update_identity("agent-000002", metadata={"changed": 1})
        touched = await pg.touch_session("sess-0000002")
        resolved = await pg.update_discovery_status("disc-0000003", "archived")
        again = await backfill(pg_url, legacy_db, progress=False)
        assert await pg.get_identity("agent-000002") == changed
        assert await pg.get_session("sess-0000002") == touched
        assert await pg.get_discovery("disc-0000003") == resolved
        assert all(t.updated == 0 for t in again.tables)
        # A source row newer than PostgreSQL's copy replaces it.
        await fetch(pg_url, "UPDATE core.identities SET updated_at = '2000-01-01', spawn_reason = 'stale'"
                            " WHERE agent_id = 'agent-000003'")
        third = await backfill(pg_url, legacy_db, progress=False, tables="identities")
        assert third.table("agent_metadata").updated == 1
        assert (await pg.get_identity("agent-000003")).spawn_reason == "spawned"


async def test_an_orphan_a_pending_dual_write_brings_is_migrated_not_quarantined(legacy_db, pg_url, tmp_path):
    """A live dual-write made the parent after the backfill read the parents: its outbox
    record is still waiting, so the child row is landing, not an orphan."""
    from govdb.backends import outbox
    landing = tmp_path / "landing.db"
    shutil.copy(legacy_db, landing)
    with sqlite3.connect(landing) as conn:
        outbox.ensure_tables(conn)
        outbox.enqueue(conn, "add_discovery", [("discoveries", ("ghost-discovery",))])
    with_outbox = await backfill(pg_url, landing, progress=False, tables="identities,knowledge")
    tags = with_outbox.table("discovery_tags")
    q = await quarantined(pg_url)
    assert ("discovery_tags", key("ghost-discovery", "orphan-tag")) not in q
    assert ("discovery_edges", key("ghost-discovery", "disc-0000000", "related_to")) not in q
    assert tags.reconciled and with_outbox.reconciled
    # The same rows with no record waiting: orphans, quarantined.
    plain = await backfill(pg_url, legacy_db, progress=False, tables="identities,knowledge", restart=True)
    q = await quarantined(pg_url)
    assert q[("discovery_tags", key("ghost-discovery", "orphan-tag"))][0] == "orphan"
    assert plain.table("discovery_tags").quarantined == tags.quarantined + 1


async def test_legacy_ids_are_kept_and_sequences_moved_past_them(legacy_db, pg_url):
    await backfill(pg_url, legacy_db, progress=False)
    with sqlite3.connect(legacy_db) as conn:
        top_state = conn.execute("SELECT max(id) FROM agent_state").fetchone()[0]
        top_message = conn.execute("SELECT max(id) FROM dialectic_messages").fetchone()[0]
        audit_ids = [r[0] for r in conn.execute("SELECT id FROM audit_events ORDER BY id LIMIT 5")]
    assert await fetchval(pg_url, "SELECT max(id) FROM core.agent_state") <= top_state
    assert [r[0] for r in await fetch(pg_url, "SELECT id FROM audit.events ORDER BY id LIMIT 5")] == audit_ids
    pg = PostgresDatabase(SecretUrl(pg_url), min_conn=1, max_conn=2, age_enabled=False)
    async with pg:
        snap = await pg.record_agent_state("agent-000000", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
        assert snap.id > top_state
        sess = await pg.create_dialectic_session("dia-new", paused_agent_id="agent-000000",
                                                 reviewer_agent_id="agent-000001")
        msg = await pg.add_dialectic_message(sess.session_id, agent_id="agent-000000", message_type="thesis")
        assert msg.id > top_message


async def test_refusals_name_the_fix(legacy_db, pg_url, tmp_path):
    await backfill(pg_url, legacy_db, progress=False, tables="identities")
    # An interrupted run of this source: a plain run refuses, naming --resume and --restart.
    await fetch(pg_url, "UPDATE migrate.checkpoints SET done = false")
    with pytest.raises(MigrationError, match="--resume.*--restart"):
        await backfill(pg_url, legacy_db, progress=False, tables="identities")
    # Another source file cannot resume this checkpoint.
    other = tmp_path / "other.db"
    _fidelity_file(other)
    with pytest.raises(MigrationError, match=r"^cannot resume; checkpoint belongs to another source file"
                                             r" \(use --restart\); that file: .*governance\.db$"):
        await backfill(pg_url, other, progress=False, tables="identities", resume=True)
    with pytest.raises(MigrationError, match="--restart"):
        await backfill(pg_url, other, progress=False, tables="identities")
    assert (await backfill(pg_url, other, progress=False, tables="identities", restart=True)).reconciled
    # A table whose parents were never backfilled from this source (--restart dropped that checkpoint).
    with pytest.raises(MigrationError, match="session_identities needs agent_metadata.*add identities to --tables"):
        await backfill(pg_url, legacy_db, progress=False, tables="sessions")
    with pytest.raises(MigrationError, match="not both"):
        await backfill(pg_url, other, progress=False, resume=True, restart=True)


async def test_dry_run_writes_nothing_and_predicts_the_run(legacy_db, pg_server):
    name = await _create_db(pg_server, None)  # an empty database: not even the schema
    url = with_database(pg_server.url, name)
    try:
        dry = await backfill(url, legacy_db, progress=False, dry_run=True)
        assert dry.dry_run and dry.reconciled
        assert await fetchval(url, "SELECT count(*) FROM pg_namespace WHERE nspname IN ('core', 'audit', 'migrate')") == 0
        real = await backfill(url, legacy_db, progress=False)
        for d, r in zip(dry.tables, real.tables):
            assert (d.table, d.source_rows, d.migrated, d.quarantined, d.repaired) == (
                r.table, r.source_rows, r.migrated, r.quarantined, r.repaired)
            assert d.problems == r.problems, d.table
        assert dry.table("agent_metadata").notes["raw API keys stored as their sha256 hash"] > 0
    finally:
        await pg_server.drop_database(name)


async def test_non_wal_source_is_migrated_and_left_in_its_journal_mode(legacy_db, pg_url):
    with sqlite3.connect(legacy_db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    report = await backfill(pg_url, legacy_db, progress=False, batch_size=200)
    assert report.reconciled and report.journal_mode == "delete"
    assert any("not in WAL mode" in n for n in report.notes)
    with sqlite3.connect(legacy_db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def test_live_writers_are_never_blocked(legacy_db, pg_url):
    stop = False
    waits: list[float] = []

    def writer() -> None:
        conn = sqlite3.connect(legacy_db, timeout=0.2, isolation_level=None)
        n = 0
        while not stop:
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO audit_events (timestamp, event_type, details_json, raw_hash)"
                         " VALUES ('2025-06-01T00:00:00Z', 'live', '{}', ?)", (f"live-{n}",))
            conn.execute("COMMIT")
            waits.append(time.perf_counter() - t)
            n += 1
            time.sleep(0.002)
        conn.close()

    loop = asyncio.get_running_loop()
    task = loop.run_in_executor(None, writer)
    try:
        report = await backfill(pg_url, legacy_db, progress=False, batch_size=100)
    finally:
        stop = True
        await task
    assert report.reconciled and waits and max(waits) < 0.2


# -- the script: kill -9 and resume; bad input --------------------------------------------

async def kill_mid_audit_events(pg_url: str, args: list[str], *, rows_read: int) -> subprocess.Popen:
    """Run the script; SIGKILL it once its audit_events checkpoint has read ``rows_read`` rows, unfinished."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--no-progress", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if await fetchval(pg_url, "SELECT to_regclass('migrate.checkpoints') IS NOT NULL") and await fetchval(
                    pg_url, "SELECT count(*) FROM migrate.checkpoints WHERE source_table = 'audit_events'"
                            " AND rows_read >= $1 AND NOT done", rows_read):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # mid-table
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


async def test_kill_and_resume_loses_nothing_and_duplicates_nothing(tmp_path, pg_url):
    path = generate_legacy_file(tmp_path / "big.db", 0.02)
    args = ["--sqlite", str(path), "--postgres", pg_url, "--batch-size", "100"]
    proc = await kill_mid_audit_events(pg_url, args, rows_read=3_000)
    assert proc.returncode == -signal.SIGKILL
    read = await fetchval(pg_url, "SELECT rows_read FROM migrate.checkpoints WHERE source_table = 'audit_events'")
    assert 0 < read < source_count(path, "audit_events")

    refused = run_script(*args)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "--resume" in refused.stderr
    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    rows = {r["source_table"]: r for r in await fetch(pg_url, "SELECT * FROM migrate.checkpoints")}
    q = await fetch(pg_url, "SELECT source_table, count(*) FROM migrate.quarantine GROUP BY 1")
    q = dict((r[0], r[1]) for r in q)
    for table, sql in PG_COUNT.items():
        c = rows[table]
        assert c["done"] and c["rows_read"] == source_count(path, table), table
        assert c["rows_read"] == c["rows_migrated"] + c["rows_quarantined"], table
        assert c["rows_quarantined"] == q.get(table, 0), table
        assert await fetchval(pg_url, sql) == c["rows_migrated"], table
    assert await fetchval(pg_url, "SELECT count(DISTINCT id) FROM audit.events") == rows["audit_events"]["rows_migrated"]
    assert await fetchval(pg_url, "SELECT count(DISTINCT id) FROM audit.tool_usage") == rows["tool_usage"]["rows_migrated"]
    with sqlite3.connect(path) as conn:
        good = [r[0] for r in conn.execute("SELECT id FROM audit_events WHERE event_type NOT LIKE 'dirty_ts'"
                                           " OR timestamp NOT IN ('not a time', '') ORDER BY id")]
    assert [r[0] for r in await fetch(pg_url, "SELECT id FROM audit.events ORDER BY id")] == good


async def test_copy_text_round_trips_odd_values(pg_url):
    """Batches travel as COPY text: every kind of value, NULLs among them, escapes, arrays."""
    rows = [
        (1, "plain", datetime(2025, 1, 1, tzinfo=UTC), 1.5, True, ["a", "b"], b"\x00\xff", None),
        (2, "tab\there\nnew\rline\\back", datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), -0.0, False,
         ['q"uote', "back\\slash", "NULL", "", "{x,y}"], b"", "x"),
        (3, "\\N", datetime(2025, 6, 1, 12, tzinfo=UTC), 1e300, None, [], None, "{}"),
        (4, "ж東京 \x01", datetime(1, 1, 1, tzinfo=UTC), 5e-324, True, ["null", "ж", None], b"\\", "\\N"),
        (None, "", None, None, None, None, None, None),
    ]
    cols = ["i", "s", "ts", "f", "b", "a", "y", "n"]
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TEMP TABLE t (i bigint, s text, ts timestamptz, f float8, b bool, a text[],"
                           " y bytea, n text)")
        for encode in (copy_column, lambda col: [copy_field(v) for v in col]):  # whole columns, one value
            await conn.execute("TRUNCATE t")
            await copy_text(conn, "t", cols, copy_lines(*[encode(col) for col in zip(*rows)]))
            got = [tuple(r) for r in await conn.fetch("SELECT * FROM t ORDER BY i NULLS LAST")]
            assert got == [tuple(list(v) if isinstance(v, list) else v for v in r) for r in rows]
            assert str(got[1][3]) == "-0.0"
    finally:
        await conn.close()


DEFERRABLE_TABLES = ("audit.events", "audit.event_hashes", "audit.tool_usage", "core.agent_state")


async def index_definitions(url: str) -> dict[str, str]:
    """Return name -> definition of every index on the tables whose indexes a bulk load defers."""
    rows = await fetch(url, "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
                            " WHERE indrelid IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
                       list(DEFERRABLE_TABLES))
    return dict((r[0], r[1]) for r in rows)


async def partitions_missing_an_index(url: str) -> int:
    """Count (index of a partitioned table, partition) pairs where the partition lacks that index."""
    return await fetchval(url, """
        SELECT count(*) FROM pg_index pi JOIN pg_inherits part ON part.inhparent = pi.indrelid
         WHERE pi.indrelid IN ('audit.events'::regclass, 'audit.tool_usage'::regclass)
           AND NOT EXISTS (SELECT 1 FROM pg_inherits ci JOIN pg_index c ON c.indexrelid = ci.inhrelid
                            WHERE ci.inhparent = pi.indexrelid AND c.indrelid = part.inhrelid)""")


async def test_deferred_indexes_keep_their_definitions_and_cover_new_partitions(pg_url):
    original = await index_definitions(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute((REPO / "src/govdb/sql/migrate.sql").read_text())
        deferred = await defer_indexes(conn, ["audit.events", "audit.event_hashes"])
        assert set(deferred) == {"audit.events_ts_idx", "audit.events_agent_idx", "audit.events_type_idx",
                                 "audit.events_words_idx", "audit.event_hashes_ts_idx"}
        recorded = {r[0]: r[1] for r in await conn.fetch("SELECT index_name, definition FROM migrate.deferred_indexes")}
        assert recorded == {n: original[n] for n in deferred}
        left = await index_definitions(pg_url)
        assert set(left) == set(original) - set(deferred)  # unique keys stay: dedup and dual-writes need them
        assert {"audit.events_pkey", "audit.event_hashes_pkey", "audit.event_hashes_event_id_key"} <= set(left)
        # A partition made while they are deferred gets them too.
        await conn.execute("SELECT audit.create_month_partition('audit.events'::regclass, '2031-03-01')")
        built = await restore_indexes(conn, lambda: asyncpg.connect(pg_url))
        assert set(built) == set(deferred)
        assert await conn.fetchval("SELECT count(*) FROM migrate.deferred_indexes") == 0
        assert await restore_indexes(conn, lambda: asyncpg.connect(pg_url)) == {}
    finally:
        await conn.close()
    assert await index_definitions(pg_url) == original
    assert await partitions_missing_an_index(pg_url) == 0


async def test_a_run_killed_while_indexes_are_deferred_builds_them_again(tmp_path, pg_url):
    original = await index_definitions(pg_url)
    path = generate_legacy_file(tmp_path / "big.db", 0.02)
    args = ["--sqlite", str(path), "--postgres", pg_url, "--batch-size", "100"]
    await kill_mid_audit_events(pg_url, args, rows_read=2_000)  # its indexes dropped
    deferred = {r[0]: r[1] for r in await fetch(pg_url, "SELECT index_name, definition FROM migrate.deferred_indexes")}
    assert {"audit.events_ts_idx", "audit.events_words_idx", "audit.event_hashes_ts_idx"} <= set(deferred)
    assert deferred == {n: original[n] for n in deferred}
    assert not set(deferred) & set(await index_definitions(pg_url))

    # Any later run builds them first, even one that then refuses to go on.
    refused = run_script(*args)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    assert await index_definitions(pg_url) == original
    assert await fetchval(pg_url, "SELECT count(*) FROM migrate.deferred_indexes") == 0
    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert await index_definitions(pg_url) == original
    assert await partitions_missing_an_index(pg_url) == 0
    assert await fetchval(pg_url, "SELECT count(*) FROM migrate.deferred_indexes") == 0
    assert await fetchval(pg_url, "SELECT count(*) FROM audit.events") == await fetchval(
        pg_url, "SELECT rows_migrated FROM migrate.checkpoints WHERE source_table = 'audit_events'")


def test_bad_input_is_one_error_line(tmp_path, legacy_db):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 100)
    url = "postgresql://postgres:hunter2@127.0.0.1:1/nodb"
    cases = [
        (["--sqlite", str(tmp_path / "missing.db"), "--postgres", url], "does not exist"),
        (["--sqlite", str(garbage), "--postgres", url], "not a SQLite database"),
        (["--sqlite", str(legacy_db), "--postgres", "mysql://u:hunter2@h/x"], "--postgres"),
        (["--sqlite", str(legacy_db), "--postgres", url, "--tables", "identities,bogus"], "bogus"),
        (["--sqlite", str(legacy_db), "--postgres", url, "--source-timezone", "Mars/Base"], "Mars/Base"),
        (["--sqlite", str(legacy_db), "--postgres", url], "is unavailable"),
    ]
    for args, words in cases:
        out = run_script(*args, timeout=60)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith("error: ") and words in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr and "hunter2" not in out.stderr + out.stdout


async def test_script_summary_and_exit_status(legacy_db, pg_url):
    out = run_script("--sqlite", str(legacy_db), "--postgres", pg_url, "--tables", "identities,sessions,calibration")
    assert out.returncode == 0, out.stderr
    for word in ("agent_metadata", "session_identities", "calibration_state", "reconciled", "quarantined"):
        assert word in out.stdout
    dry = run_script("--sqlite", str(legacy_db), "--postgres", pg_url, "--dry-run")
    assert dry.returncode == 0 and "would quarantine" in dry.stdout and "problems found" in dry.stdout


async def test_a_row_postgresql_refuses_is_quarantined_alone(tmp_path, pg_url):
    """The cleaner cannot foresee everything: a btree entry over ~2.7 kB (two long keys) is
    refused by PostgreSQL; the batch is halved until that row stands alone and is quarantined."""
    path = tmp_path / "long.db"
    _fidelity_file(path)
    long_id, long_tag = os.urandom(950).hex()[:1900], os.urandom(950).hex()[:1900]
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO discoveries (id, agent_id, type, created_at, summary) VALUES (?, ?, 'x', ?, 's')",
                     (long_id, ODD[0], "2025-01-01T00:00:00Z"))
        conn.executemany("INSERT INTO discovery_tags VALUES (?, ?)",
                         [(long_id, long_tag), (long_id, "short")] + [(f"d-{o}", f"more-{i}") for i, o in enumerate(ODD)])
    report = await backfill(pg_url, path, progress=False, tables="identities,knowledge")
    assert report.reconciled
    tags = report.table("discovery_tags")
    assert (tags.quarantined, tags.migrated) == (1, tags.source_rows - 1)
    (kind, reason, raw), = [v for k, v in (await quarantined(pg_url)).items() if k[0] == "discovery_tags"]
    assert kind == "refused" and "SQLSTATE 54000" in reason and long_tag in raw
    assert await fetchval(pg_url, "SELECT count(*) FROM core.discovery_tags WHERE discovery_id = $1", long_id) == 1
