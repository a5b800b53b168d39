"""DuckLake label lakehouse: offline extension loading, ATTACH (local or Postgres + S3), label tables, quarantine.

Local default: a DuckDB-file catalog ``data/ducklake/catalog.ducklake`` with Parquet under
``data/ducklake/files/``. Production: ``ducklake_catalog = "postgres:dbname=… host=…"`` and
``ducklake_data_path = "s3://bucket/prefix/"``; the same functions build the ATTACH (plus an S3 secret from the
credential chain). Extensions are loaded from the ``duckdb-extension-*`` registry packages, never downloaded.

Every import is one DuckLake transaction: a killed process leaves the lakehouse at its last snapshot.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.utils import s2geometry

QUARANTINE_TABLE = "quarantine"
LABEL_TABLE_PREFIX = "raw_"


class StoreError(RuntimeError):
    """The lakehouse cannot be opened or written as asked."""


class ExtensionMissingError(StoreError):
    """A DuckDB extension package is not installed."""


def extension_path(name: str) -> Path:
    """Path of ``<name>.duckdb_extension`` inside the ``duckdb-extension-<name>`` package for this DuckDB version."""
    module = f"duckdb_extension_{name.replace('-', '_')}"
    package = f"duckdb-extension-{name}=={duckdb.__version__}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionMissingError(
            f"DuckDB extension {name!r} is not installed: run `pip install {package}` "
            "(aegir loads extensions from these packages and never downloads them)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "extensions" / f"v{duckdb.__version__}"
    candidate = folder / f"{name}.duckdb_extension"
    if not candidate.is_file():
        raise ExtensionMissingError(
            f"{candidate} is missing: the installed {module} does not match duckdb {duckdb.__version__}; "
            f"run `pip install {package}`"
        )
    return candidate


def needed_extensions(settings: Settings) -> list[str]:
    """Extensions this configuration needs: ducklake and spatial always, postgres/httpfs for production."""
    names = ["ducklake", "spatial"]
    if settings.ducklake_catalog.removeprefix("ducklake:").startswith("postgres:"):
        names.append("postgres_scanner")
    if settings.ducklake_data_path.startswith(("s3://", "r2://", "gs://", "https://")):
        names.append("httpfs")
    return names


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def s3_secret_statement(settings: Settings) -> str | None:
    """``CREATE SECRET`` for an object-store DATA_PATH (credentials from the AWS chain / env), else None."""
    if not settings.ducklake_data_path.startswith(("s3://", "r2://")):
        return None
    options = ["TYPE s3", "PROVIDER credential_chain"]
    if settings.s3_region:
        options.append(f"REGION {_sql_literal(settings.s3_region)}")
    if settings.s3_endpoint:
        options.append(f"ENDPOINT {_sql_literal(settings.s3_endpoint)}")
    if settings.s3_url_style:
        options.append(f"URL_STYLE {_sql_literal(settings.s3_url_style)}")
    return f"CREATE OR REPLACE SECRET aegir_lake_s3 ({', '.join(options)})"


def attach_statement(settings: Settings) -> str:
    """The ``ATTACH 'ducklake:…' AS <alias> (DATA_PATH …)`` statement for these settings."""
    catalog = settings.ducklake_catalog.removeprefix("ducklake:")
    return (
        f"ATTACH {_sql_literal('ducklake:' + catalog)} AS {settings.ducklake_alias} "
        f"(DATA_PATH {_sql_literal(settings.ducklake_data_path)})"
    )


def connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lakehouse attached as ``settings.ducklake_alias``.

    Raises :class:`ExtensionMissingError` when an extension package is absent, :class:`StoreError` when the
    catalog cannot be attached (the message names the catalog).
    """
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for name in needed_extensions(settings):
        con.execute(f"LOAD {_sql_literal(str(extension_path(name)))}")
    if settings.is_local_catalog:
        Path(settings.ducklake_catalog.removeprefix("ducklake:")).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.ducklake_data_path).mkdir(parents=True, exist_ok=True)
    secret = s3_secret_statement(settings)
    if secret:
        con.execute(secret)
    try:
        con.execute(attach_statement(settings))
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"cannot attach DuckLake catalog {settings.ducklake_catalog!r}: {exc}") from exc
    return con


