"""Dual-write backend: SQLite and PostgreSQL together, losing nothing.

A write runs on SQLite with its outbox record(s) in the same transaction
(:mod:`.outbox`), so once SQLite commits the write cannot be lost. With
``DB_DUAL_APPLY=background`` (the default) the write is acknowledged right
then and its entries go to an in-memory queue; a background task lets
writes gather for :data:`APPLY_LINGER` and applies them (up to
:data:`APPLY_BATCH` entries, in seq order) in one PostgreSQL transaction
with set-based statements (:mod:`.dual_sync`: copy each key's current SQLite
row under an advisory lock). With ``sync`` the write is applied before it
returns (one transaction per write: about the two latencies added up).
A backfill beside live dual writes is safe with either: it takes an orphan
whose row or parent still has an outbox record, or that PostgreSQL holds,
as migrated (``govdb.migrate.backfill``, ``_orphans_landed``). Applied
records are deleted later, in batches, outside the write transactions.
When PostgreSQL cannot take an entry, the record stays and a background
replayer applies the queue in order, with backoff, until it lands; a write
that can never land is parked and reported, and the queue goes on. The
replayer never takes the records this process's writes are applying
themselves (no record is applied twice at once). :meth:`DualDatabase.flush`
waits for the queued entries; ``close()`` applies them (for at most
:data:`CLOSE_DRAIN_SECONDS`; what is left stays in the outbox for the next
run).

Reads go to ``DB_DUAL_READ_PRIMARY``, except that while any outbox record
remains (of any process: the outbox is in the shared file) or PostgreSQL is
unreachable they go to SQLite, so a client never reads older data than it
wrote. ``DB_DUAL_SHADOW_RATE`` of the reads also run on the other store and
are compared (:mod:`.shadow`); counters persist in the SQLite file.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable

from ..config import Settings
from ..convert import format_timestamp
from ..errors import GovdbError, StoreUnavailableError
from ..records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery, DiscoveryLink,
    Health, Identity, Session, ToolUsage,
)
from . import outbox, shadow
from .base import Database
from .dual_sync import Applier, TransientError, describe, is_lock_conflict
from .postgres import PostgresDatabase
from .sqlite import WRITE_HOOK, SQLiteDatabase, _bool, _ts

log = logging.getLogger(__name__)

#: Entries applied per PostgreSQL transaction by the replayer.
REPLAY_BATCH = 200
#: Most entries the background applier puts in one PostgreSQL transaction.
APPLY_BATCH = 200
#: How long the background applier lets writes gather before each batch (seconds): the
#: statements of a batch are set-based, so fewer, larger batches cost less per write.
APPLY_LINGER = 0.05
#: Entries queued in memory beyond this are left to the replayer (they are in the outbox).
MAX_QUEUED = 20_000
#: Applied records are deleted from the outbox once this many have gathered (or on the poll).
DELETE_BATCH = 256
#: How long close() goes on applying queued entries before leaving them to the next run.
CLOSE_DRAIN_SECONDS = 5.0
#: Backoff between replay attempts while PostgreSQL is unavailable (seconds).
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
#: How often the replayer looks at the queue unasked (entries of crashed processes), and
#: deletes applied records / flushes shadow counters when no write carries them.
POLL_SECONDS = 1.0
#: Entries younger than this are left to the process that wrote them (it applies them itself).
ORPHAN_AGE_SECONDS = 5.0
SEQUENCE_SYNC_SECONDS = 5.0
#: Tries of a write's apply that lost a lock conflict before it is left to the replayer.
LOCK_CONFLICT_TRIES = 3

#: Write primitives that are the SQLite write with its outbox record (``_dual``), as they are.
_WRITES = (
    "_create_identity", "_update_identity_status", "_update_identity", "_create_session", "_touch_session",
    "_end_session", "_record_agent_state", "_update_calibration", "_append_audit_event", "_record_tool_usage",
    "_add_discovery", "_update_discovery_status", "_link_discoveries", "_create_dialectic_session",
    "_assign_reviewer", "_add_dialectic_message", "_set_dialectic_phase", "_resolve_dialectic_session",
)
_READS = (
    "_get_identity", "_list_identities", "_get_api_key_hash", "_get_lineage", "_list_children", "_get_session",
    "_get_active_sessions", "_get_latest_agent_state", "_get_agent_state_history", "_get_calibration",
    "_query_audit_events", "_search_audit_events", "_query_tool_usage", "_get_tool_stats", "_get_discovery",
    "_search_discoveries", "_get_neighbors", "_get_response_chain", "_get_dialectic_session",
    "_get_active_dialectic_sessions",
)


@dataclass
class ReplayResult:
    """What one drain of the queue did."""

    applied: int = 0
    parked: int = 0
    pending: int = 0
    lock_conflicts: int = 0                 # batches tried again after losing a lock conflict
    error: str | None = None
    parked_now: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq, table, key, error


@dataclass
class _Expired:
    count: int
    session_ids: list[str]


def _rows_for(conn: Any, result: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """Return the (legacy table, key) rows a write primitive's result names."""
    if isinstance(result, Identity):
        return [("agent_metadata", (result.agent_id,))]
    if isinstance(result, Session):
        return [("session_identities", (result.session_id,))]
    if isinstance(result, AgentState):
        return [("agent_state", (result.id,))]
    if isinstance(result, Calibration):
        return [("calibration_state", (1,))]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], AuditEvent):
        # A repeat (deduplicated) wrote nothing; a fresh event is the last row inserted.
        return [("audit_events", (_last_rowid(conn),))] if result[1] else []
    if isinstance(result, ToolUsage):
        return [("tool_usage", (_last_rowid(conn),))]
    if isinstance(result, Discovery):
        return [("discoveries", (result.id,))]
    if isinstance(result, DiscoveryLink):
        return [("discovery_edges", (result.src_id, result.dst_id, result.edge_type))]
    if isinstance(result, DialecticSession):
        return [("dialectic_sessions", (result.session_id,))]
    if isinstance(result, DialecticMessage):  # the message also moves its session's round and updated_at
        return [("dialectic_sessions", (result.session_id,)), ("dialectic_messages", (result.id,))]
    if isinstance(result, _Expired):
        return [("session_identities", (s,)) for s in result.session_ids]
    raise AssertionError(f"no outbox rows for a {type(result).__name__}")


