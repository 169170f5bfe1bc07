"""Cleaning legacy rows for PostgreSQL: the one module backfill, graph export
and verify share.

``Cleaner(source_tz).clean(table, row)`` turns a legacy row (a dict, as
``source.LegacySource`` reads it) into an :class:`Outcome`: the values of the
PostgreSQL columns (``TARGETS[table].columns``), the repairs made (column,
problem, original value as text), or a quarantine reason. Identities are
cleaned as a whole table (:meth:`Cleaner.clean_identities`): parents and
lineage cycles need every row. Orphan checks use a :class:`Context` (the keys
that exist in the target); :func:`build_context` makes one from the source.

The rule: a migrated row reads back through the PostgreSQL backend as the
SQLite backend (``govdb.legacy``) reads the source row, except where a repair
is recorded; nothing is lost, since every original a repair changed is
recorded, and a row that cannot be migrated is quarantined with its raw text.
JSON values are given as the JSON text sent to PostgreSQL; timestamps as
aware UTC datetimes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Iterable, Mapping

from .. import legacy
from ..backends.base import audit_hash
from ..backends.postgres import audit_words, discovery_words
from ..convert import dump_json, legacy_uuid, parse_timestamp, read_bool, read_float, read_int
from ..keys import PREFIX as KEY_PREFIX
from ..keys import hash_api_key
from ..records import (
    DIALECTIC_PHASES, DIALECTIC_STATUSES, DISCOVERY_STATUSES, EDGE_TYPES, IDENTITY_STATUSES,
    MESSAGE_TYPES, REGIMES, RESPONSE_TYPES, SEVERITIES,
)
from ..validate import EISV_BOUNDS
from .source import KEYS, encode_key, quote_ident

UTC = timezone.utc
Row = Mapping[str, Any]

#: Longest text (UTF-8 bytes) kept in a key or an indexed column: a btree
#: entry holds at most about 2700 bytes.
MAX_INDEXED_BYTES = 2_000
#: Stored for an identity whose api_key is NULL: a hash no key matches.
NO_KEY_HASH = KEY_PREFIX + "0" * 64
_CLOSING_PHASE = {"resolved": "resolved", "escalated": "escalated", "failed": "failed", "cancelled": "failed"}


@dataclass(frozen=True)
class Target:
    source: str                     # legacy table
    table: str                      # PostgreSQL table
    columns: tuple[str, ...]        # values of an Outcome, in this order
    json_columns: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[str, ...]:
        return KEYS[self.source]


TARGETS: dict[str, Target] = {t.source: t for t in (
    Target("agent_metadata", "core.identities",
           ("agent_id", "api_key_hash", "status", "created_at", "updated_at", "parent_agent_id", "spawn_reason",
            "disabled_at", "tags", "notes", "metadata", "lifecycle_events"),
           frozenset({"metadata", "lifecycle_events"})),
    Target("session_identities", "core.sessions",
           ("session_id", "agent_id", "created_at", "last_active", "expires_at", "is_active", "client_type",
            "client_info", "metadata"), frozenset({"client_info", "metadata"})),
    Target("agent_state", "core.agent_state",
           ("id", "agent_id", "recorded_at", "energy", "integrity", "entropy", "void", "coherence", "regime",
            "snapshot"), frozenset({"snapshot"})),
    Target("calibration_state", "core.calibration", ("id", "state", "version", "updated_at"), frozenset({"state"})),
    Target("audit_events", "audit.events",
           ("id", "event_id", "ts", "agent_id", "session_id", "event_type", "confidence", "details", "raw_hash",
            "words"), frozenset({"details"})),
    Target("tool_usage", "audit.tool_usage",
           ("id", "usage_id", "ts", "agent_id", "session_id", "tool_name", "latency_ms", "success", "error_type",
            "payload"), frozenset({"payload"})),
    Target("discoveries", "core.discoveries",
           ("id", "agent_id", "type", "severity", "status", "created_at", "updated_at", "resolved_at", "summary",
            "details", "related_files", "confidence", "embedding", "words"), frozenset({"related_files"})),
    Target("discovery_tags", "core.discovery_tags", ("discovery_id", "tag")),
    Target("discovery_edges", "core.discovery_edges",
           ("src_id", "dst_id", "edge_type", "response_type", "weight", "created_at", "created_by", "metadata"),
           frozenset({"metadata"})),
    Target("dialectic_sessions", "core.dialectic_sessions",
           ("session_id", "paused_agent_id", "reviewer_agent_id", "phase", "status", "created_at", "updated_at",
            "reason", "discovery_id", "dispute_type", "session_type", "topic", "max_synthesis_rounds",
            "synthesis_round", "paused_agent_state", "resolution"),
           frozenset({"paused_agent_state", "resolution"})),
    Target("dialectic_messages", "core.dialectic_messages",
           ("id", "session_id", "agent_id", "message_type", "ts", "root_cause", "proposed_conditions", "reasoning",
            "observed_metrics", "concerns", "agrees", "signature"),
           frozenset({"proposed_conditions", "observed_metrics", "concerns"})),
)}


class Repair(tuple):
    """One repaired column: (column, kind, problem, original, encoding).

    ``original`` is the value before the repair as text; ``encoding`` says
    how: ``text`` (as is), ``json`` (a JSON string literal, for text with NUL),
    ``hex`` (the exact bytes, for text that is not UTF-8 or a BLOB), ``null``.
    Raw API keys never appear: they are replaced by their hash.
    """

    __slots__ = ()

    def __new__(cls, column: str, kind: str, problem: str, value: Any) -> "Repair":
        original, encoding = encode_original(value)
        return tuple.__new__(cls, (column, kind, problem, original, encoding))

    column = property(lambda self: self[0])
    kind = property(lambda self: self[1])
    problem = property(lambda self: self[2])
    original = property(lambda self: self[3])
    encoding = property(lambda self: self[4])


class Outcome:
    """What becomes of one legacy row."""

    __slots__ = ("table", "row", "key", "values", "repairs", "reason", "kind", "order")

    def __init__(self, table: str, row: Row, key: tuple[Any, ...], values: tuple[Any, ...] | list[Any] | None,
                 repairs: list[Repair], reason: str | None = None, kind: str | None = None):
        self.table = table
        self.row = row
        self.key = key
        self.values = values
        self.repairs = repairs
        self.reason = reason      # quarantine reason (None: migrated)
        self.kind = kind          # short code of the quarantine reason
        self.order: Any = key     # resume order (identities: (depth, agent_id))

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def key_text(self) -> str:
        if any(k is None for k in self.key):
            return json.dumps([{"rowid": self.row.get("_rowid")}])
        return encode_key(self.key)

    def value(self, column: str) -> Any:
        return None if self.values is None else self.values[TARGETS[self.table].columns.index(column)]

    def raw_text(self) -> str:
        """Return the source row as JSON text, raw API keys replaced by their hash."""
        return raw_text(self.row)

    def quarantine(self, reason: str, kind: str) -> "Outcome":
        self.values, self.reason, self.kind = None, reason, kind
        return self

    def __repr__(self) -> str:
        state = f"quarantined: {self.reason}" if self.reason else f"{len(self.repairs)} repairs"
        return f"Outcome({self.table} {self.key_text}, {state})"


@dataclass
class Context:
    """What exists in the target, for orphan checks; None skips a check.

    ``quarantined`` holds keys known to be quarantined, for clearer reasons.
    The audit and tool-usage maps come from :func:`prescan_duplicates`.
    """

    agents: set[str] | frozenset[str] | None = None
    discoveries: set[str] | frozenset[str] | None = None
    dialectic_sessions: set[str] | frozenset[str] | None = None
    quarantined: dict[str, set[Any]] = field(default_factory=dict)
    #: normalised event_id -> the audit row id that keeps it (ids used more than once)
    event_id_owner: dict[str, int] = field(default_factory=dict)
    #: audit row id -> id of the earlier row with the same content (raw_hash)
    audit_duplicate_of: dict[int, int] = field(default_factory=dict)
    #: normalised usage_id -> the tool_usage row id that keeps it
    usage_id_owner: dict[str, int] = field(default_factory=dict)


# -- values to text, for the repair and quarantine tables ---------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
# NaN, Infinity, \u0000 or a surrogate escape, a number with an exponent. Spelt to start with
# one character class, which the regular expression engine skips to quickly.
_JSON_WALK = re.compile(r"[NI\\0-9](?:(?<=N)aN|(?<=I)nfinity|(?<=\\)u(?:0000|[dD][89a-fA-F])|(?<=[0-9])[eE])")
_EPOCH_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EMPTY = {dict: "{}", list: "[]"}


def encode_original(value: Any) -> tuple[str | None, str]:
    """Return (text, encoding) of a value for the repairs table; see :class:`Repair`."""
    if value is None:
        return None, "null"
    if isinstance(value, bytes):
        return value.hex(), "hex"
    if isinstance(value, str):
        if _SURROGATE.search(value):
            try:
                return value.encode("utf-8", "surrogateescape").hex(), "hex"
            except UnicodeEncodeError:
                return _escape_surrogates(json.dumps(value, ensure_ascii=False)), "json"
        if "\x00" in value:
            return json.dumps(value, ensure_ascii=False), "json"
        return value, "text"
    return repr(value), "text"


def mask_key(value: Any) -> Any:
    """Return the stored (hashed) form of an API key, for anything written outside core.identities."""
    if isinstance(value, str):
        return hash_key(value)
    if isinstance(value, bytes):
        return KEY_PREFIX + hashlib.sha256(value).hexdigest()
    return value


def hash_key(value: str) -> str:
    """Return keys.hash_api_key(value); a key that is not UTF-8 has its exact bytes hashed."""
    try:
        return hash_api_key(value)
    except UnicodeEncodeError:
        return KEY_PREFIX + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def raw_text(row: Row) -> str:
    """Return a source row as JSON text (lossless; raw API keys replaced by their hash)."""
    doc: dict[str, Any] = {}
    for col, value in row.items():
        if col == "_rowid":
            col = "rowid"
        elif col == "api_key":
            value = mask_key(value)
        if isinstance(value, bytes):
            value = {"blob": value.hex()}
        elif isinstance(value, str) and _SURROGATE.search(value):
            try:
                value = {"hex": value.encode("utf-8", "surrogateescape").hex()}
            except UnicodeEncodeError:
                value = {"text": _escape_surrogates(value)}
        doc[col] = value
    return json.dumps(doc, ensure_ascii=False, allow_nan=True)


def _escape_surrogates(text: str) -> str:
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# -- column cleaners (each appends to ``rep`` what it changed) --------------

def _text(col: str, v: Any, rep: list[Repair]) -> Any:
    """Return text PostgreSQL accepts: NUL removed, bytes that are not UTF-8 as U+FFFD."""
    if type(v) is str:
        if (v.isascii() and "\x00" not in v) or not _BAD_TEXT.search(v):
            return v
        return _fix_text(col, v, rep)
    if v is None:
        return None
    if isinstance(v, bytes):
        fixed = v.decode("utf-8", "replace").replace("\x00", "")
        rep.append(Repair(col, "blob-as-text", f"{col} holds a BLOB; stored as UTF-8 text"
                          " (undecodable bytes as U+FFFD, NUL removed)", v))
        return fixed
    fixed = str(v)
    rep.append(Repair(col, "number-as-text", f"{col} holds a number; stored as text", v))
    return fixed


def _fix_text(col: str, v: str, rep: list[Repair]) -> str:
    problems, kind, fixed = [], "nul-byte", v
    if _SURROGATE.search(v):
        kind = "invalid-utf8"
        try:
            fixed = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            fixed = _SURROGATE.sub("\ufffd", v)
        problems.append("bytes that are not UTF-8 replaced by U+FFFD")
    if "\x00" in fixed:
        fixed = fixed.replace("\x00", "")
        problems.append("NUL bytes removed")
    rep.append(Repair(col, kind, f"{col}: {' and '.join(problems)}", v))
    return fixed


def _key(v: Any) -> str | None:
    """Return why ``v`` cannot be a key or a reference to one, or None."""
    if type(v) is str:
        if _BAD_TEXT.search(v):
            return "contains a NUL byte" if "\x00" in v and not _SURROGATE.search(v) else "is not valid UTF-8"
        return _too_long(v)
    if v is None:
        return "is NULL"
    return f"is a {'BLOB' if isinstance(v, bytes) else type(v).__name__}, not text"


def _too_long(v: str) -> str | None:
    if len(v) > MAX_INDEXED_BYTES // 4 and len(v.encode("utf-8")) > MAX_INDEXED_BYTES:
        return f"is {len(v.encode('utf-8'))} bytes long; at most {MAX_INDEXED_BYTES} fit a PostgreSQL index"
    return None


def _indexed(col: str, v: Any, rep: list[Repair]) -> tuple[Any, str | None]:
    """Clean text of an indexed column; return (value, quarantine reason)."""
    v = _text(col, v, rep)
    return v, (None if v is None else _too_long(v))


def _json(col: str, v: Any, rep: list[Repair], kind: type = dict) -> tuple[Any, str]:
    """Return (value, JSON text for PostgreSQL) as convert.read_json_object/list read ``v``."""
    if v is None:
        return kind(), _EMPTY[kind]
    value, text, problem = _load_json(col, v, rep, kind)
    if problem is not None:
        rep.append(Repair(col, problem[0], problem[1], v))
        return kind(), _EMPTY[kind]
    return _checked_json(col, v, value, text, rep)


def _load_json(col: str, v: Any, rep: list[Repair], kind: type) -> tuple[Any, str, tuple[str, str] | None]:
    if type(v) is str:
        text = v
        if not v.isascii() and _SURROGATE.search(v):
            # Read as the SQLite backend reads it (its text_factory replaces).
            try:
                text = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            except UnicodeEncodeError:
                text = _SURROGATE.sub("\ufffd", v)
            rep.append(Repair(col, "invalid-utf8", f"{col}: bytes that are not UTF-8 replaced by U+FFFD", v))
    elif isinstance(v, bytes):
        text = v.decode("utf-8", "replace")
    else:
        return None, "", ("invalid-json", f"{col} holds a {type(v).__name__}, not JSON text; stored {_EMPTY[kind]}")
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        return None, text, ("invalid-json", f"{col} is not valid JSON; stored {_EMPTY[kind]}")
    if value is None:
        return None, text, ("json-null", f"{col} holds JSON null; stored {_EMPTY[kind]}")
    if type(value) is not kind:
        want = "an object" if kind is dict else "an array"
        return None, text, ("json-wrong-type", f"{col} holds a JSON {_json_type(value)} where {want} is expected;"
                                               f" stored {_EMPTY[kind]}")
    return value, text, None


_scan_json = json.JSONDecoder().scan_once


def _loads(text: str) -> Any:
    """Return json.loads(text): the scanner alone when the document fills the text (most do)."""
    try:
        value, end = _scan_json(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return json.loads(text)  # the same error, or a document within whitespace
    return value if end == len(text) else json.loads(text)


def _checked_json(col: str, original: Any, value: Any, text: str, rep: list[Repair]) -> tuple[Any, str]:
    if not _JSON_WALK.search(text):
        return value, text
    from ..backends.postgres import dump_jsonb  # jsonb text that reads back as the same floats
    problems: set[str] = set()
    value = _sanitize(value, problems)
    if problems:
        rep.append(Repair(col, "json-repaired", f"{col}: {'; '.join(sorted(problems))}", original))
    return value, dump_jsonb(value)


def _json_type(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__)


def _sanitize(v: Any, problems: set[str]) -> Any:
    """Return ``v`` as jsonb takes it: NaN/Infinity as null, NUL removed, lone surrogates as U+FFFD."""
    t = type(v)
    if t is str:
        if _BAD_TEXT.search(v):
            if "\x00" in v:
                problems.add("NUL characters removed")
                v = v.replace("\x00", "")
            if _SURROGATE.search(v):
                problems.add("lone surrogates replaced by U+FFFD")
                v = _SURROGATE.sub("\ufffd", v)
        return v
    if t is float:
        if not math.isfinite(v):
            problems.add("NaN/Infinity stored as null")
            return None
        return v
    if t is dict:
        return {_sanitize(k, problems): _sanitize(x, problems) for k, x in v.items()}
    if t is list:
        return [_sanitize(x, problems) for x in v]
    return v


def _str_list(col: str, v: Any, rep: list[Repair]) -> tuple[list[str], str | None]:
    """Return (strings, JSON text or None) as convert.read_str_list reads ``v``."""
    items, text = _json(col, v, rep, list)
    strings = [x for x in items if type(x) is str]
    if len(strings) != len(items):
        rep.append(Repair(col, "non-text-items", f"{col}: items that are not text dropped", v))
        return strings, None
    return strings, text


def _bool(col: str, v: Any, rep: list[Repair], default: bool | None) -> bool | None:
    if type(v) is int and (v == 0 or v == 1):
        return v == 1
    if v is None:
        return default
    b = read_bool(v, default)
    rep.append(Repair(col, "not-boolean", f"{col} is {_show(v)}, not 0 or 1; stored {_sql(b)}"
                      " (as the SQLite backend reads it)", v))
    return b


def _float(col: str, v: Any, rep: list[Repair]) -> float | None:
    if type(v) is float:
        if math.isfinite(v):
            return v
    elif type(v) is int:
        return float(v)
    elif v is None:
        return None
    f = read_float(v)
    if f is None:
        rep.append(Repair(col, "not-finite", f"{col} is {_show(v)}; stored NULL", v))
    return f


def _int32(col: str, v: Any, rep: list[Repair], default: int | None = None) -> int | None:
    if type(v) is int and -2**31 <= v < 2**31:
        return v
    if v is None:
        return default
    i = read_int(v)
    if i is None or not -2**31 <= i < 2**31:
        rep.append(Repair(col, "not-integer", f"{col} is {_show(v)}, not a 32-bit integer; stored {_sql(default)}",
                          v))
        return default
    rep.append(Repair(col, "not-integer", f"{col} is {_show(v)}; stored {i}", v))
    return i


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _sql(v: Any) -> str:
    return "NULL" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)


def _canonical(v: Any, allowed: tuple[str, ...]) -> str | None:
    """Return the allowed value ``v`` is a case or spacing variant of, or None."""
    if not isinstance(v, str):
        return None
    folded = v.strip().lower().replace("-", "_").replace(" ", "_")
    hits = [a for a in allowed if a.lower() == folded]
    return hits[0] if len(hits) == 1 else None


def _uuid(v: Any) -> str | None:
    if type(v) is str:
        if len(v) == 36 and _UUID_RE.fullmatch(v):
            return v
        try:
            return str(uuid.UUID(v.strip()))
        except (ValueError, AttributeError):
            return None
    return None


# -- the cleaner ---------------------------------------------------------------

_MISSING = "missing"


class Cleaner:
    """Turn legacy rows into PostgreSQL rows; naive timestamps are read in ``source_tz``."""

    def __init__(self, source_tz: tzinfo = UTC, context: Context | None = None):
        self.tz = source_tz
        self.context = context or Context()
        #: Conversions that change no information (not repairs), counted for reports.
        self.notes: Counter[str] = Counter()
        self._by_table = {
            "agent_metadata": self._identity, "session_identities": self._session,
            "agent_state": self._agent_state, "calibration_state": self._calibration,
            "audit_events": self._audit, "tool_usage": self._tool_usage, "discoveries": self._discovery,
            "discovery_tags": self._tag, "discovery_edges": self._edge,
            "dialectic_sessions": self._dialectic_session, "dialectic_messages": self._message,
        }

    def clean(self, table: str, row: Row) -> Outcome:
        """Clean one row. For agent_metadata prefer :meth:`clean_identities` (cycles need the table)."""
        out = self._by_table[table](row)
        if table == "agent_metadata" and out.ok:
            self._resolve_parents([out], self.context.agents)
            out.values = tuple(out.values)  # type: ignore[arg-type]
        return out

    def clean_many(self, table: str, rows: Iterable[Row]) -> list[Outcome]:
        fn = self._by_table[table]
        return [fn(r) for r in rows]

    # -- timestamps ---------------------------------------------------------

    def timestamp(self, v: Any) -> tuple[datetime | None, str | None]:
        """Return (aware UTC datetime, None), or (None, why) when missing or unreadable."""
        if type(v) is str and len(v) == 32 and v[10] == "T" and v[26:] == "+00:00":
            try:
                return datetime.fromisoformat(v), None
            except ValueError:
                pass
        if v is None or (isinstance(v, (str, bytes)) and not v.strip()):
            return None, _MISSING
        try:
            dt = parse_timestamp(v, naive_tz=self.tz)
        except ValueError as exc:
            return None, str(exc)
        if isinstance(v, str):
            tail = v.strip()[10:].upper()
            if _EPOCH_TEXT.fullmatch(v.strip()):
                self.notes["timestamps given as epoch seconds"] += 1
            elif not (tail.endswith("Z") or "+" in tail or "-" in tail or "UTC" in tail or "GMT" in tail):
                self.notes[f"naive timestamps read in {self.tz}"] += 1
        return dt, None

    def _required_ts(self, col: str, r: Row, rep: list[Repair],
                     fallbacks: tuple[str, ...] = ()) -> tuple[datetime | None, str | None]:
        """Return (timestamp, None) using the first readable fallback column, or (None, quarantine reason)."""
        v = r.get(col)
        dt, why = self.timestamp(v)
        if dt is not None:
            return dt, None
        what = "missing" if why == _MISSING else f"unreadable ({why})"
        for fb in fallbacks:
            alt, _ = self.timestamp(r.get(fb))
            if alt is not None:
                rep.append(Repair(col, "bad-timestamp", f"{col} is {what}; {fb} of the row stored instead", v))
                return alt, None
        also = f" and no other timestamp of the row ({', '.join(fallbacks)}) is readable" if fallbacks else ""
        return None, f"{col} is {what}{also}"

    def _optional_ts(self, col: str, v: Any, rep: list[Repair], *, missing: datetime | None = None,
                     garbage: datetime | None = None, garbage_name: str = "NULL") -> datetime | None:
        """Return the timestamp; ``missing`` for NULL or blank (as the SQLite backend reads
        them), ``garbage`` for unreadable text (recorded)."""
        dt, why = self.timestamp(v)
        if dt is not None:
            return dt
        if why == _MISSING:
            return missing
        rep.append(Repair(col, "bad-timestamp", f"{col} is unreadable ({why}); {garbage_name} stored", v))
        return garbage

    # -- orphans ------------------------------------------------------------

    def _missing(self, kind: str, known: Any, value: str) -> str | None:
        """Return why ``value`` names nothing, or None when it exists (or is not checked)."""
        if known is None or value in known:
            return None
        if value in self.context.quarantined.get(kind, ()):
            return f"{kind} {value!r} is quarantined"
        return f"{kind} {value!r} does not exist"

    def _reference(self, col: str, value: Any, kind: str, known: Any) -> str | None:
        """Return why ``value`` in ``col`` is no usable key of an existing ``kind``, or None."""
        bad = _key(value)
        return f"{col} {bad}" if bad else self._missing(kind, known, value)

    # -- tables -------------------------------------------------------------

    def _identity(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        agent_id = r.get("agent_id")
        out = Outcome("agent_metadata", r, (agent_id,), None, rep)
        bad = _key(agent_id)
        if bad:
            return out.quarantine(f"agent_id {bad}", "bad-key")
        raw_key = r.get("api_key")
        if raw_key is None:
            key_hash = NO_KEY_HASH
            rep.append(Repair("api_key", "missing-key", "api_key is NULL; stored a hash no key matches", None))
        else:
            key_hash = mask_key(raw_key) if isinstance(raw_key, (str, bytes)) else mask_key(str(raw_key))
            if key_hash != raw_key:
                self.notes["raw API keys stored as their sha256 hash"] += 1
        status = r.get("status")
        if not status:
            status = "active"  # as the SQLite backend reads it
        elif status not in IDENTITY_STATUSES:
            fixed = _canonical(status, IDENTITY_STATUSES)
            if fixed:
                rep.append(Repair("status", "case-variant", f"status {status!r} stored as {fixed!r}", status))
                status = fixed
            else:
                rep.append(Repair("status", "unknown-value", f"status {_show(status)} is not a known status;"
                                  " stored 'paused' (an agent in an unknown state must not act until reviewed)",
                                  status))
                status = "paused"
        created, why = self._required_ts("created_at", r, rep, ("updated_at", "disabled_at"))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        updated = self._optional_ts("updated_at", r.get("updated_at"), rep, missing=created, garbage=created,
                                    garbage_name="created_at")
        parent = r.get("parent_agent_id")
        if parent is not None and _key(parent):
            rep.append(Repair("parent_agent_id", "bad-reference",
                              f"parent_agent_id {_key(parent)}; stored NULL", parent))
            parent = None
        meta, meta_text = _json("metadata_json", r.get("metadata_json"), rep)
        if "notes" in meta:
            meta, notes = legacy.split_notes(dict(meta))
            if notes is None:
                rep.append(Repair("metadata_json", "notes-not-text",
                                  "metadata_json.notes is not text; dropped (the SQLite backend ignores it)",
                                  r.get("metadata_json")))
            meta_text = None
        else:
            notes = None
        tags, _ = _str_list("tags_json", r.get("tags_json"), rep)
        events, events_text = _json("lifecycle_events_json", r.get("lifecycle_events_json"), rep, list)
        if any(type(e) is not dict for e in events):
            events = [e for e in events if type(e) is dict]
            events_text = None
            rep.append(Repair("lifecycle_events_json", "non-object-items",
                              "lifecycle_events_json: items that are not objects dropped",
                              r.get("lifecycle_events_json")))
        out.values = [
            agent_id, key_hash, status, created, updated, parent, _text("spawn_reason", r.get("spawn_reason"), rep),
            self._optional_ts("disabled_at", r.get("disabled_at"), rep),
            [_text("tags_json", t, rep) for t in tags], notes,
            meta_text if meta_text is not None else _dump(meta),
            events_text if events_text is not None else _dump(events),
        ]
        return out

    def clean_identities(self, rows: Iterable[Row], *, existing_agents: Iterable[str] = ()) -> list[Outcome]:
        """Clean the whole agent_metadata table, in load order (parents before children).

        A parent naming no agent (in the source or in ``existing_agents``)
        becomes NULL, recorded. A lineage cycle is broken at its oldest member
        (smallest created_at, then agent_id): no agent can have been spawned by
        a younger one, so that link is the false one; its parent becomes NULL,
        recorded. ``Outcome.order`` is (depth in the lineage, agent_id);
        quarantined rows come first.
        """
        outs = [self._identity(r) for r in rows]
        ok = [o for o in outs if o.ok]
        known = {o.key[0] for o in ok} | set(existing_agents)
        self.context.quarantined.setdefault("agent", set()).update(
            o.key[0] for o in outs if not o.ok and isinstance(o.key[0], str))
        self._resolve_parents(ok, known)
        by_id = {o.key[0]: o for o in ok}
        self._break_cycles(by_id)
        depth: dict[str, int] = {}
        for agent in by_id:
            chain = []
            a: str | None = agent
            while a is not None and a in by_id and a not in depth:
                chain.append(a)
                a = by_id[a].values[5]  # type: ignore[index]
            d = depth[a] + 1 if a is not None and a in depth else 0
            for x in reversed(chain):
                depth[x] = d
                d += 1
        for o in outs:
            o.values = tuple(o.values) if o.values is not None else None
            o.order = (depth[o.key[0]], o.key[0]) if o.ok else (-1, o.key_text)
        outs.sort(key=lambda o: o.order)
        return outs

    def _resolve_parents(self, outs: list[Outcome], known: Any) -> None:
        for o in outs:
            values = o.values
            parent = values[5]  # type: ignore[index]
            if parent is None:
                continue
            if parent == o.key[0]:
                why, kind = "the agent is its own parent (a lineage cycle)", "lineage-cycle"
            else:
                why, kind = self._missing("agent", known, parent), "orphan-parent"
                if why is None:
                    continue
            o.repairs.append(Repair("parent_agent_id", kind, f"parent_agent_id: {why}; stored NULL", parent))
            if isinstance(values, tuple):
                values = o.values = list(values)
            values[5] = None  # type: ignore[index]

    def _break_cycles(self, by_id: dict[str, Outcome]) -> None:
        state: dict[str, int] = {}  # 1 on the current walk, 2 finished
        for start in sorted(by_id):
            path: list[str] = []
            a: str | None = start
            while a is not None and a in by_id and a not in state:
                state[a] = 1
                path.append(a)
                a = by_id[a].values[5]  # type: ignore[index]
            if a is not None and state.get(a) == 1:
                cycle = path[path.index(a):]
                oldest = min(cycle, key=lambda x: (by_id[x].values[3], x))  # type: ignore[index]
                o = by_id[oldest]
                parent = o.values[5]  # type: ignore[index]
                o.repairs.append(Repair(
                    "parent_agent_id", "lineage-cycle",
                    f"lineage cycle {' -> '.join(map(repr, cycle + [a]))}; broken at its oldest member,"
                    " whose parent is stored NULL", parent))
                o.values[5] = None  # type: ignore[index]
            for x in path:
                state[x] = 2

    def _session(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        sid = r.get("session_id")
        out = Outcome("session_identities", r, (sid,), None, rep)
        bad = _key(sid)
        if bad:
            return out.quarantine(f"session_id {bad}", "bad-key")
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        created, why = self._required_ts("created_at", r, rep, ("last_active",))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        last = self._optional_ts("last_active", r.get("last_active"), rep, missing=created, garbage=created,
                                 garbage_name="created_at")
        expires, why = self.timestamp(r.get("expires_at"))
        if expires is None:
            expires = last
            rep.append(Repair("expires_at", "bad-timestamp",
                              f"expires_at is {'missing' if why == _MISSING else f'unreadable ({why})'};"
                              " last_active stored (the session counts as expired)", r.get("expires_at")))
        _, info = _json("client_info_json", r.get("client_info_json"), rep)
        _, meta = _json("metadata_json", r.get("metadata_json"), rep)
        out.values = (sid, agent, created, last, expires, _bool("is_active", r.get("is_active"), rep, True),
                      _text("client_type", r.get("client_type"), rep), info, meta)
        return out

    def _agent_state(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("agent_state", r, (r.get("id"),), None, rep)
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        recorded, why = self._required_ts("recorded_at", r, rep)
        if recorded is None:
            return out.quarantine(why or "", "bad-timestamp")
        raw_doc = r.get("state_json")
        doc: dict[str, Any] = {}
        text = ""
        if raw_doc is not None:
            value, text, problem = _load_json("state_json", raw_doc, rep, dict)
            if problem is not None:
                rep.append(Repair("state_json", problem[0], problem[1], raw_doc))
            else:
                doc = value
        eisv: dict[str, float | None] = {}
        for (col, key), name in zip(legacy.STATE_COLUMNS, ("integrity", "entropy", "void", "coherence")):
            got, why = _eisv_value(name, col, key, r.get(col), doc, rep)
            if why:
                return out.quarantine(why, "bad-value")
            eisv[name] = got
        energy = doc.get("E")
        if energy is not None:
            if isinstance(energy, (int, float)) and not isinstance(energy, bool):
                lo, hi = EISV_BOUNDS["energy"]
                if not (math.isfinite(energy) and lo <= energy <= hi):
                    return out.quarantine(f"energy (state_json.E) is {energy!r}, outside [{lo}, {hi}]", "bad-value")
                energy = float(energy)
            else:
                rep.append(Repair("state_json", "not-finite",
                                  f"state_json.E is {_show(energy)}, not a number; energy stored NULL", raw_doc))
                energy = None
        regime = r.get("regime") or doc.get("regime")
        if not isinstance(regime, str):
            regime = "nominal"  # as the SQLite backend reads it
        elif regime not in REGIMES:
            fixed = _canonical(regime, REGIMES)
            from_doc = doc.get("regime") if doc.get("regime") in REGIMES else None
            if fixed:
                rep.append(Repair("regime", "case-variant", f"regime {regime!r} stored as {fixed!r}", regime))
                regime = fixed
            elif from_doc and from_doc != regime:
                rep.append(Repair("regime", "unknown-value",
                                  f"regime {_show(regime)} is not a known regime; state_json.regime stored", regime))
                regime = from_doc
            else:
                return out.quarantine(f"regime {_show(regime)} is not a known regime and state_json has none",
                                      "unknown-value")
        snapshot = {k: v for k, v in doc.items() if k not in legacy.STATE_KEYS}
        if snapshot and _JSON_WALK.search(text):
            problems: set[str] = set()
            snapshot = _sanitize(snapshot, problems)
            if problems:
                rep.append(Repair("state_json", "json-repaired", f"state_json: {'; '.join(sorted(problems))}",
                                  raw_doc))
        out.values = (r.get("id"), agent, recorded, energy, eisv["integrity"], eisv["entropy"], eisv["void"],
                      eisv["coherence"], regime, _dump(snapshot))
        return out

    def _calibration(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("calibration_state", r, (r.get("id"),), None, rep)
        updated, why = self._required_ts("updated_at", r, rep)
        if updated is None:
            return out.quarantine(why or "", "bad-timestamp")
        _, state = _json("state_json", r.get("state_json"), rep)
        raw_version = r.get("version")
        version = _int32("version", raw_version, rep, 1)
        if version is None or version < 1:
            rep.append(Repair("version", "out-of-range", f"version {version} is below 1; stored 1", raw_version))
            version = 1
        out.values = (1, state, version, updated)
        return out

    def _audit(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        rowid = r.get("id")
        out = Outcome("audit_events", r, (rowid,), None, rep)
        ctx = self.context
        first = ctx.audit_duplicate_of.get(rowid)
        if first is not None:
            return out.quarantine(f"same content (raw_hash) as audit event id {first}, which is kept",
                                  "duplicate")
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        event_id = _event_id("audit_events", "event_id", r.get("event_id"), rowid, ctx.event_id_owner, rep)
        agent, why = _indexed("agent_id", r.get("agent_id"), rep)
        event_type, why2 = _indexed("event_type", r.get("event_type") or "", rep)
        if why or why2:
            return out.quarantine(f"agent_id {why}" if why else f"event_type {why2}", "too-long")
        session = _text("session_id", r.get("session_id"), rep)
        confidence = r.get("confidence")
        if type(confidence) is not float or not math.isfinite(confidence):
            conf = read_float(confidence)
            if conf is None:
                if confidence is not None:
                    rep.append(Repair("confidence", "not-finite",
                                      f"confidence is {_show(confidence)}; stored 1.0 (as the SQLite backend reads it)",
                                      confidence))
                conf = 1.0
            confidence = conf
        raw_details, repairs_before = r.get("details_json"), len(rep)
        details, details_text = _json("details_json", raw_details, rep)
        if type(raw_details) is str and len(rep) == repairs_before:
            # The text the SQLite backend searches: the stored JSON, re-written when it has \u escapes.
            searched = raw_details if "\\u" not in raw_details else dump_json(details)
        else:
            searched = dump_json(details)  # repaired: what the row holds now
        raw_hash = r.get("raw_hash")
        if not raw_hash:
            raw_hash = audit_hash(ts, event_type, agent, session, details)
            rep.append(Repair("raw_hash", "missing-hash", "raw_hash is missing; stored base.audit_hash of the row",
                              r.get("raw_hash")))
        else:
            raw_hash, why = _indexed("raw_hash", raw_hash, rep)
            if why:
                return out.quarantine(f"raw_hash {why}", "too-long")
        out.values = (rowid, event_id, ts, agent, session, event_type, confidence, details_text, raw_hash,
                      audit_words(event_type, searched))
        return out

    def _tool_usage(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        rowid = r.get("id")
        out = Outcome("tool_usage", r, (rowid,), None, rep)
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        usage_id = _event_id("tool_usage", "usage_id", r.get("usage_id"), rowid, self.context.usage_id_owner, rep)
        agent, why = _indexed("agent_id", r.get("agent_id"), rep)
        tool, why2 = _indexed("tool_name", r.get("tool_name") or "", rep)
        if why or why2:
            return out.quarantine(f"agent_id {why}" if why else f"tool_name {why2}", "too-long")
        _, payload = _json("payload_json", r.get("payload_json"), rep)
        out.values = (rowid, usage_id, ts, agent, _text("session_id", r.get("session_id"), rep), tool,
                      _int32("latency_ms", r.get("latency_ms"), rep), _bool("success", r.get("success"), rep, True),
                      _text("error_type", r.get("error_type"), rep), payload)
        return out

    def _discovery(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        did = r.get("id")
        out = Outcome("discoveries", r, (did,), None, rep)
        bad = _key(did)
        if bad:
            return out.quarantine(f"id {bad}", "bad-key")
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        dtype, why = _indexed("type", r.get("type") or "", rep)
        if why:
            return out.quarantine(f"type {why}", "too-long")
        created, why = self._required_ts("created_at", r, rep, ("updated_at", "resolved_at"))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        status = _enum("status", r.get("status"), DISCOVERY_STATUSES, "open", "open", rep)
        severity = r.get("severity")
        if severity is not None and severity not in SEVERITIES:
            severity = _enum("severity", severity, SEVERITIES, None, None, rep, blank_is_missing=False)
        files, files_text = _str_list("related_files", r.get("related_files"), rep)
        if files_text is None or any(_BAD_TEXT.search(f) for f in files):
            files_text = _dump([_text("related_files", f, rep) for f in files])
        embedding = r.get("embedding")
        if embedding is not None and not isinstance(embedding, bytes):
            rep.append(Repair("embedding", "not-blob", "embedding is not a BLOB; its UTF-8 bytes stored", embedding))
            embedding = str(embedding).encode("utf-8", "surrogateescape")
        updated = self._optional_ts("updated_at", r.get("updated_at"), rep, garbage=created,
                                    garbage_name="created_at")
        resolved = self._optional_ts("resolved_at", r.get("resolved_at"), rep)
        summary, details = _text("summary", r.get("summary") or "", rep), _text("details", r.get("details"), rep)
        out.values = (did, agent, dtype, severity, status, created, updated, resolved, summary, details,
                      files_text, _float("confidence", r.get("confidence"), rep), embedding,
                      discovery_words(summary, details))
        return out

    def _tag(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        did, tag = r.get("discovery_id"), r.get("tag")
        out = Outcome("discovery_tags", r, (did, tag), None, rep)
        bad = _key(did)
        if bad:
            return out.quarantine(f"discovery_id {bad}", "bad-key")
        bad = _key(tag)
        if bad:
            return out.quarantine(f"tag {bad}", "bad-key")
        why = self._missing("discovery", self.context.discoveries, did)
        if why:
            return out.quarantine(why, "orphan")
        out.values = (did, tag)
        return out

    def _edge(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        src, dst, etype = r.get("src_id"), r.get("dst_id"), r.get("edge_type")
        out = Outcome("discovery_edges", r, (src, dst, etype), None, rep)
        for col, v in (("src_id", src), ("dst_id", dst), ("edge_type", etype)):
            bad = _key(v)
            if bad:
                return out.quarantine(f"{col} {bad}", "bad-key")
        if etype not in EDGE_TYPES:
            return out.quarantine(f"edge_type {_show(etype)} is not one of {', '.join(EDGE_TYPES)}", "unknown-value")
        for v in (src, dst):
            why = self._missing("discovery", self.context.discoveries, v)
            if why:
                return out.quarantine(why, "orphan")
        created, why = self._required_ts("created_at", r, rep)
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        response = r.get("response_type")
        if response is not None and response not in RESPONSE_TYPES:
            response = _enum("response_type", response, RESPONSE_TYPES, None, None, rep, blank_is_missing=False)
        _, meta = _json("metadata", r.get("metadata"), rep)
        out.values = (src, dst, etype, response, _float("weight", r.get("weight"), rep), created,
                      _text("created_by", r.get("created_by"), rep), meta)
        return out

    def _dialectic_session(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        sid = r.get("session_id")
        out = Outcome("dialectic_sessions", r, (sid,), None, rep)
        bad = _key(sid)
        if bad:
            return out.quarantine(f"session_id {bad}", "bad-key")
        paused = r.get("paused_agent_id")
        why = self._reference("paused_agent_id", paused, "agent", self.context.agents)
        if why:
            return out.quarantine(f"paused agent: {why}", "orphan")
        reviewer = self._optional_ref("reviewer_agent_id", r.get("reviewer_agent_id"), "agent",
                                      self.context.agents, rep)
        discovery = self._optional_ref("discovery_id", r.get("discovery_id"), "discovery",
                                       self.context.discoveries, rep)
        created, why = self._required_ts("created_at", r, rep, ("updated_at",))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        status = r.get("status") or "active"
        if status not in DIALECTIC_STATUSES:
            status = _enum("status", status, DIALECTIC_STATUSES, "active", "failed", rep,
                           "an unknown state is treated as closed, so the session cannot go on unreviewed")
        phase = r.get("phase") or "thesis"
        if phase not in DIALECTIC_PHASES:
            implied = _CLOSING_PHASE.get(status, "thesis")
            phase = _enum("phase", phase, DIALECTIC_PHASES, "thesis", implied, rep, "the phase its status implies")
        resolution_raw = r.get("resolution_json")
        resolution_text = None
        if resolution_raw is not None:
            value, text, problem = _load_json("resolution_json", resolution_raw, rep, dict)
            if problem is not None and problem[0] != "json-null":
                rep.append(Repair("resolution_json", problem[0], problem[1].replace("stored {}", "stored NULL"),
                                  resolution_raw))
            elif problem is None:
                _, resolution_text = _checked_json("resolution_json", resolution_raw, value, text, rep)
        _, paused_state = _json("paused_agent_state_json", r.get("paused_agent_state_json"), rep)
        out.values = (sid, paused, reviewer, phase, status, created,
                      self._optional_ts("updated_at", r.get("updated_at"), rep, missing=created, garbage=created,
                                        garbage_name="created_at"),
                      _text("reason", r.get("reason"), rep), discovery,
                      _text("dispute_type", r.get("dispute_type"), rep),
                      _text("session_type", r.get("session_type"), rep), _text("topic", r.get("topic"), rep),
                      _int32("max_synthesis_rounds", r.get("max_synthesis_rounds"), rep),
                      _int32("synthesis_round", r.get("synthesis_round"), rep, 0),
                      paused_state, resolution_text)
        return out

    def _optional_ref(self, col: str, v: Any, kind: str, known: Any, rep: list[Repair]) -> str | None:
        if v is None:
            return None
        why = self._reference(col, v, kind, known)
        if why:
            rep.append(Repair(col, "orphan-reference", f"{why}; stored NULL", v))
            return None
        return v

    def _message(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("dialectic_messages", r, (r.get("id"),), None, rep)
        sid, agent = r.get("session_id"), r.get("agent_id")
        why = (self._reference("session_id", sid, "dialectic session", self.context.dialectic_sessions)
               or self._reference("agent_id", agent, "agent", self.context.agents))
        if why:
            return out.quarantine(why, "orphan")
        mtype = r.get("message_type")
        if mtype not in MESSAGE_TYPES:
            fixed = _canonical(mtype, MESSAGE_TYPES)
            if not fixed:
                return out.quarantine(f"message_type {_show(mtype)} is not one of {', '.join(MESSAGE_TYPES)}",
                                      "unknown-value")
            rep.append(Repair("message_type", "case-variant", f"message_type {mtype!r} stored as {fixed!r}", mtype))
            mtype = fixed
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        _, conditions = _json("proposed_conditions_json", r.get("proposed_conditions_json"), rep, list)
        _, metrics = _json("observed_metrics_json", r.get("observed_metrics_json"), rep)
        _, concerns = _json("concerns_json", r.get("concerns_json"), rep, list)
        out.values = (r.get("id"), sid, agent, mtype, ts, _text("root_cause", r.get("root_cause"), rep), conditions,
                      _text("reasoning", r.get("reasoning"), rep), metrics, concerns,
                      _bool("agrees", r.get("agrees"), rep, None), _text("signature", r.get("signature"), rep))
        return out


def _dump(value: Any) -> str:
    from ..backends.postgres import dump_jsonb
    return dump_jsonb(value)


def _enum(col: str, v: Any, allowed: tuple[str, ...], missing: Any, unknown: Any, rep: list[Repair],
          why: str = "", *, blank_is_missing: bool = True) -> Any:
    """Return ``v`` when allowed; ``missing`` for NULL/''; a case variant's canonical form; else ``unknown``."""
    if v in allowed:
        return v
    if v is None or (v == "" and blank_is_missing):
        return missing
    fixed = _canonical(v, allowed)
    if fixed:
        rep.append(Repair(col, "case-variant", f"{col} {v!r} stored as {fixed!r}", v))
        return fixed
    note = f" ({why})" if why else ""
    rep.append(Repair(col, "unknown-value", f"{col} {_show(v)} is not one of {', '.join(allowed)};"
                      f" stored {_sql(unknown)}{note}", v))
    return unknown


