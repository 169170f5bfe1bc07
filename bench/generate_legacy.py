"""Generate a legacy-layout governance.db of any size, optionally with the
dirty rows that long-lived files hold (../shared/spec/legacy-governance-db.md).

    python bench/generate_legacy.py OUT.db --scale 1.0 --dirty

Scale 1.0 is the reference file of the migration issue: 1 M audit events,
0.5 M tool usage rows, 50 k agent states, 50 k discoveries, 150 k edges,
75 k tags. The output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

LEGACY_SQL = Path(__file__).resolve().parent.parent / "src" / "govdb" / "sql" / "sqlite_legacy.sql"
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
REGIMES = ["nominal", "warning", "critical", "recovery", "EXPLORATION", "CONVERGENCE", "DIVERGENCE", "STABLE"]
ODD_IDS = [
    "odd-'quote'", 'odd-"dq"', "odd-$$dollar$$", "odd-\\back\\slash", "odd;semi;colon",
    "odd'}) MATCH (n) DETACH DELETE n //", "odd'); DROP TABLE core.identities; --",
    "агент-кириллица", "エージェント", "وكيل",
]


def sizes(scale: float) -> dict[str, int]:
    def n(x: int) -> int:
        return max(1, int(x * scale))
    return {
        "agents": n(2_000), "sessions": n(5_000), "states": n(50_000), "events": n(1_000_000),
        "tool_usage": n(500_000), "discoveries": n(50_000), "edges": n(150_000), "tags": n(75_000),
        "dialectic": n(2_000), "messages_per_session": 3,
    }


def ts(i: int, step_s: float = 7.0) -> str:
    return (START + timedelta(seconds=i * step_s)).isoformat(timespec="microseconds")


def generate(path: Path, *, scale: float = 0.001, dirty: bool = False, seed: int = 7,
             discoveries: int | None = None) -> dict[str, int]:
    """Write a new legacy file at ``path``; return the row count per table.

    ``discoveries`` makes a knowledge-only file of that many discoveries
    (agents, discoveries, tags, edges, dialectic; no audit or usage rows),
    for graph benchmarks at a chosen size.
    """
    rnd = random.Random(seed)
    path = Path(path)
    if path.exists():
        path.unlink()
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SQL.read_text())
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    z = sizes(scale)
    if discoveries is not None:
        z = sizes(discoveries / 50_000) | {"sessions": 0, "states": 0, "events": 0, "tool_usage": 0}
    agents = [f"agent-{i:06d}" for i in range(z["agents"])]
    with conn:
        conn.executemany(
            "INSERT INTO agent_metadata (agent_id, api_key, created_at, updated_at, status, parent_agent_id,"
            " spawn_reason, tags_json, lifecycle_events_json, metadata_json) VALUES (?,?,?,?,?,?,?,?,?,?)",
            ((a, f"raw-key-{rnd.getrandbits(64):016x}", ts(i, 60), ts(i, 61), "active",
              agents[i // 2] if i > 1 else None, "spawned" if i > 1 else None,
              json.dumps(["team-" + str(i % 7)]), "[]", json.dumps({"model": "m" + str(i % 3)}))
             for i, a in enumerate(agents)))
        conn.executemany(
            "INSERT INTO session_identities VALUES (?,?,?,?,?,?,?,?,?)",
            ((f"sess-{i:07d}", agents[i % len(agents)], ts(i), ts(i + 5), ts(i + 50_000), i % 2, "cli",
              '{"v": "1"}', "{}") for i in range(z["sessions"])))
        conn.executemany(
            "INSERT INTO agent_state (agent_id, recorded_at, entropy, integrity, stability_index, volatility,"
            " regime, coherence, state_json) VALUES (?,?,?,?,?,?,?,?,?)",
            _states(rnd, agents, z["states"]))
        conn.executemany(
            "INSERT INTO audit_events (timestamp, event_id, agent_id, session_id, event_type, confidence,"
            " details_json, raw_hash) VALUES (?,?,?,?,?,?,?,?)",
            ((ts(i, 2.5), str(uuid.UUID(int=rnd.getrandbits(128), version=4)), agents[i % len(agents)],
              f"sess-{i % z['sessions']:07d}", ("checkin", "pause", "resume", "dispute")[i % 4],
              round(rnd.random(), 3), json.dumps({"i": i, "note": "routine check " + str(i % 97)}),
              f"h{i:012d}") for i in range(z["events"])))
        conn.executemany(
            "INSERT INTO tool_usage (timestamp, usage_id, agent_id, session_id, tool_name, latency_ms, success,"
            " error_type, payload_json) VALUES (?,?,?,?,?,?,?,?,?)",
            ((ts(i, 5), str(uuid.UUID(int=rnd.getrandbits(128), version=4)), agents[i % len(agents)],
              f"sess-{i % z['sessions']:07d}", ("search", "store", "checkin", "review")[i % 4], rnd.randint(1, 900),
              0 if i % 50 == 0 else 1, "Timeout" if i % 50 == 0 else None, json.dumps({"n": i % 10}))
             for i in range(z["tool_usage"])))
        conn.execute("INSERT INTO calibration_state VALUES (1, ?, 3, ?)",
                     (ts(0), json.dumps({"bins": [0.1, 0.5, 0.9], "counts": [3, 5, 8]})))
        discoveries = [f"disc-{i:07d}" for i in range(z["discoveries"])]
        conn.executemany(
            "INSERT INTO discoveries (id, agent_id, type, severity, status, created_at, updated_at, summary,"
            " details, related_files, confidence) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            ((d, agents[i % len(agents)], ("insight", "question", "answer", "bug")[i % 4],
              ("low", "medium", "high", "critical")[i % 4], "open" if i % 5 else "resolved", ts(i, 30), ts(i, 31),
              f"Summary {i} about cache entropy", f"Details of discovery {i}", json.dumps([f"src/f{i % 40}.py"]),
              round(rnd.random(), 2)) for i, d in enumerate(discoveries)))
        tag_rows = set()
        while len(tag_rows) < min(z["tags"], len(discoveries) * 8):
            tag_rows.add((discoveries[rnd.randrange(len(discoveries))], f"tag-{rnd.randrange(500)}"))
        conn.executemany("INSERT INTO discovery_tags VALUES (?,?)", sorted(tag_rows))
        edge_rows = {}
        while len(edge_rows) < min(z["edges"], len(discoveries) * (len(discoveries) - 1)):
            a, b = rnd.randrange(len(discoveries)), rnd.randrange(len(discoveries))
            if a == b:
                continue
            kind = "response_to" if rnd.random() < 0.4 else "related_to"
            edge_rows[(discoveries[a], discoveries[b], kind)] = (
                rnd.choice(["extend", "question", "disagree", "support"]) if kind == "response_to" else None)
        conn.executemany(
            "INSERT INTO discovery_edges VALUES (?,?,?,?,?,?,?,?)",
            ((s, d, k, r, 1.0, ts(i, 40), agents[i % len(agents)], "{}")
             for i, ((s, d, k), r) in enumerate(sorted(edge_rows.items()))))
        _dialectic(conn, agents, discoveries, z)
        if dirty:
            add_dirty_rows(conn)
    conn.close()
    return count_rows(path)


def _states(rnd: random.Random, agents: list[str], n: int):
    for i in range(n):
        e, integ, s, v, c = (round(rnd.random(), 4), round(rnd.random(), 4), round(0.001 + rnd.random() * 1.9, 4),
                             round(rnd.uniform(-2, 2), 4), round(rnd.random(), 4))
        regime = REGIMES[i % len(REGIMES)]
        yield (agents[i % len(agents)], ts(i, 11), s, integ, round(rnd.random(), 3), v, regime, c,
               json.dumps({"E": e, "I": integ, "S": s, "V": v, "coherence": c, "lambda1": 0.1,
                           "regime": regime, "history": [e, integ]}))


def _dialectic(conn: sqlite3.Connection, agents: list[str], discoveries: list[str], z: dict[str, int]) -> None:
    rows, msgs = [], []
    for i in range(z["dialectic"]):
        sid = f"dialectic-{i:06d}"
        paused, reviewer = agents[i % len(agents)], agents[(i + 1) % len(agents)]
        done = i % 3 == 0
        rows.append((sid, paused, reviewer, "resolved" if done else "antithesis", "resolved" if done else "active",
                     ts(i, 90), ts(i, 91), "drift", discoveries[i % len(discoveries)], None, "review", "entropy",
                     3, 1 if done else 0, json.dumps({"E": 0.4}), json.dumps({"action": "resume"}) if done else None))
        for k, kind in enumerate(("thesis", "antithesis", "synthesis")[: z["messages_per_session"]]):
            msgs.append((sid, paused if k != 1 else reviewer, kind, ts(i * 3 + k, 30), "cause", '["slow down"]',
                         "because", '{"S": 1.1}', '["risk"]', 1 if k == 2 else 0, None))
    conn.executemany("INSERT INTO dialectic_sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.executemany(
        "INSERT INTO dialectic_messages (session_id, agent_id, message_type, timestamp, root_cause,"
        " proposed_conditions_json, reasoning, observed_metrics_json, concerns_json, agrees, signature)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)", msgs)


def add_dirty_rows(conn: sqlite3.Connection) -> None:
    """Add one row for each dirty case of the legacy doc (ids start with ``dirty-``)."""
    bad_utf8 = "CAST(x'6e6f742d75746638ff' AS TEXT)"  # 'not-utf8' + 0xff
    x = conn.execute
    # Timestamps in every format seen in the field, plus garbage and empty.
    for n, stamp in enumerate(["2025-11-26T01:15:29.222120", "2025-11-26 01:15:29", "2025-11-26T01:15:29Z",
                               "2025-11-26T01:15:29+00:00", "2025-11-26T01:15:29-07:00", "1764119729",
                               "not a time", "", "2999-12-31T23:59:59", "1901-01-01 00:00:00"]):
        x("INSERT INTO agent_metadata (agent_id, api_key, created_at, status) VALUES (?,?,?, 'active')",
          (f"dirty-ts-{n}", f"raw-dirty-{n}", stamp))
        x("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash) VALUES (?,?,?,?,?)",
          (stamp, str(uuid.uuid5(uuid.NAMESPACE_URL, f"dirty-ts-{n}")), "dirty_ts", "{}", f"dirty-ts-{n}"))
    # JSON columns: invalid, null, and \u0000 (PostgreSQL's jsonb refuses it).
    for n, doc in enumerate(["{not json", "null", '{"a": "x\\u0000y"}', "[1, 2", '"just a string"']):
        x("INSERT INTO agent_metadata (agent_id, api_key, created_at, metadata_json, tags_json) VALUES (?,?,?,?,?)",
          (f"dirty-json-{n}", "k", ts(n), doc, doc))
        x("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash) VALUES (?,?,?,?,?)",
          (ts(n), None, "dirty_json", doc, f"dirty-json-{n}"))
    # Raw NUL in text, and bytes that are not UTF-8.
    x("INSERT INTO discoveries (id, agent_id, type, created_at, summary) VALUES (?,?,?,?,?)",
      ("dirty-nul", "agent-000000", "bug", ts(1), "before\x00after"))
    x(f"INSERT INTO discoveries (id, agent_id, type, created_at, summary) VALUES ('dirty-utf8', 'agent-000000',"
      f" 'bug', '{ts(2)}', {bad_utf8})")
    x(f"INSERT INTO tool_usage (timestamp, tool_name, success, payload_json) VALUES ('{ts(3)}', {bad_utf8}, 1, '{{}}')")
    # event_id / usage_id missing or not UUIDs.
    for n, eid in enumerate([None, "", "not-a-uuid", "12345"]):
        x("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash) VALUES (?,?,?,?,?)",
          (ts(n), eid, "dirty_id", "{}", f"dirty-id-{n}"))
        x("INSERT INTO tool_usage (timestamp, usage_id, tool_name, success) VALUES (?,?,?,1)", (ts(n), eid, "dirty_id"))
    # NaN / Infinity / out of range, unknown regime/status, success not 0/1.
    for n, (s, v, regime) in enumerate([("NaN", 0.1, "nominal"), (float("inf"), 0.1, "nominal"),
                                        (0.5, float("-inf"), "nominal"), (5.0, 0.1, "nominal"),
                                        (0.5, -3.0, "nominal"), (0.5, 0.1, "PANIC"), (None, None, None)]):
        x("INSERT INTO agent_state (agent_id, recorded_at, entropy, integrity, volatility, regime, coherence,"
          " state_json) VALUES ('agent-000000', ?, ?, 0.5, ?, ?, 0.5, ?)",
          (ts(n), s, v, regime, json.dumps({"E": 0.5, "note": f"dirty-state-{n}"})))
    x("INSERT INTO agent_metadata (agent_id, api_key, created_at, status) VALUES ('dirty-status', 'k', ?, 'zombie')",
      (ts(0),))
    for n, ok in enumerate([2, -1, "yes"]):
        x("INSERT INTO tool_usage (timestamp, usage_id, tool_name, success) VALUES (?,?,?,?)",
          (ts(n), str(uuid.uuid5(uuid.NAMESPACE_URL, f"dirty-success-{n}")), "dirty_success", ok))
    # Orphans and lineage cycles.
    x("INSERT INTO session_identities VALUES ('dirty-orphan-session', 'ghost-agent', ?, ?, ?, 1, NULL, NULL, NULL)",
      (ts(0), ts(1), ts(2)))
    x("INSERT INTO agent_state (agent_id, recorded_at, entropy, integrity, volatility, state_json)"
      " VALUES ('ghost-agent', ?, 0.5, 0.5, 0.1, '{\"E\": 0.5}')", (ts(0),))
    x("INSERT INTO discovery_tags VALUES ('ghost-discovery', 'orphan-tag')")
    x("INSERT INTO discovery_edges VALUES ('ghost-discovery', 'disc-0000000', 'related_to', NULL, 1.0, ?, NULL, '{}')",
      (ts(0),))
    x("INSERT INTO dialectic_messages (session_id, agent_id, message_type, timestamp) VALUES"
      " ('ghost-session', 'agent-000000', 'thesis', ?)", (ts(0),))
    x("INSERT INTO agent_metadata (agent_id, api_key, created_at, parent_agent_id) VALUES"
      " ('dirty-orphan-parent', 'k', ?, 'ghost-parent')", (ts(0),))
    x("INSERT INTO agent_metadata (agent_id, api_key, created_at, parent_agent_id) VALUES ('dirty-cycle-a', 'k', ?, 'dirty-cycle-b')", (ts(0),))
    x("INSERT INTO agent_metadata (agent_id, api_key, created_at, parent_agent_id) VALUES ('dirty-cycle-b', 'k', ?, 'dirty-cycle-a')", (ts(0),))
    # Ids, tags and texts with quotes, $$, backslashes, Cypher / SQL fragments, other scripts.
    for n, odd in enumerate(ODD_IDS):
        x("INSERT INTO agent_metadata (agent_id, api_key, created_at, tags_json) VALUES (?,?,?,?)",
          (odd, "k", ts(n), json.dumps([odd])))
        x("INSERT INTO discoveries (id, agent_id, type, created_at, summary, details) VALUES (?,?,?,?,?,?)",
          (odd, odd, "insight", ts(n), f"summary {odd}", odd))
        x("INSERT INTO discovery_tags VALUES (?,?)", (odd, odd))
    x("INSERT INTO discovery_edges VALUES (?,?,?,?,?,?,?,?)",
      (ODD_IDS[0], ODD_IDS[1], "response_to", "question", 1.0, ts(0), ODD_IDS[2], "{}"))
    # Very large payloads and far timestamps.
    x("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash) VALUES (?,?,?,?,?)",
      ("2999-01-01T00:00:00Z", str(uuid.uuid5(uuid.NAMESPACE_URL, "dirty-big")), "dirty_big",
       json.dumps({"blob": "x" * 3_000_000}), "dirty-big"))
    x("INSERT INTO audit_events (timestamp, event_id, event_type, details_json, raw_hash) VALUES (?,?,?,?,?)",
      ("1970-01-02T00:00:00Z", str(uuid.uuid5(uuid.NAMESPACE_URL, "dirty-old")), "dirty_old", "{}", "dirty-old"))


def count_rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the SQLite file to write (replaced if it exists)")
    ap.add_argument("--scale", type=float, default=0.001, help="1.0 = the 1.83 M-row reference file")
    ap.add_argument("--dirty", action="store_true", help="add one row of every dirty case")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--discoveries", type=int, default=None,
                    help="a knowledge-only file with this many discoveries (ignores --scale)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts = generate(args.out, scale=args.scale, dirty=args.dirty, seed=args.seed, discoveries=args.discoveries)
    print(json.dumps({"file": str(args.out), "seconds": round(time.perf_counter() - t0, 2), "rows": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
