"""The store as a server process uses it: get_db()/init_db()/close_db() from
the DB_* environment, plus what only a real engine can show (schema, graph,
partitions, legacy files). `DB_BACKEND=postgres pytest tests/test_db_integration.py`
runs the PostgreSQL configurations only.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest

import govdb
from govdb.keys import generate_api_key

UTC = timezone.utc


def env_of(store) -> dict[str, str]:
    s = store.settings
    env = {
        "DB_BACKEND": s.backend, "DB_SQLITE_PATH": str(s.sqlite_path),
        "DB_POSTGRES_URL": s.postgres_url.reveal(), "DB_AGE_GRAPH": s.age_graph,
        "DB_AGE_ENABLED": "1" if s.age_enabled else "0",
        "DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": "4",
    }
    return env


async def test_get_db_init_close_from_environment(store, monkeypatch):
    for key, value in env_of(store).items():
        monkeypatch.setenv(key, value)
    db = await govdb.init_db()
    assert govdb.get_db() is db
    assert await govdb.init_db() is db  # a second init is harmless
    key = generate_api_key()
    await db.create_identity("env-agent", api_key=key)
    await govdb.close_db()
    again = await govdb.init_db()
    try:
        assert again is not db
        assert await again.verify_api_key("env-agent", key)
    finally:
        await govdb.close_db()


async def test_one_pooled_connection_reused_for_graph_reads(store):
    """asyncpg's RESET ALL on release must not break AGE (acquire, release, acquire, Cypher)."""
    env = env_of(store) | {"DB_POSTGRES_MIN_CONN": "1", "DB_POSTGRES_MAX_CONN": "1"}
    db = govdb.backends.create_backend(govdb.Settings.from_env(env))
    await db.connect()
    try:
        await db.create_identity("a", api_key="k")
        await db.create_identity("b", api_key="k", parent_agent_id="a")
        for n in range(3):
            await db.add_discovery(f"d{n}", agent_id="a", type="t", summary=f"s{n}")
            if n:
                await db.link_discoveries(f"d{n}", f"d{n-1}", edge_type="response_to", response_type="extend")
        for _ in range(5):
            assert [d.id for d in await db.get_response_chain("d2")] == ["d2", "d1", "d0"]
            assert [i.agent_id for i in await db.get_lineage("b")] == ["b", "a"]
    finally:
        await db.close()


@pytest.mark.backends("postgres", "postgres-noage")
async def test_schema_apply_is_idempotent_and_versioned(store):
    catalog_sql = """
        SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
          SELECT format('%s.%s %s %s', table_schema, table_name, column_name, data_type) AS x
            FROM information_schema.columns WHERE table_schema IN ('core', 'audit')
          UNION ALL SELECT format('%s %s', schemaname, indexdef) FROM pg_indexes WHERE schemaname IN ('core', 'audit')
          UNION ALL SELECT format('fn %s', p.oid::regprocedure) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname IN ('core', 'audit')
          UNION ALL SELECT format('part %s', c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        ) t"""
    before = await store.fetchval(catalog_sql)
    versions_before = await store.fetchval("SELECT count(*) FROM core.schema_version")
    for _ in range(2):
        db = await store.open()
        await db.close()
    assert await store.fetchval(catalog_sql) == before
    assert await store.fetchval("SELECT count(*) FROM core.schema_version") == versions_before
    assert await store.fetchval("SELECT max(version) FROM core.schema_version") >= 1


@pytest.mark.backends("postgres", "postgres-noage")
async def test_partitions_and_maintenance(store, db):
    parts = await store.fetchval("""
        SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'audit.events'::regclass""")
    this_month = datetime.now(UTC).strftime("%Y_%m")
    assert "events_default" in parts and f"events_{this_month}" in parts
    past = datetime(2001, 2, 3, tzinfo=UTC)
    future = datetime(2090, 7, 8, tzinfo=UTC)
    for ts in (past, future):
        await db.append_audit_event("far", details={"ts": ts.isoformat()}, timestamp=ts)
        await db.record_tool_usage("far", timestamp=ts)
    before = await store.fetchval("SELECT count(*) FROM audit.events_default")
    assert before >= 1
    await store.fetchval("SELECT audit.partition_maintenance()")
    assert await store.fetchval("SELECT count(*) FROM audit.events_default") == 0
    assert await store.fetchval("SELECT count(*) FROM audit.tool_usage_default") == 0
    where = await store.fetchval("""SELECT string_agg(tableoid::regclass::text, ',' ORDER BY ts)
                                      FROM audit.events WHERE event_type = 'far'""")
    # The old month is past retention, so maintenance may drop it; the future one must exist.
    assert where.endswith("events_2090_07")
    assert len(await db.query_audit_events(event_type="far", since=future)) == 1


