"""The AGE graph built two ways: the direct bulk load (govdb.migrate.graph.load_graph)
and the psql script (export_sql / scripts/age/export_knowledge_sqlite_to_age.py).

PostgreSQL + AGE only: the graph exists nowhere else. Each test makes its
own databases and drops them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path

import asyncpg
import pytest

from conftest import copy_of, postgres_required, with_database
from govdb.backends import age
from govdb.backends.postgres import PostgresDatabase
from govdb.config import SecretUrl
from govdb.errors import GovdbError, SchemaError
from govdb.migrate import MigrationError
from govdb.migrate.graph import (
    EDGE_KINDS, NODE_PROPS, GraphRows, cypher_literal, dollar_quote, expected_counts, export_sql,
    graph_counts, load_graph, load_graph_per_statement, read_legacy_graph, render_sql,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "age" / "export_knowledge_sqlite_to_age.py"
#: Ids and tags an old file may hold: quotes, dollar quotes (and this
#: exporter's own tag), backslashes, semicolons, Cypher and SQL fragments,
#: psql meta-commands and variables, control characters, other scripts.
ODD = [
    "odd-'quote'", 'odd-"dq"', "odd-$$dollar$$", "odd-$cypher$ tag $cypher$", "odd-\\back\\slash\\",
    "odd;semi;colon", "odd'}) MATCH (n) DETACH DELETE n //", "odd'); DROP TABLE core.identities; --",
    "odd$$); DROP TABLE core.identities; --", "line\nbreak\r\ttab", "ctl-\x01\x1f\x7f\x85",
    "\\u0041 not an escape \\n", ":psqlvar :'x' :\"y\"", "\\g \\! echo pwned", "агент-кириллица", "エージェント",
    "وكيل", "emoji-🙂-𝄞", "trailing-$", "$leading", "  spaced  ", "sep\u2028\u2029", "{id: 'x'}",
]


# -- quoting (no database) ----------------------------------------------------------

def _unquote_cypher(text: str) -> str:
    """Read back a Cypher string literal the way AGE's scanner does."""
    assert text[0] == text[-1] == "'"
    return json.loads('"' + text[1:-1].replace("\\'", "'") + '"')


@pytest.mark.parametrize("value", ODD)
def test_cypher_literal_escapes_everything_and_has_no_dollar(value):
    lit = cypher_literal(value)
    assert "$" not in lit and "\n" not in lit and "\r" not in lit
    assert _unquote_cypher(lit) == value


def test_cypher_literal_types():
    assert cypher_literal(None) == "null"
    assert cypher_literal(True) == "true"
    assert cypher_literal(7) == "7"
    assert cypher_literal(1.0) == "1.0"  # AGE types a bare 1 as an integer
    assert cypher_literal(1e20) == "1e+20"
    assert cypher_literal(-0.25) == "-0.25"
    assert cypher_literal({"id": "a", "n": [1, 2.5]}) == "{id: 'a', n: [1, 2.5]}"
    for bad in (float("nan"), float("inf"), "nul\x00", "lone\udc80", {"bad key": 1}, {1: 2}, object()):
        with pytest.raises(ValueError):
            cypher_literal(bad)


def test_dollar_quote_refuses_its_own_tag():
    assert dollar_quote("RETURN 1") == "$cypher$ RETURN 1 $cypher$"
    with pytest.raises(ValueError):
        dollar_quote("x $cypher$ y")


def _odd_rows() -> GraphRows:
    rows = GraphRows()
    rows.nodes["Agent"] = [(o, "active", "2025-01-01T00:00:00.000000+00:00") for o in ODD]
    rows.nodes["Discovery"] = [(o, "insight", "open", "2025-01-01T00:00:00.000000+00:00") for o in ODD]
    rows.nodes["Tag"] = [(o,) for o in ODD]
    rows.edges["HAS_TAG", "Discovery", "Tag"] = [(o, o) for o in ODD]
    rows.edges["RELATED_TO", "Discovery", "Discovery"] = [(a, b, None, 1.0, "x") for a, b in zip(ODD, ODD[1:])]
    return rows


