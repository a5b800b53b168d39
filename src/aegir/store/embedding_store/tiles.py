"""The ``tile_embeddings`` table: vectors of the imagery windows that region inference reads.

A second table, not a ``source`` column on chip_embeddings: tile windows have no training row (no uuid in
training_data, no dataset / sample_id / acquisition time) but do have a footprint, a tile file, pixel offsets and
the S2 cell of the grid plan that holds them. One table per kind keeps both schemas non-null where it matters,
keeps `aegir search similar` (chips) from ever returning tile windows, and lets each table carry its own indexes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import lancedb
import numpy as np
import pyarrow as pa

from aegir.store.embedding_store.chips import embeddings_schema
from aegir.store.embedding_store.filters import uuid_exclusion
from aegir.store.embedding_store.vectors import (
    DEFAULT_NPROBES,
    DEFAULT_REFINE,
    UTC_US,
    nearest,
    open_vector_table,
)
from aegir.store.lance_io import build_where_clause

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
        pa.field("embedded_at", UTC_US),
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
    return "region_" + hashlib.sha1(str(Path(tiles_dir).absolute()).encode()).hexdigest()[:12]


def open_tile_embeddings_table(root: str, name: str = DEFAULT_TILE_EMBEDDINGS_TABLE, dim: int | None = None
                               ) -> lancedb.table.Table:
    """Open ``root/name`` (a tile_embeddings table); create it for ``dim``-vectors when missing and ``dim`` given."""
    return open_vector_table(root, name, tile_embeddings_schema, "tile_embeddings", "aegir infer embed-tiles", dim)


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
        clause = f"{clause} AND {uuid_exclusion(exclude_uuids)}"
    return nearest(table, vector, k, clause, TILE_RESULT_COLUMNS, exact, DEFAULT_NPROBES, DEFAULT_REFINE)