def label_table_name(dataset: str) -> str:
    """``raw_<dataset>``; dataset names are lower-case letters, digits and underscores."""
    if not dataset or not dataset.replace("_", "").isalnum() or not dataset.isascii() or dataset != dataset.lower():
        raise ValueError(f"dataset name {dataset!r} must be lower-case ASCII letters, digits and underscores")
    return f"{LABEL_TABLE_PREFIX}{dataset}"


def _qualified(settings: Settings, table: str) -> str:
    return f'{settings.ducklake_alias}."{table}"'


def table_exists(con: duckdb.DuckDBPyConnection, settings: Settings, table: str) -> bool:
    """True when ``table`` exists in the lakehouse's main schema."""
    rows = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
        [settings.ducklake_alias, table],
    ).fetchall()
    return bool(rows)


def _table_columns(con: duckdb.DuckDBPyConnection, settings: Settings, table: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
        [settings.ducklake_alias, table],
    ).fetchall()
    return {name.lower(): dtype for name, dtype in rows}


def _add_missing_columns(con: duckdb.DuckDBPyConnection, settings: Settings, table: str, view: str) -> None:
    """Schema evolution: columns of the incoming batch that the table lacks are added (nullable)."""
    existing = _table_columns(con, settings, table)
    incoming = con.execute(f"DESCRIBE {view}").fetchall()
    for name, dtype, *_ in incoming:
        if name.lower() not in existing:
            con.execute(f'ALTER TABLE {_qualified(settings, table)} ADD COLUMN "{name}" {dtype}')


def _insert_new_rows(con: duckdb.DuckDBPyConnection, settings: Settings, table: str, view: str) -> int:
    """Create ``table`` from ``view`` or insert the rows whose ``row_hash`` it lacks; returns rows inserted."""
    target = _qualified(settings, table)
    if not table_exists(con, settings, table):
        con.execute(f"CREATE TABLE {target} AS SELECT * FROM {view}")
        return con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
    _add_missing_columns(con, settings, table, view)
    before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
    con.execute(
        f"INSERT INTO {target} BY NAME SELECT * FROM {view} "
        f"WHERE row_hash NOT IN (SELECT row_hash FROM {target})"
    )
    return con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before


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
    is rolled back and the lakehouse stays at its previous snapshot.
    """
    table = label_table_name(dataset)
    con.execute("BEGIN TRANSACTION")
    try:
        inserted = 0
        if labels.num_rows:
            con.register("aegir_incoming_labels", labels)
            inserted = _insert_new_rows(con, settings, table, "aegir_incoming_labels")
        quarantined = 0
        if quarantine.num_rows:
            con.register("aegir_incoming_quarantine", quarantine)
            quarantined = _insert_new_rows(con, settings, QUARANTINE_TABLE, "aegir_incoming_quarantine")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for view in ("aegir_incoming_labels", "aegir_incoming_quarantine"):
            try:
                con.unregister(view)
            except duckdb.Error:
                pass
    return ImportCommit(table, inserted, labels.num_rows - inserted, quarantined, current_snapshot_id(con, settings))


def current_snapshot_id(con: duckdb.DuckDBPyConnection, settings: Settings) -> int:
    """The lakehouse's current DuckLake snapshot id."""
    return con.execute("SELECT id FROM ducklake_current_snapshot(?)", [settings.ducklake_alias]).fetchone()[0]


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
                f"SELECT dataset_name, count(*) FROM {_qualified(settings, QUARANTINE_TABLE)} GROUP BY ALL"
            ).fetchall()
        )
    out = []
    for table in label_tables(con, settings):
        rows, files = con.execute(
            f"SELECT count(*), count(DISTINCT source_file) FROM {_qualified(settings, table)}"
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
        f"SELECT * FROM {_qualified(settings, QUARANTINE_TABLE)} {where} ORDER BY quarantined_at, source_row",
        params,
    ).to_arrow_table()


LABEL_S2_LEVEL = 17


@dataclass(frozen=True)
class LabelQuery:
    """Filters for reading labels.

    ``bbox`` is (min_lon, min_lat, max_lon, max_lat) in EPSG:4326 (labels intersecting it); ``s2_prefix`` an S2
    token of any level ≤ 17 (labels whose level-17 cell descends from it); dates ISO ``YYYY-MM-DD`` on
    ``label_date`` (labels without a date are excluded by a date filter).
    """

    datasets: Sequence[str] = ()
    bbox: tuple[float, float, float, float] | None = None
    s2_prefix: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    limit: int | None = None