def _event_id(table: str, col: str, v: Any, rowid: Any, owners: dict[str, int], rep: list[Repair]) -> str:
    """Return the row's UUID: its own (normalised) or legacy_uuid(table, rowid), as the SQLite backend reads it."""
    norm = _uuid(v)
    if norm is None:
        fixed = legacy_uuid(table, rowid)
        what = "missing" if not v else f"{_show(v)}, not a UUID"
        rep.append(Repair(col, "bad-uuid", f"{col} is {what}; stored legacy_uuid({table}, {rowid})", v))
        return fixed
    owner = owners.get(norm)
    if owner is not None and owner != rowid:
        fixed = legacy_uuid(table, rowid)
        rep.append(Repair(col, "duplicate-id", f"{col} {norm} is also used by {table} id {owner} (which keeps it);"
                          f" stored legacy_uuid({table}, {rowid})", v))
        return fixed
    if norm != v:
        rep.append(Repair(col, "uuid-normalised", f"{col} {_show(v)} stored in canonical form {norm}", v))
    return norm


def _eisv_value(name: str, col: str, key: str, raw: Any, doc: dict[str, Any],
                rep: list[Repair]) -> tuple[float | None, str | None]:
    """Return (value, None) or (None, quarantine reason) for integrity/entropy/void/coherence.

    The column wins when it holds a finite number within bounds; otherwise
    state_json's value does when it is one (recorded unless the column was
    NULL). Missing in both: 0.0 as the SQLite backend reads it (coherence:
    NULL). NaN, infinities or out-of-range values with no valid state_json
    value: quarantine.
    """
    lo, hi = EISV_BOUNDS[name]
    col_value = read_float(raw)
    if col_value is not None and lo <= col_value <= hi:
        return col_value, None
    alt = doc.get(key)
    alt_ok = (isinstance(alt, (int, float)) and not isinstance(alt, bool) and math.isfinite(alt)
              and lo <= alt <= hi)
    if raw is None:
        if alt_ok:
            return float(alt), None
        if alt is None:
            if name == "coherence":
                return None, None
            rep.append(Repair(col, "missing-value", f"{col} and state_json.{key} are missing; stored 0.0"
                              " (as the SQLite backend reads it)", None))
            return 0.0, None
        return None, f"{col} is missing and state_json.{key} = {_show(alt)} is not a number in [{lo}, {hi}]"
    if alt_ok:
        rep.append(Repair(col, "bad-number", f"{col} is {_show(raw)}, not a number in [{lo}, {hi}];"
                          f" state_json.{key} stored", raw))
        return float(alt), None
    return None, (f"{col} is {_show(raw)}, not a number in [{lo}, {hi}], and state_json has no valid {key}")


