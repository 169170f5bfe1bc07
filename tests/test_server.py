"""`govdb serve` as real processes on real stores, driven by the MCP SDK's client.

Over stdio (a subprocess) and streamable HTTP (a server on a free port of
127.0.0.1), on every configuration of the `store` fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from conftest import settings_for, with_database
from govdb.config import Settings

GOVDB = str(Path(sys.executable).with_name("govdb"))
TOOLS = {
    "register_agent", "get_agent", "list_agents", "set_agent_status", "get_lineage",
    "bind_session", "end_session", "get_session", "check_in", "get_state",
    "store_discovery", "update_discovery_status", "search_discoveries", "get_discovery",
    "get_neighbors", "get_response_chain", "open_dialectic", "join_dialectic", "submit_thesis",
    "submit_antithesis", "submit_synthesis", "resolve_dialectic", "get_dialectic_session",
    "query_audit_events", "tool_usage_stats", "health",
}
EISV = {"energy": 0.7, "integrity": 0.9, "entropy": 0.2, "void": -0.05}


def server_env(settings: Settings) -> dict[str, str]:
    """The DB_* variables an operator would set for this store."""
    env = {k: x for k, x in os.environ.items() if not k.startswith("DB_")}
    env.update({
        "DB_BACKEND": settings.backend, "DB_SQLITE_PATH": str(settings.sqlite_path),
        "DB_POSTGRES_URL": settings.postgres_url.reveal(), "DB_POSTGRES_MIN_CONN": "1",
        "DB_POSTGRES_MAX_CONN": "5", "DB_AGE_GRAPH": settings.age_graph,
        "DB_AGE_ENABLED": "1" if settings.age_enabled else "0",
    })
    return env


class Session:
    """A client with call helpers that count every call per tool."""

    def __init__(self, client: Client):
        self.client = client
        self.calls: Counter[str] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()

    async def ok(self, tool: str, **arguments: Any) -> dict[str, Any]:
        self.calls[tool] += 1
        result = await self.client.call_tool(tool, arguments)
        assert not result.is_error, f"{tool}: {result.content[0].text}"
        return result.structured_content

    async def err(self, tool: str, error_type: str, **arguments: Any) -> dict[str, Any]:
        """Call a tool that must fail with ``error_type``; return the error (type, message, ...)."""
        self.calls[tool] += 1
        self.failures[(tool, error_type)] += 1
        result = await self.client.call_tool(tool, arguments)
        assert result.is_error, f"{tool} should have failed with {error_type}"
        error = (result.structured_content or {}).get("error") or {
            "type": "ArgumentError", "message": result.content[0].text}
        assert error["type"] == error_type, error
        assert "Traceback" not in error["message"]
        return error


@asynccontextmanager
async def stdio(env: dict[str, str], errlog: Path) -> AsyncIterator[Session]:
    with open(errlog, "a") as log:
        params = StdioServerParameters(command=GOVDB, args=["serve"], env=env)
        async with Client(stdio_client(params, errlog=log)) as client:
            yield Session(client)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def http_servers(env: dict[str, str], errlog: Path, *option_sets: tuple[str, ...]) -> AsyncIterator[list[str]]:
    """Start one `govdb serve --http` per option set (together); yield their URLs."""
    ports = [_free_port() for _ in option_sets]
    with open(errlog, "a") as log:
        procs = [subprocess.Popen([GOVDB, "serve", "--http", f"127.0.0.1:{port}", *options], env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                 for port, options in zip(ports, option_sets)]
        try:
            for proc, port in zip(procs, ports):
                for _ in range(300):
                    assert proc.poll() is None, f"server exited: {errlog.read_text()}"
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                        break
                    except OSError:
                        await asyncio.sleep(0.05)
            yield [f"http://127.0.0.1:{port}/mcp" for port in ports]
        finally:
            for proc in procs:
                proc.terminate()
            assert [proc.wait(15) for proc in procs] == [0] * len(procs)  # a clean stop on SIGTERM


async def test_every_tool(store, tmp_path):
    log = tmp_path / "server.log"
    async with stdio(server_env(store.settings), log) as s:
        assert {t.name for t in (await s.client.list_tools()).tools} == TOOLS
        health = (await s.ok("health"))["health"]
        assert health["ok"] and health["backend"] == store.settings.backend

        lead = await s.ok("register_agent", agent_id="lead", tags=["crew"], notes="first")
        key = lead["api_key"]
        assert lead["agent"]["agent_id"] == "lead" and key.startswith("gk_") and lead["audit_event_id"]
        child = await s.ok("register_agent", agent_id="child", parent_agent_id="lead",
                           parent_api_key=key, spawn_reason="help")
        ckey = child["api_key"]
        assert (await s.ok("get_lineage", agent_id="child"))["lineage"] == ["child", "lead"]
        assert [c["agent_id"] for c in (await s.ok("get_lineage", agent_id="lead"))["children"]] == ["child"]
        assert [a["agent_id"] for a in (await s.ok("list_agents", tag="crew"))["agents"]] == ["lead"]

        bound = await s.ok("bind_session", agent_id="lead", api_key=key, session_id="s1", ttl_seconds=3600)
        assert bound["resumed"] is False and bound["session"]["agent_id"] == "lead"
        assert (await s.ok("bind_session", agent_id="lead", api_key=key, session_id="s1"))["resumed"] is True
        assert (await s.ok("get_session", session_id="s1"))["live"] is True

        first = await s.ok("check_in", agent_id="lead", api_key=key, session_id="s1", **EISV, coherence=0.8)
        assert first["regime_changed"] is False and first["previous_regime"] is None
        second = await s.ok("check_in", agent_id="lead", api_key=key, **{**EISV, "entropy": 1.4},
                            regime="warning", state={"lambda1": 0.1})
        assert second["regime_changed"] is True and second["previous_regime"] == "nominal"
        state = await s.ok("get_state", agent_id="lead")
        assert state["latest"]["regime"] == "warning" and state["latest"]["state"] == {"lambda1": 0.1}
        assert len(state["history"]) == 2
        agent = await s.ok("get_agent", agent_id="lead")
        assert agent["latest_state"]["entropy"] == 1.4
        assert [x["session_id"] for x in agent["active_sessions"]] == ["s1"]

        await s.ok("store_discovery", agent_id="lead", api_key=key, discovery_id="d1", type="question",
                   summary="Why does entropy rise at night?", tags=["night", "entropy"])
        d2 = await s.ok("store_discovery", agent_id="child", api_key=ckey, discovery_id="d2", type="answer",
                        summary="Nightly batches raise entropy", details="queue saturation",
                        tags=["entropy"], response_to="d1", response_type="extend", confidence=0.7)
        assert d2["links"] == 1 and d2["discovery"]["tags"] == ["entropy"]
        d3 = await s.ok("store_discovery", agent_id="lead", api_key=key, discovery_id="d3",
                        summary="Queue metrics dashboard", related_to=["d1", "d2"])
        assert d3["links"] == 2
        hits = await s.ok("search_discoveries", query="entropy", tags=["entropy"])
        assert [d["id"] for d in hits["discoveries"]] == ["d2", "d1"]
        assert {d["id"] for d in (await s.ok("search_discoveries", query="queue"))["discoveries"]} == {"d2", "d3"}
        assert (await s.ok("get_discovery", discovery_id="d1"))["discovery"]["tags"] == ["entropy", "night"]
        neighbors = (await s.ok("get_neighbors", discovery_id="d1"))["neighbors"]
        assert [(n["discovery"]["id"], n["link"]["edge_type"], n["direction"]) for n in neighbors] == [
            ("d2", "response_to", "in"), ("d3", "related_to", "in")]
        only = (await s.ok("get_neighbors", discovery_id="d1", edge_type="response_to"))["neighbors"]
        assert [n["link"]["response_type"] for n in only] == ["extend"]
        assert [d["id"] for d in (await s.ok("get_response_chain", discovery_id="d2"))["chain"]] == ["d2", "d1"]
        resolved = await s.ok("update_discovery_status", agent_id="lead", api_key=key,
                              discovery_id="d1", status="resolved")
        assert resolved["discovery"]["status"] == "resolved" and resolved["discovery"]["resolved_at"]

        opened = await s.ok("open_dialectic", agent_id="child", api_key=ckey, session_id="r1",
                            reason="entropy spike", discovery_id="d1", max_synthesis_rounds=2)
        assert opened["dialectic_session"]["phase"] == "thesis"
        joined = await s.ok("join_dialectic", session_id="r1", agent_id="lead", api_key=key)
        assert joined["dialectic_session"]["reviewer_agent_id"] == "lead"
        thesis = await s.ok("submit_thesis", session_id="r1", agent_id="child", api_key=ckey,
                            reasoning="batch load", root_cause="queue", proposed_conditions=["throttle"])
        assert thesis["phase"] == "antithesis"
        anti = await s.ok("submit_antithesis", session_id="r1", agent_id="lead", api_key=key,
                          reasoning="entropy stayed high", observed_metrics={"S": 1.4}, concerns=["drift"])
        assert anti["phase"] == "synthesis"
        await s.ok("submit_synthesis", session_id="r1", agent_id="child", api_key=ckey,
                   reasoning="throttle and re-check", agrees=True)
        done = await s.ok("resolve_dialectic", session_id="r1", agent_id="lead", api_key=key,
                          resolution={"action": "resume"})
        assert done["dialectic_session"]["status"] == "resolved"
        full = (await s.ok("get_dialectic_session", session_id="r1"))["dialectic_session"]
        assert [m["message_type"] for m in full["messages"]] == ["thesis", "antithesis", "synthesis"]
        assert full["synthesis_round"] == 1 and full["paused_agent_state"] == {}
        paused = await s.ok("set_agent_status", agent_id="child", api_key=ckey, status="paused", reason="review")
        assert paused["agent"]["status"] == "paused"

        lead_events = [e["event_type"] for e in (await s.ok("query_audit_events", agent_id="lead"))["events"]]
        assert lead_events == ["dialectic_resolved", "discovery_status_changed", "discovery_stored",
                               "discovery_stored", "regime_changed", "agent_registered"]
        child_events = (await s.ok("query_audit_events", agent_id="child", limit=10))["events"]
        assert [e["event_type"] for e in child_events] == [
            "agent_status_changed", "dialectic_opened", "discovery_stored", "agent_registered"]
        found = (await s.ok("query_audit_events", query="regime_changed warning"))["events"]
        assert [e["details"]["to"] for e in found] == ["warning"]
        assert (await s.ok("end_session", agent_id="lead", api_key=key, session_id="s1"))["session"]["is_active"] is False

        usage = await s.client.call_tool("tool_usage_stats", {"recent": 1000})
        assert set(s.calls) | {"tool_usage_stats"} == TOOLS
        stats = {x["tool_name"]: x for x in usage.structured_content["stats"]}
        assert {t: x["calls"] for t, x in stats.items()} == dict(s.calls)
        assert all(x["failures"] == 0 for x in stats.values())
        recent = usage.structured_content["recent"]
        assert {(r["tool_name"], r["agent_id"]) for r in recent if r["tool_name"] == "register_agent"} == {
            ("register_agent", "lead"), ("register_agent", "child")}
        assert {r["session_id"] for r in recent if r["tool_name"] == "check_in"} == {"s1", None}
        assert all(r["latency_ms"] is not None for r in recent)
    assert key not in log.read_text() and ckey not in log.read_text()


async def _snapshot(s: Session) -> Any:
    """What the store holds, read through the tools."""
    return (await s.ok("list_agents"), await s.ok("get_state", agent_id="lead", limit=100),
            await s.ok("search_discoveries", limit=1000), await s.ok("query_audit_events", limit=1000),
            await s.ok("get_agent", agent_id="lead"),
            await s.ok("get_dialectic_session", session_id="r1"))


async def test_refused_calls_write_nothing(store, tmp_path):
    log = tmp_path / "server.log"
    async with stdio(server_env(store.settings), log) as s:
        key = (await s.ok("register_agent", agent_id="lead"))["api_key"]
        rkey = (await s.ok("register_agent", agent_id="rev"))["api_key"]
        await s.ok("store_discovery", agent_id="lead", api_key=key, discovery_id="d1", summary="entropy note")
        await s.ok("open_dialectic", agent_id="lead", api_key=key, session_id="r1")
        before = await _snapshot(s)

        wrong = key[:-2] + "xx"
        await s.err("check_in", "AuthenticationError", agent_id="lead", api_key=wrong, **EISV)
        await s.err("check_in", "AuthenticationError", agent_id="lead", api_key=rkey, **EISV)
        await s.err("set_agent_status", "AuthenticationError", agent_id="lead", api_key=wrong, status="paused")
        await s.err("bind_session", "AuthenticationError", agent_id="lead", api_key=wrong, session_id="s9")
        await s.err("store_discovery", "AuthenticationError", agent_id="lead", api_key=wrong,
                    discovery_id="d9", summary="x")
        await s.err("register_agent", "AuthenticationError", agent_id="kid", parent_agent_id="lead",
                    parent_api_key=wrong)
        await s.err("update_discovery_status", "AuthenticationError", agent_id="rev", api_key=rkey,
                    discovery_id="d1", status="archived")
        await s.err("submit_thesis", "AuthenticationError", session_id="r1", agent_id="rev", api_key=rkey,
                    reasoning="not mine")

        missing = await s.err("check_in", "NotFoundError", agent_id="ghost", api_key=key, **EISV)
        assert (missing["kind"], missing["key"]) == ("agent", "ghost")
        missing = await s.err("store_discovery", "NotFoundError", agent_id="lead", api_key=key,
                              discovery_id="d9", summary="answer", response_to="nope", response_type="extend")
        assert (missing["kind"], missing["key"]) == ("discovery", "nope")
        await s.err("open_dialectic", "NotFoundError", agent_id="lead", api_key=key, reviewer_agent_id="ghost")
        await s.err("get_dialectic_session", "NotFoundError", session_id="nope")
        await s.err("get_session", "NotFoundError", session_id="s9")
        await s.err("get_lineage", "NotFoundError", agent_id="ghost")

        bad = await s.err("check_in", "ValidationError", agent_id="lead", api_key=key, **{**EISV, "energy": 1.5})
        assert bad["field"] == "energy" and "[0.0, 1.0]" in bad["message"]
        assert (await s.err("check_in", "ValidationError", agent_id="lead", api_key=key, **EISV,
                            regime="calm"))["field"] == "regime"
        assert (await s.err("check_in", "ValidationError", agent_id="lead", api_key=key, **EISV,
                            state={"E": 1}))["field"] == "state"
        assert (await s.err("check_in", "ValidationError", agent_id="lead", **EISV))["field"] == "api_key"
        assert (await s.err("check_in", "ValidationError", agent_id="lead", api_key=key, **EISV,
                            energyy=0.1))["field"] == "energyy"
        assert "energy" in (await s.err("check_in", "ArgumentError", agent_id="lead", api_key=key,
                                         **{**EISV, "energy": "high"}))["message"]
        assert (await s.err("store_discovery", "ValidationError", agent_id="lead", api_key=key,
                            summary=" "))["field"] == "summary"
        assert (await s.err("store_discovery", "ValidationError", agent_id="lead", api_key=key, summary="x",
                            response_to="d1", response_type="agree"))["field"] == "response_type"
        assert (await s.err("store_discovery", "ValidationError", agent_id="lead", api_key=key, summary="x",
                            discovery_id="d8", tags=["ok", ""]))["field"] == "tags[1]"
        assert (await s.err("store_discovery", "ValidationError", agent_id="lead", api_key=key, summary="x",
                            discovery_id="d8", severity="huge"))["field"] == "severity"
        assert (await s.err("query_audit_events", "ValidationError",
                            since="2026-01-01T00:00:00"))["field"] == "since"
        assert (await s.err("submit_thesis", "ValidationError", session_id="r1", agent_id="lead", api_key=key,
                            reasoning="nul \x00 byte"))["field"] == "reasoning"
        await s.err("no_such_tool", "UnknownTool")

        await s.err("register_agent", "ConflictError", agent_id="lead")
        await s.err("store_discovery", "ConflictError", agent_id="rev", api_key=rkey, discovery_id="d1",
                    summary="someone else's id")
        await s.err("submit_antithesis", "ConflictError", session_id="r1", agent_id="rev", api_key=rkey,
                    reasoning="no reviewer joined yet")

        assert await _snapshot(s) == before
        usage = (await s.client.call_tool("tool_usage_stats", {"recent": 1000})).structured_content
        failed = Counter((r["tool_name"], r["error_type"]) for r in usage["recent"] if not r["success"])
        assert failed == s.failures
        assert {x["tool_name"]: x["calls"] for x in usage["stats"]} == dict(s.calls)
    text = log.read_text()
    assert key not in text and rkey not in text and wrong not in text


async def test_processes_share_agents_and_survive_restart(store, tmp_path):
    env, log = server_env(store.settings), tmp_path / "server.log"
    async with http_servers(env, log, (), ("--stateless",)) as (url_a, url_b):
        async with Client(url_a) as a_client, Client(url_b) as b_client:
            a, b = Session(a_client), Session(b_client)
            key = (await a.ok("register_agent", agent_id="roamer"))["api_key"]
            await b.ok("bind_session", agent_id="roamer", api_key=key, session_id="roam-1")
            await a.ok("check_in", agent_id="roamer", api_key=key, session_id="roam-1", **EISV)
            moved = await b.ok("check_in", agent_id="roamer", api_key=key, session_id="roam-1", **EISV,
                               regime="warning")
            assert moved["regime_changed"] is True  # b sees what a wrote
    async with stdio(env, log) as s:  # both HTTP processes have stopped
        agent = await s.ok("get_agent", agent_id="roamer")
        assert agent["latest_state"]["regime"] == "warning"
        assert [x["session_id"] for x in agent["active_sessions"]] == ["roam-1"]
        assert (await s.ok("bind_session", agent_id="roamer", api_key=key, session_id="roam-1"))["resumed"]
        await s.err("check_in", "AuthenticationError", agent_id="roamer", api_key="gk_wrong", **EISV)
        usage = (await s.ok("tool_usage_stats", agent_id="roamer", recent=100))
        assert len({r["payload"]["pid"] for r in usage["recent"]}) == 3
        assert {x["tool_name"]: x["calls"] for x in usage["stats"]} == {
            "register_agent": 1, "bind_session": 2, "check_in": 3, "get_agent": 1}
    assert key not in log.read_text()


async def test_store_down_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    settings = Settings.from_env({"DB_BACKEND": "postgres",
                                  "DB_POSTGRES_URL": f"postgresql://govdb:s3cret-pw@127.0.0.1:{port}/gov"})
    log = tmp_path / "server.log"
    async with stdio(server_env(settings), log) as s:
        health = (await s.ok("health"))["health"]
        assert health["ok"] is False and "s3cret" not in json.dumps(health)
        down = await s.err("check_in", "StoreUnavailableError", agent_id="a", api_key="gk_secret-key", **EISV)
        assert "try again" in down["message"] and "s3cret" not in down["message"]
        await s.err("register_agent", "StoreUnavailableError", agent_id="a")
    text = log.read_text()
    assert "s3cret" not in text and "gk_secret-key" not in text and "Traceback" not in text


@pytest.mark.backends("sqlite")
async def test_stdout_carries_only_protocol_messages(store, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        GOVDB, "serve", env=server_env(store.settings), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "register_agent", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "check_in", "arguments": {
            "agent_id": "x", "api_key": "gk_x", **EISV, "energy": "high"}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "health", "arguments": {}}},
    ]
    answers = []
    for request in requests:
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        await proc.stdin.drain()
        if "id" in request:
            answers.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)))
    proc.stdin.close()
    rest, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0 and rest == b""
    assert [a["id"] for a in answers] == [1, 2, 3, 4] and all(a["jsonrpc"] == "2.0" for a in answers)
    assert answers[2]["result"]["isError"] is True and answers[3]["result"]["isError"] is False
    assert b"store ready" in err  # the log went to stderr


async def test_restart_on_postgres_after_backfill(pg_server, tmp_path):
    """The operator's move: serve on a SQLite file, backfill it, restart with DB_BACKEND=postgres."""
    dbname = await pg_server.create_database("postgres")
    try:
        pg = settings_for("postgres", pg_url=with_database(pg_server.url, dbname))
        sqlite = settings_for("sqlite", tmp_path=tmp_path)
        log = tmp_path / "server.log"
        async with stdio(server_env(sqlite), log) as s:
            key = (await s.ok("register_agent", agent_id="lead"))["api_key"]
            ckey = (await s.ok("register_agent", agent_id="child", parent_agent_id="lead",
                               parent_api_key=key))["api_key"]
            await s.ok("bind_session", agent_id="lead", api_key=key, session_id="s1")
            await s.ok("check_in", agent_id="lead", api_key=key, session_id="s1", **EISV)
            await s.ok("store_discovery", agent_id="lead", api_key=key, discovery_id="d1", summary="entropy rises")
            await s.ok("store_discovery", agent_id="child", api_key=ckey, discovery_id="d2", summary="batches",
                       response_to="d1", response_type="support")
            await s.ok("open_dialectic", agent_id="child", api_key=ckey, session_id="r1", reviewer_agent_id="lead")
            await s.ok("submit_thesis", session_id="r1", agent_id="child", api_key=ckey, reasoning="batches")

        env = {**server_env(pg), "DB_SQLITE_PATH": str(sqlite.sqlite_path)}
        for step in (["backfill", "--no-progress"], ["graph"]):
            done = subprocess.run([GOVDB, "migrate", *step], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr

        async with stdio(server_env(pg), log) as s:
            assert (await s.ok("health"))["health"]["backend"] == "postgres"
            moved = await s.ok("check_in", agent_id="lead", api_key=key, **EISV, regime="warning")
            assert moved["previous_regime"] == "nominal" and moved["regime_changed"] is True
            assert (await s.ok("bind_session", agent_id="lead", api_key=key, session_id="s1"))["resumed"]
            assert (await s.ok("get_lineage", agent_id="child"))["lineage"] == ["child", "lead"]
            assert [d["id"] for d in (await s.ok("get_response_chain", discovery_id="d2"))["chain"]] == ["d2", "d1"]
            anti = await s.ok("submit_antithesis", session_id="r1", agent_id="lead", api_key=key, reasoning="no")
            assert anti["phase"] == "synthesis"
            await s.ok("store_discovery", agent_id="lead", api_key=key, discovery_id="d3", summary="more",
                       related_to=["d1", "d2"])
            assert len((await s.ok("get_neighbors", discovery_id="d1"))["neighbors"]) == 2
            events = (await s.ok("query_audit_events", agent_id="lead"))["events"]
            assert [e["event_type"] for e in events][-1] == "agent_registered"  # written on SQLite
            await s.err("check_in", "AuthenticationError", agent_id="lead", api_key=ckey, **EISV)
    finally:
        await pg_server.drop_database(dbname)
