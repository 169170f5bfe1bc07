"""Dual-write under the faults issue 4 names, at the scale it names.

- PostgreSQL's postmaster is SIGKILLed in the middle of a load of more than
  5,000 writes from 16 concurrent tasks of every kind, and restarted while
  the load goes on: after replay, verify passes (no row lost, none
  duplicated) and the graph matches.
- A backfill of the same file runs while the load writes (updates of entity
  rows included): afterwards no older value sits over a newer one.

Both use a throwaway PostgreSQL of their own (killing the shared test server
is not an option) or a fresh database; both need PostgreSQL and fail without it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from conftest import settings_for, with_database
from govdb.backends import create_backend
from govdb.backends.dual import DualDatabase
from govdb.backends.outbox import queue_counts
from govdb.migrate.backfill import backfill
from govdb.migrate.verify import verify

TASKS = 16
PER_TASK = 330  # 16 x 330 = 5,280 writes
KINDS = ("state", "audit", "usage", "discovery", "link", "child", "dialectic", "message", "update", "session")


@dataclass
class Load:
    """A mixed write load from TASKS concurrent tasks; counts acknowledged writes by kind."""

    db: DualDatabase
    per_task: int = PER_TASK
    prefix: str = "l"
    done: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    async def setup(self) -> None:
        for i in range(TASKS):
            await self.db.create_identity(f"agent-{i}", api_key=f"key-{i}-0123456789abcdef0123456789")

    async def run(self, on_progress: Callable[[int], Awaitable[None]] | None = None) -> None:
        await asyncio.gather(*(self._task(i, on_progress) for i in range(TASKS)))

    async def _task(self, i: int, on_progress: Callable[[int], Awaitable[None]] | None) -> None:
        db, me, other = self.db, f"agent-{i}", f"agent-{(i + 1) % TASKS}"
        discoveries: list[str] = []
        children: list[str] = []
        dialectic: list[str] = []
        sessions: list[str] = []
        for j in range(self.per_task):
            kind = KINDS[(i + j) % len(KINDS)]
            try:
                if kind == "state":
                    await db.record_agent_state(me, energy=(j % 10) / 10, integrity=0.9, entropy=0.2, void=-0.1,
                                                state={"task": i, "step": j})
                elif kind == "audit":
                    await db.append_audit_event("checkin", agent_id=me, details={"task": i, "step": j})
                elif kind == "usage":
                    await db.record_tool_usage("process_agent_update", agent_id=me, latency_ms=j % 50,
                                               payload={"step": j})
                elif kind == "discovery":
                    d = f"{self.prefix}-disc-{i}-{j}"
                    await db.add_discovery(d, agent_id=me, type="insight", summary=f"finding {i} {j}",
                                           tags=[f"t{j % 7}", f"task{i}"])
                    discoveries.append(d)
                elif kind == "link":
                    if len(discoveries) < 2:
                        kind = "state"
                        await db.record_agent_state(me, energy=0.5, integrity=0.5, entropy=0.5, void=0.0)
                    else:
                        await db.link_discoveries(discoveries[-1], discoveries[-2], edge_type="response_to",
                                                  response_type="extend", created_by=me)
                elif kind == "child":
                    c = f"{self.prefix}-child-{i}-{j}"
                    await db.create_identity(c, api_key=f"ck-{i}-{j}-0123456789abcdef012345", parent_agent_id=me,
                                             tags=["spawned"])
                    children.append(c)
                elif kind == "dialectic":
                    s = f"{self.prefix}-dial-{i}-{j}"
                    await db.create_dialectic_session(s, paused_agent_id=me, reviewer_agent_id=other,
                                                      reason="load test", topic=f"topic {j}")
                    dialectic.append(s)
                elif kind == "message":
                    if not dialectic:
                        kind = "audit"
                        await db.append_audit_event("note", agent_id=me, details={"j": j})
                    else:
                        await db.add_dialectic_message(dialectic[-1], agent_id=me, message_type="thesis",
                                                       reasoning=f"because {j}", agrees=True)
                elif kind == "update":  # entity rows changed in place
                    if children:
                        await db.update_identity_status(children[-1], ("paused", "active")[j % 2])
                    elif discoveries:
                        await db.update_discovery_status(discoveries[-1], "resolved")
                    else:
                        await db.update_identity_status(me, "active")
                elif kind == "session":
                    if sessions and j % 2:
                        await db.touch_session(sessions[-1])
                    else:
                        s = f"{self.prefix}-sess-{i}-{j}"
                        await db.create_session(s, me, client_type="load")
                        sessions.append(s)
            except Exception as exc:  # noqa: BLE001 - counted and asserted on: an acknowledged-write failure
                self.errors.append(f"{kind} {i}/{j}: {type(exc).__name__}: {exc}")
                continue
            self.done += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if on_progress is not None:
                await on_progress(self.done)


async def drain(db: DualDatabase, timeout: float = 120.0) -> None:
    """Replay until the queue is empty; fail on a parked write or when it does not drain."""
    deadline = time.monotonic() + timeout
    while True:
        result = await db.replay()
        assert result.parked == 0 and not result.parked_now, f"writes were parked: {result.parked_now[:5]}"
        if result.pending == 0:
            return
        assert time.monotonic() < deadline, f"the queue did not drain: {result}"
        await asyncio.sleep(0.2)


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "data" / "postmaster.pid").read_text().split()[0])


def assert_verified(report) -> None:
    bad = [t.to_dict() for t in report.tables if not t.ok]
    assert report.ok, f"verify found differences: {bad} graph={report.graph.to_dict() if report.graph else None}"
    for t in report.tables:
        d = t.to_dict()
        assert d.get("quarantined", 0) == 0, d


async def test_postgres_killed_mid_load_loses_and_duplicates_nothing(throwaway_postgres, tmp_path):
    from govdb import localpg

    url, data_dir, port = throwaway_postgres
    settings = settings_for("dual", tmp_path=tmp_path, pg_url=url)
    db = create_backend(settings)
    assert isinstance(db, DualDatabase)
    await db.connect()
    load = Load(db)
    killed_at = restarted_at = None
    restart: asyncio.Task | None = None
    queued_while_down = 0
    try:
        await load.setup()

        async def faults(done: int) -> None:
            nonlocal killed_at, restart, queued_while_down
            if killed_at is None and done >= 1_500:
                killed_at = done
                os.kill(postmaster_pid(data_dir), signal.SIGKILL)
            elif killed_at is not None and restart is None and done >= 3_000:
                queued_while_down = queue_counts(settings.sqlite_path)["pending"]
                # Restarted while the load goes on (in a thread: start blocks until it accepts connections).
                restart = asyncio.ensure_future(asyncio.to_thread(localpg.start, data_dir, port=port, log=lambda _: None))

        await load.run(faults)
        assert restart is not None
        await restart
        restarted_at = load.done
        assert load.errors == [], f"{len(load.errors)} acknowledged-write failures, first: {load.errors[:3]}"
        assert load.done >= 5_000 + TASKS and killed_at is not None and restarted_at is not None
        # The writes made while PostgreSQL was down were acknowledged and queued, not lost or failed.
        assert queued_while_down >= 1_000, queued_while_down
        assert set(load.by_kind) >= {"state", "audit", "usage", "discovery", "link", "child", "dialectic",
                                      "message", "update", "session"}
        await drain(db)
        assert queue_counts(settings.sqlite_path) == {"pending": 0, "parked": 0}
    finally:
        await db.close()
    report = await verify(url, settings.sqlite_path, graph=True, graph_name=settings.age_graph)
    assert_verified(report)
    assert report.graph is not None and report.graph.ok


async def test_backfill_during_the_load_leaves_no_older_value_over_a_newer_one(pg_server, tmp_path):
    name = await pg_server.create_database("postgres")
    url = with_database(pg_server.url, name)
    try:
        settings = settings_for("dual", tmp_path=tmp_path, pg_url=url)
        db = create_backend(settings)
        await db.connect()
        load = Load(db, per_task=120, prefix="late")
        try:
            await load.setup()
            first = Load(db, per_task=60, prefix="early")  # rows the backfill finds already in the file
            await first.run()
            backfills = []

            async def backfill_now(done: int) -> None:
                if not backfills and done >= 400:
                    backfills.append(asyncio.ensure_future(
                        backfill(url, settings.sqlite_path, progress=False, workers=1, restart=True)))

            await load.run(backfill_now)
            report = await backfills[0]
            assert report.reconciled
            assert load.errors == [] and first.errors == []
            await drain(db)
        finally:
            await db.close()
        result = await verify(url, settings.sqlite_path, graph=False)
        assert_verified(result)
    finally:
        await pg_server.drop_database(name)
