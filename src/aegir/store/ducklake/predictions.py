"""The ``predicted_pv`` table: region-inference detections, one row per detection, keyed by (plan, cell).

A cell's detections are replaced and its ledger entry marked done in one transaction, so a re-run never
duplicates a cell and a killed run leaves the cell unfinished.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from aegir.config import Settings
from aegir.store.ducklake.connection import add_missing_columns, qualified, table_exists, transaction_with

PREDICTED_PV_TABLE = "predicted_pv"


def detection_centroids(con: duckdb.DuckDBPyConnection, settings: Settings) -> np.ndarray:
    """(M, 2) float64 lon/lat (EPSG:4326) of the detections in ``predicted_pv`` (empty before the first run)."""
    if not table_exists(con, settings, PREDICTED_PV_TABLE):
        return np.empty((0, 2))
    rows = con.execute(
        f"SELECT centroid_lon, centroid_lat FROM {qualified(settings, PREDICTED_PV_TABLE)}"
    ).fetchnumpy()
    return np.column_stack([rows["centroid_lon"], rows["centroid_lat"]]).astype(np.float64)


def record_cells(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, done: dict[str, pa.Table],
    ended: dict[str, tuple[str, str]] | None = None,
) -> int:
    """Several cells' outcomes in ONE transaction: the ``predicted_pv`` rows of every ``done`` cell replace that
    cell's rows and mark it done; every ``ended`` cell gets its (status, reason), e.g. ``failed`` / ``no_imagery``.
    Returns the detection rows written. A killed run loses at most the cells of the batch being recorded."""
    ended = ended or {}
    tables = [t for t in done.values() if t.num_rows]
    rows = pa.concat_tables(tables, promote_options="default") if tables else None
    target = qualified(settings, PREDICTED_PV_TABLE)
    plan_table = qualified(settings, "grid_plan")
    outcomes = pa.table({"cell_token": list(done) + list(ended),
                         "status": ["done"] * len(done) + [s for s, _ in ended.values()],
                         "message": [f"{t.num_rows} detections" for t in done.values()] + [m for _, m in ended.values()]})
    with transaction_with(con, "aegir_cell_outcomes", outcomes):
        if rows is not None:
            con.register("aegir_incoming_predictions", rows)
            try:
                if not table_exists(con, settings, PREDICTED_PV_TABLE):
                    con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_predictions")
                else:
                    add_missing_columns(con, settings, PREDICTED_PV_TABLE, "aegir_incoming_predictions")
                    con.execute(f"DELETE FROM {target} WHERE plan_id = ? AND cell_token IN "
                                f"(SELECT cell_token FROM aegir_cell_outcomes)", [plan_id])
                    con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_predictions")
            finally:
                con.unregister("aegir_incoming_predictions")
        elif done and table_exists(con, settings, PREDICTED_PV_TABLE):
            con.execute(f"DELETE FROM {target} WHERE plan_id = ? AND cell_token IN "
                        f"(SELECT cell_token FROM aegir_cell_outcomes)", [plan_id])
        con.execute(f"UPDATE {plan_table} SET status = o.status, message = o.message, updated_at = now() "
                    f"FROM aegir_cell_outcomes o WHERE {plan_table}.plan_id = ? "
                    f"AND {plan_table}.cell_token = o.cell_token", [plan_id])
    return 0 if rows is None else rows.num_rows


def mark_cells_running(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, tokens: list[str]) -> None:
    """Mark ``tokens`` running (one attempt more each) in one statement: a killed run leaves them so."""
    if not tokens:
        return
    plan_table = qualified(settings, "grid_plan")
    con.execute(f"UPDATE {plan_table} SET status = 'running', message = NULL, updated_at = now(), "
                f"attempts = attempts + 1 WHERE plan_id = ? AND cell_token IN ({', '.join('?' for _ in tokens)})",
                [plan_id, *tokens])


def read_predictions(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str) -> pa.Table:
    """The ``predicted_pv`` rows of one plan, by cell and detection id (an empty table before any)."""
    if not table_exists(con, settings, PREDICTED_PV_TABLE):
        return pa.table({})
    return con.execute(
        f"SELECT * FROM {qualified(settings, PREDICTED_PV_TABLE)} WHERE plan_id = ? "
        "ORDER BY cell_token, detection_id",
        [plan_id],
    ).to_arrow_table()
