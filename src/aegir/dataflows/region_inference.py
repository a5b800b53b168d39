"""Hamilton dataflow: one S2 work cell of a region → tile mosaic, blended PV probabilities, detections.

Inputs: ``cell_token`` (S2 token of the work cell), ``tile_index`` (the region's
:class:`~aegir.store.region_files.TileRef` list, sorted by file name; its ``tile_tree`` is best built once and
given as an override), ``tile_reader`` (a store function
``(TileRef, bounds, crs) -> Chip``: the I/O is received, like a connection), ``segmentation_model`` (an object with
``predict_batch((B, 3, t, t) uint8) -> (B, t, t)`` or ``predict_proba((3, H, W) uint8) -> (H, W) float32``; tiles
blended by :func:`aegir.training.predictor.blended_probabilities`), ``model_checkpoint`` (its path), ``plan_id``,
``predicted_at`` (aware datetime); optional ``tile_px`` / ``overlap_px`` (blending tiles, px), ``context_px`` (px
of imagery read around the cell so its edge pixels and detections see context), ``pv_threshold``,
``min_detection_px``.

Common grid: the first indexed tile's CRS and pixel size with its origin at the CRS origin (for Web-Mercator z19
tiles that is the global z19 pixel grid), so every cell of a region lands on the same pixels. Tiles on that CRS
and pixel size are placed at their offsets rounded to whole pixels (≤ 0.5 px: 0.15 m for the Austin tiles, far
below the accuracy of a name-derived georeference); other tiles are warped onto it (bilinear). Where tiles
overlap, the first tile in the index supplies the pixel.

Detections: 4-connected components of the thresholded probabilities over the cell and its context, polygonised on
the grid and transformed to EPSG:4326. A detection belongs to the one S2 cell containing its centroid, so
neighbouring cells never both keep it (a component wider than the context margin can still be cut at its edge).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from scipy import ndimage

from aegir.dataflows import label_import
from aegir.store.region_files import TileRef
from aegir.utils import geo, s2geometry
from aegir.utils.types import Chip

TileReader = Callable  # (TileRef, bounds (left, bottom, right, top), CRS) -> Chip; bare for Hamilton's type check
DETECTION_NAMESPACE = uuid.UUID("6f1c2b0e-5d7a-4d55-9a7e-2f4f1f0c9e31")


class NoImageryError(ValueError):
    """No tile of the region overlaps the cell (or the AOI)."""


@dataclass(frozen=True)
class MosaicGrid:
    """A cell's pixel window on the common grid: ``transform`` maps (col, row) corners to ``crs``; the cell's own
    pixels are rows ``core[0]:core[2]`` and cols ``core[1]:core[3]``, the rest is context."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    core: tuple[int, int, int, int]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` units."""
        left, top = self.transform.c, self.transform.f
        return (left, top + self.height * self.transform.e, left + self.width * self.transform.a, top)


def cell_polygon(cell_token: str) -> shapely.Geometry:
    """The S2 cell as a polygon in EPSG:4326 (lon/lat)."""
    return s2geometry.s2_cell_polygon(cell_token)


def tile_tree(tile_index: list[TileRef]) -> shapely.STRtree:
    """An STRtree over the tiles' footprints (EPSG:4326), in index order; a job builds it once per region and
    passes it to every cell (Hamilton override), so finding a cell's tiles does not scan the whole index."""
    return shapely.STRtree([t.footprint for t in tile_index])


def cell_tiles(cell_token: str, cell_polygon: shapely.Geometry, tile_index: list[TileRef],
               tile_tree: shapely.STRtree) -> list[TileRef]:
    """The tiles whose footprint overlaps the cell with some area, in index order; NoImageryError when none."""
    near = np.sort(tile_tree.query(cell_polygon, predicate="intersects"))
    hits = [tile_index[i] for i in near if shapely.intersection(tile_index[i].footprint, cell_polygon).area > 0]
    if not hits:
        raise NoImageryError(f"no tile of the region overlaps S2 cell {cell_token}")
    return hits


