"""LanceDB ``training_data`` table: one row per training sample (a PV prompt, its image chips and its mask).

Writes go through LanceDB (``merge_insert`` keyed on ``uuid``: one commit per call, so readers never see half a
batch); earlier versions are read with ``lance`` (``LanceDataset.checkout_version``) without moving the table.

Indexing decision (measured with pylance 14.0.2 / lancedb 0.40.0): a BTREE scalar index builds on a nested struct
field (``create_index("metadata.s2_token_l13", config=BTree())``) and the planner uses it for
``metadata.s2_token_l13 = '…'``, ``IN (…)`` and ``starts_with(metadata.s2_token_l13, '…')`` (rewritten to an
escaped ``LIKE 'prefix%'``), as ``explain_plan`` shows (``ScalarIndexQuery … @metadata.s2_token_l13_idx(BTree)``).
So the S2 tokens and ``dataset`` stay nested in ``metadata`` only; there are no top-level copies.

pyarrow does not enforce nested nullability or reject unknown struct keys, and Lance panics on a null in a
non-nullable nested field, so :func:`validate_rows` checks both before anything is written.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree

from aegir.store.ducklake import StoreError as _BaseStoreError

DEFAULT_TABLE = "training_data"
# Lance file format of new tables. Measured here (bench/loader.py, 1,920 Jiang chips of 3×256×256 + masks,
# lance.torch.data, 0 workers): format 2.0 streams ~10,000 samples/s, the default 2.1 ~2,400 samples/s, because
# 2.1's encoding of large binary values decodes far slower. Chips are large binaries, so 2.0 it is.
DATA_STORAGE_VERSION = "2.0"
CHIP_ENCODINGS = ("raw", "png", "tiff")

_UTC_US = pa.timestamp("us", tz="UTC")
_SHAPE = pa.list_(pa.int32())

PROVENANCE_TYPE = pa.struct(
    [
        pa.field("backend", pa.string()),
        pa.field("backend_version", pa.string()),
        pa.field("params_json", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("source_detection", pa.string()),
        pa.field("created_at", _UTC_US),
        pa.field("code_version", pa.string()),
    ]
)

METADATA_TYPE = pa.struct(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("s2_token_l10", pa.string(), nullable=False),
        pa.field("s2_token_l13", pa.string(), nullable=False),
        pa.field("s2_token_l17", pa.string(), nullable=False),
        pa.field("h3_12", pa.string(), nullable=False),
        pa.field("centroid_lat", pa.float64(), nullable=False),
        pa.field("centroid_lon", pa.float64(), nullable=False),
        pa.field("acquired_at", _UTC_US),
        pa.field("sensor", pa.string()),
        pa.field("gsd_m", pa.float64()),
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),
        pa.field("vhr_shape", _SHAPE, nullable=False),
        pa.field("vhr_dtype", pa.string(), nullable=False),
        pa.field("vhr_encoding", pa.string(), nullable=False),
        pa.field("msi_shape", _SHAPE),
        pa.field("msi_dtype", pa.string()),
        pa.field("msi_bands", pa.list_(pa.string())),
        pa.field("mask_shape", _SHAPE),
        pa.field("mask_encoding", pa.string()),
        pa.field("mask_source", pa.string()),
        pa.field("pv_fraction", pa.float32()),
        pa.field("provenance", PROVENANCE_TYPE),
    ]
)

TRAINING_DATA_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("uuid", pa.string(), nullable=False),
        pa.field("prompt_geometry", pa.binary(), nullable=False),
        pa.field("vhr_image_chip", pa.binary(), nullable=False),
        pa.field("generated_mask", pa.binary()),
        pa.field("msi_image_chip", pa.binary()),
        pa.field("metadata", METADATA_TYPE, nullable=False),
    ]
)

INDEX_COLUMNS: tuple[str, ...] = (
    "uuid",
    "metadata.dataset",
    "metadata.s2_token_l10",
    "metadata.s2_token_l13",
    "metadata.s2_token_l17",
)

# metadata list columns with a fixed length, and string columns limited to a vocabulary
_LIST_LENGTHS = {"transform": 6, "vhr_shape": 3, "msi_shape": 3, "mask_shape": 2}
_ENUMS = {"vhr_encoding": CHIP_ENCODINGS, "mask_encoding": CHIP_ENCODINGS}


class StoreError(_BaseStoreError):
    """The training table cannot be opened, read or written as asked."""


@dataclass(frozen=True)
class UpsertResult:
    """Outcome of one :func:`upsert_training_rows` commit."""

    inserted: int
    updated: int
    version: int


# ---------------------------------------------------------------------------------------------------------------
# locations and opening


def resolve_table_location(
    uri: str | None, lancedb_root: str, default_table: str = DEFAULT_TABLE
) -> tuple[str, str]:
    """Split a table location into (database root, table name).

    ``None`` → ``(lancedb_root, default_table)``; ``a/b/training_data`` or ``a/b/training_data.lance`` or
    ``s3://bucket/db/training_data`` → (parent, name without ``.lance``); a bare name is a table under
    ``lancedb_root``.
    """
    if uri is None:
        return lancedb_root, default_table
    scheme, sep, rest = uri.strip().partition("://")
    body = (rest if sep else scheme).rstrip("/\\")
    if not body:
        raise StoreError(f"empty LanceDB table location {uri!r}")
    cut = max(body.rfind("/"), body.rfind(os.sep))
    parent, name = (body[:cut], body[cut + 1 :]) if cut >= 0 else ("", body)
    name = name.removesuffix(".lance")
    if not name:
        raise StoreError(f"LanceDB table location {uri!r} names no table")
    if sep:
        if not parent:
            raise StoreError(f"LanceDB table location {uri!r} has no database path before the table name")
        return f"{scheme}://{parent}", name
    if cut < 0:
        return lancedb_root, name
    return parent or "/", name


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path.removeprefix("file://"))


def open_training_table(uri: str | None, lancedb_root: str, create: bool = True) -> lancedb.table.Table:
    """Open the training table at ``uri`` (see :func:`resolve_table_location`), creating it when ``create``."""
    root, name = resolve_table_location(uri, lancedb_root)
    location = f"{root.rstrip('/')}/{name}.lance"
    if not create and _is_local(root) and not (_local_path(root) / f"{name}.lance").exists():
        raise StoreError(f"no LanceDB training table at {location} (build it with `aegir dataset build`)")
    db = lancedb.connect(root)
    try:
        table = db.open_table(name)
    except (ValueError, FileNotFoundError) as exc:
        if not create:
            raise StoreError(f"no LanceDB training table at {location}: {exc}") from exc
        table = db.create_table(
            name, schema=TRAINING_DATA_SCHEMA, exist_ok=True,
            storage_options={"new_table_data_storage_version": DATA_STORAGE_VERSION},
        )
    problems = schema_problems(table.schema)
    if problems:
        raise StoreError(f"the table at {location} is not a training_data table: " + "; ".join(problems))
    return table


def _leaf_types(schema_or_type: pa.Schema | pa.StructType, prefix: str = "") -> dict[str, pa.DataType]:
    out: dict[str, pa.DataType] = {}
    for field in schema_or_type:
        path = f"{prefix}{field.name}"
        out[path] = field.type
        if pa.types.is_struct(field.type):
            out.update(_leaf_types(field.type, path + "."))
    return out


def schema_problems(schema: pa.Schema) -> list[str]:
    """Columns of :data:`TRAINING_DATA_SCHEMA` that ``schema`` lacks or types differently (empty when fine)."""
    have = _leaf_types(schema)
    problems = []
    for path, dtype in _leaf_types(TRAINING_DATA_SCHEMA).items():
        if path not in have:
            problems.append(f"missing column {path}")
        elif not pa.types.is_struct(dtype) and have[path] != dtype:
            problems.append(f"column {path} is {have[path]}, expected {dtype}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# validation and upsert


_CONVERT_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def _converts(value: Any, dtype: pa.DataType) -> bool:
    try:
        pa.array([value], type=dtype)
    except _CONVERT_ERRORS:
        return False
    return True


def _bad_value_path(value: Any, dtype: pa.DataType, path: str) -> tuple[str, str]:
    """The deepest field path under ``path`` whose value does not convert to its type, and why."""
    if pa.types.is_struct(dtype) and isinstance(value, Mapping):
        for child in dtype:
            if not _converts(value.get(child.name), child.type):
                return _bad_value_path(value.get(child.name), child.type, f"{path}.{child.name}")
    return path, f"{type(value).__name__} {str(value)[:60]!r} is not {dtype}"


def _check_keys(value: Any, dtype: pa.StructType, path: str, row: int) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise StoreError(f"row {row}: column {path} must be a dict, got {type(value).__name__}")
    unknown = set(value) - {f.name for f in dtype}
    if unknown:
        raise StoreError(f"row {row}: unknown field(s) {sorted(unknown)} in column {path}")
    for child in dtype:
        if pa.types.is_struct(child.type):
            _check_keys(value.get(child.name), child.type, f"{path}.{child.name}", row)


def _table_from_dicts(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    schema = TRAINING_DATA_SCHEMA
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise StoreError(f"row {i}: expected a dict, got {type(row).__name__}")
        unknown = set(row) - set(schema.names)
        if unknown:
            raise StoreError(f"row {i}: unknown column(s) {sorted(unknown)}")
        for field in schema:
            if pa.types.is_struct(field.type):
                _check_keys(row.get(field.name), field.type, field.name, i)
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            arrays.append(pa.array(values, type=field.type))
        except _CONVERT_ERRORS as exc:
            i = next((i for i, v in enumerate(values) if not _converts(v, field.type)), None)
            if i is None:
                raise StoreError(f"column {field.name}: {exc}") from exc
            path, why = _bad_value_path(values[i], field.type, field.name)
            raise StoreError(f"row {i}: column {path}: {why}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _first(mask: pa.Array) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false), or None."""
    hits = pc.indices_nonzero(pc.fill_null(mask, False))
    return hits[0].as_py() if len(hits) else None