@pytest.mark.parametrize("mode", ["merge", "create"])
def test_sql_file_has_values_only_inside_dollar_quotes(mode):
    text = "".join(render_sql(_odd_rows(), "governance", mode))
    outside = re.sub(r"\$cypher\$.*?\$cypher\$", "", text, flags=re.S)
    for fragment in ("DROP TABLE", "DETACH", "psqlvar", "pwned", "кириллица", "odd-"):
        assert fragment not in outside
    assert text.startswith("-- govdb AGE graph export")
    assert "\\set ON_ERROR_STOP on" in text and "BEGIN;" in text and "COMMIT;" in text
    # create_graph is not idempotent: the file guards it.
    assert "IF NOT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = 'governance')" in text
    assert ("OPTIONAL MATCH" in text and "AS x WHERE x.start_id" in text) is (mode == "merge")


def test_render_sql_refuses_bad_graph_and_mode():
    with pytest.raises(MigrationError):
        list(render_sql(GraphRows(), "bad-name"))
    with pytest.raises(MigrationError):
        list(render_sql(GraphRows(), "governance", "upsert"))


# -- helpers for the database tests -------------------------------------------------------

def _psql() -> str:
    for cand in (os.environ.get("GOVDB_PSQL"), shutil.which("psql"), "/usr/lib/postgresql/17/bin/psql"):
        if cand and Path(cand).exists():
            return cand
    if postgres_required():
        pytest.fail("no psql client found (set GOVDB_PSQL)")
    pytest.skip("no psql client found (set GOVDB_PSQL)")


