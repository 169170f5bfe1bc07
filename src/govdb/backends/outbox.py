"""The dual backend's outbox: durable "sync this key to PostgreSQL" records in the SQLite file.

A dual write inserts its outbox rows in the same SQLite transaction as the
write itself, so an acknowledged write always has its record. An entry names
a row (legacy table + key), not a payload: applying it copies the row's
current state from SQLite to PostgreSQL, so entries re-applied after a crash,
or applied by several processes at once, converge on the latest state.

Entries are ``pending`` until applied (then deleted, in batches) or
``parked`` when PostgreSQL can never take them (a constraint or data error);
parked entries stay until an operator retries or drops them. The table lives
next to the legacy tables and is ignored by everything else that reads the
file. ``govdb_shadow_stats`` holds the shadow-read counters, so another
process (``govdb dual status``) can show them.

Functions taking ``conn`` run on a sqlite3 connection inside the caller's
transaction; :func:`dual_figures` and :func:`queue_counts` open the file.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from ..convert import format_timestamp, parse_timestamp

DDL = """
CREATE TABLE IF NOT EXISTS govdb_outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl         TEXT NOT NULL,
    key         TEXT NOT NULL,
    op          TEXT NOT NULL,
    enqueued_at TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    state       TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'parked'))
);
CREATE INDEX IF NOT EXISTS govdb_outbox_state ON govdb_outbox (state, seq);
CREATE TABLE IF NOT EXISTS govdb_shadow_stats (
    operation  TEXT PRIMARY KEY,
    reads      INTEGER NOT NULL DEFAULT 0,
    mismatches INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
"""
#: Longest error text kept with an entry.
MAX_ERROR = 500


@dataclass(frozen=True)
class Entry:
    """One outbox record: the row ``key`` of legacy ``table`` must reach PostgreSQL."""

    seq: int
    table: str
    key: tuple[Any, ...]
    op: str
    enqueued_at: str
    attempts: int = 0
    last_error: str | None = None
    state: str = "pending"

    @property
    def key_text(self) -> str:
        return encode(self.key)


def encode(key: Sequence[Any]) -> str:
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))


def decode(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(text))


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the outbox and shadow-stats tables where absent (in the caller's transaction)."""
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)


def enqueue(conn: sqlite3.Connection, op: str, rows: Iterable[tuple[str, Sequence[Any]]]) -> list[Entry]:
    """Record that each (table, key) must reach PostgreSQL; return the entries in order."""
    now = format_timestamp(datetime.now(timezone.utc))
    out = []
    for table, key in rows:
        text = encode(key)
        cur = conn.execute("INSERT INTO govdb_outbox (tbl, key, op, enqueued_at) VALUES (?, ?, ?, ?)",
                           (table, text, op, now))
        out.append(Entry(int(cur.lastrowid or 0), table, tuple(key), op, now))
    return out


