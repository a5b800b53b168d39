"""Hamilton dataflow: per-cell detection fragments → installations (one row per array group of a plan).

Inputs: ``plan_predictions`` (``predicted_pv`` rows of one plan: ``detection_id``, ``geometry_wkb`` EPSG:4326
polygons, ``score``), ``plan_id``, ``capacity_params`` (the ``[capacity_dc]`` table of
``aegir/defaults/capacity_dc.toml``, see :mod:`aegir.dataflows.capacity_fit`); optional ``gap_m`` (m, default 5).

Grouping: detections whose distance is at most ``gap_m`` metres belong to one installation (transitively: a chain
of close detections is one installation), so the fragments a tile or S2-cell border cut apart join again. The
distances are measured exactly between the polygons (no buffer polygons) in a local azimuthal equidistant
projection (``+proj=aeqd``, WGS84) centred on each candidate group's bounds: candidates come
from a conservative lon/lat distance (never misses a pair within ``gap_m``), then the metric check decides.

Per installation: ``geometry`` (the union of its detections in EPSG:4326, MultiPolygon where they do not touch;
gaps are not filled), member ids and count, max and area-weighted mean score, geodesic area (m², WGS84
ellipsoid, pyproj Geod), the orientation of the dominant (longest) edge of the minimum rotated rectangle in the
local projection (degrees clockwise from true north, 0–180), and DC capacity (kWp) with its interval from the
USPVDB relation. That relation is fitted on utility-scale ground-mounted plants: for rooftops and for areas
outside the fitted range (``capacity_extrapolated``) the estimate is indicative only. Longitudes are assumed not
to cross ±180°.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from aegir.dataflows.capacity_fit import CapacityRelation
from aegir.utils import geo

INSTALLATION_NAMESPACE = uuid.UUID("0b7e3c55-8f0a-4c7e-9d2b-5b1f3f6a2c41")
INSTALLATION_SCHEMA = pa.schema([
    ("installation_id", pa.string()), ("plan_id", pa.string()), ("geometry_wkb", pa.binary()),
    ("detection_ids", pa.list_(pa.string())), ("detection_count", pa.int64()), ("score_max", pa.float64()),
    ("score_mean", pa.float64()), ("area_m2", pa.float64()), ("orientation_deg", pa.float64()),
    ("capacity_kwp", pa.float64()), ("capacity_kwp_low", pa.float64()), ("capacity_kwp_high", pa.float64()),
    ("capacity_extrapolated", pa.bool_()), ("centroid_lon", pa.float64()), ("centroid_lat", pa.float64()),
    ("gap_m", pa.float64()),
])
_M_PER_DEG_LAT_MIN = 110_574.0  # metres per degree of latitude at the equator (its minimum)
_M_PER_DEG_LON_EQUATOR = 111_319.0  # metres per degree of longitude at the equator (× cos(lat) elsewhere, ≤)
_SLACK_M = 1e-6  # numerical slack of the metric distance check (m)
_LARGE_POLYGON_VERTICES = 1_000


def _aeqd(lon0: float, lat0: float) -> Transformer:
    """EPSG:4326 (lon, lat degrees) → azimuthal equidistant metres centred on (lon0, lat0), WGS84 ellipsoid (the
    same datum: a pipeline, no datum shift)."""
    return Transformer.from_pipeline(
        "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad "
        f"+step +proj=aeqd +lat_0={float(lat0):.10f} +lon_0={float(lon0):.10f} +ellps=WGS84"
    )


def _local_metric(geometry: np.ndarray) -> np.ndarray:
    """``geometry`` (EPSG:4326) in metres, in the aeqd projection centred on the centre of its bounds."""
    left, bottom, right, top = shapely.total_bounds(geometry)
    transformer = _aeqd((left + right) / 2, (bottom + top) / 2)
    return shapely.transform(geometry, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _components(count: int, pairs: np.ndarray) -> np.ndarray:
    """(count,) component label of each node of the undirected graph with edges ``pairs`` (2, M)."""
    graph = coo_matrix((np.ones(pairs.shape[1], bool), (pairs[0], pairs[1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _members(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices (ascending) of each label 0..K-1 of ``labels`` (N,), by label."""
    if len(labels) == 0:
        return []
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels))[:-1])