@pytest.mark.backends("postgres")
async def test_graph_mirrors_relational_rows(store, db):
    await db.create_identity("p", api_key="k", tags=["t1"])
    await db.create_identity("c", api_key="k", parent_agent_id="p")
    await db.add_discovery("d1", agent_id="p", type="q", summary="one", tags=["x", "y"])
    await db.add_discovery("d2", agent_id="c", type="a", summary="two", tags=["x"])
    await db.link_discoveries("d2", "d1", edge_type="response_to", response_type="support")
    await db.link_discoveries("d1", "d2", edge_type="related_to")
    await db.create_dialectic_session("s", paused_agent_id="c", reviewer_agent_id="p")
    await db.add_dialectic_message("s", agent_id="c", message_type="thesis")
    await db.add_dialectic_message("s", agent_id="p", message_type="antithesis")
    expected = {
        "(n:Agent)": 2, "(n:Discovery)": 2, "(n:Tag)": 3, "(n:DialecticSession)": 1,
        "(n:DialecticMessage)": 2, "()-[:SPAWNED]->()": 1, "()-[:HAS_TAG]->()": 4,
        "()-[:RESPONSE_TO]->()": 1, "()-[:RELATED_TO]->()": 1, "()-[:PAUSED_AGENT]->()": 1,
        "()-[:REVIEWER]->()": 1, "()-[:HAS_MESSAGE]->()": 2, "()-[:WROTE]->()": 2,
    }
    assert {p: await _cypher_count(store, p) for p in expected} == expected


@pytest.mark.backends("postgres", "dual")
async def test_retagging_an_agent_leaves_no_unused_tag_node(store, db):
    """The graph holds the tags in use (what a build from the tables gives, and what verify expects)."""
    from govdb.backends.dual import DualDatabase
    await db.create_identity("p", api_key="k", tags=["old", "kept"])
    await db.create_identity("q", api_key="k", tags=["shared"])
    await db.add_discovery("d1", agent_id="p", type="q", summary="one", tags=["shared"])
    await db.update_identity("p", tags=["kept", "new", "shared"])
    await db.update_identity("q", tags=[])
    if isinstance(db, DualDatabase):
        await db.replay()
    names = {"old": 0, "kept": 1, "new": 1, "shared": 1}
    assert {n: await _cypher_count(store, f"(t:Tag {{name: '{n}'}})") for n in names} == names
    assert await _cypher_count(store, "(:Agent {id: 'p'})-[:HAS_TAG]->()") == 3
    assert await _cypher_count(store, "(:Agent {id: 'q'})-[:HAS_TAG]->()") == 0
    assert await _cypher_count(store, "()-[:HAS_TAG]->(:Tag {name: 'shared'})") == 2


async def _cypher_count(store, pattern: str) -> int:
    import asyncpg
    conn = await asyncpg.connect(store.settings.postgres_url.reveal())
    try:
        await conn.execute("LOAD 'age'")
        return await conn.fetchval(
            f"SELECT count(*) FROM ag_catalog.cypher('governance', $$ MATCH {pattern} RETURN 1 $$) AS (x ag_catalog.agtype)")
    finally:
        await conn.close()


@pytest.mark.backends("postgres-noage")
async def test_database_without_age_extension(store, db):
    assert await store.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'age'") == 0
    await db.create_identity("a", api_key="k")
    await db.create_identity("b", api_key="k", parent_agent_id="a")
    assert [i.agent_id for i in await db.get_lineage("b")] == ["b", "a"]
    # DROP TABLE works in a database lacking the extension (an AGE pitfall).
    await store.execute("CREATE TABLE public.scratch (x int); DROP TABLE public.scratch")