def delete(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Remove applied entries; return how many went."""
    seqs = list(seqs)
    if not seqs:
        return 0
    return conn.execute("DELETE FROM govdb_outbox WHERE seq IN (SELECT value FROM json_each(?))",
                        (json.dumps(seqs),)).rowcount


def has_backlog(conn: sqlite3.Connection, applied: Iterable[int] = ()) -> bool:
    """Return whether any entry (pending or parked, of any process) other than ``applied`` remains."""
    applied = list(applied)
    if not applied:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM govdb_outbox)").fetchone()[0] == 1
    return conn.execute("SELECT EXISTS (SELECT 1 FROM govdb_outbox WHERE seq NOT IN"
                        " (SELECT value FROM json_each(?)))", (json.dumps(applied),)).fetchone()[0] == 1


def pending(conn: sqlite3.Connection, limit: int, after: int = 0, upto: int | None = None) -> list[Entry]:
    """Return up to ``limit`` pending entries after seq ``after`` (and up to ``upto``), oldest first."""
    rows = conn.execute("SELECT * FROM govdb_outbox WHERE state = 'pending' AND seq > ? AND seq <= ?"
                        " ORDER BY seq LIMIT ?", (after, upto if upto is not None else 2**63 - 1, limit)).fetchall()
    return [_entry(r) for r in rows]


def last_seq(conn: sqlite3.Connection) -> int:
    """Return the highest seq of a pending entry (0: none)."""
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM govdb_outbox WHERE state = 'pending'").fetchone()[0])


def parked(conn: sqlite3.Connection, seq: int | None = None) -> list[Entry]:
    """Return the parked entries (or the one with ``seq``), oldest first."""
    if seq is None:
        rows = conn.execute("SELECT * FROM govdb_outbox WHERE state = 'parked' ORDER BY seq").fetchall()
    else:
        rows = conn.execute("SELECT * FROM govdb_outbox WHERE state = 'parked' AND seq = ?", (seq,)).fetchall()
    return [_entry(r) for r in rows]


def park(conn: sqlite3.Connection, failures: Iterable[tuple[int, str]]) -> None:
    """Mark entries as never landing, with the reason."""
    conn.executemany("UPDATE govdb_outbox SET state = 'parked', attempts = attempts + 1, last_error = ?"
                     " WHERE seq = ?", [(error[:MAX_ERROR], seq) for seq, error in failures])


def note_attempt(conn: sqlite3.Connection, seqs: Iterable[int], error: str) -> None:
    """Count a failed (transient) attempt on entries, keeping the error text."""
    conn.executemany("UPDATE govdb_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                     [(error[:MAX_ERROR], seq) for seq in seqs])


def unpark(conn: sqlite3.Connection, seq: int | None = None) -> int:
    """Put parked entries (all, or one) back in the queue; return how many."""
    where, args = ("", ()) if seq is None else (" AND seq = ?", (seq,))
    return conn.execute(f"UPDATE govdb_outbox SET state = 'pending' WHERE state = 'parked'{where}", args).rowcount


def drop_parked(conn: sqlite3.Connection, seq: int | None = None) -> int:
    """Delete parked entries (all, or one); return how many."""
    where, args = ("", ()) if seq is None else (" AND seq = ?", (seq,))
    return conn.execute(f"DELETE FROM govdb_outbox WHERE state = 'parked'{where}", args).rowcount


def add_shadow_counts(conn: sqlite3.Connection, counts: dict[str, tuple[int, int]]) -> None:
    """Add (reads, mismatches) per operation to the persisted shadow-read counters."""
    now = format_timestamp(datetime.now(timezone.utc))
    conn.executemany(
        "INSERT INTO govdb_shadow_stats (operation, reads, mismatches, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (operation) DO UPDATE SET reads = reads + excluded.reads,"
        " mismatches = mismatches + excluded.mismatches, updated_at = excluded.updated_at",
        [(op, r, m, now) for op, (r, m) in counts.items()])


def figures(conn: sqlite3.Connection) -> dict[str, Any]:
    """Return queue and shadow-read figures read on ``conn`` (see :func:`dual_figures`)."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    out: dict[str, Any] = {"pending": 0, "parked": 0, "oldest_pending_age_s": None, "shadow_reads": 0,
                           "shadow_mismatches": 0, "shadow_by_operation": {}}
    if "govdb_outbox" in have:
        for state, n in conn.execute("SELECT state, count(*) FROM govdb_outbox GROUP BY state"):
            out[state] = n
        oldest = conn.execute("SELECT min(enqueued_at) FROM govdb_outbox WHERE state = 'pending'").fetchone()[0]
        if oldest:
            age = datetime.now(timezone.utc) - parse_timestamp(oldest)
            out["oldest_pending_age_s"] = round(max(age.total_seconds(), 0.0), 3)
    if "govdb_shadow_stats" in have:
        for op, reads, bad in conn.execute("SELECT operation, reads, mismatches FROM govdb_shadow_stats"
                                           " ORDER BY operation"):
            out["shadow_by_operation"][op] = {"reads": reads, "mismatches": bad}
            out["shadow_reads"] += reads
            out["shadow_mismatches"] += bad
    return out


def dual_figures(sqlite_path: Path | str) -> dict[str, Any]:
    """Return the dual-write figures of a SQLite file.

    Keys: pending, parked (outbox entries), oldest_pending_age_s (None when
    nothing is pending), shadow_reads, shadow_mismatches and
    shadow_by_operation ({operation: {"reads", "mismatches"}}). A file
    without the dual tables gives zeros.
    """
    with _open(sqlite_path) as conn:
        return figures(conn)


def queue_counts(sqlite_path: Path | str) -> dict[str, int]:
    """Return {"pending": n, "parked": n} for a SQLite file's outbox."""
    f = dual_figures(sqlite_path)
    return {"pending": f["pending"], "parked": f["parked"]}


def parked_entries(sqlite_path: Path | str) -> list[Entry]:
    """Return a SQLite file's parked entries, oldest first."""
    with _open(sqlite_path) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'govdb_outbox'").fetchone():
            return []
        return parked(conn)


class _open:
    """A short read-only connection to the file (missing file: an error naming it)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __enter__(self) -> sqlite3.Connection:
        from ..errors import StoreUnavailableError
        if not self.path.exists():
            raise StoreUnavailableError(f"SQLite file {self.path} does not exist; check DB_SQLITE_PATH")
        uri = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open {self.path} ({exc})") from exc
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _entry(r: Any) -> Entry:
    return Entry(seq=r[0], table=r[1], key=decode(r[2]), op=r[3], enqueued_at=r[4], attempts=r[5],
                 last_error=r[6], state=r[7])
