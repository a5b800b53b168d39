"""Summaries of a ``training_data`` table: rows, versions, size, S2 cells, datasets, masks, class balance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lancedb
import numpy as np

from aegir.store.lance_io.filters import build_where_clause

from aegir.store.lance_io.schema import mask_target_filter
from aegir.store.lance_io.table import is_local, local_path


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table_summary(table: lancedb.table.Table) -> dict[str, Any]:
    """Rows, version, version count, bytes on disk (None when remote), S2 l13 cells, datasets, masks."""
    rows = table.count_rows()
    cols = table.search().select(["metadata.dataset", "metadata.s2_token_l13"]).limit(None).to_arrow()
    with_mask = table.count_rows(mask_target_filter("auto")) if rows else 0
    size = _dir_size(local_path(table.uri)) if is_local(table.uri) else None
    return {
        "rows": rows,
        "version": table.version,
        "versions": len(table.list_versions()),
        "size_bytes": size,
        "s2_l13_cells": len(set(cols.column(1).to_pylist())),
        "datasets": dict(sorted(Counter(cols.column(0).to_pylist()).items())),
        "rows_with_mask": with_mask,
        "rows_without_mask": rows - with_mask,
    }


def class_balance(table: lancedb.table.Table) -> dict[str, Any]:
    """PV share of the masked rows: rows with PV, rows with an empty mask, mean PV pixel fraction."""
    fractions = (
        table.search().where("metadata.pv_fraction IS NOT NULL").select(["metadata.pv_fraction"]).limit(None).to_arrow()
    ).column(0).to_numpy(zero_copy_only=False)
    return {
        "rows_with_pv": int((fractions > 0).sum()),
        "rows_with_empty_mask": int((fractions == 0).sum()),
        "mean_pv_fraction": float(fractions.mean()) if fractions.size else None,
    }


def stored_truth_masks(table: lancedb.table.Table, dataset: str, sample_ids: list[str]) -> dict[str, np.ndarray]:
    """{sample_id: (H, W) uint8 ground truth} of the rows of ``dataset`` with these sample ids that hold one."""
    from aegir.store.chip_codec import decode_chip  # chip_codec imports this package

    if not sample_ids or table.count_rows() == 0:
        return {}
    where = build_where_clause({"metadata.dataset": dataset, "metadata.sample_id": list(sample_ids)}, table.schema)
    rows = table.search().where(f"truth_mask IS NOT NULL AND {where}").select(
        ["truth_mask", "metadata"]).limit(None).to_arrow().to_pylist()
    out = {}
    for row in rows:
        meta = row["metadata"]
        out[meta["sample_id"]] = decode_chip(row["truth_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8")
    return out
