"""DuckLake label lakehouse: offline extension loading, ATTACH (local or Postgres + S3), label tables, quarantine,
grid plans and the ``predicted_pv`` detections.

Local default: a DuckDB-file catalog ``data/ducklake/catalog.ducklake`` with Parquet under
``data/ducklake/files/``. Production: ``ducklake_catalog = "postgres:dbname=… host=…"`` and
``ducklake_data_path = "s3://bucket/prefix/"``; the same functions build the ATTACH (plus an S3 secret from the
credential chain). Extensions are loaded from the ``duckdb-extension-*`` registry packages, never downloaded.

Every write is one DuckLake transaction: a killed process leaves the lakehouse at its last snapshot.
Modules: :mod:`.connection` (connect, table helpers, snapshots), :mod:`.labels` (label tables, quarantine,
:class:`LabelQuery`), :mod:`.imagery` (the imagery catalog, the label × image join, build records), :mod:`.plans` (grid plans, their cell ledger and worker leases), :mod:`.predictions` (``predicted_pv``),
:mod:`.installations` (``installations``: detections merged per plan), :mod:`.upkeep` (snapshot expiry, file cleanup:
``aegir lake maintain``).
:class:`StoreError` is the store layer's base error (:mod:`aegir.store.errors`), raised here as it always was.
"""

from aegir.store.ducklake.connection import (
    ExtensionMissingError,
    attach_statement,
    connect,
    current_snapshot_id,
    extension_path,
    needed_extensions,
    s3_secret_statement,
    snapshots,
    table_exists,
)
from aegir.store.ducklake.imagery import (
    BUILDS_TABLE,
    IMAGERY_QUARANTINE_TABLE,
    IMAGERY_TABLE,
    ImageryCommit,
    label_image_pairs,
    read_build,
    read_imagery,
    read_imagery_quarantine,
    record_build,
    write_imagery,
)
from aegir.store.ducklake.installations import (
    INSTALLATIONS_TABLE,
    read_installations,
    replace_plan_installations,
)
from aegir.store.ducklake.labels import (
    LABEL_COLUMNS,
    LABEL_H3_RESOLUTION,
    LABEL_S2_LEVELS,
    LABEL_TABLE_PREFIX,
    QUARANTINE_TABLE,
    ImportCommit,
    LabelQuery,
    dataset_summaries,
    label_table_name,
    label_tables,
    quarantine_rows,
    query_labels,
    write_label_batch,
)
from aegir.store.ducklake.plans import (
    PLAN_RANKING_COLUMNS,
    PLAN_STATUSES,
    PLAN_TABLE,
    LedgerSession,
    claim_cells,
    complete_cell,
    plan_progress,
    prepare_leases,
    read_grid_plan,
    renew_lease,
    rerank_grid_plan,
    set_cell_status,
    set_plan_status,
    write_grid_plan,
)
from aegir.store.ducklake.predictions import (
    PREDICTED_PV_TABLE,
    detection_centroids,
    mark_cells_running,
    read_predictions,
    record_cells,
)
from aegir.store.ducklake.upkeep import LakeUpkeep, maintain_lakehouse
from aegir.store.errors import StoreError

__all__ = [
    "LakeUpkeep",
    "maintain_lakehouse",
    "BUILDS_TABLE",
    "IMAGERY_QUARANTINE_TABLE",
    "IMAGERY_TABLE",
    "INSTALLATIONS_TABLE",
    "ImageryCommit",
    "label_image_pairs",
    "read_build",
    "read_imagery",
    "read_imagery_quarantine",
    "read_installations",
    "record_build",
    "write_imagery",
    "ExtensionMissingError",
    "ImportCommit",
    "LABEL_COLUMNS",
    "LABEL_H3_RESOLUTION",
    "LABEL_S2_LEVELS",
    "LABEL_TABLE_PREFIX",
    "LabelQuery",
    "LedgerSession",
    "PLAN_RANKING_COLUMNS",
    "PLAN_STATUSES",
    "PLAN_TABLE",
    "PREDICTED_PV_TABLE",
    "QUARANTINE_TABLE",
    "StoreError",
    "attach_statement",
    "claim_cells",
    "complete_cell",
    "connect",
    "current_snapshot_id",
    "dataset_summaries",
    "detection_centroids",
    "extension_path",
    "label_table_name",
    "label_tables",
    "needed_extensions",
    "plan_progress",
    "prepare_leases",
    "quarantine_rows",
    "query_labels",
    "read_grid_plan",
    "read_predictions",
    "renew_lease",
    "record_cells",
    "mark_cells_running",
    "replace_plan_installations",
    "rerank_grid_plan",
    "s3_secret_statement",
    "set_cell_status",
    "set_plan_status",
    "snapshots",
    "table_exists",
    "write_grid_plan",
    "write_label_batch",
]
