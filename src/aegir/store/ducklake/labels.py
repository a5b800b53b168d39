"""Label tables ``raw_<dataset>``, the ``quarantine`` table of rejected rows, and filtered label reads.

Every import is one DuckLake transaction: a killed process leaves the lakehouse at its last snapshot. Rows are
keyed by ``row_hash``, so re-importing a file inserts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.store import sql
from aegir.store.ducklake.connection import (
    current_snapshot_id,
    insert_new_rows,
    qualified,
    retry_on_conflict,
    rollback,
    table_columns,
    table_exists,
)
from aegir.store.errors import StoreError

QUARANTINE_TABLE = "quarantine"
LABEL_TABLE_PREFIX = "raw_"
# The raw_<dataset> schema fixes its cell columns (label queries and prompts read them by name): every label
# table carries S2 tokens at these levels and H3 cells at this resolution, whatever Settings says for chips.
LABEL_S2_LEVELS = (10, 13, 17)
LABEL_H3_RESOLUTION = 12
LABEL_COLUMNS = (
    "row_hash, dataset_name, source_file, source_row, geometry_wkb, area_m2, centroid_lat, centroid_lon, "
    + ", ".join(f"s2_token_l{level}" for level in LABEL_S2_LEVELS) + f", h3_{LABEL_H3_RESOLUTION}, label_date"
)


# A label attribute naming the image (file stem or name) a label was drawn on: the label × image join keeps such a
# label on that image only (see aegir.dataflows.label_image_join.assigned_pairs).
IMAGE_HINT_COLUMN = "image"


def label_table_name(dataset: str) -> str:
    """``raw_<dataset>``; dataset names are lower-case letters, digits and underscores."""
    if not dataset or not dataset.replace("_", "").isalnum() or not dataset.isascii() or dataset != dataset.lower():
        raise ValueError(f"dataset name {dataset!r} must be lower-case ASCII letters, digits and underscores")
    return f"{LABEL_TABLE_PREFIX}{dataset}"


@dataclass(frozen=True)
class ImportCommit:
    """What one label import wrote: rows inserted (new), rows skipped as already present, quarantined rows."""

    table: str
    inserted: int
    already_present: int
    quarantined: int
    snapshot_id: int


def write_label_batch(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    dataset: str,
    labels: pa.Table,
    quarantine: pa.Table,
) -> ImportCommit:
    """Insert new label rows into ``raw_<dataset>`` and bad rows into ``quarantine`` in ONE transaction.

    Rows are keyed by ``row_hash``: re-importing the same file inserts nothing. On any error the transaction
    is rolled back and the lakehouse stays at its previous snapshot; a commit conflict with another importer
    (e.g. both creating ``quarantine``) is retried with backoff (:func:`retry_on_conflict`).
    """
    table = label_table_name(dataset)

    def commit() -> tuple[int, int]:
        con.execute("BEGIN TRANSACTION")
        try:
            inserted = quarantined = 0
            if labels.num_rows:
                con.register("aegir_incoming_labels", labels)
                inserted = insert_new_rows(con, settings, table, "aegir_incoming_labels")
            if quarantine.num_rows:
                con.register("aegir_incoming_quarantine", quarantine)
                quarantined = insert_new_rows(con, settings, QUARANTINE_TABLE, "aegir_incoming_quarantine")
            con.execute("COMMIT")
            return inserted, quarantined
        except BaseException:
            rollback(con)
            raise
        finally:
            for view in ("aegir_incoming_labels", "aegir_incoming_quarantine"):
                try:
                    con.unregister(view)
                except duckdb.Error:
                    pass

    inserted, quarantined = retry_on_conflict(commit)
    return ImportCommit(table, inserted, labels.num_rows - inserted, quarantined, current_snapshot_id(con, settings))


def label_tables(con: duckdb.DuckDBPyConnection, settings: Settings) -> list[str]:
    """Names of the ``raw_*`` label tables, sorted."""
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
        "AND starts_with(table_name, ?) ORDER BY table_name",
        [settings.ducklake_alias, LABEL_TABLE_PREFIX],
    ).fetchall()
    return [name for (name,) in rows]


def dataset_summaries(con: duckdb.DuckDBPyConnection, settings: Settings) -> list[dict]:
    """One dict per label table: dataset, table, rows, quarantined rows, source files, snapshot_id."""
    snapshot = current_snapshot_id(con, settings)
    quarantined = {}
    if table_exists(con, settings, QUARANTINE_TABLE):
        quarantined = dict(
            con.execute(
                f"SELECT dataset_name, count(*) FROM {qualified(settings, QUARANTINE_TABLE)} GROUP BY ALL"
            ).fetchall()
        )
    out = []
    for table in label_tables(con, settings):
        rows, files = con.execute(
            f"SELECT count(*), count(DISTINCT source_file) FROM {qualified(settings, table)}"
        ).fetchone()
        dataset = table.removeprefix(LABEL_TABLE_PREFIX)
        out.append(
            {
                "dataset": dataset,
                "table": table,
                "rows": rows,
                "quarantined": quarantined.get(dataset, 0),
                "source_files": files,
                "snapshot_id": snapshot,
            }
        )
    return out


def quarantine_rows(con: duckdb.DuckDBPyConnection, settings: Settings, dataset: str | None = None) -> pa.Table:
    """Rows of the quarantine table (optionally one dataset's), oldest first."""
    if not table_exists(con, settings, QUARANTINE_TABLE):
        return pa.table({})
    where, params = ("WHERE dataset_name = ?", [dataset]) if dataset else ("", [])
    return con.execute(
        f"SELECT * FROM {qualified(settings, QUARANTINE_TABLE)} {where} ORDER BY quarantined_at, source_row",
        params,
    ).to_arrow_table()


# ---- filtered reads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelQuery:
    """Filters for reading labels.

    ``bbox`` is (min_lon, min_lat, max_lon, max_lat) in EPSG:4326 (labels intersecting it); ``s2_cell`` an S2
    cell token of any level ≤ 17 (labels whose level-17 cell lies inside it: a cell-id range, not a text
    prefix); dates ISO ``YYYY-MM-DD`` on ``label_date`` (labels without a date are excluded by a date filter).
    """

    datasets: Sequence[str] = ()
    bbox: tuple[float, float, float, float] | None = None
    s2_cell: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    limit: int | None = None


def _label_filters(query: LabelQuery) -> tuple[str, list]:
    """`` WHERE …`` for ``query`` and its bound parameters (the S2 range is two integer literals)."""
    clauses, params = [], []
    if query.bbox is not None:
        min_lon, min_lat, max_lon, max_lat = (float(v) for v in query.bbox)
        if min_lon > max_lon or min_lat > max_lat:
            raise ValueError(f"bbox {query.bbox} must be (min_lon, min_lat, max_lon, max_lat)")
        clauses.append("ST_Intersects(ST_GeomFromWKB(geometry_wkb), ST_MakeEnvelope(?, ?, ?, ?))")
        params += [min_lon, min_lat, max_lon, max_lat]
    if query.s2_cell:
        clauses.append(sql.s2_cell_condition(f"s2_token_l{max(LABEL_S2_LEVELS)}", query.s2_cell))
    if query.date_from:
        clauses.append("label_date >= CAST(? AS DATE)")
        params.append(query.date_from)
    if query.date_to:
        clauses.append("label_date <= CAST(? AS DATE)")
        params.append(query.date_to)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _image_hint(con: duckdb.DuckDBPyConnection, settings: Settings, table: str) -> str:
    """SQL for the label's :data:`IMAGE_HINT_COLUMN` as text, or NULL when the table has no such column."""
    columns = table_columns(con, settings, table)
    return f'CAST("{IMAGE_HINT_COLUMN}" AS VARCHAR)' if IMAGE_HINT_COLUMN in columns else "CAST(NULL AS VARCHAR)"


def query_labels(con: duckdb.DuckDBPyConnection, settings: Settings, query: LabelQuery) -> pa.Table:
    """Label rows (LABEL_COLUMNS, plus ``image_hint``: the file's ``image`` attribute when it has one) from the
    requested datasets (all when empty) matching the filters.

    Values are bound as parameters or written by :mod:`aegir.store.sql`; dataset names are validated, so no user
    text reaches SQL unquoted.
    """
    tables = [label_table_name(d) for d in query.datasets] if query.datasets else label_tables(con, settings)
    missing = [t for t in tables if not table_exists(con, settings, t)]
    if missing:
        raise StoreError(f"no label table {', '.join(missing)} in the lakehouse; import it with `aegir labels import`")
    if not tables:
        raise StoreError("the lakehouse holds no label tables yet; import some with `aegir labels import`")
    where, params = _label_filters(query)
    union = " UNION ALL ".join(
        f"SELECT {LABEL_COLUMNS}, {_image_hint(con, settings, t)} AS image_hint FROM {qualified(settings, t)}{where}"
        for t in tables
    )
    statement = f"SELECT * FROM ({union}) ORDER BY dataset_name, source_row"
    if query.limit is not None:
        statement += f" LIMIT {int(query.limit)}"
    return con.execute(statement, params * len(tables)).to_arrow_table()
