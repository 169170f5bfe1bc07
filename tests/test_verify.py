"""Verification of a migration: checksums per key range, bisection, and the
real thing (a generated dirty legacy file, backfilled into PostgreSQL, then
changed with SQL).

The range/checksum/bisect logic is tested on its own over canonical rows in
memory; everything else against real files and a real PostgreSQL (databases
prefixed ver_, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from conftest import copy_of, with_database
from govdb.config import SecretUrl, Settings
from govdb.migrate.backfill import backfill
from govdb.migrate.checksums import (
    NULL_SPAN, KeyRanges, MemorySide, NarrowStats, RowForm, add_row, canonical_text, compare_rows, finish, in_span,
    narrow, new_sums, row_hash,
)
from govdb.migrate.verify import verify
from govdb.migrate.verify_source import merge_scans, split_shares, split_spans

UTC = timezone.utc
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "verify_migration.py"


# -- the canonical form -----------------------------------------------------------

KINDS = {"id": "int8", "ts": "timestamptz", "doc": "jsonb", "x": "float8", "u": "uuid", "b": "bytea",
         "tags": "_text", "flag": "bool", "name": "text"}
COLUMNS = tuple(KINDS)


def form() -> RowForm:
    return RowForm("t", COLUMNS, KINDS, ("id",))


def test_one_canonical_text_for_both_representations_of_a_row():
    u = uuid.uuid4()
    # As the cleaner gives it: ts in another zone, JSON text as written, int in a float column, UUID text.
    source = [7, datetime(2025, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))), '{"b": [1, 2.5], "a": "é"}', 3,
              str(u).upper(), b"\x00\xff", ["x", "y"], True, "name"]
    # As asyncpg gives it: UTC datetime, jsonb text (other key order and spacing), float, UUID, bytes.
    target = [7, datetime(2025, 1, 1, 0, 0, tzinfo=UTC), '{"a": "\\u00e9", "b": [1, 2.5]}', 3.0, u,
              memoryview(b"\x00\xff"), ["x", "y"], True, "name"]
    f = form()
    a, b = canonical_text(f.normalise(source)), canonical_text(f.normalise(target))
    assert a == b
    assert "[7,1735689600000000," in a and '"00ff"' in a and ",3.0," in a  # UTC microseconds, bytes as hex
    assert row_hash(a) == row_hash(b) and 0 <= row_hash(a) < 2 ** 64


@pytest.mark.parametrize("column, other", [
    ("ts", datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),   # one microsecond
    ("doc", '{"a": "é", "b": [1, 2.5, null]}'),
    ("doc", '{"a": "é", "b": [1.0, 2.5]}'),                 # jsonb keeps 1 and 1.0 apart, so do we
    ("x", 3.0000000000000004),
    ("tags", ["y", "x"]),                                   # an identity's tags keep their order
    ("flag", False),
    ("name", "name "),
])
def test_any_change_of_a_value_changes_the_canonical_text(column, other):
    row = [7, datetime(2025, 1, 1, tzinfo=UTC), '{"a": "é", "b": [1, 2.5]}', 3.0, str(uuid.UUID(int=1)), b"",
           ["x", "y"], True, "name"]
    changed = list(row)
    changed[COLUMNS.index(column)] = other
    f = form()
    assert canonical_text(f.normalise(row)) != canonical_text(f.normalise(changed))


# -- key ranges and checksums ----------------------------------------------------------

def test_even_integer_ranges_agree_with_their_bounds():
    rnd = random.Random(3)
    for first, last, n in [(1, 10, 3), (1, 1, 5), (-50, 1000, 7), (5, 100_000, 100), (1, 2, 2)]:
        ranges = KeyRanges.even(first, last, n)
        plain = KeyRanges(ranges.bounds)  # the same bounds, found by bisection
        for k in [first - 3, first, last, last + 9, *(rnd.randint(first, last) for _ in range(200))]:
            i = ranges.index((k,))
            assert i == plain.index((k,)) and 0 <= i < ranges.null
            assert in_span((k,), ranges.span(i))
        assert ranges.index((None,)) == ranges.null and ranges.span(ranges.null) == NULL_SPAN


def test_text_ranges_cover_every_key_once():
    keys = sorted({(f"d-{random.Random(i).random():.6f}", f"tag-{i % 7}") for i in range(500)})
    ranges = KeyRanges.from_keys(keys, 40)
    assert len(ranges.bounds) == 12
    for k in [*keys, ("",), ("zzz", "a"), ("агент", "é")]:
        spans = [i for i in range(ranges.null) if in_span(k, ranges.span(i))]
        assert spans == [ranges.index(k)]


def test_checksums_do_not_depend_on_row_order():
    rows = [((i,), [i, f"r{i}"]) for i in range(3000)]
    ranges = KeyRanges.even(0, 2999, 10)
    a, b = new_sums(ranges), new_sums(ranges)
    for k, r in rows:
        add_row(a, ranges, k, r)
    for k, r in random.Random(1).sample(rows, len(rows)):
        add_row(b, ranges, k, r)
    assert finish(a) == finish(b) and [c for c, _ in finish(a)][:10] == [300] * 10


def _table(n: int) -> list[tuple[tuple, list]]:
    return [((f"k{i:06d}",), [f"k{i:06d}", i, f"text {i}"]) for i in range(n)]


async def test_bisection_names_changed_missing_and_extra_keys_reading_only_differing_ranges():
    src_rows = _table(20_000)
    pg_rows = [(k, list(r)) for k, r in src_rows]
    pg_rows[12_345][1][2] = "edited"                             # changed
    del pg_rows[3_000]                                           # missing in PostgreSQL
    pg_rows.append((("k012345x",), ["k012345x", -1, "extra"]))   # extra in PostgreSQL
    src, pg = MemorySide({"t": src_rows}), MemorySide({"t": pg_rows})
    ranges = KeyRanges.from_keys([k for k, _ in src_rows], 5_000)
    s_sums, p_sums = await src.checksums("t", ranges, None), await pg.checksums("t", ranges, None)
    stats = NarrowStats()
    diffs = await narrow("t", ("key", "n", "text"), src, pg, ranges, s_sums, p_sums, local_rows=100, factor=8,
                         stats=stats)
    assert [(d.kind, d.key, d.columns) for d in diffs] == [
        ("missing", ("k003000",), ()), ("changed", ("k012345",), ("text",)), ("extra", ("k012345x",), ())]
    assert "text 12345 -> edited" in diffs[1].detail
    assert stats.ranges_differing == 2 and stats.bisections >= 4
    assert stats.rows_compared < 1_000  # rows were compared only in the small ranges that differ


async def test_narrowing_stops_at_max_diffs_and_reports_the_first_keys():
    src_rows = _table(5_000)
    pg_rows = [(k, [r[0], r[1], r[2] + "!"]) for k, r in src_rows]  # every row changed
    src, pg = MemorySide({"t": src_rows}), MemorySide({"t": pg_rows})
    ranges = KeyRanges.from_keys([k for k, _ in src_rows], 1_000)
    diffs = await narrow("t", ("key", "n", "text"), src, pg, ranges, await src.checksums("t", ranges, None),
                         await pg.checksums("t", ranges, None), max_diffs=4, local_rows=50)
    assert [d.key for d in diffs] == [(f"k{i:06d}",) for i in range(4)]
    assert {d.kind for d in diffs} == {"changed"}


def test_compare_rows_reports_duplicate_and_null_keys_as_extra():
    src = [((1,), [1, "a"]), ((2,), [2, "b"])]
    pg = [((1,), [1, "a"]), ((2,), [2, "b"]), ((2,), [2, "b"]), ((None,), [None, "live"])]
    diffs = compare_rows(("id", "v"), src, pg)
    assert [(d.kind, d.key) for d in diffs] == [("extra", (2,)), ("extra", (None,))]
    assert diffs[1].key_text() == "NULL" and "live" in diffs[1].detail


# -- against PostgreSQL ------------------------------------------------------------------

def _run(coro):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _create(server_url: str, template: str) -> str:
    name = f"ver_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name


async def _drop(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _migrate(url: str, path: Path, *, graph: bool = True) -> None:
    settings = Settings(backend="postgres", postgres_url=SecretUrl(url), postgres_min_conn=1, postgres_max_conn=2,
                        age_enabled=graph)
    report = await backfill(settings, path, progress=False)
    assert report.reconciled
    if graph:
        from govdb.migrate.graph import load_graph
        await load_graph(url)


@pytest.fixture(scope="module")
def legacy_file(dirty_legacy_template, tmp_path_factory) -> Path:
    return copy_of(dirty_legacy_template, tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="module")
def migrated(pg_server, legacy_file):
    """A database holding the backfill of legacy_file and its graph (a template: tests get copies)."""
    name = _run(_create(pg_server.url, pg_server.templates["postgres"]))
    try:
        _run(_migrate(with_database(pg_server.url, name), legacy_file))
        yield name
    finally:
        _run(_drop(pg_server.url, name))


@pytest.fixture
async def pg_url(pg_server, migrated):
    name = await _create(pg_server.url, migrated)
    try:
        yield with_database(pg_server.url, name)
    finally:
        await _drop(pg_server.url, name)


@pytest.fixture
def source(legacy_file, tmp_path) -> Path:
    path = tmp_path / "governance.db"
    shutil.copy(legacy_file, path)
    return path


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fetchval(url: str, sql: str):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO)


async def test_a_clean_migration_of_a_dirty_file_verifies(source, pg_url):
    report = await verify(pg_url, source)
    assert report.ok, report.to_json()
    assert len(report.tables) == 11
    assert sum(t.quarantined for t in report.tables) >= 10  # the dirty rows, accounted for
    for t in report.tables:
        assert t.expected == t.postgres_rows and t.checksum_match and not t.differences, t.table
        assert t.quarantine_recorded == t.quarantined, t.table
        assert t.checksum_source == t.checksum_postgres
    assert report.graph is not None and report.graph.checked and report.graph.ok
    assert report.graph.expected["Agent"] == report.table("agent_metadata").expected
    assert report.graph.expected["HAS_TAG"] > 0 and report.graph.expected["RESPONSE_TO"] > 0


async def test_verify_names_a_changed_a_missing_and_an_extra_row(source, pg_url):
    await execute(pg_url, """
        UPDATE core.discoveries SET summary = summary || ' (edited)', confidence = 0.125
         WHERE id = (SELECT min(id) FROM core.discoveries WHERE id LIKE 'disc-%');
        DELETE FROM audit.tool_usage WHERE id = 500;
        INSERT INTO core.discovery_tags VALUES ((SELECT min(id) FROM core.discoveries WHERE id LIKE 'disc-%'),
                                                'extra ''tag'' [x]');
        UPDATE core.agent_state SET regime = CASE regime WHEN 'warning' THEN 'critical' ELSE 'warning' END
         WHERE id = 7;
    """)
    first = await fetchval(pg_url, "SELECT min(id) FROM core.discoveries WHERE id LIKE 'disc-%'")
    report = await verify(pg_url, source)
    assert not report.ok
    bad = {t.table: t for t in report.tables if not t.ok}
    assert set(bad) == {"discoveries", "tool_usage", "discovery_tags", "agent_state"}
    found = {t: [(d.kind, d.key, d.columns) for d in r.differences] for t, r in bad.items()}
    assert found["discoveries"] == [("changed", (first,), ("summary", "confidence"))]
    assert found["tool_usage"] == [("missing", (500,), ())]
    assert found["discovery_tags"] == [("extra", (first, "extra 'tag' [x]"), ())]
    assert found["agent_state"] == [("changed", (7,), ("regime",))]
    assert bad["tool_usage"].postgres_rows == bad["tool_usage"].expected - 1
    assert report.graph.ok  # the graph was built before the changes; it still mirrors the source


async def test_rows_without_a_legacy_id_and_unrecorded_quarantine_are_reported(source, pg_url):
    await execute(pg_url, """
        INSERT INTO audit.events (id, event_id, ts, event_type, details, raw_hash)
        VALUES (NULL, gen_random_uuid(), '2025-03-01Z', 'live', '{"x": 1}', 'hash-live');
        DELETE FROM migrate.quarantine WHERE source_table = 'agent_state'
           AND key = (SELECT min(key) FROM migrate.quarantine WHERE source_table = 'agent_state');
    """)
    report = await verify(pg_url, source, graph=False)
    events, states = report.table("audit_events"), report.table("agent_state")
    assert [(d.kind, d.key) for d in events.differences] == [("extra", (None,))]
    assert '"live"' in events.differences[0].detail
    assert states.unrecorded_quarantine == 1 and not states.ok and states.checksum_match
    assert [d.kind for d in states.differences] == ["unrecorded-quarantine"]
    assert "graph check skipped" in " ".join(report.notes)


async def test_graph_counts_are_checked_against_the_source(source, pg_url):
    await execute(pg_url, 'DELETE FROM governance."HAS_TAG" WHERE ctid = (SELECT min(ctid) FROM governance."HAS_TAG");'
                          ' DELETE FROM governance."WROTE"')
    report = await verify(pg_url, source, tables=["identities", "knowledge", "dialectic"])
    assert all(t.ok for t in report.tables) and not report.ok
    g = report.graph.to_dict()
    wrong = {r["label"]: (r["expected"], r["actual"]) for r in g["labels"] if r["expected"] != r["actual"]}
    assert set(wrong) == {"HAS_TAG", "WROTE"}
    assert wrong["HAS_TAG"][1] == wrong["HAS_TAG"][0] - 1 and wrong["WROTE"][1] == 0


async def test_without_an_age_graph_the_graph_check_is_skipped(pg_server, source):
    name = await _create(pg_server.url, pg_server.templates["postgres-noage"])
    url = with_database(pg_server.url, name)
    try:
        await _migrate(url, source, graph=False)
        report = await verify(url, source)
        assert report.ok and report.graph is not None and not report.graph.checked
        assert any("no AGE graph" in n for n in report.notes)
    finally:
        await _drop(pg_server.url, name)


async def test_a_subset_of_tables_and_the_source_timezone(source, pg_url):
    report = await verify(pg_url, source, tables="audit_events,tool_usage")
    assert [t.table for t in report.tables] == ["audit_events", "tool_usage"] and report.ok
    assert not report.graph.checked
    # Naive source timestamps read in another zone than the backfill used: caught, with the column.
    report = await verify(pg_url, source, tables=["audit_events"], source_tz="America/Los_Angeles", graph=False)
    assert not report.ok
    diffs = report.table("audit_events").differences
    assert diffs and all(d.kind == "changed" and "ts" in d.columns for d in diffs)


async def test_script_exit_status_and_json(source, pg_url):
    ok = run_script("--sqlite", str(source), "--postgres", pg_url, "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["graph"]["checked"] is True
    assert {t["table"] for t in doc["tables"]} >= {"agent_metadata", "dialectic_messages"}
    assert all(t["checksum_match"] and t["expected"] == t["postgres_rows"] for t in doc["tables"])
    assert set(doc["seconds"]) == {"total", "source", "postgres"}

    await execute(pg_url, "DELETE FROM audit.events WHERE id = 42")
    bad = run_script("--sqlite", str(source), "--postgres", pg_url, "--json", "--tables", "audit_events")
    assert bad.returncode == 2, bad.stderr
    table = json.loads(bad.stdout)["tables"][0]
    assert table["differences"] == [{"kind": "missing", "key": [42], "columns": [], "detail": table[
        "differences"][0]["detail"]}]
    people = run_script("--sqlite", str(source), "--postgres", pg_url, "--tables", "audit_events")
    assert people.returncode == 2
    assert "42: missing in PostgreSQL" in people.stdout and "differences found in: audit_events" in people.stdout


@pytest.mark.parametrize("args, message", [
    (["--postgres", "mysql://u:sekrit@h/db"], "--postgres must start with postgresql://"),
    (["--postgres", "postgresql://u:sekrit@127.0.0.1:1/db"], "cannot connect to PostgreSQL at postgresql://u:***@"),
    (["--tables", "nope"], "names an unknown table 'nope'"),
    (["--source-timezone", "Mars/Olympus"], "not a known time zone"),
    (["--max-diffs", "x"], "Invalid value for '--max-diffs'"),
])
def test_script_bad_input_is_one_error_line_and_exit_1(source, pg_server, args, message):
    base = {"--postgres": with_database(pg_server.url, "postgres")}
    argv = ["--sqlite", str(source)]
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    for flag, value in base.items():
        argv += [flag, value]
    proc = run_script(*argv)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "sekrit" not in proc.stderr


def test_script_refuses_a_missing_file_and_a_database_without_the_schema(tmp_path, pg_server, source):
    proc = run_script("--sqlite", str(tmp_path / "nope.db"), "--postgres", pg_server.url)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: SQLite file {tmp_path / 'nope.db'} does not exist"]
    proc = run_script("--sqlite", str(source), "--postgres", with_database(pg_server.url, "postgres"))
    assert proc.returncode == 1 and "has no table core.identities" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_split_shares_balance_the_first_worker_and_spans_cover_the_ranges():
    assert split_shares(1, 10, 100) == [1.0]
    assert split_shares(2, 100, 900) == [400 / 900, 500 / 900]  # 100 + 400 | 500
    assert split_shares(3, 1_000, 500) == [0.0, 0.5, 0.5]      # worker 0 is busy enough already
    ranges = KeyRanges.even(1, 10_000, 10)
    spans = split_spans(ranges, split_shares(3, 2_000, 10_000))
    assert spans[0] == (None, (2001,)) and spans[-1][1] is None  # 2,000 + 2,000 | 4,000 | 4,000
    covered = [k for k in range(-5, 10_010) if sum(bool(s) and in_span((k,), s) for s in spans) == 1]
    assert len(covered) == 10_015  # every key in exactly one span
    assert split_spans(ranges, [0.0, 1.0]) == [None, (None, None)]


def test_merge_scans_adds_up_spans():
    a = {"source_rows": 3, "quarantined": 1, "refused": 0, "matched": 1, "unrecorded_count": 1,
         "unrecorded": [((9,), "x")], "sums": [[2, 5], [0, 0]], "graph": {}, "tags": set(), "seconds": 1.0}
    b = dict(a, unrecorded=[((10,), "y"), ((2,), "z")], sums=[[0, 0], [2, 2 ** 64 - 1]])
    m = merge_scans([a, b], max_diffs=2)
    assert (m["source_rows"], m["quarantined"], m["unrecorded_count"]) == (6, 2, 2)
    assert m["sums"] == [[2, 5], [2, 2 ** 64 - 1]] and [u[0] for u in m["unrecorded"]] == [(2,), (9,)]


async def test_source_read_by_several_workers_gives_the_same_answer(source, pg_url):
    await execute(pg_url, "UPDATE audit.events SET confidence = 0.5 WHERE id IN (3, 1500);"
                          " DELETE FROM audit.tool_usage WHERE id = 900")
    one = await verify(pg_url, source, graph=False, workers=1)
    three = await verify(pg_url, source, graph=False, workers=3)
    assert three.workers == 3
    for a, b in zip(one.tables, three.tables):
        assert a.to_dict() == b.to_dict()
    events = three.table("audit_events").differences
    assert [(d.kind, d.key, d.columns) for d in events] == [("changed", (3,), ("confidence",)),
                                                          ("changed", (1500,), ("confidence",))]
    assert [(d.kind, d.key) for d in three.table("tool_usage").differences] == [("missing", (900,))]
