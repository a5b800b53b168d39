"""What the two embedding tables share: opening/creating a vector table, upserts keyed by ``(uuid, model)``,
BTREE + ANN indexes, and the pre-filtered nearest-neighbour query (cosine distance).

Index choice (see ``bench/vector_search.py``): below :data:`MIN_INDEX_ROWS` rows no ANN index is built and search
is exact (a flat scan of a few hundred vectors is faster than any index, and PQ cannot train its 256-entry
codebooks); from there an ``IVF_PQ`` index (cosine, ≈√N partitions, D/8 sub-vectors) searched with
``nprobes`` and an exact ``refine_factor`` re-rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree, HnswSq, IvfPq

from aegir.store.lance_io import StoreError, resolve_table_location

MIN_INDEX_ROWS = 256
DEFAULT_NPROBES = 20
DEFAULT_REFINE = 50  # bench/vector_search.py: recall@10 0.964 at 100k rows (0.696 with 10)
SCALAR_INDEX_COLUMNS = ("uuid", "model", "dataset", "s2_token_l13")  # the chip table's filter columns
UTC_US = pa.timestamp("us", tz="UTC")


def vector_dim(schema: pa.Schema) -> int:
    """The fixed vector length of an embeddings table."""
    return int(schema.field("vector").type.list_size)


def embeddings_root(training_uri: str | None, lancedb_root: str) -> str:
    """The LanceDB database that holds the training table at ``training_uri`` (the embeddings live beside it)."""
    return resolve_table_location(training_uri, lancedb_root)[0]


def open_vector_table(root: str, name: str, schema_for: Callable[[int], pa.Schema], kind: str, make_it: str,
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


# ---- indexes ------------------------------------------------------------------------------------------------


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
    """True when the table has an ANN index on ``vector``."""
    return any(tuple(idx.columns) == ("vector",) for idx in table.list_indices())


# ---- search -------------------------------------------------------------------------------------------------


def nearest(table: lancedb.table.Table, vector: np.ndarray, k: int, clause: str | None, columns: list[str],
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
