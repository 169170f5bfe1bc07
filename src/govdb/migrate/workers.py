"""The backfill's worker processes: they read ranges of the source and clean
them into COPY text (the CPU-heavy part of a backfill), so a run uses every core.
They never write to PostgreSQL; the run does, in key order (backfill.py).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import os
import pickle
import signal
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from . import MigrationError, SourceError
from .clean import Cleaner, prescan_duplicates
from .copytext import copy_column, copy_lines
from .report import first_line
from .source import LegacySource
from .targets import TARGETS, Outcome

#: Partitioned targets: their rows' months are reported with each batch.
PARTITIONED = {"audit_events": "audit.events", "tool_usage": "audit.tool_usage"}


@dataclass
class Batch:
    """One cleaned batch: COPY text of the rows to load, and what to record about the rest."""

    read: int                                   # source rows in the batch
    last_key: tuple[Any, ...]                   # the checkpoint after it
    keys: list[tuple[Any, ...]]                 # key of each row to load, in payload order
    payload: bytes                              # COPY text (one line a row) of the target's columns
    hashes: bytes                               # audit_events: COPY text of audit.event_hashes
    key_texts: list[str] | None                 # encode_key of each row to load (to clear earlier records)
    quarantined: list[tuple[str, str, str, str]]        # key text, kind, reason, raw row
    repaired: list[tuple[tuple[Any, ...], str, list[tuple[Any, ...]]]]  # key, key text, repairs
    months: list[date]                          # months of the rows (partitioned tables)
    notes: Counter[str] = field(default_factory=Counter)



def pack(table: str, outs: list[Outcome], last_key: tuple[Any, ...], key_texts: bool) -> Batch:
    """Return cleaned rows as a :class:`_Batch` (in a worker process, or here for identities)."""
    ok = [o for o in outs if o.ok]
    cols = TARGETS[table].columns
    fields = [copy_column(c) for c in zip(*(o.values for o in ok))] if ok else [[] for _ in cols]  # type: ignore[misc]
    hashes, months = b"", []
    if table == "audit_events":
        hashes = copy_lines(fields[cols.index("raw_hash")], fields[cols.index("event_id")], fields[cols.index("ts")])
    if table in PARTITIONED:  # the month of each ts, from its ISO text
        months = sorted(date(int(m[:4]), int(m[5:7]), 1) for m in {ts[:7] for ts in fields[cols.index("ts")]})
    return Batch(
        read=len(outs), last_key=tuple(last_key), keys=[o.key for o in ok], payload=copy_lines(*fields),
        hashes=hashes, key_texts=[o.key_text for o in ok] if key_texts else None,
        quarantined=[(o.key_text, o.kind or "", o.reason or "", o.raw_text()) for o in outs if not o.ok],
        repaired=[(o.key, o.key_text, [tuple(r) for r in o.repairs]) for o in ok if o.repairs],
        months=months)



_FRAME = struct.Struct("!Q")


class Workers:
    """Processes that read and clean batches of the source (the CPU-heavy part of a backfill)
    so that a run uses every core. They never write to PostgreSQL: the run does, in key order.

    Jobs wait in priority order (a lower number first: the biggest table's stream, whose
    load and index builds take longest, so that they overlap the rest). Jobs and answers are
    pickled frames over each worker's stdin and stdout; a worker ends when its stdin closes
    (so with this process) and, on Linux, when this process dies.
    """

    def __init__(self, size: int):
        self.size = max(1, size)
        self._procs: list[asyncio.subprocess.Process] = []
        self._idle: list[asyncio.subprocess.Process] = []
        self._waiting: list[tuple[int, int, dict[str, Any], asyncio.Future[Any]]] = []
        self._serving: set[asyncio.Task[None]] = set()
        self._count = itertools.count()

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        for _ in range(self.size):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from govdb.migrate.workers import _worker_main; _worker_main()",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
            self._procs.append(proc)
            self._idle.append(proc)

    async def run(self, job: dict[str, Any], priority: int = 0) -> Any:
        """Run one job on a worker; return its answer or raise its error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._count), job, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._idle and self._waiting:
            *_, job, future = heapq.heappop(self._waiting)
            if future.cancelled():
                continue
            task = asyncio.ensure_future(self._serve(self._idle.pop(), job, future))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, proc: asyncio.subprocess.Process, job: dict[str, Any], future: asyncio.Future[Any]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            data = pickle.dumps(job, pickle.HIGHEST_PROTOCOL)
            proc.stdin.write(_FRAME.pack(len(data)) + data)
            await proc.stdin.drain()
            size, = _FRAME.unpack(await proc.stdout.readexactly(_FRAME.size))
            ok, value = pickle.loads(await proc.stdout.readexactly(size))
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()  # stopped mid-job: its frames are out of step
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller; this worker is not used again
            if proc.returncode is None:
                proc.kill()
            if not future.done():
                future.set_exception(MigrationError(
                    f"a backfill worker process ended unexpectedly (exit status {proc.returncode});"
                    " rerun with --resume") if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError))
                    else exc)
            return
        self._idle.append(proc)
        self._dispatch()
        if future.done():
            return  # its caller went away
        if ok:
            future.set_result(value)
        else:
            kind, message = value
            future.set_exception(SourceError(message) if kind == "SourceError" else MigrationError(
                f"a backfill worker failed ({kind}: {message})"))

    async def close(self) -> None:
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        for proc in self._procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _worker_main() -> None:
    """Serve the jobs of :class:`Workers` until stdin closes (the entry point of a worker process)."""
    _end_with_parent()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    # A batch is tens of thousands of live objects without cycles: the cyclic collector would
    # scan them over and over (a fifth of the time). Collect between jobs instead.
    gc.disable()
    sources: dict[str, LegacySource] = {}
    jobs = 0
    while True:
        jobs += 1
        if jobs % 16 == 0:
            gc.collect()
        head = inp.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        job = pickle.loads(inp.read(_FRAME.unpack(head)[0]))
        try:
            reply: tuple[bool, Any] = (True, _work(sources, job))
        except Exception as exc:  # noqa: BLE001 - the parent raises it
            reply = (False, (type(exc).__name__, first_line(exc)))
        data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        out.write(_FRAME.pack(len(data)) + data)
        out.flush()


def _work(sources: dict[str, LegacySource], job: dict[str, Any]) -> Any:
    """Do one job in a worker process: prescan, bounds, or read and clean one range of rows."""
    source = sources.get(job["path"])
    if source is None:
        source = sources[job["path"]] = LegacySource(job["path"])
    op, table = job["op"], job["table"]
    if op == "bounds":
        return source.bounds(table, job["after"], job["size"])
    cleaner = Cleaner(source_tz=job["tz"], context=job.get("context"))
    if op == "prescan":
        with source.snapshot():
            prescan_duplicates(source, cleaner, (table,))
        return cleaner.context
    if op == "odd":
        rows, last = source.odd_rows(table), ()
    else:
        rows, last = source.between(table, job["lo"], job["hi"]), job["hi"]
    batch = pack(table, cleaner.clean_many(table, rows), last, job["key_texts"])
    batch.notes = cleaner.notes
    return batch


def _end_with_parent() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the run (and so its workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: end with the parent
    except (OSError, AttributeError):
        pass  # not Linux: the closed stdin ends the worker after its job
