"""Value conversion shared by the backends and the migrator.

Writers use one canonical form; readers accept everything long-lived
legacy files hold. The ``read_*`` functions never raise: a value they
cannot make sense of becomes a stated default, so one dirty row cannot
break a read.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone, tzinfo
from typing import Any

UTC = timezone.utc
#: What an unreadable timestamp reads as.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_EPOCH_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_ZONE_WORD_RE = re.compile(r"\s*(UTC|GMT)$", re.IGNORECASE)


def format_timestamp(dt: datetime) -> str:
    """Return ``dt`` as ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00`` (UTC, always microseconds).

    Text in this form sorts in time order. A naive datetime is refused.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"cannot format a naive datetime ({dt.isoformat()}); attach a time zone")
    d = dt.astimezone(UTC)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"
            f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}.{d.microsecond:06d}+00:00")


def parse_timestamp(value: Any, *, naive_tz: tzinfo = UTC) -> datetime | None:
    """Return an aware UTC datetime from any legacy timestamp form, None for None.

    Accepted: ISO 8601 with ``T`` or a space, with or without fraction,
    ``Z``/``UTC`` or a numeric offset (naive means ``naive_tz``), and epoch
    seconds as a number or as text. Raises ValueError for anything else,
    including empty text.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_epoch(value)
    elif isinstance(value, (str, bytes)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        if not text:
            raise ValueError("timestamp is empty")
        if _EPOCH_RE.fullmatch(text):
            return _from_epoch(float(text))
        try:
            dt = datetime.fromisoformat(_ZONE_WORD_RE.sub("+00:00", text))
        except ValueError:
            raise ValueError(f"timestamp {text[:64]!r} is not ISO 8601 or epoch seconds") from None
    else:
        raise ValueError(f"timestamp is expected to be text or a number, got {type(value).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        dt = dt.replace(tzinfo=naive_tz)
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"timestamp {dt.isoformat()} is out of range in UTC") from None


def _from_epoch(seconds: float) -> datetime:
    if not math.isfinite(seconds):
        raise ValueError(f"epoch seconds must be finite, got {seconds}")
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"epoch seconds {seconds} are out of range") from None


def read_timestamp(value: Any, default: datetime = EPOCH) -> datetime:
    """Return ``parse_timestamp(value)``, or ``default`` when NULL or unreadable."""
    try:
        dt = parse_timestamp(value)
    except ValueError:
        return default
    return default if dt is None else dt


def read_opt_timestamp(value: Any) -> datetime | None:
    """Like :func:`read_timestamp` for optional columns: NULL or blank reads as None."""
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    return read_timestamp(value)


def normalise_timestamp(value: Any) -> str:
    """Return the canonical text of a stored timestamp, as it reads (for ordering)."""
    return format_timestamp(read_timestamp(value))


def dump_json(value: Any) -> str:
    """Return JSON text for storage: UTF-8 kept (so words stay searchable), no NaN."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def read_json(text: Any, default: Any) -> Any:
    """Return the JSON value in ``text``; ``default`` when NULL, invalid or JSON null.

    NaN and infinities in legacy text read as None, so what comes back is
    valid JSON again.
    """
    if text is None:
        return default
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        return default
    try:
        value = json.loads(text, parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        return default
    return default if value is None else value


def read_json_object(text: Any) -> dict[str, Any]:
    """Return the JSON object in ``text``, or ``{}`` for anything else."""
    value = read_json(text, None)
    return value if isinstance(value, dict) else {}


def read_json_list(text: Any) -> list[Any]:
    """Return the JSON array in ``text``, or ``[]`` for anything else."""
    value = read_json(text, None)
    return value if isinstance(value, list) else []


def read_str_list(text: Any) -> list[str]:
    """Return the strings of a JSON array (tags, file names); other items are dropped."""
    return [x for x in read_json_list(text) if isinstance(x, str)]


def read_float(value: Any) -> float | None:
    """Return a finite float, or None for NULL, NaN, infinities and non-numbers."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_int(value: Any) -> int | None:
    """Return an integer (floats truncated), or None when there is none."""
    f = read_float(value)
    return None if f is None else int(f)


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def read_bool(value: Any, default: bool | None = None) -> bool | None:
    """Return a boolean from a number (non-zero is true) or words like "true"/"no"; else ``default``."""
    if isinstance(value, (bytes, str)):
        word = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    f = read_float(value)
    return default if f is None else f != 0


#: Namespace of the ids given to legacy rows that have none.
LEGACY_NAMESPACE = uuid.UUID("5b0f6f3e-1c0a-4e55-9a43-6f1d2b7c9e10")


def legacy_uuid(table: str, rowid: Any) -> str:
    """Return a stable UUID for a legacy row lacking one (same row, same id, everywhere)."""
    return str(uuid.uuid5(LEGACY_NAMESPACE, f"{table}:{rowid}"))
