"""SQL text built from values: the one literal quoter, ``IN`` lists and the S2 cell-id range condition.

For the places where a value must be written into SQL text instead of bound as a parameter: DuckDB ``LOAD`` /
``ATTACH`` / ``CREATE SECRET`` (which take no parameters) and Lance / LanceDB filter strings (no parameters at
all). Strings are single-quoted with inner quotes doubled, so no value can close its literal; numbers must be
finite; timestamps are written as naive UTC. Column names are never user text: callers pass names they resolved
against a schema.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Iterable

import numpy as np

from aegir.utils import s2geometry

S2_TOKEN_MAX_LEVEL = 17  # the finest stored S2 token (labels and chips carry ``s2_token_l17``)


def quote(text: str) -> str:
    """``text`` as a single-quoted SQL string literal, inner quotes doubled (``o'brien`` → ``'o''brien'``)."""
    return "'" + text.replace("'", "''") + "'"


def literal(value: Any) -> str:
    """``value`` as a SQL literal: str quoted, bool ``TRUE``/``FALSE``, int/float ``repr`` (finite only),
    datetime ``TIMESTAMP 'YYYY-MM-DD HH:MM:SS.ffffff'`` in UTC (a naive datetime is taken as UTC).

    Raises ValueError for a non-finite float, TypeError for any other type."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} has no SQL literal (only finite numbers)")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return f"TIMESTAMP '{value.isoformat(sep=' ', timespec='microseconds')}'"
    raise TypeError(f"{type(value).__name__} {value!r} has no SQL literal")


def in_list(column: str, values: Iterable[Any], negate: bool = False) -> str:
    """``column IN (v1, v2, …)`` (``NOT IN`` when ``negate``) with every value a :func:`literal`;
    no values gives ``FALSE`` (``TRUE`` when negated)."""
    items = [literal(v) for v in values]
    if not items:
        return "TRUE" if negate else "FALSE"
    return f"{column} {'NOT IN' if negate else 'IN'} ({', '.join(items)})"


def s2_descendant_range(token: str, max_level: int = S2_TOKEN_MAX_LEVEL) -> tuple[int, int]:
    """(min, max) S2 cell ids (uint64 as int) of every leaf below the cell ``token`` (any level 0..``max_level``).

    A level-``max_level`` token lies inside the cell exactly when its cell id falls in this range."""
    cell_id = int(s2geometry.token_to_cell_id(token.strip().lower()))
    level = int(s2geometry.cell_level(cell_id))
    if level > max_level:
        raise ValueError(f"S2 token {token!r} is level {level}; the cell must be level {max_level} or coarser")
    lowest_bit = cell_id & -cell_id
    return cell_id - (lowest_bit - 1), cell_id + (lowest_bit - 1)


def s2_cell_condition(token_column: str, token: str, max_level: int = S2_TOKEN_MAX_LEVEL) -> str:
    """DuckDB condition: the S2 token in ``token_column`` (level ``max_level``) lies inside the cell ``token``.

    The stored token is padded to 16 hex digits and read as its uint64 cell id, then compared with
    :func:`s2_descendant_range` (a token is the cell id's hex form without trailing zeros)."""
    low, high = s2_descendant_range(token, max_level)
    return f"CAST('0x' || rpad({token_column}, 16, '0') AS UBIGINT) BETWEEN {literal(low)} AND {literal(high)}"
