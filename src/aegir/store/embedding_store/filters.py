"""Validated search filters of the embedding tables.

Filters from users never reach SQL as raw strings: :func:`parse_where` accepts only ``key=value`` on the fields of
:data:`FILTER_FIELDS`, values must match :data:`SAFE_VALUE` (letters, digits, ``_ . : -``), dates are parsed to
``datetime`` first, and literals are written by :mod:`aegir.store.sql` (through
:func:`aegir.store.lance_io.build_where_clause` for the equality filters).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from aegir.store import sql
from aegir.store.lance_io import StoreError, build_where_clause

# what `--where key=value` accepts: equality on these columns, plus an acquisition date range
FILTER_FIELDS: tuple[str, ...] = ("uuid", "dataset", "sample_id", "s2_token_l10", "s2_token_l13", "s2_token_l17")
DATE_FIELDS: dict[str, str] = {"acquired_from": ">=", "acquired_to": "<="}
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def safe_value(field: str, value: Any) -> str:
    """``value`` when it is a string of :data:`SAFE_VALUE` characters; StoreError otherwise."""
    if not isinstance(value, str) or not SAFE_VALUE.match(value):
        raise StoreError(f"invalid value {value!r} for {field}: filter values may hold only letters, digits and "
                         f"_ . : - (filters are key=value pairs, never SQL)")
    return value


def _parse_date(field: str, value: Any) -> dt.datetime:
    """A naive UTC datetime from a datetime, date or ISO text; ``acquired_to`` of a bare date covers that day."""
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):
        parsed = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and SAFE_VALUE.match(value):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is None:
            raise StoreError(f"invalid date {value!r} for {field}: use YYYY-MM-DD or an ISO timestamp")
    else:
        raise StoreError(f"invalid date {value!r} for {field}: use YYYY-MM-DD or an ISO timestamp")
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if field == "acquired_to" and isinstance(value, str) and len(value) == 10:
        parsed = parsed + dt.timedelta(days=1) - dt.timedelta(microseconds=1)  # a whole end day
    return parsed


def validate_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``{field: value | [values]}`` filter; raise :class:`StoreError` on unknown fields or unsafe values."""
    out: dict[str, Any] = {}
    for key, value in filters.items():
        if key in DATE_FIELDS:
            out[key] = _parse_date(key, value)
        elif key in FILTER_FIELDS:
            if isinstance(value, (list, tuple, set, frozenset)):
                out[key] = [safe_value(key, v) for v in value]
            else:
                out[key] = safe_value(key, value)
        else:
            raise StoreError(f"unknown filter field {key!r}; allowed: {list(FILTER_FIELDS) + list(DATE_FIELDS)}")
    return out


def parse_where(items: Iterable[str] | None) -> dict[str, Any]:
    """``["dataset=jiang_pv01", "s2_token_l13=35e6b"]`` → validated filters; a key given twice means IN."""
    merged: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise StoreError(f"invalid filter {item!r}: expected key=value")
        if key not in FILTER_FIELDS and key not in DATE_FIELDS:
            raise StoreError(f"unknown filter field {key!r} in {item!r}; allowed: "
                             f"{list(FILTER_FIELDS) + list(DATE_FIELDS)}")
        merged.setdefault(key, []).append(value.strip())
    filters: dict[str, Any] = {}
    for key, values in merged.items():
        if key in DATE_FIELDS and len(values) > 1:
            raise StoreError(f"{key} given more than once")
        filters[key] = values[0] if len(values) == 1 else values
    return validate_filters(filters)


def uuid_exclusion(exclude_uuids: Sequence[str]) -> str:
    """``(uuid NOT IN (…))`` of validated uuids (each must pass :func:`safe_value`)."""
    return f"({sql.in_list('uuid', [safe_value('uuid', u) for u in exclude_uuids], negate=True)})"


def filter_clause(filters: Mapping[str, Any], model: str | None, schema: pa.Schema,
                  exclude_uuids: Sequence[str] = ()) -> str | None:
    """The SQL filter of validated ``filters`` + ``model``; every literal is written by :mod:`aegir.store.sql`."""
    safe = validate_filters(filters)
    equal = {k: v for k, v in safe.items() if k not in DATE_FIELDS}
    if model is not None:
        equal["model"] = model
    parts = [build_where_clause(equal, schema)] if equal else []
    for key, op in DATE_FIELDS.items():
        if key in safe:  # a datetime object, formatted by sql.literal: no user text reaches the SQL
            parts.append(f"(acquired_at {op} {sql.literal(safe[key])})")
    if exclude_uuids:
        parts.append(uuid_exclusion(exclude_uuids))
    parts = [p for p in parts if p]
    return " AND ".join(parts) or None
