"""Argument checks shared by every backend.

Each check either returns the normalised value or raises
:class:`~govdb.errors.ValidationError` naming the field and the problem,
before anything is written.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Iterable

from .errors import ValidationError

MAX_ID_LEN = 256
MAX_TAG_LEN = 128
MAX_TAGS = 64
MAX_SHORT_TEXT = 4_096
MAX_LONG_TEXT = 1_048_576  # 1 MiB of characters
MAX_JSON_BYTES = 8 * 1_048_576

# Bounds of the governance model (see docs of the legacy layout).
EISV_BOUNDS = {
    "energy": (0.0, 1.0),
    "integrity": (0.0, 1.0),
    "entropy": (0.001, 2.0),
    "void": (-2.0, 2.0),
    "coherence": (0.0, 1.0),
}


def ident(field: str, value: Any, *, max_len: int = MAX_ID_LEN) -> str:
    """Return a non-empty id without NUL bytes, at most ``max_len`` characters."""
    if not isinstance(value, str):
        raise ValidationError(field, f"is expected to be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters long; at most {max_len} allowed")
    _no_nul(field, value)
    _utf8(field, value)
    return value


def opt_ident(field: str, value: Any, *, max_len: int = MAX_ID_LEN) -> str | None:
    return None if value is None else ident(field, value, max_len=max_len)


def text(field: str, value: Any, *, max_len: int = MAX_LONG_TEXT, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"is expected to be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValidationError(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationError(field, f"is {len(value)} characters long; at most {max_len} allowed")
    _no_nul(field, value)
    _utf8(field, value)
    return value


def opt_text(field: str, value: Any, *, max_len: int = MAX_LONG_TEXT) -> str | None:
    return None if value is None else text(field, value, max_len=max_len)


def _no_nul(field: str, value: str) -> None:
    if "\x00" in value:
        raise ValidationError(field, "contains a NUL byte")


def _utf8(field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "is not valid UTF-8 (lone surrogate)") from None


def choice(field: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValidationError(field, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def number(field: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """Return a finite float within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, f"is expected to be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValidationError(field, f"is expected to be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(field, f"is expected to be a number in [{lo}, {hi}], got {value}")
    return value


def opt_number(field: str, value: Any, lo: float | None = None, hi: float | None = None) -> float | None:
    return None if value is None else number(field, value, lo, hi)


def eisv(field: str, value: Any) -> float:
    lo, hi = EISV_BOUNDS[field]
    return number(field, value, lo, hi)


def integer(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"is expected to be an integer, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(field, f"is expected to be an integer in [{lo}, {hi}], got {value}")
    return value


def opt_integer(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else integer(field, value, lo, hi)


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, f"is expected to be true or false, got {value!r}")
    return value


def aware(field: str, value: Any) -> datetime:
    """Return an aware datetime converted to UTC; a naive one is refused."""
    if not isinstance(value, datetime):
        raise ValidationError(field, f"is expected to be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(field, "must be timezone-aware (naive datetimes are ambiguous)")
    return value.astimezone(timezone.utc)


def opt_aware(field: str, value: Any) -> datetime | None:
    return None if value is None else aware(field, value)


def now() -> datetime:
    # PostgreSQL keeps microseconds; so does our SQLite text format.
    return datetime.now(timezone.utc)


def json_doc(field: str, value: Any, *, kind: type = dict, default: Any = None) -> Any:
    """Return a JSON-safe copy of a dict (or list), accepting a JSON string too.

    Refused: text that is not JSON, a document of the wrong kind, NaN or
    infinities, NUL characters anywhere (PostgreSQL's jsonb refuses them),
    non-string keys, and documents larger than 8 MiB.
    """
    if value is None:
        return kind() if default is None else default
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValidationError(field, f"is not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise ValidationError(field, f"is expected to be a JSON {'object' if kind is dict else 'array'}, got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, f"is not representable as JSON ({exc})") from None
    if "\\u0000" in encoded or "\x00" in encoded:
        raise ValidationError(field, "contains a NUL character")
    try:
        raw = encoded.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "is not valid UTF-8 (lone surrogate)") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ValidationError(field, f"is {len(raw)} bytes of JSON; at most {MAX_JSON_BYTES} allowed")
    return json.loads(encoded)


def tags(field: str, value: Any) -> tuple[str, ...]:
    """Return distinct tags, order kept; each a non-empty id-like string."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError(field, "is expected to be a list of strings")
    out: list[str] = []
    for i, tag in enumerate(value):
        tag = ident(f"{field}[{i}]", tag, max_len=MAX_TAG_LEN)
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ValidationError(field, f"has {len(out)} tags; at most {MAX_TAGS} allowed")
    return tuple(out)


def limit(value: Any, *, hi: int = 10_000) -> int:
    return integer("limit", value, 1, hi)


def canonical_json(value: Any) -> str:
    """One text form for a JSON value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
