"""What cleaning produces: the PostgreSQL target of each legacy table
(:data:`TARGETS`), a :class:`Repair`, a row's :class:`Outcome`, the
:class:`Context` of existing keys that orphan checks use, and the text forms
of values and rows for the repair and quarantine tables."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Mapping

from ..keys import PREFIX as KEY_PREFIX
from ..keys import hash_api_key
from .source import KEYS, encode_key

UTC = timezone.utc
Row = Mapping[str, Any]

#: Longest text (UTF-8 bytes) kept in a key or an indexed column: a btree
#: entry holds at most about 2700 bytes.
MAX_INDEXED_BYTES = 2_000
#: Stored for an identity whose api_key is NULL: a hash no key matches.
NO_KEY_HASH = KEY_PREFIX + "0" * 64


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