LABEL_COLUMNS = (
    "row_hash, dataset_name, source_file, source_row, geometry_wkb, area_m2, centroid_lat, centroid_lon, "
    "s2_token_l10, s2_token_l13, s2_token_l17, h3_12, label_date"
)


def s2_descendant_range(token: str) -> tuple[int, int]:
    """(min, max) S2 cell ids of every leaf below the cell ``token`` (any level 0..17): the S2 "prefix" range."""
    cell_id = int(s2geometry.token_to_cell_id(token.strip().lower()))
    level = int(s2geometry.cell_level(cell_id))
    if level > LABEL_S2_LEVEL:
        raise ValueError(f"S2 token {token!r} is level {level}; prefixes must be level {LABEL_S2_LEVEL} or coarser")
    lowest_bit = cell_id & -cell_id
    return cell_id - (lowest_bit - 1), cell_id + (lowest_bit - 1)


def _label_filters(query: LabelQuery) -> tuple[str, list]:
    clauses, params = [], []
    if query.bbox is not None:
        min_lon, min_lat, max_lon, max_lat = (float(v) for v in query.bbox)
        if min_lon > max_lon or min_lat > max_lat:
            raise ValueError(f"bbox {query.bbox} must be (min_lon, min_lat, max_lon, max_lat)")
        clauses.append("ST_Intersects(ST_GeomFromWKB(geometry_wkb), ST_MakeEnvelope(?, ?, ?, ?))")
        params += [min_lon, min_lat, max_lon, max_lat]
    if query.s2_prefix:
        low, high = s2_descendant_range(query.s2_prefix)
        clauses.append("CAST('0x' || rpad(s2_token_l17, 16, '0') AS UBIGINT) BETWEEN ? AND ?")
        params += [low, high]
    if query.date_from:
        clauses.append("label_date >= CAST(? AS DATE)")
        params.append(query.date_from)
    if query.date_to:
        clauses.append("label_date <= CAST(? AS DATE)")
        params.append(query.date_to)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query_labels(con: duckdb.DuckDBPyConnection, settings: Settings, query: LabelQuery) -> pa.Table:
    """Label rows (LABEL_COLUMNS) from the requested datasets (all when empty) matching the filters.

    Values are bound as parameters; dataset names are validated, so no user text reaches SQL unquoted.
    """
    tables = [label_table_name(d) for d in query.datasets] if query.datasets else label_tables(con, settings)
    missing = [t for t in tables if not table_exists(con, settings, t)]
    if missing:
        raise StoreError(f"no label table {', '.join(missing)} in the lakehouse; import it with `aegir labels import`")
    if not tables:
        raise StoreError("the lakehouse holds no label tables yet; import some with `aegir labels import`")
    where, params = _label_filters(query)
    union = " UNION ALL ".join(
        f"SELECT {LABEL_COLUMNS} FROM {_qualified(settings, t)}{where}" for t in tables
    )
    sql = f"SELECT * FROM ({union}) ORDER BY dataset_name, source_row"
    if query.limit is not None:
        sql += f" LIMIT {int(query.limit)}"
    return con.execute(sql, params * len(tables)).to_arrow_table()


def snapshots(con: duckdb.DuckDBPyConnection, settings: Settings) -> Iterator[dict]:
    """The lakehouse's snapshots (id, time, changes), oldest first."""
    cursor = con.execute(
        f"SELECT snapshot_id, snapshot_time, changes FROM {settings.ducklake_alias}.snapshots() ORDER BY snapshot_id"
    )
    for snapshot_id, snapshot_time, changes in cursor.fetchall():
        yield {"snapshot_id": snapshot_id, "snapshot_time": snapshot_time, "changes": changes}


# ---- grid plans: a resumable table of S2 work cells -------------------------------------------------------

PLAN_TABLE = "grid_plan"
PLAN_STATUSES = ("pending", "running", "done", "failed", "no_imagery")


