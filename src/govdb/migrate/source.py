"""Read a legacy governance.db without ever stalling its writers.

The file is opened read-only. In WAL mode each table is read inside one
read transaction (a consistent snapshot; writers go on, the WAL grows
until we finish). In a rollback-journal file a long read would hold a
SHARED lock that blocks every commit, so each batch is its own short read
by key range and the table is not one snapshot; the journal mode is never
changed.

Rows come as dicts (column -> value, plus ``_rowid``) in key order, in
batches whose last key is a resume point. Text that is not UTF-8 is decoded
with ``surrogateescape`` (lossless; clean.py repairs and records it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote

from . import SourceError

Row = dict[str, Any]

#: Legacy table -> its key columns (the order rows are read in).
KEYS: dict[str, tuple[str, ...]] = {
    "agent_metadata": ("agent_id",),
    "session_identities": ("session_id",),
    "agent_state": ("id",),
    "calibration_state": ("id",),
    "audit_events": ("id",),
    "tool_usage": ("id",),
    "discoveries": ("id",),
    "discovery_tags": ("discovery_id", "tag"),
    "discovery_edges": ("src_id", "dst_id", "edge_type"),
    "dialectic_sessions": ("session_id",),
    "dialectic_messages": ("id",),
}
#: Tables keyed by INTEGER PRIMARY KEY (the rowid): never NULL, never text.
INTEGER_KEYED = frozenset({"agent_state", "calibration_state", "audit_events", "tool_usage", "dialectic_messages"})
BUSY_TIMEOUT_MS = 5_000


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (SQLite and PostgreSQL share the rule)."""
    if "\x00" in name:
        raise ValueError(f"identifier {name!r} contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(name: str) -> str:
    """Quote a schema-qualified name, e.g. core.identities."""
    return ".".join(quote_ident(part) for part in name.split("."))


def encode_key(values: Sequence[Any]) -> str:
    """Return a lossless text form of a key (JSON array), storable in a PostgreSQL text column.

    Text that is not UTF-8 (surrogate-escaped bytes) becomes ``{"hex": ...}``,
    a BLOB ``{"blob": ...}``; NUL is escaped by JSON.
    """
    out: list[Any] = []
    for v in values:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                v = {"hex": v.encode("utf-8", "surrogateescape").hex()}
        elif isinstance(v, bytes):
            v = {"blob": v.hex()}
        out.append(v)
    return json.dumps(out, ensure_ascii=False)


def decode_key(text: str) -> tuple[Any, ...]:
    """Return the key :func:`encode_key` wrote."""
    out: list[Any] = []
    for v in json.loads(text):
        if isinstance(v, dict) and "hex" in v:
            v = bytes.fromhex(v["hex"]).decode("utf-8", "surrogateescape")
        elif isinstance(v, dict) and "blob" in v:
            v = bytes.fromhex(v["blob"])
        elif isinstance(v, list):
            v = tuple(v)
        out.append(v)
    return tuple(out)


def _bind(v: Any) -> Any:
    # Keys go back to SQLite as the exact stored bytes: CAST(? AS TEXT) of a
    # BLOB parameter is that text, even when it is not UTF-8.
    return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v


class LegacySource:
    """A legacy governance.db, opened read-only. Use from one thread at a time."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"SQLite file {self.path} does not exist")
        if not self.path.is_file():
            raise SourceError(f"{self.path} is not a file")
        uri = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise SourceError(f"cannot open {self.path} ({exc})") from exc
        conn.text_factory = self._lossless = functools.partial(str, encoding="utf-8", errors="surrogateescape")
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            self.journal_mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise SourceError(f"{self.path} is not a SQLite database ({exc})") from exc
        self.tables = frozenset(names)
        if "agent_metadata" not in self.tables:
            conn.close()
            raise SourceError(f"{self.path} is not a governance.db (it has no agent_metadata table)")
        self._conn = conn
        self._in_snapshot = False
        self.columns = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(t)})")]
                        for t in KEYS if t in self.tables}

    @property
    def wal(self) -> bool:
        return self.journal_mode == "wal"

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "LegacySource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fingerprint(self) -> str:
        """Return an id of this governance.db that survives copies, moves and growth.

        It hashes the first agents ever written (rowid order), which a live
        server never rewrites; a file without agents falls back to its path.
        """
        rows = self._conn.execute(
            "SELECT rowid, CAST(agent_id AS BLOB), CAST(created_at AS BLOB) FROM agent_metadata"
            " ORDER BY rowid LIMIT 3").fetchall()
        basis = repr(rows) if rows else "path:" + str(self.path.resolve())
        return hashlib.sha256(basis.encode()).hexdigest()[:32]

    @contextmanager
    def snapshot(self) -> Iterator["LegacySource"]:
        """Hold one read transaction (WAL files); elsewhere a no-op: each query is its own."""
        if not self.wal or self._in_snapshot:
            yield self
            return
        self._conn.execute("BEGIN")
        self._in_snapshot = True
        try:
            yield self
        finally:
            self._in_snapshot = False
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                pass

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, tuple(args)).fetchall()

    def count(self, table: str, after: Sequence[Any] | None = None) -> int:
        """Return how many rows :meth:`batches` will yield from ``after`` on."""
        if table not in self.tables:
            return 0
        where, args = self._after(table, after)
        odd = 0 if after is not None or table in INTEGER_KEYED else self._scalar(
            f"SELECT count(*) FROM {quote_ident(table)} WHERE {self._odd_keys(table)}")
        return odd + self._scalar(f"SELECT count(*) FROM {quote_ident(table)} WHERE {where}", args)

    def max_id(self, table: str) -> int:
        """Return the highest id an INTEGER-keyed table ever gave (AUTOINCREMENT's mark included)."""
        if table not in self.tables:
            return 0
        top = self._scalar(f"SELECT max(rowid) FROM {quote_ident(table)}") or 0
        if "sqlite_sequence" in self.tables:
            top = max(top, self._scalar("SELECT max(seq) FROM sqlite_sequence WHERE name = ?", (table,)) or 0)
        return int(top)

    def rows(self, table: str) -> list[Row]:
        """Return every row of a table (for small tables read whole)."""
        return [r for batch in self.batches(table, None, 10_000) for r in batch]

    def batches(self, table: str, after: Sequence[Any] | None, size: int) -> Iterator[list[Row]]:
        """Yield rows in key order after the key ``after`` (None: from the start).

        Rows whose text key is NULL or not text come first, as one batch (they
        cannot be ordered by key; they are quarantined), only on a run from
        the start; ``after=()`` means "from the first key, those rows done".
        """
        if table not in self.tables:
            return
        name = quote_ident(table)
        keys = ", ".join(quote_ident(k) for k in KEYS[table])
        if after is None and table not in INTEGER_KEYED:
            odd = self._fetch(f"SELECT rowid AS _rowid, * FROM {name} WHERE {self._odd_keys(table)} ORDER BY rowid")
            if odd:
                yield odd
        select = f"SELECT rowid AS _rowid, * FROM {name} WHERE {{}} ORDER BY {keys}"
        if self.wal:
            # One statement inside the caller's snapshot (or its own read).
            with self.snapshot():
                cur, last = None, after
                while True:
                    if cur is None:
                        where, args = self._after(table, last)
                        cur = self._conn.execute(select.format(where), args)
                        cols = [d[0] for d in cur.description]
                    try:
                        chunk = [dict(zip(cols, r)) for r in self._fetch_utf8(cur.fetchmany, size)]
                    except sqlite3.OperationalError:
                        # Text that is not UTF-8 somewhere in this batch: read it losslessly.
                        cur = None
                        where, args = self._after(table, last)
                        chunk = self._fetch(select.format(where) + " LIMIT ?", (*args, size))
                    if not chunk:
                        break
                    yield chunk
                    last = tuple(chunk[-1][k] for k in KEYS[table])
            return
        last = after
        while True:
            # Autocommit: each batch is a short read of its own.
            where, args = self._after(table, last)
            try:
                chunk = self._fetch(select.format(where) + " LIMIT ?", (*args, size), utf8=True)
            except sqlite3.OperationalError:
                chunk = self._fetch(select.format(where) + " LIMIT ?", (*args, size))
            if not chunk:
                return
            yield chunk
            last = tuple(chunk[-1][k] for k in KEYS[table])
            if len(chunk) < size:
                return

    def bounds(self, table: str, after: Sequence[Any] | None, size: int) -> tuple[list[tuple[Any, ...]], int]:
        """Return the keys ending consecutive ranges of ``size`` rows after ``after`` (the last
        one ends at the last key), and how many rows they hold. Rows whose key is not text
        are not counted (:meth:`odd_rows`). Each range is found by a short read of its own."""
        if table not in self.tables:
            return [], 0
        keys = ", ".join(quote_ident(k) for k in KEYS[table])
        ends: list[tuple[Any, ...]] = []
        n, last = 0, after
        while True:
            where, args = self._after(table, last)
            chunk = self._conn.execute(f"SELECT {keys} FROM {quote_ident(table)} WHERE {where} ORDER BY {keys}"
                                       " LIMIT ?", (*args, size)).fetchall()
            if not chunk:
                return ends, n
            n += len(chunk)
            last = tuple(chunk[-1])
            ends.append(last)
            if len(chunk) < size:
                return ends, n

    def odd_count(self, table: str) -> int:
        """Return how many rows :meth:`odd_rows` returns."""
        if table not in self.tables or table in INTEGER_KEYED:
            return 0
        return self._scalar(f"SELECT count(*) FROM {quote_ident(table)} WHERE {self._odd_keys(table)}")

    def odd_rows(self, table: str) -> list[Row]:
        """Return the rows whose text key is NULL or not text (read first on a run from the start)."""
        if table not in self.tables or table in INTEGER_KEYED:
            return []
        return self._fetch(f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {self._odd_keys(table)}"
                           " ORDER BY rowid")

    def between(self, table: str, lo: Sequence[Any] | None, hi: Sequence[Any]) -> list[Row]:
        """Return the rows whose key is after ``lo`` (None or (): from the first) and at most ``hi``, in key order."""
        if table not in self.tables:
            return []
        keys = KEYS[table]
        where, args = self._after(table, lo)
        if table in INTEGER_KEYED:
            where += f" AND {quote_ident(keys[0])} <= ?"
            args = (*args, int(hi[0]))
        else:
            cols = ", ".join(quote_ident(k) for k in keys)
            where += f" AND ({cols}) <= ({', '.join('CAST(? AS TEXT)' for _ in keys)})"
            args = (*args, *(_bind(v) for v in hi))
        sql = (f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {where}"
               f" ORDER BY {', '.join(quote_ident(k) for k in keys)}")
        try:
            return self._fetch(sql, args, utf8=True)
        except sqlite3.OperationalError:
            return self._fetch(sql, args)

    def pending_writes(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (legacy table, key text) pairs have a dual-write record still waiting
        for PostgreSQL in the file's outbox (none when the file has no outbox)."""
        if not pairs or "govdb_outbox" not in self.tables:
            return set()
        found: set[tuple[str, str]] = set()
        for table, key in pairs:
            if self._conn.execute("SELECT 1 FROM govdb_outbox WHERE tbl = ? AND key = ? AND state = 'pending'"
                                  " LIMIT 1", (table, key)).fetchone():
                found.add((table, key))
        return found

    def row(self, table: str, key: Sequence[Any]) -> Row | None:
        """Return the row with this key (the first by rowid), or None."""
        keys = KEYS[table]
        where = " AND ".join(f"{quote_ident(k)} = CAST(? AS TEXT)" if table not in INTEGER_KEYED
                             else f"{quote_ident(k)} = ?" for k in keys)
        rows = self._fetch(f"SELECT rowid AS _rowid, * FROM {quote_ident(table)} WHERE {where} ORDER BY rowid LIMIT 1",
                           [_bind(v) for v in key])
        return rows[0] if rows else None

    def _fetch_utf8(self, fetch: Any, *args: Any) -> list[tuple[Any, ...]]:
        """Call ``fetch`` decoding text as UTF-8 in C (sqlite3's own str), several times faster
        than the lossless factory; raises sqlite3.OperationalError on text that is not UTF-8."""
        self._conn.text_factory = str
        try:
            return fetch(*args)
        finally:
            self._conn.text_factory = self._lossless

    def _fetch(self, sql: str, args: Sequence[Any] = (), *, utf8: bool = False) -> list[Row]:
        cur = self._conn.execute(sql, tuple(args))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in (self._fetch_utf8(cur.fetchall) if utf8 else cur.fetchall())]

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._conn.execute(sql, tuple(args)).fetchone()
        return None if row is None else row[0]

    def _odd_keys(self, table: str) -> str:
        return " OR ".join(f"typeof({quote_ident(k)}) <> 'text'" for k in KEYS[table])

    def _after(self, table: str, after: Sequence[Any] | None) -> tuple[str, tuple[Any, ...]]:
        keys = KEYS[table]
        if table in INTEGER_KEYED:
            return (("1", ()) if not after else (f"{quote_ident(keys[0])} > ?", (int(after[0]),)))
        typed = " AND ".join(f"typeof({quote_ident(k)}) = 'text'" for k in keys)
        if not after:
            return typed, ()
        cols = ", ".join(quote_ident(k) for k in keys)
        marks = ", ".join("CAST(? AS TEXT)" for _ in keys)
        return f"{typed} AND ({cols}) > ({marks})", tuple(_bind(v) for v in after)
