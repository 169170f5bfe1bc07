"""Compare read results of two stores: normalise, then test equality.

Records become plain JSON-like values: timestamps in UTC at microsecond
precision, floats rounded to 9 significant digits, dicts with sorted keys,
tuples as lists. Lists whose order a method's contract leaves open are
sorted by their normalised text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from typing import Any

#: Read primitives whose result order the contract leaves open (none today: every list
#: method states its order); their lists are compared as multisets.
UNORDERED: frozenset[str] = frozenset()
#: Reads never shadowed: legacy SQLite rows may hold raw API keys, PostgreSQL only hashes.
NOT_SHADOWED = frozenset({"_get_api_key_hash"})


def normalise(value: Any) -> Any:
    """Return ``value`` in the one form both stores' results are compared in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: normalise(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return repr(value)


def canonical(value: Any, *, unordered: bool = False) -> str:
    """Return the normalised value as one text (lists sorted when ``unordered``)."""
    norm = normalise(value)
    if unordered and isinstance(norm, list):
        norm = sorted(norm, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
    return json.dumps(norm, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def same(operation: str, a: Any, b: Any) -> bool:
    """Return whether two results of ``operation`` agree after normalisation."""
    unordered = operation in UNORDERED
    return canonical(a, unordered=unordered) == canonical(b, unordered=unordered)


def keys_of(value: Any, limit: int = 5) -> list[str]:
    """Return the keys of the records in a result (for log lines: keys only, no payloads)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, tuple) and item and dataclasses.is_dataclass(item[0]):
            item = item[0]
        for name in ("agent_id", "session_id", "id", "event_id", "usage_id", "tool_name"):
            key = getattr(item, name, None)
            if key is not None:
                out.append(str(key))
                break
        if len(out) >= limit:
            break
    return out
