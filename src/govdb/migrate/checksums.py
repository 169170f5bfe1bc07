"""Checksums for verify: one canonical text per row, 64-bit hashes summed per key range
(order-independent, memory per range), and the bisection of differing ranges down to the
differing keys. The same code serves both sides, so both reduce a row alike."""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from hashlib import blake2b
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from .source import quote_ident
from .targets import TARGETS

UTC = timezone.utc
Key = tuple
Span = Any  # (lo, hi): lo <= key < hi, None = open; or NULL_SPAN; or None = everything
NULL_SPAN = "null"
ROWS_PER_RANGE = 1_000   # first split of a table's keys
MAX_RANGES = 4_096
LOCAL_ROWS = 2_000       # compare rows once a differing range holds at most this many
BISECT_FACTOR = 16       # a larger differing range is split in this many
BATCH = 5_000            # rows fetched at a time
MASK64 = (1 << 64) - 1


# -- the canonical form of a row ------------------------------------------------

def _unserialisable(o: Any) -> Any:
    raise TypeError(f"{type(o).__name__} is not JSON")


try:  # the C encoder itself, made once: JSONEncoder.encode builds one per call
    from json.encoder import c_make_encoder, encode_basestring
    _c_encode = c_make_encoder(None, _unserialisable, encode_basestring, None, ":", ",", True, False, True)
except (ImportError, TypeError):  # no C accelerator
    _c_encode = None
_py_encode = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode


def encode_value(value: Any) -> str:
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
    return encode_value(norm)


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


def span_where(keys: Sequence[str], span: Span, mark: Callable[[int], str], typed: str = "") -> tuple[str, list]:
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


def new_sums(ranges: KeyRanges) -> Sums:
    return [[0, 0] for _ in range(ranges.size)]


def add_row(sums: Sums, ranges: KeyRanges, key: Key, norm: Sequence[Any]) -> None:
    s = sums[ranges.index(key)]
    s[0] += 1
    s[1] += row_hash(encode_value(norm))


def accumulate(form: RowForm, ranges: KeyRanges, rows: Iterable[Sequence[Any]], sums: Sums) -> None:
    """Add rows (raw values in the form's column order) to ``sums``: the one path both sides take."""
    normalise, key, index, encode = form.normalise, form.key, ranges.index, encode_value
    for values in rows:
        norm = normalise(values)
        s = sums[index(key(norm))]
        s[0] += 1
        s[1] += int.from_bytes(blake2b(encode(norm).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                               "little")


def finish(sums: Sums) -> Sums:
    return [[c, s & MASK64] for c, s in sums]


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
        return ", ".join("NULL" if k is None else shorten(k, 60) for k in self.key)

    def what(self) -> str:
        return {"missing": "missing in PostgreSQL", "extra": "extra in PostgreSQL",
                "changed": f"changed ({', '.join(self.columns)})",
                "unrecorded-quarantine": "quarantined, but not in migrate.quarantine"}.get(self.kind, self.kind)

    def describe(self) -> str:
        return f"{self.key_text()}: {self.what()}"


def shorten(v: Any, n: int = 80) -> str:
    text = v if isinstance(v, str) else encode_value(v)
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
            text = encode_value(row)
            match = next((j for j, other in enumerate(p_rows) if encode_value(other) == text), None)
            if match is not None:
                s_rows.remove(row)
                del p_rows[match]
        for a, b in zip(s_rows, p_rows):
            cols = [i for i, (x, y) in enumerate(zip(a, b)) if encode_value(x) != encode_value(y)]
            out.append(Difference("changed", k, tuple(columns[i] for i in cols), "; ".join(
                f"{columns[i]}: {shorten(show(i, a[i]), 60)} -> {shorten(show(i, b[i]), 60)}" for i in cols)))
        out += [Difference("missing", k, (), shorten([show(i, v) for i, v in enumerate(r)], 120))
                for r in s_rows[len(p_rows):]]
        out += [Difference("extra", k, (), shorten([show(i, v) for i, v in enumerate(r)], 120))
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