def _first_seen_order(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 0..K-1 in the order of their first row."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def _column(plan_predictions: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in plan_predictions.column_names:
        raise ValueError(f"predicted_pv rows lack the column {name!r} (columns: {plan_predictions.column_names})")
    return plan_predictions.column(name)


def _has_rows(plan_predictions: pa.Table) -> bool:
    """False for the empty table read before any prediction (no rows, maybe no columns)."""
    return plan_predictions.num_rows > 0


def member_geometry(plan_predictions: pa.Table) -> np.ndarray:
    """(N,) shapely polygons (EPSG:4326) of the plan's detections, in row order."""
    if not _has_rows(plan_predictions):
        return np.empty(0, object)
    geometry = shapely.from_wkb(_column(plan_predictions, "geometry_wkb").to_numpy(zero_copy_only=False))
    if shapely.is_missing(geometry).any():
        raise ValueError("predicted_pv rows hold a missing geometry_wkb")
    return geometry


def member_ids(plan_predictions: pa.Table) -> np.ndarray:
    """(N,) detection ids (str)."""
    if not _has_rows(plan_predictions):
        return np.empty(0, object)
    return np.asarray(_column(plan_predictions, "detection_id").to_pylist(), dtype=object)


def member_scores(plan_predictions: pa.Table) -> np.ndarray:
    """(N,) float64 detection scores (mean PV probability, 0–1)."""
    if not _has_rows(plan_predictions):
        return np.empty(0)
    return _column(plan_predictions, "score").to_numpy(zero_copy_only=False).astype(np.float64)


def member_area_m2(member_geometry: np.ndarray) -> np.ndarray:
    """(N,) geodesic area of each detection in m² (WGS84)."""
    return geo.geodesic_area_m2(member_geometry)


def checked_gap_m(gap_m: float) -> float:
    """``gap_m`` as a float; ValueError unless it is a finite distance >= 0 metres."""
    if not (math.isfinite(gap_m) and gap_m >= 0):
        raise ValueError(f"gap_m must be a finite distance >= 0 metres, got {gap_m}")
    return float(gap_m)


def _candidate_pairs(geometry: np.ndarray, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (``larger``, ``smaller``), each unordered pair once, of the geometries whose envelopes are at
    most ``distance`` apart (in the geometry's units); ``larger`` has at least as many vertices and is prepared,
    so an exact test costs O(log n) of the large polygon per pair instead of O(n) (a pixel-staircase detection can
    hold 10⁵ vertices)."""
    reach = np.array([-distance, -distance, distance, distance])
    first, second = shapely.STRtree(geometry).query(shapely.box(*(shapely.bounds(geometry) + reach).T))
    once = first < second
    first, second = first[once], second[once]
    vertices = shapely.get_num_coordinates(geometry)
    swap = vertices[first] < vertices[second]
    larger, smaller = np.where(swap, second, first), np.where(swap, first, second)
    shapely.prepare(geometry[np.unique(larger)])
    return larger, smaller


def _pairs_within(geometry: np.ndarray, distance: float) -> np.ndarray:
    """(2, M) index pairs of ``geometry`` at most ``distance`` apart (exact GEOS distance, the geometry's units)."""
    if len(geometry) < 2:
        return np.empty((2, 0), np.int64)
    larger, smaller = _candidate_pairs(geometry, distance)
    near = shapely.dwithin(geometry[larger], geometry[smaller], distance)
    return np.stack([larger[near], smaller[near]])


def candidate_groups(member_geometry: np.ndarray, gap_m: float = 5.0) -> np.ndarray:
    """(N,) int: connected groups of detections within a lon/lat distance that is never shorter than ``gap_m``
    metres (a superset of the installations: no pair within ``gap_m`` is split)."""
    gap = checked_gap_m(gap_m)
    if len(member_geometry) == 0:
        return np.empty(0, np.int64)
    max_lat = min(float(np.abs(shapely.bounds(member_geometry)[:, [1, 3]]).max()), 89.0)
    metres_per_degree = min(_M_PER_DEG_LAT_MIN, _M_PER_DEG_LON_EQUATOR * math.cos(math.radians(max_lat)))
    return _components(len(member_geometry), _pairs_within(member_geometry, 1.05 * gap / metres_per_degree))


def installation_labels(member_geometry: np.ndarray, candidate_groups: np.ndarray,
                        gap_m: float = 5.0) -> np.ndarray:
    """(N,) int installation index 0..K-1 (in the order of each installation's first detection): components of
    the detections at most ``gap_m`` metres apart, measured in each candidate group's local aeqd projection."""
    labels = np.arange(len(member_geometry))
    for rows in _members(candidate_groups):
        if len(rows) < 2:
            continue
        pairs = _pairs_within(_local_metric(member_geometry[rows]), gap_m + _SLACK_M)
        labels[rows] = rows[_components(len(rows), pairs)]  # any member's row number names the component
    return _first_seen_order(labels)


def member_valid_geometry(member_geometry: np.ndarray) -> np.ndarray:
    """(N,) the detections made valid (GEOS ``make_valid``; a valid polygon is returned as it is)."""
    return shapely.make_valid(member_geometry) if len(member_geometry) else member_geometry


def member_overlaps(member_valid_geometry: np.ndarray) -> np.ndarray:
    """(2, M) pairs of detections that must be dissolved into one polygon: their interiors intersect, or their
    boundaries share a segment. Pairs that only touch at points (diagonal pixels of a 4-connected labelling)
    stay separate parts of a valid MultiPolygon, as GEOS's union leaves them."""
    if len(member_valid_geometry) < 2:
        return np.empty((2, 0), np.int64)
    larger, smaller = _candidate_pairs(member_valid_geometry, 0.0)
    meet = shapely.intersects(member_valid_geometry[larger], member_valid_geometry[smaller])
    larger, smaller = larger[meet], smaller[meet]
    relations = shapely.relate(member_valid_geometry[larger], member_valid_geometry[smaller])
    merge = np.array([r[0] != "F" or r[4] == "1" for r in relations], dtype=bool)  # DE-9IM: II, BB
    return np.stack([larger[merge], smaller[merge]])


def _dissolve(geometry: np.ndarray) -> shapely.Geometry:
    """GEOS union of ``geometry``: the small polygons first, the large ones (> :data:`_LARGE_POLYGON_VERTICES`)
    apart, then the two unions, so a large staircase polygon goes through one overlay with the small ones instead
    of one per cascade level (2–3× faster on 10⁵-vertex detections, the same polygon)."""
    large = shapely.get_num_coordinates(geometry) > _LARGE_POLYGON_VERTICES
    return shapely.union(shapely.union_all(geometry[~large]), shapely.union_all(geometry[large]))


def installation_geometry(member_valid_geometry: np.ndarray, installation_labels: np.ndarray,
                          member_overlaps: np.ndarray) -> np.ndarray:
    """(K,) Polygon / MultiPolygon (EPSG:4326): the union of each installation's detections. Only detections
    that overlap (``member_overlaps``) go through GEOS's union; the others are disjoint or touch at points and
    are collected as they are: the same geometry, without the union's cost on staircase polygons."""
    pieces = _components(len(member_valid_geometry), member_overlaps)
    piece_geometry = np.array([member_valid_geometry[rows[0]] if len(rows) == 1
                               else _dissolve(member_valid_geometry[rows]) for rows in _members(pieces)], dtype=object)
    unions = []
    for rows in _members(installation_labels):
        parts = shapely.get_parts(shapely.get_parts(piece_geometry[np.unique(pieces[rows])]))  # collections too
        polygons = parts[(shapely.get_type_id(parts) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(parts)]
        unions.append(polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(list(polygons)))
    return np.array(unions, dtype=object)


def installation_area_m2(installation_geometry: np.ndarray) -> np.ndarray:
    """(K,) geodesic area in m² (WGS84 ellipsoid)."""
    return geo.geodesic_area_m2(installation_geometry)


def _dominant_edge_azimuth(local: shapely.Geometry) -> float:
    """Degrees clockwise from grid north (0–180) of the longest edge of ``local``'s minimum rotated rectangle."""
    rectangle = shapely.minimum_rotated_rectangle(local)
    coords = shapely.get_coordinates(rectangle.exterior if isinstance(rectangle, shapely.Polygon) else rectangle)
    if len(coords) < 2:
        return math.nan
    edges = np.diff(coords, axis=0)
    dx, dy = edges[np.argmax(np.hypot(edges[:, 0], edges[:, 1]))]
    return math.degrees(math.atan2(dx, dy)) % 180.0


def installation_orientation_deg(installation_geometry: np.ndarray) -> np.ndarray:
    """(K,) orientation of the dominant edge, degrees clockwise from true north in [0, 180), from the minimum
    rotated rectangle in the installation's local aeqd projection (grid north = true north at its centre);
    NaN for an empty geometry."""
    local = [_local_metric(np.array([g], dtype=object))[0] for g in installation_geometry]
    return np.array([math.nan if g.is_empty else _dominant_edge_azimuth(g) for g in local], dtype=np.float64)


def capacity_relation(capacity_params: dict) -> CapacityRelation:
    """The area → DC-capacity relation of ``capacity_params`` (the shipped USPVDB fit)."""
    return CapacityRelation.from_params(capacity_params)


def installation_capacity_kwp(installation_area_m2: np.ndarray,
                              capacity_relation: CapacityRelation) -> dict[str, np.ndarray]:
    """(K,) DC capacity in kWp: ``estimate``, interval ``low`` / ``high``, and ``extrapolated`` (bool: the area
    lies outside the relation's fitted range)."""
    estimate, low, high = capacity_relation.kwp(installation_area_m2)
    return {"estimate": estimate, "low": low, "high": high,
            "extrapolated": capacity_relation.extrapolated(installation_area_m2)}


def installation_scores(member_scores: np.ndarray, member_area_m2: np.ndarray,
                        installation_labels: np.ndarray) -> dict[str, np.ndarray]:
    """(K,) ``max`` and area-weighted ``mean`` of the member detections' scores (≈ the mean PV probability over
    the installation's pixels)."""
    members = _members(installation_labels)
    best = np.array([member_scores[rows].max() for rows in members], dtype=np.float64)
    mean = np.array([np.average(member_scores[rows], weights=member_area_m2[rows])
                     if member_area_m2[rows].sum() > 0 else member_scores[rows].mean() for rows in members],
                    dtype=np.float64)
    return {"max": best, "mean": mean}


def installation_members(member_ids: np.ndarray, installation_labels: np.ndarray) -> list[list[str]]:
    """(K,) sorted detection ids of each installation."""
    return [sorted(str(i) for i in member_ids[rows]) for rows in _members(installation_labels)]


def installation_rows(
    installation_geometry: np.ndarray, installation_members: list[list[str]],
    installation_scores: dict[str, np.ndarray], installation_area_m2: np.ndarray,
    installation_orientation_deg: np.ndarray, installation_capacity_kwp: dict[str, np.ndarray], plan_id: str,
    gap_m: float = 5.0,
) -> pa.Table:
    """``installations`` rows (schema :data:`INSTALLATION_SCHEMA`): installation_id (uuid5 of plan and sorted
    member ids), plan_id, geometry_wkb (EPSG:4326), detection_ids / count, score max / mean, area_m2 (m²),
    orientation_deg, capacity_kwp with low / high and capacity_extrapolated, centroid lon/lat (degrees), gap_m."""
    count = len(installation_geometry)
    centroids = shapely.centroid(installation_geometry) if count else np.empty(0, object)
    ids = [str(uuid.uuid5(INSTALLATION_NAMESPACE, f"{plan_id}:{','.join(m)}")) for m in installation_members]
    columns: dict[str, Any] = {
        "installation_id": ids, "plan_id": [plan_id] * count,
        "geometry_wkb": shapely.to_wkb(installation_geometry).tolist() if count else [],
        "detection_ids": installation_members, "detection_count": [len(m) for m in installation_members],
        "score_max": installation_scores["max"], "score_mean": installation_scores["mean"],
        "area_m2": installation_area_m2, "orientation_deg": installation_orientation_deg,
        "capacity_kwp": installation_capacity_kwp["estimate"], "capacity_kwp_low": installation_capacity_kwp["low"],
        "capacity_kwp_high": installation_capacity_kwp["high"],
        "capacity_extrapolated": installation_capacity_kwp["extrapolated"],
        "centroid_lon": shapely.get_x(centroids) if count else [], "centroid_lat": shapely.get_y(centroids) if count
        else [], "gap_m": [float(gap_m)] * count,
    }
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in INSTALLATION_SCHEMA},
                    schema=INSTALLATION_SCHEMA)