# -- context from the source -------------------------------------------------

def build_context(source: Any, cleaner: Cleaner, *, existing: Context | None = None) -> Context:
    """Return the keys of the parent rows that migrate (identities, discoveries,
    dialectic sessions) from one snapshot of ``source``, united with ``existing``
    (e.g. keys already in PostgreSQL), plus the duplicate-id maps.

    Sets ``cleaner.context`` as it goes (discoveries need the agents).
    """
    existing = existing or Context()
    ctx = cleaner.context
    with source.snapshot():
        outs = cleaner.clean_identities(source.rows("agent_metadata"), existing_agents=existing.agents or ())
        ctx.agents = {o.key[0] for o in outs if o.ok} | set(existing.agents or ())
        ctx.discoveries = _migrating(source, cleaner, "discoveries", "discovery") | set(existing.discoveries or ())
        ctx.dialectic_sessions = (_migrating(source, cleaner, "dialectic_sessions", "dialectic session")
                                  | set(existing.dialectic_sessions or ()))
        prescan_duplicates(source, cleaner)
    return ctx


def _migrating(source: Any, cleaner: Cleaner, table: str, kind: str) -> set[str]:
    ok: set[str] = set()
    bad = cleaner.context.quarantined.setdefault(kind, set())
    for batch in source.batches(table, None, 10_000):
        for o in cleaner.clean_many(table, batch):
            (ok if o.ok else bad).add(o.key[0])
    return ok