def _last_rowid(conn: Any) -> int:
    return int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])


class _Sink:
    """The SQLite write hook of one dual write: records its outbox rows (nothing else: applied
    records are deleted in background batches, off the write path)."""

    def __init__(self, op: str, owned: "_Owned"):
        self.op = op
        self.owned = owned
        self.entries: list[outbox.Entry] = []

    def __call__(self, conn: Any, result: Any) -> None:
        self.entries = outbox.enqueue(conn, self.op, _rows_for(conn, result))
        self.owned.add(self.entries)  # before COMMIT: no replay takes them for another process's leftovers


class _Owned:
    """Seqs of outbox records this process's write path applies itself (queued or in flight):
    the replayer leaves them alone, so no record is applied twice at once. Shared with the
    SQLite thread (a write's hook adds them), hence the lock."""

    def __init__(self) -> None:
        self._seqs: set[int] = set()
        self._lock = threading.Lock()

    def add(self, entries: list[outbox.Entry]) -> None:
        with self._lock:
            self._seqs.update(e.seq for e in entries)

    def discard(self, entries: Any) -> None:
        with self._lock:
            self._seqs.difference_update(e.seq for e in entries)

    def snapshot(self) -> set[int]:
        with self._lock:
            return set(self._seqs)


class DualDatabase(Database):
    """SQLite and PostgreSQL written together; reads from DB_DUAL_READ_PRIMARY."""

    name = "dual"
    supports_copy = False

    def __init__(self, sqlite: SQLiteDatabase, pg: PostgresDatabase, *, read_primary: str = "postgres",
                 shadow_rate: float = 0.0, graph: str = "governance", apply: str = "sync"):
        if apply not in ("background", "sync"):
            raise ValueError(f"apply must be background or sync; got {apply!r}")
        self.sqlite, self.pg = sqlite, pg
        self.apply_mode = apply
        self._queue: deque[outbox.Entry] = deque()  # committed, not yet applied (background mode)
        self._owned = _Owned()  # queued here or being applied by a write: not the replayer's
        self._kick = asyncio.Event()
        self._applier_task: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()
        self.read_primary = read_primary
        self.shadow_rate = shadow_rate
        # The applier reads SQLite on a connection (and thread) of its own: inside its PostgreSQL
        # transaction, holding locks, it must not queue behind the writes on the backend's.
        self._sync_reader = SQLiteDatabase(sqlite.path)
        self.applier = Applier(pg, self._sync_reader, graph)
        self._applied: list[int] = []       # applied records not yet deleted
        self._applied_lock = threading.Lock()  # the SQLite thread takes them in a write's hook
        self._pg_up = False
        self._wake = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None
        self._drain_lock = asyncio.Lock()
        self._shadow_counts: dict[str, list[int]] = {}
        self._last_sequence_sync = 0.0
        self._applied_since_sync = False
        self._closing = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "DualDatabase":
        return cls(SQLiteDatabase(settings.sqlite_path), PostgresDatabase.from_settings(settings),
                   read_primary=settings.dual_read_primary, shadow_rate=settings.dual_shadow_rate,
                   graph=settings.age_graph, apply=settings.dual_apply)

    def __repr__(self) -> str:
        return f"DualDatabase({self.sqlite!r}, {self.pg!r}, reads={self.read_primary}, apply={self.apply_mode})"

    @property
    def supports_graph(self) -> bool:  # type: ignore[override]
        return self.pg.supports_graph

    @property
    def queued(self) -> int:
        """Writes of this process acknowledged and waiting for the background applier."""
        return len(self._queue)

    # -- lifecycle -------------------------------------------------------

    async def connect(self) -> None:
        """Open SQLite (with the outbox) and PostgreSQL; a PostgreSQL that is down is retried in the background."""
        if self._replayer is not None:
            return
        self._closing = False
        await self.sqlite.connect()
        await self._sync_reader.connect()
        await self.sqlite._write(outbox.ensure_tables)
        await self._connect_pg()
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._drop_queue()
        loop = asyncio.get_running_loop()
        self._replayer = loop.create_task(self._replay_loop(), name="govdb-dual-replay")
        if self.apply_mode == "background":
            self._applier_task = loop.create_task(self._apply_loop(), name="govdb-dual-apply")
        self._wake.set()  # entries left by an earlier run

    async def _connect_pg(self) -> bool:
        try:
            await self.pg.connect()
        except StoreUnavailableError as exc:
            if not self._pg_up and self._replayer is None:
                log.warning("PostgreSQL connect failed (%s); writes are queued in the SQLite outbox until it"
                            " answers", describe(exc))
            self._pg_up = False
            return False
        self._pg_up = True
        return True

    async def close(self) -> None:
        """Apply the queued writes (for at most CLOSE_DRAIN_SECONDS; the rest stays in the outbox),
        stop the background tasks, delete applied records, save shadow counters, close both stores."""
        applier, self._applier_task = self._applier_task, None
        if applier is not None:
            try:
                await asyncio.wait_for(self.flush(), CLOSE_DRAIN_SECONDS)
            except asyncio.TimeoutError:
                log.warning("dual close: %d queued writes not applied within %.0f s; they stay in the outbox"
                            " and are replayed by the next run", len(self._queue), CLOSE_DRAIN_SECONDS)
            except GovdbError as exc:
                log.warning("dual close: applying queued writes failed (%s); they stay in the outbox",
                            describe(exc))
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)
            self._drop_queue()
        task, self._replayer = self._replayer, None
        self._closing = True
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                await self._housekeeping(force=True)
            except GovdbError as exc:
                log.warning("dual close: bookkeeping failed (%s)", describe(exc))
        await self.pg.close()
        await self._sync_reader.close()
        await self.sqlite.close()

    async def health(self) -> Health:
        lite, pg = await self.sqlite.health(), await self.pg.health()
        figures = await self.sqlite._read(outbox.figures) if self.sqlite._conn is not None else {}
        details = {"sqlite_ok": lite.ok, "postgres_ok": pg.ok, "read_primary": self.read_primary,
                   "pending": figures.get("pending"), "parked": figures.get("parked"),
                   **{f"sqlite_{k}": v for k, v in lite.details.items()},
                   **{f"postgres_{k}": v for k, v in pg.details.items()}}
        return Health(self.name, lite.ok and pg.ok, pg.graph, pg.schema_version, details)

    # -- writes ------------------------------------------------------------

    def _take_applied(self) -> list[int]:
        with self._applied_lock:
            done, self._applied = self._applied, []
        return done

    def _give_back(self, seqs: list[int]) -> None:
        if seqs:
            with self._applied_lock:
                self._applied.extend(seqs)

    def _drop_queue(self) -> None:
        """Leave the queued entries to the replayer (they are in the outbox)."""
        self._owned.discard(self._queue)
        self._queue.clear()

    async def _dual(self, op: str, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        sink = _Sink(op, self._owned)
        token = WRITE_HOOK.set(sink)
        try:
            result = await call(*args)
        except BaseException:
            self._owned.discard(sink.entries)  # rolled back (or committed and left to the replayer)
            raise
        finally:
            WRITE_HOOK.reset(token)
        if not sink.entries:
            return result
        if self._applier_task is None:  # DB_DUAL_APPLY=sync
            try:
                await self._apply_now(op, sink.entries)
            finally:
                self._owned.discard(sink.entries)
            if len(self._applied) >= DELETE_BATCH:
                try:
                    await self._flush_applied()
                except GovdbError as exc:  # the write is committed: the replayer's poll deletes them later
                    log.warning("dual: deleting applied outbox records failed (%s); retried later", describe(exc))
        elif not self._pg_up:
            self._owned.discard(sink.entries)  # the replayer applies the outbox once PostgreSQL answers
        elif len(self._queue) >= MAX_QUEUED:
            log.warning("dual: %d writes wait for PostgreSQL; later ones are left to the replayer", len(self._queue))
            self._owned.discard(sink.entries)
            self._wake.set()
        else:
            self._queue.extend(sink.entries)
            self._kick.set()
        return result

    async def flush(self) -> None:
        """Wait until the writes acknowledged so far were applied to PostgreSQL, or left to the
        replayer (PostgreSQL down, or an entry failed: see :meth:`replay`)."""
        await self._apply_queued()

    async def _apply_loop(self) -> None:
        """The background applier: group-commit what the writes queued (see the module docstring)."""
        while True:
            await self._kick.wait()
            if len(self._queue) < APPLY_BATCH:
                await asyncio.sleep(APPLY_LINGER)  # group commit: fewer, larger PostgreSQL transactions
            self._kick.clear()
            await self._apply_queued(batches=1)
            if self._queue:
                self._kick.set()

    async def _apply_queued(self, batches: int | None = None) -> None:
        """Apply the queue (or its first ``batches`` batches)."""
        async with self._apply_lock:
            while self._queue and (batches is None or batches > 0):
                batches = None if batches is None else batches - 1
                if not self._pg_up:
                    self._drop_queue()  # the replayer applies the outbox once PostgreSQL answers
                    return
                n = min(len(self._queue), APPLY_BATCH)
                batch = sorted((self._queue.popleft() for _ in range(n)), key=lambda e: e.seq)
                try:
                    await self._apply_now(batch[0].op if n == 1 else "write", batch)
                    if len(self._applied) >= DELETE_BATCH:
                        await self._flush_applied()
                except Exception as exc:  # noqa: BLE001 - the entries are in the outbox: the replayer has them
                    log.warning("dual apply failed (%s); left to the replayer", describe(exc))
                    self._drop_queue()
                    self._wake.set()
                    return
                finally:
                    self._owned.discard(batch)

    async def _apply_now(self, op: str, entries: list[outbox.Entry]) -> None:
        """Apply a committed write's entries to PostgreSQL, or leave them to the replayer."""
        if not self._pg_up:
            return  # the replayer, in its backoff, applies them once PostgreSQL answers
        for attempt in range(1, LOCK_CONFLICT_TRIES + 1):
            try:
                failed = await self.applier.apply(entries)
                break
            except TransientError as exc:
                if is_lock_conflict(exc) and attempt < LOCK_CONFLICT_TRIES:
                    await asyncio.sleep(0.002 * attempt * random.uniform(1, 2))
                    continue  # lost a lock conflict (e.g. a deadlock with a replay batch): PostgreSQL is fine
                if not is_lock_conflict(exc):
                    self._pg_up = False
                _log_failure(op, entries, exc, "queued for replay")
                self._wake.set()
                return
        if failed:
            # Possibly only an earlier queued write it depends on: the replayer goes in order,
            # and parks what fails there again.
            _log_failure(op, [e for e in entries if e.seq in failed], failed, "left to the replayer")
            self._wake.set()
        self._give_back([e.seq for e in entries if e.seq not in failed])
        self._applied_since_sync = True

    async def _expire_sessions(self, now: datetime) -> int:
        cond = f"{_bool('is_active', 1)} AND {_ts('expires_at')} <= ?"

        def tx(conn: Any) -> _Expired:
            at = format_timestamp(now)
            ids = [r[0] for r in conn.execute(f"SELECT session_id FROM session_identities WHERE {cond}", (at,))
                   if isinstance(r[0], str)]
            count = conn.execute(f"UPDATE session_identities SET is_active = 0 WHERE {cond}", (at,)).rowcount
            return _Expired(count, ids)
        result: _Expired = await self._dual("expire_sessions", self.sqlite._write, tx)
        return result.count

    # -- reads -------------------------------------------------------------

    async def in_step(self) -> bool:
        """Return whether PostgreSQL holds every acknowledged write: it answers and no outbox
        record of any process remains (the outbox is in the shared SQLite file)."""
        return self._pg_up and not await self.sqlite._read(outbox.has_backlog, self._applied_snapshot())

    async def _route(self, name: str, *args: Any) -> Any:
        wants_pg = self.read_primary == "postgres"
        in_step = await self.in_step() if wants_pg or self.shadow_rate > 0 else False
        primary: Database = self.pg if wants_pg and in_step else self.sqlite
        try:
            result = await getattr(primary, name)(*args)
        except StoreUnavailableError as exc:
            if primary is not self.pg:
                raise
            self._pg_up = False
            self._wake.set()
            log.warning("PostgreSQL %s failed (%s); read from SQLite", name.lstrip("_"), describe(exc))
            return await getattr(self.sqlite, name)(*args)
        if in_step and self.shadow_rate > 0 and name not in shadow.NOT_SHADOWED \
                and random.random() < self.shadow_rate:
            await self._shadow(name, primary, args, result)
        return result

    def _applied_snapshot(self) -> list[int]:
        with self._applied_lock:
            return list(self._applied)

    async def _shadow(self, name: str, primary: Database, args: tuple[Any, ...], result: Any) -> None:
        other: Database = self.sqlite if primary is self.pg else self.pg
        op = name.lstrip("_")
        counts = self._shadow_counts.setdefault(op, [0, 0])
        try:
            theirs = await getattr(other, name)(*args)
        except GovdbError as exc:
            theirs = exc
        counts[0] += 1
        if isinstance(theirs, GovdbError) or not shadow.same(name, result, theirs):
            counts[1] += 1
            log.warning("shadow read %s differs between %s and %s (keys %s)", op, primary.name, other.name,
                        ", ".join(shadow.keys_of(result)) or "-")

    def shadow_counts(self) -> dict[str, tuple[int, int]]:
        """Return shadow (reads, mismatches) per operation counted in this process and not yet saved."""
        return {op: (c[0], c[1]) for op, c in self._shadow_counts.items()}

    # -- the replayer --------------------------------------------------------

    async def _replay_loop(self) -> None:
        delay = BACKOFF_MIN
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS if self._pg_up else delay)
            except asyncio.TimeoutError:
                pass
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                await self._housekeeping()
                if not self._pg_up and not await self._connect_pg():
                    delay = min(delay * 2, BACKOFF_MAX) * random.uniform(0.8, 1.2)
                    continue
                result = await self.replay(min_age=None if woken or not self._pg_up else ORPHAN_AGE_SECONDS,
                                           flush=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the replayer must outlive any one failure
                log.warning("dual replay failed (%s); retrying", describe(exc))
                result = ReplayResult(error=describe(exc))
            if result.error:
                self._pg_up = False
                delay = min(delay * 2, BACKOFF_MAX) * random.uniform(0.8, 1.2)
            else:
                self._pg_up = True
                delay = BACKOFF_MIN

    async def _housekeeping(self, *, force: bool = False) -> None:
        """Delete applied records, save shadow counters, move sequences past the ids written."""
        done = self._take_applied()
        counts, self._shadow_counts = self._shadow_counts, {}
        if done or counts:
            def tx(conn: Any) -> None:
                outbox.delete(conn, done)
                if counts:
                    outbox.add_shadow_counts(conn, {op: (c[0], c[1]) for op, c in counts.items()})
            try:
                await self.sqlite._write(tx)
            except BaseException:
                self._give_back(done)
                for op, c in counts.items():
                    mine = self._shadow_counts.setdefault(op, [0, 0])
                    mine[0] += c[0]
                    mine[1] += c[1]
                raise
        now = time.monotonic()
        if self._applied_since_sync and self._pg_up and (force or now - self._last_sequence_sync > SEQUENCE_SYNC_SECONDS):
            await self.sync_sequences()
            self._last_sequence_sync = now

    async def _flush_applied(self) -> None:
        done = self._take_applied()
        if done:
            try:
                await self.sqlite._write(outbox.delete, done)
            except BaseException:
                self._give_back(done)
                raise

    async def sync_sequences(self) -> None:
        """Move PostgreSQL's id sequences past every id written, so ids it makes after cutover are new."""
        try:
            async with self.pg.acquire() as conn:
                await conn.execute("SELECT core.sync_identity_sequences()")
            self._applied_since_sync = False
        except StoreUnavailableError as exc:
            log.warning("PostgreSQL sync_identity_sequences failed (%s); retried later", describe(exc))

    async def replay(self, *, min_age: float | None = None,
                     progress: Callable[[int, int], None] | None = None, flush: bool = True) -> ReplayResult:
        """Apply the queued entries in order until none is left (or PostgreSQL fails).

        Entries that can never land are parked and the drain goes on. With
        ``min_age``, only entries at least that old (seconds) are taken.
        ``progress(done, parked)`` is called after each batch. It takes the
        entries queued when it starts (later ones are live writes, applied by
        their writers, or the next drain's), never those this process's writes
        are applying themselves; with ``flush`` it first waits for this
        process's queued writes (:meth:`flush`).
        """
        if flush:
            await self.flush()
        async with self._drain_lock:
            res = ReplayResult()
            after = 0
            upto = await self.sqlite._read(outbox.last_seq)
            while after < upto:
                skip = self._owned.snapshot()
                skip.update(self._applied_snapshot())
                page = await self.sqlite._read(outbox.pending, REPLAY_BATCH, after, upto)
                if not page:
                    break
                batch = [e for e in page if e.seq not in skip]
                if min_age is not None:
                    cutoff = format_timestamp(_utcnow_minus(min_age))
                    batch = [e for e in batch if e.enqueued_at <= cutoff]
                if not batch:
                    after = page[-1].seq
                    continue
                if self.pg._pool is None and not await self._connect_pg():
                    res.error = "PostgreSQL is not reachable"
                    break
                try:
                    failed = await self.applier.apply(batch)
                except TransientError as exc:
                    if is_lock_conflict(exc) and res.lock_conflicts < LOCK_CONFLICT_TRIES:
                        res.lock_conflicts += 1  # lost to a concurrent write: the same batch again
                        await asyncio.sleep(0.005 * res.lock_conflicts * random.uniform(1, 2))
                        continue
                    res.error = describe(exc)
                    _log_failure("replay", batch[:1], exc, "retried with backoff")
                    await self.sqlite._write(outbox.note_attempt, [batch[0].seq], res.error)
                    break
                applied = [e.seq for e in batch if e.seq not in failed]
                parked = [(e.seq, failed[e.seq]) for e in batch if e.seq in failed]

                def tx(conn: Any) -> None:
                    outbox.delete(conn, applied)
                    outbox.park(conn, parked)
                await self.sqlite._write(tx)
                for e in batch:
                    if e.seq in failed:
                        log.error("PostgreSQL %s failed for %s %s: %s; parked (see `govdb dual parked`)",
                                  e.op, e.table, e.key_text, failed[e.seq])
                        res.parked_now.append((e.seq, e.table, e.key_text, failed[e.seq]))
                res.applied += len(applied)
                res.parked += len(parked)
                self._applied_since_sync = True
                self._pg_up = True
                if progress is not None:
                    progress(res.applied, res.parked)
                after = page[-1].seq
            await self._flush_applied()
            figures = await self.sqlite._read(outbox.figures)
            res.pending = figures["pending"]
            if res.error is None and self._applied_since_sync:
                await self.sync_sequences()
            return res

    async def retry_parked(self, seq: int | None = None) -> int:
        """Put parked entries (all, or one) back in the queue; return how many. Replay applies them."""
        n = await self.sqlite._write(outbox.unpark, seq)
        self._wake.set()
        return n

    async def drop_parked(self, seq: int | None = None) -> int:
        """Delete parked entries (all, or one): PostgreSQL will never get those writes."""
        return await self.sqlite._write(outbox.drop_parked, seq)


def _make_read(name: str) -> Callable[..., Awaitable[Any]]:
    async def read(self: DualDatabase, *args: Any) -> Any:
        return await self._route(name, *args)
    read.__name__ = name
    return read


def _make_write(name: str) -> Callable[..., Awaitable[Any]]:
    async def write(self: DualDatabase, *args: Any) -> Any:
        return await self._dual(name.lstrip("_"), getattr(self.sqlite, name), *args)
    write.__name__ = name
    return write


for _name in _READS:
    setattr(DualDatabase, _name, _make_read(_name))
for _name in _WRITES:
    setattr(DualDatabase, _name, _make_write(_name))
abc.update_abstractmethods(DualDatabase)


def _utcnow_minus(seconds: float) -> datetime:
    from datetime import timedelta, timezone
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


def _log_failure(op: str, entries: list[outbox.Entry], why: Any, then: str) -> None:
    for e in entries[:3]:
        reason = why.get(e.seq) if isinstance(why, dict) else describe(why)
        log.warning("PostgreSQL %s failed for %s %s: %s; %s", op, e.table, e.key_text, reason, then)
    if len(entries) > 3:
        log.warning("PostgreSQL %s failed for %d more keys; %s", op, len(entries) - 3, then)
