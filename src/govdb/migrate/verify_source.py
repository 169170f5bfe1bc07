"""Verify's source side: the legacy file read in key ranges and cleaned as the backfill
cleans it (the larger, pure-Python half of a verify), in worker processes so it overlaps
the PostgreSQL side on other cores."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import tzinfo
from typing import Any, Iterator, Mapping, Sequence

from ..errors import GovdbError
from . import MigrationError, SourceError
from .backfill import PARENTS
from .checksums import (
    BATCH, MASK64, MAX_RANGES, NULL_SPAN, ROWS_PER_RANGE, Key, KeyRanges, RowForm, Span, Sums, add_row,
    encode_value, finish, in_span, new_sums, span_where,
)
from .clean import Cleaner, prescan_duplicates
from .source import INTEGER_KEYED, KEYS, LegacySource, decode_key, quote_ident

_KINDS = {"agent_metadata": "agent", "discoveries": "discovery", "dialectic_sessions": "dialectic session"}
_CONTEXT_ATTR = {"agent": "agents", "discovery": "discoveries", "dialectic session": "dialectic_sessions"}


# -- the source side (in a worker process) ------------------------------------------

def _valid_key(key: Key) -> bool:
    """Whether a key can bound a range on every side: text that is UTF-8 without NUL, or an int."""
    for v in key:
        if isinstance(v, str):
            if "\x00" in v:
                return False
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif not isinstance(v, int) or isinstance(v, bool):
            return False
    return True


class _SourceReader:
    """The cleaned source rows; lives in the worker process."""

    def __init__(self, path: str, tz: tzinfo):
        self.source = LegacySource(path)
        self.cleaner = Cleaner(source_tz=tz)
        self.forms: dict[str, RowForm] = {}
        self.recorded: dict[str, set[str]] = {}      # table -> key texts in migrate.quarantine
        self.refused: dict[str, set[Key]] = {}       # table -> keys of rows quarantined while loading
        self.existing: dict[str, set[str]] = {}      # kind -> keys PostgreSQL holds
        self.ok: dict[str, set[str]] = {}            # kind -> keys of source rows that migrate
        self.identities: list[tuple[Key, list]] = []  # cleaned as a whole (cycles): kept for re-reads
        self.prescanned: set[str] = set()

    def setup(self, kinds: Mapping[str, Mapping[str, str]], quarantine: Mapping[str, list[str]],
              existing: Mapping[str, set[str]], tables: Sequence[str]) -> dict[str, tuple[KeyRanges, int]]:
        """Take what PostgreSQL holds; return each table's first split of its keys and its row count."""
        self.forms = {t: RowForm.for_table(t, k) for t, k in kinds.items()}
        self.existing = dict(existing)
        for table, texts in quarantine.items():
            self.recorded[table] = set(texts)
            keys = set()
            for text in texts:
                try:
                    key = decode_key(text)
                    hash(key)
                except (ValueError, TypeError):
                    continue  # {"rowid": n}: a row whose key was NULL, never a migrating row
                keys.add(key)
            self.refused[table] = keys
        return {t: self._plan(t) for t in tables}

    def _plan(self, table: str) -> tuple[KeyRanges, int]:
        if table not in self.source.tables:
            return KeyRanges(), 0
        if table in INTEGER_KEYED:
            lo, hi, n = self.source.execute(f"SELECT min(id), max(id), count(*) FROM {quote_ident(table)}")[0]
            return (KeyRanges() if not n else KeyRanges.even(lo, hi, min(MAX_RANGES, -(-n // ROWS_PER_RANGE)))), n
        keys = self.keys(table, None)
        return KeyRanges.from_keys(keys, max(ROWS_PER_RANGE, -(-len(keys) // MAX_RANGES))), len(keys)

    def duplicates(self, tables: Sequence[str]) -> dict[str, Any]:
        """Find the duplicate event and usage ids (clean.prescan_duplicates); return them for the other workers."""
        with self.source.snapshot():
            prescan_duplicates(self.source, self.cleaner, tables)
        self.prescanned.update(tables)
        ctx = self.cleaner.context
        return {"tables": list(tables), "event_id_owner": ctx.event_id_owner,
                "audit_duplicate_of": ctx.audit_duplicate_of, "usage_id_owner": ctx.usage_id_owner}

    def set_duplicates(self, found: Mapping[str, Any]) -> None:
        ctx = self.cleaner.context
        ctx.event_id_owner, ctx.audit_duplicate_of = found["event_id_owner"], found["audit_duplicate_of"]
        ctx.usage_id_owner = found["usage_id_owner"]
        self.prescanned.update(found["tables"])

    def _prescan(self, table: str) -> None:
        if table in ("audit_events", "tool_usage") and table in self.source.tables and table not in self.prescanned:
            prescan_duplicates(self.source, self.cleaner, (table,))
            self.prescanned.add(table)

    def _ensure_context(self, table: str) -> None:
        ctx = self.cleaner.context
        for parent in PARENTS.get(table, ()):
            kind = _KINDS[parent]
            if kind not in self.ok:
                self._ensure_context(parent)
                with self.source.snapshot():
                    self.ok[kind] = {o.key[0] for outs in self._outcomes(parent) for o in outs
                                     if o.ok and o.key not in self.refused.get(parent, ())}
            setattr(ctx, _CONTEXT_ATTR[kind], self.ok[kind] | self.existing.get(kind, set()))

    def _outcomes(self, table: str, span: Span = None, stream: bool = False) -> Iterator[list]:
        if table not in self.source.tables:
            return
        if table == "agent_metadata":
            yield self.cleaner.clean_identities(self.source.rows(table), existing_agents=self.existing.get("agent", ()))
        elif span is None:
            for rows in self.source.batches(table, None, BATCH):
                yield self.cleaner.clean_many(table, rows)
        elif stream:  # a large span of an integer-keyed table: read in batches, not at once
            lo, hi = span
            for rows in self.source.batches(table, None if lo is None else (lo[0] - 1,), BATCH):
                if hi is not None and rows[-1]["id"] >= hi[0]:
                    rows = [r for r in rows if r["id"] < hi[0]]
                    if rows:
                        yield self.cleaner.clean_many(table, rows)
                    return
                yield self.cleaner.clean_many(table, rows)
        else:
            typed = " AND ".join(f"typeof({quote_ident(k)}) = 'text'" for k in KEYS[table]) \
                if table not in INTEGER_KEYED else ""
            where, args = span_where(KEYS[table], span, lambda n: "?" if typed == "" else "CAST(? AS TEXT)", typed)
            args = [a.encode("utf-8") if isinstance(a, str) else a for a in args]
            cols = ["_rowid", *self.source.columns[table]]
            order = ", ".join(quote_ident(k) for k in KEYS[table])
            rows = self.source.execute(f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {where}"
                                       f" ORDER BY {order}", args)
            for i in range(0, len(rows), BATCH):
                yield self.cleaner.clean_many(table, [dict(zip(cols, r)) for r in rows[i:i + BATCH]])

    def _expected(self, table: str, span: Span) -> Iterator[list]:
        """Yield the normalised rows that should be in PostgreSQL (span None: the whole table)."""
        if table == "agent_metadata" and span is not None:
            yield [n for k, n in self.identities if in_span(k, span)]
            return
        self._ensure_context(table)
        self._prescan(table)
        refused, form = self.refused.get(table, ()), self.forms[table]
        for outs in self._outcomes(table, span):
            yield [form.normalise(o.values) for o in outs if o.ok and o.key not in refused]

    def scan(self, table: str, ranges: KeyRanges, span: Span, max_diffs: int) -> dict[str, Any]:
        """Read the table (or a span of an integer-keyed one): counts, checksums per range,
        quarantine cross-check, graph counts."""
        started = time.perf_counter()
        self._ensure_context(table)
        form, sums = self.forms[table], new_sums(ranges)
        recorded, refused = self.recorded.get(table, set()), self.refused.get(table, set())
        res: dict[str, Any] = {"source_rows": 0, "quarantined": 0, "refused": 0, "matched": 0,
                               "unrecorded": [], "unrecorded_count": 0}
        graph: Counter[str] = Counter()
        tags: set[str] = set()
        ok: set[str] = set()
        col = form.columns.index
        with self.source.snapshot():
            self._prescan(table)
            for outs in self._outcomes(table, span, stream=True):
                res["source_rows"] += len(outs)
                good = []
                for o in outs:
                    if not o.ok:
                        res["quarantined"] += 1
                        text = o.key_text
                        if text in recorded:
                            res["matched"] += 1
                        else:
                            res["unrecorded_count"] += 1
                            if len(res["unrecorded"]) < max_diffs:
                                res["unrecorded"].append((tuple(json.loads(text)), f"{o.kind}: {o.reason}"))
                    elif refused and o.key in refused:
                        res["refused"] += 1
                        res["matched"] += 1
                    else:
                        good.append(o.values)
                        if table in _KINDS:
                            ok.add(o.key[0])
                norms = [form.normalise(v) for v in good]
                for norm in norms:
                    add_row(sums, ranges, form.key(norm), norm)
                if table == "agent_metadata":
                    self.identities += [(form.key(n), n) for n in norms]
                    graph["Agent"] += len(norms)
                    graph["SPAWNED"] += sum(n[col("parent_agent_id")] is not None for n in norms)
                    for n in norms:
                        graph["HAS_TAG"] += len(set(n[col("tags")]))
                        tags.update(n[col("tags")])
                elif table == "discoveries":
                    graph["Discovery"] += len(norms)
                elif table == "discovery_tags":
                    graph["HAS_TAG"] += len(norms)
                    tags.update(n[col("tag")] for n in norms)
                elif table == "discovery_edges":
                    graph.update(n[col("edge_type")].upper() for n in norms)  # related_to -> RELATED_TO
                elif table == "dialectic_sessions":
                    graph["DialecticSession"] += len(norms)
                    graph["PAUSED_AGENT"] += len(norms)
                    graph["REVIEWER"] += sum(n[col("reviewer_agent_id")] is not None for n in norms)
                elif table == "dialectic_messages":
                    for label in ("DialecticMessage", "HAS_MESSAGE", "WROTE"):
                        graph[label] += len(norms)
        if table in _KINDS and span is None:
            self.ok[_KINDS[table]] = ok
        res.update(sums=finish(sums), graph=dict(graph), tags=tags, seconds=time.perf_counter() - started)
        return res

    def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums:
        sums, form = new_sums(ranges), self.forms[table]
        for norms in self._expected(table, span):
            for norm in norms:
                add_row(sums, ranges, form.key(norm), norm)
        return finish(sums)

    def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]:
        form = self.forms[table]
        return [(form.key(n), n) for norms in self._expected(table, span) for n in norms][:limit]

    def keys(self, table: str, span: Span) -> list[Key]:
        if table not in self.source.tables or span == NULL_SPAN:
            return []
        keys = KEYS[table]
        typed = "" if table in INTEGER_KEYED else " AND ".join(f"typeof({quote_ident(k)}) = 'text'" for k in keys)
        where, args = span_where(keys, span, lambda n: "?" if not typed else "CAST(? AS TEXT)", typed)
        if span is None and typed:
            where = typed
        args = [a.encode("utf-8") if isinstance(a, str) else a for a in args]
        cols = ", ".join(quote_ident(k) for k in keys)
        found = self.source.execute(f"SELECT {cols} FROM {quote_ident(table)} WHERE {where} ORDER BY {cols}", args)
        return [k for k in map(tuple, found) if _valid_key(k)]


_READER: _SourceReader | None = None


def _worker(method: str, *args: Any) -> Any:
    """Run ``method`` of the worker's reader (``open`` creates it)."""
    global _READER
    try:
        if method == "open":
            _READER = _SourceReader(*args)
            return None
        assert _READER is not None
        return getattr(_READER, method)(*args)
    except sqlite3.Error as exc:
        raise SourceError(f"cannot read the SQLite file ({type(exc).__name__}: {exc})") from None
    except GovdbError as exc:
        raise MigrationError(str(exc)) from None  # some subclasses do not pickle


class SourceSide:
    """The cleaned source, read in worker processes (one pool each, so calls to a worker run in order).

    Worker 0 reads every table whole; audit_events and tool_usage, which need
    no parent keys, are also split by key span over the other workers.
    Differences are narrowed on worker 0.
    """

    def __init__(self, pools: Sequence[ProcessPoolExecutor]):
        self._pools = list(pools)

    @property
    def workers(self) -> int:
        return len(self._pools)

    async def call(self, method: str, *args: Any, worker: int = 0) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pools[worker], _worker, method, *args)
        except BrokenProcessPool:
            raise MigrationError("a process reading the SQLite file died (out of memory?)") from None

    async def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums:
        return await self.call("checksums", table, ranges, span)

    async def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]:
        return await self.call("rows", table, span, limit)

    async def keys(self, table: str, span: Span) -> list[Key]:
        return await self.call("keys", table, span)

    async def scan_all(self, tables: Sequence[str], ranges: Mapping[str, KeyRanges], counts: Mapping[str, int],
                       max_diffs: int) -> dict[str, dict[str, Any]]:
        """Scan every table, the split ones in spans over the workers; return the merged results."""
        split = [t for t in tables if t in SPLIT_TABLES and counts.get(t)] if self.workers > 1 else []
        parts: dict[str, list[asyncio.Future]] = {}

        def scan(table: str, span: Span, worker: int) -> asyncio.Future:
            return asyncio.ensure_future(self.call("scan", table, ranges[table], span, max_diffs, worker=worker))

        found = asyncio.ensure_future(self.call("duplicates", split, worker=self.workers - 1)) if split else None
        for t in tables:
            if t not in split:
                parts[t] = [scan(t, None, 0)]
        told: list[asyncio.Future] = []
        if found is not None:
            dups = await found
            # Tasks start in creation order, so each worker gets the maps before its share of the scans.
            told = [asyncio.ensure_future(self.call("set_duplicates", dups, worker=j)) for j in range(self.workers - 1)]
            whole = sum(counts.get(t, 0) for t in tables if t not in split)
            shares = split_shares(self.workers, whole, sum(counts[t] for t in split))
            for t in split:
                parts[t] = [scan(t, span, j) for j, span in enumerate(split_spans(ranges[t], shares)) if span]
        merged = {t: merge_scans([await f for f in fs], max_diffs) for t, fs in parts.items()}
        await asyncio.gather(*told)
        return merged


SPLIT_TABLES = ("audit_events", "tool_usage")
MAX_WORKERS = 4
SPLIT_MIN_ROWS = 200_000  # below this, one more process costs more than it saves


def split_shares(workers: int, whole_rows: int, split_rows: int) -> list[float]:
    """Return each worker's fraction of the split rows; worker 0 also reads ``whole_rows``."""
    if workers < 2 or split_rows <= 0:
        return [1.0]
    per = (whole_rows + split_rows) / workers
    first = min(float(split_rows), max(0.0, per - whole_rows))
    rest = (split_rows - first) / (workers - 1)
    return [first / split_rows] + [rest / split_rows] * (workers - 1)


def split_spans(ranges: KeyRanges, shares: Sequence[float]) -> list[Span]:
    """Cut the ranges (not the NULL slot) into consecutive spans of about ``shares`` of them; None = no share."""
    slots = len(ranges.bounds) + 1
    cuts, total = [0], 0.0
    for share in shares:
        total += share
        cuts.append(min(slots, round(total * slots)))
    cuts[-1] = slots
    spans: list[Span] = []
    for a, b in zip(cuts, cuts[1:]):
        spans.append(None if b <= a else (ranges.span(a)[0], ranges.span(b - 1)[1]))
    return spans


def merge_scans(parts: Sequence[dict[str, Any]], max_diffs: int) -> dict[str, Any]:
    """Add up the scans of one table's spans."""
    out = dict(parts[0])
    for p in parts[1:]:
        for k in ("source_rows", "quarantined", "refused", "matched", "unrecorded_count"):
            out[k] += p[k]
        out["sums"] = [[a[0] + b[0], (a[1] + b[1]) & MASK64] for a, b in zip(out["sums"], p["sums"])]
        out["unrecorded"] = out["unrecorded"] + p["unrecorded"]
        out["graph"] = dict(Counter(out["graph"]) + Counter(p["graph"]))
        out["tags"] = out["tags"] | p["tags"]
    out["unrecorded"] = sorted(out["unrecorded"], key=lambda u: [
        (0, k, "") if isinstance(k, (int, float)) else (1, 0, encode_value(k)) for k in u[0]])[:max_diffs]
    return out


