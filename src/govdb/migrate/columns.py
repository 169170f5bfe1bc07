"""Column cleaners of the migration: text, JSON, numbers, enums, UUIDs, EISV
values. Each returns the value to store and appends to ``rep`` what it changed."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from ..convert import legacy_uuid, read_bool, read_float, read_int
from ..validate import EISV_BOUNDS

from .targets import MAX_INDEXED_BYTES, Repair, _BAD_TEXT, _EMPTY, _JSON_WALK, _SURROGATE, _UUID_RE  # noqa


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
    from ..backends.pgrows import dump_jsonb  # jsonb text that reads back as the same floats
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


def _dump(value: Any) -> str:
    from ..backends.pgrows import dump_jsonb
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

