"""Verify a migration: the legacy SQLite file, cleaned, against PostgreSQL.

Both sides reduce each row to one canonical text (:class:`RowForm`, the same
code for both: the source side is the legacy row after :mod:`.clean`, so the
backfill's repairs apply and quarantined rows drop out), hash it to 64 bits
and add the hashes per key range: order-independent, memory per range, not
per row. Ranges whose count or sum differ are bisected, re-reading only them
on both sides, until small enough to compare row by row and name each key:
missing in PostgreSQL, extra there, or changed (with its columns).
Quarantined rows are matched against ``migrate.quarantine``; the AGE graph's
node and edge counts against what the cleaned source implies.

The source side (SQLite reading and cleaning, the larger half, pure Python)
runs in a worker process so it overlaps the PostgreSQL side on another core;
a thread would share one core with it under the GIL. PostgreSQL is read in
one read-only REPEATABLE READ transaction: every table from one snapshot.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import multiprocessing
import os
import re
import sqlite3
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from hashlib import blake2b
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import asyncpg

from ..backends.age import EDGE_LABELS, GRAPH_RE, VERTEX_KEYS
from ..config import SecretUrl, Settings, parse_postgres_url
from ..errors import ConfigError, GovdbError, SchemaError, StoreUnavailableError
from . import MigrationError, SourceError
from .backfill import PARENTS, parse_timezone, select_tables
from .clean import TARGETS, Cleaner, prescan_duplicates
from .source import INTEGER_KEYED, KEYS, LegacySource, decode_key, quote_ident

UTC = timezone.utc
Key = tuple
Span = Any  # (lo, hi): lo <= key < hi, None = open; or NULL_SPAN; or None = everything
NULL_SPAN = "null"
ROWS_PER_RANGE = 1_000   # first split of a table's keys
MAX_RANGES = 4_096
LOCAL_ROWS = 2_000       # compare rows once a differing range holds at most this many
BISECT_FACTOR = 16       # a larger differing range is split in this many
BATCH = 5_000
_MASK = (1 << 64) - 1
_KINDS = {"agent_metadata": "agent", "discoveries": "discovery", "dialectic_sessions": "dialectic session"}
_CONTEXT_ATTR = {"agent": "agents", "discovery": "discoveries", "dialectic session": "dialectic_sessions"}
_EXISTING_SQL = {"agent": "SELECT agent_id FROM core.identities", "discovery": "SELECT id FROM core.discoveries",
                 "dialectic session": "SELECT session_id FROM core.dialectic_sessions"}
GRAPH_TABLES = ("agent_metadata", "discoveries", "discovery_tags", "discovery_edges", "dialectic_sessions",
                "dialectic_messages")


# -- the canonical form of a row ------------------------------------------------

def _unserialisable(o: Any) -> Any:
    raise TypeError(f"{type(o).__name__} is not JSON")


try:  # the C encoder itself, made once: JSONEncoder.encode builds one per call
    from json.encoder import c_make_encoder, encode_basestring
    _c_encode = c_make_encoder(None, _unserialisable, encode_basestring, None, ":", ",", True, False, True)
except (ImportError, TypeError):  # no C accelerator
    _c_encode = None
_py_encode = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode


def _encode(value: Any) -> str:
    return "".join(_c_encode(value, 0)) if _c_encode is not None else _py_encode(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _ts(v: datetime) -> int:
    """Microseconds since 1970-01-01 UTC (naive values are UTC)."""
    return (v - _EPOCH if v.tzinfo is not None else v.replace(tzinfo=UTC) - _EPOCH) // _US


def show_timestamp(us: int) -> str:
    return (_EPOCH + us * _US).isoformat(timespec="microseconds")


_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(v: Any) -> str:
    if isinstance(v, str):
        return v if _UUID_TEXT.fullmatch(v) else str(uuid.UUID(v))
    return str(v)


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, (str, bytes)) else v


def _hex(v: Any) -> str:
    return bytes(v).hex()


#: PostgreSQL type -> how a value of a column of that type is normalised (None: as it is).
_NORMALISE: dict[str, Callable[[Any], Any] | None] = {
    "timestamptz": _ts, "timestamp": _ts, "json": _json, "jsonb": _json, "float8": float, "float4": float,
    "int2": int, "int4": int, "int8": int, "uuid": _uuid, "bytea": _hex, "_text": list,
    "bool": None, "text": None, "varchar": None,
}
_TIMESTAMP_TYPES = ("timestamptz", "timestamp")


class RowForm:
    """The canonical form of one table's rows, the same for both sides.

    Values are normalised by their PostgreSQL column type (``kinds``: column ->
    type name): timestamps to microseconds since 1970 UTC, JSON parsed (then
    written with sorted keys), floats as floats (written by repr), UUIDs and
    bytes as text; the row is then one JSON array (:func:`canonical_text`).
    """

    def __init__(self, table: str, columns: Sequence[str], kinds: Mapping[str, str], key: Sequence[str]):
        self.table, self.columns = table, tuple(columns)
        self.kinds = dict(kinds)
        self._conv = [(i, f) for i, c in enumerate(self.columns) if (f := _NORMALISE.get(kinds.get(c, "text")))]
        names = {f: f"f{i}" for i, (_, f) in enumerate(self._conv)}
        exprs = [f"v[{i}]" for i in range(len(self.columns))]
        for i, f in self._conv:
            exprs[i] = f"(None if v[{i}] is None else {names[f]}(v[{i}]))"
        # One generated expression per table: a loop over the columns costs as much as the conversions.
        namespace = {n: f for f, n in names.items()}
        exec(f"def fast(v): return [{', '.join(exprs)}]", namespace)  # noqa: S102 - built from our own names
        self._fast = namespace["fast"]
        self.timestamps = frozenset(i for i, c in enumerate(self.columns) if kinds.get(c) in _TIMESTAMP_TYPES)
        idx = [self.columns.index(k) for k in key]
        self.key: Callable[[Sequence[Any]], Key] = (
            (lambda v, i=idx[0]: (v[i],)) if len(idx) == 1 else (lambda v: tuple(v[i] for i in idx)))

    @classmethod
    def for_table(cls, table: str, kinds: Mapping[str, str]) -> "RowForm":
        target = TARGETS[table]
        return cls(table, target.columns, kinds, target.key)

    def normalise(self, values: Sequence[Any]) -> list[Any]:
        try:
            return self._fast(values)
        except (TypeError, ValueError):
            out = list(values)
            for i, f in self._conv:
                if out[i] is not None:
                    try:
                        out[i] = f(out[i])
                    except (TypeError, ValueError):
                        pass  # left as it is: it then differs from the other side, and is reported
            return out

    def show(self, i: int, value: Any) -> Any:
        """Return a normalised value for people (timestamps as ISO text)."""
        return show_timestamp(value) if i in self.timestamps and isinstance(value, int) else value


def canonical_text(norm: Sequence[Any]) -> str:
    """Return the canonical text of a normalised row (a JSON array, keys sorted)."""
    return _encode(norm)


def row_hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# -- key ranges and checksums -----------------------------------------------------

class KeyRanges:
    """Consecutive key ranges covering [lo, hi); range i is [bounds[i-1], bounds[i]).

    Keys are tuples. One more slot, :attr:`null`, holds keys with a NULL (rows
    PostgreSQL holds without a legacy id). Python orders text by code point,
    as SQLite (BINARY) and PostgreSQL (COLLATE "C") order valid UTF-8.
    """

    def __init__(self, bounds: Sequence[Key] = (), lo: Key | None = None, hi: Key | None = None):
        self.bounds = list(bounds)
        self.lo, self.hi = lo, hi
        self._first: int | None = None
        self._step = 0

    @classmethod
    def even(cls, first: int, last: int, n: int) -> "KeyRanges":
        """Split integer keys first..last into ``n`` ranges of equal width (the outer two open-ended)."""
        n = max(1, min(n, last - first + 1))
        step = -(-(last - first + 1) // n)
        ranges = cls([(first + step * i,) for i in range(1, n) if first + step * i <= last])
        ranges._first, ranges._step = first, step
        return ranges

    @classmethod
    def from_keys(cls, keys: Sequence[Key], per_range: int, lo: Key | None = None,
                  hi: Key | None = None) -> "KeyRanges":
        """Split [lo, hi) at every ``per_range``-th of the sorted ``keys``."""
        bounds: list[Key] = []
        for k in keys[per_range::max(1, per_range)]:
            if (not bounds or k > bounds[-1]) and (lo is None or k > lo) and (hi is None or k < hi):
                bounds.append(k)
        return cls(bounds, lo, hi)

    @property
    def null(self) -> int:
        return len(self.bounds) + 1

    @property
    def size(self) -> int:
        """Slots: the ranges and the NULL slot."""
        return len(self.bounds) + 2

    def index(self, key: Key) -> int:
        if self._first is not None:
            k = key[0]
            if k is None:
                return self.null
            i = (k - self._first) // self._step
            return 0 if i < 0 else min(i, len(self.bounds))
        if None in key:
            return self.null
        return bisect.bisect_right(self.bounds, key)

    def span(self, i: int) -> Span:
        if i == self.null:
            return NULL_SPAN
        return (self.lo if i == 0 else self.bounds[i - 1], self.hi if i == len(self.bounds) else self.bounds[i])


def in_span(key: Key, span: Span) -> bool:
    if span is None:
        return True
    if span == NULL_SPAN:
        return None in key
    if None in key:
        return False
    lo, hi = span
    return (lo is None or key >= lo) and (hi is None or key < hi)


Sums = list  # [[count, sum of row hashes mod 2**64], ...], one per slot of a KeyRanges


def new_sums(ranges: KeyRanges) -> Sums:
    return [[0, 0] for _ in range(ranges.size)]


def add_row(sums: Sums, ranges: KeyRanges, key: Key, norm: Sequence[Any]) -> None:
    s = sums[ranges.index(key)]
    s[0] += 1
    s[1] += row_hash(_encode(norm))


def accumulate(form: RowForm, ranges: KeyRanges, rows: Iterable[Sequence[Any]], sums: Sums) -> None:
    """Add rows (raw values in the form's column order) to ``sums``: the one path both sides take."""
    normalise, key, index, encode = form.normalise, form.key, ranges.index, _encode
    for values in rows:
        norm = normalise(values)
        s = sums[index(key(norm))]
        s[0] += 1
        s[1] += int.from_bytes(blake2b(encode(norm).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                               "little")


def finish(sums: Sums) -> Sums:
    return [[c, s & _MASK] for c, s in sums]


# -- finding the differing keys ---------------------------------------------------

@dataclass
class Difference:
    """One differing key: ``missing`` in PostgreSQL, ``extra`` there, ``changed`` (in ``columns``),
    or ``unrecorded-quarantine`` (the cleaner quarantines the row; migrate.quarantine lacks it)."""

    kind: str
    key: tuple[Any, ...]
    columns: tuple[str, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": list(self.key), "columns": list(self.columns), "detail": self.detail}

    def key_text(self) -> str:
        return ", ".join("NULL" if k is None else _short(k, 60) for k in self.key)

    def what(self) -> str:
        return {"missing": "missing in PostgreSQL", "extra": "extra in PostgreSQL",
                "changed": f"changed ({', '.join(self.columns)})",
                "unrecorded-quarantine": "quarantined, but not in migrate.quarantine"}.get(self.kind, self.kind)

    def describe(self) -> str:
        return f"{self.key_text()}: {self.what()}"


def _short(v: Any, n: int = 80) -> str:
    text = v if isinstance(v, str) else _encode(v)
    return text if len(text) <= n else text[:n - 3] + "..."


def compare_rows(columns: Sequence[str], src: Iterable[tuple[Key, list]], pg: Iterable[tuple[Key, list]],
                 limit: int | None = None, show: Callable[[int, Any], Any] | None = None) -> list[Difference]:
    """Compare the canonical rows of one range, key by key, in key order.

    ``show(column index, value)`` turns a normalised value into what the
    details show people (default: as it is).
    """
    show = show or (lambda i, v: v)
    by_src: dict[Key, list[list]] = {}
    by_pg: dict[Key, list[list]] = {}
    for rows, into in ((src, by_src), (pg, by_pg)):
        for k, norm in rows:
            into.setdefault(k, []).append(norm)
    out: list[Difference] = []
    for k in sorted(by_src.keys() | by_pg.keys(), key=lambda k: (None in k, k if None not in k else ())):
        s_rows, p_rows = list(by_src.get(k, ())), list(by_pg.get(k, ()))
        for row in list(s_rows):
            text = _encode(row)
            match = next((j for j, other in enumerate(p_rows) if _encode(other) == text), None)
            if match is not None:
                s_rows.remove(row)
                del p_rows[match]
        for a, b in zip(s_rows, p_rows):
            cols = [i for i, (x, y) in enumerate(zip(a, b)) if _encode(x) != _encode(y)]
            out.append(Difference("changed", k, tuple(columns[i] for i in cols), "; ".join(
                f"{columns[i]}: {_short(show(i, a[i]), 60)} -> {_short(show(i, b[i]), 60)}" for i in cols)))
        out += [Difference("missing", k, (), _short([show(i, v) for i, v in enumerate(r)], 120))
                for r in s_rows[len(p_rows):]]
        out += [Difference("extra", k, (), _short([show(i, v) for i, v in enumerate(r)], 120))
                for r in p_rows[len(s_rows):]]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


class Side(Protocol):
    """One side of the comparison, read by key span."""

    async def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums: ...
    async def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]: ...
    async def keys(self, table: str, span: Span) -> list[Key]: ...


class MemorySide:
    """A side over canonical rows in memory: {table: [(key, normalised row), ...]}."""

    def __init__(self, rows: Mapping[str, Sequence[tuple[Key, list]]]):
        self._rows = rows

    async def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums:
        sums = new_sums(ranges)
        for k, norm in self._rows.get(table, ()):
            if in_span(k, span):
                add_row(sums, ranges, k, norm)
        return finish(sums)

    async def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]:
        return [(k, n) for k, n in self._rows.get(table, ()) if in_span(k, span)][:limit]

    async def keys(self, table: str, span: Span) -> list[Key]:
        return sorted(k for k, _ in self._rows.get(table, ()) if None not in k and in_span(k, span))


@dataclass
class NarrowStats:
    ranges_differing: int = 0
    bisections: int = 0
    rows_compared: int = 0


async def narrow(table: str, columns: Sequence[str], src: Side, pg: Side, ranges: KeyRanges, src_sums: Sums,
                 pg_sums: Sums, *, max_diffs: int = 10, local_rows: int = LOCAL_ROWS, factor: int = BISECT_FACTOR,
                 stats: NarrowStats | None = None, show: Callable[[int, Any], Any] | None = None,
                 _depth: int = 0) -> list[Difference]:
    """Return the first ``max_diffs`` differing keys, re-reading only the ranges whose checksums differ."""
    stats = stats if stats is not None else NarrowStats()
    out: list[Difference] = []
    for i in range(ranges.size):
        if src_sums[i] == pg_sums[i]:
            continue
        if len(out) >= max_diffs:
            break
        if _depth == 0:
            stats.ranges_differing += 1
        span = ranges.span(i)
        sub = None
        n_src, n_pg = src_sums[i][0], pg_sums[i][0]
        if span != NULL_SPAN and max(n_src, n_pg) > local_rows:
            keys = await (src if n_src >= n_pg else pg).keys(table, span)
            sub = KeyRanges.from_keys(keys, -(-len(keys) // factor), *span)
        if sub is None or not sub.bounds:
            limit = max_diffs - len(out) if span == NULL_SPAN else None
            s_rows, p_rows = await asyncio.gather(src.rows(table, span, limit), pg.rows(table, span, limit))
            stats.rows_compared += len(s_rows) + len(p_rows)
            out += compare_rows(columns, s_rows, p_rows, max_diffs - len(out), show)
        else:
            stats.bisections += 1
            s_sub, p_sub = await asyncio.gather(src.checksums(table, sub, span), pg.checksums(table, sub, span))
            out += await narrow(table, columns, src, pg, sub, s_sub, p_sub, max_diffs=max_diffs - len(out),
                                local_rows=local_rows, factor=factor, stats=stats, show=show, _depth=_depth + 1)
    return out


# -- the PostgreSQL side ------------------------------------------------------------

def _where(keys: Sequence[str], span: Span, mark: Callable[[int], str], typed: str = "") -> tuple[str, list]:
    """Return (SQL condition, arguments) selecting ``span`` of the key columns."""
    if span is None:
        return "true", []
    cols = [quote_ident(k) for k in keys]
    if span == NULL_SPAN:
        return " OR ".join(f"{c} IS NULL" for c in cols), []
    row = cols[0] if len(cols) == 1 else f"({', '.join(cols)})"
    parts, args = [f"{c} IS NOT NULL" for c in cols] + ([typed] if typed else []), []
    for bound, op in zip(span, (">=", "<")):
        if bound is not None:
            marks = [mark(len(args) + j + 1) for j in range(len(bound))]
            parts.append(f"{row} {op} {marks[0] if len(marks) == 1 else '(' + ', '.join(marks) + ')'}")
            args += list(bound)
    return " AND ".join(parts), args


class PostgresSide:
    """The target rows, read inside the caller's transaction on one connection."""

    def __init__(self, conn: asyncpg.Connection, forms: Mapping[str, RowForm]):
        self.conn, self.forms = conn, forms
        self.seconds = 0.0

    def _select(self, table: str, span: Span, what: str = "", order: bool = False,
                limit: int | None = None) -> tuple[str, list]:
        target = TARGETS[table]
        where, args = _where(target.key, span, lambda n: f"${n}")
        what = what or ", ".join(quote_ident(c) for c in target.columns)
        sql = f"SELECT {what} FROM {target.table} WHERE {where}"
        if order:
            sql += " ORDER BY " + ", ".join(quote_ident(k) for k in target.key)
        return sql + (f" LIMIT {int(limit)}" if limit is not None else ""), args

    async def checksums(self, table: str, ranges: KeyRanges, span: Span) -> Sums:
        started = time.perf_counter()
        form, sums = self.forms[table], new_sums(ranges)
        sql, args = self._select(table, span)
        cur = await self.conn.cursor(sql, *args)
        pending: asyncio.Future | None = asyncio.ensure_future(cur.fetch(BATCH))
        try:
            while pending is not None:
                rows = await pending
                pending = None
                if len(rows) == BATCH:
                    # Ask for the next batch before hashing this one: PostgreSQL works meanwhile.
                    pending = asyncio.ensure_future(cur.fetch(BATCH))
                    await asyncio.sleep(0)
                accumulate(form, ranges, rows, sums)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        self.seconds += time.perf_counter() - started
        return finish(sums)

    async def rows(self, table: str, span: Span, limit: int | None = None) -> list[tuple[Key, list]]:
        form = self.forms[table]
        sql, args = self._select(table, span, order=True, limit=limit)
        out = []
        for r in await self.conn.fetch(sql, *args):
            norm = form.normalise(r)
            out.append((form.key(norm), norm))
        return out

    async def keys(self, table: str, span: Span) -> list[Key]:
        key = TARGETS[table].key
        sql, args = self._select(table, span, ", ".join(quote_ident(k) for k in key), order=True)
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]


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
            where, args = _where(KEYS[table], span, lambda n: "?" if typed == "" else "CAST(? AS TEXT)", typed)
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
        where, args = _where(keys, span, lambda n: "?" if not typed else "CAST(? AS TEXT)", typed)
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
        out["sums"] = [[a[0] + b[0], (a[1] + b[1]) & _MASK] for a, b in zip(out["sums"], p["sums"])]
        out["unrecorded"] = out["unrecorded"] + p["unrecorded"]
        out["graph"] = dict(Counter(out["graph"]) + Counter(p["graph"]))
        out["tags"] = out["tags"] | p["tags"]
    out["unrecorded"] = sorted(out["unrecorded"], key=lambda u: [
        (0, k, "") if isinstance(k, (int, float)) else (1, 0, _encode(k)) for k in u[0]])[:max_diffs]
    return out


# -- the report ---------------------------------------------------------------------

@dataclass
class TableResult:
    """The verification of one legacy table."""

    table: str
    target: str
    source_rows: int = 0
    quarantined: int = 0          # by the cleaner, or refused by PostgreSQL while loading
    postgres_rows: int = 0
    quarantine_recorded: int = 0  # rows of migrate.quarantine for this source and table
    checksum_source: str = ""
    checksum_postgres: str = ""
    ranges: int = 0
    ranges_differing: int = 0
    unrecorded_quarantine: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.source_rows - self.quarantined

    @property
    def checksum_match(self) -> bool:
        return self.ranges_differing == 0 and self.expected == self.postgres_rows

    @property
    def ok(self) -> bool:
        return self.checksum_match and self.unrecorded_quarantine == 0

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "target": self.target, "ok": self.ok, "source_rows": self.source_rows,
                "quarantined": self.quarantined, "expected": self.expected, "postgres_rows": self.postgres_rows,
                "quarantine_recorded": self.quarantine_recorded, "checksum_match": self.checksum_match,
                "checksum_source": self.checksum_source, "checksum_postgres": self.checksum_postgres,
                "ranges": self.ranges, "ranges_differing": self.ranges_differing,
                "unrecorded_quarantine": self.unrecorded_quarantine,
                "differences": [d.to_dict() for d in self.differences]}


@dataclass
class GraphResult:
    checked: bool
    name: str
    expected: dict[str, int] = field(default_factory=dict)
    actual: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.checked or all(self.expected.get(k, 0) == self.actual.get(k, 0)
                                       for k in self.expected.keys() | self.actual.keys())

    def to_dict(self) -> dict[str, Any]:
        labels = sorted(self.expected.keys() | self.actual.keys(), key=_label_order)
        return {"checked": self.checked, "name": self.name, "ok": self.ok, "reason": self.reason or None,
                "labels": [{"label": k, "expected": self.expected.get(k, 0), "actual": self.actual.get(k, 0)}
                           for k in labels]}


def _label_order(label: str) -> tuple[int, str]:
    order = [*VERTEX_KEYS, *EDGE_LABELS]
    return (order.index(label), label) if label in order else (len(order), label)


@dataclass
class VerifyReport:
    source: str
    fingerprint: str
    target: str
    source_timezone: str
    tables: list[TableResult] = field(default_factory=list)
    graph: GraphResult | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_source: float = 0.0
    seconds_postgres: float = 0.0
    workers: int = 1

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables) and (self.graph is None or self.graph.ok)

    def table(self, name: str) -> TableResult:
        return next(t for t in self.tables if t.table == name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "fingerprint": self.fingerprint, "target": self.target,
                "source_timezone": self.source_timezone, "tables": [t.to_dict() for t in self.tables],
                "graph": self.graph.to_dict() if self.graph else None, "notes": self.notes,
                "seconds": {"total": round(self.seconds, 3), "source": round(self.seconds_source, 3),
                            "postgres": round(self.seconds_postgres, 3)}, "source_workers": self.workers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def render(self) -> list[Any]:
        """Return rich renderables: the per-table summary, the differences, the graph."""
        from rich.table import Table
        from rich.text import Text  # data as Text: ids holding [brackets] are not markup
        yes, no = Text("yes", style="green"), Text("NO", style="red")
        out: list[Any] = []
        summary = Table(title=Text(f"verify: {self.source} -> {self.target}"), caption=(
            f"{sum(t.source_rows for t in self.tables):,} source rows in {self.seconds:.1f} s;"
            f" naive timestamps read in {self.source_timezone}"))
        for c in ("table", "source rows", "quarantined", "expected", "in PostgreSQL", "checksum match",
                  "first differences"):
            summary.add_column(c, justify="left" if c in ("table", "first differences") else "right")
        for t in self.tables:
            firsts = [d.describe() for d in t.differences[:3]]
            if len(t.differences) > 3:
                firsts.append(f"... {len(t.differences) - 3} more below")
            summary.add_row(t.table, f"{t.source_rows:,}", f"{t.quarantined:,}", f"{t.expected:,}",
                            f"{t.postgres_rows:,}", yes if t.checksum_match else no, Text("\n".join(firsts) or "-"))
        out.append(summary)
        diffs = [(t.table, d) for t in self.tables for d in t.differences]
        if diffs:
            detail = Table("table", "key", "difference", "detail", title="first differing keys")
            for name, d in diffs:
                detail.add_row(name, Text(d.key_text()), Text(d.what()), Text(_short(d.detail, 160)))
            out.append(detail)
        if self.graph is not None and self.graph.checked:
            graph = Table("label", "expected", "in graph", "match", title=f"AGE graph {self.graph.name}")
            for row in self.graph.to_dict()["labels"]:
                graph.add_row(row["label"], f"{row['expected']:,}", f"{row['actual']:,}",
                              yes if row["expected"] == row["actual"] else no)
            out.append(graph)
        return out


# -- the run ------------------------------------------------------------------------

async def verify(postgres_url_or_settings: Settings | SecretUrl | str, sqlite_path: Path | str, *,
                 tables: Sequence[str] | str | None = None, source_tz: tzinfo | str = UTC, graph: bool = True,
                 graph_name: str | None = None, max_diffs: int = 10, workers: int | None = None) -> VerifyReport:
    """Compare the legacy file, cleaned as the backfill cleans it, with PostgreSQL; return the report.

    ``tables``: names of backfill.UNITS or legacy tables (None = all).
    ``graph_name``: default the settings' DB_AGE_GRAPH, else ``governance``.
    ``workers``: processes reading the source (default: one per CPU, at
    most 4, when audit_events and tool_usage are large; else 1).
    Raises GovdbError subclasses when it cannot verify (bad input, no
    database, unreadable file); differences are in the report (``.ok``).
    """
    started = time.perf_counter()
    settings = _settings(postgres_url_or_settings)
    graph_name = graph_name or settings.age_graph
    if not GRAPH_RE.match(graph_name):
        raise ConfigError("--graph-name", f"must be 3-63 letters, digits or _; got {graph_name!r}")
    if not isinstance(max_diffs, int) or max_diffs < 1:
        raise ConfigError("--max-diffs", f"must be a positive whole number; got {max_diffs!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError("--workers", f"must be a positive whole number; got {workers!r}")
    selected, tz = select_tables(tables), parse_timezone(source_tz)
    with LegacySource(sqlite_path) as probe:
        path, fingerprint = probe.path, probe.fingerprint()
        if workers is None:
            split_rows = sum(probe.count(t) for t in SPLIT_TABLES if t in selected)
            # Measured on 2 CPUs: 2 workers beat 1 (and 3) though this process also hashes PostgreSQL's rows.
            workers = 1 if split_rows < SPLIT_MIN_ROWS else max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    url = settings.postgres_url
    report = VerifyReport(str(path), fingerprint, url.masked, str(tz), workers=workers)
    conn = await _connect(url)
    spawn = multiprocessing.get_context("spawn")  # fork is unsafe with a running event loop and threads
    pools = [ProcessPoolExecutor(1, mp_context=spawn) for _ in range(workers)]
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _run(conn, SourceSide(pools), report, selected, tz, graph, graph_name, max_diffs)
    except asyncpg.PostgresError as exc:
        raise StoreUnavailableError(f"PostgreSQL at {url.masked} refused a query ({type(exc).__name__}:"
                                    f" {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    except (OSError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailableError(f"lost PostgreSQL at {url.masked} ({type(exc).__name__}: {exc})") from exc
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        if not conn.is_closed():
            await conn.close()
    report.seconds = time.perf_counter() - started
    return report


async def _run(conn: asyncpg.Connection, src: SourceSide, report: VerifyReport, selected: list[str], tz: tzinfo,
               graph: bool, graph_name: str, max_diffs: int) -> None:
    # The workers start (spawn, import) while PostgreSQL is read.
    opened = asyncio.gather(*(src.call("open", report.source, tz, worker=j) for j in range(src.workers)))
    try:
        kinds = {t: await _column_kinds(conn, t) for t in selected}
        quarantine, notes = await _quarantine(conn, report.fingerprint, selected)
        report.notes += notes
        existing = {kind: {r[0] for r in await conn.fetch(sql)} for kind, sql in _EXISTING_SQL.items()}
    finally:
        await opened
    planned = await asyncio.gather(*(src.call("setup", kinds, quarantine, existing, selected if j == 0 else [],
                                              worker=j) for j in range(src.workers)))
    ranges = {t: planned[0][t][0] for t in selected}
    counts = {t: planned[0][t][1] for t in selected}
    started = time.perf_counter()

    async def source_side() -> dict[str, dict[str, Any]]:
        found = await src.scan_all(selected, ranges, counts, max_diffs)
        report.seconds_source = time.perf_counter() - started
        return found

    scanning = asyncio.ensure_future(source_side())
    pg = PostgresSide(conn, {t: RowForm.for_table(t, kinds[t]) for t in selected})
    try:
        pg_sums = {t: await pg.checksums(t, ranges[t], None) for t in selected}
        report.seconds_postgres = pg.seconds
        results = await scanning
    finally:
        scanning.cancel()
    for t in selected:
        r, target = results[t], TARGETS[t]
        res = TableResult(t, target.table, source_rows=r["source_rows"], quarantined=r["quarantined"] + r["refused"],
                          postgres_rows=sum(c for c, _ in pg_sums[t]), quarantine_recorded=len(quarantine.get(t, ())),
                          checksum_source=_total(r["sums"]), checksum_postgres=_total(pg_sums[t]),
                          ranges=ranges[t].size - 1, unrecorded_quarantine=r["unrecorded_count"])
        res.differences = [Difference("unrecorded-quarantine", k, (), reason) for k, reason in r["unrecorded"]]
        stats = NarrowStats()
        if r["sums"] != pg_sums[t] and len(res.differences) < max_diffs:
            res.differences += await narrow(t, target.columns, src, pg, ranges[t], r["sums"], pg_sums[t],
                                            max_diffs=max_diffs - len(res.differences), stats=stats,
                                            show=pg.forms[t].show)
        res.ranges_differing = sum(a != b for a, b in zip(r["sums"], pg_sums[t]))
        stale = res.quarantine_recorded - r["matched"]
        if stale > 0:
            report.notes.append(f"{t}: {stale} rows of migrate.quarantine name keys the source no longer has")
        report.tables.append(res)
    if not graph:
        report.graph = GraphResult(False, graph_name, reason="not asked for (--no-graph)")
    elif missing := [t for t in GRAPH_TABLES if t not in selected]:
        report.graph = GraphResult(False, graph_name, reason=f"needs the tables {', '.join(missing)} in --tables")
    else:
        report.graph = await _graph(conn, graph_name, results)
    if not report.graph.checked:
        report.notes.append(f"graph check skipped: {report.graph.reason}")
    elif report.graph.reason:
        report.notes.append(report.graph.reason)


def _total(sums: Sums) -> str:
    return f"{sum(c for c, _ in sums)}:{sum(s for _, s in sums) & _MASK:016x}"


async def _column_kinds(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    target = TARGETS[table]
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", target.table):
        raise SchemaError(f"PostgreSQL has no table {target.table}: nothing was migrated there"
                          " (run the backfill first, or check --postgres)")
    rows = await conn.fetch("SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t"
                            " ON t.oid = a.atttypid WHERE a.attrelid = $1::regclass AND a.attnum > 0"
                            " AND NOT a.attisdropped", target.table)
    kinds = {r[0]: r[1] for r in rows}
    missing = [c for c in target.columns if c not in kinds]
    if missing:
        raise SchemaError(f"{target.table} has no column {', '.join(missing)}; the schema is not the one govdb expects")
    return kinds


async def _quarantine(conn: asyncpg.Connection, fingerprint: str,
                      selected: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Return the quarantined keys recorded for this source, per table, and notes on the checkpoints."""
    if not await conn.fetchval("SELECT to_regclass('migrate.quarantine') IS NOT NULL"):
        return {}, ["PostgreSQL has no migrate.quarantine table: no backfill has run against it"]
    quarantine: dict[str, list[str]] = {}
    for r in await conn.fetch("SELECT source_table, key FROM migrate.quarantine WHERE source = $1"
                              " AND source_table = ANY($2::text[])", fingerprint, selected):
        quarantine.setdefault(r[0], []).append(r[1])
    done = {r[0]: r[1] for r in await conn.fetch(
        "SELECT source_table, done FROM migrate.checkpoints WHERE source = $1", fingerprint)}
    notes = [f"{t}: the backfill of this source has not finished it (run the backfill with --resume)"
             for t in selected if t in done and not done[t]]
    if not done:
        notes.append("no backfill of this source file is recorded in migrate.checkpoints")
    return quarantine, notes


async def _graph(conn: asyncpg.Connection, name: str, results: Mapping[str, dict[str, Any]]) -> GraphResult:
    if not await conn.fetchval("SELECT to_regclass('ag_catalog.ag_graph') IS NOT NULL") or not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = $1)", name):
        return GraphResult(False, name, reason=f"the database has no AGE graph {name!r}")
    expected: Counter[str] = Counter({label: 0 for label in (*VERTEX_KEYS, *EDGE_LABELS)})
    tags: set[str] = set()
    for r in results.values():
        expected.update(r["graph"])
        tags |= r["tags"]
    expected["Tag"] = len(tags)
    from .graph import graph_counts
    actual = await graph_counts(conn, name)
    result = GraphResult(True, name, dict(expected), dict(actual))
    if not any(actual.values()) and any(expected.values()):
        result.reason = "the graph is empty: build it (govdb migrate graph)"
    return result


def _settings(value: Settings | SecretUrl | str) -> Settings:
    if isinstance(value, Settings):
        return value
    url = value if isinstance(value, SecretUrl) else parse_postgres_url(str(value), "--postgres")
    return Settings(backend="postgres", postgres_url=url)


async def _connect(url: SecretUrl) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url.reveal(), server_settings={
            "application_name": "govdb-verify", "TimeZone": "UTC", "default_transaction_read_only": "on"})
    except asyncpg.InvalidCatalogNameError as exc:
        raise StoreUnavailableError(f"PostgreSQL at {url.masked} has no such database") from exc
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreUnavailableError(f"cannot connect to PostgreSQL at {url.masked} ({type(exc).__name__}: {first})") \
            from exc
