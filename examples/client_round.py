"""One full round against `govdb serve`, with the MCP SDK's client.

    python examples/client_round.py                          # starts `govdb serve` over stdio
    python examples/client_round.py --url http://127.0.0.1:8765/mcp   # a server already running

Registers an agent and a reviewer, checks in, stores and searches a
discovery, then opens, argues and resolves a dialectic review. The stdio
server uses the DB_* settings of this environment (SQLite at
data/governance.db by default).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool} failed: {result.content[0].text}")
    return result.structured_content or {}


async def round_trip(client: Client) -> None:
    agent = await call(client, "register_agent", tags=["example"])
    me, key = agent["agent"]["agent_id"], agent["api_key"]  # the key is shown once: keep it
    reviewer = await call(client, "register_agent", parent_agent_id=me, parent_api_key=key,
                          spawn_reason="reviewer for the example")
    rid, rkey = reviewer["agent"]["agent_id"], reviewer["api_key"]
    print(f"registered {me} and its child {rid}")

    session = await call(client, "bind_session", agent_id=me, api_key=key, client_type="example")
    sid = session["session"]["session_id"]
    state = await call(client, "check_in", agent_id=me, api_key=key, session_id=sid,
                       energy=0.7, integrity=0.9, entropy=0.2, void=-0.05)
    state = await call(client, "check_in", agent_id=me, api_key=key, session_id=sid,
                       energy=0.4, integrity=0.6, entropy=0.9, void=0.3, regime="warning")
    print(f"checked in twice in {sid}; regime changed: {state['regime_changed']}")

    question = await call(client, "store_discovery", agent_id=me, api_key=key, type="question",
                          summary="Why does entropy rise during nightly batches?", tags=["entropy"])
    answer = await call(client, "store_discovery", agent_id=rid, api_key=rkey, type="answer",
                        summary="Batch jobs saturate the queue and raise entropy", tags=["entropy"],
                        response_to=question["discovery"]["id"], response_type="extend")
    hits = await call(client, "search_discoveries", query="entropy", tags=["entropy"])
    chain = await call(client, "get_response_chain", discovery_id=answer["discovery"]["id"])
    print(f"stored 2 discoveries; search found {len(hits['discoveries'])}, "
          f"response chain {' -> '.join(d['type'] for d in chain['chain'])}")

    review = await call(client, "open_dialectic", agent_id=me, api_key=key, reviewer_agent_id=rid,
                        reason="entropy above threshold", discovery_id=question["discovery"]["id"])
    ds = review["dialectic_session"]["session_id"]
    await call(client, "submit_thesis", session_id=ds, agent_id=me, api_key=key,
               reasoning="The spike was the nightly batch, not drift", root_cause="batch load",
               proposed_conditions=["throttle batches"])
    await call(client, "submit_antithesis", session_id=ds, agent_id=rid, api_key=rkey,
               reasoning="Entropy stayed high after the batch ended", concerns=["lingering entropy"])
    await call(client, "submit_synthesis", session_id=ds, agent_id=me, api_key=key,
               reasoning="Throttle batches and re-check within an hour", agrees=True)
    done = await call(client, "resolve_dialectic", session_id=ds, agent_id=rid, api_key=rkey,
                      resolution={"action": "resume", "conditions": ["throttle batches"]})
    full = await call(client, "get_dialectic_session", session_id=ds)
    print(f"dialectic {ds}: {done['dialectic_session']['status']} after "
          f"{len(full['dialectic_session']['messages'])} messages")

    events = await call(client, "query_audit_events", agent_id=me)
    print("audit events of", me + ":", ", ".join(e["event_type"] for e in events["events"]))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="streamable HTTP endpoint of a running `govdb serve --http`")
    args = parser.parse_args()
    if args.url:
        server: Any = args.url
    else:
        govdb = shutil.which("govdb") or str(Path(sys.executable).with_name("govdb"))
        server = StdioServerParameters(command=govdb, args=["serve"],
                                       env={k: x for k, x in os.environ.items() if k.startswith("DB_")})
    async with Client(server) as client:
        await round_trip(client)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - an example: one line, not a traceback
        # The SDK wraps transport failures in exception groups; name the first cause.
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        sys.exit(f"error: {type(exc).__name__}: {exc} (is `govdb serve` running at that URL?)")
