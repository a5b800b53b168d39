"""Hamilton dataflow: pixel ground truth → the label sets PV teams really have (panel polygons, array boxes, points).

Input nodes: ``truth_chips`` (list of :class:`~aegir.utils.types.Chip`, each with ``extras["sample_id"]`` = the
tile's file stem, on a georeferenced or file-name-convention grid), ``truth_masks`` (stem → (H, W) uint8 mask on
that chip's grid, PV where > 0) and ``truth_source`` (the ``source`` column, e.g. ``"jiang_pv01 mask"``). Chips
without a mask, and empty masks, give no rows.

One "array" is one 8-connected component of ``mask > 0`` (:func:`aegir.utils.components.mask_component_labels`,
the definition every benchmark shares). The three outputs have the same rows in the same order — one per
component, columns ``image`` (stem), ``component`` (its 1-based label, raster-scan order), ``area_px``,
``area_m2`` (geodesic WGS84 area of the panel polygon) and ``source`` — and differ in geometry (EPSG:4326):

* ``panel_polygons``: the component's pixels vectorised on the chip grid (``rasterio.features.shapes``) and
  reprojected to lon/lat; pixels touching only at a corner make a MultiPolygon.
* ``array_boxes``: the component's pixel bounding box (pixel corners) as a polygon.
* ``array_points``: one point inside the component: the centroid of its pixels when the pixel holding it belongs
  to the component, else the component pixel farthest from the component's edge (Euclidean distance transform;
  the tile border counts as edge); always the pixel centre.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import Geod

from aegir.utils import geo
from aegir.utils.components import mask_component_labels
from aegir.utils.types import Chip

ATTRIBUTE_COLUMNS = ("image", "component", "area_px", "area_m2", "source")
_GEOD = Geod(ellps="WGS84")


def _component_point(component: np.ndarray) -> tuple[int, int]:
    """(col, row) of the pixel standing for one component ((H, W) bool, non-empty): see the module docstring."""
    from scipy import ndimage as ndi

    rows, cols = np.nonzero(component)
    row, col = int(np.floor(rows.mean() + 0.5)), int(np.floor(cols.mean() + 0.5))
    if component[row, col]:
        return col, row
    distance = ndi.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(col), int(row)


def truth_components(truth_chips: list[Chip], truth_masks: dict[str, np.ndarray]) -> list[dict]:
    """Per chip with a non-empty mask: {"chip", "labels" ((H, W) int32 component labels), "count"}.

    Raises ValueError naming the chip when it is on a bare pixel grid or its mask has another shape."""
    out = []
    for chip in truth_chips:
        stem = chip.extras["sample_id"]
        if stem not in truth_masks:
            continue
        if chip.crs == geo.PIXEL_GRID_CRS:
            raise ValueError(f"{chip.source}: chip is on a bare pixel grid (no georeference, no file-name convention)")
        mask = np.asarray(truth_masks[stem])
        if mask.shape != (chip.height, chip.width):
            raise ValueError(f"{chip.source}: mask is {mask.shape}, chip is {(chip.height, chip.width)}")
        labels, count = mask_component_labels(mask)
        if count:
            out.append({"chip": chip, "labels": labels, "count": count})
    return out


def panel_geometries(truth_components: list[dict]) -> np.ndarray:
    """(N,) shapely (Multi)Polygons in EPSG:4326, one per component, in component order."""
    parts = []
    for item in truth_components:
        values, geometries = geo.label_polygons(item["labels"], item["chip"].transform, item["chip"].crs)
        if values.tolist() != list(range(1, item["count"] + 1)):
            raise ValueError(f"{item['chip'].source}: vectorising gave labels {values.tolist()}, "
                             f"expected 1..{item['count']}")
        parts.extend(geometries)
    return _geometry_array(parts)


def array_box_geometries(truth_components: list[dict]) -> np.ndarray:
    """(N,) shapely Polygons in EPSG:4326: each component's pixel-corner bounding box on its chip grid."""
    from scipy import ndimage as ndi

    parts = []
    for item in truth_components:
        chip = item["chip"]
        for rows, cols in ndi.find_objects(item["labels"]):
            ring_cols = np.array([cols.start, cols.stop, cols.stop, cols.start], dtype=np.float64)
            ring_rows = np.array([rows.start, rows.start, rows.stop, rows.stop], dtype=np.float64)
            lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, ring_cols, ring_rows)
            parts.append(shapely.Polygon(np.column_stack([lon, lat])))
    return _geometry_array(parts)


def array_point_geometries(truth_components: list[dict]) -> np.ndarray:
    """(N,) shapely Points in EPSG:4326: the centre of one pixel inside each component (see the module docstring)."""
    parts = []
    for item in truth_components:
        chip, labels = item["chip"], item["labels"]
        pixels = np.array([_component_point(labels == k) for k in range(1, item["count"] + 1)], dtype=np.float64)
        lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, pixels[:, 0] + 0.5, pixels[:, 1] + 0.5)
        parts.extend(shapely.points(np.column_stack([lon, lat])))
    return _geometry_array(parts)


def component_attributes(truth_components: list[dict], panel_geometries: np.ndarray,
                         truth_source: str = "mask") -> pd.DataFrame:
    """One row per component: image (stem), component (1-based label), area_px, area_m2 (geodesic area of the
    panel polygon, WGS84), source."""
    images, components, areas_px = [], [], []
    for item in truth_components:
        counts = np.bincount(item["labels"].ravel(), minlength=item["count"] + 1)[1:]
        images += [item["chip"].extras["sample_id"]] * item["count"]
        components += list(range(1, item["count"] + 1))
        areas_px += counts.tolist()
    oriented = shapely.orient_polygons(panel_geometries) if len(panel_geometries) else panel_geometries
    area_m2 = [abs(_GEOD.geometry_area_perimeter(g)[0]) for g in oriented]
    return pd.DataFrame({
        "image": pd.Series(images, dtype="string"),
        "component": pd.Series(components, dtype="int64"),
        "area_px": pd.Series(areas_px, dtype="int64"),
        "area_m2": pd.Series(area_m2, dtype="float64"),
        "source": pd.Series([truth_source] * len(images), dtype="string"),
    })


def panel_polygons(component_attributes: pd.DataFrame, panel_geometries: np.ndarray) -> gpd.GeoDataFrame:
    """Panel polygons (EPSG:4326) vectorised from the masks, one row per 8-connected component."""
    return _frame(component_attributes, panel_geometries)


def array_boxes(component_attributes: pd.DataFrame, array_box_geometries: np.ndarray) -> gpd.GeoDataFrame:
    """One box per array (EPSG:4326): the rows of ``panel_polygons`` with the component's pixel bounding box."""
    return _frame(component_attributes, array_box_geometries)


def array_points(component_attributes: pd.DataFrame, array_point_geometries: np.ndarray) -> gpd.GeoDataFrame:
    """One point per array (EPSG:4326): the rows of ``panel_polygons`` with a point inside the component."""
    return _frame(component_attributes, array_point_geometries)


def _geometry_array(parts: list) -> np.ndarray:
    out = np.empty(len(parts), dtype=object)
    out[:] = parts
    return out


def _frame(attributes: pd.DataFrame, geometries: np.ndarray) -> gpd.GeoDataFrame:
    if len(attributes) != len(geometries):
        raise ValueError(f"{len(attributes)} component rows but {len(geometries)} geometries")
    return gpd.GeoDataFrame(attributes.copy(), geometry=gpd.GeoSeries(list(geometries), crs="EPSG:4326"),
                            crs="EPSG:4326")