def prescan_duplicates(source: Any, cleaner: Cleaner, tables: Iterable[str] = ("audit_events", "tool_usage")) -> None:
    """Fill the cleaner's duplicate maps from ``source`` (call inside the table's snapshot).

    An event_id or usage_id used by several rows stays with the lowest row id;
    the others get legacy_uuid (a repair). Audit rows whose raw_hash is missing
    get base.audit_hash; one whose hash equals an earlier row's is a duplicate
    (quarantined: the audit trail stores identical events once).
    """
    ctx = cleaner.context
    tables = set(tables) & set(source.tables)
    for table, col, owners in (("audit_events", "event_id", ctx.event_id_owner),
                               ("tool_usage", "usage_id", ctx.usage_id_owner)):
        if table not in tables:
            continue
        # Case and spacing variants are the same UUID: group them together.
        c, t = quote_ident(col), quote_ident(table)
        rows = source.execute(
            f"SELECT {c}, id FROM {t} WHERE lower(trim({c})) IN (SELECT lower(trim({c})) FROM {t}"
            f" WHERE {c} IS NOT NULL GROUP BY 1 HAVING count(*) > 1) ORDER BY id")
        for value, rowid in rows:
            norm = _uuid(value)
            if norm is not None:
                owners.setdefault(norm, rowid)
    if "audit_events" not in tables:
        return
    hashes: dict[str, int] = {}
    missing = source.execute("SELECT rowid AS _rowid, * FROM audit_events WHERE raw_hash IS NULL OR raw_hash = ''"
                             " ORDER BY id")
    if not missing:
        return
    cols = ["_rowid", *source.columns["audit_events"]]
    found, ctx.audit_duplicate_of = ctx.audit_duplicate_of, {}
    notes = cleaner.notes.copy()
    try:
        for values in missing:
            out = cleaner.clean("audit_events", dict(zip(cols, values)))
            if not out.ok:
                continue
            h, rowid = out.value("raw_hash"), out.key[0]
            stored = source.execute("SELECT id FROM audit_events WHERE raw_hash = CAST(? AS TEXT)",
                                    (h.encode("utf-8", "surrogateescape"),))
            first = min([rowid, hashes.get(h, rowid), *(s[0] for s in stored)])
            hashes[h] = first
            if first != rowid:
                found[rowid] = first
            for s in stored:
                if s[0] != first:
                    found[s[0]] = first
    finally:
        ctx.audit_duplicate_of = found
        cleaner.notes = notes
