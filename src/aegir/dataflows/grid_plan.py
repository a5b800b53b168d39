"""Hamilton dataflow: an AOI covered by S2 cells, ranked by spatial context, as a resumable plan table.

Inputs: ``aoi_geometry`` (shapely, EPSG:4326), ``plan_level`` (S2 level of the work cells, e.g. 13 ≈ 1 km),
``context_level`` (coarser level whose cell is a work cell's "neighbourhood", e.g. 10 ≈ 8 km),
``label_lonlat`` ((N, 2) lon/lat of known PV labels), ``detection_lonlat`` ((M, 2) prior detections) and
``builtup_by_cell`` (cell token at ``plan_level`` or coarser → built-up evidence in [0, 1], e.g. mean NDBI > 0
share; a coarse cell's value applies to every work cell inside it; may be empty) and ``cell_boosts`` (cell token
→ boost > 0 from the flywheel's find-more-like-this hook, :func:`aegir.dataflows.embedding_hooks.cell_boosts`;
may be empty).

Priority = log1p(labels in the cell) + 0.5·log1p(labels in its neighbourhood) + builtup + log1p(prior
detections): a national run starts where PV is known or likely. Boosted cells come before every unboosted cell
(ordered by boost, then priority): tiles that look like accepted detections are inferred first. Ties break by
token (= cell id order), so plans are deterministic.

Everything is vectorised over uint64 cell ids (sorted): a country at level 14 (~1e6 cells) ranks in about a
second — counts by ``searchsorted`` + ``bincount``, the order by one ``lexsort``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely

from aegir.utils import geo, s2geometry

MAX_PLAN_CELLS = 5_000_000  # a country at level 14 needs ~1.3e6 (Germany); beyond this the AOI or level is wrong


def aoi_area_km2(aoi_geometry: shapely.Geometry) -> float:
    """Geodesic area of the AOI's polygons in km² (WGS84 ellipsoid; lines and points count 0)."""
    return float(geo.geodesic_area_m2(shapely.get_parts(aoi_geometry)).sum()) / 1e6


def plan_cell_ids(aoi_geometry: shapely.Geometry, plan_level: int) -> np.ndarray:
    """Sorted uint64 S2 ids of the level-``plan_level`` cells intersecting the AOI. Shape (cells,)."""
    if aoi_geometry.is_empty:
        raise ValueError("the AOI geometry is empty")
    return s2geometry.s2_covering_ids(aoi_geometry, plan_level, max_cells=MAX_PLAN_CELLS)


