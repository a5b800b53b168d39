"""Row validation before any write to ``training_data``.

pyarrow does not enforce nested nullability or reject unknown struct keys, and Lance panics on a null in a
non-nullable nested field, so :func:`validate_rows` checks both, plus fixed list lengths, encoding vocabularies
and unique uuids, and raises :class:`StoreError` naming the row and the column.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aegir.store.lance_io.schema import CHIP_ENCODINGS, TRAINING_DATA_SCHEMA, StoreError

# metadata list columns with a fixed length, and string columns limited to a vocabulary
_LIST_LENGTHS = {"transform": 6, "vhr_shape": 3, "msi_shape": 3, "mask_shape": 2}
_ENUMS = {"vhr_encoding": CHIP_ENCODINGS, "mask_encoding": CHIP_ENCODINGS}
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


def _table_from_dicts(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
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


def _fill_null_structs(table: pa.Table) -> pa.Table:
    """A null top-level ``lineage`` becomes a struct of nulls: Lance file format 2.0 stores no struct validity."""
    if "lineage" not in table.column_names or table.column("lineage").null_count == 0:
        return table
    column = table.column("lineage").combine_chunks()
    filled = pa.StructArray.from_arrays([column.field(i) for i in range(column.type.num_fields)],
                                        fields=list(column.type))
    return table.set_column(table.column_names.index("lineage"), table.schema.field("lineage"), filled)


def validate_rows(rows: pa.Table | Sequence[Mapping[str, Any]], schema: pa.Schema = TRAINING_DATA_SCHEMA
                  ) -> pa.Table:
    """Cast ``rows`` to ``schema`` (a training schema, default :data:`TRAINING_DATA_SCHEMA`) and check them;
    raise :class:`StoreError` naming column and row."""
    if isinstance(rows, pa.Table):
        missing = [f.name for f in schema if f.name not in rows.column_names and not f.nullable]
        extra = [n for n in rows.column_names if n not in schema.names]
        if missing or extra:
            raise StoreError(f"batch columns do not match the schema: missing {missing}, unknown {extra}")
        table = rows if rows.schema.equals(schema) else _table_from_dicts(rows.to_pylist(), schema)
    else:
        table = _table_from_dicts(list(rows), schema)
    table = _fill_null_structs(table.combine_chunks())
    all_valid = pa.array(np.ones(table.num_rows, dtype=bool))
    for field in schema:
        _check_nulls(table.column(field.name).combine_chunks(), field, field.name, all_valid)
    _check_values(table)
    return table
