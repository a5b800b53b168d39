"""Hamilton dataflow: upsert ``training_rows`` into the (already opened) LanceDB ``training_table``.

The table comes in as an input node (opened by the store layer); one ``merge_insert`` commit per run, so the
new Lance version holds all of the batch or none of it. Scalar indexes on the S2 tokens are refreshed after.
"""

from __future__ import annotations

import lancedb
import pyarrow as pa

from aegir.store import lance_io


def training_upsert(training_rows: pa.Table, training_table: lancedb.table.Table) -> lance_io.UpsertResult:
    """Inserted/updated counts and the new table version after upserting by uuid."""
    if training_rows.num_rows == 0:
        return lance_io.UpsertResult(0, 0, training_table.version)
    return lance_io.upsert_training_rows(training_table, training_rows)


def training_indexes(training_upsert: lance_io.UpsertResult, training_table: lancedb.table.Table) -> list[str]:
    """Columns whose scalar index was (re)built after the upsert."""
    return lance_io.ensure_scalar_indexes(training_table)