def _index_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in ``sorted_ids``, -1 where absent. Shape of ``ids``."""
    if not sorted_ids.size:
        return np.full(ids.shape, -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.where(sorted_ids[at] == ids, at, -1)


def _point_counts(plan_cell_ids: np.ndarray, lonlat: np.ndarray, level: int) -> np.ndarray:
    """How many of the (N, 2) lon/lat points fall in each level-``level`` cell of ``plan_cell_ids``. int64."""
    lonlat = np.asarray(lonlat, dtype=np.float64).reshape(-1, 2)
    at = _index_in(plan_cell_ids, s2geometry.s2_cell_ids(lonlat[:, 1], lonlat[:, 0], level))
    return np.bincount(at[at >= 0], minlength=plan_cell_ids.size).astype(np.int64)


def cell_label_counts(plan_cell_ids: np.ndarray, label_lonlat: np.ndarray, plan_level: int) -> np.ndarray:
    """Known labels inside each work cell (also labels beyond the AOI's edge). Shape (cells,), int64."""
    return _point_counts(plan_cell_ids, label_lonlat, plan_level)


def cell_context_counts(
    plan_cell_ids: np.ndarray, label_lonlat: np.ndarray, plan_level: int, context_level: int
) -> np.ndarray:
    """Known labels in each work cell's level-``context_level`` ancestor (its neighbourhood). Shape (cells,)."""
    if not 0 <= context_level <= plan_level:
        raise ValueError(f"context_level {context_level} must lie in 0..plan_level ({plan_level})")
    lonlat = np.asarray(label_lonlat, dtype=np.float64).reshape(-1, 2)
    label_parents, counts = np.unique(s2geometry.s2_cell_ids(lonlat[:, 1], lonlat[:, 0], context_level),
                                      return_counts=True)
    at = _index_in(label_parents, s2geometry.parent_cell_ids(plan_cell_ids, context_level))
    return np.where(at >= 0, counts[at] if counts.size else 0, 0).astype(np.int64)


def cell_prior_detections(plan_cell_ids: np.ndarray, detection_lonlat: np.ndarray, plan_level: int) -> np.ndarray:
    """Earlier detections inside each work cell. Shape (cells,), int64."""
    return _point_counts(plan_cell_ids, detection_lonlat, plan_level)


def _token_ids(tokens: list[str], what: str) -> np.ndarray:
    try:
        return s2geometry.token_to_cell_id(np.asarray(tokens, dtype=str)) if tokens else np.empty(0, np.uint64)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def cell_builtup(plan_cell_ids: np.ndarray, plan_level: int, builtup_by_cell: dict[str, float]) -> np.ndarray:
    """Built-up evidence per work cell in [0, 1] (0 where unknown), from tokens at ``plan_level`` or coarser (the
    finest covering token wins). Shape (cells,), float64."""
    values = np.zeros(plan_cell_ids.size)
    ids = _token_ids(list(builtup_by_cell), "built-up cell tokens")
    evidence = np.clip(np.asarray(list(builtup_by_cell.values()), dtype=np.float64), 0.0, 1.0)
    levels = s2geometry.cell_level(ids) if ids.size else np.empty(0, np.int64)
    if (levels > plan_level).any():
        raise ValueError(f"built-up cells must be at level ≤ {plan_level}, got levels {sorted(set(levels.tolist()))}")
    for level in np.unique(levels):  # coarse first, so finer evidence overwrites it
        order = np.argsort(ids[levels == level])
        keys, vals = ids[levels == level][order], evidence[levels == level][order]
        at = _index_in(keys, s2geometry.parent_cell_ids(plan_cell_ids, int(level)))
        values = np.where(at >= 0, vals[at], values)
    return values


def cell_boost(plan_cell_ids: np.ndarray, cell_boosts: dict[str, float]) -> np.ndarray:
    """Find-more-like-this boost per work cell (0 where none; negative values are an error). Shape (cells,)."""
    bad = {t: v for t, v in cell_boosts.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"cell boosts must be finite and ≥ 0, got {bad}")
    boosts = np.zeros(plan_cell_ids.size)
    at = _index_in(plan_cell_ids, _token_ids(list(cell_boosts), "boosted cell tokens"))
    boosts[at[at >= 0]] = np.asarray(list(cell_boosts.values()), dtype=np.float64)[at >= 0]
    return boosts


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


def plan_order(plan_cell_ids: np.ndarray, cell_priority: np.ndarray, cell_boost: np.ndarray) -> np.ndarray:
    """Row order of the plan: highest boost, then highest priority, then cell id (= token order). Shape (cells,)."""
    return np.lexsort((plan_cell_ids, -cell_priority, -cell_boost))


def grid_plan(
    plan_cell_ids: np.ndarray,
    plan_level: int,
    plan_order: np.ndarray,
    cell_priority: np.ndarray,
    cell_label_counts: np.ndarray,
    cell_context_counts: np.ndarray,
    cell_builtup: np.ndarray,
    cell_prior_detections: np.ndarray,
    cell_boost: np.ndarray,
) -> pa.Table:
    """The plan: one row per cell (token, level, rank, priority, evidence, boost, status "pending") in
    :func:`plan_order`."""
    cells = plan_cell_ids.size
    return pa.table(
        {
            "cell_token": pa.array(s2geometry.cell_id_to_token(plan_cell_ids[plan_order]), pa.string()),
            "level": pa.repeat(pa.scalar(plan_level, pa.int32()), cells),
            "rank": pa.array(np.arange(cells, dtype=np.int32)),
            "priority": pa.array(cell_priority[plan_order], pa.float64()),
            "label_count": pa.array(cell_label_counts[plan_order], pa.int64()),
            "context_label_count": pa.array(cell_context_counts[plan_order], pa.int64()),
            "builtup": pa.array(cell_builtup[plan_order], pa.float64()),
            "prior_detections": pa.array(cell_prior_detections[plan_order], pa.int64()),
            "boost": pa.array(cell_boost[plan_order], pa.float64()),
            "status": pa.repeat(pa.scalar("pending", pa.string()), cells),
        }
    )
