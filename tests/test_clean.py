"""The migrator's cleaning rules, row by row (no PostgreSQL needed).

Rows are dicts as govdb.migrate.source reads them; each dirty case of the
legacy doc must end repaired (with the original recorded) or quarantined
(with a reason), and a clean row must come out as the SQLite backend reads it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from conftest import copy_of
from govdb import legacy
from govdb.backends.base import audit_hash
from govdb.convert import legacy_uuid
from govdb.migrate.clean import Cleaner, build_context, prescan_duplicates
from govdb.migrate.targets import NO_KEY_HASH, TARGETS, Context, encode_original, raw_text
from govdb.migrate.source import LegacySource, decode_key, encode_key

UTC = timezone.utc
T0 = "2025-03-01T10:00:00.000000+00:00"
BAD_UTF8 = b"not-utf8\xff".decode("utf-8", "surrogateescape")  # how source.py reads such TEXT
REPO = Path(__file__).resolve().parent.parent


def identity(**kw):
    row = {"_rowid": 1, "agent_id": "a1", "api_key": "raw-key-1", "created_at": T0, "updated_at": T0,
           "status": "active", "parent_agent_id": None, "spawn_reason": None, "disabled_at": None,
           "tags_json": '["x"]', "lifecycle_events_json": "[]", "metadata_json": "{}"}
    return row | kw


def state(**kw):
    doc = {"E": 0.5, "I": 0.6, "S": 0.7, "V": -0.2, "coherence": 0.9, "regime": "nominal", "lambda1": 0.1}
    row = {"_rowid": 7, "id": 7, "agent_id": "a1", "recorded_at": T0, "entropy": 0.7, "integrity": 0.6,
           "stability_index": 0.3, "volatility": -0.2, "regime": "nominal", "coherence": 0.9,
           "state_json": json.dumps(doc)}
    return row | kw


def audit(**kw):
    row = {"_rowid": 3, "id": 3, "timestamp": T0, "event_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
           "agent_id": "a1", "session_id": None, "event_type": "checkin", "confidence": 0.5,
           "details_json": '{"n": 1}', "raw_hash": "h1"}
    return row | kw


def usage(**kw):
    row = {"_rowid": 4, "id": 4, "timestamp": T0, "usage_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
           "agent_id": "a1", "session_id": None, "tool_name": "search", "latency_ms": 12, "success": 1,
           "error_type": None, "payload_json": "{}"}
    return row | kw


def repairs(out):
    return {r.column: r for r in out.repairs}


# -- timestamps ---------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2025-11-26T01:15:29.222120+00:00", datetime(2025, 11, 26, 1, 15, 29, 222120, tzinfo=UTC)),
    ("2025-11-26T01:15:29.222120", datetime(2025, 11, 26, 1, 15, 29, 222120, tzinfo=UTC)),
    ("2025-11-26 01:15:29", datetime(2025, 11, 26, 1, 15, 29, tzinfo=UTC)),
    ("2025-11-26T01:15:29Z", datetime(2025, 11, 26, 1, 15, 29, tzinfo=UTC)),
    ("2025-11-26T01:15:29-07:00", datetime(2025, 11, 26, 8, 15, 29, tzinfo=UTC)),
    ("1764119729", datetime(2025, 11, 26, 1, 15, 29, tzinfo=UTC)),
    ("2999-12-31T23:59:59", datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ("1901-01-01 00:00:00", datetime(1901, 1, 1, tzinfo=UTC)),
])
def test_timestamp_formats(text, expected):
    out = Cleaner().clean("agent_state", state(recorded_at=text))
    assert out.ok and not out.repairs
    assert out.value("recorded_at") == expected


def test_naive_timestamps_read_in_the_source_timezone():
    tz = ZoneInfo("America/Los_Angeles")
    out = Cleaner(source_tz=tz).clean("agent_state", state(recorded_at="2025-07-01 12:00:00"))
    assert out.value("recorded_at") == datetime(2025, 7, 1, 19, 0, tzinfo=UTC)
    aware = Cleaner(source_tz=tz).clean("agent_state", state(recorded_at="2025-07-01T12:00:00+00:00"))
    assert aware.value("recorded_at") == datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["not a time", "", "   ", None, "2025-13-45"])
def test_time_series_rows_with_unreadable_timestamps_are_quarantined(bad):
    c = Cleaner()
    for table, row, col in (("agent_state", state(), "recorded_at"), ("audit_events", audit(), "timestamp"),
                            ("tool_usage", usage(), "timestamp")):
        out = c.clean(table, row | {col: bad})
        assert not out.ok and out.kind == "bad-timestamp" and col in out.reason


def test_entity_rows_fall_back_to_another_timestamp_of_the_row_else_quarantine():
    c = Cleaner()
    out = c.clean("agent_metadata", identity(created_at="not a time", updated_at="2025-02-02T00:00:00Z"))
    assert out.ok
    assert out.value("created_at") == datetime(2025, 2, 2, tzinfo=UTC)
    assert repairs(out)["created_at"].original == "not a time"
    out = c.clean("agent_metadata", identity(created_at="", updated_at=None, disabled_at=None))
    assert not out.ok and out.kind == "bad-timestamp"
    # Unreadable optional timestamps: recorded, stored as the row's fallback or NULL.
    out = c.clean("agent_metadata", identity(updated_at="garbage", disabled_at="garbage"))
    assert out.value("updated_at") == out.value("created_at")
    assert out.value("disabled_at") is None
    assert {"updated_at", "disabled_at"} <= set(repairs(out))


# -- JSON, text ----------------------------------------------------------------

@pytest.mark.parametrize("doc,kind,stored", [
    ("{not json", "invalid-json", {}),
    ("null", "json-null", {}),
    ('"just a string"', "json-wrong-type", {}),
    ('{"a": "x\\u0000y"}', "json-repaired", {"a": "xy"}),
    ('{"a": NaN, "b": [Infinity]}', "json-repaired", {"a": None, "b": [None]}),
    ('{"a": "\\ud800"}', "json-repaired", {"a": "\ufffd"}),
])
def test_json_columns_are_repaired_and_the_original_recorded(doc, kind, stored):
    out = Cleaner().clean("audit_events", audit(details_json=doc))
    assert out.ok
    r = repairs(out)["details_json"]
    assert r.kind == kind and r.original == doc and r.encoding == "text"
    assert json.loads(out.value("details")) == stored


def test_json_that_needs_no_repair_is_sent_as_it_is_unless_jsonb_would_change_a_float():
    c = Cleaner()
    assert c.clean("audit_events", audit(details_json='{"a": [1, 2.5, "é"]}')).value("details") == '{"a": [1, 2.5, "é"]}'
    out = c.clean("audit_events", audit(details_json='{"big": 1e+20}'))
    assert not out.repairs and json.loads(out.value("details")) == {"big": 1e20}
    assert "e+" not in out.value("details")  # plain digits with a fraction: reads back as a float


def test_nul_bytes_and_text_that_is_not_utf8():
    c = Cleaner(context=Context(agents={"a1"}))
    row = {"_rowid": 1, "id": "d1", "agent_id": "a1", "type": "bug", "severity": None, "status": "open",
           "created_at": T0, "updated_at": None, "resolved_at": None, "summary": "before\x00after",
           "details": BAD_UTF8, "related_files": None, "confidence": None, "embedding": None}
    out = c.clean("discoveries", row)
    assert out.ok
    assert out.value("summary") == "beforeafter"
    assert out.value("details") == "not-utf8\ufffd"  # what the SQLite backend reads
    r = repairs(out)
    assert (r["summary"].kind, r["summary"].encoding) == ("nul-byte", "json")
    assert json.loads(r["summary"].original) == "before\x00after"
    assert (r["details"].kind, r["details"].original, r["details"].encoding) == ("invalid-utf8", "6e6f742d75746638ff",
                                                                                  "hex")


def test_keys_that_are_not_valid_text_are_quarantined():
    c = Cleaner()
    for bad in (None, "a\x00b", BAD_UTF8, b"blob", "x" * 3000):
        out = c.clean("session_identities", {"_rowid": 9, "session_id": bad, "agent_id": "a1",
                                             "created_at": T0, "last_active": T0, "expires_at": T0})
        assert not out.ok and out.kind in ("bad-key", "orphan")
    null_key = c.clean("session_identities", {"_rowid": 9, "session_id": None, "agent_id": "a1"})
    assert null_key.key_text == '[{"rowid": 9}]'


def test_encode_key_round_trips_every_odd_key():
    key = ("a'b\"$$;\\", "агент", "x\x00y", BAD_UTF8, b"\x00\xff", 42)
    assert decode_key(encode_key(key)) == key
    encode_key(key).encode("utf-8")  # storable in PostgreSQL text


# -- ids, hashes, duplicates --------------------------------------------------

@pytest.mark.parametrize("event_id", [None, "", "not-a-uuid", "12345"])
def test_missing_or_bad_event_ids_get_the_sqlite_backends_legacy_uuid(event_id):
    out = Cleaner().clean("audit_events", audit(event_id=event_id))
    assert out.value("event_id") == legacy_uuid("audit_events", 3)
    assert repairs(out)["event_id"].kind == "bad-uuid"
    if not event_id:  # the SQLite backend reads the same id for these
        assert legacy.audit_event(audit(event_id=event_id)).event_id == out.value("event_id")
    use = Cleaner().clean("tool_usage", usage(usage_id=event_id))
    assert use.value("usage_id") == legacy_uuid("tool_usage", 4)


def test_uppercase_uuid_is_normalised_and_recorded():
    out = Cleaner().clean("audit_events", audit(event_id="0F8FAD5B-D9CB-469F-A165-70867728950E"))
    assert out.value("event_id") == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert repairs(out)["event_id"].kind == "uuid-normalised"


def test_missing_raw_hash_gets_base_audit_hash():
    out = Cleaner().clean("audit_events", audit(raw_hash=None))
    ts = datetime.fromisoformat(T0)
    assert out.value("raw_hash") == audit_hash(ts, "checkin", "a1", None, {"n": 1})
    assert repairs(out)["raw_hash"].kind == "missing-hash"


def _legacy_file(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.executescript((REPO / "src/govdb/sql/sqlite_legacy.sql").read_text())
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def test_duplicate_event_ids_and_duplicate_content(tmp_path):
    conn = _legacy_file(tmp_path / "g.db")
    eid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    with conn:
        conn.execute("INSERT INTO agent_metadata (agent_id, api_key, created_at) VALUES ('a1', 'k', ?)", (T0,))
        rows = [(1, T0, eid, "a", "{}", "h1"), (2, T0, eid, "b", "{}", "h2"),       # same id, other content
                (3, T0, None, "c", "{}", None), (4, T0, None, "c", "{}", None)]    # same content, no hash
        conn.executemany("INSERT INTO audit_events (id, timestamp, event_id, event_type, details_json, raw_hash)"
                         " VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO tool_usage (id, timestamp, usage_id, tool_name) VALUES (?, ?, ?, 't')",
                         [(1, T0, eid), (2, T0, eid.upper())])
    conn.close()
    c = Cleaner()
    with LegacySource(tmp_path / "g.db") as src:
        with src.snapshot():
            prescan_duplicates(src, c)
            outs = {o.key[0]: o for b in src.batches("audit_events", None, 10) for o in c.clean_many("audit_events", b)}
            uses = [o for b in src.batches("tool_usage", None, 10) for o in c.clean_many("tool_usage", b)]
    assert outs[1].value("event_id") == eid and not outs[1].repairs
    assert outs[2].value("event_id") == legacy_uuid("audit_events", 2)
    assert repairs(outs[2])["event_id"].kind == "duplicate-id"
    assert outs[3].ok and not outs[4].ok and outs[4].kind == "duplicate" and "id 3" in outs[4].reason
    assert uses[0].value("usage_id") == eid
    # Case variants are one UUID too: the second is repaired (normalising would collide).
    assert uses[1].value("usage_id") == legacy_uuid("tool_usage", 2)


# -- agent state: EISV, regime ---------------------------------------------------

def test_clean_state_reads_as_the_sqlite_backend_reads_it():
    out = Cleaner().clean("agent_state", state())
    assert out.ok and not out.repairs
    rec = legacy.agent_state(state())
    assert (out.value("energy"), out.value("integrity"), out.value("entropy"), out.value("void"),
            out.value("coherence"), out.value("regime")) == (rec.energy, rec.integrity, rec.entropy, rec.void,
                                                             rec.coherence, rec.regime)
    assert json.loads(out.value("snapshot")) == rec.state == {"lambda1": 0.1}


@pytest.mark.parametrize("column,value", [
    ("entropy", "NaN"), ("entropy", float("inf")), ("volatility", float("-inf")), ("entropy", 5.0),
    ("volatility", -3.0), ("integrity", 1.5), ("coherence", -0.1),
])
def test_bad_eisv_is_taken_from_state_json_when_valid_else_quarantined(column, value):
    c = Cleaner()
    repaired = c.clean("agent_state", state(**{column: value}))
    assert repaired.ok and repairs(repaired)[column].kind == "bad-number"
    key = dict(legacy.STATE_COLUMNS)[column]
    no_doc = json.dumps({"E": 0.5, "note": "x"})
    out = c.clean("agent_state", state(**{column: value}, state_json=no_doc))
    assert not out.ok and out.kind == "bad-value" and column in out.reason
    bad_doc = json.dumps({"E": 0.5, key: 99})
    assert not c.clean("agent_state", state(**{column: value}, state_json=bad_doc)).ok


def test_eisv_missing_everywhere_reads_as_the_sqlite_backend_reads_it():
    out = Cleaner().clean("agent_state", state(entropy=None, volatility=None, coherence=None, regime=None,
                                              state_json='{"E": 0.5}'))
    assert out.ok
    assert (out.value("entropy"), out.value("void"), out.value("coherence"), out.value("regime")) == (
        0.0, 0.0, None, "nominal")
    assert {"entropy", "volatility"} == {r.column for r in out.repairs}


def test_energy_nan_or_out_of_range_is_quarantined():
    c = Cleaner()
    assert not c.clean("agent_state", state(state_json='{"E": NaN}')).ok
    assert not c.clean("agent_state", state(state_json='{"E": 1.5}')).ok
    assert c.clean("agent_state", state(state_json='{"S": 0.7}')).value("energy") is None


def test_regime_case_variants_repaired_unknown_from_state_json_else_quarantined():
    c = Cleaner()
    out = c.clean("agent_state", state(regime="Exploration"))
    assert out.value("regime") == "EXPLORATION" and repairs(out)["regime"].kind == "case-variant"
    out = c.clean("agent_state", state(regime="PANIC"))  # state_json says nominal
    assert out.value("regime") == "nominal" and repairs(out)["regime"].original == "PANIC"
    out = c.clean("agent_state", state(regime="PANIC", state_json='{"E": 0.5}'))
    assert not out.ok and out.kind == "unknown-value"


# -- statuses, booleans ----------------------------------------------------------

def test_identity_status_case_variant_and_unknown():
    c = Cleaner()
    assert c.clean("agent_metadata", identity(status=" Active ")).value("status") == "active"
    out = c.clean("agent_metadata", identity(status="zombie"))
    assert out.value("status") == "paused" and repairs(out)["status"].original == "zombie"
    assert c.clean("agent_metadata", identity(status=None)).value("status") == "active"


@pytest.mark.parametrize("raw,stored", [(2, True), (-1, True), ("yes", True), ("no", False), ("maybe", True)])
def test_success_other_than_0_or_1_reads_as_read_bool(raw, stored):
    out = Cleaner().clean("tool_usage", usage(success=raw))
    assert out.value("success") is stored
    assert repairs(out)["success"].kind == "not-boolean"
    assert legacy.tool_usage(usage(success=raw)).success is stored


def test_unknown_dialectic_status_closes_the_session():
    c = Cleaner(context=Context(agents={"a1", "a2"}, discoveries=set()))
    row = {"_rowid": 1, "session_id": "s1", "paused_agent_id": "a1", "reviewer_agent_id": "a2", "phase": "weird",
           "status": "timeout", "created_at": T0, "updated_at": T0, "discovery_id": "gone"}
    out = c.clean("dialectic_sessions", row)
    assert (out.value("status"), out.value("phase"), out.value("discovery_id")) == ("failed", "failed", None)
    assert {"status", "phase", "discovery_id"} <= set(repairs(out))


# -- orphans and lineage -----------------------------------------------------------

def test_orphans_are_quarantined_with_the_missing_parent_named():
    c = Cleaner(context=Context(agents={"a1"}, discoveries={"d1"}, dialectic_sessions={"s1"},
                                quarantined={"agent": {"bad-agent"}}))
    out = c.clean("agent_state", state(agent_id="ghost"))
    assert not out.ok and out.reason == "agent 'ghost' does not exist"
    assert c.clean("agent_state", state(agent_id="bad-agent")).reason == "agent 'bad-agent' is quarantined"
    assert not c.clean("discovery_tags", {"_rowid": 1, "discovery_id": "gone", "tag": "t"}).ok
    edge = {"_rowid": 1, "src_id": "d1", "dst_id": "gone", "edge_type": "related_to", "created_at": T0}
    assert "gone" in c.clean("discovery_edges", edge).reason
    msg = {"_rowid": 1, "id": 1, "session_id": "ghost-session", "agent_id": "a1", "message_type": "thesis",
           "timestamp": T0}
    assert not c.clean("dialectic_messages", msg).ok
    assert c.clean("dialectic_messages", msg | {"session_id": "s1"}).ok


def test_parent_naming_no_agent_is_cleared_and_cycles_are_broken_at_the_oldest_member():
    day = lambda d: f"2025-01-{d:02d}T00:00:00.000000+00:00"  # noqa: E731
    rows = [
        identity(agent_id="root", created_at=day(1)),
        identity(agent_id="child", parent_agent_id="root", created_at=day(2)),
        identity(agent_id="grandchild", parent_agent_id="child", created_at=day(3)),
        identity(agent_id="orphan", parent_agent_id="ghost", created_at=day(4)),
        identity(agent_id="c1", parent_agent_id="c3", created_at=day(5)),
        identity(agent_id="c2", parent_agent_id="c1", created_at=day(6)),
        identity(agent_id="c3", parent_agent_id="c2", created_at=day(7)),
        identity(agent_id="self", parent_agent_id="self", created_at=day(8)),
        identity(agent_id="bad-ts", created_at="nope", updated_at=None),
        identity(agent_id="of-bad", parent_agent_id="bad-ts", created_at=day(9)),
    ]
    outs = Cleaner().clean_identities(rows)
    by = {o.key[0]: o for o in outs}
    assert not by["bad-ts"].ok
    assert by["orphan"].value("parent_agent_id") is None
    assert repairs(by["orphan"])["parent_agent_id"].original == "ghost"
    assert "quarantined" in repairs(by["of-bad"])["parent_agent_id"].problem
    assert by["c1"].value("parent_agent_id") is None  # the oldest of the cycle
    assert repairs(by["c1"])["parent_agent_id"].kind == "lineage-cycle"
    assert by["c2"].value("parent_agent_id") == "c1" and by["c3"].value("parent_agent_id") == "c2"
    assert by["self"].value("parent_agent_id") is None
    order = [o.key[0] for o in outs]
    assert order[0] == "bad-ts"  # quarantined rows first, then parents before children
    for o in outs:
        parent = o.value("parent_agent_id")
        if parent is not None:
            assert order.index(parent) < order.index(o.key[0])


# -- API keys -------------------------------------------------------------------------

def test_raw_api_keys_are_hashed_and_masked_everywhere():
    c = Cleaner()
    out = c.clean("agent_metadata", identity(api_key="raw-secret"))
    assert out.value("api_key_hash") == "sha256$" + hashlib.sha256(b"raw-secret").hexdigest()
    hashed = out.value("api_key_hash")
    assert c.clean("agent_metadata", identity(api_key=hashed)).value("api_key_hash") == hashed
    assert c.clean("agent_metadata", identity(api_key=None)).value("api_key_hash") == NO_KEY_HASH
    bad = c.clean("agent_metadata", identity(api_key="raw-secret", created_at="x", updated_at=None))
    assert not bad.ok and "raw-secret" not in bad.raw_text() and hashed in bad.raw_text()
    assert "raw-secret" not in raw_text(identity(api_key="raw-secret"))


def test_raw_text_is_lossless_json_valid_utf8():
    row = {"_rowid": 5, "a": "x\x00y", "b": BAD_UTF8, "c": b"\x01\x02", "d": float("nan")}
    text = raw_text(row)
    text.encode("utf-8")
    doc = json.loads(text)
    assert doc["a"] == "x\x00y" and doc["b"] == {"hex": "6e6f742d75746638ff"} and doc["c"] == {"blob": "0102"}
    assert encode_original(BAD_UTF8) == ("6e6f742d75746638ff", "hex")


# -- the whole generated dirty file ---------------------------------------------------

@pytest.fixture(scope="module")
def dirty_file(dirty_legacy_template, tmp_path_factory) -> Path:
    return copy_of(dirty_legacy_template, tmp_path_factory.mktemp("clean"))


def test_every_row_of_the_dirty_file_is_migrated_or_quarantined(dirty_file):
    c = Cleaner()
    with LegacySource(dirty_file) as src:
        build_context(src, c)
        for table in TARGETS:
            with src.snapshot():
                rows = src.rows(table)
                outs = (c.clean_identities(rows) if table == "agent_metadata" else c.clean_many(table, rows))
            assert len(outs) == src.execute(f"SELECT count(*) FROM {table}")[0][0]
            for o in outs:
                assert o.ok == (o.values is not None)
                assert o.ok or (o.reason and o.kind), o
                if o.ok:
                    assert len(o.values) == len(TARGETS[table].columns)
                for r in o.repairs:
                    assert r.problem and r.encoding in ("text", "json", "hex", "null")


def test_clean_rows_come_out_as_the_sqlite_backend_reads_them(dirty_file):
    c = Cleaner()
    with LegacySource(dirty_file) as src:
        build_context(src, c)
        for o in c.clean_identities(src.rows("agent_metadata")):
            if not o.ok or o.repairs:
                continue
            rec = legacy.identity(o.row | {"agent_id": o.key[0]})
            assert (o.value("status"), o.value("created_at"), o.value("updated_at"), tuple(o.value("tags")),
                    o.value("notes"), json.loads(o.value("metadata"))) == (
                rec.status, rec.created_at, rec.updated_at, rec.tags, rec.notes, rec.metadata)
        for o in c.clean_many("audit_events", src.rows("audit_events")):
            if o.ok and not o.repairs:
                rec = legacy.audit_event(o.row)
                assert (o.value("event_id"), o.value("ts"), o.value("confidence"), json.loads(o.value("details")),
                        o.value("raw_hash")) == (rec.event_id, rec.timestamp, rec.confidence, rec.details,
                                                 rec.raw_hash)


def test_non_wal_source_is_read_in_short_transactions_and_left_as_it_is(tmp_path):
    conn = _legacy_file(tmp_path / "g.db")
    conn.execute("PRAGMA journal_mode=DELETE")
    with conn:
        conn.executemany("INSERT INTO agent_metadata (agent_id, api_key, created_at) VALUES (?, 'k', ?)",
                         [(f"a{i:03d}", T0) for i in range(25)])
    with LegacySource(tmp_path / "g.db") as src:
        assert not src.wal
        seen = []
        for batch in src.batches("agent_metadata", None, 10):
            seen += [r["agent_id"] for r in batch]
            # Between batches no lock is held: a writer commits at once.
            writer = sqlite3.connect(tmp_path / "g.db", timeout=0)
            with writer:
                writer.execute("INSERT INTO agent_metadata (agent_id, api_key, created_at) VALUES (?, 'k', ?)",
                               (f"z-{len(seen)}", T0))
            writer.close()
        assert seen[:25] == [f"a{i:03d}" for i in range(25)]
        assert src.batches("agent_metadata", ("a009",), 100).__next__()[0]["agent_id"] == "a010"
    assert sqlite3.connect(tmp_path / "g.db").execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_wal_source_reads_one_snapshot_while_writers_go_on(tmp_path):
    conn = _legacy_file(tmp_path / "g.db")
    with conn:
        conn.executemany("INSERT INTO agent_metadata (agent_id, api_key, created_at) VALUES (?, 'k', ?)",
                         [(f"a{i:03d}", T0) for i in range(25)])
    with LegacySource(tmp_path / "g.db") as src:
        with src.snapshot():
            n = 0
            for batch in src.batches("agent_metadata", None, 5):
                n += len(batch)
                with conn:  # BEGIN IMMEDIATE-style writes succeed at once under the read
                    conn.execute("INSERT INTO agent_metadata (agent_id, api_key, created_at) VALUES (?, 'k', ?)",
                                 (f"b{n:03d}", T0))
            assert n == 25  # the snapshot does not see rows written meanwhile
    conn.close()
    assert Cleaner().clean("agent_state", state(recorded_at=(datetime(2025, 1, 1, tzinfo=UTC)
                                                             + timedelta(days=1)).isoformat())).ok
