"""Hamilton dataflow: image headers → rows of the lakehouse ``imagery`` catalog.

Inputs: ``image_headers`` (list of :class:`~aegir.store.imagery_files.ImageHeader`, read by the job), ``dataset_name``
(the catalog's dataset label), ``s2_levels`` (``Settings.s2_levels``), ``registered_at``. Output ``imagery_rows``:
an Arrow table, one row per image: ``image_id`` (content hash), ``uri``, footprint polygon (WKB, EPSG:4326; null on
a bare pixel grid), grid (CRS WKT/EPSG text, 6-term affine, width/height), GSD in metres, bands, time, sensor,
``georeferenced``, centroid S2 tokens at the configured levels and ``s2_cover`` — the tokens of every
:data:`COVER_LEVEL` cell the footprint touches, the key of the label × image join.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import shapely

from aegir.utils import geo, s2geometry

COVER_LEVEL = 12  # S2 cells of ~1.3–2.5 km: a VHR tile touches 1–4, a Sentinel-2 scene ~2,500


def image_footprints(image_headers: list) -> np.ndarray:
    """(N,) shapely polygons in EPSG:4326 (None for a bare pixel grid), edges densified by the CRS transform."""
    out = np.empty(len(image_headers), dtype=object)
    for i, header in enumerate(image_headers):
        if header.crs is not None:
            out[i] = geo.footprint_lonlat(header.crs, geo.grid_bounds(header.transform, header.width, header.height))
    return out


def image_centroids(image_footprints: np.ndarray) -> np.ndarray:
    """(N, 2) lon, lat of each footprint's centroid (NaN for a pixel grid)."""
    out = np.full((len(image_footprints), 2), np.nan)
    for i, footprint in enumerate(image_footprints):
        if footprint is not None:
            centre = shapely.centroid(footprint)
            out[i] = (centre.x, centre.y)
    return out


def image_gsd_m(image_headers: list) -> np.ndarray:
    """(N,) ground sample distance in metres (NaN on a pixel grid)."""
    return np.array([math.nan if h.crs is None else geo.ground_gsd_m(h.transform, h.crs, h.width, h.height)
                     for h in image_headers], dtype=np.float64)


def image_s2_tokens(image_centroids: np.ndarray, s2_levels: Sequence[int]) -> dict[int, list]:
    """S2 token of each centroid per configured level (None for a pixel grid)."""
    known = ~np.isnan(image_centroids[:, 0])
    out = {}
    for level in s2_levels:
        tokens = [None] * len(image_centroids)
        if known.any():
            found = s2geometry.s2_tokens(image_centroids[known, 1], image_centroids[known, 0], int(level))
            for index, token in zip(np.flatnonzero(known), found):
                tokens[index] = str(token)
        out[int(level)] = tokens
    return out


def image_s2_cover(image_footprints: np.ndarray) -> list:
    """Per image, the sorted tokens of the level-:data:`COVER_LEVEL` cells its footprint touches (None on a
    pixel grid)."""
    return [None if f is None else s2geometry.s2_covering(f, COVER_LEVEL) for f in image_footprints]


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def imagery_rows(image_headers: list, image_footprints: np.ndarray, image_centroids: np.ndarray,
                 image_gsd_m: np.ndarray, image_s2_tokens: dict[int, list], image_s2_cover: list,
                 dataset_name: str, registered_at: dt.datetime) -> pa.Table:
    """One catalog row per image (see the module docstring for the columns)."""
    h = image_headers
    columns = {
        "image_id": pa.array([x.image_id for x in h], pa.string()),
        "uri": pa.array([x.uri for x in h], pa.string()),
        "dataset": pa.array([dataset_name] * len(h), pa.string()),
        "footprint_wkb": pa.array([None if f is None else shapely.to_wkb(f) for f in image_footprints], pa.binary()),
        "crs": pa.array([_crs_text(x.crs) for x in h], pa.string()),
        "transform": pa.array([list(x.transform)[:6] for x in h], pa.list_(pa.float64())),
        "width": pa.array([x.width for x in h], pa.int32()),
        "height": pa.array([x.height for x in h], pa.int32()),
        "gsd_m": pa.array(image_gsd_m, pa.float64(), mask=np.isnan(image_gsd_m)),
        "bands": pa.array([list(x.bands) for x in h], pa.list_(pa.string())),
        "dtype": pa.array([x.dtype for x in h], pa.string()),
        "acquired_at": pa.array([x.acquired_at for x in h], pa.timestamp("us", tz="UTC")),
        "sensor": pa.array([x.sensor for x in h], pa.string()),
        "georeferenced": pa.array([x.georeferenced for x in h], pa.bool_()),
        "grid_convention": pa.array([x.grid_convention for x in h], pa.string()),
        "position_uncertainty_m": pa.array([x.position_uncertainty_m for x in h], pa.float64()),
        "product_level": pa.array([x.product_level for x in h], pa.string()),
        "processing_baseline": pa.array([x.processing_baseline for x in h], pa.string()),
        "truth_uri": pa.array([x.truth_uri for x in h], pa.string()),
        "size_bytes": pa.array([x.size_bytes for x in h], pa.int64()),
        "extras_json": pa.array([json.dumps(x.extras, sort_keys=True, default=str) for x in h], pa.string()),
        "centroid_lon": pa.array(image_centroids[:, 0], pa.float64(), mask=np.isnan(image_centroids[:, 0])),
        "centroid_lat": pa.array(image_centroids[:, 1], pa.float64(), mask=np.isnan(image_centroids[:, 1])),
    }
    for level in sorted(image_s2_tokens):
        columns[f"s2_token_l{level}"] = pa.array(image_s2_tokens[level], pa.string())
    columns["s2_cover"] = pa.array(image_s2_cover, pa.list_(pa.string()))
    columns["registered_at"] = pa.array([registered_at] * len(h), pa.timestamp("us", tz="UTC"))
    return pa.table(columns)
