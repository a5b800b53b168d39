"""LanceDB ``chip_embeddings`` table: one vector per (chip uuid, model), its ANN index, and filtered search.

Why a separate table and not a ``vector`` column on ``training_data``: the training schema is checked column by
column (:func:`aegir.store.lance_io.schema_problems`) and read by the DataModule; a vector column would tie it to
one model and one dimension, and re-embedding with a new checkpoint would rewrite the chip rows (large binaries)
for every version. Here each model's vectors are rows keyed by ``(uuid, model)`` — several models side by side,
upserted with ``merge_insert`` (idempotent), joined back to ``training_data`` by ``uuid``. The filter fields
(dataset, S2 tokens, acquisition time, sample id) are copied so that pre-filtered vector search needs no join.

Filters from users never reach SQL as raw strings: :func:`parse_where` accepts only ``key=value`` on the fields of
:data:`FILTER_FIELDS`, values must match :data:`SAFE_VALUE` (letters, digits, ``_ . : -``), dates are parsed to
``datetime`` first, and literals are quoted by :func:`aegir.store.lance_io.build_where_clause`.

Index choice (see ``bench/vector_search.py``): below :data:`MIN_INDEX_ROWS` rows no ANN index is built and search
is exact (a flat scan of a few hundred vectors is faster than any index, and PQ cannot train its 256-entry
codebooks); from there an ``IVF_PQ`` index (cosine, ≈√N partitions, D/8 sub-vectors) searched with
``nprobes`` and an exact ``refine_factor`` re-rank.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree, HnswSq, IvfPq

from aegir.store.lance_io import StoreError, build_where_clause, resolve_table_location

DEFAULT_EMBEDDINGS_TABLE = "chip_embeddings"
MIN_INDEX_ROWS = 256
DEFAULT_NPROBES = 20
DEFAULT_REFINE = 50  # bench/vector_search.py: recall@10 0.964 at 100k rows (0.696 with 10)

_UTC_US = pa.timestamp("us", tz="UTC")

# metadata fields of training_data copied beside each vector (the pre-filters of a search)
FILTER_COPIES: tuple[str, ...] = ("dataset", "sample_id", "s2_token_l10", "s2_token_l13", "s2_token_l17",
                                  "acquired_at")
# what `--where key=value` accepts: equality on these columns, plus an acquisition date range
FILTER_FIELDS: tuple[str, ...] = ("uuid", "dataset", "sample_id", "s2_token_l10", "s2_token_l13", "s2_token_l17")
DATE_FIELDS: dict[str, str] = {"acquired_from": ">=", "acquired_to": "<="}
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
SCALAR_INDEX_COLUMNS = ("uuid", "model", "dataset", "s2_token_l13")


def embeddings_schema(dim: int) -> pa.Schema:
    """The ``chip_embeddings`` schema for ``dim``-dimensional vectors."""
    if not isinstance(dim, int) or dim < 1:
        raise StoreError(f"embedding dimension must be a positive integer, got {dim!r}")
    return pa.schema([
        pa.field("uuid", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("model_checkpoint", pa.string()),
        pa.field("model_data_version", pa.int64()),
        pa.field("source_table", pa.string()),
        pa.field("source_version", pa.int64()),
        pa.field("embedded_at", _UTC_US),
        pa.field("dataset", pa.string()),
        pa.field("sample_id", pa.string()),
        pa.field("s2_token_l10", pa.string()),
        pa.field("s2_token_l13", pa.string()),
        pa.field("s2_token_l17", pa.string()),
        pa.field("acquired_at", _UTC_US),
    ])


def vector_dim(schema: pa.Schema) -> int:
    """The fixed vector length of an embeddings table."""
    return int(schema.field("vector").type.list_size)


# ---------------------------------------------------------------------------------------------------------------
# opening and writing


def embeddings_root(training_uri: str | None, lancedb_root: str) -> str:
    """The LanceDB database that holds the training table at ``training_uri`` (the embeddings live beside it)."""
    return resolve_table_location(training_uri, lancedb_root)[0]


def _open_vector_table(root: str, name: str, schema_for: Callable[[int], pa.Schema], kind: str, make_it: str,
                       dim: int | None) -> lancedb.table.Table:
    """Open ``root/name`` of ``schema_for``'s shape; create it for ``dim``-vectors when missing and ``dim`` is given
    (else StoreError saying to run ``make_it``); a table of another shape or vector size is a StoreError."""
    db = lancedb.connect(root)
    try:
        table = db.open_table(name)
    except (ValueError, FileNotFoundError) as exc:
        if dim is None:
            raise StoreError(f"no {kind} table {name!r} under {root} (run `{make_it}` first)") from exc
        return db.create_table(name, schema=schema_for(dim), exist_ok=True)
    missing = [f.name for f in schema_for(1) if f.name not in table.schema.names]
    if missing or not pa.types.is_fixed_size_list(table.schema.field("vector").type):
        raise StoreError(f"{root}/{name} is not a {kind} table (missing {missing or ['vector']})")
    if dim is not None and vector_dim(table.schema) != dim:
        raise StoreError(f"{root}/{name} holds {vector_dim(table.schema)}-d vectors, this model makes {dim}-d; "
                         f"use another table name for it")
    return table


def open_embeddings_table(root: str, name: str = DEFAULT_EMBEDDINGS_TABLE, dim: int | None = None
                          ) -> lancedb.table.Table:
    """Open ``root/name`` (a chip_embeddings table); create it for ``dim``-vectors when missing and ``dim`` given."""
    return _open_vector_table(root, name, embeddings_schema, "chip_embeddings", "aegir dataset embed", dim)


def embedded_uuids(table: lancedb.table.Table, model: str) -> set[str]:
    """uuids that already have a vector from ``model``."""
    clause = build_where_clause({"model": model}, table.schema)
    return set(table.search().where(clause).select(["uuid"]).limit(None).to_arrow().column(0).to_pylist())


def upsert_embeddings(table: lancedb.table.Table, rows: pa.Table) -> dict[str, int]:
    """Insert or replace rows keyed by ``(uuid, model)`` in one commit: ``{inserted, updated, version}``."""
    if rows.num_rows == 0:
        return {"inserted": 0, "updated": 0, "version": table.version}
    schema = table.schema
    unknown = [n for n in rows.column_names if n not in schema.names]
    if unknown:
        raise StoreError(f"unknown embedding column(s) {unknown}")
    columns = []
    for f in schema:
        if f.name in rows.column_names:
            columns.append(rows.column(f.name))
        elif f.nullable:
            columns.append(pa.nulls(rows.num_rows, f.type))
        else:
            raise StoreError(f"embedding rows lack the required column {f.name}")
    rows = pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    if rows.column("vector").null_count or rows.column("uuid").null_count or rows.column("model").null_count:
        raise StoreError("uuid, model and vector must not be null")
    result = (table.merge_insert(["uuid", "model"]).when_matched_update_all().when_not_matched_insert_all()
              .execute(rows))
    return {"inserted": int(result.num_inserted_rows), "updated": int(result.num_updated_rows),
            "version": int(result.version)}


def embedding_models(table: lancedb.table.Table) -> list[dict[str, Any]]:
    """Each model in the table: ``model``, ``rows``, ``model_checkpoint``, ``model_data_version``."""
    cols = table.search().select(["model", "model_checkpoint", "model_data_version"]).limit(None).to_arrow()
    out: dict[str, dict[str, Any]] = {}
    for row in cols.to_pylist():
        entry = out.setdefault(row["model"], {**row, "rows": 0})
        entry["rows"] += 1
    return sorted(out.values(), key=lambda e: e["model"])


def resolve_model(table: lancedb.table.Table, model: str | None) -> dict[str, Any]:
    """The model entry to search with: ``model`` when given (must be present), else the only one in the table."""
    models = embedding_models(table)
    if model is not None:
        for entry in models:
            if entry["model"] == model:
                return entry
        raise StoreError(f"model {model!r} has no embeddings; present: {[m['model'] for m in models]}")
    if len(models) == 1:
        return models[0]
    if not models:
        raise StoreError("the embeddings table is empty (run `aegir dataset embed` first)")
    raise StoreError(f"several models have embeddings, pick one with --model: {[m['model'] for m in models]}")


def stored_vector(table: lancedb.table.Table, uuid: str, model: str) -> np.ndarray:
    """The vector of chip ``uuid`` from ``model``."""
    clause = build_where_clause({"uuid": _safe_value("uuid", uuid), "model": model}, table.schema)
    hit = table.search().where(clause).select(["vector"]).limit(1).to_arrow()
    if hit.num_rows == 0:
        raise StoreError(f"chip {uuid} has no embedding from model {model}")
    return np.asarray(hit.column("vector")[0].as_py(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# indexes


def ensure_indexes(table: lancedb.table.Table, index_type: str = "IVF_PQ", num_partitions: int | None = None,
                   num_sub_vectors: int | None = None, min_rows: int = MIN_INDEX_ROWS,
                   scalar_columns: Sequence[str] = SCALAR_INDEX_COLUMNS) -> dict[str, Any]:
    """BTREE indexes on the filter columns (``scalar_columns``), and the vector index when the table has
    ``min_rows`` rows or more.

    Returns ``{"rows", "vector_index": "IVF_PQ"|… or None, "search": "ann"|"exact", "num_partitions", …}``.
    """
    rows = table.count_rows()
    info: dict[str, Any] = {"rows": rows, "vector_index": None, "search": "exact"}
    if rows == 0:
        return info
    existing = {tuple(idx.columns): idx for idx in table.list_indices()}
    for column in scalar_columns:
        idx = existing.get((column,))
        if idx is None or idx.num_unindexed_rows:
            table.create_index(column, config=BTree(), replace=True)
    if rows < min_rows:
        info["reason"] = f"{rows} rows < {min_rows}: exact search (no ANN index)"
        return info
    dim = vector_dim(table.schema)
    partitions = num_partitions or max(1, min(4096, int(round(math.sqrt(rows)))))
    sub_vectors = num_sub_vectors or next(s for s in (dim // 8, dim // 4, dim // 2, dim, 1) if s and dim % s == 0)
    idx = existing.get(("vector",))
    if idx is None or idx.num_unindexed_rows:
        if index_type == "IVF_PQ":
            config = IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=sub_vectors)
        elif index_type == "IVF_HNSW_SQ":
            config = HnswSq(distance_type="cosine", num_partitions=partitions)
        else:
            raise StoreError(f"index_type must be IVF_PQ or IVF_HNSW_SQ, got {index_type!r}")
        table.create_index("vector", config=config, replace=True)
    info.update(vector_index=index_type, search="ann", num_partitions=partitions, num_sub_vectors=sub_vectors)
    return info


def has_vector_index(table: lancedb.table.Table) -> bool:
    return any(tuple(idx.columns) == ("vector",) for idx in table.list_indices())


# ---------------------------------------------------------------------------------------------------------------
# validated filters


def _safe_value(field: str, value: Any) -> str:
    if not isinstance(value, str) or not SAFE_VALUE.match(value):
        raise StoreError(f"invalid value {value!r} for {field}: filter values may hold only letters, digits and "
                         f"_ . : - (filters are key=value pairs, never SQL)")
    return value


def _parse_date(field: str, value: Any) -> dt.datetime:
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
                out[key] = [_safe_value(key, v) for v in value]
            else:
                out[key] = _safe_value(key, value)
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


def filter_clause(filters: Mapping[str, Any], model: str | None, schema: pa.Schema,
                  exclude_uuids: Sequence[str] = ()) -> str | None:
    """The SQL filter of validated ``filters`` + ``model``; every literal is quoted by ``build_where_clause``."""
    safe = validate_filters(filters)
    equal = {k: v for k, v in safe.items() if k not in DATE_FIELDS}
    if model is not None:
        equal["model"] = model
    parts = [build_where_clause(equal, schema)] if equal else []
    for key, op in DATE_FIELDS.items():
        if key in safe:  # a datetime object, formatted by us: no user text reaches the SQL
            parts.append(f"(acquired_at {op} TIMESTAMP '{safe[key].isoformat(sep=' ', timespec='microseconds')}')")
    if exclude_uuids:
        quoted = ", ".join("'" + _safe_value("uuid", u) + "'" for u in exclude_uuids)
        parts.append(f"(uuid NOT IN ({quoted}))")
    parts = [p for p in parts if p]
    return " AND ".join(parts) or None


# ---------------------------------------------------------------------------------------------------------------
# search


RESULT_COLUMNS = ["uuid", "model", "dataset", "sample_id", "s2_token_l13", "s2_token_l17", "acquired_at", "_distance"]


def search_vectors(table: lancedb.table.Table, vector: np.ndarray, k: int = 10,
                   filters: Mapping[str, Any] | None = None, model: str | None = None,
                   exclude_uuids: Sequence[str] = (), exact: bool = False, nprobes: int = DEFAULT_NPROBES,
                   refine_factor: int | None = DEFAULT_REFINE) -> list[dict[str, Any]]:
    """The ``k`` nearest chips to ``vector`` (cosine distance, ascending) among rows matching the pre-filter.

    ``exact`` (or a table without a vector index) scans every matching vector; otherwise the IVF index is probed
    (``nprobes`` partitions) and ``k × refine_factor`` candidates are re-ranked with exact distances.
    """
    clause = filter_clause(filters or {}, model, table.schema, exclude_uuids)
    rows = _nearest(table, vector, k, clause, RESULT_COLUMNS, exact, nprobes, refine_factor)
    for row in rows:
        if row.get("acquired_at") is not None:
            row["acquired_at"] = row["acquired_at"].isoformat()
    return rows


def _nearest(table: lancedb.table.Table, vector: np.ndarray, k: int, clause: str | None, columns: list[str],
             exact: bool, nprobes: int, refine_factor: int | None) -> list[dict[str, Any]]:
    """``k`` rows nearest to ``vector`` (cosine) among those matching the SQL ``clause`` (pre-filter)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise StoreError(f"k must be a positive integer, got {k!r}")
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape[0] != vector_dim(table.schema):
        raise StoreError(f"query vector has {vector.shape[0]} values, the table {vector_dim(table.schema)}")
    query = table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
    if clause:
        query = query.where(clause, prefilter=True)
    if exact or not has_vector_index(table):
        query = query.bypass_vector_index()
    else:
        query = query.nprobes(nprobes)
        if refine_factor:
            query = query.refine_factor(refine_factor)
    rows = query.select(columns).to_arrow().to_pylist()
    for row in rows:
        row["distance"] = float(row.pop("_distance"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# tile_embeddings: windows of the imagery that region inference reads
#
# A second table, not a ``source`` column on chip_embeddings: tile windows have no training row (no uuid in
# training_data, no dataset / sample_id / acquisition time) but do have a footprint, a tile file, pixel offsets and
# the S2 cell of the grid plan that holds them. One table per kind keeps both schemas non-null where it matters,
# keeps `aegir search similar` (chips) from ever returning tile windows, and lets each table carry its own indexes.

DEFAULT_TILE_EMBEDDINGS_TABLE = "tile_embeddings"
TILE_SCALAR_INDEX_COLUMNS = ("uuid", "model", "region", "cell_token")
TILE_RESULT_COLUMNS = ["uuid", "model", "region", "tile_path", "window_col", "window_row", "window_px",
                       "footprint_wkb", "plan_level", "cell_token", "centroid_lon", "centroid_lat", "_distance"]


def tile_embeddings_schema(dim: int) -> pa.Schema:
    """The ``tile_embeddings`` schema: one ``dim``-vector per (window uuid, model); footprint WKB in EPSG:4326."""
    base = embeddings_schema(dim)
    return pa.schema([
        base.field("uuid"), base.field("model"), base.field("vector"),
        pa.field("model_checkpoint", pa.string()),
        pa.field("model_data_version", pa.int64()),
        pa.field("embedded_at", _UTC_US),
        pa.field("region", pa.string(), nullable=False),  # region key of the tile folder (see region_key)
        pa.field("tiles_dir", pa.string()),
        pa.field("tile_path", pa.string(), nullable=False),
        pa.field("window_col", pa.int32(), nullable=False),  # pixel offset of the window in its tile
        pa.field("window_row", pa.int32(), nullable=False),
        pa.field("window_px", pa.int32(), nullable=False),  # side of the square window, pixels
        pa.field("footprint_wkb", pa.binary(), nullable=False),  # EPSG:4326 polygon
        pa.field("centroid_lon", pa.float64()),
        pa.field("centroid_lat", pa.float64()),
        pa.field("plan_level", pa.int32(), nullable=False),
        pa.field("cell_token", pa.string(), nullable=False),  # S2 cell at plan_level holding the centroid
        pa.field("s2_token_l13", pa.string()),
        pa.field("s2_token_l17", pa.string()),
    ])


def region_key(tiles_dir: str | Path) -> str:
    """``region_<sha1[:12]>`` of the tile folder's absolute path: the filter value of one region's windows."""
    import hashlib

    return "region_" + hashlib.sha1(str(Path(tiles_dir).absolute()).encode()).hexdigest()[:12]


def open_tile_embeddings_table(root: str, name: str = DEFAULT_TILE_EMBEDDINGS_TABLE, dim: int | None = None
                               ) -> lancedb.table.Table:
    """Open ``root/name`` (a tile_embeddings table); create it for ``dim``-vectors when missing and ``dim`` given."""
    return _open_vector_table(root, name, tile_embeddings_schema, "tile_embeddings", "aegir infer embed-tiles", dim)


def tile_windows(table: lancedb.table.Table, model: str, region: str,
                 columns: Sequence[str] = ("uuid", "footprint_wkb", "cell_token")) -> pa.Table:
    """The stored windows of one ``region`` from ``model`` (``columns`` of them, e.g. add ``vector``)."""
    clause = build_where_clause({"model": model, "region": region}, table.schema)
    return table.search().where(clause).select(list(columns)).limit(None).to_arrow()


def search_tile_windows(table: lancedb.table.Table, vector: np.ndarray, k: int, model: str, region: str,
                        exclude_uuids: Sequence[str] = (), exact: bool = True) -> list[dict[str, Any]]:
    """The ``k`` windows of ``region`` nearest to ``vector`` (cosine distance, ascending), pre-filtered to the
    model and region and without ``exclude_uuids``. ``exact`` by default: one region holds few windows."""
    clause = build_where_clause({"model": model, "region": region}, table.schema)
    if exclude_uuids:
        quoted = ", ".join("'" + _safe_value("uuid", u) + "'" for u in exclude_uuids)
        clause = f"{clause} AND (uuid NOT IN ({quoted}))"
    return _nearest(table, vector, k, clause, TILE_RESULT_COLUMNS, exact, DEFAULT_NPROBES, DEFAULT_REFINE)
