"""Grid-plan job: cover an AOI with S2 cells, rank them, and store the plan in DuckLake (table ``grid_plan``).

:func:`plan_grid` (region inference) returns the stored plan; :func:`plan_national` (``aegir plan``) covers a
country-sized AOI, times each step and returns a :class:`PlanReport` without reading the million rows back.
:func:`compute_estimate` turns a measured chips/s into GPU-hours per 1,000 km² (an estimate on paper).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from aegir.config import Settings
from aegir.pipelines import STAGES, build_driver
from aegir.store import ducklake

if TYPE_CHECKING:
    import shapely

LABEL_PAD_DEG = 1.0  # labels this far outside the AOI (degrees) still inform the neighbourhood counts


@dataclass
class PlanReport:
    """Outcome of ``aegir plan``: cells, evidence, the AOI's geodesic area (km²) and seconds per step."""

    plan_id: str
    aoi: str
    level: int
    context_level: int
    cells: int
    new_cells: int
    area_km2: float
    labels: int
    detections: int
    cells_with_labels: int
    cells_with_context: int
    seconds: dict[str, float] = field(default_factory=dict)  # cover, rank, store
    progress: dict[str, float] = field(default_factory=dict)  # cells per status after storing


@dataclass(frozen=True)
class ComputeEstimate:
    """Compute for a plan on paper: chips of ``chip_px`` px (``overlap_px`` shared) at ``gsd_m`` m/px."""

    chips_per_s: float
    chip_px: int
    overlap_px: int
    gsd_m: float
    chips_per_km2: float
    gpu_hours_per_1000_km2: float
    gpu_hours_aoi: float
    source: str


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


def _plan_inputs(con, settings: Settings, aoi: shapely.Geometry, plan_level: int, context_level: int,
                 label_datasets: Sequence[str], builtup_by_cell: dict[str, float] | None,
                 cell_boosts: dict[str, float] | None) -> dict[str, Any]:
    """The ``grid_plan`` dataflow's inputs, the evidence read from the lakehouse."""
    return {"aoi_geometry": aoi, "plan_level": plan_level, "context_level": context_level,
            "label_lonlat": _label_lonlat(con, settings, aoi, label_datasets),
            "detection_lonlat": ducklake.detection_centroids(con, settings),
            "builtup_by_cell": builtup_by_cell or {}, "cell_boosts": cell_boosts or {}}


def _cover_and_rank(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the ``grid_plan`` DAG in two timed parts: the covering, then the ranking (the covering as an override)."""
    dag = build_driver(STAGES["grid_plan"])
    started = time.perf_counter()
    cover = dag.execute(["plan_cell_ids", "aoi_area_km2"], inputs=inputs)
    covered = time.perf_counter()
    ranked = dag.execute(["grid_plan", "cell_label_counts", "cell_context_counts"], inputs=inputs,
                         overrides={"plan_cell_ids": cover["plan_cell_ids"]})
    return cover | ranked, {"cover": covered - started, "rank": time.perf_counter() - covered}


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
        inputs = _plan_inputs(con, settings, aoi, plan_level, context_level, label_datasets, builtup_by_cell,
                              cell_boosts)
        plan = _cover_and_rank(inputs)[0]["grid_plan"]
        ducklake.write_grid_plan(con, settings, plan_id, plan)
        if cell_boosts:
            ducklake.rerank_grid_plan(con, settings, plan_id, plan)
        return ducklake.read_grid_plan(con, settings, plan_id)
    finally:
        con.close()


def plan_national(
    settings: Settings,
    plan_id: str,
    aoi: shapely.Geometry,
    aoi_name: str,
    plan_level: int = 14,
    context_level: int | None = None,
    label_datasets: Sequence[str] = (),
    builtup_by_cell: dict[str, float] | None = None,
) -> PlanReport:
    """Cover a country-sized ``aoi`` (EPSG:4326) at ``plan_level``, rank the cells by the lakehouse's labels, prior
    detections and built-up evidence, and store the ledger as one Arrow batch in one transaction (cells already
    planned keep their status). ``context_level`` defaults to ``plan_level - 4`` (~16× the cell side)."""
    context_level = max(plan_level - 4, 0) if context_level is None else context_level
    con = ducklake.connect(settings)
    try:
        inputs = _plan_inputs(con, settings, aoi, plan_level, context_level, label_datasets, builtup_by_cell, None)
        result, seconds = _cover_and_rank(inputs)
        started = time.perf_counter()
        new_cells = ducklake.write_grid_plan(con, settings, plan_id, result["grid_plan"])
        seconds["store"] = time.perf_counter() - started
        progress = ducklake.plan_progress(con, settings, plan_id)
    finally:
        con.close()
    return PlanReport(plan_id, aoi_name, plan_level, context_level, result["grid_plan"].num_rows, new_cells,
                      result["aoi_area_km2"], len(inputs["label_lonlat"]), len(inputs["detection_lonlat"]),
                      int((result["cell_label_counts"] > 0).sum()), int((result["cell_context_counts"] > 0).sum()),
                      seconds, progress)


def imagery_gsd_m(settings: Settings) -> float | None:
    """Median ground sample distance (m/px) of the catalogued imagery, None without a catalog or GSDs."""
    con = ducklake.connect(settings)
    try:
        imagery = ducklake.read_imagery(con, settings)
    finally:
        con.close()
    if "gsd_m" not in imagery.column_names:
        return None
    gsd = imagery["gsd_m"].to_numpy(zero_copy_only=False).astype(np.float64)
    gsd = gsd[np.isfinite(gsd) & (gsd > 0)]
    return float(np.median(gsd)) if gsd.size else None


def compute_estimate(chips_per_s: float, chip_px: int, overlap_px: int, gsd_m: float, area_km2: float,
                     source: str = "") -> ComputeEstimate:
    """GPU-hours on paper: model chips of ``chip_px`` px stepping by ``chip_px - overlap_px`` px at ``gsd_m`` m/px
    tile a km² with 1e6 / (step_px · gsd_m)² chips; at ``chips_per_s`` that is chips / (chips_per_s · 3600) hours.
    Ignores reading imagery, cell edges and no-imagery cells."""
    if not (chips_per_s > 0 and gsd_m > 0 and 0 <= overlap_px < chip_px):
        raise ValueError(f"need chips_per_s > 0, gsd_m > 0 and 0 ≤ overlap_px < chip_px; got {chips_per_s}, "
                         f"{gsd_m}, {overlap_px}, {chip_px}")
    chips_per_km2 = 1e6 / ((chip_px - overlap_px) * gsd_m) ** 2
    hours_per_km2 = chips_per_km2 / chips_per_s / 3600.0
    return ComputeEstimate(chips_per_s, chip_px, overlap_px, gsd_m, chips_per_km2, 1000.0 * hours_per_km2,
                           area_km2 * hours_per_km2 if math.isfinite(area_km2) else math.nan, source)