def _check_nulls(arr: pa.Array, field: pa.Field, path: str, parent_valid: pa.Array) -> None:
    if not field.nullable:
        bad = _first(pc.and_(pc.is_null(arr), parent_valid))
        if bad is not None:
            raise StoreError(f"row {bad}: column {path} is null but required")
    if pa.types.is_struct(field.type):
        valid = pc.and_(parent_valid, pc.is_valid(arr))
        for i, child in enumerate(field.type):
            _check_nulls(pc.struct_field(arr, [i]), child, f"{path}.{child.name}", valid)


def _check_values(table: pa.Table) -> None:
    uuids = table.column("uuid").combine_chunks()
    empty = _first(pc.equal(pc.utf8_length(uuids), 0))
    if empty is not None:
        raise StoreError(f"row {empty}: column uuid is empty")
    meta = table.column("metadata").combine_chunks()
    for name, length in _LIST_LENGTHS.items():
        lengths = pc.list_value_length(pc.struct_field(meta, name))
        bad = _first(pc.not_equal(lengths, length))
        if bad is not None:
            raise StoreError(f"row {bad}: column metadata.{name} must hold {length} values")
    for name, allowed in _ENUMS.items():
        values = pc.struct_field(meta, name)
        bad = _first(pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed)))))
        if bad is not None:
            raise StoreError(f"row {bad}: column metadata.{name} must be one of {list(allowed)}")
    counts = pc.value_counts(uuids)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dupes):
        first = dupes[0].as_py()
        where = [i for i, u in enumerate(uuids.to_pylist()) if u == first]
        raise StoreError(f"duplicate uuid {first!r} in one batch (rows {where}); {len(dupes)} uuid(s) repeat")


