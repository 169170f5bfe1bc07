"""PostgreSQL's COPY text format: values to fields, rows to lines, and COPY from such text.

The backfill's workers turn whole columns into COPY text at once (C loops
where the column allows it); :func:`copy_text` sends the result.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, AsyncIterator, Sequence

import asyncpg

_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_lines(*columns: Sequence[str]) -> bytes:
    """Return rows given as columns of COPY text fields as COPY's text format."""
    if not columns or not columns[0]:
        return b""
    return ("\n".join(map("\t".join, zip(*columns))) + "\n").encode("utf-8")


def copy_column(values: Sequence[Any]) -> Sequence[str]:
    """Return one column's values as COPY text fields, a whole column at a time (C loops, not Python)."""
    kinds = set(map(type, values))
    if _NONE in kinds and len(kinds) == 2:  # NULLs among values of one type
        present = [v for v in values if v is not None]
        done = iter(copy_column(present))
        return [next(done) if v is not None else "\\N" for v in values]
    if kinds == {str}:
        if _COPY_SPECIAL.search("\x00".join(values)) is None:  # the whole column tested at once
            return values
        return [v if _COPY_SPECIAL.search(v) is None else v.translate(_COPY_ESCAPES) for v in values]
    if kinds == {int}:
        return list(map(str, values))
    if kinds == {datetime}:
        return list(map(datetime.isoformat, values))
    if kinds == {float} and all(map(math.isfinite, values)):
        return list(map(repr, values))
    if kinds == {bool}:
        return ["t" if v else "f" for v in values]
    if kinds == {list} and _plain_text_lists(values):
        # Words, and tags without quotes or backslashes: every element quoted, so 'NULL' stays text.
        return copy_column(['{"' + '","'.join(v) + '"}' if v else "{}" for v in values])
    return [copy_field(v) for v in values]


def _plain_text_lists(values: Sequence[list[Any]]) -> bool:
    try:
        return _ARRAY_SPECIAL.search("\x00".join(map("\x00".join, values))) is None
    except TypeError:  # an element that is not text
        return False


_ARRAY_SPECIAL = re.compile(r'["\\]')
_NONE = type(None)


def copy_field(v: Any) -> str:
    """Return one value as a COPY text field."""
    t = type(v)
    if t is str:
        return v if _COPY_SPECIAL.search(v) is None else v.translate(_COPY_ESCAPES)
    if v is None:
        return "\\N"
    if t is int:
        return str(v)
    if t is float:
        return repr(v) if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
    if t is bool:
        return "t" if v else "f"
    if t is datetime:
        return v.isoformat()
    if t is list or t is tuple:
        return copy_field("{" + ",".join("NULL" if x is None else '"' + x.replace("\\", "\\\\").replace('"', '\\"')
                                          + '"' for x in v) + "}")
    if t is bytes:
        return "\\\\x" + v.hex()
    raise TypeError(f"no COPY text form for a {t.__name__}")


async def copy_text(conn: asyncpg.Connection, table: str, columns: Sequence[str], payload: bytes) -> None:
    """COPY rows given as COPY text into ``table`` (schema-qualified, or a temporary table's name)."""
    schema, _, name = table.rpartition(".")

    async def chunks() -> AsyncIterator[bytes]:
        yield payload
    await conn.copy_to_table(name, schema_name=schema or None, columns=list(columns), source=chunks(), format="text")
