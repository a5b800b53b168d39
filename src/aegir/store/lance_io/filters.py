"""Filters on ``training_data``: ``{field: value}`` → a Lance SQL ``WHERE`` whose literals come from
:mod:`aegir.store.sql`, after each value is checked against the field's Arrow type (so user text is never SQL)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Mapping

import lancedb
import numpy as np
import pyarrow as pa

from aegir.store import sql
from aegir.store.lance_io.schema import TRAINING_DATA_SCHEMA, StoreError, leaf_types


def _resolve_field(name: str, schema: pa.Schema) -> tuple[str, pa.DataType]:
    """Schema path and type for ``name`` (a column, a dotted struct path, or a bare ``metadata`` field)."""
    leaves = leaf_types(schema)
    if name in leaves:
        return name, leaves[name]
    if f"metadata.{name}" in leaves:
        return f"metadata.{name}", leaves[f"metadata.{name}"]
    raise StoreError(f"unknown field {name!r}: not a column of the training table")


def _checked(value: Any, dtype: pa.DataType, field: str) -> Any:
    """``value`` (numpy scalars as Python ones) when it fits the filterable ``dtype``; StoreError otherwise."""
    if isinstance(value, np.generic):
        value = value.item()
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        if not isinstance(value, str):
            raise StoreError(f"field {field} is a string; got {type(value).__name__} {value!r}")
    elif pa.types.is_boolean(dtype):
        if not isinstance(value, bool):
            raise StoreError(f"field {field} is a boolean; got {value!r}")
    elif pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        ok = isinstance(value, int) or (pa.types.is_floating(dtype) and isinstance(value, float))
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise StoreError(f"field {field} is {dtype}; got {value!r}")
    elif pa.types.is_timestamp(dtype):
        if not isinstance(value, dt.datetime):
            raise StoreError(f"field {field} is a timestamp; got {value!r}")
    else:
        raise StoreError(f"field {field} ({dtype}) cannot be filtered on")
    return value


def build_where_clause(where: Mapping[str, Any], schema: pa.Schema = TRAINING_DATA_SCHEMA) -> str | None:
    """SQL filter from ``{field: value}``: value, ``None`` (IS NULL), list/tuple (IN), ``('prefix', s)``."""
    parts = []
    for name, value in where.items():
        if not isinstance(name, str):
            raise StoreError(f"field names must be strings, got {name!r}")
        path, dtype = _resolve_field(name, schema)
        if value is None:
            parts.append(f"{path} IS NULL")
        elif isinstance(value, tuple) and len(value) == 2 and value[0] == "prefix":
            if not pa.types.is_string(dtype):
                raise StoreError(f"prefix match needs a string field; {path} is {dtype}")
            parts.append(f"starts_with({path}, {sql.literal(_checked(value[1], dtype, path))})")
        elif isinstance(value, (list, tuple, set, frozenset)):
            parts.append(sql.in_list(path, [_checked(v, dtype, path) for v in value]))
        else:
            parts.append(f"{path} = {sql.literal(_checked(value, dtype, path))}")
    return " AND ".join(f"({p})" for p in parts) or None


def filter_rows(
    table: lancedb.table.Table,
    where: Mapping[str, Any],
    columns: list[str] | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Rows matching every ``where`` condition (see :func:`build_where_clause`), optionally projected and limited."""
    schema = table.schema
    clause = build_where_clause(where, schema)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise StoreError(f"limit must be a positive integer or None, got {limit!r}")
    query = table.search()
    if clause:
        query = query.where(clause)
    if columns is not None:
        query = query.select([_resolve_field(c, schema)[0] for c in columns])
    return query.limit(limit).to_arrow()