def validate_rows(rows: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Cast ``rows`` to :data:`TRAINING_DATA_SCHEMA` and check them; raise :class:`StoreError` naming column and row."""
    if isinstance(rows, pa.Table):
        missing = [f.name for f in TRAINING_DATA_SCHEMA if f.name not in rows.column_names and not f.nullable]
        extra = [n for n in rows.column_names if n not in TRAINING_DATA_SCHEMA.names]
        if missing or extra:
            raise StoreError(f"batch columns do not match the schema: missing {missing}, unknown {extra}")
        if rows.schema.equals(TRAINING_DATA_SCHEMA):
            table = rows
        else:
            table = _table_from_dicts(rows.to_pylist())
    else:
        table = _table_from_dicts(list(rows))
    table = table.combine_chunks()
    all_valid = pa.array(np.ones(table.num_rows, dtype=bool))
    for field in TRAINING_DATA_SCHEMA:
        _check_nulls(table.column(field.name).combine_chunks(), field, field.name, all_valid)
    _check_values(table)
    return table


def upsert_training_rows(table: lancedb.table.Table, rows: pa.Table | Sequence[Mapping[str, Any]]) -> UpsertResult:
    """Insert or replace rows by ``uuid`` in one commit; nothing is written when validation fails."""
    batch = validate_rows(rows)
    if batch.num_rows == 0:
        return UpsertResult(inserted=0, updated=0, version=table.version)
    result = (
        table.merge_insert("uuid").when_matched_update_all().when_not_matched_insert_all().execute(batch)
    )
    return UpsertResult(
        inserted=int(result.num_inserted_rows), updated=int(result.num_updated_rows), version=int(result.version)
    )


# ---------------------------------------------------------------------------------------------------------------
# indexes, versions, summary


def ensure_scalar_indexes(table: lancedb.table.Table, columns: Iterable[str] = INDEX_COLUMNS) -> list[str]:
    """Build missing or stale BTREE indexes on ``columns``; return the columns (re)indexed (none when empty)."""
    if table.count_rows() == 0:
        return []
    existing = {tuple(idx.columns): idx for idx in table.list_indices()}
    built = []
    for column in columns:
        idx = existing.get((column,))
        if idx is not None and idx.num_unindexed_rows == 0:
            continue
        table.create_index(column, config=BTree(), replace=True)
        built.append(column)
    return built


def table_versions(table: lancedb.table.Table) -> list[dict[str, Any]]:
    """Every version of the table: ``version``, ``timestamp`` and ``rows``, oldest first."""
    out = []
    for v in table.list_versions():
        rows = (v.get("metadata") or {}).get("total_rows")
        out.append({"version": int(v["version"]), "timestamp": v["timestamp"], "rows": int(rows) if rows else 0})
    return sorted(out, key=lambda v: v["version"])


def read_version(table: lancedb.table.Table, version: int) -> pa.Table:
    """All rows as of ``version``; the table object stays at the version it was at."""
    known = [v["version"] for v in table_versions(table)]
    if version not in known:
        raise StoreError(f"version {version} of {table.uri} does not exist (versions: {known})")
    return table.to_lance().checkout_version(version).to_table()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table_summary(table: lancedb.table.Table) -> dict[str, Any]:
    """Rows, version, version count, bytes on disk (None when remote), S2 l13 cells, datasets, masks."""
    rows = table.count_rows()
    cols = table.search().select(["metadata.dataset", "metadata.s2_token_l13"]).limit(None).to_arrow()
    with_mask = table.count_rows("generated_mask IS NOT NULL") if rows else 0
    size = _dir_size(_local_path(table.uri)) if _is_local(table.uri) else None
    return {
        "rows": rows,
        "version": table.version,
        "versions": len(table.list_versions()),
        "size_bytes": size,
        "s2_l13_cells": len(set(cols.column(1).to_pylist())),
        "datasets": dict(sorted(Counter(cols.column(0).to_pylist()).items())),
        "rows_with_mask": with_mask,
        "rows_without_mask": rows - with_mask,
    }


def class_balance(table: lancedb.table.Table) -> dict[str, Any]:
    """PV share of the masked rows: rows with PV, rows with an empty mask, mean PV pixel fraction."""
    fractions = (
        table.search().where("metadata.pv_fraction IS NOT NULL").select(["metadata.pv_fraction"]).limit(None).to_arrow()
    ).column(0).to_numpy(zero_copy_only=False)
    return {
        "rows_with_pv": int((fractions > 0).sum()),
        "rows_with_empty_mask": int((fractions == 0).sum()),
        "mean_pv_fraction": float(fractions.mean()) if fractions.size else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# filtering


def _resolve_field(name: str, schema: pa.Schema) -> tuple[str, pa.DataType]:
    """Schema path and type for ``name`` (a column, a dotted struct path, or a bare ``metadata`` field)."""
    leaves = _leaf_types(schema)
    if name in leaves:
        return name, leaves[name]
    if f"metadata.{name}" in leaves:
        return f"metadata.{name}", leaves[f"metadata.{name}"]
    raise StoreError(f"unknown field {name!r}: not a column of the training table")


def _sql_literal(value: Any, dtype: pa.DataType, field: str) -> str:
    """``value`` as a SQL literal of ``dtype``; strings are single-quoted with quotes doubled."""
    if isinstance(value, np.generic):
        value = value.item()
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        if not isinstance(value, str):
            raise StoreError(f"field {field} is a string; got {type(value).__name__} {value!r}")
        return "'" + value.replace("'", "''") + "'"
    if pa.types.is_boolean(dtype):
        if not isinstance(value, bool):
            raise StoreError(f"field {field} is a boolean; got {value!r}")
        return "TRUE" if value else "FALSE"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        ok = isinstance(value, int) or (pa.types.is_floating(dtype) and isinstance(value, float))
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise StoreError(f"field {field} is {dtype}; got {value!r}")
        return repr(value)
    if pa.types.is_timestamp(dtype):
        if not isinstance(value, dt.datetime):
            raise StoreError(f"field {field} is a timestamp; got {value!r}")
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return f"TIMESTAMP '{value.isoformat(sep=' ', timespec='microseconds')}'"
    raise StoreError(f"field {field} ({dtype}) cannot be filtered on")


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
            parts.append(f"starts_with({path}, {_sql_literal(value[1], dtype, path)})")
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = [_sql_literal(v, dtype, path) for v in value]
            parts.append(f"{path} IN ({', '.join(items)})" if items else "FALSE")
        else:
            parts.append(f"{path} = {_sql_literal(value, dtype, path)}")
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


# ---------------------------------------------------------------------------------------------------------------
# raw chip bytes


def encode_raw_array(arr: np.ndarray) -> bytes:
    """C-order raw bytes of ``arr`` (pair with its shape and dtype in the metadata)."""
    return np.ascontiguousarray(arr).tobytes(order="C")


def decode_raw_array(buf: bytes, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
    """A writable array of ``shape``/``dtype`` from C-order raw bytes; a size mismatch raises ValueError."""
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(f"{len(buf)} bytes do not hold a {tuple(shape)} {dtype} array ({expected} bytes)")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(shape)).copy()