@contextlib.contextmanager
def _transaction_with(con: duckdb.DuckDBPyConnection, view: str, rows: pa.Table) -> Iterator[None]:
    """One transaction with ``rows`` registered as ``view``: committed on success, rolled back on any error."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.register(view, rows)
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister(view)


def write_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Store ``plan`` under ``plan_id`` in one transaction; cells already planned keep their status. Returns new cells."""
    if not plan_id or not plan_id.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"plan id {plan_id!r} must be letters, digits, '-' and '_'")
    target = _qualified(settings, PLAN_TABLE)
    with _transaction_with(con, "aegir_incoming_plan", plan):
        view = "SELECT ? AS plan_id, *, 0 AS attempts, CAST(NULL AS VARCHAR) AS message, now() AS updated_at FROM aegir_incoming_plan"
        if not table_exists(con, settings, PLAN_TABLE):
            con.execute(f"CREATE TABLE {target} AS {view}", [plan_id])
            added = plan.num_rows
        else:
            _add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_plan")  # e.g. ``boost`` on old plans
            before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
            con.execute(
                f"INSERT INTO {target} BY NAME SELECT * FROM ({view}) incoming "
                f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.plan_id = incoming.plan_id "
                f"AND t.cell_token = incoming.cell_token)",
                [plan_id],
            )
            added = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before
    return added


PLAN_RANKING_COLUMNS = ("rank", "priority", "label_count", "context_label_count", "builtup", "prior_detections",
                        "boost")


def rerank_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Give the stored cells of ``plan_id`` the ranking columns (rank, priority, evidence, boost) of a freshly
    computed ``plan``, in one transaction; status, attempts and messages are kept. Returns the cells updated."""
    target = _qualified(settings, PLAN_TABLE)
    columns = [c for c in PLAN_RANKING_COLUMNS if c in plan.column_names]
    incoming = plan.select(["cell_token", *columns])
    with _transaction_with(con, "aegir_incoming_ranks", incoming):
        _add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_ranks")
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
        f"SELECT * FROM {_qualified(settings, PLAN_TABLE)} WHERE {clause} ORDER BY rank", params
    ).to_arrow_table()


def set_cell_status(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, cell_token: str, status: str,
    message: str | None = None,
) -> None:
    """Record a cell's new status (and why, for failures); ``running`` counts an attempt. One snapshot."""
    if status not in PLAN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(PLAN_STATUSES)}")
    target = _qualified(settings, PLAN_TABLE)
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


PREDICTIONS_TABLE = "predicted_pv"


def detection_centroids(con: duckdb.DuckDBPyConnection, settings: Settings):
    """(M, 2) lon/lat of the detections in ``predicted_pv`` (empty before the first inference run)."""
    import numpy as np

    if not table_exists(con, settings, PREDICTIONS_TABLE):
        return np.empty((0, 2))
    rows = con.execute(
        f"SELECT centroid_lon, centroid_lat FROM {_qualified(settings, PREDICTIONS_TABLE)}"
    ).fetchnumpy()
    return np.column_stack([rows["centroid_lon"], rows["centroid_lat"]]).astype(np.float64)


def replace_cell_predictions(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, cell_token: str, rows: pa.Table
) -> int:
    """Replace the ``predicted_pv`` rows of one (plan, cell) with ``rows`` and mark the cell done, in ONE
    transaction: a re-run never duplicates a cell's detections, and a killed run leaves the cell unfinished."""
    target = _qualified(settings, PREDICTIONS_TABLE)
    with _transaction_with(con, "aegir_incoming_predictions", rows):
        if not table_exists(con, settings, PREDICTIONS_TABLE):
            con.execute(f"CREATE TABLE {target} AS SELECT * FROM aegir_incoming_predictions")
        else:
            _add_missing_columns(con, settings, PREDICTIONS_TABLE, "aegir_incoming_predictions")
            con.execute(f"DELETE FROM {target} WHERE plan_id = ? AND cell_token = ?", [plan_id, cell_token])
            con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM aegir_incoming_predictions")
        set_cell_status(con, settings, plan_id, cell_token, "done", f"{rows.num_rows} detections")
    return rows.num_rows


def read_predictions(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str) -> pa.Table:
    """The ``predicted_pv`` rows of one plan, by cell and detection id (an empty table before any)."""
    if not table_exists(con, settings, PREDICTIONS_TABLE):
        return pa.table({})
    return con.execute(
        f"SELECT * FROM {_qualified(settings, PREDICTIONS_TABLE)} WHERE plan_id = ? ORDER BY cell_token, detection_id",
        [plan_id],
    ).to_arrow_table()


def set_plan_status(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, status: str,
                    message: str | None = None) -> None:
    """Give every cell of a plan ``status`` (and why) in one statement, e.g. ``no_imagery`` for an empty AOI."""
    if status not in PLAN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(PLAN_STATUSES)}")
    con.execute(
        f"UPDATE {_qualified(settings, PLAN_TABLE)} SET status = ?, message = ?, updated_at = now() WHERE plan_id = ?",
        [status, message, plan_id],
    )
