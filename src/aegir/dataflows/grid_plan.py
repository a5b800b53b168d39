"""Hamilton dataflow: an AOI covered by S2 cells, ranked by spatial context, as a resumable plan table.

Inputs: ``aoi_geometry`` (shapely, EPSG:4326), ``plan_level`` (S2 level of the work cells, e.g. 13 ≈ 1 km),
``context_level`` (coarser level whose cell is a work cell's "neighbourhood", e.g. 10 ≈ 8 km),
``label_lonlat`` ((N, 2) lon/lat of known PV labels), ``detection_lonlat`` ((M, 2) prior detections) and
``builtup_by_cell`` (cell token → built-up evidence in [0, 1], e.g. mean NDBI > 0 share; may be empty) and
``cell_boosts`` (cell token → boost > 0 from the flywheel's find-more-like-this hook,
:func:`aegir.dataflows.embedding_hooks.cell_boosts`; may be empty).

Priority = log1p(labels in the cell) + 0.5·log1p(labels in its neighbourhood) + builtup + log1p(prior
detections): a national run starts where PV is known or likely. Boosted cells come before every unboosted cell
(ordered by boost, then priority): tiles that look like accepted detections are inferred first. Ties break by
token, so plans are deterministic.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import shapely

from aegir.utils import s2geometry


def plan_cells(aoi_geometry: shapely.Geometry, plan_level: int) -> list[str]:
    """Sorted S2 tokens of the level-``plan_level`` cells intersecting the AOI."""
    if aoi_geometry.is_empty:
        raise ValueError("the AOI geometry is empty")
    return s2geometry.s2_covering(aoi_geometry, plan_level)


def _tokens_at(lonlat: np.ndarray, level: int) -> Counter[str]:
    lonlat = np.asarray(lonlat, dtype=np.float64).reshape(-1, 2)
    if not len(lonlat):
        return Counter()
    return Counter(s2geometry.s2_tokens(lonlat[:, 1], lonlat[:, 0], level).tolist())


def cell_label_counts(plan_cells: list[str], label_lonlat: np.ndarray, plan_level: int) -> np.ndarray:
    """Known labels inside each work cell. Shape (cells,), int64."""
    counts = _tokens_at(label_lonlat, plan_level)
    return np.array([counts.get(t, 0) for t in plan_cells], dtype=np.int64)


def cell_context_counts(
    plan_cells: list[str], label_lonlat: np.ndarray, plan_level: int, context_level: int
) -> np.ndarray:
    """Known labels in each work cell's level-``context_level`` ancestor (its neighbourhood). Shape (cells,)."""
    if not 0 <= context_level <= plan_level:
        raise ValueError(f"context_level {context_level} must lie in 0..plan_level ({plan_level})")
    counts = _tokens_at(label_lonlat, context_level)
    return np.array([counts.get(p, 0) for p in s2geometry.parent_tokens(plan_cells, context_level).tolist()], dtype=np.int64)


def cell_prior_detections(plan_cells: list[str], detection_lonlat: np.ndarray, plan_level: int) -> np.ndarray:
    """Earlier detections inside each work cell. Shape (cells,), int64."""
    counts = _tokens_at(detection_lonlat, plan_level)
    return np.array([counts.get(t, 0) for t in plan_cells], dtype=np.int64)


def cell_builtup(plan_cells: list[str], builtup_by_cell: dict[str, float]) -> np.ndarray:
    """Built-up evidence per work cell in [0, 1] (0 where unknown). Shape (cells,), float64."""
    return np.array([float(np.clip(builtup_by_cell.get(t, 0.0), 0.0, 1.0)) for t in plan_cells])


def cell_boost(plan_cells: list[str], cell_boosts: dict[str, float]) -> np.ndarray:
    """Find-more-like-this boost per work cell (0 where none; negative values are an error). Shape (cells,)."""
    bad = {t: v for t, v in cell_boosts.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"cell boosts must be finite and ≥ 0, got {bad}")
    return np.array([float(cell_boosts.get(t, 0.0)) for t in plan_cells], dtype=np.float64)


def cell_priority(
    cell_label_counts: np.ndarray,
    cell_context_counts: np.ndarray,
    cell_builtup: np.ndarray,
    cell_prior_detections: np.ndarray,
) -> np.ndarray:
    """Priority score per work cell (higher first). Shape (cells,), float64."""
    return (
        np.log1p(cell_label_counts)
        + 0.5 * np.log1p(cell_context_counts)
        + cell_builtup
        + np.log1p(cell_prior_detections)
    )


def grid_plan(
    plan_cells: list[str],
    plan_level: int,
    cell_priority: np.ndarray,
    cell_label_counts: np.ndarray,
    cell_context_counts: np.ndarray,
    cell_builtup: np.ndarray,
    cell_prior_detections: np.ndarray,
    cell_boost: np.ndarray,
) -> pa.Table:
    """The plan: one row per cell (token, level, priority, evidence, boost, status "pending"), boosted cells first
    (highest boost first), then highest priority first."""
    order = sorted(range(len(plan_cells)), key=lambda i: (-cell_boost[i], -cell_priority[i], plan_cells[i]))
    return pa.table(
        {
            "cell_token": pa.array([plan_cells[i] for i in order], pa.string()),
            "level": pa.array([plan_level] * len(order), pa.int32()),
            "rank": pa.array(range(len(order)), pa.int32()),
            "priority": pa.array(cell_priority[order], pa.float64()),
            "label_count": pa.array(cell_label_counts[order], pa.int64()),
            "context_label_count": pa.array(cell_context_counts[order], pa.int64()),
            "builtup": pa.array(cell_builtup[order], pa.float64()),
            "prior_detections": pa.array(cell_prior_detections[order], pa.int64()),
            "boost": pa.array(cell_boost[order], pa.float64()),
            "status": pa.array(["pending"] * len(order), pa.string()),
        }
    )
