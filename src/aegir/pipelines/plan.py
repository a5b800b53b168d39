"""Grid-plan job: cover an AOI with S2 cells, rank them, and store the plan in DuckLake (table ``grid_plan``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa

from aegir.config import Settings
from aegir.pipelines import run_stage
from aegir.store import ducklake

if TYPE_CHECKING:
    import shapely

LABEL_PAD_DEG = 1.0  # labels this far outside the AOI (degrees) still inform the neighbourhood counts


def _label_lonlat(con, settings: Settings, aoi: shapely.Geometry, label_datasets: Sequence[str]) -> np.ndarray:
    """(N, 2) lon, lat (degrees, EPSG:4326) of the centroids of the lakehouse labels near ``aoi``."""
    import shapely

    if not ducklake.label_tables(con, settings):
        return np.empty((0, 2))
    min_lon, min_lat, max_lon, max_lat = shapely.bounds(aoi).tolist()
    pad = LABEL_PAD_DEG
    query = ducklake.LabelQuery(tuple(label_datasets), (min_lon - pad, min_lat - pad, max_lon + pad, max_lat + pad))
    labels = ducklake.query_labels(con, settings, query)
    return np.column_stack([labels["centroid_lon"].to_numpy(), labels["centroid_lat"].to_numpy()])


def plan_grid(
    settings: Settings,
    plan_id: str,
    aoi: shapely.Geometry,
    plan_level: int = 13,
    context_level: int = 10,
    label_datasets: Sequence[str] = (),
    builtup_by_cell: dict[str, float] | None = None,
    cell_boosts: dict[str, float] | None = None,
) -> pa.Table:
    """Cover ``aoi`` (EPSG:4326) with level-``plan_level`` S2 cells, rank them by nearby lakehouse labels and
    prior ``predicted_pv`` detections, and store the plan (table ``grid_plan``) so a run can resume cell by cell.

    ``cell_boosts`` (token → boost > 0, from the find-more-like-this embedding hook) put those cells first; given
    for a plan that already exists, they re-rank it (statuses are kept)."""
    con = ducklake.connect(settings)
    try:
        label_lonlat = _label_lonlat(con, settings, aoi, label_datasets)
        detection_lonlat = ducklake.detection_centroids(con, settings)
        plan = run_stage(
            "grid_plan",
            ["grid_plan"],
            {"aoi_geometry": aoi, "plan_level": plan_level, "context_level": context_level,
             "label_lonlat": label_lonlat, "detection_lonlat": detection_lonlat,
             "builtup_by_cell": builtup_by_cell or {}, "cell_boosts": cell_boosts or {}},
        )["grid_plan"]
        ducklake.write_grid_plan(con, settings, plan_id, plan)
        if cell_boosts:
            ducklake.rerank_grid_plan(con, settings, plan_id, plan)
        return ducklake.read_grid_plan(con, settings, plan_id)
    finally:
        con.close()