def _pixel_box(bounds: tuple[float, ...], size: float) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the global grid pixels (origin 0, rows southward) covering ``bounds``."""
    left, bottom, right, top = (round(v / size, 6) for v in bounds)
    return math.floor(-top), math.floor(left), math.ceil(-bottom), math.ceil(right)


def _grown(start: int, stop: int, low: int, high: int, length: int) -> tuple[int, int]:
    """[start, stop) widened about its centre to at least ``length``, within [low, high)."""
    missing = length - (stop - start)
    if missing <= 0:
        return start, stop
    start = max(start - (missing + 1) // 2, low)
    stop = min(start + length, high)
    return max(stop - length, low), stop


def mosaic_grid(
    cell_polygon: shapely.Geometry, cell_tiles: list[TileRef], tile_index: list[TileRef], context_px: int = 128,
    tile_px: int = 1024,
) -> MosaicGrid:
    """The cell's window on the common grid: the cell's extent within its tiles plus ``context_px`` on every side
    where imagery exists, widened to at least one model tile (``tile_px``) where the imagery allows, so the model
    sees real pixels rather than padding."""
    crs, size = tile_index[0].crs, abs(tile_index[0].transform.a)
    cell = _pixel_box(transform_bounds(geo.WGS84, crs, *cell_polygon.bounds, densify_pts=21), size)
    boxes = [_pixel_box(transform_bounds(t.crs, crs, *t.bounds, densify_pts=21), size) for t in cell_tiles]
    tiles = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    core = (max(cell[0], tiles[0]), max(cell[1], tiles[1]), min(cell[2], tiles[2]), min(cell[3], tiles[3]))
    rows = _grown(max(core[0] - context_px, tiles[0]), min(core[2] + context_px, tiles[2]), tiles[0], tiles[2], tile_px)
    cols = _grown(max(core[1] - context_px, tiles[1]), min(core[3] + context_px, tiles[3]), tiles[1], tiles[3], tile_px)
    window = (rows[0], cols[0], rows[1], cols[1])
    transform = Affine(size, 0.0, window[1] * size, 0.0, -size, -window[0] * size)
    return MosaicGrid(crs, transform, window[3] - window[1], window[2] - window[0],
                      (core[0] - window[0], core[1] - window[1], core[2] - window[0], core[3] - window[1]))


def cell_chips(cell_tiles: list[TileRef], mosaic_grid: MosaicGrid, tile_reader: TileReader) -> list[Chip]:
    """Each overlapping tile's part of the window, read by ``tile_reader`` (a failing read raises)."""
    return [tile_reader(tile, mosaic_grid.bounds, mosaic_grid.crs) for tile in cell_tiles]