def apply_sql(url: str, path: Path) -> str:
    res = subprocess.run([_psql(), "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
async def make_db(pg_server):
    """Return a factory of fresh databases (from a conftest template, or empty); drops them after."""
    made: list[str] = []

    async def make(template: str | None = None) -> str:
        name = f"graph_t_{uuid.uuid4().hex[:12]}"
        conn = await pg_server.admin()
        try:
            tpl = f' TEMPLATE "{pg_server.templates[template]}"' if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{tpl}')
        finally:
            await conn.close()
        made.append(name)
        return with_database(pg_server.url, name)

    yield make
    for name in made:
        await pg_server.drop_database(name)


def backend(url: str, *, graph_on: bool) -> PostgresDatabase:
    return PostgresDatabase(SecretUrl(url), graph="governance", min_conn=1, max_conn=2, age_enabled=graph_on)


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS age")
    await age.load_age(conn)
    await conn.execute(f"SET search_path = {age.SEARCH_PATH}")
    return conn


async def dump_graph(conn: asyncpg.Connection, graph: str) -> tuple[list, list]:
    """Return every node (label, properties) and edge (label, start, end, properties), sorted.

    Properties as canonical JSON, so 1.0 and 1 differ as they do in agtype.
    """
    keys, nodes, edges = {}, [], []
    for label, props in NODE_PROPS.items():
        for r in await conn.fetch(f'SELECT id, properties FROM ONLY "{graph}"."{label}"'):
            keys[r["id"]] = (label, r["properties"].get(props[0]))
            nodes.append((label, json.dumps(r["properties"], sort_keys=True, ensure_ascii=False)))
    for label in age.EDGE_LABELS:
        for r in await conn.fetch(f'SELECT start_id, end_id, properties FROM ONLY "{graph}"."{label}"'):
            edges.append((label, keys[r["start_id"]], keys[r["end_id"]],
                          json.dumps(r["properties"], sort_keys=True, ensure_ascii=False)))
    return sorted(nodes), sorted(edges, key=repr)


async def database_with_odd_data(make_db, *, graph_on: bool) -> str:
    """Return the URL of a fresh database holding :func:`write_odd_data`'s rows, written with
    the live graph on (the graph mirrors them) or off (tables only)."""
    url = await make_db("postgres" if graph_on else "postgres-noage")
    db = backend(url, graph_on=graph_on)
    await db.connect()
    try:
        await write_odd_data(db)
    finally:
        await db.close()
    return url


async def write_odd_data(db: PostgresDatabase) -> None:
    """Agents, discoveries, tags, links and a dialectic session keyed by the odd ids."""
    await db.create_identity("root", api_key="k", tags=["shared", ODD[0]])
    for i, o in enumerate(ODD):
        await db.create_identity(o, api_key="k", parent_agent_id="root" if i % 2 else None, tags=[o, "shared"])
        await db.add_discovery(o, agent_id=o, type="insight", summary="s", tags=[o, "shared"])
    for i, (a, b) in enumerate(zip(ODD, ODD[1:])):
        if i % 2:
            await db.link_discoveries(a, b, edge_type="response_to", response_type="question", weight=1.0)
        else:
            await db.link_discoveries(a, b, weight=0.1 * i if i else None)
    await db.create_dialectic_session(ODD[2], paused_agent_id=ODD[0], reviewer_agent_id=ODD[1], discovery_id=ODD[3])
    await db.add_dialectic_message(ODD[2], agent_id=ODD[0], message_type="thesis")
    await db.add_dialectic_message(ODD[2], agent_id=ODD[1], message_type="antithesis")
    await db.create_dialectic_session(ODD[4], paused_agent_id=ODD[5])
    await db.update_identity_status(ODD[6], "paused")
    await db.update_discovery_status(ODD[7], "resolved")


def write_odd_legacy(path: Path) -> None:
    """The same odd ids in a legacy governance.db."""
    conn = sqlite3.connect(path)
    conn.executescript(resources.files("govdb").joinpath("sql", "sqlite_legacy.sql").read_text("utf-8"))
    ts = "2025-01-01T00:00:00.000000+00:00"
    with conn:
        conn.execute("INSERT INTO agent_metadata (agent_id, api_key, created_at, tags_json) VALUES ('root', 'k', ?, ?)",
                     (ts, json.dumps(["shared", ODD[0]])))
        for i, o in enumerate(ODD):
            conn.execute("INSERT INTO agent_metadata (agent_id, api_key, created_at, parent_agent_id, tags_json)"
                         " VALUES (?, 'k', ?, ?, ?)", (o, ts, "root" if i % 2 else None, json.dumps([o, "shared"])))
            conn.execute("INSERT INTO discoveries (id, agent_id, type, created_at, summary)"
                         " VALUES (?, ?, 'insight', ?, 's')", (o, o, ts))
            conn.executemany("INSERT INTO discovery_tags VALUES (?, ?)", [(o, o), (o, "shared")])
        for i, (a, b) in enumerate(zip(ODD, ODD[1:])):
            conn.execute("INSERT INTO discovery_edges (src_id, dst_id, edge_type, response_type, weight, created_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (a, b, *(("response_to", "question") if i % 2 else ("related_to", None)), 1.0, ts))
        conn.execute("INSERT INTO dialectic_sessions (session_id, paused_agent_id, reviewer_agent_id, created_at)"
                     " VALUES (?, ?, ?, ?)", (ODD[2], ODD[0], ODD[1], ts))
        conn.execute("INSERT INTO dialectic_messages (session_id, agent_id, message_type, timestamp)"
                     " VALUES (?, ?, 'thesis', ?)", (ODD[2], ODD[0], ts))
    conn.close()


async def read_back(conn: asyncpg.Connection, graph: str) -> dict[str, set]:
    """Read ids and relations back with Cypher."""
    async def q(query: str, cols: tuple[str, ...]) -> set:
        return {r if len(r) > 1 else r[0] for r in await age.cypher(conn, graph, query, columns=cols)}
    return {
        "agents": await q("MATCH (a:Agent) RETURN a.id", ("id",)),
        "discoveries": await q("MATCH (d:Discovery) RETURN d.id", ("id",)),
        "tags": await q("MATCH (t:Tag) RETURN t.name", ("name",)),
        "tagged": await q("MATCH (d:Discovery)-[:HAS_TAG]->(t:Tag) RETURN d.id, t.name", ("d", "t")),
        "agent_tags": await q("MATCH (a:Agent)-[:HAS_TAG]->(t:Tag) RETURN a.id, t.name", ("a", "t")),
        "spawned": await q("MATCH (p:Agent)-[:SPAWNED]->(c:Agent) RETURN p.id, c.id", ("p", "c")),
        "links": await q("MATCH (a:Discovery)-[e]->(b:Discovery) RETURN a.id, b.id", ("a", "b")),
        "paused": await q("MATCH (s:DialecticSession)-[:PAUSED_AGENT]->(a:Agent) RETURN s.id, a.id", ("s", "a")),
        "reviewer": await q("MATCH (s:DialecticSession)-[:REVIEWER]->(a:Agent) RETURN s.id, a.id", ("s", "a")),
        "wrote": await q("MATCH (a:Agent)-[:WROTE]->(m:DialecticMessage) RETURN a.id", ("a",)),
    }


def _expected_odd() -> dict[str, set]:
    return {
        "agents": {"root", *ODD}, "discoveries": set(ODD), "tags": {"shared", *ODD},
        "tagged": {(o, o) for o in ODD} | {(o, "shared") for o in ODD},
        "agent_tags": {(o, o) for o in ODD} | {(o, "shared") for o in ODD} | {("root", "shared"), ("root", ODD[0])},
        "spawned": {("root", o) for i, o in enumerate(ODD) if i % 2},
        "links": set(zip(ODD, ODD[1:])),
        "paused": {(ODD[2], ODD[0])}, "reviewer": {(ODD[2], ODD[1])}, "wrote": {ODD[0]},
    }


def _subset(got: dict[str, set], want: dict[str, set]) -> None:
    for name, values in want.items():
        assert values <= got[name], (name, values - got[name])


# -- the direct bulk load -----------------------------------------------------------------

@pytest.mark.backends("postgres")
async def test_bulk_load_is_identical_to_live_writes(config, make_db):
    url = await database_with_odd_data(make_db, graph_on=True)
    conn = await connect(url)
    try:
        added = await load_graph(conn, "govcopy")
        assert sum(added.values()) > 0
        live, copy = await dump_graph(conn, "governance"), await dump_graph(conn, "govcopy")
        assert copy == live  # labels, directions, properties and value types (weight 1.0 stays a float)
        assert await graph_counts(conn, "govcopy") == await expected_counts(conn)
        # Next to the live graph: nothing is missing, nothing is added.
        assert set((await load_graph(conn, "governance")).values()) == {0}
        assert await dump_graph(conn, "governance") == live
        # Only what is missing is added back.
        await age.cypher(conn, "governance", "MATCH (t:Tag {name: $n}) DETACH DELETE t", {"n": ODD[3]})
        await age.cypher(conn, "governance", "MATCH (:Discovery)-[e:RESPONSE_TO]->(:Discovery) DELETE e")
        await age.cypher(conn, "governance", "MATCH (m:DialecticMessage) DETACH DELETE m")
        added = await load_graph(conn, "governance")
        assert added["Tag"] == 1 and added["DialecticMessage"] == 2 and added["Agent"] == 0
        assert added["HAS_TAG"] == 2 and added["WROTE"] == 2 and added["RESPONSE_TO"] > 0
        assert await dump_graph(conn, "governance") == live
    finally:
        await conn.close()


@pytest.mark.backends("postgres")
async def test_bulk_load_during_live_writes_duplicates_nothing(config, make_db):
    url = await make_db("postgres")
    db = backend(url, graph_on=True)
    await db.connect()
    try:
        await write_odd_data(db)

        async def writer(n: int) -> None:
            for k in range(15):
                did = f"live-{n}-{k}"
                await db.add_discovery(did, agent_id=ODD[n], type="insight", summary="s",
                                       tags=["shared", ODD[(n + k) % len(ODD)], f"new-{k}"])
                await db.link_discoveries(did, ODD[k % len(ODD)], edge_type="response_to", response_type="extend")

        await asyncio.gather(writer(0), writer(1), load_graph(url, "governance"), load_graph(url, "governance"))
    finally:
        await db.close()
    conn = await connect(url)
    try:
        await load_graph(conn, "governance")
        nodes, edges = await dump_graph(conn, "governance")
        assert len(set(nodes)) == len(nodes) and len({e[:3] for e in edges}) == len(edges)
        assert await graph_counts(conn, "governance") == await expected_counts(conn)
    finally:
        await conn.close()


@pytest.mark.backends("postgres")
async def test_bulk_load_is_idempotent_and_matches_per_statement_load(config, make_db):
    url = await database_with_odd_data(make_db, graph_on=True)
    conn = await connect(url)
    try:
        await load_graph(conn, "govbulk")
        first = await dump_graph(conn, "govbulk")
        assert set((await load_graph(conn, "govbulk")).values()) == {0}
        assert await dump_graph(conn, "govbulk") == first
        await load_graph_per_statement(conn, "govper")
        assert await dump_graph(conn, "govper") == first
    finally:
        await conn.close()


@pytest.mark.backends("postgres")
async def test_bulk_load_then_live_writes_share_the_graph(config, make_db):
    """Rows written with the graph off, bulk-loaded; then the live backend writes into that graph."""
    url = await database_with_odd_data(make_db, graph_on=False)
    added = await load_graph(url, "governance")  # creates extension, graph, labels, indexes
    assert added["Agent"] == len(ODD) + 1 and added["HAS_TAG"] > 0
    db = backend(url, graph_on=True)
    await db.connect()
    try:
        assert db.supports_graph
        # Live writes MERGE the bulk-loaded Tag nodes (unique index: a duplicate would fail).
        await db.create_identity("late", api_key="k", parent_agent_id=ODD[1], tags=[ODD[3], "shared"])
        await db.add_discovery("late-d", agent_id="late", type="insight", summary="s", tags=[ODD[4]])
        await db.link_discoveries("late-d", ODD[5], edge_type="response_to", response_type="support")
        lineage = await db.get_lineage("late")  # read through the bulk-loaded SPAWNED edges
        assert [i.agent_id for i in lineage] == ["late", ODD[1], "root"]
        neighbours = await db.get_neighbors(ODD[5])
        assert {n.discovery.id for n in neighbours} >= {"late-d", ODD[4], ODD[6]}
    finally:
        await db.close()
    conn = await connect(url)
    try:
        assert set((await load_graph(conn, "governance")).values()) == {0}
        assert await graph_counts(conn, "governance") == await expected_counts(conn)
        got = await read_back(conn, "governance")
        _subset(got, _expected_odd())
        assert ("late", ODD[3]) in got["agent_tags"] and (ODD[1], "late") in got["spawned"]
    finally:
        await conn.close()


@pytest.mark.backends("postgres")
async def test_injection_ids_round_trip_through_the_bulk_load(config, make_db):
    url = await database_with_odd_data(make_db, graph_on=False)
    await load_graph(SecretUrl(url), "governance")
    conn = await connect(url)
    try:
        got = await read_back(conn, "governance")
        want = _expected_odd()
        for name in ("agents", "discoveries", "tags", "tagged", "agent_tags", "spawned", "links"):
            assert got[name] == want[name], name
    finally:
        await conn.close()


async def test_bulk_load_errors_are_govdb_errors(pg_server, make_db):
    with pytest.raises(MigrationError):
        await load_graph(pg_server.url, "bad-name")
    with pytest.raises(SchemaError, match="backfill"):
        await load_graph(await make_db(None), "governance")
    with pytest.raises(GovdbError) as info:
        await load_graph(with_database(pg_server.url, f"graph_missing_{uuid.uuid4().hex[:8]}"), "governance")
    assert "graph_missing_" in str(info.value)


# -- the SQL file ----------------------------------------------------------------------------

@pytest.mark.backends("postgres")
async def test_injection_ids_round_trip_through_the_sql_file(config, make_db, tmp_path):
    legacy = tmp_path / "gov\nDROP SCHEMA core CASCADE; --$cypher$.db"  # the name lands in a comment
    write_odd_legacy(legacy)
    out = tmp_path / "graph.sql"
    counts = export_sql(legacy, out, "governance", "merge")
    assert not any(line.startswith("DROP") for line in out.read_text(encoding="utf-8").splitlines())
    assert counts["Agent"] == len(ODD) + 1
    url = await make_db(None)  # an empty database: the file sets up AGE and the graph itself
    apply_sql(url, out)
    conn = await connect(url)
    try:
        got = await read_back(conn, "governance")
        want = _expected_odd()
        for name in ("agents", "discoveries", "tags", "tagged", "agent_tags", "spawned", "links", "paused",
                     "reviewer", "wrote"):
            assert got[name] == want[name], name
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def dirty_legacy(dirty_legacy_template, tmp_path_factory) -> Path:
    return copy_of(dirty_legacy_template, tmp_path_factory.mktemp("graph"))


@pytest.mark.backends("postgres")
async def test_sql_file_applied_twice_equals_backfill_plus_bulk_load(config, make_db, dirty_legacy, tmp_path):
    from govdb.migrate.backfill import backfill

    url = await make_db("postgres")
    out = tmp_path / "graph.sql"
    counts = export_sql(dirty_legacy, out, "govfile", "merge")
    apply_sql(url, out)
    conn = await connect(url)
    try:
        first = await dump_graph(conn, "govfile")
        assert await graph_counts(conn, "govfile") == counts
        stdout = apply_sql(url, out)
        assert await dump_graph(conn, "govfile") == first  # nothing duplicated
        assert re.search(r"Discovery\s*\|\s*%d" % counts["Discovery"], stdout)
        # The other route, from the same file: backfill, then the bulk load.
        await backfill(url, dirty_legacy, progress=False)
        await load_graph(conn, "govload")
        assert await dump_graph(conn, "govload") == first
        assert await expected_counts(conn) == counts
    finally:
        await conn.close()


@pytest.mark.backends("postgres")
async def test_create_mode_fills_an_empty_graph_once(config, make_db, dirty_legacy, tmp_path):
    url = await make_db(None)
    merge, create = tmp_path / "merge.sql", tmp_path / "create.sql"
    export_sql(dirty_legacy, merge, "governance", "merge")
    export_sql(dirty_legacy, create, "governance", "create")
    apply_sql(url, create)
    conn = await connect(url)
    try:
        first = await dump_graph(conn, "governance")
        apply_sql(url, merge)  # merge over a created graph adds nothing
        assert await dump_graph(conn, "governance") == first
    finally:
        await conn.close()
    res = subprocess.run([_psql(), "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(create)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "duplicate key" in res.stderr  # create is for an empty graph: refused whole


def test_read_legacy_graph_follows_the_cleaning_rules(dirty_legacy):
    rows = read_legacy_graph(dirty_legacy)
    agents = {r[0] for r in rows.nodes["Agent"]}
    discoveries = {r[0] for r in rows.nodes["Discovery"]}
    assert "dirty-status" in agents and dict((r[0], r[1]) for r in rows.nodes["Agent"])["dirty-status"] == "paused"
    assert "ghost-discovery" not in discoveries and "dirty-nul" in discoveries
    assert not any(e[0] == "ghost-discovery" for e in rows.edges["HAS_TAG", "Discovery", "Tag"])
    # Every edge end is a node: nothing dangles.
    keys = {label: {r[0] for r in rows.nodes[label]} for label in NODE_PROPS}
    for (label, start, end), edges in rows.edges.items():
        for e in edges:
            assert e[0] in keys[start] and e[1] in keys[end], (label, e)
    # A lineage cycle is broken by the cleaner, so SPAWNED holds none.
    spawned = dict((c, p) for p, c in rows.edges["SPAWNED", "Agent", "Agent"])
    assert not ("dirty-cycle-a" in spawned and "dirty-cycle-b" in spawned)
    assert {k for k in rows.edges} == set(EDGE_KINDS)


# -- the script -------------------------------------------------------------------------------

def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_script_writes_the_file(dirty_legacy, tmp_path):
    out = tmp_path / "age_import.sql"
    res = run_script("--sqlite", str(dirty_legacy), "--out", str(out), "--mode", "merge", "--graph", "governance")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout
    assert out.read_text(encoding="utf-8").startswith("-- govdb AGE graph export (mode merge) into graph governance")


@pytest.mark.parametrize("args, message", [
    (["--sqlite", "{missing}", "--out", "{out}"], "does not exist"),
    (["--sqlite", "{garbage}", "--out", "{out}"], "is not a SQLite database"),
    (["--sqlite", "{legacy}", "--out", "{tmp}/no/such/dir/x.sql"], "does not exist"),
    (["--sqlite", "{legacy}", "--out", "{tmp}"], "is a directory"),
    (["--sqlite", "{legacy}", "--out", "{out}", "--graph", "no-dashes"], "graph name"),
    (["--sqlite", "{legacy}", "--out", "{out}", "--source-timezone", "Mars/Base"], "time zone"),
])
def test_script_bad_input_is_one_error_line(args, message, dirty_legacy, tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not sqlite")
    subst = {"missing": str(tmp_path / "missing.db"), "garbage": str(garbage), "legacy": str(dirty_legacy),
             "out": str(tmp_path / "x.sql"), "tmp": str(tmp_path)}
    res = run_script(*(a.format(**subst) for a in args))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.sql").exists()
