"""The ``installations`` table: detections merged into installations (one row per array group), keyed by plan.

A plan's installations are derived from all of its ``predicted_pv`` rows, so they are replaced whole: delete the
plan's rows and insert the new ones in ONE transaction (a re-run never duplicates, a failure leaves the old rows).
Geometry: ``geometry_wkb`` (EPSG:4326); ``detection_ids`` is a list of ``predicted_pv.detection_id``.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.store.ducklake.connection import add_missing_columns, qualified, table_exists, transaction_with

INSTALLATIONS_TABLE = "installations"


def replace_plan_installations(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str,
                               rows: pa.Table) -> int:
    """Replace the ``installations`` rows of ``plan_id`` with ``rows`` (all of that plan) in one transaction;
    returns the rows written. ValueError when ``rows`` lacks ``plan_id`` or holds another plan's rows."""
    if "plan_id" not in rows.column_names:
        raise ValueError(f"installation rows for plan {plan_id} lack the plan_id column")
    others = set(rows.column("plan_id").to_pylist()) - {plan_id}
    if others:
        raise ValueError(f"installation rows for plan {plan_id} hold rows of other plans: {sorted(others)[:3]}")
    target = qualified(settings, INSTALLATIONS_TABLE)
    with transaction_with(con, "aegir_incoming_installations", rows):
        if not table_exists(con, settings, INSTALLATIONS_TABLE):
            con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_installations")
        else:
            add_missing_columns(con, settings, INSTALLATIONS_TABLE, "aegir_incoming_installations")
            con.execute(f"DELETE FROM {target} WHERE plan_id = ?", [plan_id])
            con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_installations")
    return rows.num_rows


def read_installations(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str) -> pa.Table:
    """The ``installations`` rows of one plan by installation id (an empty table before any)."""
    if not table_exists(con, settings, INSTALLATIONS_TABLE):
        return pa.table({})
    return con.execute(
        f"SELECT * FROM {qualified(settings, INSTALLATIONS_TABLE)} WHERE plan_id = ? ORDER BY installation_id",
        [plan_id],
    ).to_arrow_table()
