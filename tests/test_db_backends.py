"""One behavioural suite, the same assertions on every backend configuration.

Each test gets a fresh store (a temp SQLite file, or a fresh PostgreSQL
database from a template) through the `db` fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta, timezone

import pytest

from govdb.errors import ConflictError, NotFoundError, ValidationError
from govdb.keys import generate_api_key

UTC = timezone.utc
ODD_IDS = [
    "agent-'quoted'",
    'agent-"double"',
    "agent-$$dollar$$",
    "agent-\\back\\slash",
    "agent; DROP TABLE core.identities; --",
    "agent'}) MATCH (n) DETACH DELETE n //",
    "агент-кириллица",
    "エージェント-日本語",
    "وكيل-عربي",
]


async def new_agent(db, agent_id="agent-1", **kw):
    kw.setdefault("api_key", "key-" + agent_id)
    return await db.create_identity(agent_id, **kw)


def assert_utc(dt: datetime) -> None:
    assert dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


# -- identities ----------------------------------------------------------------

async def test_identity_round_trip(db):
    created = await db.create_identity(
        "agent-1", api_key="secret-1", tags=["alpha", "beta", "alpha"], notes="first note",
        metadata={"model": "x", "nested": {"ключ": [1, 2.5, None, True]}},
    )
    got = await db.get_identity("agent-1")
    assert got == created
    assert got.status == "active"
    assert got.tags == ("alpha", "beta")
    assert got.notes == "first note"
    assert got.metadata == {"model": "x", "nested": {"ключ": [1, 2.5, None, True]}}
    assert got.parent_agent_id is None and got.disabled_at is None
    assert_utc(got.created_at)
    assert abs(got.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert await db.get_identity("nobody") is None


async def test_identity_duplicate_and_missing_parent(db):
    await new_agent(db, "agent-1")
    with pytest.raises(ConflictError):
        await new_agent(db, "agent-1")
    with pytest.raises(NotFoundError) as err:
        await new_agent(db, "agent-2", parent_agent_id="ghost")
    assert err.value.kind == "agent" and err.value.key == "ghost"
    assert await db.get_identity("agent-2") is None


async def test_list_identities_filters_and_pages(db):
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(5):
        await new_agent(db, f"a{i}", created_at=base + timedelta(minutes=i),
                        tags=["even"] if i % 2 == 0 else ["odd"])
    await db.update_identity_status("a3", "paused")
    assert [i.agent_id for i in await db.list_identities()] == ["a0", "a1", "a2", "a3", "a4"]
    assert [i.agent_id for i in await db.list_identities(status="paused")] == ["a3"]
    assert [i.agent_id for i in await db.list_identities(tag="even")] == ["a0", "a2", "a4"]
    assert [i.agent_id for i in await db.list_identities(limit=2, offset=2)] == ["a2", "a3"]


async def test_identity_status_lifecycle(db):
    await new_agent(db)
    disabled = await db.update_identity_status("agent-1", "disabled", reason="misbehaved")
    assert disabled.status == "disabled"
    assert disabled.disabled_at is not None
    assert_utc(disabled.disabled_at)
    assert disabled.updated_at >= disabled.created_at
    active = await db.update_identity_status("agent-1", "active")
    assert active.disabled_at is None
    events = active.lifecycle_events
    assert [(e["from"], e["status"], e["reason"]) for e in events] == [
        ("active", "disabled", "misbehaved"), ("disabled", "active", None)]
    with pytest.raises(NotFoundError):
        await db.update_identity_status("ghost", "paused")


async def test_update_identity_fields(db):
    await new_agent(db, tags=["a"], notes="n1", metadata={"k": 1})
    updated = await db.update_identity("agent-1", tags=["b", "c"])
    assert updated.tags == ("b", "c") and updated.notes == "n1" and updated.metadata == {"k": 1}
    updated = await db.update_identity("agent-1", notes="n2", metadata={"k": 2, "l": "x"})
    assert updated.tags == ("b", "c") and updated.notes == "n2" and updated.metadata == {"k": 2, "l": "x"}
    assert await db.get_identity("agent-1") == updated
    with pytest.raises(NotFoundError):
        await db.update_identity("ghost", notes="x")


async def test_api_key_verification(db):
    key = generate_api_key()
    await db.create_identity("agent-1", api_key=key)
    assert await db.verify_api_key("agent-1", key)
    assert not await db.verify_api_key("agent-1", key + "x")
    assert not await db.verify_api_key("agent-1", "")
    assert not await db.verify_api_key("ghost", key)


async def test_api_key_never_stored_raw(db, store):
    key = generate_api_key()
    await db.create_identity("agent-1", api_key=key)
    if store.config == "sqlite":
        stored = await store.fetchval("SELECT api_key FROM agent_metadata WHERE agent_id = ?", "agent-1")
    else:
        stored = await store.fetchval("SELECT api_key_hash FROM core.identities WHERE agent_id = $1", "agent-1")
    assert stored and key not in stored and stored.startswith("sha256$")


async def test_lineage_and_children(db):
    await new_agent(db, "root")
    await new_agent(db, "child", parent_agent_id="root", spawn_reason="split work")
    await new_agent(db, "grandchild", parent_agent_id="child")
    await new_agent(db, "sibling", parent_agent_id="root")
    lineage = await db.get_lineage("grandchild")
    assert [i.agent_id for i in lineage] == ["grandchild", "child", "root"]
    assert lineage[1].spawn_reason == "split work"
    assert [i.agent_id for i in await db.list_children("root")] == ["child", "sibling"]
    assert await db.list_children("grandchild") == []
    assert [i.agent_id for i in await db.get_lineage("grandchild", max_depth=1)] == ["grandchild", "child"]
    with pytest.raises(NotFoundError):
        await db.get_lineage("ghost")


@pytest.mark.parametrize("agent_id", ODD_IDS)
async def test_odd_ids_round_trip(db, agent_id):
    await new_agent(db, agent_id, tags=[agent_id])
    await new_agent(db, agent_id + "-child", parent_agent_id=agent_id)
    assert (await db.get_identity(agent_id)).tags == (agent_id,)
    assert [i.agent_id for i in await db.get_lineage(agent_id + "-child")] == [agent_id + "-child", agent_id]
    await db.add_discovery(agent_id, agent_id=agent_id, type="note", summary=agent_id, tags=[agent_id])
    await db.add_discovery("other", agent_id=agent_id, type="note", summary="other")
    await db.link_discoveries("other", agent_id, edge_type="response_to", response_type="support")
    assert [d.id for d in await db.search_discoveries(tags=[agent_id])] == [agent_id]
    chain = await db.get_response_chain("other")
    assert [d.id for d in chain] == ["other", agent_id]


# -- sessions ------------------------------------------------------------------

async def test_session_lifecycle(db):
    await new_agent(db)
    s = await db.create_session("s1", "agent-1", ttl=timedelta(hours=1), client_type="cli",
                                client_info={"v": "1.0"}, metadata={"ip": "127.0.0.1"})
    assert s.is_active and s.client_info == {"v": "1.0"} and s.metadata == {"ip": "127.0.0.1"}
    assert timedelta(minutes=59) < s.expires_at - s.created_at <= timedelta(hours=1, seconds=1)
    assert await db.get_session("s1") == s
    touched = await db.touch_session("s1", ttl=timedelta(hours=2))
    assert touched.last_active >= s.last_active and touched.expires_at > s.expires_at
    await db.create_session("s2", "agent-1")
    assert {x.session_id for x in await db.get_active_sessions("agent-1")} == {"s1", "s2"}
    ended = await db.end_session("s1")
    assert not ended.is_active
    assert [x.session_id for x in await db.get_active_sessions("agent-1")] == ["s2"]
    assert await db.get_active_sessions("ghost") == []


async def test_session_errors(db):
    await new_agent(db)
    with pytest.raises(NotFoundError) as err:
        await db.create_session("s1", "ghost")
    assert err.value.kind == "agent"
    await db.create_session("s1", "agent-1")
    with pytest.raises(ConflictError):
        await db.create_session("s1", "agent-1")
    for call in (db.touch_session, db.end_session):
        with pytest.raises(NotFoundError) as err:
            await call("nope")
        assert err.value.kind == "session"


async def test_expire_sessions(db):
    await new_agent(db)
    await db.create_session("short", "agent-1", ttl=timedelta(seconds=1))
    await db.create_session("long", "agent-1", ttl=timedelta(days=1))
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert await db.expire_sessions(now=later) == 1
    assert not (await db.get_session("short")).is_active
    assert (await db.get_session("long")).is_active
    assert await db.expire_sessions(now=later) == 0


# -- agent state ---------------------------------------------------------------

async def test_agent_state_history(db):
    await new_agent(db)
    t0 = datetime(2025, 6, 1, tzinfo=UTC)
    states = []
    for i in range(4):
        states.append(await db.record_agent_state(
            "agent-1", energy=0.5, integrity=0.9, entropy=0.2 + i / 10, void=-0.3,
            regime="EXPLORATION" if i % 2 else "nominal", coherence=0.7,
            state={"lambda1": 0.1 * i, "history": [i]}, recorded_at=t0 + timedelta(hours=i)))
    assert len({s.id for s in states}) == 4
    latest = await db.get_latest_agent_state("agent-1")
    assert latest == states[-1]
    assert latest.void == -0.3 and latest.regime == "EXPLORATION"
    assert latest.state == {"lambda1": pytest.approx(0.3), "history": [3]}
    assert_utc(latest.recorded_at)
    history = await db.get_agent_state_history("agent-1", limit=3)
    assert [s.id for s in history] == [s.id for s in reversed(states)][:3]
    since = await db.get_agent_state_history("agent-1", since=t0 + timedelta(hours=2))
    assert [s.id for s in since] == [states[3].id, states[2].id]
    assert await db.get_latest_agent_state("ghost") is None


async def test_agent_state_bounds_accept_model_values(db):
    await new_agent(db)
    edge = await db.record_agent_state("agent-1", energy=0.0, integrity=1.0, entropy=0.001,
                                       void=-2.0, coherence=1.0, regime="STABLE")
    assert (edge.energy, edge.integrity, edge.entropy, edge.void) == (0.0, 1.0, 0.001, -2.0)
    with pytest.raises(NotFoundError):
        await db.record_agent_state("ghost", energy=0.5, integrity=0.5, entropy=0.5, void=0.0)


# -- calibration ---------------------------------------------------------------

async def test_calibration_versions(db):
    assert await db.get_calibration() is None
    first = await db.update_calibration({"bins": [0.1, 0.2], "name": "κ"}, expected_version=0)
    assert first.version == 1 and first.state == {"bins": [0.1, 0.2], "name": "κ"}
    second = await db.update_calibration({"bins": []})
    assert second.version == 2
    with pytest.raises(ConflictError):
        await db.update_calibration({"stale": True}, expected_version=1)
    got = await db.get_calibration()
    assert got == second


# -- audit events ----------------------------------------------------------------

async def test_audit_append_dedup_and_query(db):
    ts = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    ev, inserted = await db.append_audit_event("checkin", agent_id="a", session_id="s",
                                               details={"note": "hello world"}, timestamp=ts)
    assert inserted and ev.timestamp == ts
    again, inserted = await db.append_audit_event("checkin", agent_id="a", session_id="s",
                                                  details={"note": "hello world"}, timestamp=ts)
    assert not inserted and again == ev
    for i in range(3):
        await db.append_audit_event("pause", agent_id="b", details={"i": i},
                                    timestamp=ts + timedelta(days=40 * (i + 1)), confidence=0.5)
    assert [e.event_type for e in await db.query_audit_events(agent_id="a")] == ["checkin"]
    by_type = await db.query_audit_events(event_type="pause")
    assert [e.details["i"] for e in by_type] == [2, 1, 0]
    window = await db.query_audit_events(since=ts + timedelta(days=40), until=ts + timedelta(days=120))
    assert [e.details.get("i") for e in window] == [1, 0]
    assert len(await db.query_audit_events(limit=2)) == 2


async def test_audit_dedup_across_months_and_id_conflict(db):
    ts = datetime(2024, 12, 31, 23, 59, tzinfo=UTC)
    ev, _ = await db.append_audit_event("x", details={"a": 1}, timestamp=ts)
    _, inserted = await db.append_audit_event("x", details={"a": 1}, timestamp=ts)
    assert not inserted
    with pytest.raises(ConflictError):
        await db.append_audit_event("y", details={}, timestamp=ts + timedelta(days=60), event_id=ev.event_id)
    assert len(await db.query_audit_events()) == 1


async def test_audit_full_text_search(db):
    await db.append_audit_event("dispute_opened", details={"reason": "Entropy spike in worker pool"})
    await db.append_audit_event("checkin", details={"reason": "routine entropy check"})
    await db.append_audit_event("checkin", details={"reason": "энтропия высокая"})
    assert {e.event_type for e in await db.search_audit_events("entropy")} == {"dispute_opened", "checkin"}
    assert [e.event_type for e in await db.search_audit_events("ENTROPY spike")] == ["dispute_opened"]
    assert [e.details["reason"] for e in await db.search_audit_events("энтропия")] == ["энтропия высокая"]
    assert await db.search_audit_events("entro") == []
    assert [e.event_type for e in await db.search_audit_events("dispute_opened")] == ["dispute_opened"]


LONG_WORD = "x" * 300  # over 200 UTF-8 bytes: PostgreSQL indexes its digest
LONG_CYRILLIC = "ж" * 120  # 120 characters, 240 bytes
MID_CYRILLIC = "ж" * 90  # 180 bytes: indexed as it is


async def test_audit_search_long_non_latin_underscored_and_numeric_words(db):
    await db.append_audit_event("note_taken", details={
        "text": f"{LONG_WORD} {LONG_CYRILLIC} {MID_CYRILLIC} Ünïcode 東京 snake_case_word",
        "count": 42, "ratio": 0.5, "big": 1e20, "neg": -7})
    await db.append_audit_event("other", details={"text": "x" * 299 + " " + "ж" * 119 + " tokyo"})
    for query in (LONG_WORD, LONG_WORD.upper(), LONG_CYRILLIC, MID_CYRILLIC, "ÜNÏCODE", "東京", "snake_case_word",
                  "note_taken", "42", "0", "5", "1e", "20", "7", f"{LONG_WORD} 42 東京"):
        assert [e.event_type for e in await db.search_audit_events(query)] == ["note_taken"], query
    for query in ("x" * 301, "ж" * 121, "ж" * 89, "snake", "case", "note", "4", "1e20", "東"):
        assert await db.search_audit_events(query) == [], query
    assert [e.event_type for e in await db.search_audit_events("text")] == ["other", "note_taken"]


# -- tool usage ------------------------------------------------------------------

async def test_tool_usage_and_stats(db):
    ts = datetime(2025, 5, 5, tzinfo=UTC)
    for i, (tool, ok, ms) in enumerate([("search", True, 10), ("search", False, 30),
                                        ("search", True, 20), ("store", True, 5)]):
        await db.record_tool_usage(tool, agent_id="a" if i < 3 else "b", latency_ms=ms, success=ok,
                                   error_type=None if ok else "Timeout", payload={"i": i},
                                   timestamp=ts + timedelta(seconds=i))
    rows = await db.query_tool_usage(tool_name="search")
    assert [r.payload["i"] for r in rows] == [2, 1, 0]
    assert rows[1].error_type == "Timeout" and rows[1].success is False
    stats = await db.get_tool_stats()
    assert [(s.tool_name, s.calls, s.successes, s.failures, s.max_latency_ms) for s in stats] == [
        ("search", 3, 2, 1, 30), ("store", 1, 1, 0, 5)]
    assert stats[0].avg_latency_ms == pytest.approx(20.0)
    assert [s.tool_name for s in await db.get_tool_stats(agent_id="b")] == ["store"]
    assert [s.calls for s in await db.get_tool_stats(since=ts + timedelta(seconds=2))] == [1, 1]
    u = await db.record_tool_usage("x")
    with pytest.raises(ConflictError):
        await db.record_tool_usage("x", usage_id=u.usage_id)


# -- knowledge graph ----------------------------------------------------------------

async def seed_knowledge(db):
    await new_agent(db, "author")
    t = datetime(2025, 7, 1, tzinfo=UTC)
    await db.add_discovery("d1", agent_id="author", type="insight", summary="Cache misses spike at noon",
                           details="Seen in the worker pool", tags=["perf", "cache"], severity="high",
                           confidence=0.8, related_files=["src/cache.py"], created_at=t)
    await db.add_discovery("d2", agent_id="author", type="question", summary="Why does the cache miss?",
                           tags=["cache"], created_at=t + timedelta(minutes=1))
    await db.add_discovery("d3", agent_id="author", type="answer", summary="Eviction policy is LRU",
                           details="cache size too small", tags=["cache", "fix"], created_at=t + timedelta(minutes=2))
    await db.link_discoveries("d2", "d1", edge_type="response_to", response_type="question")
    await db.link_discoveries("d3", "d2", edge_type="response_to", response_type="extend", weight=0.9)
    await db.link_discoveries("d1", "d3", edge_type="related_to", created_by="author", metadata={"why": "same"})


async def test_discovery_round_trip(db):
    await seed_knowledge(db)
    d1 = await db.get_discovery("d1")
    assert (d1.type, d1.severity, d1.status, d1.confidence) == ("insight", "high", "open", 0.8)
    assert d1.tags == ("cache", "perf")
    assert d1.related_files == ("src/cache.py",)
    assert d1.details == "Seen in the worker pool"
    assert d1.created_at == datetime(2025, 7, 1, tzinfo=UTC)
    assert await db.get_discovery("nope") is None
    with pytest.raises(ConflictError):
        await db.add_discovery("d1", agent_id="author", type="x", summary="dup")
    with pytest.raises(NotFoundError) as err:
        await db.add_discovery("d9", agent_id="ghost", type="x", summary="s")
    assert err.value.kind == "agent"


async def test_discovery_status(db):
    await seed_knowledge(db)
    resolved = await db.update_discovery_status("d2", "resolved")
    assert resolved.status == "resolved" and resolved.resolved_at is not None
    reopened = await db.update_discovery_status("d2", "open")
    assert reopened.resolved_at is None
    with pytest.raises(NotFoundError) as err:
        await db.update_discovery_status("nope", "open")
    assert err.value.kind == "discovery"


async def test_discovery_search(db):
    await seed_knowledge(db)
    assert [d.id for d in await db.search_discoveries("cache")] == ["d3", "d2", "d1"]
    assert [d.id for d in await db.search_discoveries("cache", tags=["perf"])] == ["d1"]
    assert [d.id for d in await db.search_discoveries(tags=["cache", "fix"])] == ["d3"]
    assert [d.id for d in await db.search_discoveries("worker POOL")] == ["d1"]
    assert [d.id for d in await db.search_discoveries("cache", type="question")] == ["d2"]
    assert [d.id for d in await db.search_discoveries(agent_id="author", limit=1)] == ["d3"]
    assert await db.search_discoveries("cach") == []
    assert [d.id for d in await db.search_discoveries("lru CACHE")] == ["d3"]
    await db.update_discovery_status("d1", "resolved")
    assert [d.id for d in await db.search_discoveries(status="resolved")] == ["d1"]


async def test_discovery_search_long_and_non_latin_words(db):
    await new_agent(db, "author")
    t = datetime(2025, 7, 1, tzinfo=UTC)
    await db.add_discovery("k1", agent_id="author", type="x", summary=f"Кэш {LONG_WORD}", created_at=t)
    await db.add_discovery("k2", agent_id="author", type="x", summary="кэш промах_2", details=LONG_CYRILLIC,
                           created_at=t + timedelta(minutes=1))
    assert [d.id for d in await db.search_discoveries("КЭШ")] == ["k2", "k1"]
    assert [d.id for d in await db.search_discoveries(LONG_WORD)] == ["k1"]
    assert [d.id for d in await db.search_discoveries(f"{LONG_CYRILLIC} промах_2")] == ["k2"]
    assert await db.search_discoveries("x" * 299) == []
    assert await db.search_discoveries("промах") == []
    assert [d.id for d in await db.search_discoveries("кэш", limit=1)] == ["k2"]


async def test_links_and_traversal(db):
    await seed_knowledge(db)
    neighbours = await db.get_neighbors("d1")
    assert [(n.discovery.id, n.link.edge_type, n.direction) for n in neighbours] == [
        ("d2", "response_to", "in"), ("d3", "related_to", "out")]
    assert neighbours[1].link.metadata == {"why": "same"} and neighbours[1].link.created_by == "author"
    # The link's own time (made now), not its discovery's (July 2025).
    assert neighbours[1].link.created_at > datetime(2026, 1, 1, tzinfo=UTC)
    assert neighbours[1].discovery.created_at == datetime(2025, 7, 1, 0, 2, tzinfo=UTC)
    only = await db.get_neighbors("d2", edge_type="response_to")
    assert [(n.discovery.id, n.link.response_type) for n in only] == [("d1", "question"), ("d3", "extend")]
    assert [d.id for d in await db.get_response_chain("d3")] == ["d3", "d2", "d1"]
    assert [d.id for d in await db.get_response_chain("d3", max_depth=1)] == ["d3", "d2"]
    await db.link_discoveries("d1", "d3", edge_type="response_to", response_type="disagree")
    assert [d.id for d in await db.get_response_chain("d3")] == ["d3", "d2", "d1"]  # cycle stops


async def test_link_errors(db):
    await seed_knowledge(db)
    with pytest.raises(ConflictError):
        await db.link_discoveries("d2", "d1", edge_type="response_to", response_type="support")
    with pytest.raises(NotFoundError) as err:
        await db.link_discoveries("ghost", "d1")
    assert (err.value.kind, err.value.key) == ("discovery", "ghost")
    with pytest.raises(NotFoundError) as err:
        await db.link_discoveries("d1", "ghost")
    assert err.value.key == "ghost"
    with pytest.raises(ValidationError) as err:
        await db.link_discoveries("d1", "d2", edge_type="response_to")
    assert err.value.field == "response_type"
    for call in (db.get_neighbors, db.get_response_chain):
        with pytest.raises(NotFoundError):
            await call("ghost")


# -- dialectic -------------------------------------------------------------------

async def test_dialectic_full_round(db):
    for a in ("paused", "reviewer"):
        await new_agent(db, a)
    await seed_knowledge(db)
    s = await db.create_dialectic_session("ds1", paused_agent_id="paused", reason="drift",
                                          discovery_id="d1", topic="entropy", max_synthesis_rounds=3,
                                          paused_agent_state={"E": 0.4})
    assert (s.phase, s.status, s.synthesis_round, s.reviewer_agent_id) == ("thesis", "active", 0, None)
    with pytest.raises(ValidationError):
        await db.assign_reviewer("ds1", "paused")
    s = await db.assign_reviewer("ds1", "reviewer")
    assert s.reviewer_agent_id == "reviewer"
    m1 = await db.add_dialectic_message("ds1", agent_id="paused", message_type="thesis",
                                        root_cause="bad input", proposed_conditions=["slow down"],
                                        reasoning="because", observed_metrics={"S": 1.2})
    await db.set_dialectic_phase("ds1", "antithesis")
    m2 = await db.add_dialectic_message("ds1", agent_id="reviewer", message_type="antithesis",
                                        concerns=["risk"], agrees=False)
    await db.set_dialectic_phase("ds1", "synthesis")
    m3 = await db.add_dialectic_message("ds1", agent_id="paused", message_type="synthesis", agrees=True,
                                        signature="sig")
    assert m1.id < m2.id < m3.id
    assert [s.session_id for s in await db.get_active_dialectic_sessions("reviewer")] == ["ds1"]
    resolved = await db.resolve_dialectic_session("ds1", resolution={"action": "resume"})
    assert (resolved.status, resolved.phase, resolved.synthesis_round) == ("resolved", "resolved", 1)
    full = await db.get_dialectic_session("ds1")
    assert [(m.message_type, m.agent_id) for m in full.messages] == [
        ("thesis", "paused"), ("antithesis", "reviewer"), ("synthesis", "paused")]
    assert full.messages[0].proposed_conditions == ["slow down"]
    assert full.messages[0].observed_metrics == {"S": 1.2}
    assert full.messages[1].concerns == ["risk"] and full.messages[1].agrees is False
    assert full.messages[2].signature == "sig"
    assert full.resolution == {"action": "resume"} and full.paused_agent_state == {"E": 0.4}
    assert await db.get_active_dialectic_sessions("reviewer") == []
    with pytest.raises(ConflictError):
        await db.add_dialectic_message("ds1", agent_id="paused", message_type="thesis")
    with pytest.raises(ConflictError):
        await db.set_dialectic_phase("ds1", "thesis")
    with pytest.raises(ConflictError):
        await db.resolve_dialectic_session("ds1", resolution={})


async def test_dialectic_errors(db):
    await new_agent(db, "paused")
    with pytest.raises(NotFoundError) as err:
        await db.create_dialectic_session("ds1", paused_agent_id="ghost")
    assert err.value.kind == "agent"
    with pytest.raises(NotFoundError) as err:
        await db.create_dialectic_session("ds1", paused_agent_id="paused", reviewer_agent_id="ghost")
    assert err.value.key == "ghost"
    with pytest.raises(NotFoundError) as err:
        await db.create_dialectic_session("ds1", paused_agent_id="paused", discovery_id="nope")
    assert err.value.kind == "discovery"
    await db.create_dialectic_session("ds1", paused_agent_id="paused")
    with pytest.raises(ConflictError):
        await db.create_dialectic_session("ds1", paused_agent_id="paused")
    with pytest.raises(NotFoundError) as err:
        await db.add_dialectic_message("nope", agent_id="paused", message_type="thesis")
    assert err.value.kind == "dialectic session"
    with pytest.raises(NotFoundError) as err:
        await db.add_dialectic_message("ds1", agent_id="ghost", message_type="thesis")
    assert err.value.kind == "agent"
    with pytest.raises(NotFoundError):
        await db.assign_reviewer("nope", "paused")
    cancelled = await db.resolve_dialectic_session("ds1", resolution={"why": "moot"}, status="cancelled")
    assert (cancelled.status, cancelled.phase) == ("cancelled", "failed")
    assert await db.get_dialectic_session("nope") is None


# -- health ----------------------------------------------------------------------

async def test_health(db, config):
    h = await db.health()
    assert h.ok
    assert h.graph == {"sqlite": "n/a", "postgres": "on", "postgres-noage": "off", "dual": "on",
                       "dual-sqlite-read": "on"}[config]
    assert db.supports_graph is (config in ("postgres", "dual", "dual-sqlite-read"))


# -- bad input: same typed error everywhere, nothing written ---------------------------

BAD_CALLS = [
    ("agent_id", lambda db: db.create_identity("", api_key="k")),
    ("agent_id", lambda db: db.create_identity("x" * 257, api_key="k")),
    ("agent_id", lambda db: db.create_identity("bad\x00id", api_key="k")),
    ("status", lambda db: db.create_identity("new", api_key="k", status="zombie")),
    ("metadata", lambda db: db.create_identity("new", api_key="k", metadata="{not json")),
    ("metadata", lambda db: db.create_identity("new", api_key="k", metadata={"x": float("nan")})),
    ("metadata", lambda db: db.create_identity("new", api_key="k", metadata={"x": "a\x00b"})),
    ("metadata", lambda db: db.create_identity("new", api_key="k", metadata=[1, 2])),
    ("notes", lambda db: db.create_identity("new", api_key="k", notes="nul\x00here")),
    ("created_at", lambda db: db.create_identity("new", api_key="k", created_at=datetime(2025, 1, 1))),
    ("tags[1]", lambda db: db.create_identity("new", api_key="k", tags=["ok", ""])),
    ("entropy", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=math.nan, void=0)),
    ("energy", lambda db: db.record_agent_state("agent-1", energy=1.5, integrity=0.5, entropy=0.5, void=0)),
    ("void", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=0.5, void=math.inf)),
    ("entropy", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=0.0, void=0)),
    ("coherence", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=0.5, void=0, coherence=-0.1)),
    ("state", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=0.5, void=0, state={"E": 0.9})),
    ("regime", lambda db: db.record_agent_state("agent-1", energy=0.5, integrity=0.5, entropy=0.5, void=0, regime="panic")),
    ("energy", lambda db: db.record_agent_state("agent-1", energy="0.5", integrity=0.5, entropy=0.5, void=0)),
    ("summary", lambda db: db.add_discovery("dx", agent_id="agent-1", type="t", summary="a\x00b")),
    ("summary", lambda db: db.add_discovery("dx", agent_id="agent-1", type="t", summary="   ")),
    ("status", lambda db: db.add_discovery("dx", agent_id="agent-1", type="t", summary="s", status="weird")),
    ("confidence", lambda db: db.add_discovery("dx", agent_id="agent-1", type="t", summary="s", confidence=2)),
    ("details", lambda db: db.append_audit_event("e", details="{broken")),
    ("confidence", lambda db: db.append_audit_event("e", confidence=math.nan)),
    ("event_id", lambda db: db.append_audit_event("e", event_id="not-a-uuid")),
    ("timestamp", lambda db: db.append_audit_event("e", timestamp=datetime(2025, 1, 1))),
    ("success", lambda db: db.record_tool_usage("t", success=2)),
    ("latency_ms", lambda db: db.record_tool_usage("t", latency_ms=-1)),
    ("state", lambda db: db.update_calibration("[1, 2]")),
    ("session_id", lambda db: db.create_session("", "agent-1")),
    ("message_type", lambda db: db.add_dialectic_message("ds", agent_id="agent-1", message_type="rant")),
    ("query", lambda db: db.search_discoveries("   ")),
    ("limit", lambda db: db.query_audit_events(limit=0)),
]


@pytest.mark.parametrize("field,call", BAD_CALLS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_CALLS)])
async def test_bad_input_is_refused_and_writes_nothing(db, field, call):
    await new_agent(db)
    before = await snapshot_counts(db)
    with pytest.raises(ValidationError) as err:
        await call(db)
    assert err.value.field == field
    assert field in str(err.value)
    assert await snapshot_counts(db) == before


async def snapshot_counts(db):
    return (
        len(await db.list_identities(limit=10_000)),
        len(await db.get_agent_state_history("agent-1", limit=10_000)),
        len(await db.search_discoveries(limit=10_000)),
        len(await db.query_audit_events(limit=10_000)),
        len(await db.query_tool_usage(limit=10_000)),
        await db.get_calibration(),
    )


# -- concurrency and durability -----------------------------------------------------------

async def test_sixteen_concurrent_writers_lose_nothing(db):
    await new_agent(db, "hub")
    await db.add_discovery("hub-d", agent_id="hub", type="root", summary="hub")

    async def writer(n: int) -> None:
        agent = f"w{n}"
        await new_agent(db, agent, parent_agent_id="hub")
        await db.create_session(f"sess-{n}", agent)
        for i in range(10):
            await db.record_agent_state(agent, energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
            await db.append_audit_event("tick", agent_id=agent, details={"i": i})
            await db.record_tool_usage("tick", agent_id=agent, latency_ms=i)
        await db.add_discovery(f"d-{n}", agent_id=agent, type="t", summary=f"from {agent}", tags=["load"])
        await db.link_discoveries(f"d-{n}", "hub-d")

    await asyncio.gather(*(writer(n) for n in range(16)))
    assert len(await db.list_children("hub")) == 16
    for n in range(16):
        assert len(await db.get_agent_state_history(f"w{n}", limit=1000)) == 10
    assert len(await db.query_audit_events(event_type="tick", limit=10_000)) == 160
    assert [s.calls for s in await db.get_tool_stats()] == [160]
    assert len(await db.search_discoveries(tags=["load"], limit=100)) == 16
    assert len(await db.get_neighbors("hub-d")) == 16


async def test_data_survives_reopen(store):
    db = await store.open()
    try:
        await new_agent(db)
        await db.record_agent_state("agent-1", energy=0.1, integrity=0.2, entropy=0.3, void=0.4)
    finally:
        await db.close()
    await db.close()  # closing twice is harmless
    db = await store.open()
    try:
        assert (await db.get_latest_agent_state("agent-1")).void == 0.4
        assert await db.verify_api_key("agent-1", "key-agent-1")
    finally:
        await db.close()
