"""Hamilton dataflow: spatial index keys (S2 tokens, H3 cells, S2 coverings) for points and areas of interest.

Every public function is a DAG node named for what it returns; parameters are other nodes or driver inputs.
Coordinates are EPSG:4326 degrees; geometries are shapely in lon/lat. Computation lives in
:mod:`aegir.utils.s2geometry` (vectorised; tokens equal ``s2cell.lat_lon_to_token``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely

from aegir.utils import s2geometry


def s2_tokens_by_level(
    centroid_lat: np.ndarray, centroid_lon: np.ndarray, s2_levels: Sequence[int]
) -> dict[int, np.ndarray]:
    """S2 tokens (object arrays of str, shape (N,)) of each centroid, keyed by S2 level (0..30).

    ``s2_levels`` is a tuple or list: typed ``Sequence[int]`` since Hamilton's input check rejects ``tuple[int, ...]``.
    """
    return {int(level): s2geometry.s2_tokens(centroid_lat, centroid_lon, level) for level in s2_levels}


def h3_cell_ids(centroid_lat: np.ndarray, centroid_lon: np.ndarray, h3_resolution: int) -> np.ndarray:
    """H3 cell strings (object array, shape (N,)) of each centroid at ``h3_resolution`` (0..15)."""
    return s2geometry.h3_cells(centroid_lat, centroid_lon, h3_resolution)


def aoi_s2_covering(aoi_geometry: shapely.Geometry, covering_level: int) -> list[str]:
    """Sorted S2 tokens of the level-``covering_level`` cells intersecting the area of interest (lon/lat)."""
    return s2geometry.s2_covering(aoi_geometry, covering_level)
