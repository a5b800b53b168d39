"""The imagery catalog (``imagery``), its quarantine (``imagery_quarantine``), the label × image join and the record
of ``training_data`` builds (``dataset_builds``: the Lance version beside the DuckLake snapshot it read).

Rows are keyed by ``image_id`` (the content hash): registering the same file again inserts nothing; a file whose
content changed replaces the row of its ``uri`` (one transaction). The join runs in DuckDB spatial: an equality
pre-filter on S2 cells (the image's ``s2_cover`` vs the cells a label touches, both at the cover level), then the
exact ``ST_Intersects`` of label and footprint; ``inside`` says whether the label lies wholly in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.store import sql
from aegir.store.ducklake.connection import (
    add_missing_columns,
    current_snapshot_id,
    qualified,
    table_exists,
    transaction_with,
)

IMAGERY_TABLE = "imagery"
IMAGERY_QUARANTINE_TABLE = "imagery_quarantine"
BUILDS_TABLE = "dataset_builds"


@dataclass(frozen=True)
class ImageryCommit:
    """What one registration wrote: new rows, rows already present, rows replaced (changed files), quarantined."""

    inserted: int
    already_present: int
    replaced: int
    quarantined: int
    snapshot_id: int


def write_imagery(con: duckdb.DuckDBPyConnection, settings: Settings, rows: pa.Table,
                  quarantine: pa.Table) -> ImageryCommit:
    """Insert catalog rows not yet present (by ``image_id``), replace rows of the same ``uri`` whose content changed,
    and add quarantined files (``uri``, ``reason``, ``dataset``, ``quarantined_at``) — one transaction."""
    target = qualified(settings, IMAGERY_TABLE)
    inserted = replaced = quarantined = 0
    with transaction_with(con, "aegir_incoming_imagery", rows):
        if rows.num_rows:
            if not table_exists(con, settings, IMAGERY_TABLE):
                con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_imagery LIMIT 0")
            add_missing_columns(con, settings, IMAGERY_TABLE, "aegir_incoming_imagery")
            replaced = con.execute(
                f"SELECT count(*) FROM {target} WHERE uri IN (SELECT uri FROM aegir_incoming_imagery) "
                "AND image_id NOT IN (SELECT image_id FROM aegir_incoming_imagery)").fetchone()[0]
            con.execute(f"DELETE FROM {target} WHERE uri IN (SELECT uri FROM aegir_incoming_imagery) "
                        "AND image_id NOT IN (SELECT image_id FROM aegir_incoming_imagery)")
            before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
            con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_imagery "
                        f"WHERE image_id NOT IN (SELECT image_id FROM {target})")
            inserted = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before
        if quarantine.num_rows:
            quarantined = _write_quarantine(con, settings, quarantine)
    return ImageryCommit(inserted, rows.num_rows - inserted, replaced, quarantined,
                         current_snapshot_id(con, settings))


def _write_quarantine(con: duckdb.DuckDBPyConnection, settings: Settings, quarantine: pa.Table) -> int:
    target = qualified(settings, IMAGERY_QUARANTINE_TABLE)
    con.register("aegir_incoming_image_quarantine", quarantine)
    try:
        if not table_exists(con, settings, IMAGERY_QUARANTINE_TABLE):
            con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_image_quarantine LIMIT 0")
        before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
        con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_image_quarantine q "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.uri = q.uri AND t.reason = q.reason)")
        return con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before
    finally:
        con.unregister("aegir_incoming_image_quarantine")


def read_imagery(con: duckdb.DuckDBPyConnection, settings: Settings, image_ids: Sequence[str] | None = None,
                 dataset: str | None = None) -> pa.Table:
    """Catalog rows (all, or these ids / this dataset), ordered by dataset and uri; empty without a catalog."""
    if not table_exists(con, settings, IMAGERY_TABLE):
        return pa.table({})
    clauses = []
    if image_ids is not None:
        clauses.append(sql.in_list("image_id", list(image_ids)) if image_ids else "FALSE")
    if dataset:
        clauses.append(f"dataset = {sql.literal(dataset)}")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return con.execute(f"SELECT * FROM {qualified(settings, IMAGERY_TABLE)}{where} ORDER BY dataset, uri"
                       ).to_arrow_table()


def read_imagery_quarantine(con: duckdb.DuckDBPyConnection, settings: Settings) -> pa.Table:
    """Quarantined imagery files with their reasons, oldest first."""
    if not table_exists(con, settings, IMAGERY_QUARANTINE_TABLE):
        return pa.table({})
    return con.execute(f"SELECT * FROM {qualified(settings, IMAGERY_QUARANTINE_TABLE)} ORDER BY quarantined_at, uri"
                       ).to_arrow_table()


def label_image_pairs(con: duckdb.DuckDBPyConnection, settings: Settings, label_cells: pa.Table,
                      label_geometries: pa.Table, datasets: Sequence[str] = ()) -> pa.Table:
    """(label_index, image_id, inside, share, centre_distance) for every label that intersects a catalogued
    footprint: ``share`` is the part of the label's area inside the footprint (1 for points), ``centre_distance``
    the distance in degrees between the label's and the footprint's centroids.

    ``label_cells``: (label_index int64, token str) — the cover-level cells each label touches;
    ``label_geometries``: (label_index, geometry_wkb EPSG:4326); ``datasets``: only images of these catalog
    datasets (all when empty).
    """
    empty = pa.table({"label_index": pa.array([], pa.int64()), "image_id": pa.array([], pa.string()),
                      "inside": pa.array([], pa.bool_()), "share": pa.array([], pa.float64()),
                      "centre_distance": pa.array([], pa.float64())})
    if not table_exists(con, settings, IMAGERY_TABLE) or label_cells.num_rows == 0:
        return empty
    only = f" AND {sql.in_list('dataset', list(datasets))}" if datasets else ""
    con.register("aegir_label_cells", label_cells)
    con.register("aegir_label_geoms", label_geometries)
    try:
        return con.execute(f"""
            WITH images AS (
                SELECT image_id, ST_GeomFromWKB(footprint_wkb) AS footprint, s2_cover
                FROM {qualified(settings, IMAGERY_TABLE)} WHERE footprint_wkb IS NOT NULL{only}),
            cells AS (SELECT image_id, unnest(s2_cover) AS token FROM images),
            candidates AS (SELECT DISTINCT l.label_index, c.image_id FROM aegir_label_cells l JOIN cells c USING (token)),
            labels AS (SELECT label_index, ST_GeomFromWKB(geometry_wkb) AS geom FROM aegir_label_geoms
                       WHERE label_index IN (SELECT label_index FROM candidates))
            SELECT k.label_index, k.image_id, ST_Within(l.geom, i.footprint) AS inside,
                   CASE WHEN ST_Dimension(l.geom) = 2 AND ST_Area(l.geom) > 0
                        THEN ST_Area(ST_Intersection(l.geom, i.footprint)) / ST_Area(l.geom) ELSE 1.0 END AS share,
                   ST_Distance(ST_Centroid(l.geom), ST_Centroid(i.footprint)) AS centre_distance
            FROM candidates k JOIN labels l USING (label_index) JOIN images i USING (image_id)
            WHERE ST_Intersects(l.geom, i.footprint)
            ORDER BY k.image_id, k.label_index""").to_arrow_table()
    finally:
        con.unregister("aegir_label_cells")
        con.unregister("aegir_label_geoms")


def record_build(con: duckdb.DuckDBPyConnection, settings: Settings, record: pa.Table) -> int:
    """Append one build record (build_id, table_uri, lance_version, ducklake_snapshot_id, …); the new snapshot."""
    target = qualified(settings, BUILDS_TABLE)
    with transaction_with(con, "aegir_incoming_build", record):
        if not table_exists(con, settings, BUILDS_TABLE):
            con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_build LIMIT 0")
        add_missing_columns(con, settings, BUILDS_TABLE, "aegir_incoming_build")
        con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_build")
    return current_snapshot_id(con, settings)


def read_build(con: duckdb.DuckDBPyConnection, settings: Settings, build_id: str) -> dict | None:
    """The build record ``build_id``, or None."""
    if not table_exists(con, settings, BUILDS_TABLE):
        return None
    rows = con.execute(f"SELECT * FROM {qualified(settings, BUILDS_TABLE)} WHERE build_id = ?", [build_id]
                       ).to_arrow_table().to_pylist()
    return rows[0] if rows else None
