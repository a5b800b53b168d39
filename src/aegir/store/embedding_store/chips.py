"""The ``chip_embeddings`` table: one vector per (training chip uuid, model), and filtered search over it.

Why a separate table and not a ``vector`` column on ``training_data``: the training schema is checked column by
column (:func:`aegir.store.lance_io.schema_problems`) and read by the DataModule; a vector column would tie it to
one model and one dimension, and re-embedding with a new checkpoint would rewrite the chip rows (large binaries)
for every version. Here each model's vectors are rows keyed by ``(uuid, model)`` — several models side by side,
upserted with ``merge_insert`` (idempotent), joined back to ``training_data`` by ``uuid``. The filter fields
(dataset, S2 tokens, acquisition time, sample id) are copied so that pre-filtered vector search needs no join.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lancedb
import numpy as np
import pyarrow as pa

from aegir.store.embedding_store.filters import filter_clause, safe_value
from aegir.store.embedding_store.vectors import (
    DEFAULT_NPROBES,
    DEFAULT_REFINE,
    UTC_US,
    nearest,
    open_vector_table,
)
from aegir.store.lance_io import StoreError, build_where_clause

DEFAULT_EMBEDDINGS_TABLE = "chip_embeddings"
# metadata fields of training_data copied beside each vector (the pre-filters of a search)
FILTER_COPIES: tuple[str, ...] = ("dataset", "sample_id", "s2_token_l10", "s2_token_l13", "s2_token_l17",
                                  "acquired_at")
RESULT_COLUMNS = ["uuid", "model", "dataset", "sample_id", "s2_token_l13", "s2_token_l17", "acquired_at", "_distance"]


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
        pa.field("embedded_at", UTC_US),
        pa.field("dataset", pa.string()),
        pa.field("sample_id", pa.string()),
        pa.field("s2_token_l10", pa.string()),
        pa.field("s2_token_l13", pa.string()),
        pa.field("s2_token_l17", pa.string()),
        pa.field("acquired_at", UTC_US),
    ])


def open_embeddings_table(root: str, name: str = DEFAULT_EMBEDDINGS_TABLE, dim: int | None = None
                          ) -> lancedb.table.Table:
    """Open ``root/name`` (a chip_embeddings table); create it for ``dim``-vectors when missing and ``dim`` given."""
    return open_vector_table(root, name, embeddings_schema, "chip_embeddings", "aegir dataset embed", dim)


def embedded_uuids(table: lancedb.table.Table, model: str) -> set[str]:
    """uuids that already have a vector from ``model``."""
    clause = build_where_clause({"model": model}, table.schema)
    return set(table.search().where(clause).select(["uuid"]).limit(None).to_arrow().column(0).to_pylist())


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
    clause = build_where_clause({"uuid": safe_value("uuid", uuid), "model": model}, table.schema)
    hit = table.search().where(clause).select(["vector"]).limit(1).to_arrow()
    if hit.num_rows == 0:
        raise StoreError(f"chip {uuid} has no embedding from model {model}")
    return np.asarray(hit.column("vector")[0].as_py(), dtype=np.float32)


def search_vectors(table: lancedb.table.Table, vector: np.ndarray, k: int = 10,
                   filters: Mapping[str, Any] | None = None, model: str | None = None,
                   exclude_uuids: Sequence[str] = (), exact: bool = False, nprobes: int = DEFAULT_NPROBES,
                   refine_factor: int | None = DEFAULT_REFINE) -> list[dict[str, Any]]:
    """The ``k`` nearest chips to ``vector`` (cosine distance, ascending) among rows matching the pre-filter.

    ``exact`` (or a table without a vector index) scans every matching vector; otherwise the IVF index is probed
    (``nprobes`` partitions) and ``k × refine_factor`` candidates are re-ranked with exact distances.
    """
    clause = filter_clause(filters or {}, model, table.schema, exclude_uuids)
    rows = nearest(table, vector, k, clause, RESULT_COLUMNS, exact, nprobes, refine_factor)
    for row in rows:
        if row.get("acquired_at") is not None:
            row["acquired_at"] = row["acquired_at"].isoformat()
    return rows