def _on_grid(chip: Chip, grid: MosaicGrid) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(rgb (3, h, w) uint8, valid (h, w), row, col) of ``chip`` placed on the grid (warped if its grid differs)."""
    size = grid.transform.a
    same = (chip.crs == grid.crs and chip.transform.b == chip.transform.d == 0
            and math.isclose(chip.transform.a, size, rel_tol=1e-6) and math.isclose(-chip.transform.e, size,
                                                                                      rel_tol=1e-6))
    if not same:
        chip = geo.warp_chip_to_grid(chip, grid.crs, grid.transform, grid.width, grid.height)
    col = round((chip.transform.c - grid.transform.c) / size)
    row = round((grid.transform.f - chip.transform.f) / size)
    valid = np.ones((chip.height, chip.width), bool) if chip.valid is None else chip.valid
    return chip.rgb8(), valid, row, col


def cell_mosaic(cell_chips: list[Chip], mosaic_grid: MosaicGrid) -> Chip:
    """(3, H, W) uint8 RGB mosaic of the window; ``valid`` False where no tile has a pixel. First tile wins."""
    height, width = mosaic_grid.height, mosaic_grid.width
    pixels = np.zeros((3, height, width), np.uint8)
    valid = np.zeros((height, width), bool)
    for chip in cell_chips:
        rgb, chip_valid, row, col = _on_grid(chip, mosaic_grid)
        rows = slice(max(row, 0), min(row + rgb.shape[1], height))
        cols = slice(max(col, 0), min(col + rgb.shape[2], width))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        source = (slice(rows.start - row, rows.stop - row), slice(cols.start - col, cols.stop - col))
        take = chip_valid[source] & ~valid[rows, cols]
        pixels[:, rows, cols] = np.where(take, rgb[(slice(None), *source)], pixels[:, rows, cols])
        valid[rows, cols] |= take
    gsd = geo.ground_gsd_m(mosaic_grid.transform, mosaic_grid.crs, width, height)
    return Chip(pixels, mosaic_grid.crs, mosaic_grid.transform, gsd, ("red", "green", "blue"),
                f"mosaic of {len(cell_chips)} tiles", None if valid.all() else valid,
                georeferenced=all(c.georeferenced for c in cell_chips),
                extras={"tiles": [c.source for c in cell_chips]})


def cell_probabilities(
    cell_mosaic: Chip, segmentation_model: Any, tile_px: int = 1024, overlap_px: int = 288, batch_size: int = 1,
    margin_px: int | None = None,
) -> np.ndarray:
    """(H, W) float32 PV probability over the window, blended from overlapping tiles (0 where no imagery).

    ``batch_size`` tiles go to the model per call: 1 by default, the fastest on CPU here (``bench/inference.py``,
    16× area: 5.5 chips/s at 1 vs 3.9 at 4 with the bench's conv net, and ~70 MB less peak RSS)."""
    from aegir.training.predictor import blended_probabilities  # lazily: importing training imports torch

    return blended_probabilities(cell_mosaic.pixels, segmentation_model, tile_px, overlap_px, batch_size,
                                 valid=cell_mosaic.valid, margin_px=margin_px)


def cell_probability_raster(cell_probabilities: np.ndarray, cell_mosaic: Chip, mosaic_grid: MosaicGrid) -> Chip:
    """The cell's own pixels (context cut off) as a (1, h, w) uint8 Chip, 0–255 ≙ probability 0–1."""
    row0, col0, row1, col1 = mosaic_grid.core
    values = np.rint(np.clip(cell_probabilities[row0:row1, col0:col1], 0, 1) * 255).astype(np.uint8)
    valid = None if cell_mosaic.valid is None else cell_mosaic.valid[row0:row1, col0:col1]
    transform = mosaic_grid.transform @ Affine.translation(col0, row0)
    return Chip(values[None], mosaic_grid.crs, transform, cell_mosaic.gsd_m, ("pv_probability",),
                cell_mosaic.source, None if valid is None or valid.all() else valid)


def detection_labels(cell_probabilities: np.ndarray, pv_threshold: float = 0.5,
                     min_detection_px: int = 4) -> np.ndarray:
    """(H, W) int32: 4-connected components of probability ≥ ``pv_threshold`` numbered 1..N in scan order;
    components under ``min_detection_px`` pixels are dropped (0)."""
    labels, count = ndimage.label(cell_probabilities >= pv_threshold)
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_detection_px
    keep[0] = False
    renumber = np.zeros(count + 1, np.int32)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return renumber[labels]


def detection_candidates(
    detection_labels: np.ndarray, cell_probabilities: np.ndarray, mosaic_grid: MosaicGrid
) -> dict[str, np.ndarray]:
    """Every component of the window: ``geometry`` (EPSG:4326 polygons), ``score`` (mean probability) and
    ``pixel_count``, each (N,)."""
    values, geometries = geo.label_polygons(detection_labels, mosaic_grid.transform, mosaic_grid.crs)
    flat = detection_labels.ravel()
    counts = np.bincount(flat, minlength=len(values) + 1)
    sums = np.bincount(flat, weights=cell_probabilities.ravel(), minlength=len(values) + 1)
    return {"geometry": geometries, "score": sums[values] / counts[values], "pixel_count": counts[values]}


def model_provenance(segmentation_model: Any, model_checkpoint: str) -> dict[str, Any]:
    """Checkpoint path, training-data (Lance) version and dataset URI of the model."""
    return {"model_checkpoint": str(model_checkpoint),
            "model_data_version": int(getattr(segmentation_model, "data_version", -1)),
            "dataset_uri": str(getattr(segmentation_model, "dataset_uri", ""))}


def cell_detections(detection_candidates: dict[str, np.ndarray], cell_token: str) -> dict[str, np.ndarray]:
    """The candidates whose centroid lies in the cell (S2 cell of the centroid at the cell's level), plus
    ``centroid_lon`` / ``centroid_lat`` (degrees) and geodesic ``area_m2``."""
    geometry = detection_candidates["geometry"]
    centroid = shapely.centroid(geometry)
    lon, lat = shapely.get_x(centroid), shapely.get_y(centroid)
    level = int(s2geometry.cell_level(s2geometry.token_to_cell_id(cell_token)))
    inside = s2geometry.s2_tokens(lat, lon, level) == cell_token if len(geometry) else np.zeros(0, bool)
    kept = {name: values[inside] for name, values in detection_candidates.items()}
    return kept | {"centroid_lon": lon[inside], "centroid_lat": lat[inside],
                   "area_m2": label_import.area_m2(kept["geometry"])}


def prediction_rows(
    cell_detections: dict[str, np.ndarray], cell_token: str, plan_id: str, model_provenance: dict[str, Any],
    pv_threshold: float, predicted_at: dt.datetime,
) -> pa.Table:
    """``predicted_pv`` rows of the cell: detection_id (uuid5 of plan, cell, index), plan_id, cell_token,
    geometry_wkb (EPSG:4326), area_m2, score, pixel_count, centroid lon/lat, model provenance, threshold, time."""
    count = len(cell_detections["geometry"])
    ids = [str(uuid.uuid5(DETECTION_NAMESPACE, f"{plan_id}:{cell_token}:{i}")) for i in range(count)]
    return pa.table({
        "detection_id": pa.array(ids, pa.string()),
        "plan_id": pa.array([plan_id] * count, pa.string()),
        "cell_token": pa.array([cell_token] * count, pa.string()),
        "geometry_wkb": pa.array(shapely.to_wkb(cell_detections["geometry"]).tolist(), pa.binary()),
        "area_m2": pa.array(cell_detections["area_m2"], pa.float64()),
        "score": pa.array(cell_detections["score"], pa.float64()),
        "pixel_count": pa.array(cell_detections["pixel_count"], pa.int64()),
        "centroid_lon": pa.array(cell_detections["centroid_lon"], pa.float64()),
        "centroid_lat": pa.array(cell_detections["centroid_lat"], pa.float64()),
        "model_checkpoint": pa.array([model_provenance["model_checkpoint"]] * count, pa.string()),
        "model_data_version": pa.array([model_provenance["model_data_version"]] * count, pa.int64()),
        "dataset_uri": pa.array([model_provenance["dataset_uri"]] * count, pa.string()),
        "pv_threshold": pa.array([float(pv_threshold)] * count, pa.float64()),
        "predicted_at": pa.array([predicted_at] * count, pa.timestamp("us", tz="UTC")),
    })
