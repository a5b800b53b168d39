"""LanceDB ``training_data`` table: one row per training sample (a PV prompt, its image chips and its mask).

Modules: :mod:`.schema` (the schema for the configured S2 levels / H3 resolution, schema checks, the error),
:mod:`.validate` (row checks before a write), :mod:`.table` (locations, open, upsert, indexes, versions),
:mod:`.summary` (counts, class balance), :mod:`.upkeep` (compaction, indexes, version retention,
kept versions), :mod:`.filters` (``{field: value}`` → Lance SQL via
:mod:`aegir.store.sql`). Chip bytes are encoded by :mod:`aegir.store.chip_codec`.
"""

from aegir.store.lance_io.filters import build_where_clause, filter_rows
from aegir.store.lance_io.schema import (
    CHIP_ENCODINGS,
    DATA_STORAGE_VERSION,
    DEFAULT_TABLE,
    INDEX_COLUMNS,
    LINEAGE_TYPE,
    MASK_IGNORE,
    MASK_TARGETS,
    METADATA_TYPE,
    PROVENANCE_TYPE,
    TRAINING_DATA_SCHEMA,
    StoreError,
    index_columns,
    mask_target_filter,
    metadata_type,
    schema_problems,
    stored_h3_resolution,
    stored_s2_levels,
    training_data_schema,
    training_mask,
)
from aegir.store.lance_io.summary import class_balance, stored_truth_masks, table_summary
from aegir.store.lance_io.table import (
    UpsertResult,
    copy_masked_rows,
    ensure_scalar_indexes,
    object_store_env,
    open_training_table,
    read_version,
    resolve_table_location,
    table_versions,
    upsert_training_rows,
    use_object_store_settings,
)
from aegir.store.lance_io.upkeep import KEEP_TAG_PREFIX, TableUpkeep, keep_version, kept_versions, optimize_table
from aegir.store.lance_io.validate import validate_rows

__all__ = [
    "CHIP_ENCODINGS",
    "DATA_STORAGE_VERSION",
    "DEFAULT_TABLE",
    "INDEX_COLUMNS",
    "KEEP_TAG_PREFIX",
    "LINEAGE_TYPE",
    "MASK_IGNORE",
    "MASK_TARGETS",
    "METADATA_TYPE",
    "PROVENANCE_TYPE",
    "TRAINING_DATA_SCHEMA",
    "StoreError",
    "TableUpkeep",
    "UpsertResult",
    "build_where_clause",
    "class_balance",
    "copy_masked_rows",
    "ensure_scalar_indexes",
    "filter_rows",
    "index_columns",
    "keep_version",
    "kept_versions",
    "mask_target_filter",
    "object_store_env",
    "metadata_type",
    "open_training_table",
    "optimize_table",
    "read_version",
    "resolve_table_location",
    "schema_problems",
    "stored_h3_resolution",
    "stored_s2_levels",
    "stored_truth_masks",
    "table_summary",
    "table_versions",
    "training_data_schema",
    "training_mask",
    "upsert_training_rows",
    "use_object_store_settings",
    "validate_rows",
]
