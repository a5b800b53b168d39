"""Grid plans: a resumable table (``grid_plan``) of S2 work cells per plan id, each with its ranking evidence
and a status ledger (pending → running → done / failed / no_imagery, with attempts and a message)."""

from __future__ import annotations

from typing import Sequence

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.store.ducklake.connection import add_missing_columns, qualified, table_exists, transaction_with
from aegir.store.errors import StoreError

PLAN_TABLE = "grid_plan"
PLAN_STATUSES = ("pending", "running", "done", "failed", "no_imagery")
PLAN_RANKING_COLUMNS = ("rank", "priority", "label_count", "context_label_count", "builtup", "prior_detections",
                        "boost")


def _check_status(status: str) -> None:
    if status not in PLAN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(PLAN_STATUSES)}")


def write_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Store ``plan`` under ``plan_id`` in one transaction; cells already planned keep their status. Returns new cells."""
    if not plan_id or not plan_id.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"plan id {plan_id!r} must be letters, digits, '-' and '_'")
    target = qualified(settings, PLAN_TABLE)
    with transaction_with(con, "aegir_incoming_plan", plan):
        view = "SELECT ? AS plan_id, *, 0 AS attempts, CAST(NULL AS VARCHAR) AS message, now() AS updated_at FROM aegir_incoming_plan"
        if not table_exists(con, settings, PLAN_TABLE):
            con.execute(f"CREATE TABLE {target} AS {view}", [plan_id])
            added = plan.num_rows
        else:
            add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_plan")  # e.g. ``boost`` on old plans
            before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
            con.execute(
                f"INSERT INTO {target} BY NAME SELECT * FROM ({view}) incoming "
                f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.plan_id = incoming.plan_id "
                f"AND t.cell_token = incoming.cell_token)",
                [plan_id],
            )
            added = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before
    return added


def rerank_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Give the stored cells of ``plan_id`` the ranking columns (rank, priority, evidence, boost) of a freshly
    computed ``plan``, in one transaction; status, attempts and messages are kept. Returns the cells updated."""
    target = qualified(settings, PLAN_TABLE)
    columns = [c for c in PLAN_RANKING_COLUMNS if c in plan.column_names]
    incoming = plan.select(["cell_token", *columns])
    with transaction_with(con, "aegir_incoming_ranks", incoming):
        add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_ranks")
        sets = ", ".join(f'"{c}" = i."{c}"' for c in columns)
        con.execute(f"UPDATE {target} SET {sets}, updated_at = now() FROM aegir_incoming_ranks i "
                    f"WHERE {target}.plan_id = ? AND {target}.cell_token = i.cell_token", [plan_id])
        return con.execute(f"SELECT count(*) FROM {target} t JOIN aegir_incoming_ranks i USING (cell_token) "
                           f"WHERE t.plan_id = ?", [plan_id]).fetchone()[0]


def read_grid_plan(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, statuses: Sequence[str] | None = None
) -> pa.Table:
    """The plan's cells in priority order, optionally only those with one of ``statuses``."""
    if not table_exists(con, settings, PLAN_TABLE):
        raise StoreError(f"no grid plan {plan_id!r}: the lakehouse has no {PLAN_TABLE} table yet")
    clause, params = "plan_id = ?", [plan_id]
    if statuses:
        clause += f" AND status IN ({', '.join('?' for _ in statuses)})"
        params += list(statuses)
    return con.execute(
        f"SELECT * FROM {qualified(settings, PLAN_TABLE)} WHERE {clause} ORDER BY rank", params
    ).to_arrow_table()


def set_cell_status(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, cell_token: str, status: str,
    message: str | None = None,
) -> None:
    """Record a cell's new status (and why, for failures); ``running`` counts an attempt. One snapshot."""
    _check_status(status)
    target = qualified(settings, PLAN_TABLE)
    exists = con.execute(
        f"SELECT count(*) FROM {target} WHERE plan_id = ? AND cell_token = ?", [plan_id, cell_token]
    ).fetchone()[0]
    if not exists:
        raise StoreError(f"grid plan {plan_id!r} has no cell {cell_token!r}")
    con.execute(
        f"UPDATE {target} SET status = ?, message = ?, updated_at = now(), "
        f"attempts = attempts + CASE WHEN ? = 'running' THEN 1 ELSE 0 END WHERE plan_id = ? AND cell_token = ?",
        [status, message, status, plan_id, cell_token],
    )


def set_plan_status(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, status: str,
                    message: str | None = None) -> None:
    """Give every cell of a plan ``status`` (and why) in one statement, e.g. ``no_imagery`` for an empty AOI."""
    _check_status(status)
    con.execute(
        f"UPDATE {qualified(settings, PLAN_TABLE)} SET status = ?, message = ?, updated_at = now() WHERE plan_id = ?",
        [status, message, plan_id],
    )