LEGACY_DDL = """
CREATE TABLE agent_metadata (agent_id TEXT PRIMARY KEY, api_key TEXT NOT NULL, created_at TEXT NOT NULL,
  updated_at TEXT, status TEXT DEFAULT 'active', parent_agent_id TEXT, spawn_reason TEXT, disabled_at TEXT,
  tags_json TEXT DEFAULT '[]', lifecycle_events_json TEXT DEFAULT '[]', metadata_json TEXT DEFAULT '{}');
CREATE TABLE session_identities (session_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, created_at TEXT NOT NULL,
  last_active TEXT NOT NULL, expires_at TEXT NOT NULL, is_active INTEGER DEFAULT 1, client_type TEXT,
  client_info_json TEXT, metadata_json TEXT);
CREATE TABLE agent_state (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL, recorded_at TEXT NOT NULL,
  entropy REAL, integrity REAL, stability_index REAL, volatility REAL, regime TEXT DEFAULT 'nominal',
  coherence REAL, state_json TEXT);
CREATE TABLE audit_events (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT NOT NULL, event_id TEXT,
  agent_id TEXT, session_id TEXT, event_type TEXT NOT NULL, confidence REAL DEFAULT 1.0,
  details_json TEXT NOT NULL, raw_hash TEXT UNIQUE);
CREATE TABLE tool_usage (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT NOT NULL, usage_id TEXT,
  agent_id TEXT, session_id TEXT, tool_name TEXT NOT NULL, latency_ms INTEGER, success INTEGER DEFAULT 1,
  error_type TEXT, payload_json TEXT);
CREATE TABLE calibration_state (id INTEGER PRIMARY KEY CHECK (id = 1), updated_at TEXT NOT NULL,
  version INTEGER, state_json TEXT NOT NULL);
CREATE TABLE discoveries (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, type TEXT NOT NULL, severity TEXT,
  status TEXT DEFAULT 'open', created_at TEXT NOT NULL, updated_at TEXT, resolved_at TEXT, summary TEXT NOT NULL,
  details TEXT, related_files TEXT, confidence REAL, embedding BLOB);
CREATE TABLE discovery_tags (discovery_id TEXT, tag TEXT, PRIMARY KEY (discovery_id, tag));
CREATE TABLE discovery_edges (src_id TEXT, dst_id TEXT, edge_type TEXT, response_type TEXT, weight REAL,
  created_at TEXT NOT NULL, created_by TEXT, metadata TEXT, PRIMARY KEY (src_id, dst_id, edge_type));
CREATE TABLE rate_limits (agent_id TEXT, timestamp TEXT, PRIMARY KEY (agent_id, timestamp));
CREATE TABLE dialectic_sessions (session_id TEXT PRIMARY KEY, paused_agent_id TEXT NOT NULL,
  reviewer_agent_id TEXT, phase TEXT DEFAULT 'thesis', status TEXT DEFAULT 'active', created_at TEXT NOT NULL,
  updated_at TEXT, reason TEXT, discovery_id TEXT, dispute_type TEXT, session_type TEXT, topic TEXT,
  max_synthesis_rounds INTEGER, synthesis_round INTEGER, paused_agent_state_json TEXT, resolution_json TEXT);
CREATE TABLE dialectic_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
  agent_id TEXT NOT NULL, message_type TEXT, timestamp TEXT NOT NULL, root_cause TEXT,
  proposed_conditions_json TEXT, reasoning TEXT, observed_metrics_json TEXT, concerns_json TEXT,
  agrees INTEGER, signature TEXT);
"""


@pytest.mark.backends("sqlite")
async def test_legacy_governance_db_opens_as_it_is(store, tmp_path):
    path = store.settings.sqlite_path
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_DDL)
        conn.execute("INSERT INTO agent_metadata VALUES ('old-agent', 'raw-key-123', '2025-11-26T01:15:29.222120',"
                     " '2025-11-26 01:15:29', 'active', NULL, NULL, NULL, '[\"legacy\"]', '[]', '{\"notes\": \"n\", \"m\": 1}')")
        conn.execute("INSERT INTO session_identities VALUES ('sess-old', 'old-agent', '2025-11-26T01:15:29Z',"
                     " '2025-11-26T01:15:29+00:00', '2999-01-01T00:00:00-07:00', 1, 'cli', 'not json', NULL)")
        conn.execute("INSERT INTO agent_state (agent_id, recorded_at, entropy, integrity, volatility, regime, coherence,"
                     " state_json) VALUES ('old-agent', '1764119729', 0.4, 0.8, -0.2, 'CONVERGENCE', 0.6,"
                     " '{\"E\": 0.7, \"I\": 0.8, \"S\": 0.4, \"V\": -0.2, \"lambda1\": 0.05}')")
        conn.execute("INSERT INTO discoveries (id, agent_id, type, created_at, summary, related_files) VALUES"
                     " ('old-d', 'old-agent', 'insight', '2025-11-26 01:15:29', 'legacy summary', '[\"a.py\"]')")
        conn.execute("INSERT INTO discovery_tags VALUES ('old-d', 'legacy')")
    db = await store.open()
    try:
        ident = await db.get_identity("old-agent")
        assert ident.tags == ("legacy",) and ident.notes == "n" and ident.metadata == {"m": 1}
        assert ident.created_at == datetime(2025, 11, 26, 1, 15, 29, 222120, tzinfo=UTC)
        assert await db.verify_api_key("old-agent", "raw-key-123")
        assert not await db.verify_api_key("old-agent", "raw-key-124")
        sess = await db.get_session("sess-old")
        assert sess.client_info == {} and sess.expires_at == datetime(2999, 1, 1, 7, tzinfo=UTC)
        state = await db.get_latest_agent_state("old-agent")
        assert (state.energy, state.integrity, state.entropy, state.void) == (0.7, 0.8, 0.4, -0.2)
        assert state.recorded_at == datetime.fromtimestamp(1764119729, UTC)
        assert state.state == {"lambda1": 0.05}
        assert [d.id for d in await db.search_discoveries("legacy", tags=["legacy"])] == ["old-d"]
        # New writes land in the same file next to the legacy rows.
        await db.record_agent_state("old-agent", energy=0.1, integrity=0.1, entropy=0.1, void=0.1)
        assert len(await db.get_agent_state_history("old-agent")) == 2
    finally:
        await db.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT api_key FROM agent_metadata WHERE agent_id = 'old-agent'").fetchone()[0] == "raw-key-123"
